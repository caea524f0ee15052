/* file.c: the qcow2 container itself: GET .../file (ranged, streamed) and
 * PUT .../file (an upload streamed to a temporary file, validated, then named). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_int.h"
#include "catalog.h"
#include "err.h"

#define FILE_BLOCK (256u << 10)

/* ---- download ---- */

struct file_stream {
    struct catalog_file *f;
    struct req *r;
    char name[CATALOG_NAME_MAX + 1];
    uint64_t start, len;
};

static ssize_t file_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct file_stream *fs = cls;
    if (pos >= fs->len)
        return MHD_CONTENT_READER_END_OF_STREAM;
    if (max > fs->len - pos)
        max = (size_t)(fs->len - pos);
    int ret = catalog_file_pread(fs->f, buf, max, fs->start + pos);
    if (ret < 0) {
        fprintf(stderr, "qcowd: %s: file read at %" PRIu64 ": %s\n", fs->name, fs->start + pos, err_msg(ret));
        return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    fs->r->bytes += max;
    return (ssize_t)max;
}

static void file_free(void *cls)
{
    struct file_stream *fs = cls;
    catalog_file_close(fs->f);
    free(fs);
}

enum MHD_Result api_file_get(struct req *r, char **args)
{
    struct catalog_file *f;
    uint64_t size;
    int ret = catalog_file_open(r->cat, args[0], &f, &size);
    if (ret < 0)
        return api_reply_errno(r, ret);
    uint64_t start = 0, len = size;
    char cr[96];
    const char *range = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_RANGE);
    if (range) {
        ret = api_parse_range(range, size, &start, &len);
        if (ret < 0) {
            catalog_file_close(f);
            if (ret != -ERANGE)
                return api_reply_errno(r, ret);
            snprintf(cr, sizeof cr, "bytes */%" PRIu64, size);
            return api_reply_status(r, 416, api_errno_code(ret), err_msg(ret), MHD_HTTP_HEADER_CONTENT_RANGE, cr);
        }
        snprintf(cr, sizeof cr, "bytes %" PRIu64 "-%" PRIu64 "/%" PRIu64, start, start + len - 1, size);
    }
    struct file_stream *fs = calloc(1, sizeof *fs);
    if (!fs) {
        catalog_file_close(f);
        return MHD_NO;
    }
    *fs = (struct file_stream){.f = f, .r = r, .start = start, .len = len};
    snprintf(fs->name, sizeof fs->name, "%s", args[0]);
    struct MHD_Response *resp = MHD_create_response_from_callback(len, FILE_BLOCK, file_read, fs, file_free);
    if (!resp) {
        file_free(fs);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/octet-stream");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_ACCEPT_RANGES, "bytes");
    if (range)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_RANGE, cr);
    return api_queue(r, range ? 206 : 200, resp);
}

/* ---- upload ---- */

struct file_upload {
    struct catalog_upload *u; /* NULL once committed or aborted */
    char name[CATALOG_NAME_MAX + 1];
};

static int upload_data(struct req *r, const char *buf, size_t n)
{
    struct file_upload *fu = r->ctx;
    return catalog_upload_write(fu->u, buf, n);
}

static enum MHD_Result upload_end(struct req *r)
{
    struct file_upload *fu = r->ctx;
    int ret = catalog_upload_commit(fu->u);
    fu->u = NULL;
    if (ret < 0)
        return api_reply_errno(r, ret);
    struct catalog_image *ci;
    ret = catalog_get(r->cat, fu->name, &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    json_t *info = api_info_json(fu->name, catalog_image_qcow2(ci));
    catalog_put(ci);
    char loc[CATALOG_NAME_MAX + 16];
    snprintf(loc, sizeof loc, "/v1/images/%s", fu->name);
    return api_reply_json_hdr(r, 201, info, MHD_HTTP_HEADER_LOCATION, loc);
}

static void upload_done(struct req *r, bool completed)
{
    struct file_upload *fu = r->ctx;
    catalog_upload_abort(fu->u); /* a body cut short or refused: nothing stays */
    free(fu);
    r->ctx = NULL;
}

static const struct api_body upload_ops = {.data = upload_data, .end = upload_end, .done = upload_done};

enum MHD_Result api_file_put(struct req *r, char **args)
{
    struct file_upload *fu = calloc(1, sizeof *fu);
    if (!fu)
        return MHD_NO;
    int ret = catalog_upload_begin(r->cat, args[0], &fu->u);
    if (ret < 0) {
        free(fu);
        return api_reply_errno(r, ret);
    }
    snprintf(fu->name, sizeof fu->name, "%s", args[0]);
    r->ctx = fu;
    r->body = &upload_ops;
    return MHD_YES;
}
