/* refcount.c: reading refcounts (any width from 1 to 64 bits), and QEMU's
 * metadata-preallocation heuristic, which decides whether map reports host
 * holes inside data clusters as zero. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>

#include "qcow2_int.h"

int qcow2_get_refcount(struct qcow2_image *img, uint64_t cluster, uint64_t *refcount)
{
    uint64_t per_block = ((uint64_t)img->cluster_size * 8) >> img->h.refcount_order;
    uint64_t ti = cluster / per_block, bi = cluster % per_block;
    *refcount = 0;
    if (ti >= img->reftable_size)
        return 0;
    uint64_t block = img->reftable[ti] & QCOW2_REFT_OFFSET_MASK;
    if (!block)
        return 0;
    if (offset_into_cluster(img, block) || block + img->cluster_size > img->file_size)
        return err_fail(EUCLEAN, "refcount block at %#" PRIx64 " is misaligned or past the end of the file", block);
    unsigned bits = img->refcount_bits;
    uint64_t byte = bi * bits / 8;
    unsigned char buf[8];
    int ret = vfs_pread(img->file, buf, bits >= 8 ? bits / 8 : 1, block + byte);
    if (ret < 0)
        return ret;
    /* the entry, re-indexed within the bytes just read */
    uint64_t v = qcow2_refcount_entry(buf, bits >= 8 ? 0 : bi % (8 / bits), bits);
    *refcount = v;
    return 0;
}

/* QEMU assumes metadata preallocation when the clusters with a refcount clearly
 * outnumber the clusters the host file really stores; only then does it look at
 * host holes. Mirrored here so map agrees with qemu-img. */
bool qcow2_meta_prealloc(struct qcow2_image *img)
{
    pthread_mutex_lock(&img->prealloc_lock);
    if (img->meta_prealloc_known)
        goto out;
    img->meta_prealloc_known = true;
    img->meta_prealloc = false;
    if (!(vfs_caps(img->file) & VFS_CAP_BLOCK_STATUS))
        goto out;
    uint64_t real_clusters = img->info.file_allocated / img->cluster_size;
    uint64_t threshold = real_clusters * 10 / 9;
    if (threshold < real_clusters + 2)
        threshold = real_clusters + 2;
    uint64_t end = size_to_clusters(img, img->file_size), counted = 0;
    uint64_t per_block = ((uint64_t)img->cluster_size * 8) >> img->h.refcount_order;
    unsigned char *blk = malloc(img->cluster_size);
    if (!blk)
        goto out;
    /* whole refcount blocks at a time: one read per block, not per cluster */
    for (uint64_t ti = 0; ti * per_block < end && counted <= threshold && ti < img->reftable_size; ti++) {
        uint64_t block = img->reftable[ti] & QCOW2_REFT_OFFSET_MASK;
        if (!block)
            continue;
        if (offset_into_cluster(img, block) || block + img->cluster_size > img->file_size ||
            vfs_pread(img->file, blk, img->cluster_size, block) < 0) {
            free(blk);
            goto out;
        }
        uint64_t n = end - ti * per_block < per_block ? end - ti * per_block : per_block;
        for (uint64_t i = 0; i < n && counted <= threshold; i++)
            if (qcow2_refcount_entry(blk, i, img->refcount_bits))
                counted++;
    }
    free(blk);
    img->meta_prealloc = counted >= threshold;
out:;
    bool r = img->meta_prealloc;
    pthread_mutex_unlock(&img->prealloc_lock);
    return r;
}
