/* fuzz_open_read.c: libFuzzer target for the qcow2 engine's read side: the input is
 * an image file in the mem: store; open it, query it, map it and read from it, and
 * check qcow2_meta_ranges against what the open reads. */
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "fuzz_util.h"
#include "qcow2.h"
#include "vfs.h"

#define IMAGE_URI      "mem:fuzz.qcow2"
#define KEPT_URI       "mem:fuzz-kept.qcow2"
#define MAX_EXTENTS    4096        /* block-status calls per open */
#define READ_CHUNK     (64u << 10) /* bytes per read */
#define READ_BUDGET    (1u << 20)  /* bytes read per open, at most */
#define MAX_DATA_READS 8           /* reads at the start of allocated extents */
#define CHAIN_DEPTH    4           /* backing chain bound for the second open */

static unsigned char buf[READ_CHUNK];

static void read_range(struct qcow2_image *img, uint64_t size, uint64_t off, uint64_t len, uint64_t *budget)
{
    if (off >= size || *budget == 0)
        return;
    if (len > size - off)
        len = size - off;
    if (len > READ_CHUNK)
        len = READ_CHUNK;
    if (len > *budget)
        len = *budget;
    *budget -= len;
    (void)qcow2_pread(img, buf, (size_t)len, off); /* failing is fine; crashing is not */
}

/* Walk the map, then read where it says data lives, and at both ends. */
static void exercise(struct qcow2_image *img)
{
    const struct qcow2_info *info = qcow2_get_info(img);
    CHECK(info != NULL);
    CHECK(info->nb_snapshots == 0 || info->snapshots != NULL);
    CHECK(info->nb_bitmaps == 0 || info->bitmaps != NULL);
    for (uint32_t i = 0; i < info->nb_snapshots; i++)
        CHECK(info->snapshots[i].id != NULL && info->snapshots[i].name != NULL);
    for (uint32_t i = 0; i < info->nb_bitmaps; i++)
        CHECK(info->bitmaps[i].name != NULL);

    uint64_t size = qcow2_size(img);
    uint64_t budget = READ_BUDGET;
    uint64_t data_at[MAX_DATA_READS];
    unsigned n_data = 0;

    uint64_t off = 0;
    for (unsigned n = 0; off < size && n < MAX_EXTENTS; n++) {
        struct qcow2_extent e;
        if (qcow2_block_status(img, off, size - off, &e) < 0)
            break;
        CHECK(e.start == off);
        CHECK(e.length > 0 && e.length <= size - off);
        CHECK(e.file != NULL || !e.offset_valid);
        if (e.data && n_data < MAX_DATA_READS)
            data_at[n_data++] = off;
        off += e.length;
    }

    read_range(img, size, 0, READ_CHUNK, &budget);
    if (size > READ_CHUNK)
        read_range(img, size, size - READ_CHUNK, READ_CHUNK, &budget);
    if (size > 8192)
        read_range(img, size, size / 2 - 1000, 4096, &budget); /* unaligned, mid-disk */
    for (unsigned i = 0; i < n_data; i++)
        read_range(img, size, data_at[i], READ_CHUNK, &budget);
}

/* Returns whether the image names a backing file. */
static bool open_and_exercise(const struct qcow2_open_opts *opts)
{
    struct qcow2_image *img = NULL;
    err_clear();
    if (qcow2_open(IMAGE_URI, opts, &img) < 0) {
        CHECK(img == NULL);
        return false;
    }
    CHECK(img != NULL);
    exercise(img);

    /* Each snapshot is a view of its own L1 table: open the first one too. */
    const struct qcow2_info *info = qcow2_get_info(img);
    if (info->nb_snapshots > 0 && !opts->snapshot) {
        struct qcow2_open_opts so = *opts;
        struct qcow2_image *snap = NULL;
        so.snapshot = info->snapshots[0].id;
        if (qcow2_open(IMAGE_URI, &so, &snap) == 0) {
            exercise(snap);
            qcow2_close(snap);
        }
    }
    bool has_backing = info->backing_file != NULL;
    qcow2_close(img);
    return has_backing;
}

/* qcow2_meta_ranges of the image: sorted, apart, no overflow, the header first;
 * refused only where the open refuses too; and a copy holding only those
 * ranges (0xff elsewhere, same size) opens as the whole image does, since
 * the open reads nothing else (an upload's staging keeps only them). */
static void check_meta_ranges(const uint8_t *data, size_t size)
{
    struct qcow2_range r[QCOW2_META_RANGES_MAX];
    struct vfs_file *f;
    CHECK(vfs_open(IMAGE_URI, VFS_O_RDONLY, &f) == 0);
    err_clear();
    int n = qcow2_meta_ranges(f, 0, r);
    vfs_close(f);
    struct qcow2_open_opts o = {.no_backing = true, .contained = true, .l2_cache_bytes = 1u << 20};
    struct qcow2_image *img = NULL;
    int whole = qcow2_open(IMAGE_URI, &o, &img);
    if (whole == 0)
        qcow2_close(img);
    if (n < 0) {
        CHECK(n == -EINVAL || n == -ENOTSUP || n == -ENOMEM);
        CHECK(whole < 0 || n == -ENOMEM);
        return;
    }
    CHECK(n >= 1 && n <= QCOW2_META_RANGES_MAX);
    CHECK(r[0].off == 0 && r[0].len >= 512);
    for (int i = 0; i < n; i++) {
        CHECK(r[i].len > 0 && r[i].off <= UINT64_MAX - r[i].len);
        CHECK(i == 0 || r[i].off > r[i - 1].off + r[i - 1].len);
    }
    unsigned char *kept = malloc(size ? size : 1);
    if (!kept)
        return;
    memset(kept, 0xff, size); /* what was not kept reads as nothing a table would take */
    for (int i = 0; i < n && r[i].off < size; i++) {
        uint64_t len = r[i].len < size - r[i].off ? r[i].len : size - r[i].off;
        memcpy(kept + r[i].off, data + r[i].off, (size_t)len);
    }
    fuzz_put_file(KEPT_URI, kept, size);
    free(kept);
    img = NULL;
    int k = qcow2_open(KEPT_URI, &o, &img);
    if (k == 0)
        qcow2_close(img);
    CHECK(k == whole || k == -ENOMEM || whole == -ENOMEM);
    vfs_remove(KEPT_URI);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_limit_mem();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_put_file(IMAGE_URI, data, size);

    /* Names in the image may only reach the mem: store (contained), never the disk. */
    struct qcow2_open_opts opts = {
        .no_backing = true,
        .contained = true,
        .l2_cache_bytes = 1u << 20,
    };
    check_meta_ranges(data, size);
    bool has_backing = open_and_exercise(&opts);

    /* Again with the backing chain: a backing name can only resolve to another mem:
     * object, and the only one is the image itself, which exercises loop detection. */
    if (has_backing) {
        opts.no_backing = false;
        opts.max_chain_depth = CHAIN_DEPTH;
        open_and_exercise(&opts);
    }

    vfs_remove(IMAGE_URI);
    return 0;
}
