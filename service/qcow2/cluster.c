/* cluster.c: guest offset -> host mapping through the L1 and L2 tables,
 * standard and extended L2 entries, zero and compressed clusters. A bad entry
 * fails only the lookup that meets it, with a message naming it. */
#include <errno.h>
#include <inttypes.h>

#include "qcow2_int.h"

/* The type of subcluster sc of an L2 entry; -EUCLEAN for an invalid combination. */
static int entry_type(struct qcow2_image *img, uint64_t l2e, uint64_t bitmap, unsigned sc, uint64_t guest)
{
    if (l2e & QCOW2_OFLAG_COMPRESSED) {
        if (img->data != img->file)
            return err_fail(EUCLEAN,
                            "compressed cluster at guest offset %#" PRIx64 " in an image with an external data file",
                            guest);
        return SC_COMPRESSED;
    }
    uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
    bool allocated = host || (img->data != img->file && (l2e & QCOW2_OFLAG_COPIED));
    if (!img->ext_l2) {
        if (l2e & QCOW2_OFLAG_ZERO) {
            if (img->h.version < 3)
                return err_fail(EUCLEAN, "zero cluster entry at guest offset %#" PRIx64 " in a version 2 image", guest);
            return SC_ZERO;
        }
        return allocated ? SC_NORMAL : SC_UNALLOC;
    }
    if ((bitmap >> 32) & bitmap)
        return err_fail(EUCLEAN, "L2 entry for guest offset %#" PRIx64 " marks a subcluster both allocated and zero",
                        guest);
    if (allocated) {
        if (bitmap & (1ull << (sc + 32)))
            return SC_ZERO;
        if (bitmap & (1ull << sc))
            return SC_NORMAL;
        return SC_UNALLOC;
    }
    if (bitmap & 0xffffffffull)
        return err_fail(EUCLEAN, "L2 entry for guest offset %#" PRIx64 " has allocated subclusters but no host cluster",
                        guest);
    return (bitmap & (1ull << (sc + 32))) ? SC_ZERO : SC_UNALLOC;
}

/* Where a compressed L2 entry's bytes lie: from *coff, *csize bytes (whole
 * sectors from the one holding *coff). */
static void compressed_extent(const struct qcow2_image *img, uint64_t l2e, uint64_t *coff, uint32_t *csize)
{
    *coff = l2e & img->coffset_mask;
    uint64_t nsec = ((l2e >> img->csize_shift) & img->csize_mask) + 1;
    *csize = (uint32_t)(nsec * QCOW2_COMPRESSED_SECTOR - (*coff & (QCOW2_COMPRESSED_SECTOR - 1)));
}

/* The cached slice of the L2 table holding guest offset off's entry into *sp
 * (give it back with l2_cache_put), with the entry's index in it and the
 * entries a slice holds; *sp NULL when no L2 table maps off. A bad L1 entry is
 * an error naming it. */
static int l2_slice_at(struct qcow2_image *img, uint64_t off, struct l2_slice **sp, uint32_t *idx,
                       uint32_t *per_slice)
{
    uint64_t l1_index = offset_to_l1_index(img, off);
    uint64_t l2_off = (l1_index < img->l1_size ? img->l1[l1_index] : 0) & QCOW2_L1E_OFFSET_MASK;
    *sp = NULL;
    if (!l2_off)
        return 0;
    if (offset_into_cluster(img, l2_off))
        return err_fail(EUCLEAN, "L2 table offset %#" PRIx64 " (L1 index %" PRIu64 ") is not cluster aligned", l2_off,
                        l1_index);
    if (l2_off + img->cluster_size > img->file_size)
        return err_fail(EUCLEAN, "L2 table at %#" PRIx64 " (L1 index %" PRIu64 ") lies past the end of the file",
                        l2_off, l1_index);
    uint32_t l2_index = offset_to_l2_index(img, off);
    *per_slice = img->cache.slice_bytes / (8 * img->l2_entry_words);
    *idx = l2_index % *per_slice;
    int ret = l2_cache_get(img, l2_off + (uint64_t)(l2_index / *per_slice) * img->cache.slice_bytes, sp);
    if (ret < 0) {
        *sp = NULL;
        return err_prefix(ret, "reading L2 table at %#" PRIx64, l2_off);
    }
    return 0;
}

int qcow2_get_mapping(struct qcow2_image *img, uint64_t off, uint64_t bytes, struct mapping *m)
{
    uint64_t l2_span = (uint64_t)img->l2_entries << img->cluster_bits;
    uint64_t in_l2 = l2_span - (off & (l2_span - 1));
    if (bytes > in_l2)
        bytes = in_l2;
    m->host_valid = false;
    m->host_off = 0;

    struct l2_slice *s;
    uint32_t idx, per_slice;
    int ret = l2_slice_at(img, off, &s, &idx, &per_slice);
    if (ret < 0)
        return ret;
    if (!s) {
        m->type = SC_UNALLOC;
        m->bytes = bytes;
        return 0;
    }

    uint64_t pos = off; /* walk forward while the run continues */
    uint64_t end = off + bytes;
    int first_type = -1;
    uint64_t expect_host = 0;
    ret = 0;
    while (pos < end && idx < per_slice) {
        uint64_t l2e = s->entries[idx * img->l2_entry_words];
        uint64_t bitmap = img->ext_l2 ? s->entries[idx * 2 + 1] : 0;
        uint64_t cl_start = pos & ~(uint64_t)(img->cluster_size - 1);
        uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
        if (!(l2e & QCOW2_OFLAG_COMPRESSED) && host && offset_into_cluster(img, host)) {
            ret = err_fail(EUCLEAN,
                           "data cluster offset %#" PRIx64 " for guest offset %#" PRIx64 " is not cluster aligned",
                           host, cl_start);
            break;
        }
        /* subclusters of this cluster from pos */
        while (pos < end && pos < cl_start + img->cluster_size) {
            unsigned sc = offset_to_sc_index(img, pos);
            int t = entry_type(img, l2e, bitmap, sc, pos);
            if (t < 0) {
                if (first_type < 0)
                    ret = t;
                goto done;
            }
            uint64_t step = img->sc_size - (pos & (img->sc_size - 1));
            if (t == SC_COMPRESSED)
                step = cl_start + img->cluster_size - pos;
            uint64_t h = host + (pos - cl_start);
            bool hv = (t == SC_NORMAL) || ((t == SC_ZERO || t == SC_UNALLOC) &&
                                           (host || (img->data != img->file && (l2e & QCOW2_OFLAG_COPIED))));
            if (first_type < 0) {
                first_type = t;
                m->type = t;
                m->host_valid = hv;
                m->host_off = hv ? h : 0;
                if (t == SC_COMPRESSED) {
                    compressed_extent(img, l2e, &m->coff, &m->csize);
                    if (m->coff >= img->file_size) {
                        ret = err_fail(EUCLEAN,
                                       "compressed cluster for guest offset %#" PRIx64 " starts at %#" PRIx64
                                       ", past the end of the file",
                                       cl_start, m->coff);
                        goto done;
                    }
                    pos += step; /* one compressed cluster per mapping */
                    goto done;
                }
            } else if (t != first_type || hv != m->host_valid || (hv && h != expect_host)) {
                goto done;
            }
            if (step > end - pos)
                step = end - pos;
            pos += step;
            expect_host = h + step;
        }
        idx++;
    }
done:
    l2_cache_put(img, s);
    if (ret < 0)
        return ret;
    m->bytes = (pos > end ? end : pos) - off;
    if (pos > end && first_type == SC_COMPRESSED)
        m->bytes = end - off;
    return 0;
}

uint64_t qcow2_compressed_run_end(struct qcow2_image *img, uint64_t off, uint64_t bytes, const struct mapping *m,
                                  uint64_t cap)
{
    uint64_t run_end = m->coff + m->csize;
    /* the entry was just read through this table by qcow2_get_mapping; if the
     * lookup fails now, the single cluster is the answer */
    struct l2_slice *s;
    uint32_t idx, per_slice;
    if (l2_slice_at(img, off, &s, &idx, &per_slice) < 0 || !s) {
        err_clear();
        return run_end;
    }
    /* clusters after off's, while the request goes on and their bytes continue
     * the run: QEMU packs compressed clusters byte by byte, so each starts inside
     * the last sector of the one before (or right after it) */
    uint64_t cl = (off & ~(uint64_t)(img->cluster_size - 1)) + img->cluster_size;
    for (idx++; idx < per_slice && cl < off + bytes; idx++, cl += img->cluster_size) {
        uint64_t l2e = s->entries[idx * img->l2_entry_words];
        if (!(l2e & QCOW2_OFLAG_COMPRESSED))
            break;
        uint64_t coff;
        uint32_t csize;
        compressed_extent(img, l2e, &coff, &csize);
        uint64_t end = coff + csize;
        if (coff < m->coff || coff > run_end || end - m->coff > cap)
            break;
        if (end > run_end)
            run_end = end;
    }
    l2_cache_put(img, s);
    return run_end;
}
