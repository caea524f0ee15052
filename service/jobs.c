/* jobs.c: the job engine: a queue served by a pool of run slots, per-image locks
 * so conflicting jobs run one after the other, and the state machine (every
 * change and its event under one lock, so events come in the order of the
 * changes); the records file is jobs_records.c's. */
#include "jobs.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "err.h"
#include "jobs_int.h"

static const char *const status_names[] = {"created", "running", "paused", "aborting", "concluded"};

const char *job_status_name(enum job_status s)
{
    return status_names[s];
}

int job_status_parse(const char *name)
{
    for (int i = 0; i < JOB_STATUS_COUNT; i++)
        if (!strcmp(name, status_names[i]))
            return i;
    return -1;
}

int64_t jobs__now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- views ---- */

/* With js->lock held: the job as a view (borrowing its strings). */
static void view(const struct job *j, struct job_info *ji)
{
    *ji = (struct job_info){.type = j->type,
                            .image = j->image,
                            .status = j->status,
                            .pausing = j->pause_req,
                            .cancelled = j->cancelled,
                            .current = j->cur,
                            .total = j->total,
                            .error = j->error,
                            .result = j->result_text,
                            .params = j->params_text ? j->params_text : "{}",
                            .created_ms = j->created_ms,
                            .started_ms = j->started_ms,
                            .finished_ms = j->finished_ms};
    memcpy(ji->id, j->id, sizeof ji->id);
}

static size_t opt_len(const char *s)
{
    return s ? strlen(s) + 1 : 0;
}

size_t job_info_size(const struct job_info *ji)
{
    return sizeof *ji + opt_len(ji->type) + opt_len(ji->image) + opt_len(ji->error) + opt_len(ji->result) +
           opt_len(ji->params);
}

/* Copy s (or NULL) to *at, advancing it; returns the copy. */
static const char *put_str(char **at, const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = memcpy(*at, s, n);
    *at += n;
    return d;
}

int job_info_copy(struct job_info *dst, const struct job_info *src)
{
    struct job_info c = *src;
    char *mem = malloc(job_info_size(src) - sizeof *src + 1), *at = mem;
    if (!mem) {
        *dst = (struct job_info){0};
        return err_fail(ENOMEM, "out of memory");
    }
    c.type = put_str(&at, src->type);
    c.image = put_str(&at, src->image);
    c.error = put_str(&at, src->error);
    c.result = put_str(&at, src->result);
    c.params = put_str(&at, src->params);
    c.mem = mem;
    *dst = c;
    return 0;
}

void job_info_release(struct job_info *ji)
{
    if (ji && ji->mem) {
        free(ji->mem);
        *ji = (struct job_info){0};
    }
}

void jobs_info_free(struct job_info *a, size_t n)
{
    for (size_t i = 0; a && i < n; i++)
        job_info_release(&a[i]);
    free(a);
}

/* With js->lock held: a copy of j. */
static int copy_out(const struct job *j, struct job_info *out)
{
    struct job_info v;
    view(j, &v);
    return job_info_copy(out, &v);
}

void jobs__job_free(struct job *j)
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
    free(j->params_text);
    free(j->result_text);
    json_decref(j->params);
    json_decref(j->result);
    free(j);
}

char *jobs__dump(json_t *v)
{
    return json_dumps(v, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY);
}

/* With js->lock held: publish event with j as it is now. Under the lock, so the
 * events of every job are in the order of its changes. */
static void emit(struct jobs *js, const char *event, const struct job *j)
{
    if (!js->cfg.event)
        return;
    struct job_info v;
    view(j, &v);
    js->cfg.event(js->cfg.event_opaque, event, &v);
}

/* With js->lock held: unlink j, announce it dismissed and free it. */
static void remove_job(struct jobs *js, struct job *j)
{
    struct job **p = &js->head, *prev = NULL;
    while (*p != j) {
        prev = *p;
        p = &(*p)->next;
    }
    *p = j->next;
    if (js->tail == j)
        js->tail = prev;
    emit(js, "job-dismissed", j);
    jobs__job_free(j);
}

/* With js->lock held: drop the oldest concluded records over cfg.max_records
 * (not keep, nor those waiting for jobs_foreach_cut_off). Returns whether one
 * went. */
static bool prune(struct jobs *js, const struct job *keep)
{
    unsigned n = 0;
    for (struct job *j = js->head; j; j = j->next)
        n += j->status == JOB_CONCLUDED;
    bool any = false;
    for (struct job *j = js->head, *next; j && n > js->cfg.max_records; j = next) {
        next = j->next;
        if (j->status == JOB_CONCLUDED && !j->cut_off && j != keep) {
            remove_job(js, j);
            n--;
            any = true;
        }
    }
    return any;
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
    int64_t now = jobs__now_ms();
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

/* With js->lock held: dismiss the concluded jobs cfg.retention_ms after they
 * concluded (not those waiting for jobs_foreach_cut_off). Returns whether one
 * went (then save); *next_ms is when the next one is due (0: none). Idle
 * workers call it when one is due, and every look at the jobs calls it first,
 * so nobody sees an expired job even while every worker is busy. */
static bool sweep(struct jobs *js, int64_t *next_ms)
{
    int64_t now = jobs__now_ms();
    bool any = false;
    *next_ms = 0;
    if (js->cfg.retention_ms < 0)
        return false;
    for (struct job *j = js->head, *next; j; j = next) {
        next = j->next;
        if (j->status != JOB_CONCLUDED || j->cut_off)
            continue;
        int64_t due = j->finished_ms + js->cfg.retention_ms;
        if (due <= now) {
            remove_job(js, j);
            any = true;
        } else if (!*next_ms || due < *next_ms) {
            *next_ms = due;
        }
    }
    return any;
}

/* With js->lock held: conclude j (its run returned ret, with result). */
static void conclude(struct jobs *js, struct job *j, int ret, json_t *result, char *error, char *result_text)
{
    j->status = JOB_CONCLUDED;
    j->finished_ms = jobs__now_ms();
    if (ret == -ECANCELED)
        j->cancelled = true;
    if (ret < 0) {
        j->error = error;
        json_decref(result);
        free(result_text);
    } else {
        free(error);
        j->result = result;
        j->result_text = result_text;
    }
    /* the job's argument (images, buffers) goes now; the record stays */
    if (j->free_arg)
        j->free_arg(j->arg);
    j->free_arg = NULL;
    j->arg = NULL;
    if (j->started_ms) /* the last progress of a job that ran */
        emit(js, "job-progress", j);
    emit(js, "job-status", j);
    prune(js, j);
    pthread_cond_broadcast(&js->cond); /* its locks and its slot are free */
}

static void *worker(void *arg)
{
    struct jobs *js = arg;
    pthread_mutex_lock(&js->lock);
    for (;;) {
        struct job *j = NULL;
        while (!js->stopping) {
            int64_t wake_ms = 0, due_ms = 0;
            if (sweep(js, &due_ms)) {
                pthread_mutex_unlock(&js->lock);
                jobs__save(js);
                pthread_mutex_lock(&js->lock);
                continue;
            }
            if (js->active + js->resumed < js->cfg.workers && (j = next_runnable(js, &wake_ms)))
                break;
            if (due_ms && (!wake_ms || due_ms < wake_ms))
                wake_ms = due_ms;
            js->idle++;
            if (wake_ms)
                wait_until(js, wake_ms);
            else
                pthread_cond_wait(&js->cond, &js->lock);
            js->idle--;
        }
        if (js->stopping)
            break;
        js->active++;
        bool again = j->parked; /* announced as running already */
        j->parked = false;
        j->started = true;
        if (!again) {
            j->status = JOB_RUNNING;
            j->started_ms = jobs__now_ms();
            emit(js, "job-status", j);
        }
        pthread_mutex_unlock(&js->lock);
        if (!again)
            jobs__save(js);

        json_t *result = NULL;
        err_clear();
        int ret = j->run(j, j->arg, &result);
        if (j->retry_req) {
            /* an image it needs is being written by a client: off the worker
             * until later, so a slow client holds no worker */
            j->retry_req = false;
            json_decref(result);
            result = NULL;
            pthread_mutex_lock(&js->lock);
            if (ret == -EAGAIN && !js->stopping && !j->cancel_req) {
                j->parked = true;
                if (j->pause_req) { /* off its thread: paused now */
                    j->pause_req = false;
                    j->status = JOB_PAUSED;
                    emit(js, "job-status", j);
                }
                j->retry_ms = jobs__now_ms() + JOBS_RETRY_MS;
                js->active--;
                pthread_cond_broadcast(&js->cond);
                continue;
            }
            pthread_mutex_unlock(&js->lock);
            if (ret == -EAGAIN)
                ret = -ECANCELED;
        }
        char *error = ret < 0 ? strdup(ret == -ECANCELED ? "cancelled" : err_msg(ret)) : NULL;
        char *text = ret == 0 && result ? jobs__dump(result) : NULL;
        pthread_mutex_lock(&js->lock);
        js->active--;
        j->pause_req = false;
        conclude(js, j, ret, result, error, text);
        pthread_mutex_unlock(&js->lock);
        jobs__save(js);
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
    if (!js->cfg.max_paused)
        js->cfg.max_paused = JOBS_DEFAULT_PAUSED;
    if (!js->cfg.max_records)
        js->cfg.max_records = JOBS_DEFAULT_RECORDS;
    if (!js->cfg.retention_ms)
        js->cfg.retention_ms = JOBS_DEFAULT_RETENTION_MS;
    pthread_mutex_init(&js->lock, NULL);
    pthread_mutex_init(&js->save_lock, NULL);
    pthread_cond_init(&js->cond, NULL);
    int ret = 0;
    if (cfg->state_uri) {
        js->state_uri = strdup(cfg->state_uri);
        if (!js->state_uri)
            ret = err_fail(ENOMEM, "out of memory");
        if (ret == 0)
            ret = jobs__load(js);
    }
    if (ret == 0 && !(js->threads = calloc(js->cfg.workers + js->cfg.max_paused, sizeof *js->threads)))
        ret = err_fail(ENOMEM, "out of memory");
    if (ret < 0) {
        jobs_free(js);
        return ret;
    }
    pthread_mutex_lock(&js->lock);
    prune(js, NULL); /* nobody listens yet */
    pthread_mutex_unlock(&js->lock);
    jobs__save(js);
    pthread_mutex_lock(&js->lock); /* nthreads is read under it */
    for (unsigned i = 0; i < js->cfg.workers && ret == 0; i++) {
        int e = pthread_create(&js->threads[i], NULL, worker, js);
        if (e)
            ret = err_fail(e, "starting job worker %u: %s", i, strerror(e));
        else
            js->nthreads++;
    }
    pthread_mutex_unlock(&js->lock);
    if (ret < 0) {
        jobs_free(js);
        return ret;
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
    unsigned n = js->nthreads; /* no more start once stopping */
    pthread_mutex_unlock(&js->lock);
    for (unsigned i = 0; i < n; i++)
        pthread_join(js->threads[i], NULL);
    /* queued jobs never ran; the load of the next start concludes them */
    jobs__save(js);
    struct job *j = js->head;
    while (j) {
        struct job *next = j->next;
        jobs__job_free(j);
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
    if (!j->params || !(j->params_text = jobs__dump(j->params)) || !(j->locks[0] = strdup(image)))
        goto nomem;
    for (size_t i = 0; i < n; i++)
        if (!(j->locks[i + 1] = strdup(locks[i])))
            goto nomem;
    j->created_ms = jobs__now_ms();
    pthread_mutex_lock(&js->lock);
    if (js->stopping) {
        pthread_mutex_unlock(&js->lock);
        jobs__job_free(j);
        return err_fail(EAGAIN, "qcowd is stopping: no new jobs");
    }
    unsigned queued = 0;
    for (struct job *o = js->head; o; o = o->next)
        queued += o->status != JOB_CONCLUDED && !o->started;
    if (queued >= js->cfg.max_queued) {
        pthread_mutex_unlock(&js->lock);
        jobs__job_free(j);
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
    emit(js, "job-created", j); /* before any worker can see it */
    json_t *o = json_pack("{s:s}", "id", j->id);
    pthread_cond_broadcast(&js->cond);
    pthread_mutex_unlock(&js->lock);
    jobs__save(js);
    if (!o)
        return err_fail(ENOMEM, "out of memory"); /* queued all the same */
    *job_json = o;
    return 0;
nomem:
    json_decref(params);
    if (arg && free_arg)
        free_arg(arg);
    jobs__job_free(j);
    return err_fail(ENOMEM, "out of memory");
}

/* With js->lock held: sweep before a look at the jobs; *saving: save after. */
static void sweep_now(struct jobs *js, bool *saving)
{
    int64_t next;
    *saving = sweep(js, &next) || *saving;
}

int jobs_list(struct jobs *js, const char *image, int status, struct job_info **out, size_t *n)
{
    bool saving = false;
    pthread_mutex_lock(&js->lock);
    sweep_now(js, &saving);
    size_t k = 0;
    for (struct job *j = js->head; j; j = j->next)
        k++;
    struct job_info *a = calloc(k ? k : 1, sizeof *a);
    size_t i = 0;
    int ret = a ? 0 : err_fail(ENOMEM, "out of memory");
    for (struct job *j = js->head; ret == 0 && j; j = j->next)
        if ((!image || !strcmp(j->image, image)) && (status < 0 || (int)j->status == status))
            if ((ret = copy_out(j, &a[i])) == 0)
                i++;
    pthread_mutex_unlock(&js->lock);
    if (saving)
        jobs__save(js);
    if (ret < 0) {
        jobs_info_free(a, i);
        return ret;
    }
    *out = a;
    *n = i;
    return 0;
}

static struct job *find(struct jobs *js, const char *id)
{
    for (struct job *j = js->head; j; j = j->next)
        if (!strcmp(j->id, id))
            return j;
    return NULL;
}

static int not_found(const char *id)
{
    return err_fail(ENOENT, "no job with id '%.40s'", id);
}

int jobs_info(struct jobs *js, const char *id, struct job_info *out)
{
    bool saving = false;
    pthread_mutex_lock(&js->lock);
    sweep_now(js, &saving);
    struct job *j = find(js, id);
    int ret = j ? copy_out(j, out) : not_found(id);
    pthread_mutex_unlock(&js->lock);
    if (saving)
        jobs__save(js);
    return ret;
}

enum verb { CANCEL, PAUSE, RESUME, DISMISS };

/* With js->lock held: running jobs paused or pausing, each keeping a thread. */
static unsigned paused_on_threads(struct jobs *js)
{
    unsigned n = 0;
    for (struct job *j = js->head; j; j = j->next)
        n += j->held || j->pause_req;
    return n;
}

/* With js->lock held: apply v to j. Returns 0 with *changed (a status changed:
 * announce it) or -EBUSY with err_msg(). */
static int apply(struct jobs *js, struct job *j, enum verb v, bool *changed)
{
    static const char *const verbs[] = {"cancelled", "paused", "resumed", "dismissed"};
    enum job_status s = j->status;
    *changed = true;
    switch (v) {
    case CANCEL:
        if (s == JOB_CREATED || (s == JOB_PAUSED && !j->started)) {
            j->started = true; /* never picked up */
            conclude(js, j, -ECANCELED, NULL, strdup("cancelled before it started"), NULL);
            *changed = false; /* conclude announced it */
            return 0;
        }
        if (s == JOB_RUNNING || s == JOB_PAUSED) {
            j->status = JOB_ABORTING;
            j->cancel_req = true;
            j->pause_req = false;
            return 0;
        }
        break;
    case PAUSE:
        if (s == JOB_CREATED || (s == JOB_RUNNING && j->parked)) {
            j->status = JOB_PAUSED; /* on no thread: paused at once */
            return 0;
        }
        if (s == JOB_RUNNING) {
            /* announced as pausing now, as paused at its next progress call */
            *changed = !j->pause_req;
            if (j->pause_req)
                return 0;
            unsigned n = paused_on_threads(js);
            if (n >= js->cfg.max_paused)
                return err_fail(EBUSY, "%u running jobs are paused, each keeping a thread: --max-paused-jobs is %u", n,
                                js->cfg.max_paused);
            j->pause_req = true;
            return 0;
        }
        break;
    case RESUME:
        if (s == JOB_PAUSED) {
            j->status = j->started ? JOB_RUNNING : JOB_CREATED;
            return 0;
        }
        if (s == JOB_RUNNING && j->pause_req) { /* not stopped yet: it goes on */
            j->pause_req = false;
            return 0;
        }
        break;
    case DISMISS:
        *changed = false; /* announced as dismissed */
        if (s == JOB_CONCLUDED)
            return 0;
        break;
    }
    return err_fail(EBUSY, "job %s is %s: it cannot be %s", j->id, status_names[s], verbs[v]);
}

static int change(struct jobs *js, const char *id, enum verb v, unsigned wait_ms, struct job_info *out)
{
    bool saving = false;
    pthread_mutex_lock(&js->lock);
    sweep_now(js, &saving);
    struct job *j = find(js, id);
    bool changed = false;
    int ret = j ? apply(js, j, v, &changed) : not_found(id);
    if (ret == 0 && changed)
        emit(js, "job-status", j);
    if (ret == 0 && v == DISMISS) {
        ret = copy_out(j, out);
        remove_job(js, j);
    } else if (ret == 0) {
        pthread_cond_broadcast(&js->cond);
        /* a pause: until the job stopped, at most wait_ms; the job may also go
         * meanwhile (concluded and dismissed), so it is looked up again */
        int64_t until = jobs__now_ms() + wait_ms;
        while (v == PAUSE && j && j->pause_req && jobs__now_ms() < until) {
            wait_until(js, until);
            j = find(js, id);
        }
        ret = j ? copy_out(j, out) : not_found(id);
    }
    pthread_mutex_unlock(&js->lock);
    if (saving || (ret == 0 && (changed || v == DISMISS)))
        jobs__save(js);
    return ret;
}

int jobs_cancel(struct jobs *js, const char *id, struct job_info *out)
{
    return change(js, id, CANCEL, 0, out);
}

int jobs_pause(struct jobs *js, const char *id, unsigned wait_ms, struct job_info *out)
{
    return change(js, id, PAUSE, wait_ms, out);
}

int jobs_resume(struct jobs *js, const char *id, struct job_info *out)
{
    return change(js, id, RESUME, 0, out);
}

int jobs_dismiss(struct jobs *js, const char *id, struct job_info *out)
{
    return change(js, id, DISMISS, 0, out);
}

/* ---- for run functions ---- */

/* With js->lock held, on j's thread: j was asked to pause: stop here, give the
 * run slot up and wait for a resume (then for a free slot), a cancel or a stop. */
static void hold(struct jobs *js, struct job *j)
{
    j->pause_req = false;
    j->status = JOB_PAUSED;
    j->held = true;
    js->active--;
    if (!js->idle && js->nthreads < js->cfg.workers + js->cfg.max_paused && !js->stopping) {
        /* no thread to take the slot: one more (paused ones are bounded) */
        int e = pthread_create(&js->threads[js->nthreads], NULL, worker, js);
        if (e)
            fprintf(stderr, "qcowd: starting a job worker for a paused job's slot: %s\n", strerror(e));
        else
            js->nthreads++;
    }
    emit(js, "job-status", j);
    pthread_cond_broadcast(&js->cond); /* the pauser waits for this; a queued job may take the slot */
    pthread_mutex_unlock(&js->lock);
    jobs__save(js);
    pthread_mutex_lock(&js->lock);
    while (j->status == JOB_PAUSED && !j->cancel_req && !js->stopping)
        pthread_cond_wait(&js->cond, &js->lock);
    /* resumed: wait for a slot (before queued jobs); cancelled or stopping:
     * just end (the slots are over by one for that while) */
    js->resumed++;
    while (js->active >= js->cfg.workers && !j->cancel_req && !js->stopping)
        pthread_cond_wait(&js->cond, &js->lock);
    js->resumed--;
    js->active++;
    j->held = false;
}

int job_progress(void *job, uint64_t done, uint64_t total)
{
    struct job *j = job;
    struct jobs *js = j->js;
    pthread_mutex_lock(&js->lock);
    j->cur = done;
    j->total = total;
    int64_t t = jobs__now_ms();
    if (js->cfg.event && t - j->progress_ms >= 1000 / JOBS_PROGRESS_HZ) {
        j->progress_ms = t;
        emit(js, "job-progress", j);
    }
    if (j->pause_req && !j->cancel_req && !js->stopping)
        hold(js, j);
    int ret = j->cancel_req || js->stopping ? -ECANCELED : 0;
    pthread_mutex_unlock(&js->lock);
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
