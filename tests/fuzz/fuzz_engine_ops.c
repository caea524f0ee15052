/* fuzz_engine_ops.c: libFuzzer target for the engine's write side on a hostile
 * image: write, zero, discard, snapshots, bitmaps, check/repair and commit.
 *
 * Input: IMAGE [MARK BACKING] OPS N. The last byte N is the length of the op
 * script before it (clamped to what is there); the bytes before the script are
 * the image, put at mem:fz/top.qcow2; when they contain MARK ("QCOWDFZ:"), what
 * follows the first MARK is a second file, mem:fz/base.qcow2, which the image
 * may name as its backing file (seed_corpus.sh packs overlays that way). Each op
 * is OP_BYTES bytes: an opcode and three parameters. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "fuzz_util.h"
#include "qcow2.h"
#include "vfs.h"

#define TOP_URI   "mem:fz/top.qcow2"
#define BASE_URI  "mem:fz/base.qcow2"
#define MARK      "QCOWDFZ:"
#define MARK_LEN  8
#define OP_BYTES  4
#define MAX_OPS   24
#define MAX_IO    (64u << 10) /* bytes per write or read */
#define SCAN_MAX  64          /* block-status or dirty calls per scan */
#define META_MAX  (64ull << 20)
#define NAME_MAX_COPY 1100    /* snapshot and bitmap names are up to 1023 bytes */

enum {
    OP_WRITE,
    OP_ZERO,
    OP_DISCARD,
    OP_WRITE_COMPRESSED,
    OP_READ,
    OP_SNAP_CREATE,
    OP_SNAP_DELETE,
    OP_SNAP_REVERT,
    OP_BITMAP_ADD,
    OP_BITMAP_REMOVE,
    OP_BITMAP_MERGE,
    OP_BITMAP_TOGGLE, /* clear, enable or disable */
    OP_BITMAP_DIRTY,
    OP_CHECK,
    OP_FLUSH,
    OP_REOPEN,
    OP_COMMIT,
    OP_MAP,
    OP_COUNT
};

static unsigned char iobuf[MAX_IO];
static bool as_is; /* opened with allow_corrupt: only for check (as the daemon does) */

/* Open the image read-write; a corrupt or dirty one as it is, as check does
 * (then only what the daemon does with such a handle runs on it: check, reads). */
static struct qcow2_image *open_top(void)
{
    struct qcow2_open_opts o = {
        .read_write = true,
        .contained = true,
        .l2_cache_bytes = 256u << 10,
        .max_chain_depth = 4,
        .max_meta_bytes = META_MAX,
    };
    struct qcow2_image *img = NULL;
    err_clear();
    as_is = false;
    if (qcow2_open(TOP_URI, &o, &img) == 0)
        return img;
    CHECK(img == NULL);
    o.allow_corrupt = as_is = true;
    if (qcow2_open(TOP_URI, &o, &img) == 0)
        return img;
    CHECK(img == NULL);
    return NULL;
}

/* An offset in the disk from two parameter bytes: a 256th of the way, then an
 * unaligned nudge when the low bit of b asks for one. */
static uint64_t pick_off(uint64_t size, uint8_t a, uint8_t b)
{
    if (size == 0)
        return 0;
    uint64_t off = size / 256 * a;
    off &= ~(uint64_t)511;
    if (b & 1)
        off += (uint64_t)b * 7;
    return off < size ? off : size - 1;
}

/* A length from one byte: whole 512-byte sectors, or a few odd bytes. */
static uint64_t pick_len(uint64_t size, uint64_t off, uint8_t c)
{
    uint64_t len = c & 0x80 ? (uint64_t)(c & 0x7f) * 4096 + 512 : (uint64_t)c * 9 + 1;
    if (len > MAX_IO)
        len = MAX_IO;
    return off < size && len > size - off ? size - off : len;
}

/* The name of an existing snapshot (or bitmap) by index, else a new name; a
 * copy in buf, as the op may replace the list it came from. */
static const char *pick_name(struct qcow2_image *img, bool bitmap, uint8_t p, char *buf, size_t cap)
{
    const struct qcow2_info *info = qcow2_get_info(img);
    uint32_t n = bitmap ? info->nb_bitmaps : info->nb_snapshots;
    if (n && !(p & 0x80))
        snprintf(buf, cap, "%s", bitmap ? info->bitmaps[p % n].name : info->snapshots[p % n].name);
    else
        snprintf(buf, cap, "%c%u", bitmap ? 'b' : 's', p & 7);
    return buf;
}

static void map_scan(struct qcow2_image *img)
{
    uint64_t size = qcow2_size(img), off = 0;
    for (unsigned n = 0; off < size && n < SCAN_MAX; n++) {
        struct qcow2_extent e;
        if (qcow2_block_status(img, off, size - off, &e) < 0)
            break;
        CHECK(e.start == off && e.length > 0 && e.length <= size - off);
        off += e.length;
    }
}

static void dirty_scan(struct qcow2_image *img, const char *name)
{
    uint64_t size = qcow2_size(img), off = 0;
    for (unsigned n = 0; off < size && n < SCAN_MAX; n++) {
        bool dirty;
        uint64_t pnum = 0;
        if (qcow2_bitmap_dirty(img, name, off, size - off, &dirty, &pnum) < 0)
            break;
        CHECK(pnum > 0 && pnum <= size - off);
        off += pnum;
    }
}

/* Run one op; returns the image to go on with (NULL when a reopen failed). */
static struct qcow2_image *run_op(struct qcow2_image *img, const uint8_t *op)
{
    uint8_t a = op[1], b = op[2], c = op[3];
    uint64_t size = qcow2_size(img);
    uint64_t off = pick_off(size, a, b), len = pick_len(size, off, c);
    char nb[NAME_MAX_COPY], nb2[NAME_MAX_COPY];
    struct qcow2_check_result cr;
    unsigned code = op[0] % OP_COUNT;
    if (as_is && code != OP_CHECK && code != OP_READ && code != OP_MAP && code != OP_REOPEN)
        return img;
    err_clear();
    switch (code) {
    case OP_WRITE:
        memset(iobuf, a ^ c, (size_t)len);
        if (len)
            (void)qcow2_pwrite(img, iobuf, (size_t)len, off);
        break;
    case OP_ZERO:
        (void)qcow2_pwrite_zeroes(img, off, len * (b & 0x10 ? 16 : 1) > size - off ? size - off : len);
        break;
    case OP_DISCARD:
        (void)qcow2_discard(img, off, b & 0x10 ? size - off : len);
        break;
    case OP_WRITE_COMPRESSED: {
        uint32_t cs = qcow2_get_info(img)->cluster_size;
        if (cs == 0 || cs > MAX_IO || size == 0)
            break;
        uint64_t coff = off / cs * cs;
        uint64_t clen = size - coff < cs ? size - coff : cs;
        memset(iobuf, b, (size_t)clen);
        (void)qcow2_pwrite_compressed(img, iobuf, (size_t)clen, coff);
        break;
    }
    case OP_READ:
        if (len)
            (void)qcow2_pread(img, iobuf, (size_t)len, off);
        break;
    case OP_SNAP_CREATE:
        snprintf(nb, sizeof nb, "s%u", a & 7);
        (void)qcow2_snapshot_create(img, nb);
        break;
    case OP_SNAP_DELETE:
        (void)qcow2_snapshot_delete(img, pick_name(img, false, a, nb, sizeof nb));
        break;
    case OP_SNAP_REVERT:
        (void)qcow2_snapshot_revert(img, pick_name(img, false, a, nb, sizeof nb));
        break;
    case OP_BITMAP_ADD: {
        snprintf(nb, sizeof nb, "b%u", a & 7);
        uint32_t gran = b & 0x80 ? 0 : 512u << (b % 12);
        (void)qcow2_bitmap_add(img, nb, gran, c & 1);
        break;
    }
    case OP_BITMAP_REMOVE:
        (void)qcow2_bitmap_remove(img, pick_name(img, true, a, nb, sizeof nb));
        break;
    case OP_BITMAP_MERGE:
        (void)qcow2_bitmap_merge(img, pick_name(img, true, a, nb, sizeof nb), NULL,
                                 pick_name(img, true, b, nb2, sizeof nb2));
        break;
    case OP_BITMAP_TOGGLE:
        pick_name(img, true, a, nb, sizeof nb);
        if (b % 3 == 0)
            (void)qcow2_bitmap_clear(img, nb);
        else if (b % 3 == 1)
            (void)qcow2_bitmap_enable(img, nb);
        else
            (void)qcow2_bitmap_disable(img, nb);
        break;
    case OP_BITMAP_DIRTY:
        dirty_scan(img, pick_name(img, true, a, nb, sizeof nb));
        break;
    case OP_CHECK:
        memset(&cr, 0, sizeof cr);
        (void)qcow2_check(img, (enum qcow2_repair)(a % 3), &cr, NULL, NULL);
        break;
    case OP_FLUSH:
        (void)qcow2_flush(img);
        break;
    case OP_REOPEN: /* what was written must parse again */
        (void)qcow2_close(img);
        return open_top();
    case OP_COMMIT:
        if (qcow2_backing(img)) {
            struct qcow2_commit_opts co = {.keep_top = a & 1};
            (void)qcow2_commit(img, &co);
        }
        break;
    case OP_MAP:
        map_scan(img);
        break;
    }
    return img;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_limit_mem();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t nops = data[size - 1];
    size--;
    if (nops > size)
        nops = size;
    const uint8_t *ops = data + size - nops;
    size -= nops;

    const uint8_t *mark = memmem(data, size, MARK, MARK_LEN);
    size_t top_len = mark ? (size_t)(mark - data) : size;
    fuzz_put_file(TOP_URI, data, top_len);
    if (mark)
        fuzz_put_file(BASE_URI, mark + MARK_LEN, size - top_len - MARK_LEN);

    struct qcow2_image *img = open_top();
    for (size_t i = 0; img && i + OP_BYTES <= nops && i / OP_BYTES < MAX_OPS; i += OP_BYTES)
        img = run_op(img, ops + i);
    if (img) {
        const struct qcow2_info *info = qcow2_get_info(img);
        CHECK(info->nb_snapshots == 0 || info->snapshots != NULL);
        CHECK(info->nb_bitmaps == 0 || info->bitmaps != NULL);
        (void)qcow2_close(img);
    }
    vfs_remove(TOP_URI);
    if (mark)
        vfs_remove(BASE_URI);
    return 0;
}
