/* read.c: reading guest bytes through the chain, and the block status that
 * qemu-img map reports. Both are safe to call from many threads at once. */
#include <errno.h>
#include <stdatomic.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"

static int read_range(struct qcow2_image *img, unsigned char *buf, uint64_t len, uint64_t off);

/* Bytes the backing chain supplies for an unallocated range; zeroes past its end. */
static int read_backing(struct qcow2_image *img, unsigned char *buf, uint64_t len, uint64_t off)
{
    struct qcow2_image *b = img->backing;
    if (!b || off >= b->size) {
        memset(buf, 0, len);
        return 0;
    }
    uint64_t n = b->size - off < len ? b->size - off : len;
    int ret = read_range(b, buf, n, off);
    if (ret < 0)
        return ret;
    memset(buf + n, 0, len - n);
    return 0;
}

/* Per-thread buffers for compressed clusters, freed when the thread ends. The
 * window holds host bytes read at once: compressed clusters lie one after the
 * other, so a reader of many clusters needs one read for all of them, not one
 * per cluster. A window belongs to one open image and one write generation, so
 * it never outlives a write that could reuse its bytes. */
#define ZWIN (1u << 20)
#define ZREADAHEAD (256u << 10) /* the least a window read takes, for small sequential reads */
struct zbufs {
    unsigned char *out;
    size_t out_cap;
    unsigned char *win;
    uint64_t win_img, win_gen, win_off, win_len;
};
static pthread_key_t zbuf_key;
static pthread_once_t zbuf_once = PTHREAD_ONCE_INIT;

static void zbufs_free(void *p)
{
    struct zbufs *z = p;
    free(z->out);
    free(z->win);
    free(z);
}

static void zbuf_key_init(void)
{
    pthread_key_create(&zbuf_key, zbufs_free);
}

/* The calling thread's buffers; out only when out_need is non-zero. */
static struct zbufs *zbufs_get(size_t out_need)
{
    pthread_once(&zbuf_once, zbuf_key_init);
    struct zbufs *z = pthread_getspecific(zbuf_key);
    if (!z) {
        if (!(z = calloc(1, sizeof *z)))
            return NULL;
        pthread_setspecific(zbuf_key, z);
    }
    if (z->out_cap < out_need) {
        free(z->out);
        z->out = malloc(out_need);
        z->out_cap = z->out ? out_need : 0;
        if (!z->out)
            return NULL;
    }
    if (!z->win && !(z->win = malloc(2 * ZWIN)))
        return NULL;
    return z;
}

/* The compressed bytes of m (guest offset off, bytes left in the request), from
 * the window or a fresh read into it. A fresh read takes the run of compressed
 * clusters the request goes on to (qcow2_compressed_run_end), and at least
 * ZREADAHEAD, so a convert reading 2 MiB chunks on several threads reads each
 * chunk's bytes once, not a window spilling into the next thread's chunk. */
static int compressed_bytes(struct qcow2_image *img, struct zbufs *z, const struct mapping *m, uint64_t off,
                            uint64_t bytes, const unsigned char **p)
{
    uint64_t gen = atomic_load(&img->write_gen);
    if (z->win_img != img->id || z->win_gen != gen || m->coff < z->win_off ||
        m->coff + m->csize > z->win_off + z->win_len) {
        /* a cluster is at most 2 MiB + a sector; the window 2 MiB */
        if (m->csize > 2 * ZWIN)
            return err_fail(EUCLEAN, "compressed cluster of %u bytes is too large", m->csize);
        uint64_t len = qcow2_compressed_run_end(img, off, bytes, m, 2 * ZWIN) - m->coff;
        if (len < ZREADAHEAD)
            len = ZREADAHEAD < m->csize ? m->csize : ZREADAHEAD;
        if (m->coff < img->file_size && len > img->file_size - m->coff && m->csize <= img->file_size - m->coff)
            len = img->file_size - m->coff; /* no read past the end of the file */
        z->win_img = 0;
        int ret = vfs_pread(img->file, z->win, len, m->coff);
        if (ret < 0)
            return ret;
        z->win_img = img->id;
        z->win_gen = gen;
        z->win_off = m->coff;
        z->win_len = len;
    }
    *p = z->win + (m->coff - z->win_off);
    return 0;
}

/* One compressed cluster's bytes [off, off+len) into buf. A whole cluster is
 * decompressed straight into buf; a part goes through the thread's buffer. */
static int read_compressed(struct qcow2_image *img, const struct mapping *m, unsigned char *buf, uint64_t len,
                           uint64_t off, uint64_t req_left)
{
    bool whole = len == img->cluster_size;
    struct zbufs *z = zbufs_get(whole ? 0 : img->cluster_size);
    if (!z)
        return err_fail(ENOMEM, "out of memory for a compressed cluster");
    const unsigned char *in = NULL;
    int ret = compressed_bytes(img, z, m, off, req_left, &in);
    if (ret < 0)
        return ret;
    ret = qcow2_decompress(img->h.compression_type, in, m->csize, whole ? buf : z->out, img->cluster_size);
    if (ret < 0)
        return err_prefix(ret, "guest offset %#" PRIx64, off & ~(uint64_t)(img->cluster_size - 1));
    if (!whole)
        memcpy(buf, z->out + offset_into_cluster(img, off), len);
    return 0;
}

static int read_range(struct qcow2_image *img, unsigned char *buf, uint64_t len, uint64_t off)
{
    if (img->fmt == QCOW2_FMT_RAW)
        return vfs_pread(img->file, buf, len, off);
    if (img->h.crypt_method)
        return err_fail(ENOTSUP, "image is encrypted; qcowd does not decrypt");
    while (len) {
        struct mapping m;
        int ret = qcow2_get_mapping(img, off, len, &m);
        if (ret < 0)
            return ret;
        uint64_t n = m.bytes;
        switch (m.type) {
        case SC_UNALLOC:
            ret = read_backing(img, buf, n, off);
            break;
        case SC_ZERO:
            memset(buf, 0, n);
            break;
        case SC_NORMAL:
            ret = vfs_pread(img->data, buf, n, m.host_off);
            break;
        case SC_COMPRESSED:
            ret = read_compressed(img, &m, buf, n, off, len);
            break;
        }
        if (ret < 0)
            return ret;
        buf += n;
        off += n;
        len -= n;
    }
    return 0;
}

int qcow2_read_unlocked(struct qcow2_image *img, void *buf, uint64_t len, uint64_t off)
{
    return read_range(img, buf, len, off);
}

int qcow2_pread(struct qcow2_image *img, void *buf, size_t len, uint64_t off)
{
    uint64_t end;
    if (__builtin_add_overflow(off, (uint64_t)len, &end) || end > img->size)
        return err_fail(EINVAL, "read of %zu bytes at %" PRIu64 " is past the end of the disk (%" PRIu64 " bytes)", len, off,
                        img->size);
    pthread_rwlock_rdlock(&img->rwlock);
    int ret = read_range(img, buf, len, off);
    pthread_rwlock_unlock(&img->rwlock);
    return ret;
}

/* Status flags, as QEMU's block layer names them. */
#define BS_DATA 1u
#define BS_ZERO 2u
#define BS_OFFSET_VALID 4u
#define BS_ALLOCATED 8u
#define BS_COMPRESSED 16u

struct layer_status {
    unsigned flags;
    uint64_t bytes;
    uint64_t host;
    struct vfs_file *file;
};

/* One layer's status for [off, off+bytes), bytes already within the layer's size. */
static int layer_status(struct qcow2_image *img, uint64_t off, uint64_t bytes, struct layer_status *st)
{
    st->flags = 0;
    st->file = NULL;
    st->host = 0;
    if (img->fmt == QCOW2_FMT_RAW) {
        uint64_t pnum;
        int r = vfs_block_status(img->file, off, bytes, &pnum);
        if (r < 0)
            return r;
        st->bytes = pnum;
        st->flags = (r == VFS_BS_DATA ? BS_DATA : BS_ZERO) | BS_OFFSET_VALID | BS_ALLOCATED;
        st->host = off;
        st->file = img->file;
        return 0;
    }
    struct mapping m;
    int ret = qcow2_get_mapping(img, off, bytes, &m);
    if (ret < 0)
        return ret;
    st->bytes = m.bytes;
    if (m.host_valid && !img->h.crypt_method) {
        st->flags |= BS_OFFSET_VALID;
        st->host = m.host_off;
        st->file = img->data;
    }
    if (m.type == SC_ZERO)
        st->flags |= BS_ZERO;
    else if (m.type == SC_NORMAL)
        st->flags |= BS_DATA;
    else if (m.type == SC_COMPRESSED)
        st->flags |= BS_DATA | BS_COMPRESSED;

    if (st->flags & (BS_DATA | BS_ZERO)) {
        st->flags |= BS_ALLOCATED;
    } else if (!img->backing || off >= img->backing->size) {
        st->flags |= BS_ZERO; /* nothing below: reads as zero, yet not allocated here */
    }
    if (m.type == SC_NORMAL && (st->flags & BS_OFFSET_VALID) && qcow2_meta_prealloc(img)) {
        uint64_t pnum;
        int r = vfs_block_status(img->data, st->host, st->bytes, &pnum);
        if (r >= 0) { /* extra information only: errors are ignored */
            if (r == VFS_BS_HOLE)
                st->flags |= BS_ZERO;
            st->bytes = pnum;
        }
    }
    return 0;
}

static int block_status(struct qcow2_image *img, uint64_t off, uint64_t len, struct qcow2_extent *ext);

int qcow2_block_status(struct qcow2_image *img, uint64_t off, uint64_t len, struct qcow2_extent *ext)
{
    pthread_rwlock_rdlock(&img->rwlock);
    int ret = block_status(img, off, len, ext);
    pthread_rwlock_unlock(&img->rwlock);
    return ret;
}

static int block_status(struct qcow2_image *img, uint64_t off, uint64_t len, struct qcow2_extent *ext)
{
    if (off >= img->size || len == 0)
        return err_fail(EINVAL, "block status at %" PRIu64 " is past the end of the disk", off);
    if (len > img->size - off)
        len = img->size - off;
    struct qcow2_image *layer = img;
    int depth = 0;
    struct layer_status st;
    for (;;) {
        uint64_t n = len;
        if (off + n > layer->size)
            n = layer->size - off; /* callers below guarantee off < layer->size */
        int ret = layer_status(layer, off, n, &st);
        if (ret < 0)
            return ret;
        len = st.bytes;
        if ((st.flags & (BS_DATA | BS_ZERO)) || !layer->backing)
            break;
        layer = layer->backing;
        depth++;
    }
    ext->start = off;
    ext->length = len;
    ext->depth = depth;
    ext->present = st.flags & BS_ALLOCATED;
    ext->zero = st.flags & BS_ZERO;
    ext->data = st.flags & BS_DATA;
    ext->compressed = st.flags & BS_COMPRESSED;
    ext->offset_valid = st.flags & BS_OFFSET_VALID;
    ext->offset = st.host;
    ext->file = st.file ? vfs_file_uri(st.file) : NULL;
    return 0;
}
