/* bitmaps.c: persistent dirty bitmaps over HTTP: list, create, get, delete,
 * clear, enable, disable, merge, and the dirty extents of one bitmap. Changes are
 * metadata only and answered synchronously; the engine serialises them with writes. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_int.h"
#include "catalog.h"
#include "err.h"
#include "qcow2.h"

/* The JSON of bitmap name of img, or an error reply. */
static enum MHD_Result reply_bitmap(struct req *r, struct qcow2_image *img, const char *name, unsigned status,
                                    const char *location)
{
    struct qcow2_bitmap_info *l;
    uint32_t n;
    int ret = qcow2_bitmap_list(img, &l, &n);
    if (ret < 0)
        return api_reply_errno(r, ret);
    json_t *o = NULL;
    for (uint32_t i = 0; i < n && !o; i++)
        if (!strcmp(l[i].name, name))
            o = qj_bitmap(&l[i]); /* as qemu-img info shows it */
    qcow2_bitmap_list_free(l, n);
    if (!o) {
        char msg[160];
        snprintf(msg, sizeof msg, "no bitmap named '%.100s'", name);
        return api_reply_error(r, -ENOENT, msg);
    }
    if (location)
        return api_reply_json_hdr(r, status, o, MHD_HTTP_HEADER_LOCATION, location);
    return api_reply_json(r, status, o);
}

enum MHD_Result api_bitmaps_list(struct req *r, char **args)
{
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, args[0], &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    json_t *a = qj_bitmaps(catalog_image_qcow2(ci));
    catalog_put(ci);
    if (!a)
        return api_reply_errno(r, -ENOMEM);
    return api_reply_json(r, 200, json_pack("{s:o}", "bitmaps", a));
}

enum MHD_Result api_bitmap_get(struct req *r, char **args)
{
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, args[0], &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    enum MHD_Result res = reply_bitmap(r, catalog_image_qcow2(ci), args[1], 200, NULL);
    catalog_put(ci);
    return res;
}

/* "/v1/images/IMG/bitmaps/NAME" with NAME percent-encoded. */
static char *location_of(const char *image, const char *name)
{
    size_t n = strlen(name);
    char *out = malloc(strlen(image) + 3 * n + 32);
    if (!out)
        return NULL;
    char *p = out + sprintf(out, "/v1/images/%s/bitmaps/", image);
    for (const unsigned char *s = (const unsigned char *)name; *s; s++) {
        if ((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || strchr("-._~", *s))
            *p++ = (char)*s;
        else
            p += sprintf(p, "%%%02X", *s);
    }
    *p = '\0';
    return out;
}

static enum MHD_Result create_end(struct req *r, const char *image, json_t *body)
{
    const char *name = NULL;
    json_int_t gran = 0;
    int disabled = 0;
    json_error_t je;
    if (json_unpack_ex(body, &je, JSON_STRICT, "{s:s, s?I, s?b}", "name", &name, "granularity", &gran, "disabled",
                       &disabled) < 0) {
        char msg[400];
        snprintf(msg, sizeof msg, "bad bitmap request: %s (expected {\"name\": string, \"granularity\"?: integer, "
                 "\"disabled\"?: boolean})", je.text);
        return api_reply_error(r, -EINVAL, msg);
    }
    if (gran < 0 || gran > UINT32_MAX)
        return api_reply_error(r, -EINVAL, "granularity must be a power of 2 from 512 to 2147483648");
    struct catalog_image *ci;
    int ret = catalog_get_writable(r->cat, image, &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    enum MHD_Result res;
    if (!api_check_write(r, ci, &res)) {
        catalog_put_writable(ci);
        return res;
    }
    struct qcow2_image *img = catalog_image_qcow2(ci);
    ret = qcow2_bitmap_add(img, name, (uint32_t)gran, disabled);
    if (ret < 0) {
        res = api_reply_errno(r, ret);
    } else {
        char *loc = location_of(image, name);
        res = reply_bitmap(r, img, name, 201, loc);
        free(loc);
    }
    catalog_put_writable(ci);
    return res;
}

enum MHD_Result api_bitmap_create(struct req *r, char **args)
{
    /* the image first, so an unknown one answers 404 before any body is read */
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, args[0], &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    catalog_put(ci);
    return api_json_body(r, args[0], create_end);
}

enum { OP_DELETE, OP_CLEAR, OP_ENABLE, OP_DISABLE };

static enum MHD_Result simple_op(struct req *r, char **args, int op)
{
    struct catalog_image *ci;
    int ret = catalog_get_writable(r->cat, args[0], &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    enum MHD_Result res;
    if (!api_check_write(r, ci, &res)) {
        catalog_put_writable(ci);
        return res;
    }
    struct qcow2_image *img = catalog_image_qcow2(ci);
    switch (op) {
    case OP_DELETE: ret = qcow2_bitmap_remove(img, args[1]); break;
    case OP_CLEAR: ret = qcow2_bitmap_clear(img, args[1]); break;
    case OP_ENABLE: ret = qcow2_bitmap_enable(img, args[1]); break;
    default: ret = qcow2_bitmap_disable(img, args[1]); break;
    }
    if (ret < 0)
        res = api_reply_errno(r, ret);
    else if (op == OP_DELETE)
        res = api_reply_empty(r, 204, NULL, NULL);
    else
        res = reply_bitmap(r, img, args[1], 200, NULL);
    catalog_put_writable(ci);
    return res;
}

enum MHD_Result api_bitmap_delete(struct req *r, char **args)
{
    return simple_op(r, args, OP_DELETE);
}

enum MHD_Result api_bitmap_clear(struct req *r, char **args)
{
    return simple_op(r, args, OP_CLEAR);
}

enum MHD_Result api_bitmap_enable(struct req *r, char **args)
{
    return simple_op(r, args, OP_ENABLE);
}

enum MHD_Result api_bitmap_disable(struct req *r, char **args)
{
    return simple_op(r, args, OP_DISABLE);
}

/* ---- merge: a JSON body, and two names from the path ---- */

struct merge_body {
    char *image, *bitmap;
    char *buf;
    size_t len;
};

static int merge_data(struct req *r, const char *buf, size_t n)
{
    struct merge_body *mb = r->ctx;
    if (n > API_JSON_MAX - mb->len)
        return err_fail(EFBIG, "the JSON body is larger than %u bytes", API_JSON_MAX);
    char *nb = realloc(mb->buf, mb->len + n);
    if (!nb)
        return err_fail(ENOMEM, "out of memory");
    memcpy(nb + mb->len, buf, n);
    mb->buf = nb;
    mb->len += n;
    return 0;
}

static enum MHD_Result merge_run(struct req *r, struct merge_body *mb, json_t *body)
{
    const char *src = NULL, *src_image = NULL;
    json_error_t je;
    if (json_unpack_ex(body, &je, JSON_STRICT, "{s:s, s?s}", "source", &src, "source-image", &src_image) < 0) {
        char msg[400];
        snprintf(msg, sizeof msg, "bad merge request: %s (expected {\"source\": string, \"source-image\"?: string})",
                 je.text);
        return api_reply_error(r, -EINVAL, msg);
    }
    struct catalog_image *ci, *sci = NULL;
    int ret = catalog_get_writable(r->cat, mb->image, &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    enum MHD_Result res;
    if (!api_check_write(r, ci, &res)) {
        catalog_put_writable(ci);
        return res;
    }
    if (src_image && strcmp(src_image, mb->image) && (ret = catalog_get(r->cat, src_image, &sci)) < 0) {
        catalog_put_writable(ci);
        return api_reply_errno(r, err_prefix(ret, "source image '%s'", src_image));
    }
    struct qcow2_image *img = catalog_image_qcow2(ci);
    ret = qcow2_bitmap_merge(img, mb->bitmap, sci ? catalog_image_qcow2(sci) : NULL, src);
    catalog_put(sci);
    res = ret < 0 ? api_reply_errno(r, ret) : reply_bitmap(r, img, mb->bitmap, 200, NULL);
    catalog_put_writable(ci);
    return res;
}

static enum MHD_Result merge_end(struct req *r)
{
    struct merge_body *mb = r->ctx;
    json_error_t je;
    json_t *body = json_loadb(mb->buf ? mb->buf : "", mb->len, JSON_REJECT_DUPLICATES, &je);
    if (!body) {
        char msg[300];
        snprintf(msg, sizeof msg, "malformed JSON body: %s (line %d, column %d)", je.text, je.line, je.column);
        return api_reply_error(r, -EINVAL, msg);
    }
    enum MHD_Result res = json_is_object(body) ? merge_run(r, mb, body)
                                               : api_reply_error(r, -EINVAL, "the JSON body must be an object");
    json_decref(body);
    return res;
}

static void merge_done(struct req *r, bool completed)
{
    struct merge_body *mb = r->ctx;
    free(mb->image);
    free(mb->bitmap);
    free(mb->buf);
    free(mb);
    r->ctx = NULL;
}

static const struct api_body merge_ops = {.data = merge_data, .end = merge_end, .done = merge_done};

enum MHD_Result api_bitmap_merge(struct req *r, char **args)
{
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, args[0], &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    catalog_put(ci);
    struct merge_body *mb = calloc(1, sizeof *mb);
    if (!mb || !(mb->image = strdup(args[0])) || !(mb->bitmap = strdup(args[1]))) {
        if (mb) {
            free(mb->image);
            free(mb);
        }
        return MHD_NO;
    }
    r->ctx = mb;
    r->body = &merge_ops;
    return MHD_YES;
}

/* ---- GET .../extents?context=dirty&bitmap=B ---- */

struct dirty_stream {
    struct catalog_image *ci;
    struct req *r;
    char *bitmap;
    uint64_t off, size;     /* next guest offset to ask about; the disk size */
    uint64_t start, length; /* the run to print next (valid while length) */
    bool dirty, first, done;
    char text[96];
    size_t tlen, tpos;
};

/* The next merged run from ds->off into start/length/dirty; length 0 at the end. */
static int next_dirty(struct dirty_stream *ds)
{
    ds->length = 0;
    while (ds->off < ds->size) {
        bool d;
        uint64_t n;
        int ret = qcow2_bitmap_dirty(catalog_image_qcow2(ds->ci), ds->bitmap, ds->off, ds->size - ds->off, &d, &n);
        if (ret < 0)
            return ret;
        if (n == 0 || n > ds->size - ds->off)
            return err_fail(ENOTRECOVERABLE, "dirty status at %" PRIu64 " returned a bad run", ds->off);
        if (ds->length && d != ds->dirty)
            break;
        if (!ds->length) {
            ds->start = ds->off;
            ds->dirty = d;
        }
        ds->length += n;
        ds->off += n;
    }
    return 0;
}

static int dirty_render(struct dirty_stream *ds)
{
    ds->tpos = 0;
    if (!ds->length) {
        ds->tlen = (size_t)snprintf(ds->text, sizeof ds->text, "%s]\n", ds->first ? "[" : "");
        ds->done = true;
        return 0;
    }
    ds->tlen = (size_t)snprintf(ds->text, sizeof ds->text, "%s{\"start\":%" PRIu64 ",\"length\":%" PRIu64 ",\"dirty\":%s}",
                                ds->first ? "[" : ",", ds->start, ds->length, ds->dirty ? "true" : "false");
    ds->first = false;
    return next_dirty(ds);
}

static ssize_t dirty_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct dirty_stream *ds = cls;
    size_t n = 0;
    while (n < max) {
        if (ds->tpos == ds->tlen) {
            if (ds->done)
                break;
            int ret = dirty_render(ds);
            if (ret < 0) {
                fprintf(stderr, "qcowd: %s: dirty extents: %s\n", catalog_image_name(ds->ci), err_msg(ret));
                return MHD_CONTENT_READER_END_WITH_ERROR;
            }
        }
        size_t k = ds->tlen - ds->tpos < max - n ? ds->tlen - ds->tpos : max - n;
        memcpy(buf + n, ds->text + ds->tpos, k);
        ds->tpos += k;
        n += k;
    }
    if (n == 0)
        return MHD_CONTENT_READER_END_OF_STREAM;
    ds->r->bytes += n;
    return (ssize_t)n;
}

static void dirty_free(void *cls)
{
    struct dirty_stream *ds = cls;
    catalog_put(ds->ci);
    free(ds->bitmap);
    free(ds);
}

enum MHD_Result api_dirty_extents(struct req *r, const char *image)
{
    const char *raw = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "bitmap");
    if (!raw || !*raw)
        return api_reply_error(r, -EINVAL, "context=dirty needs the bitmap=NAME query argument");
    char *bitmap = api_decode(raw, strlen(raw));
    if (!bitmap)
        return api_reply_errno(r, -EINVAL);
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, image, &ci);
    if (ret < 0) {
        free(bitmap);
        return api_reply_errno(r, ret);
    }
    struct dirty_stream *ds = calloc(1, sizeof *ds);
    if (!ds) {
        free(bitmap);
        catalog_put(ci);
        return MHD_NO;
    }
    *ds = (struct dirty_stream){.ci = ci, .r = r, .bitmap = bitmap, .size = qcow2_size(catalog_image_qcow2(ci)),
                                .first = true};
    /* the first run before answering, so an unknown or stale bitmap gets a proper error */
    if (ds->size == 0) {
        bool d;
        uint64_t n;
        ret = qcow2_bitmap_dirty(catalog_image_qcow2(ci), bitmap, 0, 1, &d, &n);
        if (ret == -EINVAL) /* the range check of an empty disk: the bitmap itself is fine */
            ret = 0;
    } else {
        ret = next_dirty(ds);
    }
    if (ret < 0) {
        enum MHD_Result res = api_reply_errno(r, ret);
        dirty_free(ds);
        return res;
    }
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, dirty_read, ds, dirty_free);
    if (!resp) {
        dirty_free(ds);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    return api_queue(r, 200, resp);
}
