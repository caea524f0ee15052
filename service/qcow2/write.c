/* write.c: guest writes, zeroing, discard and compressed clusters. Every
 * change goes to cached L2 slices and refcount blocks; flush.c writes them in
 * a crash-safe order. Clusters shared with snapshots, compressed clusters and
 * unallocated ranges are copied on write; owned clusters are written in place. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "qcow2_int.h"

#define L2_BATCH_BYTES (1u << 20) /* release_data: L2 tables made at once, at most */
#define ALL_ALLOC 0x00000000ffffffffull
#define ALL_ZERO 0xffffffff00000000ull

static uint64_t sc_bits_range(unsigned a, unsigned b) /* subclusters a..b inclusive */
{
    uint64_t m = (b >= 31 ? 0xffffffffull : ((1ull << (b + 1)) - 1));
    return m & ~((1ull << a) - 1);
}

void l1_mark(struct qcow2_image *img, uint32_t i)
{
    if (img->l1_dirty_hi <= img->l1_dirty_lo) {
        img->l1_dirty_lo = i;
        img->l1_dirty_hi = i + 1;
    } else {
        if (i < img->l1_dirty_lo)
            img->l1_dirty_lo = i;
        if (i + 1 > img->l1_dirty_hi)
            img->l1_dirty_hi = i + 1;
    }
}

/* Zeroes at host [off, off+len): nothing to do past the end of the file. */
static int host_zero(struct qcow2_image *img, struct vfs_file *f, uint64_t off, uint64_t len)
{
    uint64_t fsize;
    if (!len)
        return 0;
    int ret = vfs_size(f, &fsize);
    if (ret < 0)
        return ret;
    if (off >= fsize)
        return 0;
    if (vfs_discard(f, off, len) == 0)
        return 0;
    void *z = calloc(1, len);
    if (!z)
        return err_fail(ENOMEM, "out of memory");
    ret = vfs_pwrite(f, z, len, off);
    free(z);
    return ret;
}

/* Give back clusters allocated for a write that failed before anything pointed
 * at them, so a failed write does not leak them (best effort). */
static void unalloc(struct qcow2_image *img, uint64_t off, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if (rc_set(img, (off >> img->cluster_bits) + i, 0) == 0 && (off >> img->cluster_bits) + i < img->free_hint)
            img->free_hint = (off >> img->cluster_bits) + i;
}

/* The L2 slice holding guest offset off, ready to change: a new L2 table when
 * the L1 entry is empty, a private copy when the table is shared. */
int qcow2_l2_for_write(struct qcow2_image *img, uint64_t off, struct l2_slice **sp, uint32_t *idx)
{
    uint64_t l1i = offset_to_l1_index(img, off);
    uint64_t cs = img->cluster_size;
    int ret;
    if (l1i >= img->l1_size)
        return mark_corrupt(img, "guest offset %#" PRIx64 " is beyond the L1 table", off);
    uint64_t l1e = img->l1[l1i], l2off = l1e & QCOW2_L1E_OFFSET_MASK;
    if (l2off && (offset_into_cluster(img, l2off) || l2off + cs > img->file_size))
        return mark_corrupt(img, "L2 table offset %#" PRIx64 " (L1 index %" PRIu64 ") is invalid", l2off, l1i);
    if (!l2off) {
        uint64_t n, k = 1;
        if (img->release_data) {
            /* the tables of the next empty L1 entries too, side by side: the data
             * written between tables made one at a time would share the store's
             * parts with them, and those parts stay staged (rewritten tables) */
            uint64_t max = L2_BATCH_BYTES >> img->cluster_bits, reach = rc_reach(img) / 8;
            if (max > reach)
                max = reach;
            while (k < max && l1i + k < img->l1_size && !(img->l1[l1i + k] & QCOW2_L1E_OFFSET_MASK))
                k++;
        }
        if ((ret = alloc_clusters(img, k, &n)) < 0)
            return ret;
        /* whole zeroed tables on disk, so the file always covers them */
        void *z = calloc(k, cs);
        if (!z) {
            unalloc(img, n, k);
            return err_fail(ENOMEM, "out of memory");
        }
        ret = vfs_pwrite(img->file, z, k * cs, n);
        free(z);
        if (ret < 0) {
            unalloc(img, n, k);
            return ret;
        }
        if (n + k * cs > img->file_size)
            img->file_size = n + k * cs;
        for (uint64_t i = 0; i < k; i++) {
            img->l1[l1i + i] = (n + i * cs) | QCOW2_OFLAG_COPIED;
            l1_mark(img, (uint32_t)(l1i + i));
        }
        l2off = n;
    } else if (!(l1e & QCOW2_OFLAG_COPIED)) {
        uint64_t rc;
        if ((ret = rc_get(img, l2off >> img->cluster_bits, &rc)) < 0)
            return ret;
        if (rc == 0)
            return mark_corrupt(img, "L2 table at %#" PRIx64 " has refcount 0", l2off);
        if (rc > 1) {
            /* shared with a snapshot: write a private copy; its entries are shared too */
            uint64_t n = 0;
            uint64_t *t = malloc(cs);
            if (!t)
                return err_fail(ENOMEM, "out of memory");
            ret = vfs_pread(img->file, t, cs, l2off);
            if (ret == 0)
                ret = alloc_clusters(img, 1, &n);
            if (ret == 0) {
                for (uint32_t i = 0; i < img->l2_entries; i++)
                    t[i * img->l2_entry_words] &= htobe64(~QCOW2_OFLAG_COPIED);
                ret = vfs_pwrite(img->file, t, cs, n);
            }
            free(t);
            if (ret == 0)
                ret = free_later(img, l2off, cs);
            else if (n)
                unalloc(img, n, 1);
            if (ret < 0)
                return ret;
            if (n + cs > img->file_size)
                img->file_size = n + cs;
            l2off = n;
        }
        img->l1[l1i] = l2off | QCOW2_OFLAG_COPIED;
        l1_mark(img, (uint32_t)l1i);
    }
    uint32_t l2i = offset_to_l2_index(img, off);
    uint32_t per_slice = img->cache.slice_bytes / (8 * img->l2_entry_words);
    ret = l2_cache_get(img, l2off + (uint64_t)(l2i / per_slice) * img->cache.slice_bytes, sp);
    if (ret < 0)
        return ret;
    *idx = l2i % per_slice;
    return 0;
}

/* Guest data may not land on metadata; an external data file holds none. */
static int data_overlap_check(struct qcow2_image *img, uint64_t off, uint64_t len)
{
    return img->data == img->file ? overlap_check(img, off, len, "guest data") : 0;
}

/* Whether the standard cluster behind l2e belongs to the active image alone. */
static int owned(struct qcow2_image *img, uint64_t l2e, bool *own)
{
    *own = false;
    if (l2e & QCOW2_OFLAG_COMPRESSED)
        return 0;
    if (img->data != img->file) { /* external data: host = fixed mapping, refcount implicitly 1 */
        *own = (l2e & QCOW2_L2E_OFFSET_MASK) || (l2e & QCOW2_OFLAG_COPIED);
        return 0;
    }
    uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
    if (!host)
        return 0;
    if (offset_into_cluster(img, host))
        return mark_corrupt(img, "data cluster offset %#" PRIx64 " is not cluster aligned", host);
    if (l2e & QCOW2_OFLAG_COPIED) {
        *own = true;
        return 0;
    }
    uint64_t rc;
    int ret = rc_get(img, host >> img->cluster_bits, &rc);
    if (ret < 0)
        return ret;
    if (rc == 0)
        return mark_corrupt(img, "data cluster at %#" PRIx64 " is in use but has refcount 0", host);
    *own = rc == 1;
    return 0;
}

/* Whether a cluster whose entry is l2e reads as zeroes from its metadata alone:
 * a zero cluster, or unallocated with nothing below it. */
static bool reads_zero(struct qcow2_image *img, uint64_t l2e, uint64_t cl)
{
    if (img->ext_l2 || (l2e & QCOW2_OFLAG_COMPRESSED))
        return false;
    if (l2e & QCOW2_OFLAG_ZERO)
        return true;
    return !(l2e & QCOW2_L2E_OFFSET_MASK) && (!img->backing || cl >= img->backing->size);
}

/* Drop the reference l2e holds (after the new entry is on disk). */
int release_entry(struct qcow2_image *img, uint64_t l2e)
{
    if (l2e & QCOW2_OFLAG_COMPRESSED) {
        uint64_t coff = l2e & img->coffset_mask;
        uint64_t nsec = ((l2e >> img->csize_shift) & img->csize_mask) + 1;
        uint64_t len = nsec * QCOW2_COMPRESSED_SECTOR - (coff & (QCOW2_COMPRESSED_SECTOR - 1));
        return free_later(img, coff, len);
    }
    uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
    if (host && img->data == img->file)
        return free_later(img, host, img->cluster_size);
    return 0;
}

static void set_entry(struct qcow2_image *img, struct l2_slice *s, uint32_t idx, uint64_t l2e, uint64_t bitmap)
{
    s->entries[idx * img->l2_entry_words] = l2e;
    if (img->ext_l2)
        s->entries[idx * 2 + 1] = bitmap;
    l2_cache_mark_dirty(img, s);
}

/* Host offset for a new data cluster at guest cluster gcl: with an external
 * data file the mapping is fixed (host offset = guest offset). */
static int new_data_cluster(struct qcow2_image *img, uint64_t gcl, uint64_t *host)
{
    if (img->data != img->file) {
        *host = gcl;
        return 0;
    }
    return alloc_clusters(img, 1, host);
}

/* Write n bytes at guest off, all inside one cluster. */
static int write_in_cluster(struct qcow2_image *img, const unsigned char *buf, uint64_t off, uint64_t n)
{
    uint64_t cs = img->cluster_size, cl = off & ~(cs - 1), in = off - cl;
    struct l2_slice *s;
    uint32_t idx;
    int ret = qcow2_l2_for_write(img, off, &s, &idx);
    if (ret < 0)
        return ret;
    uint64_t l2e = s->entries[idx * img->l2_entry_words];
    uint64_t bitmap = img->ext_l2 ? s->entries[idx * 2 + 1] : 0;
    uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
    unsigned char *tmp = NULL;
    uint64_t fresh = 0; /* a cluster allocated here, given back if the write fails */
    bool own;
    if ((ret = owned(img, l2e, &own)) < 0)
        goto out;
    /* bytes the kernel may still be sending from this cluster stay as they
     * are: the new data goes to a copy (pin.c) */
    if (own && host && img->data == img->file && pin_was_sent(img, host >> img->cluster_bits))
        own = false;
    if (img->ext_l2 && ((bitmap >> 32) & bitmap)) {
        ret = mark_corrupt(img, "L2 entry for guest offset %#" PRIx64 " is invalid", cl);
        goto out;
    }

    if (img->ext_l2 && !(l2e & QCOW2_OFLAG_COMPRESSED) && (own || !host)) {
        /* subclusters: only those written are filled, the rest keep their state */
        uint64_t scs = img->sc_size;
        unsigned a = (unsigned)(in / scs), b = (unsigned)((in + n - 1) / scs);
        uint64_t s0 = (uint64_t)a * scs, s1 = (uint64_t)(b + 1) * scs;
        if (!own) {
            if ((ret = new_data_cluster(img, cl, &host)) < 0)
                goto out;
            fresh = img->data == img->file ? host : 0;
        }
        const unsigned char *src = buf;
        uint64_t woff = in, wlen = n;
        if (in != s0 || in + n != s1) {
            /* partial subclusters at the ends: merge with what they read as now */
            uint64_t span = s1 - s0, avail = img->size - (cl + s0);
            if (!(tmp = calloc(1, span))) {
                ret = err_fail(ENOMEM, "out of memory");
                goto out;
            }
            ret = qcow2_read_unlocked(img, tmp, span < avail ? span : avail, cl + s0);
            if (ret < 0)
                goto out;
            memcpy(tmp + (in - s0), buf, n);
            src = tmp;
            woff = s0;
            wlen = span;
        }
        if ((ret = data_overlap_check(img, host + woff, wlen)) < 0)
            goto out;
        if ((ret = vfs_pwrite(img->data, src, wlen, host + woff)) < 0)
            goto out;
        if (fresh && n == cs && (ret = release_written(img, host, cs)) < 0)
            goto out;
        uint64_t bits = sc_bits_range(a, b);
        uint64_t nb = (bitmap & ~(bits | (bits << 32))) | bits;
        uint64_t ne = host | QCOW2_OFLAG_COPIED;
        if (ne != l2e || nb != bitmap)
            set_entry(img, s, idx, ne, nb);
        goto out;
    }

    if (own && !(l2e & QCOW2_OFLAG_ZERO)) {
        if ((ret = data_overlap_check(img, host + in, n)) < 0)
            goto out;
        ret = vfs_pwrite(img->data, buf, n, host + in);
        if (ret == 0 && !(l2e & QCOW2_OFLAG_COPIED))
            set_entry(img, s, idx, l2e | QCOW2_OFLAG_COPIED, bitmap);
        goto out;
    }

    /* copy on write of the whole cluster (a zero cluster keeps its allocation) */
    uint64_t newhost;
    if (own) {
        newhost = host;
    } else if ((ret = new_data_cluster(img, cl, &newhost)) < 0) {
        goto out;
    } else {
        fresh = img->data == img->file ? newhost : 0;
    }
    const unsigned char *src = buf;
    uint64_t woff = in, wlen = n;
    if (n != cs && !own && reads_zero(img, l2e, cl)) {
        /* nothing to copy: write the new bytes, and make sure the rest of the
         * cluster reads as zeroes (free past the end of the file, else a hole) */
        if ((ret = data_overlap_check(img, newhost, cs)) < 0 ||
            (ret = host_zero(img, img->data, newhost, in)) < 0 ||
            (ret = vfs_pwrite(img->data, buf, n, newhost + in)) < 0 ||
            (ret = host_zero(img, img->data, newhost + in + n, cs - in - n)) < 0)
            goto out;
        if ((ret = release_entry(img, l2e)) < 0)
            goto out;
        set_entry(img, s, idx, newhost | QCOW2_OFLAG_COPIED, img->ext_l2 ? ALL_ALLOC : 0);
        goto out;
    }
    if (n != cs) {
        uint64_t avail = img->size - cl;
        if (!(tmp = calloc(1, cs))) {
            ret = err_fail(ENOMEM, "out of memory");
            goto out;
        }
        ret = qcow2_read_unlocked(img, tmp, cs < avail ? cs : avail, cl);
        if (ret < 0)
            goto out;
        memcpy(tmp + in, buf, n);
        src = tmp;
        woff = 0;
        wlen = cs;
    }
    if ((ret = data_overlap_check(img, newhost + woff, wlen)) < 0)
        goto out;
    if ((ret = vfs_pwrite(img->data, src, wlen, newhost + woff)) < 0)
        goto out;
    if (fresh && n == cs && (ret = release_written(img, newhost, cs)) < 0)
        goto out;
    if (!own && (ret = release_entry(img, l2e)) < 0)
        goto out;
    set_entry(img, s, idx, newhost | QCOW2_OFLAG_COPIED, img->ext_l2 ? ALL_ALLOC : 0);
out:
    if (ret < 0 && fresh)
        unalloc(img, fresh, 1);
    free(tmp);
    l2_cache_put(img, s);
    return ret;
}

/* Whole clusters [off, off+k*cs) that are unallocated in this image get one new
 * run of clusters and one write: the fast path of imports and sequential writes. */
static int write_run(struct qcow2_image *img, const unsigned char *buf, uint64_t off, uint64_t len, uint64_t *done)
{
    uint64_t cs = img->cluster_size;
    struct l2_slice *s;
    uint32_t idx;
    *done = 0;
    if (img->data != img->file)
        return 0;
    int ret = qcow2_l2_for_write(img, off, &s, &idx);
    if (ret < 0)
        return ret;
    uint32_t per_slice = img->cache.slice_bytes / (8 * img->l2_entry_words);
    uint64_t k = 0, max = len / cs;
    /* a run must fit between two refcount blocks (each sits at the start of
     * the clusters it describes): an eighth of a block's reach wastes little */
    uint64_t reach = rc_reach(img) / 8;
    if (max > reach)
        max = reach;
    while (k < max && idx + k < per_slice) {
        uint64_t e = s->entries[(idx + k) * img->l2_entry_words];
        uint64_t b = img->ext_l2 ? s->entries[(idx + k) * 2 + 1] : 0;
        if (e || b)
            break;
        k++;
    }
    if (k >= 2) {
        uint64_t host;
        ret = alloc_clusters(img, k, &host);
        if (ret == 0 &&
            ((ret = vfs_pwrite(img->file, buf, k * cs, host)) < 0 || (ret = release_written(img, host, k * cs)) < 0))
            unalloc(img, host, k);
        if (ret == 0) {
            for (uint64_t i = 0; i < k; i++)
                set_entry(img, s, idx + (uint32_t)i, (host + i * cs) | QCOW2_OFLAG_COPIED, img->ext_l2 ? ALL_ALLOC : 0);
            *done = k * cs;
        }
    }
    l2_cache_put(img, s);
    return ret;
}

/* Whole clusters [off, off+k*cs) that this image owns, holding data at one run of
 * host offsets, are overwritten in place by one write (overwrites, commits). */
static int write_owned_run(struct qcow2_image *img, const unsigned char *buf, uint64_t off, uint64_t len, uint64_t *done)
{
    uint64_t cs = img->cluster_size;
    struct l2_slice *s;
    uint32_t idx;
    *done = 0;
    int ret = qcow2_l2_for_write(img, off, &s, &idx);
    if (ret < 0)
        return ret;
    uint32_t per_slice = img->cache.slice_bytes / (8 * img->l2_entry_words);
    uint64_t first = s->entries[idx * img->l2_entry_words] & QCOW2_L2E_OFFSET_MASK, k = 0;
    while (k < len / cs && idx + k < per_slice) {
        uint64_t e = s->entries[(idx + k) * img->l2_entry_words];
        uint64_t b = img->ext_l2 ? s->entries[(idx + k) * 2 + 1] : 0;
        if (!(e & QCOW2_OFLAG_COPIED) || (e & (QCOW2_OFLAG_COMPRESSED | QCOW2_OFLAG_ZERO)) || !first ||
            (e & QCOW2_L2E_OFFSET_MASK) != first + k * cs || (img->ext_l2 && b != ALL_ALLOC) ||
            pin_was_sent(img, (first >> img->cluster_bits) + k))
            break;
        k++;
    }
    if (k >= 2 && (ret = data_overlap_check(img, first, k * cs)) == 0 &&
        (ret = vfs_pwrite(img->data, buf, k * cs, first)) == 0)
        *done = k * cs;
    l2_cache_put(img, s);
    return ret;
}

static int check_writable(struct qcow2_image *img, uint64_t off, uint64_t len)
{
    uint64_t end;
    if (!img->rw)
        return err_fail(EROFS, "image is open read-only");
    if (img->broken)
        return err_fail(EUCLEAN, "image is marked corrupt; writes are refused (run check -r all)");
    if (__builtin_add_overflow(off, len, &end) || end > img->size)
        return err_fail(EINVAL, "range %" PRIu64 "+%" PRIu64 " is past the end of the disk (%" PRIu64 " bytes)", off, len,
                        img->size);
    return 0;
}

/* Keep the cache from filling with dirty slices (readers never write them back). */
static int after_write(struct qcow2_image *img)
{
    if (img->cache.ndirty * 2 >= img->cache.nslots || (img->npending > 4096 && !img->defer_frees))
        return meta_flush(img);
    return 0;
}

static int lock_for_write(struct qcow2_image *img, uint64_t off, uint64_t len)
{
    int ret = check_writable(img, off, len);
    if (ret < 0)
        return ret;
    pthread_rwlock_wrlock(&img->rwlock);
    qcow2_note_change(img, false);
    img->unsynced = true;
    ret = begin_write(img);
    if (ret < 0)
        pthread_rwlock_unlock(&img->rwlock);
    return ret;
}

static int unlock_after(struct qcow2_image *img, int ret)
{
    if (ret == 0)
        ret = after_write(img);
    pthread_rwlock_unlock(&img->rwlock);
    return ret;
}

int qcow2_pwrite(struct qcow2_image *img, const void *vbuf, size_t len, uint64_t off)
{
    const unsigned char *buf = vbuf;
    if (img->fmt == QCOW2_FMT_RAW) {
        int r = check_writable(img, off, len);
        if (r == 0)
            qcow2_note_change(img, false);
        return r < 0 ? r : vfs_pwrite(img->file, buf, len, off);
    }
    int ret = lock_for_write(img, off, len);
    if (ret < 0)
        return ret;
    bitmaps_mark(img, off, len);
    uint64_t cs = img->cluster_size;
    while (len && ret == 0) {
        uint64_t done = 0;
        if (offset_into_cluster(img, off) == 0 && len >= 2 * cs &&
            ((ret = write_run(img, buf, off, len, &done)) < 0 ||
             (!done && (ret = write_owned_run(img, buf, off, len, &done)) < 0)))
            break;
        if (!done) {
            done = cs - offset_into_cluster(img, off);
            if (done > len)
                done = len;
            ret = write_in_cluster(img, buf, off, done);
        }
        buf += done;
        off += done;
        len -= done;
        if (ret == 0)
            ret = after_write(img);
    }
    return unlock_after(img, ret);
}

/* Real zero bytes over [off, off+n) of one cluster. */
static int write_zeroes_in_cluster(struct qcow2_image *img, uint64_t off, uint64_t n)
{
    unsigned char *z = calloc(1, n);
    if (!z)
        return err_fail(ENOMEM, "out of memory");
    int ret = write_in_cluster(img, z, off, n);
    free(z);
    return ret;
}

/* Make one cluster's range [off, off+n) read as zeroes; `discard` frees and, on
 * v2, lets the backing file show through. */
static int zero_in_cluster(struct qcow2_image *img, uint64_t off, uint64_t n, bool discard)
{
    uint64_t cs = img->cluster_size, cl = off & ~(cs - 1), in = off - cl;
    uint64_t clen = img->size - cl < cs ? img->size - cl : cs; /* the tail cluster may be short */
    bool whole = in == 0 && n == clen;
    bool v3 = img->h.version >= 3;
    if (!whole && !img->ext_l2) {
        if (discard)
            return 0; /* a hint: partial clusters stay */
        return write_zeroes_in_cluster(img, off, n);
    }
    struct l2_slice *s;
    uint32_t idx;
    int ret = qcow2_l2_for_write(img, off, &s, &idx);
    if (ret < 0)
        return ret;
    uint64_t l2e = s->entries[idx * img->l2_entry_words];
    uint64_t bitmap = img->ext_l2 ? s->entries[idx * 2 + 1] : 0;
    if (whole) {
        if (!v3 && !discard && img->backing && cl < img->backing->size) {
            l2_cache_put(img, s);
            return write_zeroes_in_cluster(img, off, n);
        }
        ret = release_entry(img, l2e);
        if (ret == 0) {
            uint64_t ne = v3 && !img->ext_l2 ? QCOW2_OFLAG_ZERO : 0;
            uint64_t nb = v3 && img->ext_l2 ? ALL_ZERO : 0;
            if (img->data != img->file && (img->h.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW)) {
                /* a raw data file keeps its fixed mapping: zero the bytes, mark the entry */
                ret = host_zero(img, img->data, cl, clen);
                ne = v3 && !img->ext_l2 ? (cl | QCOW2_OFLAG_COPIED | QCOW2_OFLAG_ZERO) : (cl | QCOW2_OFLAG_COPIED);
                nb = img->ext_l2 ? ALL_ZERO : 0;
            }
            if (ret == 0 && (ne != l2e || nb != bitmap))
                set_entry(img, s, idx, ne, nb);
        }
        l2_cache_put(img, s);
        return ret;
    }
    /* extended L2, part of a cluster: whole subclusters become zero subclusters */
    uint64_t scs = img->sc_size;
    unsigned a = (unsigned)((in + scs - 1) / scs), b1 = (unsigned)((in + n) / scs); /* [a, b1) whole */
    bool own = false;
    if ((ret = owned(img, l2e, &own)) < 0 || (l2e & QCOW2_OFLAG_COMPRESSED) || (!own && (l2e & QCOW2_L2E_OFFSET_MASK)) ||
        !v3) {
        l2_cache_put(img, s);
        if (ret < 0 || discard)
            return ret;
        return write_zeroes_in_cluster(img, off, n);
    }
    if (a < b1) {
        uint64_t bits = sc_bits_range(a, b1 - 1);
        uint64_t nb = (bitmap & ~bits) | (bits << 32);
        if (nb != bitmap)
            set_entry(img, s, idx, l2e, nb);
    }
    l2_cache_put(img, s);
    if (discard)
        return 0;
    /* the partial subclusters at either end get real zeroes */
    uint64_t head_end = a < b1 ? (uint64_t)a * scs : in + n;
    /* (without a whole subcluster inside, the head is the whole range) */
    if (head_end > in)
        ret = write_zeroes_in_cluster(img, off, head_end - in);
    if (ret == 0 && a < b1 && (uint64_t)b1 * scs < in + n)
        ret = write_zeroes_in_cluster(img, cl + (uint64_t)b1 * scs, in + n - (uint64_t)b1 * scs);
    return ret;
}

static int zero_range(struct qcow2_image *img, uint64_t off, uint64_t len, bool discard)
{
    if (img->fmt == QCOW2_FMT_RAW) {
        int r = check_writable(img, off, len);
        if (r == 0)
            qcow2_note_change(img, false);
        if (r == 0 && vfs_discard(img->file, off, len) < 0 && !discard)
            r = host_zero(img, img->file, off, len);
        return r;
    }
    int ret = lock_for_write(img, off, len);
    if (ret < 0)
        return ret;
    bitmaps_mark(img, off, len);
    while (len && ret == 0) {
        uint64_t n = img->cluster_size - offset_into_cluster(img, off);
        if (n > len)
            n = len;
        ret = zero_in_cluster(img, off, n, discard);
        off += n;
        len -= n;
        if (ret == 0)
            ret = after_write(img);
    }
    return unlock_after(img, ret);
}

int qcow2_pwrite_zeroes(struct qcow2_image *img, uint64_t off, uint64_t len)
{
    return zero_range(img, off, len, false);
}

int qcow2_discard(struct qcow2_image *img, uint64_t off, uint64_t len)
{
    return zero_range(img, off, len, true);
}

long qcow2_compress_cluster(const struct qcow2_image *img, const void *in, size_t len, void *out, size_t cap)
{
    if (img->h.compression_type == QCOW2_COMPRESS_ZSTD) {
        size_t r = ZSTD_compress(out, cap, in, len, 3);
        return ZSTD_isError(r) ? 0 : (long)r; /* no room: store it uncompressed */
    }
    z_stream z = {0};
    if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
        return err_fail(ENOMEM, "zlib: cannot initialise");
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)len;
    z.next_out = out;
    z.avail_out = (uInt)cap;
    int zr = deflate(&z, Z_FINISH);
    long r = zr == Z_STREAM_END ? (long)(cap - z.avail_out) : 0;
    deflateEnd(&z);
    return r;
}

int qcow2_write_compressed_raw(struct qcow2_image *img, uint64_t off, const void *cdata, size_t clen)
{
    int ret = lock_for_write(img, off, 1);
    if (ret < 0)
        return ret;
    bitmaps_mark(img, off, clen ? img->cluster_size : 0);
    if (offset_into_cluster(img, off) || img->data != img->file || clen >= img->cluster_size) {
        ret = err_fail(EINVAL, "a compressed write needs a cluster-aligned offset, no data file and a smaller cluster");
        return unlock_after(img, ret);
    }
    struct l2_slice *s;
    uint32_t idx;
    if ((ret = qcow2_l2_for_write(img, off, &s, &idx)) < 0)
        return unlock_after(img, ret);
    uint64_t l2e = s->entries[idx * img->l2_entry_words];
    uint64_t coff;
    ret = alloc_compressed(img, clen, &coff);
    if (ret == 0)
        ret = overlap_check(img, coff, clen, "compressed data");
    if (ret == 0)
        ret = vfs_pwrite(img->file, cdata, clen, coff);
    if (ret == 0) {
        uint64_t nsec = ((coff + clen - 1) >> 9) - (coff >> 9);
        if (nsec > img->csize_mask || coff > img->coffset_mask)
            ret = err_fail(EOVERFLOW, "compressed data at %#" PRIx64 " cannot be addressed", coff);
        else if ((ret = release_entry(img, l2e)) == 0)
            set_entry(img, s, idx, QCOW2_OFLAG_COMPRESSED | (nsec << img->csize_shift) | coff, 0);
    }
    l2_cache_put(img, s);
    return unlock_after(img, ret);
}

int qcow2_pwrite_compressed(struct qcow2_image *img, const void *buf, size_t len, uint64_t off)
{
    size_t cap = img->cluster_size - QCOW2_COMPRESSED_SECTOR;
    unsigned char *out = malloc(cap);
    if (!out)
        return err_fail(ENOMEM, "out of memory");
    unsigned char *full = NULL;
    const void *src = buf;
    if (len < img->cluster_size) { /* the short tail cluster compresses as a whole cluster */
        if (!(full = calloc(1, img->cluster_size))) {
            free(out);
            return err_fail(ENOMEM, "out of memory");
        }
        memcpy(full, buf, len);
        src = full;
    }
    long c = qcow2_compress_cluster(img, src, img->cluster_size, out, cap);
    int ret;
    if (c < 0)
        ret = (int)c;
    else if (c == 0 || img->data != img->file)
        ret = qcow2_pwrite(img, buf, len, off);
    else
        ret = qcow2_write_compressed_raw(img, off, out, (size_t)c);
    free(out);
    free(full);
    return ret;
}

int qcow2_flush(struct qcow2_image *img)
{
    if (!img->rw)
        return 0;
    if (img->fmt == QCOW2_FMT_RAW) {
        int ret = qcow2_sync(img, img->file);
        return ret ? ret : qcow2_durable(img);
    }
    pthread_rwlock_wrlock(&img->rwlock);
    int ret = img->broken ? err_fail(EUCLEAN, "image is marked corrupt") : meta_flush(img);
    if (ret == 0)
        ret = meta_flush(img); /* write the refcounts the first one lowered */
    if (ret == 0)
        ret = qcow2_durable(img);
    pthread_rwlock_unlock(&img->rwlock);
    return ret;
}
