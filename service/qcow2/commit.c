/* commit.c: qemu-img commit in the engine: copy what the images above a base
 * allocate into the base, then empty the top image so its reads fall through. */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"

#define CHUNK (4u << 20)      /* bytes per read and write of data */
#define HDR_SIZE 24           /* header field: guest size (8 bytes) */
#define HDR_L1_SIZE 36        /* l1_size (4) then l1_table_offset (8): one 12-byte write */

/* What the images above base make of a guest range. */
enum above { ABOVE_NONE, ABOVE_ZERO, ABOVE_DATA };

struct commit {
    struct qcow2_image *top;
    struct qcow2_image *below;  /* base as a layer of top's chain (read-only handle) */
    struct qcow2_image *base;   /* our read-write handle on base */
    const struct qcow2_commit_opts *o;
    uint64_t done, total;
};

/* ---- finding base ---- */

/* Whether name names layer l, the backing file of parent: as parent's backing_file
 * field, as l's URI, or as a path that opens the same object (relative to parent's
 * folder, as qemu-img resolves it, or to the working directory). */
static bool names_layer(const struct qcow2_image *parent, const struct qcow2_image *l, const char *name)
{
    if ((parent->backing_name && !strcmp(parent->backing_name, name)) || !strcmp(l->uri, name) ||
        !strcmp(l->given_name, name))
        return true;
    char *cand[2] = {vfs_resolve(parent->uri, name), strdup(name)};
    bool same = false;
    for (int i = 0; i < 2 && !same; i++) {
        struct vfs_file *f;
        if (cand[i] && vfs_open(cand[i], VFS_O_RDONLY, &f) == 0) {
            same = !strcmp(vfs_file_uri(f), l->uri);
            vfs_close(f);
        }
    }
    free(cand[0]);
    free(cand[1]);
    err_clear();
    return same;
}

static int find_base(struct qcow2_image *top, const char *name, struct qcow2_image **below)
{
    if (!top->backing)
        return err_fail(EINVAL, "Image does not have a backing file");
    if (!name) {
        *below = top->backing;
        return 0;
    }
    for (struct qcow2_image *p = top; p->backing; p = p->backing)
        if (names_layer(p, p->backing, name)) {
            *below = p->backing;
            return 0;
        }
    return err_fail(EINVAL, "Did not find '%s' in the backing chain of '%s'", name, top->given_name);
}

/* ---- what to copy ---- */

/* The status of [off, off+len) in the images from top down to (not including)
 * base: *n is the length of the first run of one kind. A range past the end of a
 * shorter image in between reads as zeroes from that image on, as in QEMU. */
static int above_status(struct commit *c, uint64_t off, uint64_t len, enum above *kind, uint64_t *n)
{
    for (struct qcow2_image *l = c->top; l != c->below; l = l->backing) {
        if (off >= l->size) {
            *kind = ABOVE_ZERO;
            *n = len;
            return 0;
        }
        if (len > l->size - off)
            len = l->size - off;
        struct mapping m;
        int ret = qcow2_get_mapping(l, off, len, &m);
        if (ret < 0)
            return ret;
        len = m.bytes;
        if (m.type != SC_UNALLOC) {
            *kind = m.type == SC_ZERO ? ABOVE_ZERO : ABOVE_DATA;
            *n = len;
            return 0;
        }
    }
    *kind = ABOVE_NONE;
    *n = len;
    return 0;
}

static int status_locked(struct commit *c, uint64_t off, uint64_t len, enum above *kind, uint64_t *n)
{
    pthread_rwlock_rdlock(&c->top->rwlock);
    int ret = above_status(c, off, len, kind, n);
    pthread_rwlock_unlock(&c->top->rwlock);
    return ret;
}

/* Bytes the commit will write or zero: the progress total. */
static int count_total(struct commit *c)
{
    uint64_t size = c->top->size;
    c->total = 0;
    for (uint64_t off = 0; off < size;) {
        enum above k;
        uint64_t n;
        int ret = status_locked(c, off, size - off, &k, &n);
        if (ret < 0)
            return ret;
        if (k != ABOVE_NONE)
            c->total += n;
        off += n;
    }
    return 0;
}

static int report(struct commit *c)
{
    if (c->o->progress && c->o->progress(c->o->opaque, c->done, c->total))
        return err_fail(ECANCELED, "commit cancelled");
    return 0;
}

/* Make base read zeroes over [off, off+len), skipping what already does. */
static int zero_base(struct commit *c, uint64_t off, uint64_t len)
{
    while (len) {
        struct qcow2_extent e;
        int ret = qcow2_block_status(c->base, off, len, &e);
        if (ret < 0)
            return ret;
        uint64_t n = e.length < len ? e.length : len;
        if (!e.zero && (ret = qcow2_pwrite_zeroes(c->base, off, n)) < 0)
            return ret;
        off += n;
        len -= n;
    }
    return 0;
}

/* ---- the copy: a reader thread fills buffers from top, this thread writes ---- */

#define NSLOTS 3

struct run {
    enum above kind;
    uint64_t off, len;    /* len 0: the end */
};

struct slot {
    struct run r;
    unsigned char *buf;   /* CHUNK bytes: the data of an ABOVE_DATA run */
    struct err_saved err; /* the reader's error and its message (err.ret 0: none) */
    bool full;            /* filled by the reader, not yet written */
};

struct pipeline {
    struct commit *c;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct slot slots[NSLOTS];
    unsigned head, tail;  /* next slot to fill, next to write */
    bool stop;            /* the writer gave up: the reader ends */
};

/* The next run of one kind from *pos on: data runs of at most CHUNK bytes, zero
 * runs of any length (they move no data); len 0 at the end of the disk. */
static int next_run(struct commit *c, uint64_t *pos, struct run *r)
{
    uint64_t size = c->top->size;
    r->len = 0;
    while (*pos < size) {
        uint64_t want = size - *pos < CHUNK ? size - *pos : CHUNK;
        enum above k;
        uint64_t n;
        int ret = above_status(c, *pos, want, &k, &n);
        if (ret < 0)
            return ret;
        if (r->len && (k != r->kind || (k == ABOVE_DATA && r->len + n > CHUNK)))
            return 0;
        if (k != ABOVE_NONE) {
            if (!r->len) {
                r->off = *pos;
                r->kind = k;
            }
            r->len += n;
        }
        *pos += n;
    }
    return 0;
}

/* The reading thread. It takes no lock of top: no writer may change top during
 * the copy (qcow2_commit's contract), and it reads no byte of base. */
static void *reader(void *arg)
{
    struct pipeline *p = arg;
    uint64_t pos = 0;
    for (bool last = false; !last;) {
        pthread_mutex_lock(&p->lock);
        while (!p->stop && p->slots[p->head].full)
            pthread_cond_wait(&p->cond, &p->lock);
        bool stop = p->stop;
        pthread_mutex_unlock(&p->lock);
        if (stop)
            break;
        struct slot *s = &p->slots[p->head]; /* an empty slot is the reader's alone */
        int ret = next_run(p->c, &pos, &s->r);
        if (ret == 0 && s->r.len && s->r.kind == ABOVE_DATA)
            ret = qcow2_read_unlocked(p->c->top, s->buf, s->r.len, s->r.off);
        err_save(&s->err, ret);
        last = ret < 0 || !s->r.len;
        pthread_mutex_lock(&p->lock);
        s->full = true;
        p->head = (p->head + 1) % NSLOTS;
        pthread_cond_broadcast(&p->cond);
        pthread_mutex_unlock(&p->lock);
    }
    return NULL;
}

/* Copy every range the images above base allocate: reading top overlaps writing
 * base. Progress is reported after each run; a cancel stops at once. */
static int copy_all(struct commit *c)
{
    struct pipeline p = {.c = c};
    int ret = 0;
    for (int i = 0; i < NSLOTS && ret == 0; i++)
        if (!(p.slots[i].buf = malloc(CHUNK)))
            ret = err_fail(ENOMEM, "out of memory");
    if (ret == 0)
        ret = report(c);
    pthread_t t;
    pthread_mutex_init(&p.lock, NULL);
    pthread_cond_init(&p.cond, NULL);
    bool started = false;
    if (ret == 0 && !(started = pthread_create(&t, NULL, reader, &p) == 0))
        ret = err_fail(EAGAIN, "cannot start the reading thread");
    while (ret == 0) {
        pthread_mutex_lock(&p.lock);
        while (!p.slots[p.tail].full)
            pthread_cond_wait(&p.cond, &p.lock);
        pthread_mutex_unlock(&p.lock);
        struct slot *s = &p.slots[p.tail];
        if (s->err.ret < 0) {
            ret = err_restore(&s->err);
            break;
        }
        if (!s->r.len)
            break;
        /* readers of top reach base through top's own handle, which may load an L2
         * table of base while this write changes it: they wait (the reading thread
         * here does not: it reads only what top and the images in between hold) */
        pthread_rwlock_wrlock(&c->top->rwlock);
        ret = s->r.kind == ABOVE_ZERO ? zero_base(c, s->r.off, s->r.len)
                                      : qcow2_pwrite(c->base, s->buf, s->r.len, s->r.off);
        pthread_rwlock_unlock(&c->top->rwlock);
        if (ret == 0) {
            c->done += s->r.len;
            ret = report(c);
        }
        pthread_mutex_lock(&p.lock);
        s->full = false;
        p.tail = (p.tail + 1) % NSLOTS;
        pthread_cond_broadcast(&p.cond);
        pthread_mutex_unlock(&p.lock);
    }
    if (started) {
        pthread_mutex_lock(&p.lock);
        p.stop = true;
        pthread_cond_broadcast(&p.cond);
        pthread_mutex_unlock(&p.lock);
        pthread_join(t, NULL);
    }
    pthread_cond_destroy(&p.cond);
    pthread_mutex_destroy(&p.lock);
    for (int i = 0; i < NSLOTS; i++)
        free(p.slots[i].buf);
    return ret;
}

/* ---- growing base ---- */

/* A larger L1 table for guest size `size`: written and durable, then the header
 * switches to it in one write, then the old table is freed. */
static int grow_l1(struct qcow2_image *b, uint64_t size)
{
    uint64_t span = (uint64_t)b->l2_entries << b->cluster_bits;
    uint64_t need = size / span + (size % span != 0);
    if (need <= b->l1_size)
        return 0;
    if (need * 8 > QCOW2_MAX_L1_BYTES)
        return err_fail(ENOTSUP, "an L1 table for %" PRIu64 " bytes would be larger than the limit of 32 MiB", size);
    uint64_t clusters = size_to_clusters(b, need * 8), bytes = clusters << b->cluster_bits;
    uint64_t *l1 = calloc(need, 8), *disk = calloc(1, bytes);
    uint64_t off = 0;
    int ret = l1 && disk ? meta_flush(b) : err_fail(ENOMEM, "out of memory");
    if (ret == 0)
        ret = alloc_clusters(b, clusters, &off);
    if (ret == 0) {
        memcpy(l1, b->l1, (size_t)b->l1_size * 8);
        for (uint64_t i = 0; i < b->l1_size; i++)
            disk[i] = htobe64(l1[i]);
        ret = vfs_pwrite(b->file, disk, bytes, off);
    }
    if (ret == 0 && (ret = rc_writeback(b)) == 0)
        ret = qcow2_sync(b, b->file);
    if (ret == 0) {
        unsigned char hdr[12];
        uint32_t be_n = htobe32((uint32_t)need);
        uint64_t be_off = htobe64(off);
        memcpy(hdr, &be_n, 4);
        memcpy(hdr + 4, &be_off, 8);
        ret = vfs_pwrite(b->file, hdr, sizeof hdr, HDR_L1_SIZE);
        if (ret == 0)
            ret = qcow2_sync(b, b->file);
    }
    if (ret < 0) {
        free(l1);
        free(disk);
        return ret; /* a cluster allocated here leaks, as after a crash */
    }
    uint64_t old = b->h.l1_table_offset, old_len = (uint64_t)b->l1_size * 8;
    free(b->l1);
    b->l1 = l1;
    b->l1_size = b->h.l1_size = (uint32_t)need;
    b->h.l1_table_offset = off;
    b->info.l1_size = b->l1_size;
    b->info.l1_offset = off;
    if (off + bytes > b->file_size)
        b->file_size = off + bytes;
    free(disk);
    return old && old_len ? rc_update_range(b, old, old_len, -1) : 0;
}

/* Base grows to `size` and must read zeroes in the new part (not its own backing
 * file's bytes, nor what the host cluster holds past the old end). The zeroes go
 * down before the header's size changes, so a crash leaves the old size. */
static int grow_base(struct qcow2_image *b, uint64_t size)
{
    uint64_t old = b->size;
    int ret;
    if (b->fmt == QCOW2_FMT_RAW) {
        if ((ret = vfs_truncate(b->file, size)) < 0)
            return ret;
        b->size = b->file_size = b->info.virtual_size = b->info.file_size = size;
        return 0;
    }
    if (b->nb_bitmaps)
        return err_fail(ENOTSUP, "base has persistent bitmaps: growing it is not supported");
    if (b->broken)
        return err_fail(EUCLEAN, "base is marked corrupt");
    pthread_rwlock_wrlock(&b->rwlock);
    ret = begin_write(b);
    if (ret == 0)
        ret = grow_l1(b, size);
    pthread_rwlock_unlock(&b->rwlock);
    if (ret < 0)
        return ret;
    b->size = b->h.size = size;
    uint64_t zend = old + (b->cluster_size - offset_into_cluster(b, old)) % b->cluster_size;
    if (b->backing && b->backing->size > zend)
        zend = b->backing->size;
    if (zend > size)
        zend = size;
    if (zend > old)
        ret = qcow2_pwrite_zeroes(b, old, zend - old);
    if (ret == 0)
        ret = qcow2_flush(b);
    if (ret == 0) {
        pthread_rwlock_wrlock(&b->rwlock);
        ret = header_write(b, HDR_SIZE, size, 8);
        pthread_rwlock_unlock(&b->rwlock);
    }
    if (ret < 0) {
        b->size = b->h.size = old;
        return ret;
    }
    b->info.virtual_size = size;
    return 0;
}

/* ---- emptying top ---- */

/* Drop the active L1's reference to the L2 table at l2off: the table's own and
 * the ones each of its entries holds (all counted per L1 table, as check does). */
static int drop_table(struct qcow2_image *img, uint64_t l2off)
{
    uint32_t per_slice = img->cache.slice_bytes / (8 * img->l2_entry_words);
    int ret = 0;
    for (uint32_t j = 0; j < img->l2_entries && ret == 0; j += per_slice) {
        struct l2_slice *s;
        if ((ret = l2_cache_get(img, l2off + (uint64_t)(j / per_slice) * img->cache.slice_bytes, &s)) < 0)
            break;
        for (uint32_t x = 0; x < per_slice && ret == 0; x++)
            ret = release_entry(img, s->entries[x * img->l2_entry_words]);
        l2_cache_put(img, s);
    }
    if (ret == 0)
        ret = free_later(img, l2off, img->cluster_size);
    if (ret == 0)
        l2_cache_forget(img, l2off);
    return ret;
}

/* Give the file back its free tail (refcounts of zero on disk, nothing points there). */
static int trim_file(struct qcow2_image *img)
{
    uint64_t n = size_to_clusters(img, img->file_size), k = n;
    while (k > 1) {
        uint64_t v;
        int ret = rc_get(img, k - 1, &v);
        if (ret < 0)
            return ret;
        if (v)
            break;
        k--;
    }
    if (k == n)
        return 0;
    int ret = vfs_truncate(img->file, k << img->cluster_bits);
    if (ret < 0)
        return ret;
    img->file_size = img->info.file_size = k << img->cluster_bits;
    if (img->free_hint > k)
        img->free_hint = k;
    img->cfree_off = img->cfree_end = 0;
    return 0;
}

/* qcow2 "make empty": every guest cluster of the active L1 becomes unallocated,
 * so reads fall through to the backing file. Crash-safe in any order once base
 * holds the data: each entry reads the same either way. The caller holds the
 * write lock. */
static int empty_top(struct qcow2_image *img)
{
    qcow2_note_change(img, false);
    img->unsynced = true;
    int ret = begin_write(img);
    for (uint32_t i = 0; i < img->l1_size && ret == 0; i++) {
        uint64_t l2off = img->l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (!l2off)
            continue;
        if (offset_into_cluster(img, l2off) || l2off + img->cluster_size > img->file_size)
            return mark_corrupt(img, "L2 table offset %#" PRIx64 " (L1 index %" PRIu32 ") is invalid", l2off, i);
        if ((ret = drop_table(img, l2off)) == 0) {
            img->l1[i] = 0;
            l1_mark(img, i);
        }
    }
    /* the L1 durable, then the lowered refcounts, then the free tail goes (one
     * truncate instead of a hole punched per freed cluster) */
    img->keep_freed = true;
    for (int k = 0; k < 2 && ret == 0; k++)
        ret = meta_flush(img);
    img->keep_freed = false;
    if (ret == 0)
        ret = trim_file(img);
    return ret;
}

/* ---- the commit ---- */

static int open_base(struct commit *c)
{
    struct qcow2_open_opts o = {
        .format = c->below->fmt == QCOW2_FMT_RAW ? "raw" : "qcow2",
        .read_write = true,
    };
    int ret = qcow2_open(c->below->uri, &o, &c->base);
    return ret < 0 ? err_prefix(ret, "opening base %s for writing", c->below->uri) : 0;
}

int qcow2_commit(struct qcow2_image *top, const struct qcow2_commit_opts *opts)
{
    struct qcow2_commit_opts defaults = {0};
    struct commit c = {.top = top, .o = opts ? opts : &defaults};
    err_clear();
    if (!top->rw)
        return err_fail(EROFS, "image is open read-only");
    if (top->fmt != QCOW2_FMT_QCOW2)
        return err_fail(EINVAL, "Image does not have a backing file");
    int ret = find_base(top, c.o->base, &c.below);
    if (ret < 0)
        return ret;
    bool empty = !c.o->keep_top && c.below == top->backing;
    /* top's view as it is now, on disk: what a crash must leave it reading */
    if ((ret = qcow2_flush(top)) < 0)
        return ret;
    uint64_t gen = atomic_load(&top->write_gen);
    bool touched = false;
    if ((ret = count_total(&c)) < 0 || (ret = open_base(&c)) < 0)
        goto out;
    touched = true;
    /* top's own handle on base keeps cached L2 entries until it is refreshed at the
     * end: no cluster base gives up may be reused before then */
    c.base->defer_frees = true;
    ret = top->size > c.base->size ? grow_base(c.base, top->size) : 0;
    if (ret == 0)
        ret = copy_all(&c);
    /* base's data durable (the long flush) while readers of top go on */
    if (ret == 0)
        ret = qcow2_flush(c.base);
    if (ret < 0) {
        c.base->defer_frees = false;
        goto out;
    }
    /* then, with top's readers held off, base frees (and may punch holes in) what
     * it gave up, is closed cleanly, and top's handle on base is refreshed: all
     * before anything in top changes */
    pthread_rwlock_wrlock(&top->rwlock);
    c.base->defer_frees = false;
    ret = qcow2_flush(c.base);
    int cr = qcow2_close(c.base);
    c.base = NULL;
    if (ret == 0)
        ret = cr;
    if (ret < 0) {
        pthread_rwlock_unlock(&top->rwlock);
        goto out;
    }
    touched = false;
    ret = qcow2_refresh_layer(c.below);
    if (ret == 0 && empty) {
        if (atomic_load(&top->write_gen) != gen)
            ret = err_fail(EBUSY, "the image was written during the commit; it is left as it is");
        else
            ret = empty_top(top);
    }
    pthread_rwlock_unlock(&top->rwlock);
    if (ret == 0)
        ret = qcow2_flush(top);
    if (ret == 0 && c.o->progress)
        c.o->progress(c.o->opaque, c.total, c.total); /* done: a cancel now changes nothing */
out:;
    /* clean up without losing the message of what failed */
    struct err_saved saved;
    err_save(&saved, ret);
    if (touched) {
        /* base changed under top's handle: top must see it as it now is */
        pthread_rwlock_wrlock(&top->rwlock);
        if (c.base) {
            c.base->defer_frees = false;
            qcow2_flush(c.base);
            qcow2_close(c.base);
        }
        qcow2_refresh_layer(c.below);
        pthread_rwlock_unlock(&top->rwlock);
    } else if (c.base) {
        qcow2_close(c.base);
    }
    return err_restore(&saved);
}
