/* file.c: the qcow2 container itself: GET .../file (ranged, streamed) and
 * PUT .../file (an upload streamed to its store as it comes, validated, then
 * published; sent whole, or in pieces with Content-Range, resumable after a
 * broken connection). */
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
    struct catalog_upload *u; /* NULL once committed, aborted or suspended */
    bool absent_only;         /* If-None-Match: *: a name taken is 412 */
    bool resumable;           /* a piece (Content-Range): kept when it stops short */
    uint64_t end, total;      /* the piece ends here, the upload there (resumable) */
    char name[CATALOG_NAME_MAX + 1];
};

static int upload_data(struct req *r, const char *buf, size_t n)
{
    struct file_upload *fu = r->ctx;
    int ret = fu->resumable && n > fu->end - catalog_upload_received(fu->u)
                  ? err_fail(EINVAL, "the body is longer than its Content-Range")
                  : catalog_upload_write(fu->u, buf, n);
    r->body_now = ret < 0; /* not qcow2, over a budget, a storage error: the rest is not wanted */
    if (ret < 0) {
        /* refused: nothing is kept, and that is settled before the answer goes out */
        struct err_saved saved;
        err_save(&saved, ret);
        catalog_upload_abort(fu->u);
        fu->u = NULL;
        ret = err_restore(&saved);
    }
    return ret;
}

/* A store that sends the upload while it comes (S3) and bounds what it stages
 * holds the body back while the store is slower than the client: the
 * connection then sleeps (api_body .ready), not the server thread. */
static int upload_ready(struct req *r, void (*wake)(void *ctx), void *ctx)
{
    struct file_upload *fu = r->ctx;
    return fu->u ? catalog_upload_ready(fu->u, wake, ctx) : 1;
}

/* {"name", "received", "total"}: where a resumable upload stands. */
static json_t *upload_state(const char *name, uint64_t received, uint64_t total)
{
    return json_pack("{s:s,s:I,s:I}", "name", name, "received", (json_int_t)received, "total", (json_int_t)total);
}

/* 409 for a piece that does not continue the upload where it stands: the error
 * says where, and carries "received" and "total" for a client to resume. */
static enum MHD_Result reply_offset(struct req *r, const char *name, int err)
{
    uint64_t received, total;
    if (catalog_upload_status(r->cat, name, &received, &total) < 0)
        return api_reply_errno(r, err);
    json_t *e = upload_state(name, received, total);
    json_object_del(e, "name");
    json_object_set_new(e, "code", json_string("conflict"));
    json_object_set_new(e, "message", json_string(err_msg(err)));
    return api_reply_json(r, 409, json_pack("{s:o}", "error", e));
}

static enum MHD_Result upload_end(struct req *r)
{
    struct file_upload *fu = r->ctx;
    if (fu->resumable) {
        uint64_t got = catalog_upload_received(fu->u);
        if (got != fu->end) { /* shorter than its Content-Range said */
            catalog_upload_suspend(fu->u);
            fu->u = NULL;
            return api_reply_errno(r, err_fail(EINVAL, "the body ended at %llu, before the end of its Content-Range "
                                                       "(%llu); the upload is kept: continue it at %llu",
                                               (unsigned long long)got, (unsigned long long)fu->end,
                                               (unsigned long long)got));
        }
        if (got < fu->total) { /* a piece, not the last: kept for the next one */
            catalog_upload_suspend(fu->u);
            fu->u = NULL;
            return api_reply_json(r, 202, upload_state(fu->name, got, fu->total));
        }
    }
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
    if (fu->u && fu->resumable)
        catalog_upload_suspend(fu->u); /* the connection broke: kept to be resumed */
    else
        catalog_upload_abort(fu->u); /* sent whole and cut short: nothing stays (a refused one is gone already) */
    free(fu);
    r->ctx = NULL;
}

/* PUT .../file with "Content-Range: bytes * /TOTAL" and no body: where the
 * resumable upload of name stands (200), or 404. */
static enum MHD_Result upload_query(struct req *r, const char *name, uint64_t total)
{
    uint64_t received, have_total;
    int ret = catalog_upload_status(r->cat, name, &received, &have_total);
    if (ret < 0)
        return api_reply_errno(r, ret);
    if (have_total != total)
        return reply_offset(r, name,
                            err_fail(ERANGE, "the upload of '%s' is of %llu bytes, not %llu", name,
                                     (unsigned long long)have_total, (unsigned long long)total));
    return api_reply_json(r, 200, upload_state(name, received, total));
}

static const struct api_body upload_ops = {
    .data = upload_data, .end = upload_end, .done = upload_done, .ready = upload_ready};

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
    /* sent in pieces: "bytes FIRST-LAST/TOTAL", or "bytes * /TOTAL" to ask */
    const char *cr = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Content-Range");
    uint64_t first = 0, last = 0, total = UINT64_MAX;
    if (cr && api_parse_content_range_size(cr, &total) == 0)
        return upload_query(r, args[0], total);
    if (cr) {
        int ret = api_parse_content_range(cr, &first, &last, &total);
        if (ret == 0 && total == UINT64_MAX)
            ret = err_fail(EINVAL, "a resumable upload names its whole size in Content-Range (bytes FIRST-LAST/SIZE)");
        if (ret == 0 && last >= total)
            ret = err_fail(EINVAL, "Content-Range ends at %llu, past the upload's %llu bytes",
                           (unsigned long long)last, (unsigned long long)total);
        if (ret < 0)
            return api_reply_errno(r, ret);
    }
    struct file_upload *fu = calloc(1, sizeof *fu);
    if (!fu)
        return MHD_NO;
    fu->absent_only = api_if_none_match_any(r);
    if (cr) {
        fu->resumable = true;
        fu->end = last + 1;
        fu->total = total;
    }
    if (cr && first > 0) { /* the next piece of an upload kept waiting */
        int ret = catalog_upload_resume(r->cat, args[0], first, total, &fu->u);
        if (ret < 0) {
            free(fu);
            return ret == -ERANGE ? reply_offset(r, args[0], ret) : api_reply_errno(r, ret);
        }
        snprintf(fu->name, sizeof fu->name, "%s", args[0]);
        r->ctx = fu;
        r->body = &upload_ops;
        return MHD_YES;
    }
    if (cr)
        catalog_upload_discard(r->cat, args[0]); /* from the start: a waiting one of this name goes */
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
    int ret = catalog_upload_begin(r->cat, args[0], cr ? total : length, &fu->u);
    if (ret == 0 && cr)
        catalog_upload_set_total(fu->u, total);
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
