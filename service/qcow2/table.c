/* table.c: bounds checks and loading for the on-disk tables (L1, refcount
 * table, snapshot L1s): aligned, inside the file, under the size limits. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>

#include "qcow2_int.h"

int qcow2_check_table(const struct qcow2_image *img, uint64_t off, uint64_t entries, uint32_t esize,
                      uint64_t max_bytes, const char *what)
{
    uint64_t bytes, end;
    if (__builtin_mul_overflow(entries, (uint64_t)esize, &bytes) || bytes > max_bytes)
        return err_fail(EFBIG, "%s is too large (%" PRIu64 " entries; the limit is %" PRIu64 " bytes)", what, entries,
                        max_bytes);
    if (entries == 0)
        return 0;
    if (offset_into_cluster(img, off))
        return err_fail(EINVAL, "%s at %#" PRIx64 " is not aligned to a cluster", what, off);
    if (off == 0)
        return err_fail(EINVAL, "%s at offset 0 overlaps the header", what);
    if (__builtin_add_overflow(off, bytes, &end) || end > img->file_size)
        return err_fail(EINVAL, "%s at %#" PRIx64 " (%" PRIu64 " bytes) lies past the end of the file (%" PRIu64 " bytes)",
                        what, off, bytes, img->file_size);
    return 0;
}

int qcow2_load_u64_table(struct qcow2_image *img, uint64_t off, uint32_t entries, uint64_t **out)
{
    uint64_t *t = calloc(entries ? entries : 1, 8);
    if (!t)
        return err_fail(ENOMEM, "out of memory for a table of %u entries", entries);
    uint64_t have = (uint64_t)entries * 8;
    if (img->checking) /* opened for check: past the end of the file reads as zeroes, as in qemu */
        have = off >= img->file_size ? 0 : img->file_size - off < have ? img->file_size - off : have;
    if (have) {
        int ret = vfs_pread(img->file, t, (size_t)have, off);
        if (ret < 0) {
            free(t);
            return ret;
        }
    }
    for (uint32_t i = 0; i < entries; i++)
        t[i] = be64toh(t[i]);
    *out = t;
    return 0;
}
