/* compress.c: decompressing one cluster, zlib (raw deflate) or zstd. The stored
 * bytes are rounded up to 512-byte sectors, so trailing bytes past the end of the
 * stream are normal; decompression stops once a whole cluster is produced. */
#include <errno.h>
#include <zlib.h>
#include <zstd.h>

#include "qcow2_int.h"

static int inflate_cluster(const void *src, size_t len, void *dst, size_t dst_len)
{
    z_stream z = {0};
    if (inflateInit2(&z, -12) != Z_OK)
        return err_fail(ENOMEM, "zlib: cannot initialise");
    z.next_in = (Bytef *)src;
    z.avail_in = (uInt)len;
    z.next_out = dst;
    z.avail_out = (uInt)dst_len;
    int zr = inflate(&z, Z_FINISH);
    inflateEnd(&z);
    /* Z_BUF_ERROR with a full buffer: the stream goes on, but we have the cluster */
    if ((zr == Z_STREAM_END || zr == Z_BUF_ERROR) && z.avail_out == 0)
        return 0;
    if (zr == Z_STREAM_END)
        return err_fail(EUCLEAN, "compressed cluster (zlib) is short: %zu of %zu bytes", dst_len - z.avail_out,
                        dst_len);
    return err_fail(EUCLEAN, "compressed cluster (zlib) is corrupt: %s", z.msg ? z.msg : "bad data");
}

/* One zstd context per thread, kept for the thread's life: creating one per
 * cluster costs more than decompressing it. */
static pthread_key_t dctx_key;
static pthread_once_t dctx_once = PTHREAD_ONCE_INIT;

static void dctx_free(void *p)
{
    ZSTD_freeDCtx(p);
}

static void dctx_key_init(void)
{
    pthread_key_create(&dctx_key, dctx_free);
}

static int zstd_cluster(const void *src, size_t len, void *dst, size_t dst_len)
{
    pthread_once(&dctx_once, dctx_key_init);
    ZSTD_DCtx *dctx = pthread_getspecific(dctx_key);
    if (!dctx) {
        dctx = ZSTD_createDCtx();
        if (!dctx)
            return err_fail(ENOMEM, "zstd: cannot create a context");
        pthread_setspecific(dctx_key, dctx);
    }
    /* the usual case, one frame: decompress it in one call straight into dst
     * (no window buffer, and faster than streaming); the sector padding after
     * the frame is left out by measuring the frame first */
    size_t fsize = ZSTD_findFrameCompressedSize(src, len);
    if (!ZSTD_isError(fsize)) {
        size_t r = ZSTD_decompressDCtx(dctx, dst, dst_len, src, fsize);
        if (!ZSTD_isError(r) && r == dst_len)
            return 0;
    }
    ZSTD_DCtx_reset(dctx, ZSTD_reset_session_and_parameters);
    /* a hostile frame must not make us allocate a large window */
    ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, 23);
    ZSTD_inBuffer in = {src, len, 0};
    ZSTD_outBuffer out = {dst, dst_len, 0};
    int ret = 0;
    while (out.pos < out.size) {
        size_t in_before = in.pos, out_before = out.pos;
        size_t r = ZSTD_decompressStream(dctx, &out, &in);
        if (ZSTD_isError(r)) {
            ret = err_fail(EUCLEAN, "compressed cluster (zstd) is corrupt: %s", ZSTD_getErrorName(r));
            break;
        }
        if (out.pos == out.size)
            break;
        if (in.pos == in.size) {
            ret = err_fail(EUCLEAN, "compressed cluster (zstd) is short: %zu of %zu bytes", out.pos, out.size);
            break;
        }
        if (in.pos == in_before && out.pos == out_before) {
            ret = err_fail(EUCLEAN, "compressed cluster (zstd) makes no progress");
            break;
        }
    }
    return ret;
}

int qcow2_decompress(int type, const void *src, size_t len, void *dst, size_t dst_len)
{
    switch (type) {
    case QCOW2_COMPRESS_ZLIB:
        return inflate_cluster(src, len, dst, dst_len);
    case QCOW2_COMPRESS_ZSTD:
        return zstd_cluster(src, len, dst, dst_len);
    default:
        return err_fail(ENOTSUP, "unknown compression type %d", type);
    }
}
