/* jobs.c: the job engine: a queue served by a pool of workers, per-image locks so
 * conflicting jobs run one after the other, the state machine, and the records
 * saved as one JSON file through the VFS on every status change. */
#include "jobs.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "err.h"
#include "vfs.h"

struct job {
    struct jobs *js;
    uint64_t num;
    char id[24];
    char owner[96];
    char *type, *image;
    char **locks;   /* NULL-terminated image names held while it runs */
    json_t *params; /* owned */
    enum job_status status;
    bool started;    /* run was called (or is about to be) */
    bool cancel_req; /* cancel asked while started */
    bool cancelled;
    bool cut_off;    /* loaded from the records unconcluded: cut off by a restart */
    bool retry_req;  /* run asked to be run again later (job_retry_later; worker's own) */
    bool parked;     /* started, waiting off any worker until retry_ms for an image */
    int64_t retry_ms;
    uint64_t cur, total;
    char *error;
    json_t *result; /* owned, or NULL */
    int64_t created_ms, started_ms, finished_ms; /* 0: not yet */
    int64_t progress_ms;                         /* last progress event */
    job_run_fn run;
    void *arg;
    void (*free_arg)(void *);
    struct job *next;
};

struct jobs {
    struct jobs_config cfg;
    char *state_uri;
    pthread_mutex_t lock; /* guards everything below and every job's fields */
    pthread_cond_t cond;  /* work queued, locks released, a job resumed or cancelled */
    struct job *head, *tail;
    uint64_t next_num;
    bool stopping;
    pthread_t *threads;
    unsigned nthreads;
    pthread_mutex_t save_lock; /* serialises saves; taken before lock */
};

static const char *const status_names[] = {"created", "running", "paused", "aborting", "concluded"};

const char *job_status_name(enum job_status s)
{
    return status_names[s];
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

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

static int64_t time_parse(json_t *v)
{
    const char *s = json_string_value(v);
    struct tm tm = {0};
    int ms = 0;
    if (!s || sscanf(s, "%d-%d-%dT%d:%d:%d.%dZ", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour, &tm.tm_min,
                     &tm.tm_sec, &ms) != 7)
        return 0;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    return (int64_t)timegm(&tm) * 1000 + ms;
}

/* With js->lock held: the job object. */
static json_t *to_json(const struct job *j)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    json_object_set_new(o, "id", json_string(j->id));
    json_object_set_new(o, "type", json_string(j->type));
    json_object_set_new(o, "image", json_string(j->image));
    json_object_set_new(o, "status", json_string(status_names[j->status]));
    json_object_set_new(o, "current-progress", json_integer((json_int_t)j->cur));
    json_object_set_new(o, "total-progress", json_integer((json_int_t)j->total));
    json_object_set_new(o, "error", j->error ? json_string(j->error) : json_null());
    json_object_set_new(o, "cancelled", json_boolean(j->cancelled));
    /* copies, not references: jansson's refcounts do not order a free in another
     * thread after our reads (TSan sees a race), so no JSON value is shared */
    json_object_set_new(o, "result", j->result ? json_deep_copy(j->result) : json_null());
    json_object_set_new(o, "params", j->params ? json_deep_copy(j->params) : json_object());
    json_object_set_new(o, "created", time_json(j->created_ms));
    json_object_set_new(o, "started", time_json(j->started_ms));
    json_object_set_new(o, "finished", time_json(j->finished_ms));
    return o;
}

static void job_free(struct job *j)
{
    if (!j)
        return;
    if (j->free_arg)
        j->free_arg(j->arg);
    for (char **l = j->locks; l && *l; l++)
        free(*l);
    free(j->locks);
    free(j->type);
    free(j->image);
    free(j->error);
    json_decref(j->params);
    json_decref(j->result);
    free(j);
}

static void emit(struct jobs *js, const char *event, json_t *o)
{
    if (js->cfg.event && o)
        js->cfg.event(js->cfg.event_opaque, event, o);
}

/* Emit event with the job's object as it is now (takes and drops the lock). */
static void emit_job(struct jobs *js, const char *event, struct job *j)
{
    if (!js->cfg.event)
        return;
    pthread_mutex_lock(&js->lock);
    json_t *o = to_json(j);
    pthread_mutex_unlock(&js->lock);
    emit(js, event, o);
    json_decref(o);
}

/* ---- records ---- */

static void save(struct jobs *js)
{
    if (!js->state_uri)
        return;
    pthread_mutex_lock(&js->save_lock);
    pthread_mutex_lock(&js->lock);
    json_t *a = json_array();
    for (struct job *j = js->head; j; j = j->next)
        json_array_append_new(a, to_json(j));
    json_t *doc = json_pack("{s:I,s:o}", "next-id", (json_int_t)js->next_num, "jobs", a);
    pthread_mutex_unlock(&js->lock);
    char *text = doc ? json_dumps(doc, JSON_INDENT(1) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(doc);
    char *tmp = NULL;
    struct vfs_file *f = NULL;
    int ret = -ENOMEM;
    if (text && asprintf(&tmp, "%s.tmp", js->state_uri) >= 0) {
        vfs_remove(tmp);
        ret = vfs_open(tmp, VFS_O_RDWR | VFS_O_CREATE, &f);
        if (ret == 0)
            ret = vfs_pwrite(f, text, strlen(text), 0);
        if (ret == 0)
            ret = vfs_flush(f);
        if (f)
            vfs_close(f);
        if (ret == 0)
            ret = vfs_rename(tmp, js->state_uri);
    }
    if (ret < 0)
        fprintf(stderr, "qcowd: saving the job records to %s: %s\n", js->state_uri, err_msg(ret));
    free(tmp);
    free(text);
    pthread_mutex_unlock(&js->save_lock);
}

static char *dup_str(json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));
    return s ? strdup(s) : NULL;
}

/* Read the records of a previous run; a missing file is an empty list. */
static int load(struct jobs *js)
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
    if (ret == 0 && size > (64u << 20))
        ret = err_fail(EFBIG, "job records %s: larger than 64 MiB", js->state_uri);
    if (ret == 0 && !(text = malloc((size_t)size + 1)))
        ret = err_fail(ENOMEM, "out of memory");
    if (ret == 0)
        ret = vfs_pread(f, text, (size_t)size, 0);
    vfs_close(f);
    if (ret < 0) {
        free(text);
        return ret;
    }
    json_error_t je;
    json_t *doc = json_loadb(text, (size_t)size, 0, &je);
    free(text);
    json_t *a = json_object_get(doc, "jobs");
    if (!json_is_array(a)) {
        /* unreadable records must not keep the daemon down: start afresh */
        fprintf(stderr, "qcowd: job records %s are not valid (%s); starting with none\n", js->state_uri,
                doc ? "no jobs array" : je.text);
        json_decref(doc);
        return 0;
    }
    js->next_num = (uint64_t)json_integer_value(json_object_get(doc, "next-id"));
    size_t i;
    json_t *o;
    json_array_foreach(a, i, o)
    {
        struct job *j = calloc(1, sizeof *j);
        if (!j)
            break;
        j->js = js;
        j->type = dup_str(o, "type");
        j->image = dup_str(o, "image");
        const char *id = json_string_value(json_object_get(o, "id"));
        if (!j->type || !j->image || !id || strlen(id) >= sizeof j->id) {
            job_free(j);
            continue;
        }
        snprintf(j->id, sizeof j->id, "%s", id);
        j->num = strtoull(id, NULL, 10);
        if (j->num >= js->next_num)
            js->next_num = j->num + 1;
        j->cur = (uint64_t)json_integer_value(json_object_get(o, "current-progress"));
        j->total = (uint64_t)json_integer_value(json_object_get(o, "total-progress"));
        j->error = dup_str(o, "error");
        j->cancelled = json_is_true(json_object_get(o, "cancelled"));
        json_t *res = json_object_get(o, "result");
        j->result = json_is_null(res) || !res ? NULL : json_incref(res);
        json_t *prm = json_object_get(o, "params");
        j->params = prm ? json_incref(prm) : json_object();
        j->created_ms = time_parse(json_object_get(o, "created"));
        j->started_ms = time_parse(json_object_get(o, "started"));
        j->finished_ms = time_parse(json_object_get(o, "finished"));
        const char *st = json_string_value(json_object_get(o, "status"));
        if (!st || strcmp(st, "concluded")) {
            /* "created" too: the record of a start is saved a moment after it */
            j->cut_off = true;
            char msg[200];
            snprintf(msg, sizeof msg, "cut off by a restart of qcowd (the job was %s)", st ? st : "unknown");
            free(j->error);
            j->error = strdup(msg);
            j->finished_ms = now_ms();
        }
        j->status = JOB_CONCLUDED;
        j->started = true;
        if (js->tail)
            js->tail->next = j;
        else
            js->head = j;
        js->tail = j;
    }
    json_decref(doc);
    return 0;
}

/* ---- the workers ---- */

/* Whether a started, unconcluded job other than j holds one of j's locks. */
static bool locked(struct jobs *js, const struct job *j)
{
    for (struct job *o = js->head; o; o = o->next) {
        if (o == j || !o->started || o->status == JOB_CONCLUDED)
            continue;
        for (char **a = j->locks; *a; a++)
            for (char **b = o->locks; b && *b; b++)
                if (!strcmp(*a, *b))
                    return true;
    }
    return false;
}

/* A job to run now: a queued one whose locks are free, or a parked one whose
 * time has come (it holds its locks already); else NULL, with *wake_ms the
 * earliest time a parked one can go (0: none). */
static struct job *next_runnable(struct jobs *js, int64_t *wake_ms)
{
    int64_t now = now_ms();
    *wake_ms = 0;
    for (struct job *j = js->head; j; j = j->next) {
        if (j->parked && (j->status == JOB_RUNNING || j->status == JOB_ABORTING)) {
            if (j->retry_ms <= now || js->stopping)
                return j;
            if (!*wake_ms || j->retry_ms < *wake_ms)
                *wake_ms = j->retry_ms;
        } else if (j->status == JOB_CREATED && !j->started && !locked(js, j)) {
            return j;
        }
    }
    return NULL;
}

static void wait_until(struct jobs *js, int64_t ms)
{
    struct timespec ts = {.tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000L};
    pthread_cond_timedwait(&js->cond, &js->lock, &ts);
}

static void *worker(void *arg)
{
    struct jobs *js = arg;
    pthread_mutex_lock(&js->lock);
    for (;;) {
        struct job *j = NULL;
        int64_t wake_ms = 0;
        while (!js->stopping && !(j = next_runnable(js, &wake_ms))) {
            if (wake_ms)
                wait_until(js, wake_ms);
            else
                pthread_cond_wait(&js->cond, &js->lock);
        }
        if (js->stopping)
            break;
        bool again = j->parked; /* announced as running already */
        j->parked = false;
        j->started = true;
        if (!again) {
            j->status = JOB_RUNNING;
            j->started_ms = now_ms();
        }
        pthread_mutex_unlock(&js->lock);
        if (!again) {
            emit_job(js, "job-status", j);
            save(js);
        }

        json_t *result = NULL;
        err_clear();
        int ret = j->run(j, j->arg, &result);
        if (j->retry_req) {
            /* an image it needs is being written by a client: off the worker
             * until later, so a slow client holds no worker */
            j->retry_req = false;
            json_decref(result);
            pthread_mutex_lock(&js->lock);
            if (ret == -EAGAIN && !js->stopping && !j->cancel_req) {
                j->parked = true;
                j->retry_ms = now_ms() + JOBS_RETRY_MS;
                continue;
            }
            pthread_mutex_unlock(&js->lock);
            result = NULL;
            if (ret == -EAGAIN)
                ret = -ECANCELED;
        }
        char *error = ret < 0 ? strdup(ret == -ECANCELED ? "cancelled" : err_msg(ret)) : NULL;

        pthread_mutex_lock(&js->lock);
        j->status = JOB_CONCLUDED;
        j->finished_ms = now_ms();
        if (ret == -ECANCELED)
            j->cancelled = true;
        if (ret < 0) {
            j->error = error;
            json_decref(result);
        } else {
            j->result = result;
        }
        /* the job's argument (images, buffers) goes now; the record stays */
        if (j->free_arg)
            j->free_arg(j->arg);
        j->free_arg = NULL;
        j->arg = NULL;
        j->progress_ms = 0;
        json_t *p = to_json(j);
        pthread_cond_broadcast(&js->cond); /* its locks are free */
        pthread_mutex_unlock(&js->lock);
        emit(js, "job-progress", p);
        emit(js, "job-status", p);
        json_decref(p);
        save(js);
        pthread_mutex_lock(&js->lock);
    }
    pthread_mutex_unlock(&js->lock);
    return NULL;
}

int jobs_new(const struct jobs_config *cfg, struct jobs **out)
{
    struct jobs *js = calloc(1, sizeof *js);
    if (!js)
        return err_fail(ENOMEM, "out of memory");
    js->cfg = *cfg;
    js->next_num = 1;
    if (!js->cfg.max_queued)
        js->cfg.max_queued = JOBS_DEFAULT_QUEUED;
    if (!js->cfg.workers)
        js->cfg.workers = 1;
    pthread_mutex_init(&js->lock, NULL);
    pthread_mutex_init(&js->save_lock, NULL);
    pthread_cond_init(&js->cond, NULL);
    int ret = 0;
    if (cfg->state_uri) {
        js->state_uri = strdup(cfg->state_uri);
        if (!js->state_uri)
            ret = err_fail(ENOMEM, "out of memory");
        if (ret == 0)
            ret = load(js);
    }
    if (ret == 0 && !(js->threads = calloc(js->cfg.workers, sizeof *js->threads)))
        ret = err_fail(ENOMEM, "out of memory");
    if (ret < 0) {
        jobs_free(js);
        return ret;
    }
    save(js);
    for (unsigned i = 0; i < js->cfg.workers; i++) {
        int e = pthread_create(&js->threads[i], NULL, worker, js);
        if (e) {
            ret = err_fail(e, "starting job worker %u: %s", i, strerror(e));
            jobs_free(js);
            return ret;
        }
        js->nthreads++;
    }
    *out = js;
    return 0;
}

void jobs_free(struct jobs *js)
{
    if (!js)
        return;
    pthread_mutex_lock(&js->lock);
    js->stopping = true;
    for (struct job *j = js->head; j; j = j->next)
        if (j->status != JOB_CONCLUDED && j->started)
            j->cancel_req = true;
    pthread_cond_broadcast(&js->cond);
    pthread_mutex_unlock(&js->lock);
    for (unsigned i = 0; i < js->nthreads; i++)
        pthread_join(js->threads[i], NULL);
    /* queued jobs never ran; the load of the next start concludes them */
    save(js);
    struct job *j = js->head;
    while (j) {
        struct job *next = j->next;
        job_free(j);
        j = next;
    }
    free(js->threads);
    free(js->state_uri);
    pthread_cond_destroy(&js->cond);
    pthread_mutex_destroy(&js->save_lock);
    pthread_mutex_destroy(&js->lock);
    free(js);
}

int jobs_submit(struct jobs *js, const char *type, const char *image, const char *const *locks, json_t *params,
                job_run_fn run, void *arg, void (*free_arg)(void *), json_t **job_json)
{
    struct job *j = calloc(1, sizeof *j);
    size_t n = 0;
    while (locks && locks[n])
        n++;
    if (!j || !(j->type = strdup(type)) || !(j->image = strdup(image)) || !(j->locks = calloc(n + 2, sizeof *j->locks)))
        goto nomem;
    j->js = js;
    j->params = params ? params : json_object();
    params = NULL;
    j->run = run;
    j->arg = arg;
    j->free_arg = free_arg;
    arg = NULL;
    if (!(j->locks[0] = strdup(image)))
        goto nomem;
    for (size_t i = 0; i < n; i++)
        if (!(j->locks[i + 1] = strdup(locks[i])))
            goto nomem;
    j->created_ms = now_ms();
    pthread_mutex_lock(&js->lock);
    if (js->stopping) {
        pthread_mutex_unlock(&js->lock);
        job_free(j);
        return err_fail(EAGAIN, "qcowd is stopping: no new jobs");
    }
    unsigned queued = 0;
    for (struct job *o = js->head; o; o = o->next)
        queued += o->status != JOB_CONCLUDED && !o->started;
    if (queued >= js->cfg.max_queued) {
        pthread_mutex_unlock(&js->lock);
        job_free(j);
        return err_fail(EAGAIN, "%u jobs are waiting to run: --max-queued-jobs is %u", queued, js->cfg.max_queued);
    }
    j->num = js->next_num++;
    snprintf(j->id, sizeof j->id, "%" PRIu64, j->num);
    snprintf(j->owner, sizeof j->owner, "job %s (%s)", j->id, j->type);
    if (js->tail)
        js->tail->next = j;
    else
        js->head = j;
    js->tail = j;
    json_t *o = to_json(j);
    pthread_cond_broadcast(&js->cond);
    pthread_mutex_unlock(&js->lock);
    emit(js, "job-created", o);
    save(js);
    *job_json = o;
    return 0;
nomem:
    json_decref(params);
    if (arg && free_arg)
        free_arg(arg);
    job_free(j);
    return err_fail(ENOMEM, "out of memory");
}

json_t *jobs_list(struct jobs *js)
{
    json_t *a = json_array();
    pthread_mutex_lock(&js->lock);
    for (struct job *j = js->head; a && j; j = j->next)
        json_array_append_new(a, to_json(j));
    pthread_mutex_unlock(&js->lock);
    return a;
}

static struct job *find(struct jobs *js, const char *id)
{
    for (struct job *j = js->head; j; j = j->next)
        if (!strcmp(j->id, id))
            return j;
    return NULL;
}

json_t *jobs_get(struct jobs *js, const char *id, int *err)
{
    pthread_mutex_lock(&js->lock);
    struct job *j = find(js, id);
    json_t *o = j ? to_json(j) : NULL;
    pthread_mutex_unlock(&js->lock);
    if (!j)
        *err = err_fail(ENOENT, "no job with id '%.40s'", id);
    return o;
}

enum verb { CANCEL, PAUSE, RESUME, DISMISS };

static int change(struct jobs *js, const char *id, enum verb v, json_t **job_json)
{
    static const char *const verbs[] = {"cancelled", "paused", "resumed", "dismissed"};
    pthread_mutex_lock(&js->lock);
    struct job *j = find(js, id);
    if (!j) {
        pthread_mutex_unlock(&js->lock);
        return err_fail(ENOENT, "no job with id '%.40s'", id);
    }
    enum job_status s = j->status;
    bool ok = false, concluded_now = false;
    switch (v) {
    case CANCEL:
        if (s == JOB_CREATED || (s == JOB_PAUSED && !j->started)) {
            j->status = JOB_CONCLUDED;
            j->cancelled = true;
            j->started = true; /* never picked up */
            j->error = strdup("cancelled before it started");
            j->finished_ms = now_ms();
            concluded_now = ok = true;
        } else if (s == JOB_RUNNING || s == JOB_PAUSED) {
            j->status = JOB_ABORTING;
            j->cancel_req = true;
            ok = true;
        }
        break;
    case PAUSE:
        if (s == JOB_CREATED || s == JOB_RUNNING) {
            j->status = JOB_PAUSED;
            ok = true;
        }
        break;
    case RESUME:
        if (s == JOB_PAUSED) {
            j->status = j->started ? JOB_RUNNING : JOB_CREATED;
            ok = true;
        }
        break;
    case DISMISS:
        ok = s == JOB_CONCLUDED;
        break;
    }
    if (!ok) {
        pthread_mutex_unlock(&js->lock);
        return err_fail(EBUSY, "job %s is %s: it cannot be %s", id, status_names[s], verbs[v]);
    }
    json_t *o = to_json(j);
    if (v == DISMISS) {
        struct job **p = &js->head, *prev = NULL;
        while (*p != j) {
            prev = *p;
            p = &(*p)->next;
        }
        *p = j->next;
        if (js->tail == j)
            js->tail = prev;
        job_free(j);
    }
    pthread_cond_broadcast(&js->cond);
    pthread_mutex_unlock(&js->lock);
    (void)concluded_now;
    emit(js, v == DISMISS ? "job-dismissed" : "job-status", o);
    save(js);
    *job_json = o;
    return 0;
}

int jobs_cancel(struct jobs *js, const char *id, json_t **job_json)
{
    return change(js, id, CANCEL, job_json);
}

int jobs_pause(struct jobs *js, const char *id, json_t **job_json)
{
    return change(js, id, PAUSE, job_json);
}

int jobs_resume(struct jobs *js, const char *id, json_t **job_json)
{
    return change(js, id, RESUME, job_json);
}

int jobs_dismiss(struct jobs *js, const char *id, json_t **job_json)
{
    return change(js, id, DISMISS, job_json);
}

/* ---- for run functions ---- */

int job_progress(void *job, uint64_t done, uint64_t total)
{
    struct job *j = job;
    struct jobs *js = j->js;
    pthread_mutex_lock(&js->lock);
    j->cur = done;
    j->total = total;
    json_t *o = NULL;
    int64_t t = now_ms();
    if (js->cfg.event && t - j->progress_ms >= 1000 / JOBS_PROGRESS_HZ) {
        j->progress_ms = t;
        o = to_json(j);
    }
    while (j->status == JOB_PAUSED && !j->cancel_req && !js->stopping)
        pthread_cond_wait(&js->cond, &js->lock);
    int ret = j->cancel_req || js->stopping ? -ECANCELED : 0;
    pthread_mutex_unlock(&js->lock);
    if (o) {
        emit(js, "job-progress", o);
        json_decref(o);
    }
    return ret;
}

int job_retry_later(struct job *j)
{
    j->retry_req = true;
    return err_fail(EAGAIN, "job %s waits for an image in use", j->id);
}

bool job_cancelled(struct job *j)
{
    pthread_mutex_lock(&j->js->lock);
    bool c = j->cancel_req || j->js->stopping;
    pthread_mutex_unlock(&j->js->lock);
    return c;
}

const char *job_id(const struct job *j)
{
    return j->id;
}

const char *job_owner(const struct job *j)
{
    return j->owner;
}

void jobs_foreach_cut_off(struct jobs *js,
                          void (*cb)(void *ctx, const char *id, const char *type, const char *image, json_t *params),
                          void *ctx)
{
    /* copied under the lock, called without it: cb may submit jobs */
    size_t n = 0, i = 0;
    pthread_mutex_lock(&js->lock);
    for (struct job *j = js->head; j; j = j->next)
        n += j->cut_off;
    struct job *copy = calloc(n ? n : 1, sizeof *copy);
    for (struct job *j = js->head; copy && j; j = j->next)
        if (j->cut_off) {
            memcpy(copy[i].id, j->id, sizeof j->id);
            copy[i].type = strdup(j->type);
            copy[i].image = strdup(j->image);
            copy[i].params = json_deep_copy(j->params);
            j->cut_off = false; /* once */
            i++;
        }
    pthread_mutex_unlock(&js->lock);
    for (i = 0; copy && i < n; i++) {
        if (copy[i].type && copy[i].image && copy[i].params)
            cb(ctx, copy[i].id, copy[i].type, copy[i].image, copy[i].params);
        free(copy[i].type);
        free(copy[i].image);
        json_decref(copy[i].params);
    }
    free(copy);
}
