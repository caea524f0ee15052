/* manage.c: whole-image calls: POST /v1/images (create with QMP blockdev-create's
 * option names) and DELETE /v1/images/{name}; and the collector of JSON bodies. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_int.h"
#include "catalog.h"
#include "err.h"
#include "qcow2.h"

/* ---- JSON request bodies ---- */

struct jbody {
    char *buf;
    size_t len;
    char name[CATALOG_NAME_MAX + 1]; /* the path's image name, or "" */
    enum MHD_Result (*end)(struct req *r, const char *name, json_t *body);
};

static int jbody_data(struct req *r, const char *buf, size_t n)
{
    struct jbody *jb = r->ctx;
    if (n > API_JSON_MAX - jb->len)
        return err_fail(EFBIG, "the JSON body is larger than %u bytes", API_JSON_MAX);
    char *nb = realloc(jb->buf, jb->len + n);
    if (!nb)
        return err_fail(ENOMEM, "out of memory");
    memcpy(nb + jb->len, buf, n);
    jb->buf = nb;
    jb->len += n;
    return 0;
}

static enum MHD_Result jbody_end(struct req *r)
{
    struct jbody *jb = r->ctx;
    json_error_t je;
    /* no body at all is an empty object: calls whose options are all optional */
    json_t *body = jb->len ? json_loadb(jb->buf, jb->len, JSON_REJECT_DUPLICATES, &je) : json_object();
    if (!body) {
        char msg[300];
        snprintf(msg, sizeof msg, "malformed JSON body: %s (line %d, column %d)", je.text, je.line, je.column);
        return api_reply_error(r, -EINVAL, msg);
    }
    if (!json_is_object(body)) {
        json_decref(body);
        return api_reply_error(r, -EINVAL, "the JSON body must be an object");
    }
    enum MHD_Result res = jb->end(r, jb->name, body);
    json_decref(body);
    return res;
}

static void jbody_done(struct req *r, bool completed)
{
    struct jbody *jb = r->ctx;
    free(jb->buf);
    free(jb);
    r->ctx = NULL;
}

static const struct api_body jbody_ops = {.data = jbody_data, .end = jbody_end, .done = jbody_done};

enum MHD_Result api_json_body(struct req *r, const char *name,
                              enum MHD_Result (*end)(struct req *r, const char *name, json_t *body))
{
    const char *cl = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl && strtoull(cl, NULL, 10) > API_JSON_MAX) {
        char msg[80];
        snprintf(msg, sizeof msg, "the JSON body is larger than %u bytes", API_JSON_MAX);
        return api_reply_error(r, -EFBIG, msg);
    }
    struct jbody *jb = calloc(1, sizeof *jb);
    if (!jb)
        return MHD_NO;
    snprintf(jb->name, sizeof jb->name, "%s", name ? name : "");
    jb->end = end;
    r->ctx = jb;
    r->body = &jbody_ops;
    return MHD_YES;
}

/* ---- create ---- */

/* A JSON integer that must fit in [0, max]. */
static int in_range(const char *key, json_int_t v, json_int_t max, uint64_t *out)
{
    if (v < 0 || v > max)
        return err_fail(EINVAL, "%s: %lld is out of range", key, (long long)v);
    *out = (uint64_t)v;
    return 0;
}

/* Fill o from the create request; strings point into body. */
static int create_opts(json_t *body, const char **name, struct qcow2_create_opts *o)
{
    json_int_t size = -1, cluster = 0, refbits = 0;
    int extl2 = 0, lazy = 0;
    const char *ctype = NULL, *version = NULL, *prealloc = NULL;
    json_error_t je;
    memset(o, 0, sizeof *o);
    if (json_unpack_ex(body, &je, JSON_STRICT, "{s:s, s?I, s?I, s?b, s?s, s?I, s?b, s?s, s?s, s?s, s?s}", "name",
                       name, "size", &size, "cluster-size", &cluster, "extended-l2", &extl2, "compression-type",
                       &ctype, "refcount-bits", &refbits, "lazy-refcounts", &lazy, "backing-file", &o->backing_file,
                       "backing-fmt", &o->backing_format, "version", &version, "preallocation", &prealloc) < 0)
        return err_fail(EINVAL, "bad create request: %s", je.text);
    uint64_t v = 0;
    int ret;
    if (size == -1 && !o->backing_file)
        return err_fail(EINVAL, "bad create request: \"size\" is required without \"backing-file\"");
    if (size != -1) {
        if ((ret = in_range("size", size, INT64_MAX, &v)) < 0)
            return ret;
        o->size = v;
    }
    if ((ret = in_range("cluster-size", cluster, UINT32_MAX, &v)) < 0)
        return ret;
    o->cluster_size = (uint32_t)v;
    if ((ret = in_range("refcount-bits", refbits, 64, &v)) < 0)
        return ret;
    o->refcount_bits = (unsigned)v;
    o->extended_l2 = extl2;
    o->lazy_refcounts = lazy;
    if (ctype && strcmp(ctype, "zlib") && strcmp(ctype, "zstd"))
        return err_fail(EINVAL, "compression-type must be \"zlib\" or \"zstd\"");
    o->compression_zstd = ctype && !strcmp(ctype, "zstd");
    if (version && strcmp(version, "v2") && strcmp(version, "v3"))
        return err_fail(EINVAL, "version must be \"v2\" or \"v3\"");
    o->version = version && !strcmp(version, "v2") ? 2 : 3;
    if (prealloc && strcmp(prealloc, "off") && strcmp(prealloc, "metadata"))
        return err_fail(EINVAL, "preallocation must be \"off\" or \"metadata\" (falloc and full are not supported)");
    o->prealloc_metadata = prealloc && !strcmp(prealloc, "metadata");
    return 0;
}

/* A preallocating create writes for as long as the disk is large: on a thread
 * of its own (api_offload), so no server thread and none of its other
 * connections wait for it. */
struct create_work {
    struct catalog *cat;
    json_t *body; /* the strings of o point into it */
    const char *name;
    struct qcow2_create_opts o;
    int ret;
    char msg[ERR_MSG_MAX];
};

static void create_work(void *ctx)
{
    struct create_work *w = ctx;
    w->ret = catalog_create(w->cat, w->name, &w->o);
    if (w->ret < 0)
        snprintf(w->msg, sizeof w->msg, "%s", err_msg(w->ret));
}

static void create_work_free(void *ctx)
{
    struct create_work *w = ctx;
    json_decref(w->body);
    free(w);
}

static enum MHD_Result created(struct req *r, const char *name, int ret);

static enum MHD_Result create_then(struct req *r, void *ctx)
{
    struct create_work *w = ctx;
    if (w->ret < 0)
        return api_reply_error(r, w->ret, w->msg);
    return created(r, w->name, 0);
}

static enum MHD_Result create_end(struct req *r, const char *unused, json_t *body)
{
    const char *name;
    struct qcow2_create_opts o;
    enum MHD_Result res;
    if (MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_IF_MATCH) && !api_check_absent(r, &res))
        return res; /* a create makes a new image: there is no current one to match */
    int ret = create_opts(body, &name, &o);
    if (ret == 0 && o.prealloc_metadata) {
        struct create_work *w = calloc(1, sizeof *w);
        if (!w)
            return api_reply_errno(r, err_fail(ENOMEM, "out of memory"));
        *w = (struct create_work){.cat = r->cat, .body = json_incref(body), .name = name, .o = o};
        return api_offload(r, create_work, create_then, w, create_work_free);
    }
    if (ret == 0)
        ret = catalog_create(r->cat, name, &o);
    return created(r, name, ret);
}

/* The answer to a create: 201 with the new image's info, or the error. */
static enum MHD_Result created(struct req *r, const char *name, int ret)
{
    enum MHD_Result res;
    if (ret == -EEXIST && api_if_none_match_any(r) && !api_check_write(r, NULL, &res))
        return res; /* If-None-Match: * asked for a new name: 412, not 409 */
    if (ret < 0)
        return api_reply_errno(r, ret);
    struct catalog_image *ci;
    ret = catalog_get(r->cat, name, &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    json_t *info = api_info_json(name, catalog_image_qcow2(ci));
    catalog_put(ci);
    char loc[CATALOG_NAME_MAX + 16];
    snprintf(loc, sizeof loc, "/v1/images/%s", name); /* a valid name needs no escaping */
    return api_reply_json_hdr(r, 201, info, MHD_HTTP_HEADER_LOCATION, loc);
}

enum MHD_Result api_image_create(struct req *r, char **args)
{
    return api_json_body(r, NULL, create_end);
}

/* ---- delete ---- */

/* DELETE's preconditions, evaluated while the catalog holds the name against
 * writers (catalog_remove_if): a refusal is kept for the answer. */
struct delete_check {
    struct req *r;
    bool refused;
    enum MHD_Result res;
};

static int delete_check(void *ctx, struct catalog_image *ci)
{
    struct delete_check *dc = ctx;
    if (api_check_write(dc->r, ci, &dc->res))
        return 0;
    dc->refused = true;
    return -ECANCELED;
}

enum MHD_Result api_image_delete(struct req *r, char **args)
{
    /* If-Match / If-Unmodified-Since: compared with the image as it is removed
     * (no write lands between); an image that cannot be opened has no tag to
     * match, and answers as a delete without them would */
    struct delete_check dc = {.r = r};
    int ret = api_has_preconditions(r) ? catalog_remove_if(r->cat, args[0], delete_check, &dc)
                                       : catalog_remove(r->cat, args[0]);
    if (dc.refused)
        return dc.res;
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_reply_empty(r, 204, NULL, NULL);
}
