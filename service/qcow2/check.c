/* check.c: recounting every reference in the image and comparing with the
 * stored refcounts and OFLAG_COPIED flags, as qemu-img check does; repairing
 * leaks, wrong refcounts and flags; rebuilding refcounts of dirty images. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"

struct ck {
    struct qcow2_image *img;
    struct qcow2_check_result *r;
    uint32_t *expected; /* references per host cluster */
    uint64_t n;         /* clusters in the file */
    void (*report)(void *, const char *);
    void *ctx;
    qcow2_progress_fn progress; /* may be NULL */
    void *opaque;
    uint64_t done, total;       /* progress units: L1 entries walked, refcount blocks compared */
    bool cancelled;             /* progress asked to stop */
    unsigned char *seen;        /* refcount blocks met past the file's end, one bit per cluster */
    unsigned char *scratch;     /* one cluster, for reading a block of a read-only image */
};

/* n more units done; false once the caller asked to stop. */
static bool tick(struct ck *k, uint64_t n)
{
    k->done += n;
    if (k->progress && !k->cancelled && k->progress(k->opaque, k->done, k->total))
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

/* One more reference to every cluster of host bytes [off, off+len). */
static void ref(struct ck *k, uint64_t off, uint64_t len, const char *what)
{
    if (!len)
        return;
    uint64_t first = off >> k->img->cluster_bits, last = (off + len - 1) >> k->img->cluster_bits;
    for (uint64_t c = first; c <= last; c++) {
        if (c >= k->n) {
            say(k, "ERROR %s at %#" PRIx64 " is past the end of the image file", what, off);
            k->r->corruptions++;
            return;
        }
        if (k->expected[c] < UINT32_MAX)
            k->expected[c]++;
    }
}

static uint64_t stored_rc(struct ck *k, uint64_t c)
{
    uint64_t v = 0;
    int ret = k->img->rw ? rc_get(k->img, c, &v) : qcow2_get_refcount(k->img, c, &v);
    if (ret < 0) {
        say(k, "ERROR cannot read the refcount of cluster %" PRIu64 ": %s", c, err_msg(ret));
        k->r->check_errors++;
        return 0;
    }
    return v;
}

/* Whether the compare loop may skip the refcount block at off, which covers
 * only clusters past the end of the file: it holds no refcount, or it was met
 * there already (one refcount block named by many table entries would otherwise
 * cost a full pass each: a CPU bomb in a small file), or it cannot be read (one
 * error for the block, not one per cluster). */
static bool skip_past_block(struct ck *k, uint64_t off)
{
    struct qcow2_image *img = k->img;
    uint64_t idx = off >> img->cluster_bits;
    if (!offset_into_cluster(img, off) && idx < k->n) {
        if (!k->seen && !(k->seen = calloc((size_t)(k->n / 8 + 1), 1)))
            return false;
        if (k->seen[idx / 8] & (1u << (idx % 8)))
            return true;
        k->seen[idx / 8] |= (unsigned char)(1u << (idx % 8));
    }
    const unsigned char *p = NULL;
    int ret;
    if (img->rw) {
        ret = rc_block(img, off, &p); /* the cache: it may hold this check's repairs */
    } else {
        if (!k->scratch && !(k->scratch = malloc(img->cluster_size)))
            return false;
        ret = off + img->cluster_size > img->file_size
                  ? err_fail(EIO, "refcount block at %#" PRIx64 " is past the end of the file", off)
                  : vfs_pread(img->file, k->scratch, img->cluster_size, off);
        p = k->scratch;
    }
    if (ret < 0) {
        say(k, "ERROR cannot read the refcount block at %#" PRIx64 ": %s", off, err_msg(ret));
        k->r->check_errors++;
        return true;
    }
    return p[0] == 0 && !memcmp(p, p + 1, img->cluster_size - 1);
}

/* Walk one L2 table; `active` adds fragmentation statistics. */
static int walk_l2(struct ck *k, uint64_t l2off, bool active, uint64_t *next_contig)
{
    struct qcow2_image *img = k->img;
    uint64_t cs = img->cluster_size;
    uint64_t *t;
    int ret = qcow2_load_u64_table(img, l2off, (uint32_t)(cs / 8), &t);
    if (ret < 0) {
        k->r->check_errors++;
        say(k, "ERROR reading L2 table at %#" PRIx64 ": %s", l2off, err_msg(ret));
        return 0;
    }
    for (uint32_t i = 0; i < img->l2_entries; i++) {
        uint64_t e = t[i * img->l2_entry_words];
        uint64_t bitmap = img->ext_l2 ? t[i * 2 + 1] : 0;
        if (e & QCOW2_OFLAG_COMPRESSED) {
            if (img->data != img->file) {
                say(k, "ERROR compressed cluster in an image with an external data file (L2 %#" PRIx64 ")", l2off);
                k->r->corruptions++;
                continue;
            }
            uint64_t coff = e & img->coffset_mask;
            uint64_t nsec = ((e >> img->csize_shift) & img->csize_mask) + 1;
            ref(k, coff & ~(uint64_t)(QCOW2_COMPRESSED_SECTOR - 1), nsec * QCOW2_COMPRESSED_SECTOR, "compressed cluster");
            if (active) {
                k->r->allocated_clusters++;
                k->r->compressed_clusters++;
                k->r->fragmented_clusters++;
            }
            continue;
        }
        uint64_t host = e & QCOW2_L2E_OFFSET_MASK;
        if (img->ext_l2 && ((bitmap >> 32) & bitmap)) {
            say(k, "ERROR invalid subcluster bitmap %#" PRIx64 " in L2 table at %#" PRIx64, bitmap, l2off);
            k->r->corruptions++;
        }
        if (!host)
            continue;
        if (offset_into_cluster(img, host)) {
            say(k, "ERROR data cluster offset %#" PRIx64 " is not cluster aligned (L2 %#" PRIx64 ")", host, l2off);
            k->r->corruptions++;
            continue;
        }
        if (active) {
            k->r->allocated_clusters++;
            if (*next_contig && host != *next_contig)
                k->r->fragmented_clusters++;
            *next_contig = host + cs;
        }
        if (img->data == img->file)
            ref(k, host, cs, "data cluster");
    }
    free(t);
    return 0;
}

static void walk_l1(struct ck *k, uint64_t l1off, uint32_t l1size, bool active)
{
    struct qcow2_image *img = k->img;
    uint64_t *l1;
    ref(k, l1off, (uint64_t)l1size * 8, "L1 table");
    if (active) {
        l1 = img->l1; /* what the engine uses (and writes) */
    } else if (qcow2_load_u64_table(img, l1off, l1size, &l1) < 0) {
        k->r->check_errors++;
        return;
    }
    uint64_t next_contig = 0, walked = 0;
    for (uint32_t i = 0; i < l1size; i++) {
        uint64_t l2off = l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (!l2off)
            continue;
        if (!tick(k, i + 1 - walked)) /* an L2 table is the unit of work */
            break;
        walked = i + 1;
        if (offset_into_cluster(img, l2off) || l2off + img->cluster_size > img->file_size) {
            say(k, "ERROR L2 table offset %#" PRIx64 " (L1 index %u) is misaligned or past the end", l2off, i);
            k->r->corruptions++;
            continue;
        }
        ref(k, l2off, img->cluster_size, "L2 table");
        next_contig = 0; /* as qemu-img: fragmentation is counted within an L2 table */
        walk_l2(k, l2off, active, &next_contig);
    }
    if (!k->cancelled)
        tick(k, l1size - walked);
    if (!active)
        free(l1);
}

static void walk_bitmaps(struct ck *k)
{
    struct qcow2_image *img = k->img;
    if (!img->info.nb_bitmaps)
        return;
    ref(k, img->bitmap_dir_off, img->bitmap_dir_size, "bitmap directory");
    for (uint32_t i = 0; i < img->info.nb_bitmaps; i++) {
        const struct qcow2_bitmap_info *b = &img->bitmaps[i];
        uint64_t *t;
        ref(k, b->table_offset, (uint64_t)b->table_size * 8, "bitmap table");
        if (qcow2_load_u64_table(img, b->table_offset, b->table_size, &t) < 0) {
            k->r->check_errors++;
            continue;
        }
        for (uint32_t j = 0; j < b->table_size; j++) {
            uint64_t off = t[j] & QCOW2_L2E_OFFSET_MASK;
            if (off)
                ref(k, off, img->cluster_size, "bitmap data");
        }
        free(t);
    }
}

/* OFLAG_COPIED must be set exactly where the refcount is one (active tables only). */
static int check_copied(struct ck *k, enum qcow2_repair repair)
{
    struct qcow2_image *img = k->img;
    int ret = 0;
    for (uint32_t i = 0; i < img->l1_size; i++) {
        uint64_t l2off = img->l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (!l2off || offset_into_cluster(img, l2off) || (l2off >> img->cluster_bits) >= k->n)
            continue;
        bool want = k->expected[l2off >> img->cluster_bits] == 1;
        if (want != !!(img->l1[i] & QCOW2_OFLAG_COPIED)) {
            say(k, "ERROR OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" PRIx64 " refcount=%u", i, img->l1[i],
                k->expected[l2off >> img->cluster_bits]);
            k->r->corruptions++;
            if (repair == QCOW2_REPAIR_ALL) {
                img->l1[i] = want ? img->l1[i] | QCOW2_OFLAG_COPIED : img->l1[i] & ~QCOW2_OFLAG_COPIED;
                uint64_t be = htobe64(img->l1[i]);
                if ((ret = vfs_pwrite(img->file, &be, 8, img->h.l1_table_offset + (uint64_t)i * 8)) < 0)
                    return ret;
                k->r->corruptions_fixed++;
            }
        }
        if (img->data != img->file)
            continue; /* external data: flags carry the mapping, not sharing */
        uint32_t per_slice = img->cache.slice_bytes / (8 * img->l2_entry_words);
        for (uint32_t j = 0; j < img->l2_entries; j += per_slice) {
            struct l2_slice *s;
            if ((ret = l2_cache_get(img, l2off + (uint64_t)(j / per_slice) * img->cache.slice_bytes, &s)) < 0)
                return ret;
            for (uint32_t x = 0; x < per_slice; x++) {
                uint64_t *e = &s->entries[x * img->l2_entry_words];
                uint64_t host = *e & QCOW2_L2E_OFFSET_MASK;
                if ((*e & QCOW2_OFLAG_COMPRESSED) || !host || offset_into_cluster(img, host) ||
                    (host >> img->cluster_bits) >= k->n)
                    continue;
                bool w = k->expected[host >> img->cluster_bits] == 1;
                if (w == !!(*e & QCOW2_OFLAG_COPIED))
                    continue;
                say(k, "ERROR OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%u", *e,
                    k->expected[host >> img->cluster_bits]);
                k->r->corruptions++;
                if (repair == QCOW2_REPAIR_ALL) {
                    *e = w ? *e | QCOW2_OFLAG_COPIED : *e & ~QCOW2_OFLAG_COPIED;
                    l2_cache_mark_dirty(img, s);
                    k->r->corruptions_fixed++;
                }
            }
            l2_cache_put(img, s);
            if (img->cache.ndirty * 2 >= img->cache.nslots && (ret = meta_flush(img)) < 0)
                return ret; /* a cache full of dirty slices has no victim left */
        }
    }
    return 0;
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
    struct ck k = {.img = img, .r = r, .report = report, .ctx = ctx, .progress = progress, .opaque = opaque};
    k.n = size_to_clusters(img, img->file_size);
    k.expected = calloc(k.n ? k.n : 1, sizeof *k.expected);
    if (!k.expected)
        return err_fail(ENOMEM, "out of memory for %" PRIu64 " refcounts", k.n);
    if (img->rw)
        pthread_rwlock_wrlock(&img->rwlock);
    if (repair)
        img->unsynced = true;
    int ret = 0;
    if (img->rw && (ret = meta_flush(img)) < 0)
        goto out;
    r->total_clusters = size_to_clusters(img, img->h.size);
    uint64_t per_block = ((uint64_t)img->cluster_size * 8) >> img->h.refcount_order;
    uint64_t covered = (uint64_t)img->reftable_size * per_block;
    uint64_t limit = k.n > covered ? k.n : covered;
    k.total = img->h.l1_size + limit / per_block + 1;
    for (uint32_t i = 0; i < img->nb_snaps; i++)
        k.total += img->snaps[i].l1_size;

    ref(&k, 0, img->cluster_size, "header");
    walk_l1(&k, img->h.l1_table_offset, img->h.l1_size, true);
    for (uint32_t i = 0; i < img->nb_snaps && !k.cancelled; i++)
        walk_l1(&k, img->snaps[i].l1_offset, img->snaps[i].l1_size, false);
    if (k.cancelled) {
        ret = err_fail(ECANCELED, "check cancelled");
        goto out;
    }
    if (img->h.nb_snapshots)
        ref(&k, img->h.snapshots_offset, img->snap_table_len, "snapshot table");
    ref(&k, img->h.refcount_table_offset, (uint64_t)img->h.refcount_table_clusters << img->cluster_bits, "refcount table");
    for (uint32_t i = 0; i < img->reftable_size; i++) {
        uint64_t b = img->reftable[i] & QCOW2_REFT_OFFSET_MASK;
        if (!b)
            continue;
        if (offset_into_cluster(img, b)) {
            say(&k, "ERROR refcount block %u at %#" PRIx64 " is not cluster aligned", i, b);
            r->corruptions++;
            continue;
        }
        ref(&k, b, img->cluster_size, "refcount block");
    }
    walk_bitmaps(&k);
    if (img->crypto_len)
        ref(&k, img->crypto_off, img->crypto_len, "encryption header");

    /* compare; clusters past the file with a refcount are leaks too */
    uint64_t highest = 0;
    bool changed = false; /* a repair has changed a refcount: no stopping now */
    img->repair_expected = k.expected;
    img->repair_n = k.n;
    for (uint64_t c = 0; c < limit; c++) {
        if (c % per_block == 0 && !tick(&k, 1) && !changed) {
            ret = err_fail(ECANCELED, "check cancelled");
            goto out;
        }
        if (c >= k.n) { /* past the file: skip whole uncovered blocks fast */
            uint64_t ti = c / per_block;
            if (ti >= img->reftable_size)
                break;
            uint64_t b = img->reftable[ti] & QCOW2_REFT_OFFSET_MASK;
            if (!b || (c % per_block == 0 && skip_past_block(&k, b))) {
                c = (ti + 1) * per_block - 1;
                continue;
            }
        }
        uint64_t want = c < k.n ? k.expected[c] : 0, have = stored_rc(&k, c);
        if ((want || have) && c < k.n)
            highest = c; /* as qemu-img: the end of what the file holds */
        if (want == have)
            continue;
        bool leak = have > want;
        if (want > rc_max(img)) {
            say(&k, "ERROR cluster %" PRIu64 " has %" PRIu64 " references, more than %u-bit refcounts hold", c, want,
                img->refcount_bits);
            r->corruptions++;
            continue;
        }
        say(&k, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64, leak ? "Leaked" : "ERROR", c, have, want);
        if (leak)
            r->leaks++;
        else
            r->corruptions++;
        if (repair == QCOW2_REPAIR_ALL || (leak && repair == QCOW2_REPAIR_LEAKS)) {
            changed = true;
            if ((ret = rc_set(img, c, want)) < 0)
                goto out;
            if (leak)
                r->leaks_fixed++;
            else
                r->corruptions_fixed++;
        }
    }
    r->image_end_offset = (highest + 1) << img->cluster_bits;
    if ((ret = check_copied(&k, repair)) < 0)
        goto out;
    if (repair) {
        if ((ret = meta_flush(img)) < 0 || (ret = rc_writeback(img)) < 0 || (ret = qcow2_sync(img, img->file)) < 0)
            goto out;
        uint64_t remaining = r->corruptions - r->corruptions_fixed;
        if (repair == QCOW2_REPAIR_ALL && !remaining && (img->h.incompatible_features & QCOW2_INCOMPAT_CORRUPT)) {
            img->h.incompatible_features &= ~QCOW2_INCOMPAT_CORRUPT;
            img->info.corrupt = false;
            img->broken = false;
            if ((ret = header_write(img, 72, img->h.incompatible_features, 8)) < 0)
                goto out;
        }
        /* refcounts now right (nothing left unfixed): a dirty image is clean
         * again, as after QEMU's repair; this handle did not set the bit itself */
        if (!remaining && !r->check_errors && (img->h.incompatible_features & QCOW2_INCOMPAT_DIRTY) &&
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
    free(k.expected);
    free(k.seen);
    free(k.scratch);
    return ret;
}

int qcow2_repair_refcounts(struct qcow2_image *img)
{
    struct qcow2_check_result r;
    /* called from open, before anyone else holds the image */
    int ret = qcow2_check(img, QCOW2_REPAIR_ALL, &r, NULL, NULL);
    if (ret < 0)
        return ret;
    if (r.corruptions > r.corruptions_fixed)
        return err_fail(EUCLEAN, "%" PRIu64 " corruptions remain after rebuilding the refcounts",
                        r.corruptions - r.corruptions_fixed);
    if (img->h.incompatible_features & QCOW2_INCOMPAT_DIRTY) {
        img->h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
        img->info.dirty = false;
        ret = header_write(img, 72, img->h.incompatible_features, 8);
    }
    return ret;
}
