/* check.c: recounting every reference in the image and comparing with the
 * stored refcounts and OFLAG_COPIED flags, judged and counted as qemu-img check
 * does; repairing leaks, wrong refcounts and flags; rebuilding broken refcounts. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"

/* Bits an entry must leave clear (docs/interop/qcow2.txt). */
#define L1E_RESERVED     0x7f000000000001ffull
#define L2E_STD_RESERVED 0x3f000000000001feull /* standard (not compressed) cluster descriptors */
#define REFT_RESERVED    0x1ffull
#define L2B_ALLOC        0x00000000ffffffffull /* extended L2: allocated subclusters */
#define L2B_ZERO         0xffffffff00000000ull /* extended L2: zero subclusters */

/* What an L2 entry describes, as qemu classifies it for check. */
enum ck_type { T_UNALLOC, T_ZERO_PLAIN, T_ZERO_ALLOC, T_NORMAL, T_COMPRESSED };

struct ck {
    struct qcow2_image *img;
    struct qcow2_check_result *r;
    uint32_t *rc;       /* references counted per host cluster */
    uint64_t n;         /* entries in rc: the file's clusters, or more (a reference just past the end) */
    bool rebuild;       /* the refcount structure itself is broken */
    unsigned char *blk; /* the last refcount block read (stored refcounts) */
    uint64_t blk_off;
    bool blk_ok;
    unsigned char *tbl; /* one cluster: the L2 table being walked */
    void (*report)(void *, const char *);
    void *ctx;
    qcow2_progress_fn progress; /* may be NULL */
    void *opaque;
    uint64_t done, total; /* progress units: L1 entries walked, refcount blocks compared */
    bool cancelled;       /* progress asked to stop */
    bool committed;       /* a repair changes refcounts from here on: no stopping halfway */
};

/* n more units done; false once the caller asked to stop. */
static bool tick(struct ck *k, uint64_t n)
{
    k->done += n;
    if (k->done > k->total) /* a repair walks the tables again */
        k->total = k->done;
    if (k->progress && !k->cancelled && k->progress(k->opaque, k->done, k->total) && !k->committed)
        k->cancelled = true;
    return !k->cancelled;
}

static void say(struct ck *k, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(struct ck *k, const char *fmt, ...)
{
    if (!k->report)
        return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    k->report(k->ctx, line);
}

static uint64_t per_block(const struct qcow2_image *img)
{
    return ((uint64_t)img->cluster_size * 8) >> img->h.refcount_order;
}

/* len bytes at off; what lies past the end of the file reads as zeroes (as
 * qemu's file driver gives them). */
static int read_zf(struct ck *k, uint64_t off, void *buf, uint64_t len)
{
    uint64_t fs = k->img->file_size, have = off >= fs ? 0 : (fs - off < len ? fs - off : len);
    memset((char *)buf + have, 0, len - have);
    return have ? vfs_pread(k->img->file, buf, have, off) : 0;
}

static int grow(struct ck *k, uint64_t want)
{
    if (want <= k->n)
        return 0;
    uint32_t *p = realloc(k->rc, want * sizeof *p);
    if (!p) {
        k->r->check_errors++;
        return err_fail(ENOMEM, "out of memory for %" PRIu64 " refcounts", want);
    }
    memset(p + k->n, 0, (want - k->n) * sizeof *p);
    k->rc = p;
    k->n = want;
    if (k->img->repair_expected) { /* the refcount cache looks at them during a repair */
        k->img->repair_expected = p;
        k->img->repair_n = want;
    }
    return 0;
}

/* One more reference to every cluster of host bytes [off, off+len). A range that
 * ends a cluster or more past the end of the file is a corruption and counts nothing. */
static int inc(struct ck *k, uint64_t off, uint64_t len)
{
    struct qcow2_image *img = k->img;
    if (!len)
        return 0;
    if (off > UINT64_MAX - len || off + len >= img->file_size + img->cluster_size) {
        say(k,
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset "
            "%#" PRIx64 " size %#" PRIx64,
            off, len);
        k->r->corruptions++;
        return 0;
    }
    uint64_t first = off >> img->cluster_bits, last = (off + len - 1) >> img->cluster_bits;
    uint64_t max = rc_max(img) < UINT32_MAX ? rc_max(img) : UINT32_MAX;
    int ret = grow(k, last + 1);
    if (ret < 0)
        return ret;
    for (uint64_t c = first; c <= last; c++) {
        if (k->rc[c] >= max) {
            say(k, "ERROR: overflow cluster offset=%#" PRIx64, c << img->cluster_bits);
            k->r->corruptions++;
            continue;
        }
        k->rc[c]++;
    }
    return 0;
}

/* The refcount the image stores for cluster c (past the table: 0). */
static int stored(struct ck *k, uint64_t c, uint64_t *v)
{
    struct qcow2_image *img = k->img;
    uint64_t pb = per_block(img), ti = c / pb;
    *v = 0;
    if (ti >= img->reftable_size)
        return 0;
    uint64_t b = img->reftable[ti] & QCOW2_REFT_OFFSET_MASK;
    if (!b)
        return 0;
    if (offset_into_cluster(img, b))
        return err_fail(EUCLEAN, "refcount block offset %#" PRIx64 " unaligned (refcount table index %" PRIu64 ")", b, ti);
    /* QEMU reads past the end of the file as zeroes, but not beyond INT64_MAX: its
     * lookup fails there, a check error for every cluster of the block */
    if (b > (uint64_t)INT64_MAX - img->cluster_size)
        return err_fail(EIO, "Input/output error");
    if (!k->blk_ok || k->blk_off != b) {
        k->blk_ok = false;
        int ret = read_zf(k, b, k->blk, img->cluster_size);
        if (ret < 0)
            return ret;
        k->blk_off = b;
        k->blk_ok = true;
    }
    *v = qcow2_refcount_entry(k->blk, c % pb, img->refcount_bits);
    return 0;
}

static enum ck_type entry_type(const struct qcow2_image *img, uint64_t e)
{
    if (e & QCOW2_OFLAG_COMPRESSED)
        return T_COMPRESSED;
    if ((e & QCOW2_OFLAG_ZERO) && !img->ext_l2)
        return e & QCOW2_L2E_OFFSET_MASK ? T_ZERO_ALLOC : T_ZERO_PLAIN;
    if (!(e & QCOW2_L2E_OFFSET_MASK)) /* offset 0 is data only in an external data file, flagged COPIED */
        return img->data != img->file && (e & QCOW2_OFLAG_COPIED) ? T_NORMAL : T_UNALLOC;
    return T_NORMAL;
}

static uint64_t get_be(const unsigned char *p)
{
    return be64_at(p);
}

static void put_be(unsigned char *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, 8);
}

/* -r all: a misaligned cluster that holds no data becomes a plain zero cluster. */
static int zero_misaligned(struct ck *k, uint64_t l2off, uint32_t i)
{
    struct qcow2_image *img = k->img;
    unsigned esz = 8 * img->l2_entry_words;
    unsigned char *p = k->tbl + (uint64_t)i * esz;
    if (img->ext_l2) {
        uint64_t bm = get_be(p + 8);
        put_be(p, 0);
        put_be(p + 8, (bm | bm << 32) & L2B_ZERO);
    } else {
        put_be(p, QCOW2_OFLAG_ZERO);
    }
    int ret = vfs_pwrite(img->file, p, esz, l2off + (uint64_t)i * esz);
    l2_cache_forget(img, l2off);
    if (ret < 0) {
        say(k, "ERROR: Failed to overwrite L2 table entry: %s", err_msg(ret));
        k->r->check_errors++;
        return ret;
    }
    k->r->corruptions--;
    k->r->corruptions_fixed++;
    return 0;
}

/* Count what one L2 table references; `active` adds fragmentation statistics. */
static int walk_l2(struct ck *k, uint64_t l2off, bool active, enum qcow2_repair fix)
{
    struct qcow2_image *img = k->img;
    struct qcow2_check_result *r = k->r;
    uint64_t cs = img->cluster_size, next_contig = 0;
    int ret = read_zf(k, l2off, k->tbl, cs);
    if (ret < 0) {
        say(k, "ERROR: I/O error in check_refcounts_l2");
        r->check_errors++;
        return ret;
    }
    for (uint32_t i = 0; i < img->l2_entries; i++) {
        const unsigned char *p = k->tbl + (uint64_t)i * 8 * img->l2_entry_words;
        uint64_t e = get_be(p), bm = img->ext_l2 ? get_be(p + 8) : 0;
        enum ck_type t = entry_type(img, e);
        if (t != T_COMPRESSED && (e & L2E_STD_RESERVED)) {
            say(k, "ERROR found l2 entry with reserved bits set: %" PRIx64, e);
            r->corruptions++;
        }
        if (t == T_COMPRESSED) {
            if (e & QCOW2_OFLAG_COPIED) {
                say(k, "ERROR: coffset=%#" PRIx64 ": copied flag must never be set for compressed clusters",
                    e & img->coffset_mask);
                e &= ~QCOW2_OFLAG_COPIED;
                r->corruptions++;
            }
            if (img->data != img->file) {
                say(k, "ERROR compressed cluster %u with data file, entry=%#" PRIx64, i, e);
                r->corruptions++;
                continue;
            }
            if (bm) {
                say(k, "ERROR compressed cluster %u with non-zero subcluster allocation bitmap, entry=%#" PRIx64, i, e);
                r->corruptions++;
                continue;
            }
            uint64_t coff = e & img->coffset_mask;
            uint64_t nsec = ((e >> img->csize_shift) & img->csize_mask) + 1;
            if ((ret = inc(k, coff, nsec * QCOW2_COMPRESSED_SECTOR - (coff & (QCOW2_COMPRESSED_SECTOR - 1)))) < 0)
                return ret;
            if (active) {
                r->allocated_clusters++;
                r->compressed_clusters++;
                r->fragmented_clusters++; /* as qemu-img: compressed clusters are fragmented by nature */
            }
        } else if (t == T_NORMAL || t == T_ZERO_ALLOC) {
            uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
            if ((bm >> 32) & bm) {
                say(k, "ERROR offset=%" PRIx64 ": Allocated cluster has corrupted subcluster allocation bitmap", off);
                r->corruptions++;
            }
            if (offset_into_cluster(img, off)) {
                bool data = img->ext_l2 ? (bm & L2B_ALLOC) != 0 : !(e & QCOW2_OFLAG_ZERO);
                r->corruptions++;
                if (!data) {
                    say(k, "%s offset=%" PRIx64 ": Preallocated cluster is not properly aligned; L2 entry corrupted.",
                        fix == QCOW2_REPAIR_ALL ? "Repairing" : "ERROR", off);
                    if (fix == QCOW2_REPAIR_ALL && zero_misaligned(k, l2off, i) == 0)
                        continue; /* unused now: counts nothing */
                } else {
                    say(k, "ERROR offset=%" PRIx64 ": Data cluster is not properly aligned; L2 entry corrupted.", off);
                }
            }
            if (active) {
                r->allocated_clusters++;
                if (next_contig && off != next_contig)
                    r->fragmented_clusters++;
                next_contig = off + cs;
            }
            if (img->data == img->file && (ret = inc(k, off, cs)) < 0)
                return ret;
        } else if (t == T_UNALLOC && (bm & L2B_ALLOC)) {
            say(k, "ERROR: Unallocated cluster has non-zero subcluster allocation map");
            r->corruptions++;
        }
    }
    return 0;
}

/* Count an L1 table, its L2 tables and what they reference. */
static int walk_l1(struct ck *k, uint64_t l1off, uint32_t l1size, bool active, enum qcow2_repair fix)
{
    struct qcow2_image *img = k->img;
    if (!l1size)
        return 0;
    int ret = inc(k, l1off, (uint64_t)l1size * 8);
    if (ret < 0)
        return ret;
    uint64_t *l1 = malloc((uint64_t)l1size * 8);
    if (!l1) {
        k->r->check_errors++;
        return err_fail(ENOMEM, "out of memory for an L1 table of %u entries", l1size);
    }
    if ((ret = read_zf(k, l1off, l1, (uint64_t)l1size * 8)) < 0) {
        say(k, "ERROR: I/O error in check_refcounts_l1");
        k->r->check_errors++;
        goto out;
    }
    uint64_t walked = 0;
    for (uint32_t i = 0; i < l1size; i++) {
        uint64_t e = be64toh(l1[i]);
        if (!e)
            continue;
        if (!tick(k, i + 1 - walked)) /* an L2 table is the unit of work */
            goto out;
        walked = i + 1;
        if (e & L1E_RESERVED) {
            say(k, "ERROR found L1 entry with reserved bits set: %" PRIx64, e);
            k->r->corruptions++;
        }
        uint64_t l2off = e & QCOW2_L1E_OFFSET_MASK;
        if ((ret = inc(k, l2off, img->cluster_size)) < 0)
            goto out;
        if (offset_into_cluster(img, l2off)) {
            say(k, "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 entry corrupted", l2off);
            k->r->corruptions++;
        }
        if ((ret = walk_l2(k, l2off, active, fix)) < 0)
            goto out;
    }
    tick(k, l1size - walked);
out:
    free(l1);
    return ret;
}

static int walk_bitmaps(struct ck *k)
{
    struct qcow2_image *img = k->img;
    if (!img->info.nb_bitmaps)
        return 0;
    int ret = inc(k, img->bitmap_dir_off, img->bitmap_dir_size);
    for (uint32_t i = 0; ret == 0 && i < img->info.nb_bitmaps; i++) {
        const struct qcow2_bitmap_info *b = &img->bitmaps[i];
        uint64_t *t;
        if ((ret = inc(k, b->table_offset, (uint64_t)b->table_size * 8)) < 0)
            break;
        if (qcow2_load_u64_table(img, b->table_offset, b->table_size, &t) < 0) {
            k->r->corruptions++;
            break;
        }
        for (uint32_t j = 0; ret == 0 && j < b->table_size; j++) {
            uint64_t off = t[j] & BME_TABLE_OFFSET_MASK;
            if (bme_table_entry_bad(img, t[j])) {
                if (!b->in_use) /* qemu refuses to open the image then: its bits would be loaded */
                    ret = err_fail(EINVAL, "bitmap '%s': table entry %u (%#" PRIx64 ") is invalid", b->name, j, t[j]);
                k->r->corruptions++;
                continue;
            }
            if (off)
                ret = inc(k, off, img->cluster_size);
        }
        free(t);
    }
    return ret;
}

/* The refcount blocks: each must be aligned, inside the file and used once. -r all
 * grows the file over a block past its end. */
static int walk_refblocks(struct ck *k, enum qcow2_repair fix)
{
    struct qcow2_image *img = k->img;
    struct qcow2_check_result *r = k->r;
    uint64_t cs = img->cluster_size;
    int ret;
    for (uint32_t i = 0; i < img->reftable_size; i++) {
        uint64_t e = img->reftable[i], off = e & QCOW2_REFT_OFFSET_MASK, c = off >> img->cluster_bits;
        if (e & REFT_RESERVED) {
            say(k, "ERROR refcount table entry %u has reserved bits set", i);
            r->corruptions++;
            k->rebuild = true;
            continue;
        }
        if (offset_into_cluster(img, off)) {
            say(k, "ERROR refcount block %u is not cluster aligned; refcount table entry corrupted", i);
            r->corruptions++;
            k->rebuild = true;
            continue;
        }
        if (c >= k->n) {
            r->corruptions++;
            say(k, "%s refcount block %u is outside image", fix == QCOW2_REPAIR_ALL ? "Repairing" : "ERROR", i);
            if (fix != QCOW2_REPAIR_ALL)
                continue;
            if (off > UINT64_MAX - cs) {
                ret = err_fail(EINVAL, "refcount block offset %#" PRIx64 " too large", off);
            } else if ((ret = vfs_truncate(img->file, off + cs)) == 0) {
                img->file_size = off + cs;
                if ((ret = grow(k, size_to_clusters(img, img->file_size))) < 0)
                    return ret;
                r->corruptions--;
                r->corruptions_fixed++;
                if ((ret = inc(k, off, cs)) < 0)
                    return ret;
                continue; /* a new zeroed cluster: used exactly once */
            }
            k->rebuild = true;
            say(k, "ERROR could not resize image: %s", err_msg(ret));
            continue;
        }
        if (!off)
            continue;
        if ((ret = inc(k, off, cs)) < 0)
            return ret;
        if (k->rc[c] != 1) {
            say(k, "ERROR refcount block %u refcount=%u", i, k->rc[c]);
            r->corruptions++;
            k->rebuild = true;
        }
    }
    return 0;
}

/* Version 3 wants at least 16 bytes of extra data in each snapshot table entry
 * (the large VM state size and the disk size); qemu-img counts a shorter one, and
 * its -r all writes the table anew (refcounts are right by then). */
static int check_snapshot_entries(struct ck *k, enum qcow2_repair fix)
{
    struct qcow2_image *img = k->img;
    if (img->h.version < 3 || !img->nb_snaps || !img->snap_table_len)
        return 0;
    unsigned char *t = malloc(img->snap_table_len);
    if (!t) {
        k->r->check_errors++;
        return err_fail(ENOMEM, "out of memory for the snapshot table");
    }
    int ret = read_zf(k, img->h.snapshots_offset, t, img->snap_table_len);
    uint64_t at = 0, incomplete = 0;
    for (uint32_t i = 0; ret == 0 && i < img->nb_snaps && at + 40 <= img->snap_table_len; i++) {
        uint32_t extra = be32_at(t + at + 36);
        uint64_t len = 40 + (uint64_t)extra + be16_at(t + at + 12) + be16_at(t + at + 14);
        if (extra < 16) {
            say(k, "%s snapshot table entry %u is incomplete", fix == QCOW2_REPAIR_ALL ? "Repairing" : "ERROR", i);
            k->r->corruptions++;
            incomplete++;
        }
        at += (len + 7) & ~7ull;
    }
    free(t);
    if (ret == 0 && incomplete && fix == QCOW2_REPAIR_ALL) {
        if ((ret = qcow2_snapshot_table_rewrite(img)) < 0) {
            say(k, "ERROR could not write the snapshot table: %s", err_msg(ret));
            return ret;
        }
        k->r->corruptions -= incomplete;
        k->r->corruptions_fixed += incomplete;
    }
    return ret;
}

/* Every reference in the image, counted into k->rc, as qemu-img orders them. */
static int count_refs(struct ck *k, enum qcow2_repair fix)
{
    struct qcow2_image *img = k->img;
    int ret;
    if ((ret = inc(k, 0, img->cluster_size)) < 0) /* the header */
        return ret;
    if ((ret = walk_l1(k, img->h.l1_table_offset, img->h.l1_size, true, fix)) < 0 || k->cancelled)
        return ret;
    if (img->data != img->file && img->nb_snaps) {
        say(k, "ERROR %u snapshots in image with data file", img->nb_snaps);
        k->r->corruptions++;
    }
    for (uint32_t i = 0; i < img->nb_snaps; i++) {
        const struct qcow2_snapshot_info *s = &img->snaps[i];
        if (offset_into_cluster(img, s->l1_offset)) {
            say(k, "ERROR snapshot %u: L1 table at %#" PRIx64 " is not cluster aligned; snapshot table entry corrupted",
                i, s->l1_offset);
            k->r->corruptions++;
            continue;
        }
        if (s->l1_size > QCOW2_MAX_L1_BYTES / 8) {
            say(k, "ERROR snapshot %u: L1 table is too large; snapshot table entry corrupted", i);
            k->r->corruptions++;
            continue;
        }
        if ((ret = walk_l1(k, s->l1_offset, s->l1_size, false, fix)) < 0 || k->cancelled)
            return ret;
    }
    if ((ret = inc(k, img->h.snapshots_offset, img->nb_snaps ? img->snap_table_len : 0)) < 0 ||
        (ret = inc(k, img->h.refcount_table_offset, (uint64_t)img->reftable_size * 8)) < 0 ||
        (ret = inc(k, img->crypto_off, img->crypto_len)) < 0 || (ret = walk_bitmaps(k)) < 0)
        return ret;
    return walk_refblocks(k, fix);
}

/* Stored refcounts against counted ones; fix: leaks, or everything, through the
 * refcount cache. A stored 0 where there are references asks for a rebuild. */
static int compare(struct ck *k, enum qcow2_repair fix, uint64_t *highest)
{
    struct qcow2_image *img = k->img;
    struct qcow2_check_result *r = k->r;
    uint64_t pb = per_block(img);
    *highest = 0;
    for (uint64_t c = 0; c < k->n; c++) {
        if (c % pb == 0 && !tick(k, 1) && !fix)
            return err_fail(ECANCELED, "check cancelled");
        uint64_t have, want = k->rc[c];
        int ret = stored(k, c, &have);
        if (ret < 0) {
            say(k, "Can't get refcount for cluster %" PRIu64 ": %s", c, err_msg(ret));
            r->check_errors++;
            continue;
        }
        if (have || want)
            *highest = c;
        if (have == want)
            continue;
        uint64_t *fixed = NULL;
        if (!have)
            k->rebuild = true;
        else if (have > want && fix != QCOW2_REPAIR_NONE)
            fixed = &r->leaks_fixed;
        else if (have < want && fix == QCOW2_REPAIR_ALL)
            fixed = &r->corruptions_fixed;
        say(k, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
            fixed         ? "Repairing"
            : have < want ? "ERROR"
                          : "Leaked",
            c, have, want);
        if (fixed && rc_set(img, c, want) == 0) {
            (*fixed)++;
            continue;
        }
        if (have < want)
            r->corruptions++;
        else
            r->leaks++;
    }
    return 0;
}

/* New refcount blocks and table at the end of the file, from the counted
 * refcounts; the old structure is left behind as leaked clusters. */
static int rebuild(struct ck *k)
{
    struct qcow2_image *img = k->img;
    uint64_t cs = img->cluster_size, pb = per_block(img), base = k->n, nb = 0, nt = 0;
    for (;;) { /* blocks covering everything up to and including themselves and the table */
        uint64_t b = (base + nb + nt + pb - 1) / pb, t = (b * 8 + cs - 1) / cs;
        if (b == nb && t == nt)
            break;
        nb = b;
        nt = t;
    }
    if (nt * cs / 8 > QCOW2_MAX_REFTABLE_BYTES / 8)
        return err_fail(EOVERFLOW, "a refcount table for %" PRIu64 " clusters is too large", base + nb + nt);
    int ret = grow(k, base + nb + nt);
    if (ret < 0)
        return ret;
    for (uint64_t c = base; c < k->n; c++)
        k->rc[c] = 1;
    uint32_t entries = (uint32_t)(nt * cs / 8);
    uint64_t *tab = calloc(entries, 8);
    unsigned char *buf = malloc(cs);
    if (!tab || !buf) {
        ret = err_fail(ENOMEM, "out of memory for a new refcount structure");
        goto out;
    }
    for (uint64_t b = 0; b < nb; b++) {
        memset(buf, 0, cs);
        for (uint64_t j = 0; j < pb && b * pb + j < k->n; j++)
            qcow2_refcount_entry_set(buf, j, img->refcount_bits, k->rc[b * pb + j]);
        tab[b] = (base + b) * cs;
        if ((ret = vfs_pwrite(img->file, buf, cs, tab[b])) < 0)
            goto out;
    }
    for (uint32_t i = 0; i < entries; i++)
        tab[i] = htobe64(tab[i]);
    uint64_t toff = (base + nb) * cs;
    if ((ret = vfs_pwrite(img->file, tab, nt * cs, toff)) < 0 || (ret = qcow2_sync(img, img->file)) < 0)
        goto out;
    img->file_size = toff + nt * cs;
    if ((ret = header_write(img, 48, toff, 8)) < 0 || (ret = header_write(img, 56, nt, 4)) < 0)
        goto out;
    for (uint32_t i = 0; i < entries; i++)
        tab[i] = be64toh(tab[i]);
    free(img->reftable);
    img->reftable = tab;
    tab = NULL;
    img->reftable_size = entries;
    img->h.refcount_table_offset = toff;
    img->h.refcount_table_clusters = (uint32_t)nt;
    rc_cache_drop(img);
    k->blk_ok = false;
out:
    free(tab);
    free(buf);
    return ret;
}

/* OFLAG_COPIED must be set exactly where the stored refcount is one (active tables). */
static int check_copied(struct ck *k, enum qcow2_repair fix)
{
    struct qcow2_image *img = k->img;
    struct qcow2_check_result *r = k->r;
    const char *verb = fix == QCOW2_REPAIR_ALL ? "Repairing" : "ERROR";
    unsigned esz = 8 * img->l2_entry_words;
    int ret;
    for (uint32_t i = 0; i < img->l1_size; i++) {
        uint64_t l1e = img->l1[i], l2off = l1e & QCOW2_L1E_OFFSET_MASK, rc;
        if (!l2off || stored(k, l2off >> img->cluster_bits, &rc) < 0)
            continue;
        if ((rc == 1) != !!(l1e & QCOW2_OFLAG_COPIED)) {
            say(k, "%s OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" PRIx64 " refcount=%" PRIu64, verb, i, l1e, rc);
            r->corruptions++;
            if (fix == QCOW2_REPAIR_ALL) {
                img->l1[i] = rc == 1 ? l1e | QCOW2_OFLAG_COPIED : l1e & ~QCOW2_OFLAG_COPIED;
                unsigned char be[8];
                put_be(be, img->l1[i]);
                if ((ret = vfs_pwrite(img->file, be, 8, img->h.l1_table_offset + (uint64_t)i * 8)) < 0) {
                    r->check_errors++;
                    return ret;
                }
                r->corruptions--;
                r->corruptions_fixed++;
            }
        }
        if ((ret = read_zf(k, l2off, k->tbl, img->cluster_size)) < 0) {
            say(k, "ERROR: Could not read L2 table: %s", err_msg(ret));
            r->check_errors++;
            return ret;
        }
        uint64_t dirty = 0;
        for (uint32_t j = 0; j < img->l2_entries; j++) {
            unsigned char *p = k->tbl + (uint64_t)j * esz;
            uint64_t e = get_be(p);
            enum ck_type t = entry_type(img, e);
            if (t != T_NORMAL && t != T_ZERO_ALLOC)
                continue;
            rc = 1; /* external data: every cluster is used once */
            if (img->data == img->file && stored(k, (e & QCOW2_L2E_OFFSET_MASK) >> img->cluster_bits, &rc) < 0)
                continue;
            if ((rc == 1) == !!(e & QCOW2_OFLAG_COPIED))
                continue;
            say(k, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64, verb, e, rc);
            r->corruptions++;
            if (fix == QCOW2_REPAIR_ALL) {
                put_be(p, rc == 1 ? e | QCOW2_OFLAG_COPIED : e & ~QCOW2_OFLAG_COPIED);
                dirty++;
            }
        }
        if (!dirty)
            continue;
        if ((ret = overlap_check(img, l2off, img->cluster_size, "L2 table")) < 0 ||
            (ret = vfs_pwrite(img->file, k->tbl, img->cluster_size, l2off)) < 0) {
            say(k, "ERROR: Could not write L2 table: %s", err_msg(ret));
            r->check_errors++;
            return ret;
        }
        l2_cache_forget(img, l2off);
        r->corruptions -= dirty;
        r->corruptions_fixed += dirty;
    }
    return 0;
}

/* Repair in qemu-img's order once the stored refcounts were compared (r holds
 * what that found, pre what count_refs alone found). */
static int repair_refcounts(struct ck *k, enum qcow2_repair repair, const struct qcow2_check_result *pre,
                            uint64_t *highest)
{
    struct qcow2_check_result *r = k->r;
    int ret;
    if (k->rebuild && repair == QCOW2_REPAIR_ALL) {
        struct qcow2_check_result old = *r;
        say(k, "Rebuilding refcount structure");
        if ((ret = rebuild(k)) < 0) {
            r->check_errors++;
            return ret;
        }
        r->corruptions = r->leaks = 0;
        k->rebuild = false;
        memset(k->rc, 0, k->n * sizeof *k->rc);
        if ((ret = count_refs(k, QCOW2_REPAIR_NONE)) < 0)
            return ret;
        /* the old structure is leaked now: drop it; only leaks that stay count */
        struct qcow2_check_result saved = *r;
        memset(r, 0, sizeof *r);
        if ((ret = compare(k, QCOW2_REPAIR_LEAKS, highest)) < 0)
            return ret;
        if (k->rebuild)
            say(k, "ERROR rebuilt refcount structure is still broken");
        uint64_t fresh = r->leaks;
        *r = saved;
        r->allocated_clusters = old.allocated_clusters;
        r->fragmented_clusters = old.fragmented_clusters;
        r->compressed_clusters = old.compressed_clusters;
        if (r->corruptions < old.corruptions)
            r->corruptions_fixed += old.corruptions - r->corruptions;
        if (r->leaks < old.leaks)
            r->leaks_fixed += old.leaks - r->leaks;
        r->leaks += fresh;
        return 0;
    }
    if (k->rebuild) {
        say(k, "ERROR need to rebuild refcount structures");
        r->check_errors++;
        return err_fail(EUCLEAN, "the refcount structure is broken: only check -r all can rebuild it");
    }
    if (!r->leaks && !r->corruptions)
        return 0;
    *r = *pre;
    return compare(k, repair, highest);
}

int qcow2_check(struct qcow2_image *img, enum qcow2_repair repair, struct qcow2_check_result *r,
                void (*report)(void *ctx, const char *line), void *ctx)
{
    return qcow2_check_progress(img, repair, r, report, ctx, NULL, NULL);
}

int qcow2_check_progress(struct qcow2_image *img, enum qcow2_repair repair, struct qcow2_check_result *r,
                         void (*report)(void *ctx, const char *line), void *ctx, qcow2_progress_fn progress,
                         void *opaque)
{
    memset(r, 0, sizeof *r);
    if (img->fmt != QCOW2_FMT_QCOW2)
        return err_fail(ENOTSUP, "only qcow2 images can be checked");
    if (repair && !img->rw)
        return err_fail(EROFS, "repair needs the image open read-write");
    if (img->h.crypt_method) /* qemu-img cannot open one without its key either */
        return err_fail(ENOTSUP, "encrypted images cannot be checked without their key");
    struct ck k = {.img = img, .r = r, .report = report, .ctx = ctx, .progress = progress, .opaque = opaque};
    k.n = size_to_clusters(img, img->file_size);
    k.rc = calloc(k.n ? k.n : 1, sizeof *k.rc);
    k.blk = malloc(img->cluster_size);
    k.tbl = malloc(img->cluster_size);
    int ret = 0;
    if (!k.rc || !k.blk || !k.tbl) {
        free(k.rc);
        free(k.blk);
        free(k.tbl);
        return err_fail(ENOMEM, "out of memory for %" PRIu64 " refcounts", k.n);
    }
    if (img->rw)
        pthread_rwlock_wrlock(&img->rwlock);
    if (repair) {
        img->unsynced = true;
        qcow2_note_change(img, true); /* refcounts, and maybe snapshot tables */
    }
    if (img->rw && (ret = meta_flush(img)) < 0)
        goto out;
    r->total_clusters = size_to_clusters(img, img->h.size);
    k.total = img->h.l1_size + k.n / per_block(img) + 1;
    for (uint32_t i = 0; i < img->nb_snaps; i++)
        k.total += img->snaps[i].l1_size;

    ret = count_refs(&k, repair);
    if (ret == 0 && k.cancelled)
        ret = err_fail(ECANCELED, "check cancelled");
    if (ret < 0)
        goto out;
    struct qcow2_check_result pre = *r;
    uint64_t highest = 0;
    if ((ret = compare(&k, QCOW2_REPAIR_NONE, &highest)) < 0)
        goto out;
    if (repair) {
        k.committed = true;
        img->repair_expected = k.rc; /* new refcount blocks stay off used clusters */
        img->repair_n = k.n;
        ret = repair_refcounts(&k, repair, &pre, &highest);
        img->repair_expected = NULL;
        if (ret < 0 || (ret = rc_writeback(img)) < 0 || (ret = meta_flush(img)) < 0)
            goto out;
        k.blk_ok = false;
    }
    r->image_end_offset = (highest + 1) << img->cluster_bits;
    if ((ret = check_copied(&k, repair)) < 0 || (ret = check_snapshot_entries(&k, repair)) < 0)
        goto out;
    if (repair) {
        if ((ret = meta_flush(img)) < 0 || (ret = rc_writeback(img)) < 0 || (ret = qcow2_sync(img, img->file)) < 0)
            goto out;
        if (!r->corruptions && !r->check_errors && (img->h.incompatible_features & QCOW2_INCOMPAT_CORRUPT)) {
            img->h.incompatible_features &= ~QCOW2_INCOMPAT_CORRUPT;
            img->info.corrupt = false;
            img->broken = false;
            if ((ret = header_write(img, 72, img->h.incompatible_features, 8)) < 0)
                goto out;
        }
        /* refcounts now right (nothing left unfixed): a dirty image is clean
         * again, as after QEMU's repair; this handle did not set the bit itself */
        if (!r->corruptions && !r->check_errors && (img->h.incompatible_features & QCOW2_INCOMPAT_DIRTY) &&
            !img->set_dirty_bit) {
            img->h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
            img->info.dirty = false;
            if ((ret = header_write(img, 72, img->h.incompatible_features, 8)) < 0)
                goto out;
        }
    }
out:
    img->repair_expected = NULL;
    if (img->rw)
        pthread_rwlock_unlock(&img->rwlock);
    free(k.rc);
    free(k.blk);
    free(k.tbl);
    return ret;
}

int qcow2_repair_refcounts(struct qcow2_image *img)
{
    struct qcow2_check_result r;
    /* called from open, before anyone else holds the image */
    int ret = qcow2_check(img, QCOW2_REPAIR_ALL, &r, NULL, NULL);
    if (ret < 0)
        return ret;
    if (r.corruptions)
        return err_fail(EUCLEAN, "%" PRIu64 " corruptions remain after rebuilding the refcounts", r.corruptions);
    if (img->h.incompatible_features & QCOW2_INCOMPAT_DIRTY) {
        img->h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
        img->info.dirty = false;
        ret = header_write(img, 72, img->h.incompatible_features, 8);
    }
    return ret;
}
