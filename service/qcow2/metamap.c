/* metamap.c: which bytes of an image file a read-only qcow2_open reads, known
 * from the header alone, so that a streamed upload keeps only those staged. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"

/* Add [off, off+len) to out (n entries so far), clipped to nothing on overflow. */
static void add_range(struct qcow2_range *out, unsigned *n, uint64_t off, uint64_t len)
{
    uint64_t end;
    if (len == 0 || __builtin_add_overflow(off, len, &end))
        return;
    out[(*n)++] = (struct qcow2_range){off, len};
}

static int by_offset(const void *a, const void *b)
{
    const struct qcow2_range *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* Sort and merge overlapping or touching ranges; returns the new count. */
static unsigned merge(struct qcow2_range *r, unsigned n)
{
    unsigned m = 0;
    qsort(r, n, sizeof *r, by_offset);
    for (unsigned i = 0; i < n; i++) {
        if (m && r[i].off <= r[m - 1].off + r[m - 1].len) {
            uint64_t end = r[i].off + r[i].len, have = r[m - 1].off + r[m - 1].len;
            if (end > have)
                r[m - 1].len = end - r[m - 1].off;
        } else {
            r[m++] = r[i];
        }
    }
    return m;
}

int qcow2_meta_ranges(struct vfs_file *f, uint64_t max_meta_bytes, struct qcow2_range out[QCOW2_META_RANGES_MAX])
{
    struct qcow2_image *img = calloc(1, sizeof *img);
    if (!img)
        return err_fail(ENOMEM, "out of memory");
    img->file = f;
    /* the file is still arriving: tables may lie past what came so far, and
     * the open that validates it checks their ends against the real size */
    img->file_size = UINT64_MAX;
    int ret = qcow2_read_header(img);
    if (ret < 0)
        goto out;
    const struct qcow2_disk_header *h = &img->h;
    uint64_t meta_max = max_meta_bytes ? max_meta_bytes : QCOW2_DEFAULT_META_BYTES;
    uint64_t l1 = (uint64_t)h->l1_size * 8, rt = (uint64_t)h->refcount_table_clusters << img->cluster_bits;
    unsigned n = 0;
    add_range(out, &n, 0, img->cluster_size); /* the header, its extensions, the backing name */
    /* qcow2_read_header checked each table's size against its format limit;
     * one the open's metadata budget refuses is never read: not kept */
    if (l1 <= meta_max)
        add_range(out, &n, h->l1_table_offset, l1);
    if (rt <= meta_max && l1 + rt <= meta_max)
        add_range(out, &n, h->refcount_table_offset, rt);
    if (h->nb_snapshots) {
        /* entries vary in length: the walk reads a window past the last one */
        uint64_t len = (uint64_t)h->nb_snapshots * SNAP_MAX_ENTRY + SNAP_WINDOW;
        add_range(out, &n, h->snapshots_offset, len < QCOW2_MAX_SNAPSHOT_TABLE ? len : QCOW2_MAX_SNAPSHOT_TABLE);
    }
    if ((h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS) && img->bitmap_dir_size <= QCOW2_MAX_BITMAP_DIR)
        add_range(out, &n, img->bitmap_dir_off, img->bitmap_dir_size);
    if (img->crypto_len >= QCOW2_LUKS_HEADER_LEN) /* qcow2_read_header reads the LUKS header there */
        add_range(out, &n, img->crypto_off, QCOW2_LUKS_HEADER_LEN);
    ret = (int)merge(out, n);
out:
    free(img->feature_table);
    free(img->backing_fmt);
    free(img->backing_name);
    free(img->data_name);
    free(img);
    return ret;
}
