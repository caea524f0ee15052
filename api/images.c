/* images.c: the handlers of /v1/health and /v1/images/...: list, info, data
 * (ranged, streamed) and extents (streamed JSON). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_int.h"
#include "catalog.h"
#include "err.h"
#include "qcow2.h"

enum MHD_Result api_health(struct req *r, char **args)
{
    return api_reply_json(r, 200, json_pack("{s:s}", "status", "ok"));
}

/* ---- info ---- */

/* The info object: "name", then qemu-img info's keys in the REST shape
 * (qimgjson.h), "filename" being the catalog's file (server paths are not shown)
 * that backing names resolve against, as qemu-img resolves them. snaps (taken):
 * the snapshot list to show, or NULL for img's own. */
static json_t *info_json(const char *name, struct qcow2_image *img, json_t *snaps)
{
    char file[CATALOG_NAME_MAX + sizeof CATALOG_SUFFIX];
    snprintf(file, sizeof file, "%s%s", name, CATALOG_SUFFIX);
    struct qj_info_opts opts = {.filename = file, .flags = QJ_ALWAYS_LISTED, .snapshots = snaps};
    json_t *info = qj_info(img, &opts);
    json_t *o = info ? json_pack("{s:o}", "name", api_jstr(name)) : NULL;
    if (o && json_object_update(o, info) < 0) {
        json_decref(o);
        o = NULL;
    }
    json_decref(info);
    return o;
}

json_t *api_info_json(const char *name, struct qcow2_image *img)
{
    return info_json(name, img, NULL);
}

/* Get the image named by a path argument, or queue the error. */
static struct catalog_image *get_image(struct req *r, const char *name, enum MHD_Result *res)
{
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, name, &ci);
    if (ret < 0) {
        *res = api_reply_errno(r, ret);
        return NULL;
    }
    return ci;
}

/* The info object of img as a segment of a streamed answer: prefix, the text
 * up to its snapshot list's '[' (*head), the list itself (*list, *n: taken from
 * the engine, not copied) and the rest, then suffix (*tail). */
static int info_segment(const char *name, struct qcow2_image *img, const char *prefix, const char *suffix,
                        char **head, char **tail, struct qcow2_snapshot_info **list, uint32_t *n)
{
    *head = *tail = NULL;
    *list = NULL;
    *n = 0;
    /* an empty list marks its place; the key's quotes are bare, so the mark
     * cannot be inside a string */
    json_t *o = info_json(name, img, json_array());
    char *text = o ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(o);
    if (!text)
        return err_fail(ENOMEM, "out of memory");
    const char *mark = strstr(text, "\"snapshots\":[]");
    size_t at = mark ? (size_t)(mark - text) + strlen("\"snapshots\":[") : strlen(text);
    size_t hl = strlen(prefix) + at + 1, tl = strlen(text + at) + strlen(suffix) + 1;
    *head = malloc(hl);
    *tail = malloc(tl);
    int ret = *head && *tail ? 0 : err_fail(ENOMEM, "out of memory");
    if (ret == 0) {
        snprintf(*head, hl, "%s%.*s", prefix, (int)at, text);
        snprintf(*tail, tl, "%s%s", text + at, suffix);
        if (mark)
            ret = qcow2_snapshot_list(img, list, n);
    }
    free(text);
    if (ret < 0) {
        free(*head);
        free(*tail);
        *head = *tail = NULL;
    }
    return ret;
}

enum MHD_Result api_image_info(struct req *r, char **args)
{
    enum MHD_Result res = MHD_NO;
    struct catalog_image *ci = get_image(r, args[0], &res);
    if (!ci)
        return res;
    char *head, *tail;
    struct qcow2_snapshot_info *list;
    uint32_t n;
    api_validators_image(r, ci, false); /* before the body is read */
    int ret = info_segment(args[0], catalog_image_qcow2(ci), "", "\n", &head, &tail, &list, &n);
    catalog_put(ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    /* the snapshot list follows the generation; the rest (actual-size) may move on its own */
    api_validators_body(r, head, tail);
    if (!api_check_read(r, &res)) {
        qcow2_snapshot_list_free(list, n);
        free(head);
        free(tail);
        return res;
    }
    return api_reply_segments(r, head, tail, list, n, NULL, NULL, NULL);
}

/* The images of a listing, one segment each, looked up as the answer goes. */
struct images_walk {
    struct catalog *cat;
    char **names;
    size_t n, i;
    bool started, ended;
};

static void images_walk_free(void *p)
{
    struct images_walk *w = p;
    catalog_names_free(w->names, w->n);
    free(w);
}

static int images_next(void *p, char **head, char **tail, struct qcow2_snapshot_info **list, uint32_t *n)
{
    struct images_walk *w = p;
    *list = NULL;
    *n = 0;
    if (w->ended)
        return 0;
    const char *sep = w->started ? "," : "{\"images\":[";
    while (w->i < w->n) {
        const char *name = w->names[w->i++];
        struct catalog_image *ci;
        int ret = catalog_get(w->cat, name, &ci);
        if (ret == -ENOENT) /* removed since the listing */
            continue;
        w->started = true;
        if (ret < 0) {
            char *clean = api_scrub_paths(w->cat, err_msg(ret)); /* as an error answer is */
            json_t *e = json_pack("{s:s,s:{s:s,s:o}}", "name", name, "error", "code", api_errno_code(ret), "message",
                                  api_jstr(clean ? clean : err_msg(ret)));
            free(clean);
            char *text = e ? json_dumps(e, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
            json_decref(e);
            size_t hl = text ? strlen(sep) + strlen(text) + 1 : 0;
            *head = text ? malloc(hl) : NULL;
            if (*head)
                snprintf(*head, hl, "%s%s", sep, text);
            free(text);
            *tail = strdup("");
            return 1;
        }
        ret = info_segment(name, catalog_image_qcow2(ci), sep, "", head, tail, list, n);
        catalog_put(ci);
        return ret < 0 ? ret : 1;
    }
    w->ended = true;
    *head = strdup(w->started ? "]}\n" : "{\"images\":[]}\n");
    *tail = strdup("");
    return 1;
}

enum MHD_Result api_images_list(struct req *r, char **args)
{
    struct images_walk *w = calloc(1, sizeof *w);
    if (!w)
        return MHD_NO;
    w->cat = r->cat;
    int ret = catalog_list(r->cat, &w->names, &w->n);
    if (ret < 0) {
        free(w);
        return api_reply_errno(r, ret);
    }
    /* each image is looked up when the answer reaches it: one info at a time */
    char *head, *tail;
    struct qcow2_snapshot_info *list;
    uint32_t n;
    if ((ret = images_next(w, &head, &tail, &list, &n)) < 0) {
        images_walk_free(w);
        return api_reply_errno(r, ret);
    }
    return api_reply_segments(r, head, tail, list, n, images_next, w, images_walk_free);
}

/* ---- data ---- */

/* What GET .../data reads: an image of the catalog (ci) or a private one (own,
 * e.g. a snapshot view), released when the answer is done. */
struct data_src {
    struct catalog_image *ci;
    struct qcow2_image *img;
    struct catalog_private *own;
    struct qcow2_pin pin; /* valid while pinned */
    bool pinned;
};

static int data_pread(void *ctx, void *buf, size_t len, uint64_t off)
{
    return qcow2_pread(((struct data_src *)ctx)->img, buf, len, off);
}

/* Only a catalog image's own handle: its writers are the ones the pin holds
 * off. A snapshot view is a second handle on the file, freed through the first. */
static int data_pin(void *ctx, uint64_t off, uint64_t len, int *fd, uint64_t *fd_off)
{
    struct data_src *d = ctx;
    if (d->own || !d->ci)
        return 0;
    d->pinned = qcow2_pin_run(d->img, off, len, fd, fd_off, &d->pin) == 1;
    return d->pinned;
}

static void data_release(void *ctx)
{
    struct data_src *d = ctx;
    if (d->pinned)
        qcow2_unpin(&d->pin);
    catalog_put(d->ci);
    catalog_close_private(d->own, false);
    free(d);
}

enum MHD_Result api_image_data(struct req *r, char **args)
{
    enum MHD_Result res = MHD_NO;
    struct catalog_image *ci = get_image(r, args[0], &res);
    if (!ci)
        return res;
    api_validators_image(r, ci, false);
    if (!api_check_read(r, &res)) {
        catalog_put(ci);
        return res;
    }
    return api_send_data(r, catalog_image_qcow2(ci), ci, NULL);
}

enum MHD_Result api_send_data(struct req *r, struct qcow2_image *img, struct catalog_image *ci,
                              struct catalog_private *own)
{
    struct data_src *d = malloc(sizeof *d);
    if (!d) {
        catalog_put(ci);
        catalog_close_private(own, false);
        return MHD_NO;
    }
    *d = (struct data_src){.ci = ci, .img = img, .own = own};
    struct api_source src = {.ctx = d, .pread = data_pread, .pin = data_pin, .release = data_release,
                             .what = ci ? catalog_image_name(ci) : qcow2_get_info(img)->uri};
    return api_reply_ranged(r, qcow2_size(img), &src);
}

/* ---- extents ---- */

/* One merged run of the zero context. */
struct run {
    uint64_t start, length;
    bool zero, hole;
    bool backing; /* context=allocation: the bytes come from a backing layer */
};

struct extents_stream {
    struct catalog_image *ci;
    struct req *r;
    uint64_t off, size; /* next guest offset to ask about; the disk size */
    struct run next;    /* the run to print next (valid while next.length) */
    bool first, done;
    bool layers; /* context=allocation: runs also split where the layer changes */
    char text[160]; /* printed but not yet handed out */
    size_t tlen, tpos;
};

/* Fill *out with the next merged run from es->off; out->length 0 at the end. */
static int next_run(struct extents_stream *es, struct run *out)
{
    memset(out, 0, sizeof *out);
    struct qcow2_image *img = catalog_image_qcow2(es->ci);
    while (es->off < es->size) {
        struct qcow2_extent e;
        int ret = qcow2_block_status(img, es->off, es->size - es->off, &e);
        if (ret < 0)
            return ret;
        if (e.length == 0 || e.start != es->off || e.length > es->size - es->off)
            return err_fail(ENOTRECOVERABLE, "block status at %" PRIu64 " returned a bad run", es->off);
        bool zero = e.zero, hole = !e.present, backing = es->layers && e.present && e.depth > 0;
        if (out->length && (zero != out->zero || hole != out->hole || backing != out->backing))
            break;
        if (!out->length)
            *out = (struct run){.start = e.start, .zero = zero, .hole = hole, .backing = backing};
        out->length += e.length;
        es->off += e.length;
    }
    return 0;
}

/* Print the next piece of the JSON array into es->text. */
static int render(struct extents_stream *es)
{
    es->tpos = 0;
    if (!es->next.length) {
        es->tlen = (size_t)snprintf(es->text, sizeof es->text, "%s]\n", es->first ? "[" : "");
        es->done = true;
        return 0;
    }
    es->tlen = (size_t)snprintf(es->text, sizeof es->text,
                                "%s{\"start\":%" PRIu64 ",\"length\":%" PRIu64 ",\"zero\":%s,\"hole\":%s%s}",
                                es->first ? "[" : ",", es->next.start, es->next.length,
                                es->next.zero ? "true" : "false", es->next.hole ? "true" : "false",
                                !es->layers ? "" : es->next.backing ? ",\"backing\":true" : ",\"backing\":false");
    es->first = false;
    return next_run(es, &es->next);
}

static ssize_t extents_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct extents_stream *es = cls;
    size_t n = 0;
    while (n < max) {
        if (es->tpos == es->tlen) {
            if (es->done)
                break;
            int ret = render(es);
            if (ret < 0) {
                fprintf(stderr, "qcowd: %s: extents: %s\n", catalog_image_name(es->ci), err_msg(ret));
                return MHD_CONTENT_READER_END_WITH_ERROR;
            }
        }
        size_t k = es->tlen - es->tpos < max - n ? es->tlen - es->tpos : max - n;
        memcpy(buf + n, es->text + es->tpos, k);
        es->tpos += k;
        n += k;
    }
    if (n == 0)
        return MHD_CONTENT_READER_END_OF_STREAM;
    es->r->bytes += n;
    return (ssize_t)n;
}

static void extents_free(void *cls)
{
    struct extents_stream *es = cls;
    catalog_put(es->ci);
    free(es);
}

enum MHD_Result api_image_extents(struct req *r, char **args)
{
    const char *raw = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "context");
    bool layers = false;
    if (raw) {
        char *ctx = api_decode(raw, strlen(raw));
        if (!ctx)
            return api_reply_errno(r, -EINVAL);
        bool ok = !strcmp(ctx, "zero"), dirty = !strcmp(ctx, "dirty");
        layers = !strcmp(ctx, "allocation");
        free(ctx);
        if (dirty)
            return api_dirty_extents(r, args[0]);
        if (!ok && !layers)
            return api_reply_error(r, -EINVAL,
                                   "unknown extents context: \"zero\", \"allocation\" or \"dirty\" (with bitmap=NAME)");
    }
    enum MHD_Result res = MHD_NO;
    struct catalog_image *ci = get_image(r, args[0], &res);
    if (!ci)
        return res;
    struct extents_stream *es = calloc(1, sizeof *es);
    if (!es) {
        catalog_put(ci);
        return MHD_NO;
    }
    es->ci = ci;
    es->r = r;
    es->size = qcow2_size(catalog_image_qcow2(ci));
    es->first = true;
    es->layers = layers;
    /* the first run before answering, so a broken image gets a proper error */
    int ret = next_run(es, &es->next);
    if (ret < 0) {
        extents_free(es);
        return api_reply_errno(r, ret);
    }
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, extents_read, es, extents_free);
    if (!resp) {
        extents_free(es);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    return api_queue(r, 200, resp);
}
