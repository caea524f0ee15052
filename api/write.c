/* write.c: writing guest bytes over HTTP, ovirt-imageio style: PUT .../data
 * (streamed into the image as it arrives), PATCH .../data (zero, discard, flush)
 * and OPTIONS .../data (what the endpoint can do). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "api_int.h"
#include "catalog.h"
#include "err.h"
#include "qcow2.h"

/* Bytes gathered before a write; the pieces MHD hands over are small and
 * unaligned, so they are gathered into blocks aligned on the guest offset (whole
 * clusters for cluster sizes up to this). Bounds the memory of one upload. */
#define PUT_BLOCK (256u << 10)

struct put_data {
    struct catalog_image *ci; /* a writable reference */
    uint64_t off;             /* guest offset of buf[0]: everything before is written */
    uint64_t end;             /* guest offset after the announced range */
    uint64_t len;             /* bytes announced */
    uint64_t recv;            /* body bytes received */
    bool flush;               /* qcow2_flush before answering */
    char *buf;
    size_t blen;
};

static int put_write(struct put_data *pd)
{
    if (!pd->blen)
        return 0;
    int ret = qcow2_pwrite(catalog_image_qcow2(pd->ci), pd->buf, pd->blen, pd->off);
    if (ret < 0)
        return err_prefix(ret, "writing %zu bytes at %" PRIu64, pd->blen, pd->off);
    pd->off += pd->blen;
    pd->blen = 0;
    return 0;
}

static int put_data_cb(struct req *r, const char *buf, size_t n)
{
    struct put_data *pd = r->ctx;
    if (n > pd->end - pd->off - pd->blen)
        return err_fail(EINVAL, "the body is longer than the %" PRIu64 " bytes of its range", pd->len);
    pd->recv += n;
    while (n) {
        /* fill up to the next block boundary (or the end of the range) */
        uint64_t lim = PUT_BLOCK - pd->off % PUT_BLOCK;
        if (lim > pd->end - pd->off)
            lim = pd->end - pd->off;
        size_t k = (size_t)lim - pd->blen < n ? (size_t)lim - pd->blen : n;
        memcpy(pd->buf + pd->blen, buf, k);
        pd->blen += k;
        buf += k;
        n -= k;
        if (pd->blen == lim) {
            int ret = put_write(pd);
            if (ret < 0)
                return ret;
        }
    }
    return 0;
}

static enum MHD_Result put_end(struct req *r)
{
    struct put_data *pd = r->ctx;
    int ret = put_write(pd);
    if (ret == 0 && pd->off != pd->end)
        ret = err_fail(EINVAL, "the body ended after %" PRIu64 " bytes, before the end of its range", pd->recv);
    if (ret == 0 && pd->flush)
        ret = qcow2_flush(catalog_image_qcow2(pd->ci));
    /* the write is over: let go before answering, so that "image-changed" is
     * announced, and the image free for a job or a DELETE, before the client
     * hears the answer (put_done would do it only after it is sent) */
    catalog_put_writable(pd->ci);
    pd->ci = NULL;
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_reply_empty(r, 204, NULL, NULL);
}

static void put_done(struct req *r, bool completed)
{
    struct put_data *pd = r->ctx;
    if (pd->ci && !completed && pd->blen) {
        /* the client went away: keep what arrived, claim nothing more */
        int ret = put_write(pd);
        if (ret < 0)
            fprintf(stderr, "qcowd: %s: after an interrupted upload: %s\n", catalog_image_name(pd->ci),
                    err_msg(ret));
    }
    if (pd->ci)
        catalog_put_writable(pd->ci);
    free(pd->buf);
    free(pd);
    r->ctx = NULL;
}

static const struct api_body put_ops = {.data = put_data_cb, .end = put_end, .done = put_done};

enum MHD_Result api_data_put(struct req *r, char **args)
{
    bool flush = true;
    uint64_t qoff = 0;
    int ret = api_query_bool(r, "flush", &flush);
    if (ret >= 0)
        ret = api_query_u64(r, "offset", &qoff);
    if (ret < 0)
        return api_reply_errno(r, ret);
    bool has_off = ret == 1;

    uint64_t cl = 0;
    const char *clh = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (clh) {
        char *end;
        errno = 0;
        cl = strtoull(clh, &end, 10);
        if (!*clh || *end || *clh == '-' || errno)
            return api_reply_error(r, -EINVAL, "malformed Content-Length");
    }
    const char *crh = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_RANGE);
    if (crh && has_off)
        return api_reply_error(r, -EINVAL, "give the position either in Content-Range or in ?offset=, not both");

    struct catalog_image *ci;
    ret = catalog_get_writable(r->cat, args[0], &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    enum MHD_Result res;
    if (!api_check_write(r, ci, &res)) {
        catalog_put_writable(ci);
        return res;
    }
    uint64_t size = qcow2_size(catalog_image_qcow2(ci)), start = qoff, len = cl;
    char msg[200], cr[64];
    snprintf(cr, sizeof cr, "bytes */%" PRIu64, size);
    if (crh) {
        uint64_t a = 0, b = 0, n = 0;
        ret = api_parse_content_range(crh, &a, &b, &n);
        if (ret < 0) {
            catalog_put_writable(ci);
            return api_reply_errno(r, ret);
        }
        if (b >= size || (n != UINT64_MAX && n != size)) {
            catalog_put_writable(ci);
            snprintf(msg, sizeof msg, "Content-Range %s does not fit the disk of %" PRIu64 " bytes", crh, size);
            return api_reply_status(r, 416, "range-not-satisfiable", msg, MHD_HTTP_HEADER_CONTENT_RANGE, cr);
        }
        start = a;
        len = b - a + 1;
        if (clh && cl != len) {
            catalog_put_writable(ci);
            snprintf(msg, sizeof msg, "Content-Length %" PRIu64 " differs from the %" PRIu64 " bytes of Content-Range",
                     cl, len);
            return api_reply_error(r, -EINVAL, msg);
        }
    } else if (!clh) {
        catalog_put_writable(ci);
        return api_reply_status(r, 411, "length-required",
                                "a PUT without Content-Range needs a Content-Length (chunked bodies need a Content-Range)",
                                NULL, NULL);
    } else if (start > size || len > size - start) {
        catalog_put_writable(ci);
        snprintf(msg, sizeof msg, "%" PRIu64 " bytes at offset %" PRIu64 " go past the end of the disk (%" PRIu64 " bytes)",
                 len, start, size);
        return api_reply_error(r, -EFBIG, msg);
    }
    struct put_data *pd = calloc(1, sizeof *pd);
    if (!pd || (len && !(pd->buf = malloc(len < PUT_BLOCK ? (size_t)len : PUT_BLOCK)))) {
        free(pd);
        catalog_put_writable(ci);
        return MHD_NO;
    }
    /* a buffer smaller than a block still holds any piece: lim <= len */
    pd->ci = ci;
    pd->off = start;
    pd->end = start + len;
    pd->len = len;
    pd->flush = flush;
    r->ctx = pd;
    r->body = &put_ops;
    return MHD_YES;
}

/* ---- PATCH ---- */

static enum MHD_Result patch_end(struct req *r, const char *name, json_t *body)
{
    const char *op = NULL;
    json_int_t off = -1, size = -1;
    int flush = 0;
    json_error_t je;
    if (json_unpack_ex(body, &je, 0, "{s:s}", "op", &op) < 0)
        return api_reply_error(r, -EINVAL, "bad PATCH request: \"op\" (a string) is required");
    bool range_op = !strcmp(op, "zero") || !strcmp(op, "discard");
    if (!range_op && strcmp(op, "flush")) {
        char msg[120];
        snprintf(msg, sizeof msg, "unknown op \"%.40s\": expected \"zero\", \"discard\" or \"flush\"", op);
        return api_reply_error(r, -EINVAL, msg);
    }
    int ok = range_op ? json_unpack_ex(body, &je, JSON_STRICT, "{s:s, s:I, s:I, s?b}", "op", &op, "offset", &off,
                                       "size", &size, "flush", &flush)
                      : json_unpack_ex(body, &je, JSON_STRICT, "{s:s}", "op", &op);
    if (ok < 0) {
        char msg[240];
        snprintf(msg, sizeof msg, "bad PATCH request for op \"%s\": %s", op, je.text);
        return api_reply_error(r, -EINVAL, msg);
    }
    if (range_op && (off < 0 || size < 0))
        return api_reply_error(r, -EINVAL, "offset and size must not be negative");
    struct catalog_image *ci;
    int ret = catalog_get_writable(r->cat, name, &ci);
    if (ret == -EROFS && !range_op) /* nothing of ours to flush in a read-only image */
        return api_reply_empty(r, 204, NULL, NULL);
    if (ret < 0)
        return api_reply_errno(r, ret);
    enum MHD_Result res;
    if (!api_check_write(r, ci, &res)) {
        catalog_put_writable(ci);
        return res;
    }
    struct qcow2_image *img = catalog_image_qcow2(ci);
    uint64_t disk = qcow2_size(img);
    if (range_op && ((uint64_t)off > disk || (uint64_t)size > disk - (uint64_t)off)) {
        catalog_put_writable(ci);
        char msg[200], cr[64];
        snprintf(msg, sizeof msg, "%lld bytes at offset %lld go past the end of the disk (%" PRIu64 " bytes)",
                 (long long)size, (long long)off, disk);
        snprintf(cr, sizeof cr, "bytes */%" PRIu64, disk);
        return api_reply_status(r, 416, "range-not-satisfiable", msg, MHD_HTTP_HEADER_CONTENT_RANGE, cr);
    }
    if (!strcmp(op, "zero"))
        ret = size ? qcow2_pwrite_zeroes(img, (uint64_t)off, (uint64_t)size) : 0;
    else if (!strcmp(op, "discard"))
        ret = size ? qcow2_discard(img, (uint64_t)off, (uint64_t)size) : 0;
    if (ret == 0 && (!range_op || flush))
        ret = qcow2_flush(img);
    catalog_put_writable(ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_reply_empty(r, 204, NULL, NULL);
}

enum MHD_Result api_data_patch(struct req *r, char **args)
{
    /* the image first, so an unknown one answers 404 before any body is read */
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, args[0], &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    catalog_put(ci);
    return api_json_body(r, args[0], patch_end);
}

/* ---- OPTIONS ---- */

enum MHD_Result api_data_options(struct req *r, char **args)
{
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, args[0], &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    bool rw = catalog_image_writable(ci);
    catalog_put(ci);
    json_t *features = rw ? json_pack("[s,s,s,s]", "extents", "zero", "flush", "discard") : json_pack("[s]", "extents");
    return api_reply_json_hdr(r, 200,
                              json_pack("{s:o,s:i,s:i}", "features", features, "max_readers", (int)r->threads,
                                        "max_writers", rw ? 1 : 0),
                              MHD_HTTP_HEADER_ALLOW, rw ? "GET, HEAD, PUT, PATCH, OPTIONS" : "GET, HEAD, OPTIONS");
}
