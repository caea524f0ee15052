/* flush.c: putting cached metadata on disk in a crash-safe order, header
 * updates, the corrupt bit, and the duties of the first write and of close. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"

/* Byte offsets of header fields. */
#define HDR_INCOMPAT 72
#define HDR_AUTOCLEAR 88

static int sync_all(struct qcow2_image *img)
{
    int ret = 0;
    if (img->data != img->file)
        ret = qcow2_sync(img, img->data);
    if (ret == 0)
        ret = qcow2_sync(img, img->file);
    return ret;
}

static int write_l1(struct qcow2_image *img)
{
    if (img->l1_dirty_hi <= img->l1_dirty_lo)
        return 0;
    uint32_t lo = img->l1_dirty_lo, hi = img->l1_dirty_hi;
    uint64_t *buf = malloc((size_t)(hi - lo) * 8);
    if (!buf)
        return err_fail(ENOMEM, "out of memory");
    for (uint32_t i = lo; i < hi; i++)
        buf[i - lo] = htobe64(img->l1[i]);
    int ret = vfs_pwrite(img->file, buf, (size_t)(hi - lo) * 8, img->h.l1_table_offset + (uint64_t)lo * 8);
    free(buf);
    if (ret == 0)
        img->l1_dirty_lo = img->l1_dirty_hi = 0;
    return ret;
}

/* The order: (1) refcount blocks, (2) flush, so data and refcounts are durable
 * before anything points at them; (3) L2 slices, flush, then L1 entries, so
 * tables are durable before the L1 points at them; (4) flush; (5) only now
 * lower the refcounts of clusters the written tables dropped. */
static bool rc_dirty(const struct qcow2_image *img)
{
    for (unsigned i = 0; i < RB_CACHE_ENTRIES; i++)
        if (img->rbc[i].valid && img->rbc[i].dirty)
            return true;
    return false;
}

int meta_flush(struct qcow2_image *img)
{
    if (!img->rw)
        return 0;
    /* nothing written since the last flush: no I/O at all */
    if (!img->unsynced && !img->cache.ndirty && (!img->npending || img->defer_frees) && !rc_dirty(img) &&
        img->l1_dirty_hi <= img->l1_dirty_lo)
        return 0;
    int ret = rc_writeback(img);
    if (ret == 0)
        ret = sync_all(img);
    if (ret == 0)
        ret = l2_cache_writeback(img);
    if (ret == 0 && img->l1_dirty_hi > img->l1_dirty_lo) {
        ret = qcow2_sync(img, img->file);
        if (ret == 0)
            ret = write_l1(img);
    }
    if (ret == 0)
        ret = qcow2_sync(img, img->file);
    if (ret < 0 || img->defer_frees)
        return ret;
    size_t n = img->npending;
    img->npending = 0;
    img->unsynced = n > 0; /* lowered refcounts still to write */
    for (size_t i = 0; i < n; i++) {
        ret = rc_update_range(img, img->pending[i].off, img->pending[i].len, -1);
        if (ret < 0)
            return ret; /* the rest leak: safe, and check -r leaks reclaims them */
    }
    pin_drain(img, false);
    return 0;
}

int header_write(struct qcow2_image *img, uint64_t off, uint64_t value, unsigned size)
{
    unsigned char b[8];
    if (size == 8) {
        uint64_t v = htobe64(value);
        memcpy(b, &v, 8);
    } else {
        uint32_t v = htobe32((uint32_t)value);
        memcpy(b, &v, 4);
    }
    int ret = vfs_pwrite(img->file, b, size, off);
    if (ret == 0)
        ret = qcow2_sync(img, img->file);
    return ret;
}

int mark_corrupt(struct qcow2_image *img, const char *fmt, ...)
{
    char msg[ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (img->rw && !img->broken && img->h.version >= 3) {
        img->h.incompatible_features |= QCOW2_INCOMPAT_CORRUPT;
        img->info.corrupt = true;
        header_write(img, HDR_INCOMPAT, img->h.incompatible_features, 8); /* best effort */
    }
    img->broken = true;
    return err_fail(EUCLEAN, "image is corrupt: %s; further writes are refused (run check -r all)", msg);
}

int begin_write(struct qcow2_image *img)
{
    if (img->write_started)
        return 0;
    int ret = 0;
    uint64_t known = QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW;
    if (img->h.version >= 3 && (img->h.autoclear_features & ~known)) {
        /* the spec: bits we do not know must be cleared on the first write */
        img->h.autoclear_features &= known;
        img->info.autoclear = img->h.autoclear_features;
        if ((ret = header_write(img, HDR_AUTOCLEAR, img->h.autoclear_features, 8)) < 0)
            return ret;
    }
    if (img->h.version >= 3 && (img->h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS) &&
        !(img->h.incompatible_features & QCOW2_INCOMPAT_DIRTY)) {
        img->h.incompatible_features |= QCOW2_INCOMPAT_DIRTY;
        if ((ret = header_write(img, HDR_INCOMPAT, img->h.incompatible_features, 8)) < 0)
            return ret;
        img->set_dirty_bit = true;
        img->info.dirty = true;
    }
    if ((ret = bitmaps_begin(img)) < 0)
        return ret;
    img->write_started = true;
    return 0;
}

int qcow2_durable(struct qcow2_image *img)
{
    int ret = 0;
    if (img->no_sync)
        return 0;
    if (img->data != img->file && (vfs_caps(img->data) & VFS_CAP_ATOMIC_FLUSH))
        ret = vfs_flush(img->data);
    if (ret == 0 && (vfs_caps(img->file) & VFS_CAP_ATOMIC_FLUSH))
        ret = vfs_flush(img->file);
    return ret;
}

int finish_write(struct qcow2_image *img)
{
    if (!img->rw || img->broken)
        return 0;
    /* twice: the second writes the refcounts lowered by the first */
    int ret = meta_flush(img);
    if (ret == 0)
        ret = bitmaps_store(img);
    if (ret == 0)
        ret = meta_flush(img);
    if (ret == 0)
        ret = meta_flush(img);
    if (ret == 0 && img->set_dirty_bit) {
        img->h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
        ret = header_write(img, HDR_INCOMPAT, img->h.incompatible_features, 8);
        if (ret == 0) {
            img->set_dirty_bit = false;
            img->info.dirty = false;
        }
    }
    if (ret == 0)
        ret = qcow2_durable(img);
    return ret;
}
