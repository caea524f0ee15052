/* alloc.c: finding free clusters, packing compressed data, deferred frees, the
 * release of data written once, and the overlap checks that keep data off metadata. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>

#include "qcow2_int.h"

int alloc_clusters(struct qcow2_image *img, uint64_t n, uint64_t *off)
{
    pin_drain(img, false);
    uint64_t c = img->free_hint ? img->free_hint : 1;
    /* clusters freed under pinned readers wait below the floor */
    bool floored = (img->nquar || img->quar_lost) && c < img->quar_floor;
    if (floored)
        c = img->quar_floor;
    uint64_t limit = (1ull << (56 - img->cluster_bits)); /* host offsets stay below 2^56 */
    int ret;
    uint64_t reach = rc_reach(img);
    if (n == 0 || n >= reach)
        return err_fail(EINVAL, "cannot allocate %" PRIu64 " contiguous clusters (refcount blocks every %" PRIu64 ")", n,
                        reach);
    for (;;) {
        if (c + n > limit)
            return err_fail(EOVERFLOW, "no room for %" PRIu64 " more clusters below the 64 PiB limit", n);
        /* every range the run touches gets a refcount block first; a new block
         * may take a cluster of the run, so the run is checked afterwards */
        for (uint64_t k = c; k < c + n; k++)
            if ((ret = rc_cover(img, k)) < 0)
                return ret;
        uint64_t k;
        for (k = c; k < c + n; k++) {
            uint64_t v;
            if ((ret = rc_get(img, k, &v)) < 0)
                return ret;
            if (v)
                break;
        }
        if (k == c + n)
            break;
        c = k + 1;
    }
    for (uint64_t k = c; k < c + n; k++)
        if ((ret = rc_set(img, k, 1)) < 0)
            return ret;
    /* the hint stays a lower bound of the first free cluster */
    if (!floored && (n == 1 || c <= img->free_hint))
        img->free_hint = c + n;
    *off = c << img->cluster_bits;
    return overlap_check(img, *off, n << img->cluster_bits, "new cluster");
}

int alloc_compressed(struct qcow2_image *img, uint64_t bytes, uint64_t *off)
{
    int ret;
    if (img->cfree_off && img->cfree_end - img->cfree_off >= bytes) {
        /* shares the host cluster of the previous compressed data: one more reference */
        uint64_t c = img->cfree_off >> img->cluster_bits;
        uint64_t last = (img->cfree_off + bytes - 1) >> img->cluster_bits;
        uint64_t v = 0;
        if ((ret = rc_get(img, c, &v)) < 0)
            return ret;
        /* a narrow refcount (1 bit) cannot count a second user: start a new cluster */
        if (c == last && offset_into_cluster(img, img->cfree_off) && v < rc_max(img)) {
            if ((ret = rc_update_range(img, img->cfree_off, 1, +1)) < 0)
                return ret;
            *off = img->cfree_off;
            img->cfree_off += bytes;
            return 0;
        }
    }
    /* the last run takes no more data: whole clusters of compressed data now */
    img->cfree_off = 0;
    if (img->crun_end > img->crun_off && (ret = release_written(img, img->crun_off, img->crun_end - img->crun_off)) < 0)
        return ret;
    img->crun_off = img->crun_end = 0;
    uint64_t n = (bytes + img->cluster_size - 1) >> img->cluster_bits;
    uint64_t start;
    if ((ret = alloc_clusters(img, n, &start)) < 0)
        return ret;
    *off = start;
    img->cfree_off = start + bytes;
    img->cfree_end = start + (n << img->cluster_bits);
    img->crun_off = start;
    img->crun_end = img->cfree_end;
    if (offset_into_cluster(img, img->cfree_off) == 0)
        img->cfree_off = 0;
    return 0;
}

int free_later(struct qcow2_image *img, uint64_t off, uint64_t len)
{
    if (img->npending == img->cap_pending) {
        size_t cap = img->cap_pending ? img->cap_pending * 2 : 64;
        struct pending_free *p = realloc(img->pending, cap * sizeof *p);
        if (!p)
            return err_fail(ENOMEM, "out of memory");
        img->pending = p;
        img->cap_pending = cap;
    }
    img->pending[img->npending++] = (struct pending_free){off, len};
    return 0;
}

int release_written(struct qcow2_image *img, uint64_t off, uint64_t len)
{
    if (!img->release_data || img->data != img->file)
        return 0;
    return vfs_release(img->file, off, len);
}

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return blen && alen && a < b + blen && b < a + alen;
}

int overlap_check(struct qcow2_image *img, uint64_t off, uint64_t len, const char *what)
{
    const char *hit = NULL;
    uint64_t cs = img->cluster_size;
    if (overlaps(off, len, 0, cs))
        hit = "the header";
    else if (overlaps(off, len, img->h.l1_table_offset, (uint64_t)img->h.l1_size * 8))
        hit = "the active L1 table";
    else if (overlaps(off, len, img->h.refcount_table_offset, (uint64_t)img->h.refcount_table_clusters * cs))
        hit = "the refcount table";
    else if (img->h.nb_snapshots && overlaps(off, len, img->h.snapshots_offset, img->snap_table_len))
        hit = "the snapshot table";
    else if (img->bitmap_dir_size && overlaps(off, len, img->bitmap_dir_off, img->bitmap_dir_size))
        hit = "the bitmap directory";
    for (uint32_t i = 0; !hit && i < img->nb_snaps; i++)
        if (overlaps(off, len, img->snaps[i].l1_offset, (uint64_t)img->snaps[i].l1_size * 8))
            hit = "a snapshot's L1 table";
    if (!hit)
        return 0;
    return mark_corrupt(img, "refusing to write %s at %#" PRIx64 " (%" PRIu64 " bytes) over %s", what, off, len, hit);
}
