/* bitmod.c: changing persistent bitmaps: add, remove, clear, enable, disable and
 * merge. A change writes the new bitmap tables and the new directory to fresh
 * clusters and flushes, then switches the header's bitmaps extension with one
 * write of the header cluster and flushes, and only then frees the old clusters. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cursor.h"
#include "qcow2_int.h"

#define HDR_BACKING_OFFSET 8
#define HDR_AUTOCLEAR 88
#define EXT_BITMAPS_LEN 24u

/* Clusters taken by a change that is not switched in yet: given back on failure. */
struct undo {
    struct pending_free *r;
    size_t n, cap;
};

static int undo_note(struct undo *u, uint64_t off, uint64_t len)
{
    if (u->n == u->cap) {
        size_t cap = u->cap ? u->cap * 2 : 16;
        struct pending_free *r = realloc(u->r, cap * sizeof *r);
        if (!r)
            return err_fail(ENOMEM, "out of memory");
        u->r = r;
        u->cap = cap;
    }
    u->r[u->n++] = (struct pending_free){off, len};
    return 0;
}

static void undo_run(struct qcow2_image *img, struct undo *u)
{
    for (size_t i = 0; i < u->n; i++)
        rc_update_range(img, u->r[i].off, u->r[i].len, -1); /* best effort: a failure only leaks */
    u->n = 0;
}

/* Fresh clusters for len bytes, written with buf; the file size follows. */
static int put_fresh(struct qcow2_image *img, struct undo *u, const void *buf, uint64_t len, uint64_t *off)
{
    uint64_t cs = img->cluster_size, n = (len + cs - 1) / cs;
    int ret = alloc_clusters(img, n, off);
    if (ret < 0)
        return ret;
    if ((ret = undo_note(u, *off, n * cs)) < 0) {
        rc_update_range(img, *off, n * cs, -1);
        return ret;
    }
    if ((ret = vfs_pwrite(img->file, buf, len, *off)) < 0)
        return ret;
    if (*off + n * cs > img->file_size) {
        /* the rest of the last cluster exists too, so checks of the file size pass */
        if (len % cs) {
            static const unsigned char z[512];
            uint64_t pad = n * cs - len;
            for (uint64_t p = 0; p < pad && ret == 0; p += sizeof z)
                ret = vfs_pwrite(img->file, z, pad - p < sizeof z ? pad - p : sizeof z, *off + len + p);
            if (ret < 0)
                return ret;
        }
        img->file_size = *off + n * cs;
    }
    return 0;
}

static bool zero_bytes(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

/* Write a bitmap's bits (NULL: all clear) as fresh data clusters and a fresh
 * table of table_size entries; *table_off is the new table (0 for an empty one). */
static int write_fresh(struct qcow2_image *img, struct undo *u, uint32_t table_size, const unsigned char *bits,
                       uint64_t *table_off)
{
    uint64_t cs = img->cluster_size;
    *table_off = 0;
    if (!table_size)
        return 0;
    uint64_t *t = calloc(table_size, 8);
    if (!t)
        return err_fail(ENOMEM, "out of memory");
    int ret = 0;
    for (uint32_t j = 0; bits && j < table_size && ret == 0; j++) {
        const unsigned char *d = bits + (uint64_t)j * cs;
        uint64_t off;
        if (zero_bytes(d, cs))
            continue;
        if ((ret = put_fresh(img, u, d, cs, &off)) == 0)
            t[j] = htobe64(off);
    }
    if (ret == 0)
        ret = put_fresh(img, u, t, (uint64_t)table_size * 8, table_off);
    free(t);
    return ret;
}

/* Lower the references of an old bitmap table and its data clusters. */
static int free_table(struct qcow2_image *img, uint64_t table_off, uint32_t table_size)
{
    if (!table_size || !table_off)
        return 0;
    uint64_t *t;
    int ret = qcow2_load_u64_table(img, table_off, table_size, &t);
    if (ret < 0)
        return ret;
    for (uint32_t j = 0; j < table_size && ret == 0; j++) {
        uint64_t off = t[j] & QCOW2_L2E_OFFSET_MASK;
        if (off)
            ret = rc_update_range(img, off, img->cluster_size, -1);
    }
    free(t);
    if (ret == 0)
        ret = rc_update_range(img, table_off, (uint64_t)table_size * 8, -1);
    return ret;
}

/* Rewrite the header cluster with the bitmaps extension saying (n, size, off), or
 * without it when n is 0, and the autoclear bit to match; one write, then a flush. */
static int switch_ext(struct qcow2_image *img, uint32_t n, uint64_t dir_size, uint64_t dir_off)
{
    uint64_t cs = img->cluster_size, hl = img->h.header_length;
    unsigned char *old = calloc(1, cs), *nw = calloc(1, cs);
    int ret = 0;
    if (!old || !nw) {
        ret = err_fail(ENOMEM, "out of memory");
        goto out;
    }
    if ((ret = vfs_pread(img->file, old, cs < img->file_size ? cs : img->file_size, 0)) < 0)
        goto out;
    uint64_t end = img->h.backing_file_offset ? img->h.backing_file_offset : cs, pos = hl, o = hl;
    memcpy(nw, old, hl);
    unsigned char ext[8 + EXT_BITMAPS_LEN] = {0};
    uint32_t v32 = htobe32(QCOW2_EXT_BITMAPS);
    memcpy(ext, &v32, 4);
    v32 = htobe32(EXT_BITMAPS_LEN);
    memcpy(ext + 4, &v32, 4);
    v32 = htobe32(n);
    memcpy(ext + 8, &v32, 4);
    uint64_t v64 = htobe64(dir_size);
    memcpy(ext + 16, &v64, 8);
    v64 = htobe64(dir_off);
    memcpy(ext + 24, &v64, 8);
    bool placed = n == 0;
    /* the other extensions stay as they are, in their order; ours takes the old one's place */
    struct cursor c = cur_init(old, (size_t)(end < cs ? end : cs)), x;
    cur_skip(&c, pos);
    for (;;) {
        struct cursor whole = c; /* the extension with its header and padding, as it is */
        if (!cur_sub(&c, 8, &x))
            break;
        uint32_t type = cur_be32(&x), len = cur_be32(&x);
        if (type == QCOW2_EXT_END || !cur_skip(&c, len) || !cur_align(&c, 8))
            break;
        uint64_t step = cur_pos(&c) - cur_pos(&whole);
        if (type == QCOW2_EXT_BITMAPS) {
            if (!placed && o + sizeof ext <= cs) {
                memcpy(nw + o, ext, sizeof ext);
                o += sizeof ext;
            }
            placed = true;
        } else if (o + step <= cs) {
            memcpy(nw + o, cur_take(&whole, step), step);
            o += step;
        } else {
            o = cs + 1;
        }
    }
    if (!placed) {
        if (o + sizeof ext <= cs)
            memcpy(nw + o, ext, sizeof ext);
        o += sizeof ext;
    }
    o += 8; /* the end marker (zeroes) */
    uint64_t backing = 0;
    if (img->h.backing_file_offset) {
        backing = o;
        struct cursor b = cur_init(old, (size_t)cs);
        const unsigned char *name =
            cur_skip(&b, img->h.backing_file_offset) ? cur_take(&b, img->h.backing_file_size) : NULL;
        if (!name) {
            ret = mark_corrupt(img, "the backing file name left the header cluster");
            goto out;
        }
        if (o + img->h.backing_file_size <= cs)
            memcpy(nw + o, name, img->h.backing_file_size);
        o += img->h.backing_file_size;
    }
    if (o > cs) {
        ret = err_fail(EOVERFLOW, "no room in the header cluster (%" PRIu64 " bytes) for the bitmaps extension", cs);
        goto out;
    }
    uint64_t autoclear = n ? img->h.autoclear_features | QCOW2_AUTOCLEAR_BITMAPS
                           : img->h.autoclear_features & ~QCOW2_AUTOCLEAR_BITMAPS;
    v64 = htobe64(backing);
    memcpy(nw + HDR_BACKING_OFFSET, &v64, 8);
    v64 = htobe64(autoclear);
    memcpy(nw + HDR_AUTOCLEAR, &v64, 8);
    if ((ret = vfs_pwrite(img->file, nw, cs, 0)) < 0 || (ret = qcow2_sync(img, img->file)) < 0)
        goto out;
    img->h.backing_file_offset = backing;
    img->h.autoclear_features = autoclear;
    img->info.autoclear = autoclear;
    img->nb_bitmaps = n;
    img->bitmap_dir_size = n ? dir_size : 0;
    img->bitmap_dir_off = n ? dir_off : 0;
out:
    free(old);
    free(nw);
    return ret;
}

/* One entry of the new directory. */
struct new_entry {
    int from;            /* the old entry it copies, or -1: the added one */
    uint64_t table_off;
    uint32_t table_size; /* (added entry only) */
    uint32_t flags;
    struct bm_track track; /* its in-memory state from now on */
};

/* The directory as it is on disk (caller frees) and where each of its n entries starts. */
static int read_dir(struct qcow2_image *img, unsigned char **buf, uint64_t **starts)
{
    uint32_t n = img->info.nb_bitmaps;
    uint64_t len = n ? img->bitmap_dir_size : 0;
    *buf = malloc(len + 1);
    *starts = calloc(n + 1, sizeof **starts);
    if (!*buf || !*starts)
        return err_fail(ENOMEM, "out of memory");
    int ret = len ? vfs_pread(img->file, *buf, len, img->bitmap_dir_off) : 0;
    if (ret < 0)
        return ret;
    /* parsed when the image was opened, but read again: walk it as carefully */
    struct cursor d = cur_init(*buf, (size_t)len), f;
    for (uint32_t i = 0; i < n; i++) {
        (*starts)[i] = cur_pos(&d);
        if (!cur_sub(&d, BME_FIXED, &f))
            return mark_corrupt(img, "bitmap directory entry %u is truncated", i);
        cur_skip(&f, 18);
        uint16_t name_len = cur_be16(&f);
        uint32_t extra = cur_be32(&f);
        if (!cur_skip(&d, (uint64_t)extra + name_len) || !cur_align(&d, 8))
            return mark_corrupt(img, "bitmap directory entry %u runs past the end of the directory", i);
    }
    (*starts)[n] = cur_pos(&d);
    return 0;
}

/* Make the directory the n entries of ents say (name and granularity of an added
 * entry from add_name/add_gran_bits), switch the header to it, free the old
 * directory and the old tables listed in drop (pairs of offset and size), and
 * refresh img's view. *switched says whether the switch happened: then img owns
 * every ents[k].track.bits (set to NULL in ents) and frees the old buffers no
 * entry kept; else the fresh clusters of u are given back, img is unchanged and
 * the caller keeps its buffers. */
static int commit(struct qcow2_image *img, struct undo *u, struct new_entry *ents, uint32_t n, const char *add_name,
                  unsigned add_gran_bits, const uint64_t *drop, unsigned ndrop, bool *switched)
{
    *switched = false;
    unsigned char *old = NULL, *dir = NULL;
    uint64_t *starts = NULL, size = 0, dir_off = 0;
    int ret = read_dir(img, &old, &starts);
    if (ret < 0)
        goto fail;
    for (uint32_t k = 0; k < n; k++)
        size += ents[k].from >= 0 ? starts[ents[k].from + 1] - starts[ents[k].from]
                                  : (BME_FIXED + strlen(add_name) + 7) & ~7ull;
    if (size > QCOW2_MAX_BITMAP_DIR) {
        ret = err_fail(E2BIG, "the bitmap directory would grow past %u bytes", QCOW2_MAX_BITMAP_DIR);
        goto fail;
    }
    if (!(dir = calloc(1, size + 1))) {
        ret = err_fail(ENOMEM, "out of memory");
        goto fail;
    }
    uint64_t pos = 0;
    for (uint32_t k = 0; k < n; k++) {
        unsigned char *e = dir + pos;
        if (ents[k].from >= 0) {
            uint64_t a = starts[ents[k].from], b = starts[ents[k].from + 1];
            memcpy(e, old + a, b - a);
            pos += b - a;
        } else {
            size_t nl = strlen(add_name);
            uint32_t v32 = htobe32(ents[k].table_size);
            memcpy(e + 8, &v32, 4);
            e[16] = BME_TYPE_DIRTY;
            e[17] = (unsigned char)add_gran_bits;
            uint16_t v16 = htobe16((uint16_t)nl);
            memcpy(e + 18, &v16, 2);
            memcpy(e + BME_FIXED, add_name, nl);
            pos += (BME_FIXED + nl + 7) & ~7ull;
        }
        uint64_t v64 = htobe64(ents[k].table_off);
        memcpy(e, &v64, 8);
        uint32_t fl = htobe32(ents[k].flags);
        memcpy(e + 12, &fl, 4);
    }
    /* 1. the new directory and every fresh table durable, refcounts first */
    if (n && (ret = put_fresh(img, u, dir, size, &dir_off)) < 0)
        goto fail;
    if ((ret = rc_writeback(img)) < 0 || (ret = qcow2_sync(img, img->file)) < 0)
        goto fail;
    /* 2. the switch */
    uint64_t old_off = img->bitmap_dir_off, old_size = img->info.nb_bitmaps ? img->bitmap_dir_size : 0;
    if ((ret = switch_ext(img, n, size, dir_off)) < 0)
        goto fail;
    u->n = 0; /* from here on the fresh clusters are in use */
    *switched = true;
    /* 3. the old clusters lose their references (a failure leaks, which is safe) */
    if (old_size)
        ret = rc_update_range(img, old_off, old_size, -1);
    for (unsigned i = 0; i < ndrop && ret == 0; i++)
        ret = free_table(img, drop[2 * i], (uint32_t)drop[2 * i + 1]);
    /* 4. our view follows the disk: entries move to their new places; old
     * buffers no entry kept are freed */
    struct bm_track *bm = calloc(n ? n : 1, sizeof *bm);
    for (uint32_t k = 0; k < n; k++) {
        if (bm)
            bm[k] = ents[k].track;
        else
            free(ents[k].track.bits);
    }
    for (uint32_t j = 0; img->bm && j < img->info.nb_bitmaps; j++) {
        bool kept = false;
        for (uint32_t k = 0; k < n && !kept; k++)
            kept = ents[k].track.bits == img->bm[j].bits;
        if (kept)
            img->bm[j].bits = NULL;
    }
    for (uint32_t k = 0; k < n; k++)
        ents[k].track.bits = NULL;
    qcow2_free_bitmaps(img);
    int r2 = qcow2_read_bitmaps(img);
    img->info.bitmaps = img->bitmaps;
    if (!bm || r2 < 0 || img->info.nb_bitmaps != n) {
        for (uint32_t k = 0; bm && k < n; k++)
            free(bm[k].bits);
        free(bm);
        if (!bm)
            ret = err_fail(ENOMEM, "out of memory");
        else
            ret = r2 < 0 ? r2 : mark_corrupt(img, "the bitmap directory just written does not read back");
        goto out;
    }
    img->bm = bm;
    for (uint32_t k = 0; k < n; k++) {
        bm[k].entry_off = img->bitmaps[k].entry_offset;
        if (bm[k].tracking)
            img->bitmaps[k].in_use = false; /* ours, not stale */
    }
    goto out;
fail:
    undo_run(img, u);
out:
    free(old);
    free(dir);
    free(starts);
    return ret;
}

/* ---- the operations ---- */

static int check_name(const char *name)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0)
        return err_fail(EINVAL, "a bitmap name cannot be empty");
    if (n > QCOW2_MAX_BITMAP_NAME)
        return err_fail(EINVAL, "a bitmap name has at most %u bytes (this one has %zu)", QCOW2_MAX_BITMAP_NAME, n);
    return 0;
}

/* Take the write lock for a change of img's bitmaps. */
static int begin(struct qcow2_image *img, const char *name)
{
    int ret = check_name(name);
    if (ret < 0)
        return ret;
    if (img->fmt != QCOW2_FMT_QCOW2)
        return err_fail(ENOTSUP, "only qcow2 images have persistent bitmaps");
    if (img->h.version < 3)
        return err_fail(ENOTSUP, "qcow2 v2 images (compat=0.10) cannot store bitmaps");
    if (!img->rw)
        return err_fail(EROFS, "image is open read-only");
    if (img->broken)
        return err_fail(EUCLEAN, "image is marked corrupt; run check -r all");
    pthread_rwlock_wrlock(&img->rwlock);
    qcow2_note_change(img, false);
    img->unsynced = true;
    if ((ret = begin_write(img)) == 0)
        ret = meta_flush(img);
    if (ret < 0)
        pthread_rwlock_unlock(&img->rwlock);
    return ret;
}

static int end(struct qcow2_image *img, struct undo *u, int ret)
{
    if (u->n)
        undo_run(img, u);
    free(u->r);
    if (ret == 0)
        ret = meta_flush(img);
    if (ret == 0)
        ret = meta_flush(img);
    pthread_rwlock_unlock(&img->rwlock);
    return ret;
}

/* The new directory as the old one, each entry copying its old self. */
static struct new_entry *same_dir(struct qcow2_image *img, uint32_t extra)
{
    uint32_t n = img->info.nb_bitmaps;
    struct new_entry *e = calloc(n + extra + 1, sizeof *e);
    if (!e) {
        err_fail(ENOMEM, "out of memory");
        return NULL;
    }
    for (uint32_t i = 0; i < n; i++) {
        const struct qcow2_bitmap_info *b = &img->bitmaps[i];
        e[i].from = (int)i;
        e[i].table_off = b->table_offset;
        e[i].flags = (b->in_use ? BME_FLAG_IN_USE : 0) | (b->auto_ ? BME_FLAG_AUTO : 0);
        if (img->bm) {
            e[i].track = img->bm[i];
            if (e[i].track.tracking)
                e[i].flags |= BME_FLAG_IN_USE;
        }
    }
    return e;
}

/* Keep the extra-data flag of entry i as it was on disk. */
static int disk_flags(struct qcow2_image *img, uint32_t i, uint32_t *flags)
{
    uint32_t be;
    int ret = vfs_pread(img->file, &be, 4, img->bitmaps[i].entry_offset + 12);
    if (ret == 0)
        *flags = be32toh(be) & BME_FLAG_EXTRA_COMPAT;
    return ret;
}

/* Or in the extra-data flag the entries had on disk (same_dir knows only ours). */
static int keep_extra(struct qcow2_image *img, struct new_entry *ents)
{
    for (uint32_t k = 0; k < img->info.nb_bitmaps; k++) {
        uint32_t f = 0;
        int ret = disk_flags(img, k, &f);
        if (ret < 0)
            return ret;
        ents[k].flags |= f;
    }
    return 0;
}

static uint32_t table_entries(const struct qcow2_image *img, unsigned gran_bits)
{
    uint64_t bits = (img->h.size + (1ull << gran_bits) - 1) >> gran_bits;
    uint64_t bytes = (bits + 7) / 8;
    return (uint32_t)((bytes + img->cluster_size - 1) >> img->cluster_bits);
}

/* Find name for a change; -ENOENT when unknown. */
static int find(struct qcow2_image *img, const char *name, uint32_t *idx)
{
    int i = bitmap_find(img, name);
    if (i < 0)
        return err_fail(ENOENT, "no bitmap named '%s'", name);
    *idx = (uint32_t)i;
    return 0;
}

static bool tracked(const struct qcow2_image *img, uint32_t i)
{
    return img->bm && img->bm[i].tracking;
}

static int need_consistent(struct qcow2_image *img, uint32_t i)
{
    const struct qcow2_bitmap_info *b = &img->bitmaps[i];
    if (b->in_use && !tracked(img, i))
        return err_fail(EBUSY,
                        "bitmap '%s' is in use by another program or was left so by a crash: it is "
                        "inconsistent and cannot be used (remove or clear it)",
                        b->name);
    if (!b->consistent)
        return err_fail(ENOTSUP, "bitmap '%s' has extra data this program does not know: it cannot be changed",
                        b->name);
    return 0;
}

int qcow2_bitmap_add(struct qcow2_image *img, const char *name, uint32_t granularity, bool disabled)
{
    if (granularity == 0 && img->fmt == QCOW2_FMT_QCOW2) {
        /* as qemu-img: the cluster size, within 4 KiB .. 64 KiB */
        granularity = img->cluster_size < 4096 ? 4096 : img->cluster_size > 65536 ? 65536 : img->cluster_size;
    }
    if (granularity < 512 || (granularity & (granularity - 1)))
        return err_fail(EINVAL, "granularity %u: it must be a power of 2 and at least 512", granularity);
    unsigned gb = (unsigned)__builtin_ctz(granularity);
    int ret = begin(img, name);
    if (ret < 0)
        return ret;
    struct undo u = {0};
    struct new_entry *ents = NULL;
    uint32_t n = img->info.nb_bitmaps;
    uint32_t ts = table_entries(img, gb);
    bool sw = false;
    if (bitmap_find(img, name) >= 0) {
        ret = err_fail(EEXIST, "a bitmap named '%s' exists", name);
        goto out;
    }
    if (n >= QCOW2_MAX_BITMAPS) {
        ret = err_fail(E2BIG, "the image has the most bitmaps it can (%u)", QCOW2_MAX_BITMAPS);
        goto out;
    }
    if (ts == 0) {
        /* qemu refuses a bitmap without a table: there is nothing to track */
        ret = err_fail(EINVAL, "a disk of 0 bytes cannot have bitmaps");
        goto out;
    }
    if (ts > BME_MAX_TABLE_SIZE || (uint64_t)ts * img->cluster_size > BME_MAX_PHYS_SIZE) {
        ret = err_fail(EINVAL, "a bitmap with granularity %u would take too much space for this disk; use a "
                       "larger granularity", granularity);
        goto out;
    }
    /* an enabled bitmap is tracked in memory from now on */
    if (!disabled && (ret = bitmap_bits_fit(img, name, (uint64_t)ts << img->cluster_bits)) < 0)
        goto out;
    if (!(ents = same_dir(img, 1)) || (ret = keep_extra(img, ents)) < 0) {
        ret = ret < 0 ? ret : -ENOMEM;
        goto out;
    }
    struct new_entry *e = &ents[n];
    e->from = -1;
    e->table_size = ts;
    e->flags = disabled ? 0 : BME_FLAG_AUTO | BME_FLAG_IN_USE; /* enabled: tracked from now on */
    e->track.gran_bits = gb;
    e->track.nbits = (img->h.size + granularity - 1) >> gb;
    e->track.tracking = !disabled;
    e->track.loaded = true;
    if (!(e->track.bits = calloc(1, ts ? (size_t)ts * img->cluster_size : 1))) {
        ret = err_fail(ENOMEM, "out of memory for bitmap '%s'", name);
        goto out;
    }
    if ((ret = write_fresh(img, &u, ts, NULL, &e->table_off)) < 0)
        goto out;
    ret = commit(img, &u, ents, n + 1, name, gb, NULL, 0, &sw);
out:
    if (ents && !sw)
        free(ents[n].track.bits);
    free(ents);
    return end(img, &u, ret);
}

int qcow2_bitmap_remove(struct qcow2_image *img, const char *name)
{
    int ret = begin(img, name);
    if (ret < 0)
        return ret;
    struct undo u = {0};
    struct new_entry *ents = NULL;
    uint32_t i = 0, n = img->info.nb_bitmaps;
    bool sw;
    /* a stale bitmap may go: nothing of it is trusted */
    if ((ret = find(img, name, &i)) < 0)
        goto out;
    if (!(ents = same_dir(img, 0)) || (ret = keep_extra(img, ents)) < 0) {
        ret = ret < 0 ? ret : -ENOMEM;
        goto out;
    }
    memmove(&ents[i], &ents[i + 1], (n - i - 1) * sizeof *ents);
    uint64_t drop[2] = {img->bitmaps[i].table_offset, img->bitmaps[i].table_size};
    ret = commit(img, &u, ents, n - 1, NULL, 0, drop, 1, &sw);
out:
    free(ents);
    return end(img, &u, ret);
}

/* Set entry e (bitmap i) to a fresh table holding bits (NULL: clear), its old table to drop. */
static int refill(struct qcow2_image *img, struct undo *u, struct new_entry *e, uint32_t i, const unsigned char *bits,
                  uint64_t drop[2])
{
    const struct qcow2_bitmap_info *b = &img->bitmaps[i];
    drop[0] = b->table_offset;
    drop[1] = b->table_size;
    return write_fresh(img, u, b->table_size, bits, &e->table_off);
}

static struct bm_track new_track(const struct qcow2_image *img, const struct qcow2_bitmap_info *b, unsigned char *bits,
                                 bool tracking)
{
    unsigned gb = (unsigned)__builtin_ctz(b->granularity);
    return (struct bm_track){.bits = bits, .gran_bits = gb, .nbits = (img->h.size + b->granularity - 1) >> gb,
                             .tracking = tracking, .loaded = true};
}

int qcow2_bitmap_clear(struct qcow2_image *img, const char *name)
{
    int ret = begin(img, name);
    if (ret < 0)
        return ret;
    struct undo u = {0};
    struct new_entry *ents = NULL;
    unsigned char *bits = NULL;
    uint32_t i = 0, n = img->info.nb_bitmaps;
    bool sw = false;
    if ((ret = find(img, name, &i)) < 0)
        goto out;
    const struct qcow2_bitmap_info *b = &img->bitmaps[i];
    uint64_t bytes = (uint64_t)b->table_size * img->cluster_size;
    if (tracked(img, i)) {
        /* in use on disk already: the clear bits are stored at close */
        memset(img->bm[i].bits, 0, bytes);
        goto out;
    }
    /* disabled, or stale: an empty table; a stale enabled one is tracked again */
    if (!(ents = same_dir(img, 0)) || (ret = keep_extra(img, ents)) < 0) {
        ret = ret < 0 ? ret : -ENOMEM;
        goto out;
    }
    if (!(bits = calloc(1, bytes ? bytes : 1))) {
        ret = err_fail(ENOMEM, "out of memory");
        goto out;
    }
    bool track = b->auto_ && b->consistent;
    struct new_entry *e = &ents[i];
    e->track = new_track(img, b, bits, track);
    e->flags = (e->flags & ~BME_FLAG_IN_USE) | (track ? BME_FLAG_IN_USE : 0);
    uint64_t drop[2];
    if ((ret = refill(img, &u, e, i, NULL, drop)) == 0)
        ret = commit(img, &u, ents, n, NULL, 0, drop, 1, &sw);
out:
    if (!sw)
        free(bits);
    free(ents);
    return end(img, &u, ret);
}

/* Enable or disable bitmap name. */
static int set_enabled(struct qcow2_image *img, const char *name, bool enable)
{
    int ret = begin(img, name);
    if (ret < 0)
        return ret;
    struct undo u = {0};
    struct new_entry *ents = NULL;
    unsigned char *loaded = NULL;
    uint32_t i = 0, n = img->info.nb_bitmaps;
    bool sw = false;
    if ((ret = find(img, name, &i)) < 0 || (ret = need_consistent(img, i)) < 0)
        goto out;
    const struct qcow2_bitmap_info *b = &img->bitmaps[i];
    if (b->auto_ == enable)
        goto out; /* already so */
    if (!(ents = same_dir(img, 0)) || (ret = keep_extra(img, ents)) < 0) {
        ret = ret < 0 ? ret : -ENOMEM;
        goto out;
    }
    struct new_entry *e = &ents[i];
    uint64_t drop[2] = {0, 0};
    unsigned ndrop = 0;
    if (enable) {
        /* tracked from now on: its bits in memory, in use on disk */
        if (!e->track.loaded) {
            if ((ret = bitmap_load_bits(img, b, &loaded)) < 0)
                goto out;
            e->track = new_track(img, b, loaded, true);
        }
        e->track.tracking = true;
        e->flags |= BME_FLAG_AUTO | BME_FLAG_IN_USE;
    } else {
        /* what it tracked goes to fresh clusters now: nothing stores it at close */
        if (e->track.tracking) {
            if ((ret = refill(img, &u, e, i, e->track.bits, drop)) < 0)
                goto out;
            ndrop = 1;
        }
        e->track.tracking = false;
        e->flags &= ~(BME_FLAG_AUTO | BME_FLAG_IN_USE);
    }
    ret = commit(img, &u, ents, n, NULL, 0, drop, ndrop, &sw);
out:
    if (!sw)
        free(loaded);
    free(ents);
    return end(img, &u, ret);
}

int qcow2_bitmap_enable(struct qcow2_image *img, const char *name)
{
    return set_enabled(img, name, true);
}

int qcow2_bitmap_disable(struct qcow2_image *img, const char *name)
{
    return set_enabled(img, name, false);
}

/* ---- merge ---- */

/* A copy of the bits of bitmap i of img (the caller holds img's lock). */
static int copy_bits(struct qcow2_image *img, uint32_t i, unsigned char **out)
{
    const struct qcow2_bitmap_info *b = &img->bitmaps[i];
    struct bm_track *t = img->bm ? &img->bm[i] : NULL;
    if (!t || !t->loaded)
        return bitmap_load_bits(img, b, out);
    size_t len = b->table_size ? (size_t)b->table_size * img->cluster_size : 1;
    if (!(*out = malloc(len)))
        return err_fail(ENOMEM, "out of memory");
    memcpy(*out, t->bits, len);
    return 0;
}

/* dst |= src, granule by granule: a source granule marks every destination
 * granule it touches. */
static void or_bits(unsigned char *dst, unsigned dgb, uint64_t dnbits, const unsigned char *src, unsigned sgb,
                    uint64_t snbits)
{
    if (dgb == sgb) {
        for (uint64_t k = 0; k < (snbits + 7) / 8; k++)
            dst[k] |= src[k];
        return;
    }
    for (uint64_t k = 0; k < snbits; k++) {
        if (k % 8 == 0 && !src[k / 8]) {
            k += 7;
            continue;
        }
        if (!bm_bit(src, k))
            continue;
        uint64_t a = (k << sgb) >> dgb, z = (((k + 1) << sgb) - 1) >> dgb;
        for (uint64_t d = a; d <= z && d < dnbits; d++)
            dst[d / 8] |= (unsigned char)(1u << (d % 8));
    }
}

int qcow2_bitmap_merge(struct qcow2_image *img, const char *dst, struct qcow2_image *src_img, const char *src)
{
    int ret = check_name(src);
    if (ret < 0)
        return ret;
    if (src_img == img)
        src_img = NULL;
    unsigned char *sbits = NULL;
    unsigned sgb = 0;
    uint64_t ssize = 0;
    if (src_img) {
        /* the source first, under its own lock only: no lock order between images */
        if (src_img->fmt != QCOW2_FMT_QCOW2)
            return err_fail(ENOENT, "the source image is not qcow2 and has no bitmaps");
        pthread_rwlock_rdlock(&src_img->rwlock);
        int si = bitmap_find(src_img, src);
        if (si < 0)
            ret = err_fail(ENOENT, "no bitmap named '%s' in the source image", src);
        else if (!src_img->bitmaps[si].consistent)
            ret = err_fail(ENOTSUP, "source bitmap '%s' has extra data this program does not know", src);
        else {
            pthread_mutex_lock(&src_img->bm_lock); /* other readers may fill bm[] and its read cache */
            if (src_img->bitmaps[si].in_use && !tracked(src_img, (uint32_t)si))
                ret =
                    err_fail(EBUSY, "source bitmap '%s' is in use or was left so by a crash: it is inconsistent", src);
            else
                ret = copy_bits(src_img, (uint32_t)si, &sbits);
            pthread_mutex_unlock(&src_img->bm_lock);
        }
        if (ret == 0 && sbits) {
            sgb = (unsigned)__builtin_ctz(src_img->bitmaps[si].granularity);
            ssize = src_img->h.size;
        }
        pthread_rwlock_unlock(&src_img->rwlock);
        if (ret < 0)
            return ret;
    }
    if ((ret = begin(img, dst)) < 0) {
        free(sbits);
        return ret;
    }
    struct undo u = {0};
    struct new_entry *ents = NULL;
    unsigned char *dbits = NULL;
    uint32_t i = 0, n = img->info.nb_bitmaps;
    if ((ret = find(img, dst, &i)) < 0 || (ret = need_consistent(img, i)) < 0)
        goto out;
    if (!src_img) {
        uint32_t s = 0;
        if ((ret = find(img, src, &s)) < 0 || (ret = need_consistent(img, s)) < 0 ||
            (ret = copy_bits(img, s, &sbits)) < 0)
            goto out;
        sgb = (unsigned)__builtin_ctz(img->bitmaps[s].granularity);
        ssize = img->h.size;
    }
    if (ssize != img->h.size) {
        ret = err_fail(EINVAL, "bitmaps of disks of different sizes (%" PRIu64 " and %" PRIu64 " bytes) cannot be merged",
                       ssize, img->h.size);
        goto out;
    }
    const struct qcow2_bitmap_info *b = &img->bitmaps[i];
    unsigned dgb = (unsigned)__builtin_ctz(b->granularity);
    uint64_t dn = (img->h.size + b->granularity - 1) >> dgb, sn = (ssize + (1ull << sgb) - 1) >> sgb;
    if (tracked(img, i)) {
        or_bits(img->bm[i].bits, dgb, dn, sbits, sgb, sn); /* stored at close */
        goto out;
    }
    if ((ret = copy_bits(img, i, &dbits)) < 0)
        goto out;
    or_bits(dbits, dgb, dn, sbits, sgb, sn);
    if (!(ents = same_dir(img, 0)) || (ret = keep_extra(img, ents)) < 0) {
        ret = ret < 0 ? ret : -ENOMEM;
        goto out;
    }
    uint64_t drop[2];
    struct new_entry *e = &ents[i];
    if ((ret = refill(img, &u, e, i, dbits, drop)) < 0)
        goto out;
    e->track = new_track(img, b, dbits, false);
    bool sw;
    ret = commit(img, &u, ents, n, NULL, 0, drop, 1, &sw);
    if (sw)
        dbits = NULL; /* img's now */
out:
    free(ents);
    free(dbits);
    free(sbits);
    return end(img, &u, ret);
}
