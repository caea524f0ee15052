/* table.c: bounds checks and loading for the on-disk tables (L1, refcount
 * table, snapshot L1s): aligned, inside the file, under the size limits. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "qcow2_int.h"

int qcow2_check_table(const struct qcow2_image *img, uint64_t off, uint64_t entries, uint32_t esize,
                      uint64_t max_bytes, const char *what)
{
    uint64_t bytes, end;
    if (__builtin_mul_overflow(entries, (uint64_t)esize, &bytes) || bytes > max_bytes) {
        char lim[32];
        return err_fail(ENOTSUP, "%s is too large (%" PRIu64 " entries; the limit is %s)", what, entries,
                        qcow2_human(max_bytes, lim, sizeof lim));
    }
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

const char *qcow2_human(uint64_t v, char *buf, size_t len)
{
    static const char *unit[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    unsigned u = 0;
    uint64_t whole = v;
    while (whole >= 1024 && u < 6) {
        whole >>= 10;
        u++;
    }
    if (u == 0 || (v & ((1ull << (10 * u)) - 1)) == 0)
        snprintf(buf, len, "%" PRIu64 " %s", whole, unit[u]);
    else
        snprintf(buf, len, "%.1f %s", (double)v / (double)(1ull << (10 * u)), unit[u]);
    return buf;
}

/* The layer whose budget img charges: the top of its chain. */
static struct qcow2_image *acct(struct qcow2_image *img)
{
    return img->acct ? img->acct : img;
}

static int over_budget(struct qcow2_image *a, uint64_t bytes, uint64_t used, const char *what)
{
    char need[32], have[32], max[32];
    qcow2_human(bytes, need, sizeof need);
    qcow2_human(a->meta_max, max, sizeof max);
    if (!used)
        return err_fail(ENOTSUP, "%s needs %s of memory, more than the metadata budget of %s per open image", what,
                        need, max);
    return err_fail(ENOTSUP,
                    "%s needs %s of memory; with the %s this image holds already, that is more than the "
                    "metadata budget of %s per open image",
                    what, need, qcow2_human(used, have, sizeof have), max);
}

int meta_charge(struct qcow2_image *img, uint64_t bytes, const char *what)
{
    struct qcow2_image *a = acct(img);
    uint64_t used = atomic_load(&a->meta_used);
    do {
        if (bytes > a->meta_max || used > a->meta_max - bytes)
            return over_budget(a, bytes, used, what);
    } while (!atomic_compare_exchange_weak(&a->meta_used, &used, used + bytes));
    return 0;
}

int meta_fits(struct qcow2_image *img, uint64_t bytes, const char *what)
{
    struct qcow2_image *a = acct(img);
    uint64_t used = atomic_load(&a->meta_used);
    if (bytes > a->meta_max || used > a->meta_max - bytes)
        return over_budget(a, bytes, used, what);
    return 0;
}

void meta_release(struct qcow2_image *img, uint64_t bytes)
{
    struct qcow2_image *a = acct(img);
    uint64_t used = atomic_load(&a->meta_used);
    while (!atomic_compare_exchange_weak(&a->meta_used, &used, used > bytes ? used - bytes : 0))
        ;
}

void meta_force(struct qcow2_image *img, uint64_t bytes)
{
    atomic_fetch_add(&acct(img)->meta_used, bytes);
}

uint64_t meta_headroom(struct qcow2_image *img)
{
    struct qcow2_image *a = acct(img);
    uint64_t used = atomic_load(&a->meta_used);
    return used < a->meta_max ? a->meta_max - used : 0;
}
