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

/* ---- download ---- */

/* The container is held against writers while it is sent, so the connection is
 * watched (GUARD_SEND): a client that stops reading is cut below --min-rate and
 * the image let go. */
struct file_source {
    struct catalog_file *f;
    struct guard_conn *gc;
    char name[CATALOG_NAME_MAX + 1];
};

static int file_pread(void *ctx, void *buf, size_t len, uint64_t off)
{
    struct file_source *fs = ctx;
    api_guard_bytes(fs->gc, len);
    return catalog_file_pread(fs->f, buf, len, off);
}

static void file_release(void *ctx)
{
    struct file_source *fs = ctx;
    catalog_file_close(fs->f);
    free(fs);
}

enum MHD_Result api_file_get(struct req *r, char **args)
{
    /* the validators before the file is opened: a change in between gives the
     * bytes a newer version than their tag says, never an older one */
    struct catalog_image *ci;
    int got = catalog_get(r->cat, args[0], &ci);
    if (got == 0) {
        api_validators_image(r, ci, false);
        catalog_put(ci);
    }
    err_clear();
    enum MHD_Result res; /* a broken image has no validators, but exists */
    if (got != -ENOENT && got != -EINVAL && !api_check_read(r, &res))
        return res;
    struct file_source *fs = calloc(1, sizeof *fs);
    if (!fs)
        return MHD_NO;
    uint64_t size;
    int ret = catalog_file_open(r->cat, args[0], &fs->f, &size);
    if (ret < 0) {
        free(fs);
        return api_reply_errno(r, ret);
    }
    snprintf(fs->name, sizeof fs->name, "%s", args[0]);
    fs->gc = r->gc;
    api_guard_phase(r->gc, GUARD_SEND);
    struct api_source src = {.ctx = fs, .pread = file_pread, .release = file_release, .what = fs->name};
    return api_reply_ranged(r, size, &src);
}

/* ---- upload ---- */

struct file_upload {
    struct catalog_upload *u; /* NULL once committed or aborted */
    bool absent_only;         /* If-None-Match: *: a name taken is 412 */
    char name[CATALOG_NAME_MAX + 1];
};

static int upload_data(struct req *r, const char *buf, size_t n)
{
    struct file_upload *fu = r->ctx;
    int ret = catalog_upload_write(fu->u, buf, n);
    r->body_now = ret < 0; /* not qcow2, over a budget, a storage error: the rest is not wanted */
    return ret;
}

static enum MHD_Result upload_end(struct req *r)
{
    struct file_upload *fu = r->ctx;
    int ret = catalog_upload_commit(fu->u);
    fu->u = NULL;
    if (ret == -EEXIST && fu->absent_only) {
        enum MHD_Result res;
        return api_check_write(r, NULL, &res) ? api_reply_errno(r, ret) : res;
    }
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
    /* an upload never replaces an image: If-Match holds only for an image that
     * exists (which then answers 409 below), If-None-Match: * only for a new name */
    enum MHD_Result res;
    struct catalog_image *ci = NULL;
    bool im = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_IF_MATCH);
    int got = im || api_if_none_match_any(r) ? catalog_get(r->cat, args[0], &ci) : -ENOENT;
    err_clear();
    bool ok = got == -ENOENT ? api_check_absent(r, &res) : api_check_write(r, got == 0 ? ci : NULL, &res);
    catalog_put(ci);
    if (!ok)
        return res;
    struct file_upload *fu = calloc(1, sizeof *fu);
    if (!fu)
        return MHD_NO;
    fu->absent_only = api_if_none_match_any(r);
    /* the declared size is checked against the budgets before a byte is stored */
    const char *cl = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    uint64_t length = UINT64_MAX;
    if (cl) {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(cl, &end, 10);
        if (!errno && end != cl && !*end && *cl != '-')
            length = v;
    }
    int ret = catalog_upload_begin(r->cat, args[0], length, &fu->u);
    if (ret < 0) {
        free(fu);
        if (ret == -EEXIST && api_if_none_match_any(r) && !api_check_write(r, NULL, &res))
            return res;
        return api_reply_errno(r, ret);
    }
    snprintf(fu->name, sizeof fu->name, "%s", args[0]);
    r->ctx = fu;
    r->body = &upload_ops;
    return MHD_YES;
}
