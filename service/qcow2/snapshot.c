/* snapshot.c: the internal snapshot table: parsing and validating it through
 * the cursor, the shared in-memory copy listings borrow, and snapshot views. */
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cursor.h"
#include "qcow2_int.h"

#define SNAP_READ_STEP (64u << 10) /* the table is read in growing steps from this size */

/* One parse of the table, immutable once built and shared: the image holds one
 * reference, each listing another, so a listing copies nothing and a table
 * replaced by a snapshot change lives on until its last listing is freed. The
 * entries' id and name strings live in the same block, after the array. */
struct snap_set {
    _Atomic unsigned refs;
    uint32_t n;
    uint64_t bytes; /* size of the block: what it costs in memory */
    struct qcow2_snapshot_info s[];
};

static struct snap_set *set_of(struct qcow2_snapshot_info *list)
{
    return (struct snap_set *)((char *)list - offsetof(struct snap_set, s));
}

static void set_put(struct snap_set *set)
{
    if (set && atomic_fetch_sub(&set->refs, 1) == 1)
        free(set);
}

void qcow2_free_snapshots(struct qcow2_image *img)
{
    if (img->snaps) {
        struct snap_set *set = set_of(img->snaps);
        meta_release(img, set->bytes);
        set_put(set);
    }
    img->snaps = NULL;
    img->nb_snaps = 0;
}

/* The next entry of table t (entry i): its fixed part in *fixed, the bytes of
 * its extra data, id and name in *extra, *id, *name, stepping past them and the
 * padding (the last entry's padding may be missing: QEMU writes none). */
static int take_entry(struct cursor *t, uint32_t i, struct cursor *fixed, struct cursor *extra, struct cursor *id,
                      struct cursor *name)
{
    if (!cur_sub(t, SNAP_FIXED, fixed))
        return err_fail(EINVAL, "snapshot table is truncated at entry %u (%zu bytes left, an entry needs %u)", i,
                        cur_remaining(t), SNAP_FIXED);
    struct cursor f = *fixed;
    cur_skip(&f, 12);
    uint16_t id_len = cur_be16(&f), name_len = cur_be16(&f);
    cur_skip(&f, 20);
    uint32_t extra_len = cur_be32(&f);
    if (extra_len > QCOW2_MAX_SNAPSHOT_EXTRA)
        return err_fail(EINVAL, "snapshot table entry %u has %u bytes of extra data (limit %u)", i, extra_len,
                        QCOW2_MAX_SNAPSHOT_EXTRA);
    if (!cur_sub(t, extra_len, extra) || !cur_sub(t, id_len, id) || !cur_sub(t, name_len, name))
        return err_fail(EINVAL, "snapshot table entry %u runs past the end of the table", i);
    cur_align_or_end(t, 8);
    return 0;
}

int snap_table_starts(const unsigned char *buf, uint64_t len, uint32_t n, uint64_t *starts)
{
    struct cursor t = cur_init(buf, (size_t)len), f, x, id, name;
    for (uint32_t i = 0; i < n; i++) {
        starts[i] = cur_pos(&t);
        int ret = take_entry(&t, i, &f, &x, &id, &name);
        if (ret < 0)
            return ret;
    }
    starts[n] = cur_pos(&t);
    return 0;
}

/* A window on the table in the file (SNAP_WINDOW, qcow2_int.h), to walk it an
 * entry at a time without holding all of it: an entry is at most
 * SNAP_MAX_ENTRY bytes, less than the window, so one read always brings a
 * whole entry in. */
_Static_assert(SNAP_MAX_ENTRY < SNAP_WINDOW, "a window holds any entry");

struct snap_walk {
    struct qcow2_image *img;
    unsigned char *buf;  /* SNAP_WINDOW bytes */
    uint64_t start, len; /* table bytes [start, start+len) are in buf */
    uint64_t max;        /* the table ends here at the latest (file end, size limit) */
    uint64_t pos;        /* where the next entry starts */
};

/* Make the window hold table bytes [pos, pos+need), or up to max. */
static int walk_fill(struct snap_walk *w, uint64_t need)
{
    uint64_t end = need > w->max - w->pos ? w->max : w->pos + need;
    if (w->len && w->pos >= w->start && end <= w->start + w->len)
        return 0;
    w->start = w->pos;
    w->len = w->max - w->pos < SNAP_WINDOW ? w->max - w->pos : SNAP_WINDOW;
    return w->len ? vfs_pread(w->img->file, w->buf, (size_t)w->len, w->img->h.snapshots_offset + w->start) : 0;
}

/* A cursor on the window from the next entry on. */
static struct cursor walk_cursor(const struct snap_walk *w)
{
    struct cursor t = cur_init(w->buf, (size_t)w->len);
    cur_skip(&t, w->pos - w->start);
    return t;
}

/* Entry i, the next one (see take_entry). */
static int walk_next(struct snap_walk *w, uint32_t i, struct cursor *fixed, struct cursor *extra, struct cursor *id,
                     struct cursor *name)
{
    int ret = walk_fill(w, SNAP_FIXED);
    if (ret < 0)
        return ret;
    struct cursor t = walk_cursor(w), f;
    if (cur_sub(&t, SNAP_FIXED, &f)) {
        /* its fixed part says how long it is: bring all of it in */
        cur_skip(&f, 12);
        uint64_t id_len = cur_be16(&f), name_len = cur_be16(&f);
        cur_skip(&f, 20);
        if ((ret = walk_fill(w, SNAP_FIXED + id_len + name_len + cur_be32(&f) + 7)) < 0)
            return ret;
    }
    t = walk_cursor(w);
    if ((ret = take_entry(&t, i, fixed, extra, id, name)) < 0)
        return ret;
    w->pos = w->start + cur_pos(&t);
    return 0;
}

int qcow2_read_snapshots(struct qcow2_image *img)
{
    uint32_t n = img->h.nb_snapshots;
    if (!n)
        return 0;
    uint64_t off = img->h.snapshots_offset;
    /* qcow2_check_table put the start inside the file; for check (img->checking) it
     * may lie anywhere, and what is past the end reads as zeroes, as in qemu */
    uint64_t avail = off < img->file_size ? img->file_size - off : 0;
    if (img->checking)
        avail = (uint64_t)n * SNAP_MAX_ENTRY;
    struct snap_walk w = {.img = img, .max = avail < QCOW2_MAX_SNAPSHOT_TABLE ? avail : QCOW2_MAX_SNAPSHOT_TABLE};
    if (!(w.buf = malloc(SNAP_WINDOW)))
        return err_fail(ENOMEM, "out of memory for the snapshot table");
    /* the strings' total first, for one block holding everything */
    struct cursor f, x, id, name;
    uint64_t strings = 0;
    int ret = 0;
    for (uint32_t i = 0; i < n; i++) {
        if ((ret = walk_next(&w, i, &f, &x, &id, &name)) < 0)
            goto out;
        strings += cur_remaining(&id) + cur_remaining(&name) + 2;
    }
    uint64_t len = w.pos;
    uint64_t bytes = sizeof(struct snap_set) + (uint64_t)n * sizeof(struct qcow2_snapshot_info) + strings;
    if ((ret = meta_charge(img, bytes, "the snapshot table")) < 0)
        goto out;
    struct snap_set *set = malloc(bytes);
    if (!set) {
        meta_release(img, bytes);
        ret = err_fail(ENOMEM, "out of memory for %u snapshots", n);
        goto out;
    }
    atomic_init(&set->refs, 1);
    set->n = n;
    set->bytes = bytes;
    char *str = (char *)&set->s[n];
    w.pos = w.len = 0; /* again from the start */
    for (uint32_t i = 0; i < n; i++) {
        struct qcow2_snapshot_info *s = &set->s[i];
        if ((ret = walk_next(&w, i, &f, &x, &id, &name)) < 0) { /* it passed above: only I/O can fail */
            meta_release(img, bytes);
            set_put(set);
            goto out;
        }
        s->l1_offset = cur_be64(&f);
        s->l1_size = cur_be32(&f);
        cur_skip(&f, 4); /* id and name lengths */
        s->date_sec = cur_be32(&f);
        s->date_nsec = cur_be32(&f);
        s->vm_clock_nsec = cur_be64(&f);
        s->vm_state_size = cur_be32(&f);
        s->disk_size = img->h.size;
        s->icount = UINT64_MAX;
        if (cur_remaining(&x) >= 8)
            s->vm_state_size = cur_be64(&x);
        if (cur_remaining(&x) >= 8)
            s->disk_size = cur_be64(&x);
        if (cur_remaining(&x) >= 8)
            s->icount = cur_be64(&x);
        size_t il = cur_remaining(&id), nl = cur_remaining(&name);
        s->id = str;
        memcpy(str, cur_take(&id, il), il);
        str[il] = 0;
        str += il + 1;
        s->name = str;
        memcpy(str, cur_take(&name, nl), nl);
        str[nl] = 0;
        str += nl + 1;
    }
    img->snaps = set->s;
    img->nb_snaps = n;
    img->snap_table_len = len;
    for (uint32_t i = 0; i < n; i++) {
        const struct qcow2_snapshot_info *s = &set->s[i];
        char what[64];
        snprintf(what, sizeof what, "L1 table of snapshot %.40s", s->id);
        ret = qcow2_check_table(img, s->l1_offset, s->l1_size, 8, QCOW2_MAX_L1_BYTES, what);
        if (ret < 0 && !img->checking)
            goto out;
        ret = 0; /* opened for check, which counts a bad L1 table as qemu-img's check mode does */
        if (s->disk_size > QCOW2_MAX_VIRTUAL_SIZE) {
            ret = err_fail(ENOTSUP,
                           "snapshot %.40s has a virtual size of %" PRIu64 " bytes, more than the limit of %" PRIu64,
                           s->id, s->disk_size, (uint64_t)QCOW2_MAX_VIRTUAL_SIZE);
            goto out;
        }
    }
out:
    free(w.buf);
    if (ret < 0)
        qcow2_free_snapshots(img);
    return ret;
}

int qcow2_use_snapshot(struct qcow2_image *img, const char *name)
{
    const struct qcow2_snapshot_info *s = NULL;
    for (uint32_t i = 0; i < img->nb_snaps && !s; i++)
        if (!strcmp(img->snaps[i].id, name))
            s = &img->snaps[i];
    for (uint32_t i = 0; i < img->nb_snaps && !s; i++)
        if (!strcmp(img->snaps[i].name, name))
            s = &img->snaps[i];
    if (!s)
        return err_fail(ENOENT, "no snapshot named '%s'", name);
    uint64_t l2_span = (uint64_t)img->l2_entries << img->cluster_bits;
    uint64_t need = s->disk_size / l2_span + (s->disk_size % l2_span != 0);
    if (need > s->l1_size)
        return err_fail(EINVAL, "snapshot '%s': L1 table has %u entries, too few for %" PRIu64 " bytes", name, s->l1_size,
                        s->disk_size);
    /* the view's L1 replaces the active one in memory */
    int ret = meta_charge(img, (uint64_t)s->l1_size * 8, "the snapshot's L1 table");
    if (ret < 0)
        return ret;
    uint64_t *l1;
    ret = qcow2_load_u64_table(img, s->l1_offset, s->l1_size, &l1);
    if (ret < 0) {
        meta_release(img, (uint64_t)s->l1_size * 8);
        return ret;
    }
    meta_release(img, (uint64_t)img->l1_size * 8);
    free(img->l1);
    img->l1 = l1;
    img->l1_size = s->l1_size;
    img->size = s->disk_size;
    return 0;
}

/* ---- listings ---- */

int qcow2_snapshot_list(struct qcow2_image *img, struct qcow2_snapshot_info **out, uint32_t *n)
{
    *out = NULL;
    *n = 0;
    if (img->fmt != QCOW2_FMT_QCOW2)
        return 0;
    pthread_rwlock_rdlock(&img->rwlock);
    if (img->snaps) {
        struct snap_set *set = set_of(img->snaps);
        atomic_fetch_add(&set->refs, 1);
        *out = set->s;
        *n = set->n;
    }
    pthread_rwlock_unlock(&img->rwlock);
    return 0;
}

void qcow2_snapshot_list_free(struct qcow2_snapshot_info *list, uint32_t n)
{
    (void)n;
    if (list)
        set_put(set_of(list));
}
