/* jobs_records.c: the job records, the file that outlives a restart: its own
 * versioned JSON format (not the REST job object), written whole and renamed in
 * place through the VFS, read back strictly, set aside when it cannot be. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "jobs_int.h"
#include "vfs.h"

/* The records: {"format": JOBS_RECORDS_FORMAT, "version": 1, "next-id": N,
 * "jobs": [{"id", "type", "image", "status", "current", "total", "error" (or
 * null), "cancelled", "result" (or null), "params", "created-ms", "started-ms",
 * "finished-ms"}]}: what a restart needs, not the REST job object. */
static json_t *record(const struct job *j)
{
    return json_pack("{s:s, s:s, s:s, s:s, s:I, s:I, s:o, s:b, s:o, s:o, s:I, s:I, s:I}", "id", j->id, "type", j->type,
                     "image", j->image, "status", job_status_name(j->status), "current", (json_int_t)j->cur, "total",
                     (json_int_t)j->total, "error", j->error ? json_string(j->error) : json_null(), "cancelled",
                     j->cancelled, "result", j->result ? json_deep_copy(j->result) : json_null(),
                     /* copies: jansson's refcounts are not shared across threads (TSan) */
                     "params", j->params ? json_deep_copy(j->params) : json_object(), "created-ms",
                     (json_int_t)j->created_ms, "started-ms", (json_int_t)j->started_ms, "finished-ms",
                     (json_int_t)j->finished_ms);
}

void jobs__save(struct jobs *js)
{
    if (!js->state_uri)
        return;
    pthread_mutex_lock(&js->save_lock);
    pthread_mutex_lock(&js->lock);
    json_t *a = json_array();
    for (struct job *j = js->head; a && j; j = j->next)
        json_array_append_new(a, record(j));
    json_t *doc = json_pack("{s:s, s:i, s:I, s:o}", "format", JOBS_RECORDS_FORMAT, "version", JOBS_RECORDS_VERSION,
                            "next-id", (json_int_t)js->next_num, "jobs", a);
    pthread_mutex_unlock(&js->lock);
    char *text = doc ? json_dumps(doc, JSON_INDENT(1) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(doc);
    char *tmp = NULL;
    struct vfs_file *f = NULL;
    struct vfs_pending *p = NULL; /* published whole: a PUT on S3, tmp + rename elsewhere */
    int ret = -ENOMEM;
    if (text && asprintf(&tmp, "%s.tmp", js->state_uri) >= 0 &&
        (ret = vfs_pending_begin(js->state_uri, tmp, &p)) == 0) {
        if (!vfs_pending_deferred(p))
            vfs_remove(tmp); /* left by a crash */
        ret = vfs_open(vfs_pending_uri(p), VFS_O_RDWR | VFS_O_CREATE, &f);
        if (ret == 0)
            ret = vfs_pwrite(f, text, strlen(text), 0);
        if (ret == 0)
            ret = vfs_flush(f);
        if (f)
            vfs_close(f);
        if (ret == 0)
            ret = vfs_pending_commit(p, 0);
    }
    vfs_pending_end(p);
    if (ret < 0)
        fprintf(stderr, "qcowd: saving the job records to %s: %s\n", js->state_uri, err_msg(ret));
    free(tmp);
    free(text);
    pthread_mutex_unlock(&js->save_lock);
}

/* One record into a job (appended), strictly: -EINVAL with err_msg() naming
 * what is wrong. */
static int load_record(struct jobs *js, json_t *o, size_t i)
{
    const char *id, *type, *image, *st;
    json_int_t cur, total, cms, sms, fms;
    json_t *error, *result, *params;
    int cancelled;
    json_error_t je;
    if (json_unpack_ex(o, &je, JSON_STRICT, "{s:s, s:s, s:s, s:s, s:I, s:I, s:o, s:b, s:o, s:o, s:I, s:I, s:I}", "id",
                       &id, "type", &type, "image", &image, "status", &st, "current", &cur, "total", &total, "error",
                       &error, "cancelled", &cancelled, "result", &result, "params", &params, "created-ms", &cms,
                       "started-ms", &sms, "finished-ms", &fms) < 0)
        return err_fail(EINVAL, "record %zu: %s", i, je.text);
    char *end;
    unsigned long long num = strtoull(id, &end, 10);
    int status = job_status_parse(st);
    if (*end || !num || strlen(id) >= sizeof((struct job *)0)->id || status < 0 || cur < 0 || total < 0 ||
        !(json_is_string(error) || json_is_null(error)) || !json_is_object(params))
        return err_fail(EINVAL, "record %zu (job %.24s): a field is out of range", i, id);
    struct job *j = calloc(1, sizeof *j);
    if (!j || !(j->type = strdup(type)) || !(j->image = strdup(image)) ||
        (json_is_string(error) && !(j->error = strdup(json_string_value(error)))) ||
        !(j->params_text = jobs__dump(params)) || (!json_is_null(result) && !(j->result_text = jobs__dump(result)))) {
        jobs__job_free(j);
        return err_fail(ENOMEM, "out of memory");
    }
    j->js = js;
    snprintf(j->id, sizeof j->id, "%s", id);
    j->num = num;
    if (j->num >= js->next_num)
        js->next_num = j->num + 1;
    j->cur = (uint64_t)cur;
    j->total = (uint64_t)total;
    j->cancelled = cancelled;
    j->result = json_is_null(result) ? NULL : json_deep_copy(result);
    j->params = json_deep_copy(params);
    j->created_ms = cms;
    j->started_ms = sms;
    j->finished_ms = fms;
    if (status != JOB_CONCLUDED) {
        /* "created" too: the record of a start is saved a moment after it */
        j->cut_off = true;
        char msg[200];
        snprintf(msg, sizeof msg, "cut off by a restart of qcowd (the job was %s)", st);
        free(j->error);
        j->error = strdup(msg);
        j->finished_ms = jobs__now_ms();
    }
    j->status = JOB_CONCLUDED;
    j->started = true;
    if (js->tail)
        js->tail->next = j;
    else
        js->head = j;
    js->tail = j;
    return 0;
}

/* Parse the records text; -EINVAL (or -ENOMEM) with err_msg() saying why not. */
static int parse_records(struct jobs *js, const char *text, size_t size)
{
    json_error_t je;
    json_t *doc = json_loadb(text, size, 0, &je);
    if (!doc)
        return err_fail(EINVAL, "not JSON (%s, line %d)", je.text, je.line);
    const char *format = json_string_value(json_object_get(doc, "format"));
    json_t *version = json_object_get(doc, "version"), *a = json_object_get(doc, "jobs");
    json_t *next = json_object_get(doc, "next-id");
    int ret = 0;
    if (!format || strcmp(format, JOBS_RECORDS_FORMAT))
        ret = err_fail(EINVAL, "not a \"%s\" file (an older qcowd's, or another file)", JOBS_RECORDS_FORMAT);
    else if (!json_is_integer(version) || json_integer_value(version) != JOBS_RECORDS_VERSION)
        ret = err_fail(EINVAL, "version %lld, this qcowd reads version %d (set aside, not overwritten)",
                       (long long)json_integer_value(version), JOBS_RECORDS_VERSION);
    else if (!json_is_array(a) || !json_is_integer(next) || json_integer_value(next) < 1 || json_object_size(doc) != 4)
        ret = err_fail(EINVAL, "the top level is not {format, version, next-id, jobs}");
    if (ret == 0)
        js->next_num = (uint64_t)json_integer_value(next);
    size_t i;
    json_t *o;
    json_array_foreach(a, i, o)
    {
        if (ret < 0)
            break;
        ret = load_record(js, o, i);
    }
    json_decref(doc);
    return ret;
}

/* Read the records of a previous run; a missing file is an empty list, one that
 * cannot be read is set aside (STATE_URI.rejected) and is an empty list too:
 * unreadable records must not keep the daemon down, nor be overwritten. */
int jobs__load(struct jobs *js)
{
    struct vfs_file *f;
    int ret = vfs_open(js->state_uri, VFS_O_RDONLY, &f);
    if (ret == -ENOENT) {
        err_clear();
        return 0;
    }
    if (ret < 0)
        return err_prefix(ret, "job records %s", js->state_uri);
    uint64_t size = 0;
    ret = vfs_size(f, &size);
    char *text = NULL;
    bool bad = false;
    if (ret == 0 && size > JOBS_RECORDS_MAX_BYTES) {
        ret = err_fail(EFBIG, "larger than %u MiB", JOBS_RECORDS_MAX_BYTES >> 20);
        bad = true;
    }
    if (ret == 0 && !(text = malloc((size_t)size + 1)))
        ret = err_fail(ENOMEM, "out of memory");
    if (ret == 0)
        ret = vfs_pread(f, text, (size_t)size, 0);
    vfs_close(f);
    if (ret == 0) {
        ret = parse_records(js, text, (size_t)size);
        bad = ret == -EINVAL;
    }
    free(text);
    if (!bad)
        return ret < 0 ? err_prefix(ret, "job records %s", js->state_uri) : 0;
    char *aside = NULL;
    fprintf(stderr, "qcowd: job records %s: %s; ", js->state_uri, err_msg(ret));
    while (js->head) { /* what was read before the fault goes too */
        struct job *j = js->head;
        js->head = j->next;
        jobs__job_free(j);
    }
    js->tail = NULL;
    js->next_num = 1;
    if (asprintf(&aside, "%s.rejected", js->state_uri) >= 0 && vfs_rename(js->state_uri, aside) == 0)
        fprintf(stderr, "set aside as %s; starting with none\n", aside);
    else
        fprintf(stderr, "could not set them aside (%s); starting with none\n", aside ? err_msg(-EIO) : "no memory");
    free(aside);
    err_clear();
    return 0;
}
