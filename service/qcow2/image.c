/* image.c: opening an image and its backing chain (qcow2 or raw), external
 * data files, snapshot views, and the facts qcow2_get_info reports. */
#include <errno.h>
#include <stdatomic.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"

#define SLICE_MAX (32u << 10)

static void free_image(struct qcow2_image *img)
{
    if (!img)
        return;
    if (img->backing)
        free_image(img->backing);
    if (img->data && img->data != img->file)
        vfs_close(img->data);
    if (img->file)
        vfs_close(img->file);
    l2_cache_destroy(&img->cache);
    rc_cache_drop(img);
    free(img->pending);
    free(img->quar);
    pthread_rwlock_destroy(&img->rwlock);
    pthread_mutex_destroy(&img->change_lock);
    qcow2_free_snapshots(img);
    qcow2_free_bitmaps(img);
    pthread_mutex_destroy(&img->prealloc_lock);
    pthread_mutex_destroy(&img->sent_lock);
    free(img->sent);
    pthread_mutex_destroy(&img->bm_lock);
    free(img->l1);
    free(img->reftable);
    free(img->uri);
    free(img->given_name);
    free(img->backing_name);
    free(img->backing_fmt);
    free(img->backing_uri);
    free(img->data_name);
    free(img->data_uri);
    free(img->feature_table);
    free(img);
}

int qcow2_close(struct qcow2_image *img)
{
    int ret = 0;
    if (img && img->rw && img->fmt == QCOW2_FMT_QCOW2) {
        pthread_rwlock_wrlock(&img->rwlock);
        ret = finish_write(img);
        pin_drain(img, true); /* no pins are out: their holders keep the image open */
        pthread_rwlock_unlock(&img->rwlock);
    }
    free_image(img);
    return ret;
}

static int open_layer(const char *uri, const char *fmt, const struct qcow2_open_opts *o, int depth, const char **chain,
                      struct qcow2_image *top, struct qcow2_image **out);

/* Is the file's first word the qcow2 magic? */
static int has_qcow2_magic(struct vfs_file *f)
{
    unsigned char m[4];
    int ret = vfs_pread(f, m, 4, 0);
    if (ret < 0)
        return ret;
    return be32_at(m) == QCOW2_MAGIC;
}

static int open_backing(struct qcow2_image *img, const struct qcow2_open_opts *o, const char **chain)
{
    if (o->contained && !vfs_name_is_contained(img->backing_name))
        return err_fail(EPERM, "backing file '%s' is outside the image's store", img->backing_name);
    img->backing_uri = vfs_resolve(img->uri, img->backing_name);
    if (!img->backing_uri)
        return err_fail(ENOMEM, "out of memory");
    const char *fmt = img->backing_fmt;
    if (fmt && strcmp(fmt, "qcow2") && strcmp(fmt, "raw"))
        return err_fail(ENOTSUP, "backing file '%s' has format '%s', which is not supported", img->backing_name, fmt);
    if ((unsigned)img->depth + 1 >= (o->max_chain_depth ? o->max_chain_depth : QCOW2_DEFAULT_CHAIN_DEPTH))
        return err_fail(ELOOP, "backing chain is deeper than %u images",
                        o->max_chain_depth ? o->max_chain_depth : QCOW2_DEFAULT_CHAIN_DEPTH);
    chain[img->depth] = img->uri;
    int ret = open_layer(img->backing_uri, fmt, o, img->depth + 1, chain, img->acct ? img->acct : img, &img->backing);
    if (ret < 0)
        return err_prefix(ret, "backing file '%s'", img->backing_name);
    return 0;
}

static int open_data_file(struct qcow2_image *img, const struct qcow2_open_opts *o)
{
    if (o->contained && !vfs_name_is_contained(img->data_name))
        return err_fail(EPERM, "data file '%s' is outside the image's store", img->data_name);
    img->data_uri = vfs_resolve(img->uri, img->data_name);
    if (!img->data_uri)
        return err_fail(ENOMEM, "out of memory");
    int ret = vfs_open(img->data_uri, o->read_write ? VFS_O_RDWR : VFS_O_RDONLY, &img->data);
    if (ret < 0)
        return err_prefix(ret, "data file '%s'", img->data_name);
    return 0;
}

static int open_qcow2(struct qcow2_image *img, const struct qcow2_open_opts *o, const char **chain)
{
    int ret = qcow2_read_header(img);
    if (ret < 0)
        return ret;
    img->size = img->h.size;
    img->l1_size = img->h.l1_size;
    img->reftable_size = (uint32_t)(((uint64_t)img->h.refcount_table_clusters << img->cluster_bits) / 8);
    /* both tables stay in memory while the image is open */
    if ((ret = meta_charge(img, (uint64_t)img->l1_size * 8, "the L1 table")) < 0 ||
        (ret = meta_charge(img, (uint64_t)img->reftable_size * 8, "the refcount table")) < 0)
        return ret;
    ret = qcow2_load_u64_table(img, img->h.l1_table_offset, img->h.l1_size, &img->l1);
    if (ret < 0)
        return err_prefix(ret, "reading the L1 table");
    ret = qcow2_load_u64_table(img, img->h.refcount_table_offset, img->reftable_size, &img->reftable);
    if (ret < 0)
        return err_prefix(ret, "reading the refcount table");
    uint32_t slice = img->cluster_size < SLICE_MAX ? img->cluster_size : SLICE_MAX;
    ret = l2_cache_init(&img->cache, o->l2_cache_bytes ? o->l2_cache_bytes : QCOW2_DEFAULT_L2_CACHE, slice);
    if (ret < 0)
        return ret;
    ret = qcow2_read_snapshots(img);
    if (ret < 0)
        return ret;
    ret = qcow2_read_bitmaps(img);
    if (ret < 0)
        return ret;
    img->data = img->file;
    if (img->data_name) {
        ret = open_data_file(img, o);
        if (ret < 0)
            return ret;
    }
    if (img->backing_name && !o->no_backing) {
        ret = open_backing(img, o, chain);
        if (ret < 0)
            return ret;
    }
    return 0;
}

static void fill_info(struct qcow2_image *img)
{
    struct qcow2_info *i = &img->info;
    i->format = img->fmt;
    i->uri = img->uri;
    i->virtual_size = img->fmt == QCOW2_FMT_RAW ? img->file_size : img->h.size;
    i->file_size = img->file_size;
    if (img->fmt == QCOW2_FMT_RAW)
        return;
    const struct qcow2_disk_header *h = &img->h;
    i->version = h->version;
    i->cluster_size = img->cluster_size;
    i->refcount_bits = img->refcount_bits;
    i->extended_l2 = img->ext_l2;
    i->lazy_refcounts = h->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS;
    i->dirty = h->incompatible_features & QCOW2_INCOMPAT_DIRTY;
    i->corrupt = h->incompatible_features & QCOW2_INCOMPAT_CORRUPT;
    i->compression = h->compression_type == QCOW2_COMPRESS_ZSTD ? "zstd" : "zlib";
    i->backing_file = img->backing_name;
    i->backing_format = img->backing_fmt;
    i->backing_uri = img->backing_uri;
    i->data_file = img->data_name;
    i->data_file_uri = img->data_uri;
    i->data_file_raw = h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW;
    i->crypt_method = (int)h->crypt_method;
    i->luks = img->has_luks ? &img->luks : NULL;
    i->incompatible = h->incompatible_features;
    i->compatible = h->compatible_features;
    i->autoclear = h->autoclear_features;
    i->nb_snapshots = img->nb_snaps;
    i->snapshots = img->snaps;
    i->bitmaps = img->bitmaps;
    i->l1_size = h->l1_size;
    i->l1_offset = h->l1_table_offset;
    i->refcount_table_offset = h->refcount_table_offset;
    i->refcount_table_clusters = h->refcount_table_clusters;
}

static int open_layer(const char *uri, const char *fmt, const struct qcow2_open_opts *o, int depth, const char **chain,
                      struct qcow2_image *top, struct qcow2_image **out)
{
    struct qcow2_image *img = calloc(1, sizeof *img);
    if (!img)
        return err_fail(ENOMEM, "out of memory");
    pthread_mutex_init(&img->prealloc_lock, NULL);
    pthread_mutex_init(&img->sent_lock, NULL);
    pthread_mutex_init(&img->bm_lock, NULL);
    pthread_rwlock_init(&img->rwlock, NULL);
    qcow2_changes_init(img);
    img->depth = depth;
    img->free_hint = 1;
    img->bmw = (struct bm_window){.bitmap = -1, .data_idx = UINT32_MAX};
    img->meta_max = o->max_meta_bytes ? o->max_meta_bytes : QCOW2_DEFAULT_META_BYTES;
    img->acct = top; /* a backing layer's tables count in the budget of the chain's top */
    static _Atomic uint64_t next_id = 1;
    img->id = atomic_fetch_add(&next_id, 1);
    int ret = vfs_open(uri, o->read_write && depth == 0 ? VFS_O_RDWR : VFS_O_RDONLY, &img->file);
    if (ret < 0)
        goto fail;
    if (!(img->uri = strdup(vfs_file_uri(img->file))) || !(img->given_name = strdup(uri))) {
        ret = err_fail(ENOMEM, "out of memory");
        goto fail;
    }
    for (int i = 0; i < depth; i++)
        if (!strcmp(chain[i], img->uri)) {
            ret = err_fail(ELOOP, "backing chain loop: %s is its own backing file", img->uri);
            goto fail;
        }
    ret = vfs_size(img->file, &img->file_size);
    if (ret < 0)
        goto fail;
    struct vfs_stat st;
    if (vfs_stat(img->uri, &st) == 0)
        img->info.file_allocated = st.allocated;

    if (!fmt) {
        ret = has_qcow2_magic(img->file);
        if (ret < 0)
            goto fail;
        if (!ret) {
            ret = depth ? err_fail(EINVAL, "not a qcow2 image and no backing format says it is raw (set -F raw)")
                        : err_fail(EINVAL, "not a qcow2 image (bad magic); for a raw image say -f raw");
            goto fail;
        }
        fmt = "qcow2";
    }
    if (!strcmp(fmt, "raw")) {
        img->fmt = QCOW2_FMT_RAW;
        img->size = img->file_size;
        img->data = img->file;
    } else if (!strcmp(fmt, "qcow2")) {
        img->fmt = QCOW2_FMT_QCOW2;
        img->checking = o->allow_corrupt && !depth;
        ret = open_qcow2(img, o, chain);
        if (ret < 0)
            goto fail;
    } else {
        ret = err_fail(ENOTSUP, "unknown format '%s' (qcow2 or raw)", fmt);
        goto fail;
    }
    fill_info(img);
    *out = img;
    return 0;
fail:
    free_image(img);
    return ret;
}

/* Checks before the first write is allowed. */
static int make_writable(struct qcow2_image *img, const struct qcow2_open_opts *o)
{
    if (img->fmt == QCOW2_FMT_RAW) {
        img->rw = true;
        return 0;
    }
    if (img->h.crypt_method)
        return err_fail(ENOTSUP, "image is encrypted; qcowd cannot write it");
    if ((img->h.incompatible_features & QCOW2_INCOMPAT_CORRUPT) && !o->allow_corrupt)
        return err_fail(EUCLEAN,
                        "image is marked corrupt (the corrupt bit of its incompatible features is set); it can be "
                        "opened read-only, or repaired with check -r all");
    img->rw = true;
    img->no_sync = o->cache_unsafe;
    img->release_data = o->release_data;
    if ((img->h.incompatible_features & QCOW2_INCOMPAT_DIRTY) && !o->allow_corrupt) {
        /* a crash with lazy refcounts: the refcounts must be rebuilt before use,
         * a walk of every table whose length the image decides */
        if (o->no_rebuild) {
            img->rw = false;
            return err_fail(EROFS, "the image was not closed cleanly (dirty bit, lazy refcounts): its refcounts must "
                                   "be rebuilt before it is written, by a check with repair");
        }
        int ret = qcow2_repair_refcounts(img);
        if (ret < 0) {
            img->rw = false;
            return err_prefix(ret, "rebuilding refcounts of a dirty image");
        }
    }
    return 0;
}

int qcow2_open(const char *uri, const struct qcow2_open_opts *opts, struct qcow2_image **out)
{
    struct qcow2_open_opts defaults = {0};
    const struct qcow2_open_opts *o = opts ? opts : &defaults;
    unsigned max = o->max_chain_depth ? o->max_chain_depth : QCOW2_DEFAULT_CHAIN_DEPTH;
    const char **chain = calloc(max + 1, sizeof *chain);
    if (!chain)
        return err_fail(ENOMEM, "out of memory");
    if (o->read_write && o->snapshot) {
        free(chain);
        return err_fail(EINVAL, "a snapshot view is read-only");
    }
    struct qcow2_image *img;
    err_clear();
    int ret = open_layer(uri, o->format, o, 0, chain, NULL, &img);
    free(chain);
    if (ret < 0)
        return ret;
    if (o->read_write) {
        ret = make_writable(img, o);
        if (ret < 0) {
            qcow2_close(img);
            return ret;
        }
    }
    if (o->snapshot) {
        if (img->fmt != QCOW2_FMT_QCOW2) {
            qcow2_close(img);
            return err_fail(EINVAL, "a raw image has no snapshots");
        }
        ret = qcow2_use_snapshot(img, o->snapshot);
        if (ret < 0) {
            qcow2_close(img);
            return ret;
        }
    }
    *out = img;
    return 0;
}

uint64_t qcow2_size(const struct qcow2_image *img)
{
    return img->size;
}

const struct qcow2_info *qcow2_get_info(const struct qcow2_image *img)
{
    return &img->info;
}

struct qcow2_image *qcow2_backing(const struct qcow2_image *img)
{
    return img->backing;
}

int qcow2_refresh_layer(struct qcow2_image *img)
{
    uint64_t fsize;
    int ret = vfs_size(img->file, &fsize);
    if (ret < 0)
        return ret;
    if (img->fmt == QCOW2_FMT_RAW) {
        img->file_size = img->size = fsize;
        fill_info(img);
        return 0;
    }
    /* a fresh parse of the same file, then its tables move into img */
    struct qcow2_open_opts o = {.no_backing = true, .l2_cache_bytes = 64u << 10};
    const char *chain[1] = {NULL};
    struct qcow2_image *fresh;
    ret = open_layer(img->uri, "qcow2", &o, 0, chain, NULL, &fresh);
    if (ret < 0)
        return err_prefix(ret, "re-reading %s", img->uri);
    l2_cache_forget(img, 0); /* every slice */
    img->h = fresh->h;
    img->size = fresh->size;
    img->file_size = fresh->file_size;
    /* the budget follows the tables: fresh was charged the same way */
    meta_release(img, (uint64_t)img->l1_size * 8 + (uint64_t)img->reftable_size * 8);
    meta_force(img, (uint64_t)fresh->l1_size * 8 + (uint64_t)fresh->reftable_size * 8);
    uint64_t *t = img->l1;
    img->l1 = fresh->l1;
    img->l1_size = fresh->l1_size;
    fresh->l1 = t;
    t = img->reftable;
    img->reftable = fresh->reftable;
    img->reftable_size = fresh->reftable_size;
    fresh->reftable = t;
    pthread_mutex_lock(&img->prealloc_lock);
    img->meta_prealloc_known = false;
    pthread_mutex_unlock(&img->prealloc_lock);
    qcow2_note_change(img, true); /* compressed read-ahead windows expire; the file changed */
    img->info.file_allocated = fresh->info.file_allocated;
    fill_info(img);
    free_image(fresh);
    return 0;
}
