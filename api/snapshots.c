/* snapshots.c: /v1/images/{name}/snapshots: the list (qemu-img's fields), create,
 * delete and revert as jobs, and the guest bytes of one snapshot (Range). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_int.h"
#include "catalog.h"
#include "err.h"
#include "jobops.h"
#include "qcow2.h"

/* A JSON answer holding snapshot lists, streamed an entry at a time from the
 * engine's shared lists: segments of a head (ending with a list's '['), the
 * list's entries and a tail (from its ']'), one after the other, so an answer
 * costs one entry's JSON whatever the tables' sizes (a 16k-entry table built
 * as one JSON tree cost tens of MiB per request). */
struct snap_stream {
    struct qcow2_snapshot_info *list; /* of this segment, shared with its image, or NULL */
    uint32_t n, next;
    struct req *r;
    char *head, *tail;   /* of this segment */
    char *text;          /* the entry being handed out (owned), or NULL */
    const char *piece;   /* what is being handed out: head, text or tail */
    size_t tlen, tpos;
    int stage;           /* 0 head next, 1 entries, 2 tail handed out, 3 the end */
    api_segment_fn more; /* the next segment, or NULL */
    void *ctx;
    void (*ctx_free)(void *);
};

static void segment_free(struct snap_stream *ss)
{
    qcow2_snapshot_list_free(ss->list, ss->n);
    free(ss->head);
    free(ss->tail);
    ss->list = NULL;
    ss->head = ss->tail = NULL;
    ss->n = ss->next = 0;
}

/* The next piece: the head, one entry (with its comma), the tail, or the next
 * segment's head. 1: a piece, 0: the end. */
static int snap_piece(struct snap_stream *ss)
{
    free(ss->text);
    ss->text = NULL;
    ss->tpos = 0;
    ss->piece = "";
    ss->tlen = 0;
    if (ss->stage == 3)
        return 0;
    if (ss->stage == 2) {
        segment_free(ss);
        int ret = ss->more ? ss->more(ss->ctx, &ss->head, &ss->tail, &ss->list, &ss->n) : 0;
        if (ret <= 0) {
            ss->stage = 3;
            return ret;
        }
        if (!ss->head || !ss->tail)
            return -ENOMEM;
        ss->stage = 0;
    }
    if (ss->stage == 0) {
        ss->piece = ss->head;
        ss->stage = 1;
    } else if (ss->next == ss->n) {
        ss->piece = ss->tail;
        ss->stage = 2;
    } else {
        json_t *o = qj_snapshot(&ss->list[ss->next]);
        char *j = o ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
        json_decref(o);
        size_t n = j ? strlen(j) : 0;
        ss->text = j ? malloc(n + 2) : NULL;
        if (ss->text)
            snprintf(ss->text, n + 2, "%s%s", ss->next ? "," : "", j);
        free(j);
        if (!ss->text)
            return -ENOMEM;
        ss->piece = ss->text;
        ss->next++;
    }
    ss->tlen = strlen(ss->piece);
    return 1;
}

static ssize_t snap_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct snap_stream *ss = cls;
    size_t n = 0;
    (void)pos;
    while (n < max) {
        if (ss->tpos == ss->tlen) {
            int ret = snap_piece(ss);
            if (ret < 0)
                return MHD_CONTENT_READER_END_WITH_ERROR;
            if (ret == 0)
                break;
            continue;
        }
        size_t k = ss->tlen - ss->tpos < max - n ? ss->tlen - ss->tpos : max - n;
        memcpy(buf + n, ss->piece + ss->tpos, k);
        ss->tpos += k;
        n += k;
    }
    if (n == 0)
        return MHD_CONTENT_READER_END_OF_STREAM;
    ss->r->bytes += n;
    return (ssize_t)n;
}

static void snap_stream_free(void *cls)
{
    struct snap_stream *ss = cls;
    segment_free(ss);
    free(ss->text);
    if (ss->ctx_free)
        ss->ctx_free(ss->ctx);
    free(ss);
}

enum MHD_Result api_reply_segments(struct req *r, char *head, char *tail, struct qcow2_snapshot_info *list,
                                   uint32_t n, api_segment_fn more, void *ctx, void (*ctx_free)(void *))
{
    struct snap_stream *ss = calloc(1, sizeof *ss);
    if (ss) {
        *ss = (struct snap_stream){.list = list, .n = n, .r = r, .head = head, .tail = tail, .more = more,
                                   .ctx = ctx, .ctx_free = ctx_free};
    } else {
        qcow2_snapshot_list_free(list, n);
        free(head);
        free(tail);
        if (ctx_free)
            ctx_free(ctx);
        return MHD_NO;
    }
    if (!head || !tail) {
        snap_stream_free(ss);
        return api_reply_errno(r, err_fail(ENOMEM, "out of memory"));
    }
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, snap_read, ss, snap_stream_free);
    if (!resp) {
        snap_stream_free(ss);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    return api_queue(r, 200, resp);
}

enum MHD_Result api_snapshots_list(struct req *r, char **args)
{
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, args[0], &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    struct qcow2_snapshot_info *list;
    uint32_t n;
    ret = qcow2_snapshot_list(catalog_image_qcow2(ci), &list, &n);
    catalog_put(ci); /* the list lives on its own once taken */
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_reply_segments(r, strdup("{\"snapshots\":["), strdup("]}\n"), list, n, NULL, NULL, NULL);
}

static enum MHD_Result snap_job(struct req *r, const char *image, const char *op, const char *snap)
{
    if (!r->jobs)
        return api_reply_status(r, 503, "unavailable", "the job engine is not running", NULL, NULL);
    if (api_has_preconditions(r)) {
        /* checked (and an If-Match claimed) against the handle the job starts from */
        struct catalog_image *ci;
        int got = catalog_get(r->cat, image, &ci);
        if (got < 0)
            return api_reply_errno(r, got);
        enum MHD_Result res;
        bool ok = api_check_write(r, ci, &res);
        catalog_put(ci);
        if (!ok)
            return res;
    }
    json_t *job;
    int ret = svc_snapshot_job(r->jobs, r->cat, image, op, snap, &job);
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_reply_job(r, job);
}

static enum MHD_Result create_end(struct req *r, const char *name, json_t *body)
{
    const char *snap = NULL;
    json_error_t je;
    if (json_unpack_ex(body, &je, JSON_STRICT, "{s:s}", "name", &snap) < 0) {
        char msg[300];
        snprintf(msg, sizeof msg, "bad snapshot request: %s", je.text);
        return api_reply_error(r, -EINVAL, msg);
    }
    return snap_job(r, name, "create", snap);
}

enum MHD_Result api_snapshot_create(struct req *r, char **args)
{
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, args[0], &ci);
    if (ret < 0 && ret != -EBUSY)
        return api_reply_errno(r, ret);
    catalog_put(ret == 0 ? ci : NULL);
    return api_json_body(r, args[0], create_end);
}

enum MHD_Result api_snapshot_delete(struct req *r, char **args)
{
    return snap_job(r, args[0], "delete", args[1]);
}

enum MHD_Result api_snapshot_revert(struct req *r, char **args)
{
    return snap_job(r, args[0], "revert", args[1]);
}

enum MHD_Result api_snapshot_data(struct req *r, char **args)
{
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, args[0], &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    enum MHD_Result res;
    api_validators_image(r, ci, true);
    if (!api_check_read(r, &res)) {
        catalog_put(ci);
        return res;
    }
    catalog_put(ci); /* it opens (else its error above): the view reads the file */
    struct catalog_private *view;
    struct catalog_private_opts o = {.snapshot = args[1], .small_cache = true};
    ret = catalog_open_private(r->cat, args[0], &o, &view);
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_send_data(r, catalog_private_qcow2(view), NULL, view);
}
