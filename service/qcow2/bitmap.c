/* bitmap.c: the persistent bitmap directory: parsing and validating its
 * entries, loading bitmaps, tracking guest writes in the enabled ones, storing
 * them at close, and the dirty-status query. Changes are in bitmod.c. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"


void qcow2_free_bitmaps(struct qcow2_image *img)
{
    if (img->bm)
        for (uint32_t i = 0; i < img->info.nb_bitmaps; i++)
            free(img->bm[i].bits);
    free(img->bm);
    img->bm = NULL;
    if (img->bitmaps)
        for (uint32_t i = 0; i < img->info.nb_bitmaps; i++)
            free(img->bitmaps[i].name);
    free(img->bitmaps);
    img->bitmaps = NULL;
}

int qcow2_read_bitmaps(struct qcow2_image *img)
{
    img->info.nb_bitmaps = 0;
    if (!img->nb_bitmaps && !img->bitmap_dir_size)
        return 0;
    /* without the autoclear bit, another program changed the image without
     * knowing bitmaps: the extension is stale and ignored, as the spec says */
    if (!(img->h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
        return 0;
    uint32_t n = img->nb_bitmaps;
    if (n == 0 || n > QCOW2_MAX_BITMAPS)
        return err_fail(EINVAL, "bitmaps extension: %u bitmaps is out of range (1 to %u)", n, QCOW2_MAX_BITMAPS);
    if (img->bitmap_dir_size < (uint64_t)n * BME_FIXED)
        return err_fail(EINVAL, "bitmaps extension: directory of %" PRIu64 " bytes is too small for %u bitmaps",
                        img->bitmap_dir_size, n);
    int ret = qcow2_check_table(img, img->bitmap_dir_off, img->bitmap_dir_size, 1, QCOW2_MAX_BITMAP_DIR,
                                "bitmap directory");
    if (ret < 0)
        return ret;
    uint64_t len = img->bitmap_dir_size;
    unsigned char *buf = malloc(len);
    img->bitmaps = calloc(n, sizeof *img->bitmaps);
    if (!buf || !img->bitmaps) {
        ret = err_fail(ENOMEM, "out of memory for the bitmap directory");
        goto out;
    }
    ret = vfs_pread(img->file, buf, len, img->bitmap_dir_off);
    if (ret < 0)
        goto out;
    uint64_t pos = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct qcow2_bitmap_info *b = &img->bitmaps[i];
        if (len - pos < BME_FIXED) {
            ret = err_fail(EINVAL, "bitmap directory is truncated at entry %u", i);
            goto out;
        }
        const unsigned char *e = buf + pos;
        uint64_t table_off = be64_at(e);
        uint32_t table_size = be32_at(e + 8), flags = be32_at(e + 12);
        uint8_t type = e[16], gran_bits = e[17];
        uint16_t name_len = be16_at(e + 18);
        uint32_t extra = be32_at(e + 20);
        uint64_t elen = ((uint64_t)BME_FIXED + extra + name_len + 7) & ~7ull;
        if (elen > len - pos) {
            ret = err_fail(EINVAL, "bitmap directory entry %u runs past the end of the directory", i);
            goto out;
        }
        if (name_len == 0 || name_len > QCOW2_MAX_BITMAP_NAME) {
            ret = err_fail(EINVAL, "bitmap %u has a name length of %u (1 to %u allowed)", i, name_len,
                           QCOW2_MAX_BITMAP_NAME);
            goto out;
        }
        b->name = malloc(name_len + 1u);
        if (!b->name) {
            ret = err_fail(ENOMEM, "out of memory");
            goto out;
        }
        memcpy(b->name, e + BME_FIXED + extra, name_len);
        b->name[name_len] = 0;
        img->info.nb_bitmaps = i + 1;
        if (flags & BME_RESERVED_FLAGS) {
            ret = err_fail(EINVAL, "bitmap '%s' has reserved flags set (%#x)", b->name, flags);
            goto out;
        }
        if (type != BME_TYPE_DIRTY) {
            ret = err_fail(EINVAL, "bitmap '%s' has unknown type %u", b->name, type);
            goto out;
        }
        if (gran_bits < BME_MIN_GRAN_BITS || gran_bits > BME_MAX_GRAN_BITS) {
            ret = err_fail(EINVAL, "bitmap '%s' has granularity bits %u (%d to %d allowed)", b->name, gran_bits,
                           BME_MIN_GRAN_BITS, BME_MAX_GRAN_BITS);
            goto out;
        }
        /* the table must cover exactly the bits of the virtual disk */
        uint64_t bits = (img->h.size + (1ull << gran_bits) - 1) >> gran_bits;
        uint64_t bytes = (bits + 7) / 8;
        uint64_t need = (bytes + img->cluster_size - 1) >> img->cluster_bits;
        if (table_size != need) {
            ret = err_fail(EINVAL, "bitmap '%s' table has %u entries; the disk needs %" PRIu64, b->name, table_size, need);
            goto out;
        }
        char what[64];
        snprintf(what, sizeof what, "table of bitmap '%.40s'", b->name);
        ret = qcow2_check_table(img, table_off, table_size, 8, QCOW2_MAX_L1_BYTES, what);
        if (ret < 0)
            goto out;
        for (uint32_t k = 0; k < i; k++)
            if (!strcmp(img->bitmaps[k].name, b->name)) {
                ret = err_fail(EINVAL, "two bitmaps are named '%s'", b->name);
                goto out;
            }
        b->granularity = 1u << gran_bits;
        b->in_use = flags & BME_FLAG_IN_USE;
        b->auto_ = flags & BME_FLAG_AUTO;
        b->consistent = !(extra && !(flags & BME_FLAG_EXTRA_COMPAT));
        b->type = type;
        b->entry_offset = img->bitmap_dir_off + pos;
        b->table_offset = table_off;
        b->table_size = table_size;
        pos += elen;
    }
out:
    free(buf);
    if (ret < 0) {
        qcow2_free_bitmaps(img);
        img->info.nb_bitmaps = 0;
    }
    return ret;
}

/* ---- loading ---- */

int bitmap_find(const struct qcow2_image *img, const char *name)
{
    for (uint32_t i = 0; i < img->info.nb_bitmaps; i++)
        if (!strcmp(img->bitmaps[i].name, name))
            return (int)i;
    return -1;
}

int bitmap_tracks(struct qcow2_image *img)
{
    if (img->bm || !img->info.nb_bitmaps)
        return 0;
    img->bm = calloc(img->info.nb_bitmaps, sizeof *img->bm);
    return img->bm ? 0 : err_fail(ENOMEM, "out of memory");
}

int bitmap_load_bits(struct qcow2_image *img, const struct qcow2_bitmap_info *b, unsigned char **out)
{
    uint64_t cs = img->cluster_size;
    unsigned gb = (unsigned)__builtin_ctz(b->granularity);
    uint64_t nbits = (img->h.size + b->granularity - 1) >> gb, bytes = (nbits + 7) / 8;
    unsigned char *bits = calloc(1, b->table_size ? (size_t)b->table_size * cs : 1);
    uint64_t *table = NULL;
    if (!bits)
        return err_fail(ENOMEM, "out of memory for bitmap '%s'", b->name);
    int ret = qcow2_load_u64_table(img, b->table_offset, b->table_size, &table);
    for (uint32_t j = 0; ret == 0 && j < b->table_size; j++) {
        uint64_t off = table[j] & QCOW2_L2E_OFFSET_MASK;
        if (off && (offset_into_cluster(img, off) || off + cs > img->file_size))
            ret = err_fail(EUCLEAN, "bitmap '%s': data cluster %#" PRIx64 " is misaligned or past the end of the file",
                           b->name, off);
        else if (off)
            ret = vfs_pread(img->file, bits + (uint64_t)j * cs, cs, off);
        else if (table[j] & 1)
            memset(bits + (uint64_t)j * cs, 0xff, cs);
    }
    free(table);
    if (ret < 0) {
        free(bits);
        return ret;
    }
    /* bits past the disk stay clear, whatever the file holds */
    if (bytes * 8 > nbits)
        bits[bytes - 1] &= (unsigned char)((1u << (nbits % 8)) - 1);
    if ((uint64_t)b->table_size * cs > bytes)
        memset(bits + bytes, 0, (size_t)((uint64_t)b->table_size * cs - bytes));
    *out = bits;
    return 0;
}

/* ---- tracking writes (the image's write lock is held) ---- */

/* Set or clear the in_use flag of a directory entry, keeping its other flags. */
static int set_in_use(struct qcow2_image *img, const struct qcow2_bitmap_info *b, bool in_use)
{
    uint32_t be;
    int ret = vfs_pread(img->file, &be, 4, b->entry_offset + 12);
    if (ret < 0)
        return ret;
    uint32_t flags = be32toh(be);
    flags = in_use ? flags | BME_FLAG_IN_USE : flags & ~BME_FLAG_IN_USE;
    be = htobe32(flags);
    return vfs_pwrite(img->file, &be, 4, b->entry_offset + 12);
}

int bitmaps_begin(struct qcow2_image *img)
{
    if (img->bm_loaded || !img->info.nb_bitmaps)
        return 0;
    int ret = bitmap_tracks(img);
    bool changed = false;
    for (uint32_t i = 0; i < img->info.nb_bitmaps && ret == 0; i++) {
        struct qcow2_bitmap_info *b = &img->bitmaps[i];
        struct bm_track *t = &img->bm[i];
        /* a bitmap left in use by a crash is stale: it stays so until removed or cleared */
        if (!b->auto_ || b->in_use || !b->consistent || t->tracking)
            continue;
        if (!t->loaded && (ret = bitmap_load_bits(img, b, &t->bits)) < 0)
            break;
        t->gran_bits = (uint32_t)__builtin_ctz(b->granularity);
        t->nbits = (img->h.size + b->granularity - 1) >> t->gran_bits;
        t->loaded = true;
        t->entry_off = b->entry_offset;
        t->tracking = true;
        /* on disk it is in use from now on: a crash leaves it stale, as it should */
        ret = set_in_use(img, b, true);
        changed = true;
    }
    if (ret == 0 && changed)
        ret = qcow2_sync(img, img->file);
    img->bm_loaded = ret == 0;
    return ret;
}

void bitmaps_mark(struct qcow2_image *img, uint64_t off, uint64_t len)
{
    if (!img->bm || !len)
        return;
    for (uint32_t i = 0; i < img->info.nb_bitmaps; i++) {
        struct bm_track *t = &img->bm[i];
        if (!t->tracking)
            continue;
        uint64_t first = off >> t->gran_bits, last = (off + len - 1) >> t->gran_bits;
        for (uint64_t k = first; k <= last && k < t->nbits; k++)
            t->bits[k / 8] |= (unsigned char)(1u << (k % 8));
    }
}

static bool all_zero(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

int bitmaps_store(struct qcow2_image *img)
{
    if (!img->bm)
        return 0;
    uint64_t cs = img->cluster_size;
    int ret = 0;
    for (uint32_t i = 0; i < img->info.nb_bitmaps && ret == 0; i++) {
        struct qcow2_bitmap_info *b = &img->bitmaps[i];
        struct bm_track *t = &img->bm[i];
        if (!t->tracking)
            continue;
        uint64_t *table;
        if ((ret = qcow2_load_u64_table(img, b->table_offset, b->table_size, &table)) < 0)
            break;
        /* data first (in place where a cluster exists, else a new one); the table
         * is written only once the data and refcounts are on disk. The entry is
         * in use meanwhile, so a crash in between leaves it stale, never wrong. */
        for (uint32_t j = 0; j < b->table_size && ret == 0; j++) {
            const unsigned char *d = t->bits + (uint64_t)j * cs;
            uint64_t off = table[j] & QCOW2_L2E_OFFSET_MASK;
            if (all_zero(d, cs)) {
                if (off)
                    ret = free_later(img, off, cs);
                table[j] = 0;
                continue;
            }
            if (!off && (ret = alloc_clusters(img, 1, &off)) < 0)
                break;
            ret = vfs_pwrite(img->file, d, cs, off);
            table[j] = off;
        }
        if (ret == 0)
            ret = rc_writeback(img);
        if (ret == 0)
            ret = qcow2_sync(img, img->file);
        if (ret == 0) {
            for (uint32_t j = 0; j < b->table_size; j++)
                table[j] = htobe64(table[j]);
            ret = overlap_check(img, b->table_offset, (uint64_t)b->table_size * 8, "bitmap table");
            if (ret == 0)
                ret = vfs_pwrite(img->file, table, (size_t)b->table_size * 8, b->table_offset);
        }
        free(table);
        if (ret == 0)
            ret = qcow2_sync(img, img->file);
        if (ret == 0)
            ret = set_in_use(img, b, false);
        if (ret == 0)
            t->tracking = false; /* stored: the cached bits stay valid for readers */
    }
    if (ret == 0)
        ret = qcow2_sync(img, img->file);
    if (ret == 0)
        img->bm_loaded = false; /* the next write takes them up again */
    return ret;
}

/* ---- the dirty query (the read lock is held) ---- */

int qcow2_bitmap_dirty(struct qcow2_image *img, const char *name, uint64_t off, uint64_t len, bool *dirty,
                       uint64_t *pnum)
{
    if (img->fmt != QCOW2_FMT_QCOW2)
        return err_fail(ENOENT, "a raw image has no bitmaps");
    pthread_rwlock_rdlock(&img->rwlock);
    int ret = 0;
    int i = bitmap_find(img, name);
    if (i < 0) {
        ret = err_fail(ENOENT, "no bitmap named '%s'", name);
        goto out;
    }
    const struct qcow2_bitmap_info *b = &img->bitmaps[i];
    if (off >= img->h.size || len == 0) {
        ret = err_fail(EINVAL, "range %" PRIu64 "+%" PRIu64 " is outside the disk (%" PRIu64 " bytes)", off, len,
                       img->h.size);
        goto out;
    }
    if (len > img->h.size - off)
        len = img->h.size - off;
    /* bm[] and the read cache are filled by readers under bm_lock; tracked bits
     * change only under the write lock, which excludes us */
    const unsigned char *bits = NULL;
    pthread_mutex_lock(&img->bm_lock);
    struct bm_track *t = img->bm ? &img->bm[i] : NULL;
    if (t && t->tracking) {
        bits = t->bits;
    } else if (b->in_use) {
        ret = err_fail(EBUSY,
                       "bitmap '%s' is in use by another program or was left so by a crash: its bits "
                       "cannot be trusted (remove or clear it)",
                       name);
    } else if (!b->consistent) {
        ret = err_fail(ENOTSUP, "bitmap '%s' has extra data this program does not know: it cannot be used", name);
    } else if ((ret = bitmap_tracks(img)) == 0) {
        t = &img->bm[i];
        if (!t->loaded && (ret = bitmap_load_bits(img, b, &t->bits)) == 0) {
            t->gran_bits = (uint32_t)__builtin_ctz(b->granularity);
            t->nbits = (img->h.size + b->granularity - 1) >> t->gran_bits;
            t->loaded = true;
        }
        bits = t->bits;
    }
    pthread_mutex_unlock(&img->bm_lock);
    if (ret < 0)
        goto out;
    unsigned gb = (unsigned)__builtin_ctz(b->granularity);
    uint64_t k = off >> gb, last = (off + len - 1) >> gb;
    bool d = bm_bit(bits, k);
    k++;
    while (k <= last) {
        /* whole bytes of the same value at once */
        if (k % 8 == 0 && k + 8 <= last + 1 && bits[k / 8] == (d ? 0xff : 0)) {
            k += 8;
            continue;
        }
        if (bm_bit(bits, k) != d)
            break;
        k++;
    }
    uint64_t end = k << gb;
    if (end > off + len || end < off) /* (the shift cannot wrap for sizes below 2^62) */
        end = off + len;
    *dirty = d;
    *pnum = end - off;
out:
    pthread_rwlock_unlock(&img->rwlock);
    return ret;
}

int qcow2_bitmap_list(struct qcow2_image *img, struct qcow2_bitmap_info **out, uint32_t *count)
{
    *out = NULL;
    *count = 0;
    if (img->fmt != QCOW2_FMT_QCOW2)
        return 0;
    pthread_rwlock_rdlock(&img->rwlock);
    uint32_t n = img->info.nb_bitmaps;
    struct qcow2_bitmap_info *l = calloc(n ? n : 1, sizeof *l);
    int ret = l ? 0 : err_fail(ENOMEM, "out of memory");
    for (uint32_t i = 0; ret == 0 && i < n; i++) {
        l[i] = img->bitmaps[i];
        if (!(l[i].name = strdup(img->bitmaps[i].name)))
            ret = err_fail(ENOMEM, "out of memory");
    }
    pthread_rwlock_unlock(&img->rwlock);
    if (ret < 0) {
        qcow2_bitmap_list_free(l, n);
        return ret;
    }
    *out = l;
    *count = n;
    return 0;
}

void qcow2_bitmap_list_free(struct qcow2_bitmap_info *list, uint32_t n)
{
    for (uint32_t i = 0; list && i < n; i++)
        free(list[i].name);
    free(list);
}
