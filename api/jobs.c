/* jobs.c: the handlers of /v1/jobs (list, get, cancel, pause, resume, dismiss)
 * and of the image calls that start jobs: convert, check and commit. */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api_int.h"
#include "catalog.h"
#include "err.h"
#include "jobops.h"
#include "jobs.h"

#define API_PAUSE_WAIT_MS 2000 /* a pause answers once the job stopped, or after this (202) */
#define API_PAUSE_WAITERS 16   /* pauses waiting at once, each on a thread; more answer at once */

static atomic_uint pause_waiters;

static enum MHD_Result no_jobs(struct req *r)
{
    return api_reply_status(r, 503, "unavailable", "the job engine is not running", NULL, NULL);
}

/* ---- the job object ---- */

static json_t *time_json(int64_t ms)
{
    if (!ms)
        return json_null();
    time_t s = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&s, &tm);
    char buf[80];
    snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
             tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
    return json_string(buf);
}

/* A JSON text of the service (result, params) as a value; fallback when absent. */
static json_t *json_text(const char *text, json_t *fallback)
{
    json_t *v = text ? json_loads(text, JSON_DECODE_ANY, NULL) : NULL;
    if (!v)
        return fallback;
    json_decref(fallback);
    return v;
}

json_t *api_job_json(const struct job_info *ji, struct catalog *cat)
{
    char *clean = ji->error ? api_scrub_paths(cat, ji->error) : NULL; /* as an error answer is */
    json_t *o = json_pack(
        "{s:s, s:o, s:o, s:s, s:b, s:I, s:I, s:o, s:b, s:o, s:o, s:o, s:o, s:o}", "id", ji->id, "type",
        api_jstr(ji->type), "image", api_jstr(ji->image), "status", job_status_name(ji->status), "pausing", ji->pausing,
        "current-progress", (json_int_t)ji->current, "total-progress", (json_int_t)ji->total, "error",
        ji->error ? api_jstr(clean ? clean : ji->error) : json_null(), "cancelled", ji->cancelled, "result",
        json_text(ji->result, json_null()), "params", json_text(ji->params, json_object()), "created",
        time_json(ji->created_ms), "started", time_json(ji->started_ms), "finished", time_json(ji->finished_ms));
    free(clean);
    return o;
}

/* Reply status with the job object of ji (a copy, released here). */
static enum MHD_Result reply_info(struct req *r, unsigned status, struct job_info *ji)
{
    json_t *o = api_job_json(ji, r->cat);
    job_info_release(ji);
    if (!o)
        return api_reply_errno(r, -ENOMEM);
    return api_reply_json(r, status, o);
}

enum MHD_Result api_reply_job(struct req *r, json_t *job)
{
    /* job: the engine's handle {"id": ID}; the object as it is now, unless the
     * job went already (dismissed): then the handle */
    const char *id = json_string_value(json_object_get(job, "id"));
    char loc[64];
    snprintf(loc, sizeof loc, "/v1/jobs/%s", id ? id : "");
    struct job_info ji;
    json_t *o = id && jobs_info(r->jobs, id, &ji) == 0 ? api_job_json(&ji, r->cat) : NULL;
    if (o) {
        job_info_release(&ji);
        json_decref(job);
        job = o;
    }
    return api_reply_json_hdr(r, 202, job, MHD_HTTP_HEADER_LOCATION, loc);
}

/* ---- /v1/jobs ---- */

/* A query argument as a new decoded string: 0 with *out NULL when absent, 1, or
 * -EINVAL with err_msg(). */
static int query_str(struct req *r, const char *name, char **out)
{
    const char *raw = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, name);
    *out = NULL;
    if (!raw)
        return 0;
    if (!(*out = api_decode(raw, strlen(raw))))
        return err_prefix(-EINVAL, "%s", name);
    return 1;
}

enum MHD_Result api_jobs_list(struct req *r, char **args)
{
    if (!r->jobs)
        return no_jobs(r);
    char *image = NULL, *st = NULL;
    int status = -1;
    int ret = query_str(r, "image", &image);
    if (ret >= 0)
        ret = query_str(r, "status", &st);
    if (ret >= 0 && image && (ret = catalog_valid_name(image)) < 0)
        ret = err_prefix(ret, "image");
    if (ret >= 0 && st && (status = job_status_parse(st)) < 0)
        ret = err_fail(EINVAL, "unknown job status '%.40s': one of created, running, paused, aborting, concluded", st);
    struct job_info *a = NULL;
    size_t n = 0;
    if (ret >= 0)
        ret = jobs_list(r->jobs, image, status, &a, &n);
    free(image);
    free(st);
    if (ret < 0)
        return api_reply_errno(r, ret);
    json_t *arr = json_array();
    for (size_t i = 0; arr && i < n; i++)
        if (json_array_append_new(arr, api_job_json(&a[i], r->cat)) < 0) {
            json_decref(arr);
            arr = NULL;
        }
    jobs_info_free(a, n);
    if (!arr)
        return api_reply_errno(r, -ENOMEM);
    return api_reply_json(r, 200, json_pack("{s:o}", "jobs", arr));
}

enum MHD_Result api_job_get(struct req *r, char **args)
{
    if (!r->jobs)
        return no_jobs(r);
    struct job_info ji;
    int ret = jobs_info(r->jobs, args[0], &ji);
    if (ret < 0)
        return api_reply_errno(r, ret);
    return reply_info(r, 200, &ji);
}

typedef int (*verb_fn)(struct jobs *js, const char *id, struct job_info *out);

static enum MHD_Result verb(struct req *r, const char *id, verb_fn fn, unsigned ok_status)
{
    if (!r->jobs)
        return no_jobs(r);
    struct job_info ji;
    int ret = fn(r->jobs, id, &ji);
    if (ret < 0)
        return api_reply_errno(r, ret);
    if (ok_status == 204) {
        job_info_release(&ji);
        return api_reply_empty(r, 204, NULL, NULL);
    }
    return reply_info(r, ok_status, &ji);
}

enum MHD_Result api_job_dismiss(struct req *r, char **args)
{
    return verb(r, args[0], jobs_dismiss, 204);
}

enum MHD_Result api_job_cancel(struct req *r, char **args)
{
    return verb(r, args[0], jobs_cancel, 200);
}

enum MHD_Result api_job_resume(struct req *r, char **args)
{
    return verb(r, args[0], jobs_resume, 200);
}

/* A pause waits (up to API_PAUSE_WAIT_MS) for the job to stop, on a thread of
 * its own with the connection suspended: 200 once it stopped, 202 with
 * "pausing" when it did not reach a progress point in time. */
struct pause_work {
    struct jobs *js;
    char id[64];
    int ret;
    char msg[256];
    struct job_info ji;
};

static void pause_work(void *ctx)
{
    struct pause_work *w = ctx;
    w->ret = jobs_pause(w->js, w->id, API_PAUSE_WAIT_MS, &w->ji);
    if (w->ret < 0)
        snprintf(w->msg, sizeof w->msg, "%s", err_msg(w->ret));
}

static enum MHD_Result pause_then(struct req *r, void *ctx)
{
    struct pause_work *w = ctx;
    if (w->ret < 0)
        return api_reply_error(r, w->ret, w->msg);
    return reply_info(r, w->ji.pausing ? 202 : 200, &w->ji);
}

static void pause_free(void *ctx)
{
    struct pause_work *w = ctx;
    job_info_release(&w->ji);
    free(w);
    atomic_fetch_sub(&pause_waiters, 1);
}

static enum MHD_Result pause_end(struct req *r, const char *id, json_t *body)
{
    (void)body; /* nothing to say: {} or empty */
    if (atomic_fetch_add(&pause_waiters, 1) >= API_PAUSE_WAITERS) {
        /* enough threads wait already: ask, and answer with what is now */
        atomic_fetch_sub(&pause_waiters, 1);
        struct job_info ji;
        int ret = jobs_pause(r->jobs, id, 0, &ji);
        if (ret < 0)
            return api_reply_errno(r, ret);
        return reply_info(r, ji.pausing ? 202 : 200, &ji);
    }
    struct pause_work *w = calloc(1, sizeof *w);
    if (!w) {
        atomic_fetch_sub(&pause_waiters, 1);
        return api_reply_errno(r, err_fail(ENOMEM, "out of memory"));
    }
    w->js = r->jobs;
    snprintf(w->id, sizeof w->id, "%s", id);
    return api_offload(r, pause_work, pause_then, w, pause_free);
}

enum MHD_Result api_job_pause(struct req *r, char **args)
{
    if (!r->jobs)
        return no_jobs(r);
    if (strlen(args[0]) >= sizeof((struct pause_work *)0)->id)
        return api_reply_errno(r, err_fail(ENOENT, "no job with id '%.40s'", args[0]));
    return api_json_body(r, args[0], pause_end);
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
