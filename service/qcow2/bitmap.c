/* bitmap.c: the persistent bitmap directory: parsing and validating its
 * entries, loading bitmaps, tracking guest writes in the enabled ones, storing
 * them at close, and the dirty-status query. Changes are in bitmod.c. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cursor.h"
#include "qcow2_int.h"

void bitmap_window_reset(struct qcow2_image *img)
{
    free(img->bmw.table);
    free(img->bmw.data);
    img->bmw = (struct bm_window){.bitmap = -1, .data_idx = UINT32_MAX};
}

void qcow2_free_bitmaps(struct qcow2_image *img)
{
    bitmap_window_reset(img);
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
    meta_release(img, img->bitmaps_held);
    img->bitmaps_held = 0;
}

/* Bytes of one bitmap's bits in memory (whole clusters, as its table holds them). */
static uint64_t bits_bytes(const struct qcow2_image *img, uint32_t table_size)
{
    return (uint64_t)table_size << img->cluster_bits;
}

/* The error for entry j (e) of b's table that QEMU would refuse to load. */
static int entry_invalid(const struct qcow2_bitmap_info *b, uint32_t j, uint64_t e)
{
    return err_fail(EUCLEAN, "bitmap '%s': table entry %u (%#" PRIx64 ") is invalid", b->name, j, e);
}

/* Entry i of the directory: the next one of cursor d. */
static int read_entry(struct qcow2_image *img, struct cursor *d, uint32_t i, struct qcow2_bitmap_info *b)
{
    uint64_t at = cur_pos(d);
    struct cursor f, extra, name;
    if (!cur_sub(d, BME_FIXED, &f))
        return err_fail(EINVAL, "bitmap directory is truncated at entry %u (%zu bytes left, an entry needs %u)", i,
                        cur_remaining(d), BME_FIXED);
    uint64_t table_off = cur_be64(&f);
    uint32_t table_size = cur_be32(&f), flags = cur_be32(&f);
    uint8_t type = cur_u8(&f), gran_bits = cur_u8(&f);
    uint16_t name_len = cur_be16(&f);
    uint32_t extra_len = cur_be32(&f);
    if (!cur_sub(d, extra_len, &extra) || !cur_sub(d, name_len, &name) || !cur_align(d, 8))
        return err_fail(EINVAL,
                        "bitmap directory entry %u (at %#" PRIx64 ", %u bytes of extra data, a name of %u) "
                        "runs past the end of the directory",
                        i, at, extra_len, name_len);
    if (name_len == 0 || name_len > QCOW2_MAX_BITMAP_NAME)
        return err_fail(EINVAL, "bitmap %u has a name length of %u (1 to %u allowed)", i, name_len,
                        QCOW2_MAX_BITMAP_NAME);
    b->name = malloc(name_len + 1u);
    if (!b->name)
        return err_fail(ENOMEM, "out of memory");
    memcpy(b->name, cur_take(&name, name_len), name_len);
    b->name[name_len] = 0;
    if (flags & BME_RESERVED_FLAGS)
        return err_fail(EINVAL, "bitmap '%s' has reserved flags set (%#x)", b->name, flags);
    if (type != BME_TYPE_DIRTY)
        return err_fail(EINVAL, "bitmap '%s' has unknown type %u", b->name, type);
    if (gran_bits < BME_MIN_GRAN_BITS || gran_bits > BME_MAX_GRAN_BITS)
        return err_fail(EINVAL, "bitmap '%s' has granularity bits %u (%d to %d allowed)", b->name, gran_bits,
                        BME_MIN_GRAN_BITS, BME_MAX_GRAN_BITS);
    /* the table must cover exactly the bits of the virtual disk */
    uint64_t bits = (img->h.size + (1ull << gran_bits) - 1) >> gran_bits;
    uint64_t bytes = (bits + 7) / 8;
    uint64_t need = (bytes + img->cluster_size - 1) >> img->cluster_bits;
    if (table_size != need)
        return err_fail(EINVAL, "bitmap '%s' table has %u entries; the disk needs %" PRIu64, b->name, table_size, need);
    /* QEMU's caps at load: what the bits would take in memory, and the table */
    char sz[32], lim[32];
    if (bits_bytes(img, table_size) > BME_MAX_PHYS_SIZE)
        return err_fail(ENOTSUP, "bitmap '%s' needs %s of memory, more than the limit of %s (QEMU's cap)", b->name,
                        qcow2_human(bits_bytes(img, table_size), sz, sizeof sz),
                        qcow2_human(BME_MAX_PHYS_SIZE, lim, sizeof lim));
    if (table_size > BME_MAX_TABLE_SIZE)
        return err_fail(ENOTSUP, "bitmap '%s' has a table of %u entries, more than the limit of %u (QEMU's cap)",
                        b->name, table_size, BME_MAX_TABLE_SIZE);
    char what[64];
    snprintf(what, sizeof what, "table of bitmap '%.40s'", b->name);
    int ret = qcow2_check_table(img, table_off, table_size, 8, (uint64_t)BME_MAX_TABLE_SIZE * 8, what);
    /* opened for check: a table over the header or past the end is check's to count,
     * as in qemu-img's check mode (what is past the end reads as zeroes) */
    if (ret == -EINVAL && img->checking && !offset_into_cluster(img, table_off))
        ret = 0;
    if (ret < 0)
        return ret;
    b->granularity = 1u << gran_bits;
    b->in_use = flags & BME_FLAG_IN_USE;
    b->auto_ = flags & BME_FLAG_AUTO;
    b->consistent = !(extra_len && !(flags & BME_FLAG_EXTRA_COMPAT));
    b->type = type;
    b->entry_offset = img->bitmap_dir_off + at;
    b->table_offset = table_off;
    b->table_size = table_size;
    return 0;
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
    /* the directory is read whole (transient), the entries stay (charged) */
    uint64_t held = (uint64_t)n * sizeof *img->bitmaps;
    if ((ret = meta_fits(img, len + held, "the bitmap directory")) < 0)
        return ret;
    unsigned char *buf = malloc(len);
    img->bitmaps = calloc(n, sizeof *img->bitmaps);
    if (!buf || !img->bitmaps) {
        ret = err_fail(ENOMEM, "out of memory for the bitmap directory");
        goto out;
    }
    ret = vfs_pread(img->file, buf, len, img->bitmap_dir_off);
    if (ret < 0)
        goto out;
    struct cursor d = cur_init(buf, (size_t)len);
    for (uint32_t i = 0; i < n; i++) {
        struct qcow2_bitmap_info *b = &img->bitmaps[i];
        img->info.nb_bitmaps = i + 1;
        if ((ret = read_entry(img, &d, i, b)) < 0)
            goto out;
        held += strlen(b->name) + 1;
        for (uint32_t k = 0; k < i; k++)
            if (!strcmp(img->bitmaps[k].name, b->name)) {
                ret = err_fail(EINVAL, "two bitmaps are named '%s'", b->name);
                goto out;
            }
    }
    if ((ret = meta_charge(img, held, "the bitmap directory")) == 0)
        img->bitmaps_held = held;
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

int bitmap_bits_fit(struct qcow2_image *img, const char *name, uint64_t extra)
{
    uint64_t held = 0;
    for (uint32_t i = 0; img->bm && i < img->info.nb_bitmaps; i++)
        if (img->bm[i].bits)
            held += bits_bytes(img, img->bitmaps[i].table_size);
    char what[80];
    snprintf(what, sizeof what, "bitmap '%.40s'%s", name, held ? " (with the bitmaps in memory)" : "");
    return meta_fits(img, held + extra, what);
}

int bitmap_load_bits(struct qcow2_image *img, const struct qcow2_bitmap_info *b, unsigned char **out)
{
    uint64_t cs = img->cluster_size;
    unsigned gb = (unsigned)__builtin_ctz(b->granularity);
    uint64_t nbits = (img->h.size + b->granularity - 1) >> gb, bytes = (nbits + 7) / 8;
    int ret = bitmap_bits_fit(img, b->name, bits_bytes(img, b->table_size));
    if (ret < 0)
        return ret;
    unsigned char *bits = calloc(1, b->table_size ? (size_t)b->table_size * cs : 1);
    uint64_t *table = NULL;
    if (!bits)
        return err_fail(ENOMEM, "out of memory for bitmap '%s'", b->name);
    ret = qcow2_load_u64_table(img, b->table_offset, b->table_size, &table);
    for (uint32_t j = 0; ret == 0 && j < b->table_size; j++) {
        uint64_t off = table[j] & BME_TABLE_OFFSET_MASK;
        if (bme_table_entry_bad(img, table[j]))
            ret = entry_invalid(b, j, table[j]);
        else if (off && off + cs > img->file_size)
            ret = err_fail(EUCLEAN, "bitmap '%s': data cluster %#" PRIx64 " is past the end of the file",
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
            break; /* (its bits and those loaded before it must fit the budget) */
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
    bitmap_window_reset(img); /* tables and data were rewritten in place */
    if (ret == 0)
        ret = qcow2_sync(img, img->file);
    if (ret == 0)
        img->bm_loaded = false; /* the next write takes them up again */
    return ret;
}

/* ---- the dirty query (the read lock is held) ---- */

/* Entry j of bitmap bi's table, through the window (bm_lock held). */
static int window_entry(struct qcow2_image *img, int bi, uint32_t j, uint64_t *e)
{
    struct bm_window *w = &img->bmw;
    const struct qcow2_bitmap_info *b = &img->bitmaps[bi];
    if (w->bitmap != bi || j < w->first || j - w->first >= w->n) {
        if (!w->table && !(w->table = malloc(BM_WINDOW_ENTRIES * 8)))
            return err_fail(ENOMEM, "out of memory");
        if (w->bitmap != bi)
            w->data_idx = UINT32_MAX;
        w->bitmap = -1;
        uint32_t first = j - j % BM_WINDOW_ENTRIES;
        uint32_t n = b->table_size - first < BM_WINDOW_ENTRIES ? b->table_size - first : BM_WINDOW_ENTRIES;
        int ret = vfs_pread(img->file, w->table, (size_t)n * 8, b->table_offset + (uint64_t)first * 8);
        if (ret < 0)
            return ret;
        for (uint32_t k = 0; k < n; k++)
            w->table[k] = be64toh(w->table[k]);
        w->bitmap = bi;
        w->first = first;
        w->n = n;
    }
    *e = w->table[j - w->first];
    return 0;
}

/* The data cluster at host offset off, entry j of bitmap bi (bm_lock held). */
static int window_data(struct qcow2_image *img, int bi, uint32_t j, uint64_t off, const unsigned char **out)
{
    struct bm_window *w = &img->bmw;
    if (w->data_idx != j) {
        if (offset_into_cluster(img, off) || off > img->file_size || img->file_size - off < img->cluster_size)
            return err_fail(EUCLEAN,
                            "bitmap '%s': table entry %u points at %#" PRIx64 ", misaligned or past the end "
                            "of the file",
                            img->bitmaps[bi].name, j, off);
        if (!w->data && !(w->data = malloc(img->cluster_size)))
            return err_fail(ENOMEM, "out of memory");
        w->data_idx = UINT32_MAX;
        int ret = vfs_pread(img->file, w->data, img->cluster_size, off);
        if (ret < 0)
            return ret;
        w->data_idx = j;
    }
    *out = w->data;
    return 0;
}

/* The run of bits equal to d from bit k to at most bit last of a bits buffer:
 * the first bit after it. */
static uint64_t run_in(const unsigned char *bits, uint64_t k, uint64_t last, bool d)
{
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
    return k;
}

/* The run of equal bits of stored bitmap bi from bit k to at most bit last,
 * read from disk a table chunk and a cluster at a time: *d its value, the
 * return the first bit after it (or an error). All-ones and all-zero entries
 * cost no data read at all. */
static int64_t stored_run(struct qcow2_image *img, int bi, uint64_t k, uint64_t last, bool *d)
{
    uint64_t per = (uint64_t)img->cluster_size * 8; /* bits per data cluster */
    bool first = true;
    while (k <= last) {
        uint32_t j = (uint32_t)(k / per);
        uint64_t e = 0, cend = ((uint64_t)j + 1) * per - 1, stop = cend < last ? cend : last;
        int ret = window_entry(img, bi, j, &e);
        if (ret < 0)
            return ret;
        if (bme_table_entry_bad(img, e))
            return entry_invalid(&img->bitmaps[bi], j, e);
        uint64_t off = e & BME_TABLE_OFFSET_MASK;
        if (!off) {
            bool v = e & BME_TABLE_ALL_ONES;
            if (first)
                *d = v;
            else if (v != *d)
                break;
            first = false;
            k = stop + 1;
            continue;
        }
        const unsigned char *data = NULL;
        if ((ret = window_data(img, bi, j, off, &data)) < 0)
            return ret;
        uint64_t base = (uint64_t)j * per;
        if (first)
            *d = bm_bit(data, k - base);
        first = false;
        uint64_t next = base + run_in(data, k - base, stop - base, *d);
        if (next <= stop)
            return (int64_t)next;
        k = next;
    }
    return (int64_t)k;
}

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
    unsigned gb = (unsigned)__builtin_ctz(b->granularity);
    uint64_t k = off >> gb, last = (off + len - 1) >> gb, end = 0;
    bool d = false;
    /* bm[] and the window are used by readers under bm_lock; tracked bits
     * change only under the write lock, which excludes us */
    pthread_mutex_lock(&img->bm_lock);
    struct bm_track *t = img->bm ? &img->bm[i] : NULL;
    if (t && t->loaded) {
        d = bm_bit(t->bits, k);
        end = run_in(t->bits, k + 1, last, d);
    } else if (b->in_use) {
        ret = err_fail(EBUSY,
                       "bitmap '%s' is in use by another program or was left so by a crash: its bits "
                       "cannot be trusted (remove or clear it)",
                       name);
    } else if (!b->consistent) {
        ret = err_fail(ENOTSUP, "bitmap '%s' has extra data this program does not know: it cannot be used", name);
    } else {
        int64_t r = stored_run(img, i, k, last, &d);
        if (r < 0)
            ret = (int)r;
        end = (uint64_t)r;
    }
    pthread_mutex_unlock(&img->bm_lock);
    if (ret < 0)
        goto out;
    end <<= gb;
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
