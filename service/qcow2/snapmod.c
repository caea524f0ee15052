/* snapmod.c: taking, deleting and reverting to internal snapshots. Refcounts
 * rise before anything on disk refers to the new references and fall only
 * after the last reference is gone from the disk; the snapshot table is
 * replaced by writing a new one and switching the header in one write. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qcow2_int.h"

#define HDR_NB_SNAPSHOTS 60 /* nb_snapshots (4) then snapshots_offset (8): one 12-byte write */
#define HDR_SIZE 24
#define SNAP_EXTRA 24u      /* vm_state_size_large, disk_size, icount */

/* Add delta to the refcount of every cluster an L1 table reaches (its L2 tables
 * and their data), as check counts them. */
static int update_l1_refs(struct qcow2_image *img, const uint64_t *l1, uint32_t l1_size, int delta)
{
    uint64_t cs = img->cluster_size;
    uint64_t *t = malloc(cs);
    if (!t)
        return err_fail(ENOMEM, "out of memory");
    int ret = 0;
    for (uint32_t i = 0; i < l1_size && ret == 0; i++) {
        uint64_t l2off = l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (!l2off)
            continue;
        if (offset_into_cluster(img, l2off) || l2off + cs > img->file_size) {
            ret = mark_corrupt(img, "L2 table offset %#" PRIx64 " is invalid", l2off);
            break;
        }
        /* through the cache: dirty slices of the active tables are the truth */
        uint32_t per_slice = img->cache.slice_bytes / (8 * img->l2_entry_words);
        for (uint32_t j = 0; j < img->l2_entries && ret == 0; j += per_slice) {
            struct l2_slice *s;
            if ((ret = l2_cache_get(img, l2off + (uint64_t)(j / per_slice) * img->cache.slice_bytes, &s)) < 0)
                break;
            memcpy(t + (uint64_t)j * img->l2_entry_words, s->entries, img->cache.slice_bytes);
            l2_cache_put(img, s);
        }
        for (uint32_t j = 0; j < img->l2_entries && ret == 0; j++) {
            uint64_t e = t[j * img->l2_entry_words];
            if (e & QCOW2_OFLAG_COMPRESSED) {
                uint64_t coff = e & img->coffset_mask;
                uint64_t nsec = ((e >> img->csize_shift) & img->csize_mask) + 1;
                ret = rc_update_range(img, coff & ~511ull, nsec * 512, delta);
            } else if ((e & QCOW2_L2E_OFFSET_MASK) && img->data == img->file) {
                ret = rc_update_range(img, e & QCOW2_L2E_OFFSET_MASK, cs, delta);
            }
        }
        if (ret == 0)
            ret = rc_update_range(img, l2off, cs, delta);
    }
    free(t);
    return ret;
}

/* Make OFLAG_COPIED in the active L1 and L2 tables say exactly "refcount is one". */
static int fix_copied(struct qcow2_image *img)
{
    for (uint32_t i = 0; i < img->l1_size; i++) {
        uint64_t l2off = img->l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (!l2off)
            continue;
        uint64_t rc;
        int ret = rc_get(img, l2off >> img->cluster_bits, &rc);
        if (ret < 0)
            return ret;
        uint64_t want = rc == 1 ? img->l1[i] | QCOW2_OFLAG_COPIED : img->l1[i] & ~QCOW2_OFLAG_COPIED;
        if (want != img->l1[i]) {
            img->l1[i] = want;
            if (img->l1_dirty_hi <= img->l1_dirty_lo) {
                img->l1_dirty_lo = i;
                img->l1_dirty_hi = i + 1;
            } else {
                img->l1_dirty_lo = i < img->l1_dirty_lo ? i : img->l1_dirty_lo;
                img->l1_dirty_hi = i + 1 > img->l1_dirty_hi ? i + 1 : img->l1_dirty_hi;
            }
        }
        if (img->data != img->file)
            continue;
        uint32_t per_slice = img->cache.slice_bytes / (8 * img->l2_entry_words);
        for (uint32_t j = 0; j < img->l2_entries; j += per_slice) {
            struct l2_slice *s;
            if ((ret = l2_cache_get(img, l2off + (uint64_t)(j / per_slice) * img->cache.slice_bytes, &s)) < 0)
                return ret;
            for (uint32_t x = 0; x < per_slice && ret == 0; x++) {
                uint64_t *e = &s->entries[x * img->l2_entry_words];
                uint64_t host = *e & QCOW2_L2E_OFFSET_MASK;
                if ((*e & QCOW2_OFLAG_COMPRESSED) || !host)
                    continue;
                if ((ret = rc_get(img, host >> img->cluster_bits, &rc)) < 0)
                    break;
                uint64_t w = rc == 1 ? *e | QCOW2_OFLAG_COPIED : *e & ~QCOW2_OFLAG_COPIED;
                if (w != *e) {
                    *e = w;
                    l2_cache_mark_dirty(img, s);
                }
            }
            l2_cache_put(img, s);
            /* a cache full of dirty slices has no victim: write them back (every
             * caller has raised the refcounts first, and clearing COPIED is
             * always safe to store early) */
            if (ret == 0 && img->cache.ndirty * 2 >= img->cache.nslots)
                ret = meta_flush(img);
            if (ret < 0)
                return ret;
        }
    }
    return 0;
}

/* The snapshot table as it is on disk (caller frees), and where each entry starts. */
static int read_table(struct qcow2_image *img, unsigned char **buf, uint64_t **starts)
{
    uint64_t len = img->h.nb_snapshots ? img->snap_table_len : 0;
    *buf = malloc(len + 1);
    *starts = calloc(img->nb_snaps + 1, sizeof **starts);
    if (!*buf || !*starts)
        return err_fail(ENOMEM, "out of memory");
    int ret = len ? vfs_pread(img->file, *buf, len, img->h.snapshots_offset) : 0;
    if (ret < 0)
        return ret;
    /* parsed when the image was opened, but read again: walk it as carefully */
    if ((ret = snap_table_starts(*buf, len, img->nb_snaps, *starts)) < 0)
        return mark_corrupt(img, "the snapshot table changed on disk: %s", err_msg(ret)); /* (formatted apart first) */
    return 0;
}

/* Write table bytes [0, len) (entries padded) as the new snapshot table, switch
 * the header to it, and free the old one (repair: only its clusters that have a
 * refcount, as QEMU's repair frees them; past the end of the file there is none). */
static int switch_table(struct qcow2_image *img, unsigned char *table, uint64_t len, uint32_t n, bool repair)
{
    uint64_t cs = img->cluster_size, off = 0;
    int ret = 0;
    if (n) {
        uint64_t clusters = (len + cs - 1) / cs;
        if ((ret = alloc_clusters(img, clusters, &off)) < 0)
            return ret;
        if ((ret = vfs_pwrite(img->file, table, len, off)) < 0)
            return ret;
    }
    /* refcounts and table durable before the header points at them */
    if ((ret = rc_writeback(img)) < 0 || (ret = qcow2_sync(img, img->file)) < 0)
        return ret;
    unsigned char hdr[12];
    uint32_t be_n = htobe32(n);
    uint64_t be_off = htobe64(off);
    memcpy(hdr, &be_n, 4);
    memcpy(hdr + 4, &be_off, 8);
    if ((ret = vfs_pwrite(img->file, hdr, 12, HDR_NB_SNAPSHOTS)) < 0 || (ret = qcow2_sync(img, img->file)) < 0)
        return ret;
    uint64_t old_off = img->h.snapshots_offset, old_len = img->h.nb_snapshots ? img->snap_table_len : 0;
    img->h.nb_snapshots = n;
    img->h.snapshots_offset = off;
    for (uint64_t c = old_off / cs * cs; repair && old_len && c < old_off + old_len && ret == 0; c += cs) {
        uint64_t rc = 0;
        if (c < img->file_size && rc_get(img, c >> img->cluster_bits, &rc) == 0 && rc)
            ret = rc_update_range(img, c, 1, -1);
    }
    if (!repair && old_len && (ret = rc_update_range(img, old_off, old_len, -1)) < 0)
        return ret;
    if (ret < 0)
        return ret;
    /* reload our view of the table from what is now on disk */
    qcow2_free_snapshots(img);
    ret = qcow2_read_snapshots(img);
    img->info.nb_snapshots = img->nb_snaps;
    img->info.snapshots = img->snaps;
    return ret;
}

/* Bytes of s's table entry as written here: SNAP_EXTRA bytes of extra data, padded. */
static uint64_t entry_len(const struct qcow2_snapshot_info *s)
{
    return (40 + SNAP_EXTRA + strlen(s->id) + strlen(s->name) + 7) & ~7ull;
}

/* Write s's entry at e (entry_len(s) zeroed bytes). */
static void put_entry(unsigned char *e, const struct qcow2_snapshot_info *s)
{
    size_t il = strlen(s->id), nl = strlen(s->name);
    uint64_t v64;
    uint32_t v32;
    uint16_t v16;
    v64 = htobe64(s->l1_offset), memcpy(e, &v64, 8);
    v32 = htobe32(s->l1_size), memcpy(e + 8, &v32, 4);
    v16 = htobe16((uint16_t)il), memcpy(e + 12, &v16, 2);
    v16 = htobe16((uint16_t)nl), memcpy(e + 14, &v16, 2);
    v32 = htobe32(s->date_sec), memcpy(e + 16, &v32, 4);
    v32 = htobe32(s->date_nsec), memcpy(e + 20, &v32, 4);
    v64 = htobe64(s->vm_clock_nsec), memcpy(e + 24, &v64, 8);
    v32 = htobe32((uint32_t)s->vm_state_size), memcpy(e + 32, &v32, 4);
    v32 = htobe32(SNAP_EXTRA), memcpy(e + 36, &v32, 4);
    v64 = htobe64(s->vm_state_size), memcpy(e + 40, &v64, 8);
    v64 = htobe64(s->disk_size), memcpy(e + 48, &v64, 8);
    v64 = htobe64(s->icount), memcpy(e + 56, &v64, 8); /* absent (UINT64_MAX): all ones, as QEMU writes it */
    memcpy(e + 40 + SNAP_EXTRA, s->id, il);
    memcpy(e + 40 + SNAP_EXTRA + il, s->name, nl);
}

int qcow2_snapshot_table_rewrite(struct qcow2_image *img)
{
    uint64_t len = 0;
    for (uint32_t i = 0; i < img->nb_snaps; i++)
        len += entry_len(&img->snaps[i]);
    unsigned char *nt = calloc(1, len ? len : 1);
    if (!nt)
        return err_fail(ENOMEM, "out of memory for the snapshot table");
    for (uint64_t i = 0, at = 0; i < img->nb_snaps; at += entry_len(&img->snaps[i]), i++)
        put_entry(nt + at, &img->snaps[i]);
    int ret = switch_table(img, nt, len, img->nb_snaps, true);
    free(nt);
    return ret;
}

static const struct qcow2_snapshot_info *find(struct qcow2_image *img, const char *name, uint32_t *idx)
{
    for (uint32_t i = 0; i < img->nb_snaps; i++)
        if (!strcmp(img->snaps[i].id, name)) {
            *idx = i;
            return &img->snaps[i];
        }
    for (uint32_t i = 0; i < img->nb_snaps; i++)
        if (!strcmp(img->snaps[i].name, name)) {
            *idx = i;
            return &img->snaps[i];
        }
    return NULL;
}

static int begin(struct qcow2_image *img)
{
    if (!img->rw || img->fmt != QCOW2_FMT_QCOW2)
        return err_fail(EROFS, "snapshots need a qcow2 image open read-write");
    if (img->broken)
        return err_fail(EUCLEAN, "image is marked corrupt; run check -r all");
    if (img->data != img->file)
        return err_fail(ENOTSUP, "images with an external data file cannot have internal snapshots");
    pthread_rwlock_wrlock(&img->rwlock);
    qcow2_note_change(img, true);
    img->unsynced = true;
    int ret = begin_write(img);
    if (ret == 0)
        ret = meta_flush(img);
    if (ret < 0)
        pthread_rwlock_unlock(&img->rwlock);
    return ret;
}

static int end(struct qcow2_image *img, int ret)
{
    if (ret == 0)
        ret = meta_flush(img);
    if (ret == 0)
        ret = meta_flush(img);
    pthread_rwlock_unlock(&img->rwlock);
    return ret;
}

int qcow2_snapshot_create(struct qcow2_image *img, const char *name)
{
    size_t nlen = strlen(name);
    uint32_t idx;
    if (!nlen || nlen > 65535)
        return err_fail(EINVAL, "a snapshot name needs 1 to 65535 bytes");
    if (img->h.nb_snapshots >= QCOW2_MAX_SNAPSHOTS)
        return err_fail(E2BIG, "the image already has %u snapshots", QCOW2_MAX_SNAPSHOTS);
    int ret = begin(img);
    if (ret < 0)
        return ret;
    unsigned char *table = NULL, *nt = NULL;
    uint64_t *starts = NULL, *l1 = NULL;
    if (find(img, name, &idx)) {
        ret = err_fail(EEXIST, "a snapshot named '%s' exists", name);
        goto out;
    }
    /* a fresh id: one more than the largest number in use */
    unsigned long long maxid = 0;
    for (uint32_t i = 0; i < img->nb_snaps; i++) {
        unsigned long long v = strtoull(img->snaps[i].id, NULL, 10);
        maxid = v > maxid ? v : maxid;
    }
    char id[32];
    snprintf(id, sizeof id, "%llu", maxid + 1);

    /* the table is read back after the switch: refuse now what the budget would
     * refuse then (the read buffer, the new entry and its strings) */
    if ((ret = meta_fits(
             img, img->snap_table_len + 2 * (40 + SNAP_EXTRA + sizeof id + nlen) + sizeof(struct qcow2_snapshot_info),
             "the snapshot table with one more snapshot")) < 0)
        goto out;
    /* 1. the references rise: everything the active L1 reaches is now shared */
    if ((ret = update_l1_refs(img, img->l1, img->l1_size, +1)) < 0)
        goto out;
    /* 2. a copy of the active L1 */
    uint64_t cs = img->cluster_size, l1_bytes = (uint64_t)img->l1_size * 8, l1_off = 0;
    if (img->l1_size) {
        if ((ret = alloc_clusters(img, (l1_bytes + cs - 1) / cs, &l1_off)) < 0)
            goto out;
        if (!(l1 = malloc(l1_bytes))) {
            ret = err_fail(ENOMEM, "out of memory");
            goto out;
        }
        for (uint32_t i = 0; i < img->l1_size; i++)
            l1[i] = htobe64(img->l1[i] & ~QCOW2_OFLAG_COPIED);
        if ((ret = vfs_pwrite(img->file, l1, l1_bytes, l1_off)) < 0)
            goto out;
    }
    /* 3. the flags of the active tables follow the new refcounts */
    if ((ret = fix_copied(img)) < 0)
        goto out;
    /* 4. the table with one more entry; then the header switch */
    if ((ret = read_table(img, &table, &starts)) < 0)
        goto out;
    uint64_t old_len = starts[img->nb_snaps];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    const struct qcow2_snapshot_info sn = {.id = id,
                                           .name = (char *)name,
                                           .l1_offset = l1_off,
                                           .l1_size = img->l1_size,
                                           .date_sec = (uint32_t)now.tv_sec,
                                           .date_nsec = (uint32_t)now.tv_nsec,
                                           .disk_size = img->h.size};
    uint64_t elen = entry_len(&sn);
    if (!(nt = calloc(1, old_len + elen))) {
        ret = err_fail(ENOMEM, "out of memory");
        goto out;
    }
    memcpy(nt, table, old_len);
    put_entry(nt + old_len, &sn);
    /* the copied L1 and the raised refcounts reach the disk before the table */
    if ((ret = meta_flush(img)) < 0)
        goto out;
    ret = switch_table(img, nt, old_len + elen, img->nb_snaps + 1, false);
out:
    free(table);
    free(nt);
    free(starts);
    free(l1);
    return end(img, ret);
}

int qcow2_snapshot_delete(struct qcow2_image *img, const char *name)
{
    int ret = begin(img);
    if (ret < 0)
        return ret;
    unsigned char *table = NULL, *nt = NULL;
    uint64_t *starts = NULL, *l1 = NULL;
    uint32_t idx;
    const struct qcow2_snapshot_info *sn = find(img, name, &idx);
    if (!sn) {
        ret = err_fail(ENOENT, "no snapshot named '%s'", name);
        goto out;
    }
    uint64_t l1_off = sn->l1_offset;
    uint32_t l1_size = sn->l1_size;
    if ((ret = qcow2_load_u64_table(img, l1_off, l1_size, &l1)) < 0)
        goto out;
    /* 1. the table without the entry: from now on nothing refers to its L1 */
    if ((ret = read_table(img, &table, &starts)) < 0)
        goto out;
    uint64_t a = starts[idx], b = starts[idx + 1], len = starts[img->nb_snaps];
    if (!(nt = malloc(len + 1))) {
        ret = err_fail(ENOMEM, "out of memory");
        goto out;
    }
    memcpy(nt, table, a);
    memcpy(nt + a, table + b, len - b);
    if ((ret = switch_table(img, nt, len - (b - a), img->nb_snaps - 1, false)) < 0)
        goto out;
    /* 2. then the references fall, and the flags follow */
    if ((ret = update_l1_refs(img, l1, l1_size, -1)) < 0)
        goto out;
    if (l1_size && (ret = rc_update_range(img, l1_off, (uint64_t)l1_size * 8, -1)) < 0)
        goto out;
    ret = fix_copied(img);
out:
    free(table);
    free(nt);
    free(starts);
    free(l1);
    return end(img, ret);
}

int qcow2_snapshot_revert(struct qcow2_image *img, const char *name)
{
    int ret = begin(img);
    if (ret < 0)
        return ret;
    uint64_t *l1 = NULL, *old = NULL;
    uint32_t idx;
    const struct qcow2_snapshot_info *sn = find(img, name, &idx);
    if (!sn) {
        ret = err_fail(ENOENT, "no snapshot named '%s'", name);
        goto out;
    }
    if (img->info.nb_bitmaps) {
        /* as qemu-img: the bitmaps would not say what the revert changed (nor fit
         * another disk size) */
        ret = err_fail(EBUSY, "the image has dirty bitmaps; reverting to snapshot '%s' would leave them wrong "
                       "(remove them first)", name);
        goto out;
    }
    if (sn->l1_size > img->h.l1_size) {
        ret = err_fail(ENOTSUP, "snapshot '%s' has a larger L1 table than the image (resize first)", name);
        goto out;
    }
    if ((ret = qcow2_load_u64_table(img, sn->l1_offset, sn->l1_size, &l1)) < 0)
        goto out;
    uint32_t n = img->h.l1_size;
    if (!(old = malloc((size_t)n * 8 + 8))) {
        ret = err_fail(ENOMEM, "out of memory");
        goto out;
    }
    memcpy(old, img->l1, (size_t)n * 8);
    /* 1. what the snapshot reaches gains the active L1's reference */
    if ((ret = update_l1_refs(img, l1, sn->l1_size, +1)) < 0)
        goto out;
    if ((ret = meta_flush(img)) < 0 || (ret = rc_writeback(img)) < 0 || (ret = qcow2_sync(img, img->file)) < 0)
        goto out;
    /* 2. the active L1 becomes the snapshot's (padded with empty entries) */
    for (uint32_t i = 0; i < n; i++)
        img->l1[i] = i < sn->l1_size ? l1[i] & ~QCOW2_OFLAG_COPIED : 0;
    img->l1_dirty_lo = 0;
    img->l1_dirty_hi = n;
    if (sn->disk_size != img->h.size) {
        if ((ret = header_write(img, HDR_SIZE, sn->disk_size, 8)) < 0)
            goto out;
        img->h.size = img->size = img->info.virtual_size = sn->disk_size;
    }
    if ((ret = meta_flush(img)) < 0)
        goto out;
    /* 3. the old active tables lose their reference; flags follow */
    if ((ret = update_l1_refs(img, old, n, -1)) < 0)
        goto out;
    ret = fix_copied(img);
out:
    free(l1);
    free(old);
    return end(img, ret);
}
