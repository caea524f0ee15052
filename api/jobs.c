/* jobs.c: the handlers of /v1/jobs (list, get, cancel, pause, resume, dismiss)
 * and of the image calls that start jobs: convert, check and commit. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_int.h"
#include "catalog.h"
#include "err.h"
#include "jobops.h"
#include "jobs.h"

static enum MHD_Result no_jobs(struct req *r)
{
    return api_reply_status(r, 503, "unavailable", "the job engine is not running", NULL, NULL);
}

enum MHD_Result api_reply_job(struct req *r, json_t *job)
{
    char loc[64];
    snprintf(loc, sizeof loc, "/v1/jobs/%s", json_string_value(json_object_get(job, "id")));
    return api_reply_json_hdr(r, 202, job, MHD_HTTP_HEADER_LOCATION, loc);
}

enum MHD_Result api_jobs_list(struct req *r, char **args)
{
    if (!r->jobs)
        return no_jobs(r);
    return api_reply_json(r, 200, json_pack("{s:o}", "jobs", jobs_list(r->jobs)));
}

enum MHD_Result api_job_get(struct req *r, char **args)
{
    if (!r->jobs)
        return no_jobs(r);
    int err = 0;
    json_t *o = jobs_get(r->jobs, args[0], &err);
    if (!o)
        return api_reply_errno(r, err);
    return api_reply_json(r, 200, o);
}

typedef int (*verb_fn)(struct jobs *js, const char *id, json_t **job_json);

static enum MHD_Result verb(struct req *r, const char *id, verb_fn fn, unsigned ok_status)
{
    if (!r->jobs)
        return no_jobs(r);
    json_t *o;
    int ret = fn(r->jobs, id, &o);
    if (ret < 0)
        return api_reply_errno(r, ret);
    if (ok_status == 204) {
        json_decref(o);
        return api_reply_empty(r, 204, NULL, NULL);
    }
    return api_reply_json(r, ok_status, o);
}

enum MHD_Result api_job_dismiss(struct req *r, char **args)
{
    return verb(r, args[0], jobs_dismiss, 204);
}

enum MHD_Result api_job_cancel(struct req *r, char **args)
{
    return verb(r, args[0], jobs_cancel, 200);
}

enum MHD_Result api_job_pause(struct req *r, char **args)
{
    return verb(r, args[0], jobs_pause, 200);
}

enum MHD_Result api_job_resume(struct req *r, char **args)
{
    return verb(r, args[0], jobs_resume, 200);
}

/* A POST whose body is optional: an empty body is an empty object. The image is
 * looked at first so an unknown one answers 404 before any body is read. */
static enum MHD_Result start(struct req *r, const char *name,
                             enum MHD_Result (*end)(struct req *r, const char *name, json_t *body))
{
    if (!r->jobs)
        return no_jobs(r);
    int ret = catalog_valid_name(name);
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_json_body(r, name, end);
}

static enum MHD_Result bad_body(struct req *r, const char *what, const json_error_t *je)
{
    char msg[300];
    snprintf(msg, sizeof msg, "bad %s request: %s", what, je->text);
    return api_reply_error(r, -EINVAL, msg);
}

/* ---- convert ---- */

static enum MHD_Result convert_end(struct req *r, const char *name, json_t *body)
{
    struct svc_convert_opts o = {.extended_l2 = -1};
    const char *ctype = NULL, *backing = NULL;
    json_int_t cs = 0, rb = 0;
    int compress = 0, extl2 = -1;
    json_error_t je;
    if (json_unpack_ex(body, &je, JSON_STRICT, "{s:s, s?s, s?b, s?s, s?s, s?I, s?b, s?I}", "target", &o.target,
                       "snapshot", &o.snapshot, "compress", &compress, "compression-type", &ctype, "backing", &backing,
                       "cluster-size", &cs, "extended-l2", &extl2, "refcount-bits", &rb) < 0)
        return bad_body(r, "convert", &je);
    if (ctype && strcmp(ctype, "zlib") && strcmp(ctype, "zstd"))
        return api_reply_error(r, -EINVAL, "compression-type must be \"zlib\" or \"zstd\"");
    if (backing && strcmp(backing, "flatten") && strcmp(backing, "keep"))
        return api_reply_error(r, -EINVAL, "backing must be \"flatten\" (default) or \"keep\"");
    if (cs < 0 || cs > (2 << 20) || rb < 0 || rb > 64)
        return api_reply_error(r, -EINVAL, "cluster-size or refcount-bits out of range");
    o.compress = compress;
    o.zstd = ctype && !strcmp(ctype, "zstd");
    o.keep_backing = backing && !strcmp(backing, "keep");
    o.cluster_size = (uint32_t)cs;
    o.refcount_bits = (unsigned)rb;
    o.extended_l2 = extl2;
    json_t *job;
    int ret = svc_convert_job(r->jobs, r->cat, name, &o, json_deep_copy(body), &job);
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_reply_job(r, job);
}

enum MHD_Result api_image_convert(struct req *r, char **args)
{
    return start(r, args[0], convert_end);
}

/* ---- check ---- */

/* A job whose body is one optional string setting ({"KEY": "..."}). */
typedef int (*one_setting_job)(struct jobs *, struct catalog *, const char *image, const char *setting, json_t **job);

static enum MHD_Result start_one_setting(struct req *r, const char *name, json_t *body, const char *what,
                                         const char *key, one_setting_job fn)
{
    const char *value = NULL;
    json_error_t je;
    if (json_unpack_ex(body, &je, JSON_STRICT, "{s?s}", key, &value) < 0)
        return bad_body(r, what, &je);
    json_t *job;
    int ret = fn(r->jobs, r->cat, name, value, &job);
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_reply_job(r, job);
}

static enum MHD_Result check_end(struct req *r, const char *name, json_t *body)
{
    return start_one_setting(r, name, body, "check", "repair", svc_check_job);
}

enum MHD_Result api_image_check(struct req *r, char **args)
{
    return start(r, args[0], check_end);
}

/* ---- commit ---- */

static enum MHD_Result commit_end(struct req *r, const char *name, json_t *body)
{
    const char *base = NULL;
    int force = 0;
    json_error_t je;
    if (json_unpack_ex(body, &je, JSON_STRICT, "{s?s, s?b}", "base", &base, "force", &force) < 0)
        return bad_body(r, "commit", &je);
    json_t *job;
    int ret = svc_commit_job(r->jobs, r->cat, name, base, force, &job);
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_reply_job(r, job);
}

enum MHD_Result api_image_commit(struct req *r, char **args)
{
    return start(r, args[0], commit_end);
}
