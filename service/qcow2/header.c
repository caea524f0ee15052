/* header.c: reading and validating the qcow2 header and its extensions.
 * Every field read from disk is checked before anything trusts it. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cursor.h"
#include "qcow2_int.h"

#define LUKS_SLOT_ACTIVE 0x00AC71F3u

#define FEATURE_ENTRY_SIZE 48 /* type, bit number, name */
#define FEATURE_NAME_SIZE  46

const char *qcow2_feature_name(const struct qcow2_image *img, int type, int bit, char *buf, size_t len)
{
    struct cursor t = cur_init(img->feature_table, img->feature_table_len), e;
    while (cur_sub(&t, FEATURE_ENTRY_SIZE, &e)) {
        uint8_t et = cur_u8(&e), eb = cur_u8(&e);
        if (et == type && eb == bit) {
            const char *name = (const char *)cur_take(&e, FEATURE_NAME_SIZE);
            snprintf(buf, len, "%.*s", (int)strnlen(name, FEATURE_NAME_SIZE), name);
            return buf;
        }
    }
    return NULL;
}

/* Names of the unknown incompatible bits: "bit 7 (fancy-feature), bit 9". */
static void describe_unknown(const struct qcow2_image *img, uint64_t bits, char *out, size_t len)
{
    size_t used = 0;
    out[0] = 0;
    for (int b = 0; b < 64 && used < len; b++) {
        if (!(bits & (1ull << b)))
            continue;
        char name[64];
        const char *n = qcow2_feature_name(img, 0, b, name, sizeof name);
        int w = n ? snprintf(out + used, len - used, "%sbit %d (%s)", used ? ", " : "", b, n)
                  : snprintf(out + used, len - used, "%sbit %d", used ? ", " : "", b);
        if (w < 0)
            break;
        used += (size_t)w;
    }
}

static void header_to_cpu(struct qcow2_disk_header *h)
{
    h->magic = be32toh(h->magic);
    h->version = be32toh(h->version);
    h->backing_file_offset = be64toh(h->backing_file_offset);
    h->backing_file_size = be32toh(h->backing_file_size);
    h->cluster_bits = be32toh(h->cluster_bits);
    h->size = be64toh(h->size);
    h->crypt_method = be32toh(h->crypt_method);
    h->l1_size = be32toh(h->l1_size);
    h->l1_table_offset = be64toh(h->l1_table_offset);
    h->refcount_table_offset = be64toh(h->refcount_table_offset);
    h->refcount_table_clusters = be32toh(h->refcount_table_clusters);
    h->nb_snapshots = be32toh(h->nb_snapshots);
    h->snapshots_offset = be64toh(h->snapshots_offset);
    h->incompatible_features = be64toh(h->incompatible_features);
    h->compatible_features = be64toh(h->compatible_features);
    h->autoclear_features = be64toh(h->autoclear_features);
    h->refcount_order = be32toh(h->refcount_order);
    h->header_length = be32toh(h->header_length);
}

static char *dup_name(const unsigned char *p, uint32_t len, const char *what)
{
    if (memchr(p, 0, len)) {
        err_fail(EINVAL, "%s contains a NUL byte", what);
        return NULL;
    }
    char *s = malloc(len + 1);
    if (!s) {
        err_fail(ENOMEM, "out of memory");
        return NULL;
    }
    memcpy(s, p, len);
    s[len] = 0;
    return s;
}

/* Walk the extensions in buf[start, end). */
static int read_extensions(struct qcow2_image *img, const unsigned char *buf, uint64_t start, uint64_t end)
{
    struct cursor c = cur_init(buf, (size_t)end), x, d;
    bool seen_bitmaps = false;
    cur_skip(&c, start);
    while (cur_remaining(&c)) {
        uint64_t at = cur_pos(&c);
        if (!cur_sub(&c, 8, &x))
            return err_fail(EINVAL,
                            "header extension at %#" PRIx64 " is truncated (%zu bytes left, its header needs 8)", at,
                            cur_remaining(&c));
        uint32_t type = cur_be32(&x), len = cur_be32(&x);
        if (type == QCOW2_EXT_END)
            return 0;
        if (!cur_sub(&c, len, &d))
            return err_fail(EINVAL,
                            "header extension %#x at %#" PRIx64 " is %u bytes long, past the end of the header "
                            "area (%zu bytes left)",
                            type, at, len, cur_remaining(&c));
        switch (type) {
        case QCOW2_EXT_BACKING_FMT:
            if (len == 0 || len > 64)
                return err_fail(EINVAL, "backing format extension has an invalid length %u", len);
            free(img->backing_fmt);
            if (!(img->backing_fmt = dup_name(cur_take(&d, len), len, "backing format")))
                return -EINVAL;
            break;
        case QCOW2_EXT_FEATURE_TABLE:
            free(img->feature_table);
            img->feature_table = malloc(len ? len : 1);
            if (!img->feature_table)
                return err_fail(ENOMEM, "out of memory");
            if (len)
                memcpy(img->feature_table, cur_take(&d, len), len);
            img->feature_table_len = len; /* a partial last entry is never read */
            break;
        case QCOW2_EXT_CRYPTO:
            if (len != 16)
                return err_fail(EINVAL, "encryption header extension has length %u, expected 16", len);
            img->crypto_off = cur_be64(&d);
            img->crypto_len = cur_be64(&d);
            break;
        case QCOW2_EXT_BITMAPS:
            if (seen_bitmaps)
                return err_fail(EINVAL, "two bitmaps extensions");
            seen_bitmaps = true;
            if (len != 24)
                return err_fail(EINVAL, "bitmaps extension has length %u, expected 24", len);
            img->nb_bitmaps = cur_be32(&d);
            if (cur_be32(&d) != 0)
                return err_fail(EINVAL, "bitmaps extension: reserved field is not zero");
            img->bitmap_dir_size = cur_be64(&d);
            img->bitmap_dir_off = cur_be64(&d);
            break;
        case QCOW2_EXT_DATA_FILE:
            if (len == 0 || len > QCOW2_MAX_NAME_EXT)
                return err_fail(EINVAL, "data file name extension has an invalid length %u", len);
            free(img->data_name);
            if (!(img->data_name = dup_name(cur_take(&d, len), len, "data file name")))
                return -EINVAL;
            break;
        default:
            break; /* unknown extensions are skipped, as the spec says */
        }
        cur_align_or_end(&c, 8); /* padding cut by the backing name's offset ends the area */
    }
    return 0;
}

/* The L1, refcount or snapshot table's bounds. Opened for check, one over the header or past
 * the end of the file is left for check to count, as qemu-img's check mode does
 * (its size limit and alignment still hold). */
static int main_table(const struct qcow2_image *img, uint64_t off, uint64_t entries, uint32_t esize, uint64_t max,
                      const char *what)
{
    int ret = qcow2_check_table(img, off, entries, esize, max, what);
    return ret == -EINVAL && img->checking && !offset_into_cluster(img, off) ? 0 : ret;
}

/* A fixed-size string field of n bytes into out (n + 1 bytes), cut at its first NUL. */
static void take_str(struct cursor *c, size_t n, char *out)
{
    const unsigned char *p = cur_take(c, n);
    size_t len = p ? strnlen((const char *)p, n) : 0;
    memcpy(out, p ? (const char *)p : "", len);
    out[len] = '\0';
}

/* The LUKS version 1 header at the start of the encryption header, for info; a
 * header that is not one is left unread (img->has_luks false): without the key
 * nothing else reads it. */
static int read_luks(struct qcow2_image *img)
{
    static const unsigned char magic[6] = {'L', 'U', 'K', 'S', 0xba, 0xbe};
    unsigned char buf[QCOW2_LUKS_HEADER_LEN];
    if (img->crypto_len < sizeof buf)
        return 0;
    int ret = vfs_pread(img->file, buf, sizeof buf, img->crypto_off);
    if (ret < 0)
        return ret;
    struct cursor c = cur_init(buf, sizeof buf);
    const unsigned char *m = cur_take(&c, sizeof magic);
    if (memcmp(m, magic, sizeof magic) || cur_be16(&c) != 1)
        return 0;
    struct qcow2_luks_info *l = &img->luks;
    take_str(&c, 32, l->cipher_name);
    take_str(&c, 32, l->cipher_mode);
    take_str(&c, 32, l->hash_spec);
    l->payload_offset = cur_be32(&c);
    l->key_bytes = cur_be32(&c);
    cur_skip(&c, 20 + 32); /* the master key's digest and its salt */
    l->mk_iterations = cur_be32(&c);
    take_str(&c, 40, l->uuid);
    for (unsigned i = 0; i < QCOW2_LUKS_SLOTS; i++) {
        l->slots[i].active = cur_be32(&c) == LUKS_SLOT_ACTIVE;
        l->slots[i].iterations = cur_be32(&c);
        cur_skip(&c, 32); /* salt */
        l->slots[i].key_offset = cur_be32(&c);
        l->slots[i].stripes = cur_be32(&c);
    }
    img->has_luks = true;
    return 0;
}

int qcow2_read_header(struct qcow2_image *img)
{
    struct qcow2_disk_header *h = &img->h;
    unsigned char *buf = NULL;
    int ret;

    if (img->file_size < QCOW2_V2_HEADER_LEN)
        return err_fail(EINVAL, "file is %" PRIu64 " bytes, too short for a qcow2 header", img->file_size);
    memset(h, 0, sizeof *h);
    ret = vfs_pread(img->file, h, sizeof *h, 0);
    if (ret < 0)
        return ret;
    header_to_cpu(h);
    if (h->magic != QCOW2_MAGIC)
        return err_fail(EINVAL, "not a qcow2 image (bad magic)");
    if (h->version != 2 && h->version != 3)
        return err_fail(ENOTSUP, "unsupported qcow2 version %u", h->version);
    if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
        return err_fail(EINVAL, "cluster_bits %u is out of range (%d to %d)", h->cluster_bits, QCOW2_MIN_CLUSTER_BITS,
                        QCOW2_MAX_CLUSTER_BITS);
    img->cluster_bits = h->cluster_bits;
    img->cluster_size = 1u << h->cluster_bits;

    if (h->version == 2) {
        h->incompatible_features = h->compatible_features = h->autoclear_features = 0;
        h->refcount_order = 4;
        h->header_length = QCOW2_V2_HEADER_LEN;
        h->compression_type = 0;
    } else {
        if (img->file_size < QCOW2_V3_HEADER_LEN)
            return err_fail(EINVAL, "file is %" PRIu64 " bytes, too short for a version 3 header", img->file_size);
        if (h->header_length < QCOW2_V3_HEADER_LEN)
            return err_fail(EINVAL, "header_length %u is shorter than the version 3 header (104)", h->header_length);
        if (h->header_length % 8)
            return err_fail(EINVAL, "header_length %u is not a multiple of 8", h->header_length);
        if (h->header_length > img->cluster_size)
            return err_fail(EINVAL, "header_length %u exceeds the cluster size %u", h->header_length, img->cluster_size);
        if (h->header_length <= 104)
            h->compression_type = 0;
        if (h->refcount_order > 6)
            return err_fail(EINVAL, "refcount_order %u is out of range (0 to 6)", h->refcount_order);
    }
    img->refcount_bits = 1u << h->refcount_order;

    /* the first cluster holds the header, extensions and backing name */
    uint32_t hdr_area = img->cluster_size;
    buf = calloc(1, hdr_area);
    if (!buf)
        return err_fail(ENOMEM, "out of memory");
    ret = vfs_pread(img->file, buf, hdr_area, 0);
    if (ret < 0)
        goto out;

    /* extensions and the feature table come first so errors can name features */
    uint64_t ext_start = h->version == 2 ? QCOW2_V2_HEADER_LEN : h->header_length;
    uint64_t ext_end = hdr_area;
    if (h->backing_file_offset) {
        if (h->backing_file_offset > hdr_area || h->backing_file_offset < ext_start) {
            ret = err_fail(EINVAL, "backing file name offset %#" PRIx64 " is outside the header cluster",
                           h->backing_file_offset);
            goto out;
        }
        ext_end = h->backing_file_offset;
    }
    ret = read_extensions(img, buf, ext_start, ext_end);
    if (ret < 0)
        goto out;

    uint64_t unknown = h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN;
    if (unknown) {
        char names[256];
        describe_unknown(img, unknown, names, sizeof names);
        ret = err_fail(ENOTSUP, "unsupported incompatible feature(s): %s", names);
        goto out;
    }
    if (h->crypt_method > QCOW2_CRYPT_LUKS) {
        ret = err_fail(EINVAL, "invalid encryption method %u", h->crypt_method);
        goto out;
    }
    if (h->crypt_method == QCOW2_CRYPT_LUKS && !img->crypto_len) {
        ret = err_fail(EINVAL, "LUKS encryption without the encryption header extension");
        goto out;
    }
    if (h->compression_type > QCOW2_COMPRESS_ZSTD) {
        ret = err_fail(ENOTSUP, "unknown compression type %u", h->compression_type);
        goto out;
    }
    if ((h->compression_type != 0) != !!(h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION)) {
        ret = err_fail(EINVAL, "compression type %u does not match the compression-type feature bit",
                       h->compression_type);
        goto out;
    }

    if (h->backing_file_offset) {
        if (h->backing_file_size == 0 || h->backing_file_size > QCOW2_MAX_BACKING_NAME) {
            ret = err_fail(EINVAL, "backing file name length %u is out of range (1 to %u)", h->backing_file_size,
                           QCOW2_MAX_BACKING_NAME);
            goto out;
        }
        struct cursor c = cur_init(buf, hdr_area);
        const unsigned char *name = cur_skip(&c, h->backing_file_offset) ? cur_take(&c, h->backing_file_size) : NULL;
        if (!name) {
            ret = err_fail(EINVAL, "backing file name (%u bytes at %#" PRIx64 ") runs past the header cluster",
                           h->backing_file_size, h->backing_file_offset);
            goto out;
        }
        if (!(img->backing_name = dup_name(name, h->backing_file_size, "backing file name"))) {
            ret = -EINVAL;
            goto out;
        }
    } else if (img->backing_fmt) {
        free(img->backing_fmt); /* a format without a file means nothing */
        img->backing_fmt = NULL;
    }

    img->ext_l2 = h->incompatible_features & QCOW2_INCOMPAT_EXTL2;
    if (img->ext_l2 && img->cluster_bits < 14) {
        ret = err_fail(EINVAL, "extended L2 entries need clusters of at least 16 KiB (have %u)", img->cluster_size);
        goto out;
    }
    img->l2_entry_words = img->ext_l2 ? 2 : 1;
    img->l2_entries = img->cluster_size / (8 * img->l2_entry_words);
    img->l2_bits = (unsigned)__builtin_ctz(img->l2_entries);
    img->sc_size = img->ext_l2 ? img->cluster_size / QCOW2_SUBCLUSTERS : img->cluster_size;
    img->sc_bits = (unsigned)__builtin_ctz(img->sc_size);
    img->csize_shift = 62 - (img->cluster_bits - 8);
    img->csize_mask = (1ull << (img->cluster_bits - 8)) - 1;
    img->coffset_mask = (1ull << img->csize_shift) - 1;

    if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
        if (!img->data_name) {
            ret = err_fail(EINVAL, "image needs an external data file but names none");
            goto out;
        }
    } else {
        if (img->data_name) {
            free(img->data_name); /* stale extension without the feature bit: ignored, as QEMU does */
            img->data_name = NULL;
        }
        if (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW) {
            ret = err_fail(EINVAL, "data-file-raw is set but the image has no external data file");
            goto out;
        }
    }

    /* virtual size and the active L1 table */
    if (h->size > QCOW2_MAX_VIRTUAL_SIZE)
        ret = err_fail(ENOTSUP, "virtual size %" PRIu64 " is more than the limit of %" PRIu64 " bytes", h->size,
                       (uint64_t)QCOW2_MAX_VIRTUAL_SIZE);
    if (ret < 0)
        goto out;
    uint64_t l2_span = (uint64_t)img->l2_entries << img->cluster_bits;
    uint64_t need_l1 = h->size / l2_span + (h->size % l2_span != 0);
    if (need_l1 > h->l1_size) {
        ret = err_fail(EINVAL, "L1 table has %u entries, too few for a virtual size of %" PRIu64 " (needs %" PRIu64 ")",
                       h->l1_size, h->size, need_l1);
        goto out;
    }
    ret = main_table(img, h->l1_table_offset, h->l1_size, 8, QCOW2_MAX_L1_BYTES, "L1 table");
    if (ret < 0)
        goto out;
    ret = main_table(img, h->refcount_table_offset, (uint64_t)h->refcount_table_clusters << img->cluster_bits, 1,
                     QCOW2_MAX_REFTABLE_BYTES, "refcount table");
    if (ret < 0)
        goto out;
    if (h->refcount_table_clusters == 0 && !img->checking) {
        ret = err_fail(EINVAL, "refcount table is empty");
        goto out;
    }
    if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
        ret = err_fail(EINVAL, "%u snapshots is more than the limit of %u", h->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
        goto out;
    }
    if (h->nb_snapshots) {
        ret = main_table(img, h->snapshots_offset, h->nb_snapshots, 40, QCOW2_MAX_SNAPSHOT_TABLE, "snapshot table");
        if (ret < 0)
            goto out;
    }
    if (img->crypto_len) {
        ret = qcow2_check_table(img, img->crypto_off, img->crypto_len, 1, 1ull << 30, "encryption header");
        if (ret < 0)
            goto out;
        if (h->crypt_method == QCOW2_CRYPT_LUKS && (ret = read_luks(img)) < 0)
            goto out;
    }
    ret = 0;
out:
    free(buf);
    return ret;
}
