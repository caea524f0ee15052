/* create.c: making a new qcow2 image: header with its extensions, refcount
 * structures sized for the initial metadata, an empty L1 table, and optional
 * metadata preallocation through the normal allocator. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"

static const struct {
    uint8_t type, bit;
    const char *name;
} features[] = {
    {0, 0, "dirty bit"},      {0, 1, "corrupt bit"},      {0, 2, "external data file"},
    {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
    {2, 0, "bitmaps"},        {2, 1, "raw external data"},
};

static size_t put_ext(unsigned char *p, uint32_t type, const void *data, uint32_t len)
{
    uint32_t t = htobe32(type), l = htobe32(len);
    memcpy(p, &t, 4);
    memcpy(p + 4, &l, 4);
    memcpy(p + 8, data, len);
    return 8 + ((len + 7u) & ~7u);
}

static int validate(const struct qcow2_create_opts *o, uint32_t cs, int version, unsigned rb)
{
    if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1)))
        return err_fail(EINVAL, "cluster size %u is not a power of two from 512 to 2097152", cs);
    if (version != 2 && version != 3)
        return err_fail(EINVAL, "compat must be 0.10 or 1.1");
    if (rb == 0 || rb > 64 || (rb & (rb - 1)))
        return err_fail(EINVAL, "refcount_bits %u is not a power of two from 1 to 64", rb);
    if (version == 2 && rb != 16)
        return err_fail(EINVAL, "version 2 images need refcount_bits=16");
    const char *v3only = o->extended_l2 ? "extended_l2" : o->compression_zstd ? "compression_type=zstd"
                         : o->lazy_refcounts ? "lazy_refcounts" : o->data_file ? "data_file" : NULL;
    if (version == 2 && v3only)
        return err_fail(EINVAL, "%s needs compat=1.1", v3only);
    if (o->extended_l2 && cs < 16384)
        return err_fail(EINVAL, "extended_l2 needs clusters of at least 16 KiB");
    if (o->data_file_raw && !o->data_file)
        return err_fail(EINVAL, "data_file_raw needs data_file");
    if (o->data_file_raw && o->backing_file)
        return err_fail(EINVAL, "a raw external data file cannot have a backing file");
    if (o->backing_file && strlen(o->backing_file) > QCOW2_MAX_BACKING_NAME)
        return err_fail(EINVAL, "backing file name is longer than %u bytes", QCOW2_MAX_BACKING_NAME);
    if (o->backing_format && strcmp(o->backing_format, "qcow2") && strcmp(o->backing_format, "raw"))
        return err_fail(EINVAL, "backing format must be qcow2 or raw");
    if (o->prealloc_metadata && o->backing_file && !o->extended_l2)
        return err_fail(EINVAL, "a backing file and preallocation need extended_l2=on");
    return 0;
}

int qcow2_create(const char *uri, const struct qcow2_create_opts *opts)
{
    struct qcow2_create_opts o = *opts;
    uint32_t cs = o.cluster_size ? o.cluster_size : 65536;
    int version = o.version ? o.version : 3;
    unsigned rbits = o.refcount_bits ? o.refcount_bits : 16;
    int ret = validate(&o, cs, version, rbits);
    if (ret < 0)
        return ret;
    uint64_t chain_meta = 0; /* what the backing chain holds in memory, when opened */
    if (o.backing_file) {
        /* the backing file must open, and gives the size when none is asked */
        struct qcow2_image *b;
        char *buri = vfs_resolve(uri, o.backing_file);
        if (!buri)
            return err_fail(ENOMEM, "out of memory");
        struct qcow2_open_opts bo = {.format = o.backing_format, .max_meta_bytes = o.max_meta_bytes};
        ret = qcow2_open(buri, &bo, &b);
        free(buri);
        if (ret < 0)
            return err_prefix(ret, "backing file '%s'", o.backing_file);
        if (opts->max_meta_bytes) /* the new image's chain is held in one budget */
            chain_meta = atomic_load(&b->meta_used);
        if (!o.size)
            o.size = qcow2_size(b);
        if (!o.backing_format)
            o.backing_format = qcow2_get_info(b)->format == QCOW2_FMT_RAW ? "raw" : "qcow2";
        qcow2_close(b);
    }
    uint64_t size = (o.size + 511) & ~511ull;
    if (size > (1ull << 62))
        return err_fail(ENOTSUP, "size %" PRIu64 " is more than the limit of 4 EiB (2^62 bytes)", o.size);
    unsigned cbits = (unsigned)__builtin_ctz(cs);
    uint64_t l2_entries = cs / (o.extended_l2 ? 16 : 8);
    uint64_t span = l2_entries << cbits;
    uint64_t l1_entries = (size + span - 1) / span;
    if (l1_entries * 8 > QCOW2_MAX_L1_BYTES)
        return err_fail(ENOTSUP,
                        "size %" PRIu64
                        " needs an L1 table over the limit of %u bytes (32 MiB, as QEMU): use larger clusters",
                        size, QCOW2_MAX_L1_BYTES);
    uint64_t budget = o.max_meta_bytes ? o.max_meta_bytes : QCOW2_DEFAULT_META_BYTES;
    if (l1_entries * 8 > budget || chain_meta > budget - l1_entries * 8) {
        char need[32], max[32], held[32];
        if (chain_meta)
            return err_fail(ENOTSUP,
                            "size %" PRIu64 " needs an L1 table of %s in memory; with the %s its backing "
                            "chain holds, that is more than the metadata budget of %s per open image",
                            size, qcow2_human(l1_entries * 8, need, sizeof need),
                            qcow2_human(chain_meta, held, sizeof held), qcow2_human(budget, max, sizeof max));
        return err_fail(ENOTSUP,
                        "size %" PRIu64 " needs an L1 table of %s in memory, more than the metadata budget "
                        "of %s per open image: use larger clusters",
                        size, qcow2_human(l1_entries * 8, need, sizeof need), qcow2_human(budget, max, sizeof max));
    }
    uint64_t l1c = (l1_entries * 8 + cs - 1) / cs; /* none for a 0-byte disk, as qemu-img makes it */
    /* header, refcount table, refcount blocks, L1: sized together */
    uint64_t per_block = (uint64_t)cs * 8 / rbits, rt = 1, rbk = 1;
    for (;;) {
        uint64_t total = 1 + rt + rbk + l1c;
        uint64_t nrb = (total + per_block - 1) / per_block, nrt = (nrb * 8 + cs - 1) / cs;
        if (nrb == rbk && nrt == rt)
            break;
        rbk = nrb;
        rt = nrt;
    }
    uint64_t total = 1 + rt + rbk + l1c;

    unsigned char *hdr = calloc(1, cs);
    unsigned char *meta = calloc(rt + rbk + l1c, cs);
    if (!hdr || !meta) {
        free(hdr);
        free(meta);
        return err_fail(ENOMEM, "out of memory");
    }
    struct qcow2_disk_header h = {0};
    h.magic = htobe32(QCOW2_MAGIC);
    h.version = htobe32((uint32_t)version);
    h.cluster_bits = htobe32(cbits);
    h.size = htobe64(size);
    h.l1_size = htobe32((uint32_t)l1_entries);
    h.l1_table_offset = htobe64(l1c ? (1 + rt + rbk) << cbits : 0);
    h.refcount_table_offset = htobe64(1ull << cbits);
    h.refcount_table_clusters = htobe32((uint32_t)rt);
    uint64_t incompat = (o.data_file ? QCOW2_INCOMPAT_DATA_FILE : 0) |
                        (o.compression_zstd ? QCOW2_INCOMPAT_COMPRESSION : 0) | (o.extended_l2 ? QCOW2_INCOMPAT_EXTL2 : 0);
    size_t hlen = version == 3 ? 112 : QCOW2_V2_HEADER_LEN;
    if (version == 3) {
        h.incompatible_features = htobe64(incompat);
        h.compatible_features = htobe64(o.lazy_refcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0);
        h.autoclear_features = htobe64(o.data_file_raw ? QCOW2_AUTOCLEAR_DATA_FILE_RAW : 0);
        h.refcount_order = htobe32((uint32_t)__builtin_ctz(rbits));
        h.header_length = htobe32(112);
        h.compression_type = o.compression_zstd ? QCOW2_COMPRESS_ZSTD : QCOW2_COMPRESS_ZLIB;
    }
    memcpy(hdr, &h, hlen);
    size_t p = hlen;
    if (o.backing_format)
        p += put_ext(hdr + p, QCOW2_EXT_BACKING_FMT, o.backing_format, (uint32_t)strlen(o.backing_format));
    if (o.data_file)
        p += put_ext(hdr + p, QCOW2_EXT_DATA_FILE, o.data_file, (uint32_t)strlen(o.data_file));
    if (version == 3) {
        unsigned char ft[sizeof features / sizeof features[0] * 48] = {0};
        for (size_t i = 0; i < sizeof features / sizeof features[0]; i++) {
            ft[i * 48] = features[i].type;
            ft[i * 48 + 1] = features[i].bit;
            memcpy(ft + i * 48 + 2, features[i].name, strlen(features[i].name));
        }
        p += put_ext(hdr + p, QCOW2_EXT_FEATURE_TABLE, ft, sizeof ft);
    }
    p += 8; /* end of extensions */
    if (o.backing_file) {
        size_t bl = strlen(o.backing_file);
        if (p + bl > cs) {
            ret = err_fail(EINVAL, "header and backing file name do not fit in one %u-byte cluster", cs);
            goto out;
        }
        uint64_t bo = htobe64(p);
        uint32_t bs = htobe32((uint32_t)bl);
        memcpy(hdr + 8, &bo, 8);
        memcpy(hdr + 16, &bs, 4);
        memcpy(hdr + p, o.backing_file, bl);
    } else if (p > cs) {
        ret = err_fail(EINVAL, "header extensions do not fit in one %u-byte cluster", cs);
        goto out;
    }
    /* refcount table -> blocks; every initial cluster has refcount 1 */
    for (uint64_t i = 0; i < rbk; i++) {
        uint64_t be = htobe64((1 + rt + i) << cbits);
        memcpy(meta + i * 8, &be, 8);
    }
    unsigned char *blocks = meta + rt * cs;
    for (uint64_t c = 0; c < total; c++) {
        unsigned char *b = blocks + (c / per_block) * cs;
        uint64_t i = c % per_block;
        if (rbits < 8)
            b[i * rbits / 8] |= (unsigned char)(1u << (i * rbits % 8));
        else
            b[i * (rbits / 8) + rbits / 8 - 1] = 1;
    }
    struct vfs_file *f = NULL;
    ret = vfs_open(uri, VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL, &f);
    if (ret < 0)
        goto out;
    ret = vfs_pwrite(f, hdr, cs, 0);
    if (ret == 0)
        ret = vfs_pwrite(f, meta, (rt + rbk + l1c) * cs, (uint64_t)cs);
    if (ret == 0)
        ret = vfs_flush(f);
    vfs_close(f);
    if (ret == 0 && o.data_file) {
        char *duri = vfs_resolve(uri, o.data_file);
        struct vfs_file *d = NULL;
        ret = duri ? vfs_open(duri, VFS_O_RDWR | VFS_O_CREATE, &d) : err_fail(ENOMEM, "out of memory");
        if (ret == 0) {
            ret = vfs_truncate(d, size);
            vfs_close(d);
        }
        free(duri);
    }
    if (ret == 0 && o.prealloc_metadata)
        ret = qcow2_preallocate(uri);
    if (ret < 0)
        vfs_remove(uri);
out:
    free(hdr);
    free(meta);
    return ret;
}

/* Give every guest cluster an L2 entry and a host cluster (no data written). */
int qcow2_preallocate(const char *uri)
{
    struct qcow2_open_opts oo = {.read_write = true, .no_backing = true};
    struct qcow2_image *img;
    int ret = qcow2_open(uri, &oo, &img);
    if (ret < 0)
        return ret;
    pthread_rwlock_wrlock(&img->rwlock);
    uint64_t cs = img->cluster_size;
    for (uint64_t off = 0; off < img->size && ret == 0; off += cs) {
        struct l2_slice *s;
        uint32_t idx;
        ret = qcow2_l2_for_write(img, off, &s, &idx);
        if (ret < 0)
            break;
        uint64_t host;
        if (img->data != img->file)
            host = off; /* external data files map guest offset = host offset */
        else
            ret = alloc_clusters(img, 1, &host);
        if (ret == 0) {
            s->entries[idx * img->l2_entry_words] = host | QCOW2_OFLAG_COPIED;
            if (img->ext_l2)
                s->entries[idx * 2 + 1] = img->backing_name ? 0 : 0xffffffffull;
            l2_cache_mark_dirty(img, s);
        }
        l2_cache_put(img, s);
        if (ret == 0 && img->cache.ndirty * 2 >= img->cache.nslots)
            ret = meta_flush(img);
    }
    if (ret == 0 && img->data == img->file && img->file_size) {
        /* the file covers every preallocated cluster, as qemu-img leaves it */
        ret = vfs_truncate(img->file, img->file_size);
    }
    pthread_rwlock_unlock(&img->rwlock);
    if (ret == 0)
        ret = qcow2_flush(img);
    qcow2_close(img);
    return ret;
}
