/* rcache.c: refcounts for writers: a small cache of refcount blocks in their
 * on-disk form, setting refcounts of any width, and growing the refcount
 * structures (self-describing refcount blocks, a larger refcount table). */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"

static uint64_t per_block(const struct qcow2_image *img)
{
    return ((uint64_t)img->cluster_size * 8) >> img->h.refcount_order;
}

uint64_t rc_max(const struct qcow2_image *img)
{
    return img->refcount_bits == 64 ? UINT64_MAX : (1ull << img->refcount_bits) - 1;
}

static int rb_write(struct qcow2_image *img, struct rb_entry *e)
{
    int ret = overlap_check(img, e->off, img->cluster_size, "refcount block");
    if (ret == 0)
        ret = vfs_pwrite(img->file, e->buf, img->cluster_size, e->off);
    if (ret == 0)
        e->dirty = false;
    return ret;
}

int rc_writeback(struct qcow2_image *img)
{
    for (unsigned i = 0; i < RB_CACHE_ENTRIES; i++) {
        struct rb_entry *e = &img->rbc[i];
        if (e->valid && e->dirty) {
            int ret = rb_write(img, e);
            if (ret < 0)
                return ret;
        }
    }
    return 0;
}

void rc_cache_drop(struct qcow2_image *img)
{
    for (unsigned i = 0; i < RB_CACHE_ENTRIES; i++) {
        free(img->rbc[i].buf);
        memset(&img->rbc[i], 0, sizeof img->rbc[i]);
    }
}

/* The cached block at off; zero_new: a new block, not read from disk. */
static int rb_get(struct qcow2_image *img, uint64_t off, bool zero_new, struct rb_entry **out)
{
    struct rb_entry *victim = NULL;
    for (unsigned i = 0; i < RB_CACHE_ENTRIES; i++) {
        struct rb_entry *e = &img->rbc[i];
        if (e->valid && e->off == off) {
            e->lru = ++img->rb_tick;
            *out = e;
            return 0;
        }
        if (!victim || (victim->valid && (!e->valid || e->lru < victim->lru)))
            victim = e;
    }
    if (victim->valid && victim->dirty) {
        int ret = rb_write(img, victim); /* raising refcounts early is always safe */
        if (ret < 0)
            return ret;
    }
    if (!victim->buf && !(victim->buf = malloc(img->cluster_size)))
        return err_fail(ENOMEM, "out of memory for a refcount block");
    victim->valid = false;
    if (zero_new) {
        memset(victim->buf, 0, img->cluster_size);
    } else {
        if (offset_into_cluster(img, off) || off + img->cluster_size > img->file_size)
            return mark_corrupt(img, "refcount block at %#" PRIx64 " is misaligned or past the end of the file", off);
        int ret = vfs_pread(img->file, victim->buf, img->cluster_size, off);
        if (ret < 0)
            return ret;
    }
    victim->off = off;
    victim->valid = true;
    victim->dirty = false;
    victim->lru = ++img->rb_tick;
    *out = victim;
    return 0;
}

int rc_block(struct qcow2_image *img, uint64_t off, const unsigned char **buf)
{
    struct rb_entry *e;
    int ret = rb_get(img, off, false, &e);
    if (ret == 0)
        *buf = e->buf;
    return ret;
}

int rc_get(struct qcow2_image *img, uint64_t cluster, uint64_t *val)
{
    uint64_t ti = cluster / per_block(img);
    *val = 0;
    if (ti >= img->reftable_size || !(img->reftable[ti] & QCOW2_REFT_OFFSET_MASK))
        return 0;
    struct rb_entry *e;
    int ret = rb_get(img, img->reftable[ti] & QCOW2_REFT_OFFSET_MASK, false, &e);
    if (ret < 0)
        return ret;
    *val = qcow2_refcount_entry(e->buf, cluster % per_block(img), img->refcount_bits);
    return 0;
}

static void note_file_end(struct qcow2_image *img, uint64_t end)
{
    if (end > img->file_size)
        img->file_size = end;
}

static int grow_reftable(struct qcow2_image *img, uint64_t min_entries);

/* A refcount block for range ti, placed in the first cluster of the range it
 * describes (free by definition: nothing covers the range yet) and counting itself. */
static int refblock_at_end(struct qcow2_image *img, uint64_t ti);

/* Put the new block e on disk, then point refcount table entry ti at it: the
 * block must be durable before the table refers to it. */
static int install_refblock(struct qcow2_image *img, uint64_t ti, struct rb_entry *e)
{
    int ret = vfs_pwrite(img->file, e->buf, img->cluster_size, e->off);
    if (ret == 0)
        ret = qcow2_sync(img, img->file);
    if (ret == 0) {
        note_file_end(img, e->off + img->cluster_size);
        uint64_t be = htobe64(e->off);
        ret = vfs_pwrite(img->file, &be, 8, img->h.refcount_table_offset + ti * 8);
    }
    if (ret < 0) {
        e->valid = false;
        return ret;
    }
    img->reftable[ti] = e->off;
    return 0;
}

static int new_refblock(struct qcow2_image *img, uint64_t ti)
{
    uint64_t c0 = ti * per_block(img);
    if (img->repair_expected && c0 < img->repair_n && img->repair_expected[c0])
        return refblock_at_end(img, ti); /* a damaged image: the range is in use */
    uint64_t off = c0 << img->cluster_bits;
    int ret = overlap_check(img, off, img->cluster_size, "new refcount block");
    if (ret < 0)
        return ret;
    struct rb_entry *e;
    ret = rb_get(img, off, true, &e);
    if (ret < 0)
        return ret;
    qcow2_refcount_entry_set(e->buf, 0, img->refcount_bits, 1);
    return install_refblock(img, ti, e);
}

/* Repair only: a block for range ti past the end of the file, counted in
 * whatever block covers the end (made in turn if needed). */
static int refblock_at_end(struct qcow2_image *img, uint64_t ti)
{
    uint64_t c = (img->file_size + img->cluster_size - 1) >> img->cluster_bits;
    if (c < img->repair_n)
        c = img->repair_n;
    uint64_t off = c << img->cluster_bits;
    struct rb_entry *e;
    int ret = rb_get(img, off, true, &e);
    if (ret == 0)
        ret = install_refblock(img, ti, e);
    return ret < 0 ? ret : rc_set(img, c, 1);
}

/* release_data, after block ti was made at the start of its range: the
 * blocks of the next empty ranges too, in the clusters right after it (free:
 * nothing covered range ti before) and counted in it, so that they do not
 * come one at a time between the data (the store's parts holding them stay
 * staged, as for write.c's L2 tables). Counted on disk before the table
 * points at them: a crash in between leaks clusters at worst. */
static int blocks_ahead(struct qcow2_image *img, uint64_t ti)
{
    uint64_t pb = per_block(img), c0 = ti * pb, n = 1;
    while (n < RB_AHEAD && n < pb && ti + n < img->reftable_size && !(img->reftable[ti + n] & QCOW2_REFT_OFFSET_MASK))
        n++;
    if (n == 1)
        return 0;
    struct rb_entry *e;
    int ret = rb_get(img, c0 << img->cluster_bits, false, &e);
    if (ret < 0)
        return ret;
    for (uint64_t j = 1; j < n; j++)
        qcow2_refcount_entry_set(e->buf, j, img->refcount_bits, 1);
    e->dirty = true;
    if ((ret = rb_write(img, e)) < 0 || (ret = qcow2_sync(img, img->file)) < 0)
        return ret;
    for (uint64_t j = 1; j < n && ret == 0; j++) {
        uint64_t off = (c0 + j) << img->cluster_bits;
        if ((ret = overlap_check(img, off, img->cluster_size, "new refcount block")) == 0 &&
            (ret = rb_get(img, off, true, &e)) == 0)
            ret = install_refblock(img, ti + j, e);
    }
    return ret;
}

int rc_cover(struct qcow2_image *img, uint64_t cluster)
{
    uint64_t ti = cluster / per_block(img);
    int ret;
    if (ti >= img->reftable_size && (ret = grow_reftable(img, ti + 1)) < 0)
        return ret;
    if (!(img->reftable[ti] & QCOW2_REFT_OFFSET_MASK) &&
        ((ret = new_refblock(img, ti)) < 0 || (img->release_data && (ret = blocks_ahead(img, ti)) < 0)))
        return ret;
    return 0;
}

int rc_set(struct qcow2_image *img, uint64_t cluster, uint64_t val)
{
    uint64_t pb = per_block(img), ti = cluster / pb;
    int ret;
    if (val > rc_max(img))
        return err_fail(ERANGE, "refcount of cluster %#" PRIx64 " would be %" PRIu64 ", more than %u-bit refcounts hold",
                        cluster << img->cluster_bits, val, img->refcount_bits);
    if (ti >= img->reftable_size || !(img->reftable[ti] & QCOW2_REFT_OFFSET_MASK)) {
        if (!val)
            return 0;
        if ((ret = rc_cover(img, cluster)) < 0)
            return ret;
        uint64_t now;
        if ((ret = rc_get(img, cluster, &now)) < 0)
            return ret;
        if (now) /* a new block took the cluster it was asked about */
            return err_fail(EAGAIN, "cluster %#" PRIx64 " became a refcount block", cluster << img->cluster_bits);
    }
    struct rb_entry *e;
    ret = rb_get(img, img->reftable[ti] & QCOW2_REFT_OFFSET_MASK, false, &e);
    if (ret < 0)
        return ret;
    qcow2_refcount_entry_set(e->buf, cluster % pb, img->refcount_bits, val);
    e->dirty = true;
    if (val && ((cluster + 1) << img->cluster_bits) > img->file_size)
        note_file_end(img, (cluster + 1) << img->cluster_bits);
    return 0;
}

int rc_update_range(struct qcow2_image *img, uint64_t off, uint64_t len, int delta)
{
    if (!len)
        return 0;
    uint64_t first = off >> img->cluster_bits, last = (off + len - 1) >> img->cluster_bits;
    for (uint64_t c = first; c <= last; c++) {
        uint64_t v;
        int ret = rc_get(img, c, &v);
        if (ret < 0)
            return ret;
        if (delta < 0 && v == 0)
            return mark_corrupt(img, "refcount of cluster %#" PRIx64 " would drop below zero", c << img->cluster_bits);
        if (delta > 0 && v == rc_max(img))
            return err_fail(ERANGE, "refcount of cluster %#" PRIx64 " is already at its maximum (%u bits)",
                            c << img->cluster_bits, img->refcount_bits);
        ret = rc_set(img, c, delta > 0 ? v + 1 : v - 1);
        if (ret < 0)
            return ret;
        if (delta < 0 && v == 1) /* nothing refers to it any more */
            pin_freed(img, c);
    }
    return 0;
}

/* Move the refcount table to a larger one past the end of everything, with new
 * refcount blocks for the clusters it occupies; switch the header over in one
 * write once the new structures are on disk; then free the old table. */
static int grow_reftable(struct qcow2_image *img, uint64_t min_entries)
{
    uint64_t pb = per_block(img), cs = img->cluster_size;
    uint64_t entries_per_cluster = cs / 8;
    uint64_t start = (img->file_size + cs - 1) >> img->cluster_bits;
    uint64_t want = img->reftable_size + img->reftable_size / 2;
    if (want < min_entries)
        want = min_entries;
    uint64_t tclusters, nrb = 0, total;
    unsigned char *area = NULL;
    int ret;
    for (;;) {
        /* bounded first: the loops below walk the ranges the new table covers,
         * and a refcount for a hostile offset (2^52) would make that billions */
        if (want > QCOW2_MAX_REFTABLE_BYTES / 8)
            return err_fail(EOVERFLOW, "the refcount table would exceed %u bytes", QCOW2_MAX_REFTABLE_BYTES);
        tclusters = (want + entries_per_cluster - 1) / entries_per_cluster;
        total = tclusters + nrb;
        /* ranges touched by [start, start+total) that have no block yet */
        uint64_t need = 0;
        for (uint64_t r = start / pb; r <= (start + total - 1) / pb; r++)
            if (r >= img->reftable_size || !(img->reftable[r] & QCOW2_REFT_OFFSET_MASK))
                need++;
        uint64_t last_range = (start + tclusters + need - 1) / pb;
        if (need == nrb && last_range < tclusters * entries_per_cluster)
            break;
        nrb = need;
        if (last_range + 1 > want)
            want = last_range + 1;
    }
    uint64_t new_entries = tclusters * entries_per_cluster;
    if (new_entries * 8 > QCOW2_MAX_REFTABLE_BYTES)
        return err_fail(ENOTSUP, "the refcount table would exceed the limit of %u bytes (8 MiB, as QEMU)",
                        QCOW2_MAX_REFTABLE_BYTES);
    uint64_t *table = calloc(new_entries, 8);
    area = calloc(nrb ? nrb : 1, cs);
    if (!table || !area) {
        free(table);
        free(area);
        return err_fail(ENOMEM, "out of memory growing the refcount table");
    }
    memcpy(table, img->reftable, (size_t)img->reftable_size * 8);
    /* new blocks follow the table; each covers one uncovered range */
    uint64_t k = 0;
    for (uint64_t r = start / pb; r <= (start + total - 1) / pb; r++)
        if (r >= img->reftable_size || !(img->reftable[r] & QCOW2_REFT_OFFSET_MASK))
            table[r] = (start + tclusters + k++) << img->cluster_bits;
    /* refcount 1 for every cluster of the new area */
    for (uint64_t c = start; c < start + total; c++) {
        uint64_t r = c / pb;
        uint64_t boff = table[r];
        uint64_t bidx = (boff >> img->cluster_bits) - (start + tclusters);
        if (boff >= (start + tclusters) << img->cluster_bits && bidx < nrb) {
            qcow2_refcount_entry_set(area + bidx * cs, c % pb, img->refcount_bits, 1);
        } else if ((ret = rc_set(img, c, 1)) < 0) { /* an existing block covers it */
            goto out;
        }
    }
    ret = rc_writeback(img);
    if (ret < 0)
        goto out;
    for (uint64_t i = 0; i < new_entries; i++)
        table[i] = htobe64(table[i]);
    uint64_t toff = start << img->cluster_bits;
    ret = vfs_pwrite(img->file, table, tclusters * cs, toff);
    if (ret == 0 && nrb)
        ret = vfs_pwrite(img->file, area, nrb * cs, toff + tclusters * cs);
    if (ret == 0)
        ret = qcow2_sync(img, img->file);
    if (ret < 0)
        goto out;
    note_file_end(img, toff + total * cs);
    /* switch: offset (8 bytes at 48) and clusters (4 bytes at 56) in one write */
    unsigned char hdr[12];
    uint64_t be_off = htobe64(toff);
    uint32_t be_cl = htobe32((uint32_t)tclusters);
    memcpy(hdr, &be_off, 8);
    memcpy(hdr + 8, &be_cl, 4);
    ret = vfs_pwrite(img->file, hdr, 12, 48);
    if (ret == 0)
        ret = qcow2_sync(img, img->file);
    if (ret < 0)
        goto out;
    uint64_t old_off = img->h.refcount_table_offset, old_bytes = (uint64_t)img->h.refcount_table_clusters * cs;
    for (uint64_t i = 0; i < new_entries; i++)
        table[i] = be64toh(table[i]);
    free(img->reftable);
    img->reftable = table;
    table = NULL;
    img->reftable_size = (uint32_t)new_entries;
    img->h.refcount_table_offset = toff;
    img->h.refcount_table_clusters = (uint32_t)tclusters;
    img->info.refcount_table_offset = toff;
    img->info.refcount_table_clusters = (uint32_t)tclusters;
    /* nothing on disk points at the old table any more */
    ret = rc_update_range(img, old_off, old_bytes, -1);
out:
    free(table);
    free(area);
    return ret;
}
