/* test_jobs.c: unit tests of the job engine and the event bus: the state machine,
 * pause/resume/cancel racing the workers, paused jobs off the run slots, events in
 * order, records across a restart (versioned, bounded), replay from an id, and a
 * slow listener that loses events without slowing anyone.
 * Threaded: this suite also runs under TSan. */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "events.h"
#include "jobs.h"

/* ---- a fake job: STEPS progress calls with a short sleep between ---- */

#define IMAGES 3

static atomic_int running_on[IMAGES];
static atomic_int overlap;

struct fake {
    int image;
    int steps;
};

static int fake_run(struct job *j, void *arg, json_t **result)
{
    struct fake *f = arg;
    if (atomic_fetch_add(&running_on[f->image], 1) != 0)
        atomic_store(&overlap, 1);
    int ret = 0;
    for (int i = 0; i < f->steps && ret == 0; i++) {
        ret = job_progress(j, (uint64_t)i, (uint64_t)f->steps);
        usleep(200);
    }
    atomic_fetch_sub(&running_on[f->image], 1);
    if (ret == 0)
        *result = json_pack("{s:i}", "steps", f->steps);
    return ret;
}

static struct jobs *start(unsigned workers, const char *state)
{
    struct jobs *js;
    struct jobs_config cfg = {.workers = workers, .state_uri = state};
    ck_assert_int_eq(jobs_new(&cfg, &js), 0);
    return js;
}

static char *submit(struct jobs *js, int image, int steps)
{
    struct fake *f = malloc(sizeof *f);
    f->image = image;
    f->steps = steps;
    char name[16];
    snprintf(name, sizeof name, "img%d", image);
    json_t *o;
    ck_assert_int_eq(jobs_submit(js, "check", name, NULL, NULL, fake_run, f, free, &o), 0);
    char *id = strdup(json_string_value(json_object_get(o, "id")));
    json_decref(o);
    return id;
}

/* The job view as a small JSON object, for the checks below. */
static json_t *info_json(const struct job_info *ji)
{
    return json_pack("{s:s, s:s, s:I, s:b, s:b, s:o, s:o}", "id", ji->id, "status", job_status_name(ji->status),
                     "current-progress", (json_int_t)ji->current, "cancelled", ji->cancelled, "pausing", ji->pausing,
                     "error", ji->error ? json_string(ji->error) : json_null(), "result",
                     ji->result ? json_loads(ji->result, JSON_DECODE_ANY, NULL) : json_null());
}

static json_t *get_json(struct jobs *js, const char *id, int *err)
{
    struct job_info ji;
    *err = jobs_info(js, id, &ji);
    if (*err < 0)
        return NULL;
    json_t *o = info_json(&ji);
    job_info_release(&ji);
    return o;
}

typedef int (*verb_fn)(struct jobs *js, const char *id, struct job_info *out);

/* A state change with its answer as JSON in *o (NULL on failure). */
static int via(verb_fn fn, struct jobs *js, const char *id, json_t **o)
{
    struct job_info ji;
    int ret = fn(js, id, &ji);
    *o = ret == 0 ? info_json(&ji) : NULL;
    if (ret == 0)
        job_info_release(&ji);
    return ret;
}

static int pause_wait(struct jobs *js, const char *id, struct job_info *out)
{
    return jobs_pause(js, id, 10000, out);
}

static const char *status_of(json_t *o)
{
    return json_string_value(json_object_get(o, "status"));
}

static json_t *wait_status(struct jobs *js, const char *id, const char *want)
{
    for (int i = 0; i < 20000; i++) {
        int err;
        json_t *o = get_json(js, id, &err);
        ck_assert_ptr_nonnull(o);
        if (!strcmp(status_of(o), want))
            return o;
        json_decref(o);
        usleep(500);
    }
    ck_abort_msg("job %s never became %s", id, want);
    return NULL;
}

START_TEST(pause_stops_progress_and_resume_continues)
{
    struct jobs *js = start(2, NULL);
    char *id = submit(js, 0, 2000);
    json_decref(wait_status(js, id, "running"));
    json_t *o;
    ck_assert_int_eq(via(pause_wait, js, id, &o), 0);
    ck_assert_str_eq(status_of(o), "paused");
    /* the answer comes once the job stopped: no progress after it */
    json_int_t p0 = json_integer_value(json_object_get(o, "current-progress"));
    json_decref(o);
    ck_assert_int_eq(via(pause_wait, js, id, &o), -EBUSY);
    usleep(20000);
    int err;
    json_t *a = get_json(js, id, &err);
    usleep(50000);
    json_t *b = get_json(js, id, &err);
    json_int_t pa = json_integer_value(json_object_get(a, "current-progress"));
    json_int_t pb = json_integer_value(json_object_get(b, "current-progress"));
    ck_assert_int_eq(pa, p0);
    ck_assert_int_eq(pb, p0);
    json_decref(a);
    json_decref(b);
    ck_assert_int_eq(via(jobs_resume, js, id, &o), 0);
    ck_assert_str_eq(status_of(o), "running");
    json_decref(o);
    ck_assert_int_eq(via(jobs_resume, js, id, &o), -EBUSY);
    ck_assert_int_eq(via(jobs_dismiss, js, id, &o), -EBUSY);
    ck_assert_int_eq(via(jobs_cancel, js, id, &o), 0);
    json_decref(o);
    o = wait_status(js, id, "concluded");
    ck_assert(json_is_true(json_object_get(o, "cancelled")));
    ck_assert(json_is_string(json_object_get(o, "error")));
    json_decref(o);
    ck_assert_int_eq(via(jobs_cancel, js, id, &o), -EBUSY);
    ck_assert_int_eq(via(jobs_dismiss, js, id, &o), 0);
    json_decref(o);
    int e2 = 0;
    ck_assert_ptr_null(get_json(js, id, &e2));
    ck_assert_int_eq(e2, -ENOENT);
    free(id);
    jobs_free(js);
}
END_TEST

/* ---- a job waiting for its image, off the worker ---- */

static atomic_int image_busy; /* a client "writes" the image of waiter_run */
static atomic_int waiter_calls;

static int waiter_run(struct job *j, void *arg, json_t **result)
{
    atomic_fetch_add(&waiter_calls, 1);
    if (atomic_load(&image_busy))
        return job_retry_later(j);
    *result = json_pack("{s:b}", "waited", 1);
    return 0;
}

static char *submit_waiter(struct jobs *js, const char *image)
{
    json_t *o;
    ck_assert_int_eq(jobs_submit(js, "check", image, NULL, NULL, waiter_run, NULL, NULL, &o), 0);
    char *id = strdup(json_string_value(json_object_get(o, "id")));
    json_decref(o);
    return id;
}

START_TEST(job_waiting_for_its_image_leaves_the_worker)
{
    atomic_store(&image_busy, 1);
    atomic_store(&waiter_calls, 0);
    struct jobs *js = start(1, NULL);
    char *w = submit_waiter(js, "busy");
    json_decref(wait_status(js, w, "running"));
    /* the one worker runs another image's job meanwhile */
    char *other = submit(js, 1, 5);
    json_decref(wait_status(js, other, "concluded"));
    /* a job of the same image waits behind the parked one */
    char *behind = submit_waiter(js, "busy");
    usleep(300000);
    int err;
    json_t *o = get_json(js, behind, &err);
    ck_assert_str_eq(status_of(o), "created");
    json_decref(o);
    ck_assert_int_ge(atomic_load(&waiter_calls), 2); /* tried again, not once and stuck */
    atomic_store(&image_busy, 0);
    o = wait_status(js, w, "concluded");
    ck_assert(json_is_null(json_object_get(o, "error")));
    json_decref(o);
    json_decref(wait_status(js, behind, "concluded"));
    /* a parked job cancelled concludes as cancelled */
    atomic_store(&image_busy, 1);
    char *c = submit_waiter(js, "busy");
    json_decref(wait_status(js, c, "running"));
    ck_assert_int_eq(via(jobs_cancel, js, c, &o), 0);
    json_decref(o);
    o = wait_status(js, c, "concluded");
    ck_assert(json_is_true(json_object_get(o, "cancelled")));
    json_decref(o);
    atomic_store(&image_busy, 0);
    free(w);
    free(other);
    free(behind);
    free(c);
    jobs_free(js);
}
END_TEST

START_TEST(queued_jobs_over_the_budget_are_refused)
{
    atomic_store(&image_busy, 1);
    struct jobs *js;
    struct jobs_config cfg = {.workers = 1, .max_queued = 2};
    ck_assert_int_eq(jobs_new(&cfg, &js), 0);
    char *ids[3];
    ids[0] = submit_waiter(js, "q"); /* parked: started, not queued */
    json_decref(wait_status(js, ids[0], "running"));
    ids[1] = submit_waiter(js, "q");
    ids[2] = submit_waiter(js, "q");
    json_t *o = NULL;
    ck_assert_int_eq(jobs_submit(js, "check", "q", NULL, NULL, waiter_run, NULL, NULL, &o), -EAGAIN);
    ck_assert_ptr_null(o);
    atomic_store(&image_busy, 0);
    for (int i = 0; i < 3; i++) {
        json_decref(wait_status(js, ids[i], "concluded"));
        free(ids[i]);
    }
    char *more = submit_waiter(js, "q"); /* room again */
    json_decref(wait_status(js, more, "concluded"));
    free(more);
    jobs_free(js);
}
END_TEST

/* Threads pause, resume and cancel random jobs while 4 workers run them. */
struct racer {
    struct jobs *js;
    char **ids;
    int n;
    unsigned seed;
};

static void *race(void *arg)
{
    struct racer *r = arg;
    for (int i = 0; i < 400; i++) {
        const char *id = r->ids[rand_r(&r->seed) % (unsigned)r->n];
        json_t *o = NULL;
        int ret;
        switch (rand_r(&r->seed) % 8) {
        case 0:
            ret = via(jobs_cancel, r->js, id, &o);
            break;
        case 1:
        case 2:
        case 3:
            ret = via(pause_wait, r->js, id, &o);
            break;
        default:
            ret = via(jobs_resume, r->js, id, &o);
            break;
        }
        ck_assert(ret == 0 || ret == -EBUSY || ret == -ENOENT); /* ENOENT: dismissed */
        json_decref(o);
        usleep(100);
    }
    return NULL;
}

START_TEST(pause_resume_cancel_race_with_workers)
{
    struct jobs *js = start(4, NULL);
    enum { N = 24 };
    char *ids[N];
    atomic_store(&overlap, 0);
    for (int i = 0; i < N; i++)
        ids[i] = submit(js, i % IMAGES, 40 + i * 7);
    pthread_t t[3];
    struct racer r[3];
    for (int i = 0; i < 3; i++) {
        r[i] = (struct racer){js, ids, N, 1234u + (unsigned)i};
        pthread_create(&t[i], NULL, race, &r[i]);
    }
    for (int i = 0; i < 3; i++)
        pthread_join(t[i], NULL);
    /* let everything finish: resume whatever is paused */
    for (int i = 0; i < N; i++) {
        json_t *o;
        if (via(jobs_resume, js, ids[i], &o) == 0)
            json_decref(o);
    }
    for (int i = 0; i < N; i++) {
        json_t *o = wait_status(js, ids[i], "concluded");
        bool cancelled = json_is_true(json_object_get(o, "cancelled"));
        ck_assert(cancelled == json_is_string(json_object_get(o, "error")));
        ck_assert(cancelled == json_is_null(json_object_get(o, "result")));
        json_decref(o);
        free(ids[i]);
    }
    ck_assert_int_eq(atomic_load(&overlap), 0); /* one job per image at a time */
    jobs_free(js);
}
END_TEST

static char *temp_path(void)
{
    char path[] = "/tmp/test_jobs_XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    close(fd);
    unlink(path);
    return strdup(path);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

START_TEST(records_survive_a_restart)
{
    char *path = temp_path();
    struct jobs *js = start(1, path);
    char *done = submit(js, 0, 3);
    json_decref(wait_status(js, done, "concluded"));
    char *cut = submit(js, 1, 1000000); /* runs until the shutdown cancels it */
    json_decref(wait_status(js, cut, "running"));
    jobs_free(js);

    /* a record left "running" by a daemon that died */
    char text[2048];
    snprintf(text, sizeof text,
             "{\"format\": \"qcowd-jobs\", \"version\": 1, \"next-id\": 9, \"jobs\": ["
             "{\"id\": \"%s\", \"type\": \"check\", \"image\": \"img0\", \"status\": \"concluded\", \"current\": 3, "
             "\"total\": 3, \"error\": null, \"cancelled\": false, \"result\": {\"steps\": 3}, \"params\": {}, "
             "\"created-ms\": 1, \"started-ms\": 2, \"finished-ms\": %lld},"
             "{\"id\": \"8\", \"type\": \"commit\", \"image\": \"img2\", \"status\": \"running\", \"current\": 0, "
             "\"total\": 0, \"error\": null, \"cancelled\": false, \"result\": null, \"params\": {\"base\": \"b\"}, "
             "\"created-ms\": 1, \"started-ms\": 2, \"finished-ms\": 0}]}",
             done, (long long)time(NULL) * 1000); /* concluded now: not past the retention */
    write_file(path, text);
    js = start(1, path);
    int err;
    json_t *o = get_json(js, done, &err);
    ck_assert_str_eq(status_of(o), "concluded");
    ck_assert(json_is_null(json_object_get(o, "error")));
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(o, "result"), "steps")), 3);
    json_decref(o);
    o = get_json(js, "8", &err);
    ck_assert_str_eq(status_of(o), "concluded");
    ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(o, "error")), "cut off by a restart"));
    json_decref(o);
    char *next = submit(js, 0, 1);
    ck_assert_str_eq(next, "9");
    json_decref(wait_status(js, next, "concluded"));
    jobs_free(js);
    unlink(path);
    free(path);
    free(done);
    free(cut);
    free(next);
}
END_TEST

/* Records of another version, another format, a bad record or garbage: set
 * aside (PATH.rejected, unchanged), the engine starts with none. */
START_TEST(unreadable_records_are_set_aside)
{
    static const char *const bad[] = {
        "{\"format\": \"qcowd-jobs\", \"version\": 2, \"next-id\": 3, \"jobs\": []}",
        "{\"next-id\": 3, \"jobs\": [{\"id\": \"1\", \"type\": \"check\", \"image\": \"a\", \"status\": "
        "\"concluded\"}]}",
        "{\"format\": \"qcowd-jobs\", \"version\": 1, \"next-id\": 3, \"jobs\": [{\"id\": \"1\"}]}",
        "{\"format\": \"qcowd-jobs\", \"version\": 1, \"next-id\": 3, \"jobs\": [{\"id\": \"x\", \"type\": \"c\", "
        "\"image\": \"a\", \"status\": \"weird\", \"current\": 0, \"total\": 0, \"error\": null, \"cancelled\": "
        "false, \"result\": null, \"params\": {}, \"created-ms\": 1, \"started-ms\": 0, \"finished-ms\": 0}]}",
        "\x01\x02 not json at all",
        "",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *path = temp_path();
        char aside[64];
        snprintf(aside, sizeof aside, "%s.rejected", path);
        write_file(path, bad[i]);
        struct jobs *js = start(1, path);
        struct job_info *a;
        size_t n;
        ck_assert_int_eq(jobs_list(js, NULL, -1, &a, &n), 0);
        ck_assert_uint_eq(n, 0);
        jobs_info_free(a, n);
        char *id = submit(js, 0, 1);
        ck_assert_str_eq(id, "1");
        json_decref(wait_status(js, id, "concluded"));
        jobs_free(js);
        FILE *f = fopen(aside, "r");
        ck_assert_msg(f != NULL, "case %zu was not set aside", i);
        char buf[1024] = "";
        size_t got = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        ck_assert_uint_eq(got, strlen(bad[i]));
        ck_assert(memcmp(buf, bad[i], got) == 0);
        unlink(aside);
        unlink(path);
        free(path);
        free(id);
    }
}
END_TEST

/* --max-job-records: the oldest concluded records go; a short retention
 * dismisses concluded jobs by itself. */
START_TEST(records_stay_bounded_and_concluded_jobs_expire)
{
    struct jobs *js;
    struct jobs_config cfg = {.workers = 1, .max_records = 3};
    ck_assert_int_eq(jobs_new(&cfg, &js), 0);
    char *ids[6];
    for (int i = 0; i < 6; i++) {
        ids[i] = submit(js, 0, 1);
        json_decref(wait_status(js, ids[i], "concluded"));
    }
    struct job_info *a;
    size_t n;
    ck_assert_int_eq(jobs_list(js, NULL, -1, &a, &n), 0);
    ck_assert_uint_eq(n, 3);
    ck_assert_str_eq(a[0].id, ids[3]);
    jobs_info_free(a, n);
    jobs_free(js);
    for (int i = 0; i < 6; i++)
        free(ids[i]);

    cfg = (struct jobs_config){.workers = 1, .retention_ms = 200};
    ck_assert_int_eq(jobs_new(&cfg, &js), 0);
    char *id = submit(js, 0, 1);
    json_decref(wait_status(js, id, "concluded"));
    int err = 0;
    for (int i = 0; i < 400 && err == 0; i++) {
        json_decref(get_json(js, id, &err));
        usleep(10000);
    }
    ck_assert_int_eq(err, -ENOENT);
    jobs_free(js);
    free(id);
}
END_TEST

/* ---- pausing frees the run slot ---- */

START_TEST(a_paused_job_gives_its_slot_up)
{
    struct jobs *js = start(1, NULL);
    char *a = submit(js, 0, 1000000);
    json_decref(wait_status(js, a, "running"));
    json_t *o;
    ck_assert_int_eq(via(pause_wait, js, a, &o), 0);
    ck_assert_str_eq(status_of(o), "paused");
    json_decref(o);
    char *b = submit(js, 1, 5); /* another image's job runs on the one slot */
    json_decref(wait_status(js, b, "concluded"));
    int err;
    o = get_json(js, a, &err);
    ck_assert_str_eq(status_of(o), "paused");
    json_decref(o);
    /* a resumed job waits for the slot: c holds it, a goes on after */
    char *c = submit(js, 2, 200);
    json_decref(wait_status(js, c, "running"));
    ck_assert_int_eq(via(jobs_resume, js, a, &o), 0);
    json_decref(o);
    json_decref(wait_status(js, c, "concluded"));
    ck_assert_int_eq(atomic_load(&overlap), 0);
    ck_assert_int_eq(via(jobs_cancel, js, a, &o), 0);
    json_decref(o);
    json_decref(wait_status(js, a, "concluded"));
    jobs_free(js);
    free(a);
    free(b);
    free(c);
}
END_TEST

/* A job between progress points: the pause answers "pausing" after the wait,
 * and the job pauses when it gets to its next progress call. */
static atomic_int gate; /* the stalled job goes on once set */

static int stalled_run(struct job *j, void *arg, json_t **result)
{
    int ret = job_progress(j, 1, 3);
    while (ret == 0 && !atomic_load(&gate))
        usleep(1000);
    if (ret == 0)
        ret = job_progress(j, 2, 3);
    if (ret == 0)
        ret = job_progress(j, 3, 3);
    return ret;
}

START_TEST(a_pause_between_progress_points_answers_pausing)
{
    atomic_store(&gate, 0);
    struct jobs *js = start(1, NULL);
    json_t *h;
    ck_assert_int_eq(jobs_submit(js, "check", "st", NULL, NULL, stalled_run, NULL, NULL, &h), 0);
    char *id = strdup(json_string_value(json_object_get(h, "id")));
    json_decref(h);
    json_decref(wait_status(js, id, "running"));
    struct job_info ji;
    ck_assert_int_eq(jobs_pause(js, id, 50, &ji), 0);
    ck_assert_int_eq(ji.status, JOB_RUNNING);
    ck_assert(ji.pausing);
    job_info_release(&ji);
    atomic_store(&gate, 1);
    json_t *o = wait_status(js, id, "paused");
    ck_assert_int_eq(json_integer_value(json_object_get(o, "current-progress")), 2);
    ck_assert(json_is_false(json_object_get(o, "pausing")));
    json_decref(o);
    ck_assert_int_eq(via(jobs_resume, js, id, &o), 0);
    json_decref(o);
    o = wait_status(js, id, "concluded");
    ck_assert(json_is_null(json_object_get(o, "error")));
    json_decref(o);
    free(id);
    jobs_free(js);
}
END_TEST

START_TEST(paused_threads_are_bounded)
{
    struct jobs *js;
    struct jobs_config cfg = {.workers = 2, .max_paused = 1};
    ck_assert_int_eq(jobs_new(&cfg, &js), 0);
    char *a = submit(js, 0, 1000000), *b = submit(js, 1, 1000000);
    json_decref(wait_status(js, a, "running"));
    json_decref(wait_status(js, b, "running"));
    json_t *o;
    ck_assert_int_eq(via(pause_wait, js, a, &o), 0);
    json_decref(o);
    ck_assert_int_eq(via(pause_wait, js, b, &o), -EBUSY);
    jobs_free(js); /* cancels both, the paused one too */
    free(a);
    free(b);
}
END_TEST

/* ---- the event bus ---- */

static atomic_int wakes;
static void wake(void *o)
{
    atomic_fetch_add(&wakes, 1);
}
static void nap(void *o)
{
}

struct pub {
    struct events *ev;
    int n;
};

static void *publisher(void *arg)
{
    struct pub *p = arg;
    for (int i = 0; i < p->n; i++)
        events_publish_image(p->ev, "image-changed", "x");
    return NULL;
}

/* Read what l has now: events counted into *events (ids checked increasing),
 * lost counts summed into *lost (*unknown for an unknown count). */
static void drain(struct events_listener *l, uint64_t *last, size_t *events, uint64_t *lost, bool *unknown)
{
    for (;;) {
        const struct event *e = NULL;
        uint64_t n = 0;
        int got = events_next(l, &e, &n, nap);
        if (got == EVENTS_EVENT) {
            ck_assert_uint_gt(e->id, *last);
            *last = e->id;
            ++*events;
            events_put(e);
        } else if (got == EVENTS_LOST) {
            if (n == EVENTS_LOST_UNKNOWN)
                *unknown = true;
            else
                *lost += n;
        } else if (got != EVENTS_KEEPALIVE) {
            return;
        }
    }
}

START_TEST(slow_listener_loses_events_and_is_told)
{
    struct events *ev;
    struct events_config cfg = {.max_listeners = 2, .history = 100};
    ck_assert_int_eq(events_new(&cfg, &ev), 0);
    struct events_listener *fast, *slow, *third;
    ck_assert_int_eq(events_listen(ev, NULL, wake, NULL, &fast), 0);
    ck_assert_int_eq(events_listen(ev, NULL, wake, NULL, &slow), 0);
    ck_assert_int_eq(events_listen(ev, NULL, wake, NULL, &third), -EAGAIN);
    pthread_t t[2];
    struct pub p = {ev, 2000};
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, publisher, &p);
    /* the fast one reads as it goes; the slow one not at all */
    uint64_t flast = 0, flost = 0;
    size_t fgot = 0;
    bool unknown = false;
    for (int i = 0; i < 2000; i++) {
        drain(fast, &flast, &fgot, &flost, &unknown);
        usleep(50);
    }
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    drain(fast, &flast, &fgot, &flost, &unknown);
    ck_assert_uint_eq(fgot + flost, 4000); /* every event read or counted */
    uint64_t slast = 0, slost = 0;
    size_t sgot = 0;
    drain(slow, &slast, &sgot, &slost, &unknown);
    ck_assert_uint_eq(sgot, 100); /* the history */
    ck_assert_uint_eq(slost, 3900);
    ck_assert(!unknown);
    events_close(ev);
    const struct event *e;
    uint64_t n;
    ck_assert_int_eq(events_next(fast, &e, &n, nap), -EPIPE);
    events_unlisten(fast);
    events_unlisten(slow);
    events_free(ev);
}
END_TEST

/* Last-Event-ID: the events after it are replayed, each once; an id the
 * history no longer holds gives lost with the count, one of an earlier run
 * lost with an unknown count, then what this run has. */
START_TEST(replay_from_an_id)
{
    struct events *ev;
    struct events_config cfg = {.history = 10, .first_id = 1000};
    ck_assert_int_eq(events_new(&cfg, &ev), 0);
    for (int i = 0; i < 25; i++)
        events_publish_image(ev, "image-changed", "x");
    /* ids 1000..1024; the history holds 1015..1024 */
    ck_assert_uint_eq(events_next_id(ev), 1025);
    struct {
        uint64_t after;
        size_t events;
        uint64_t lost;
        bool unknown;
    } cases[] = {{1020, 4, 0, false},  {1024, 0, 0, false}, {1010, 10, 4, false},
                 {999, 10, 15, false}, {500, 10, 0, true},  {5000, 10, 0, true}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct events_listener *l;
        ck_assert_int_eq(events_listen(ev, &cases[i].after, wake, NULL, &l), 0);
        uint64_t last = 0, lost = 0;
        size_t got = 0;
        bool unknown = false;
        drain(l, &last, &got, &lost, &unknown);
        ck_assert_msg(got == cases[i].events && lost == cases[i].lost && unknown == cases[i].unknown,
                      "after %llu: %zu events, %llu lost, unknown %d", (unsigned long long)cases[i].after, got,
                      (unsigned long long)lost, unknown);
        if (got)
            ck_assert_uint_eq(last, 1024);
        events_unlisten(l);
    }
    events_free(ev);
}
END_TEST

/* --event-history-bytes bounds the history too: big job events push the
 * oldest out long before the count does; what went is counted as lost. */
START_TEST(history_bytes_are_bounded)
{
    struct events *ev;
    struct events_config cfg = {.history = 1000, .history_bytes = 64 << 10, .first_id = 1};
    ck_assert_int_eq(events_new(&cfg, &ev), 0);
    char *big = malloc(16 << 10);
    memset(big, 'x', (16 << 10) - 1);
    big[(16 << 10) - 1] = '\0';
    struct job_info ji = {.id = "1", .type = "check", .image = "a", .error = big, .params = "{}"};
    for (int i = 0; i < 100; i++)
        events_publish_job(ev, "job-status", &ji);
    uint64_t after = 0, last = 0, lost = 0;
    size_t got = 0;
    bool unknown = false;
    struct events_listener *l;
    ck_assert_int_eq(events_listen(ev, &after, wake, NULL, &l), 0);
    drain(l, &last, &got, &lost, &unknown);
    ck_assert_uint_ge(got, 1);
    ck_assert_uint_le(got, 4); /* 16 KiB each in 64 KiB */
    ck_assert_uint_eq(got + lost, 100);
    ck_assert_uint_eq(last, 100);
    events_unlisten(l);
    events_free(ev);
    free(big);
}
END_TEST

/* Jobs publish under their lock: over many jobs on 4 workers with pauses,
 * resumes and cancels racing, each job's events start with job-created and
 * nothing but job-dismissed follows its concluded status. */
#define ORDER_JOBS 40
static struct {
    pthread_mutex_t lock;
    int state[ORDER_JOBS + 1]; /* 0 none, 1 created, 2 concluded, 3 dismissed */
    int bad;
    char why[200];
} order = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void order_event(void *opaque, const char *event, const struct job_info *ji)
{
    int id = atoi(ji->id);
    pthread_mutex_lock(&order.lock);
    int *st = &order.state[id > 0 && id <= ORDER_JOBS ? id : 0];
    bool created = !strcmp(event, "job-created"), dismissed = !strcmp(event, "job-dismissed");
    bool ok = created ? *st == 0 : dismissed ? *st == 2 : *st == 1;
    if (!ok && !order.bad++)
        snprintf(order.why, sizeof order.why, "job %s: %s (%s) in state %d", ji->id, event, job_status_name(ji->status),
                 *st);
    if (created)
        *st = 1;
    else if (dismissed)
        *st = 3;
    else if (ji->status == JOB_CONCLUDED && !strcmp(event, "job-status"))
        *st = 2;
    pthread_mutex_unlock(&order.lock);
}

START_TEST(job_events_come_in_order)
{
    struct jobs *js;
    struct jobs_config cfg = {.workers = 4, .event = order_event, .retention_ms = 1};
    ck_assert_int_eq(jobs_new(&cfg, &js), 0);
    char *ids[ORDER_JOBS];
    for (int i = 0; i < ORDER_JOBS; i++)
        ids[i] = submit(js, i % IMAGES, 5 + i % 7);
    pthread_t t[3];
    struct racer r[3];
    for (int i = 0; i < 3; i++) {
        r[i] = (struct racer){js, ids, ORDER_JOBS, 99u + (unsigned)i};
        pthread_create(&t[i], NULL, race, &r[i]);
    }
    for (int i = 0; i < 3; i++)
        pthread_join(t[i], NULL);
    for (int i = 0; i < ORDER_JOBS; i++) {
        json_t *o;
        if (via(jobs_resume, js, ids[i], &o) == 0)
            json_decref(o);
    }
    for (int i = 0; i < 4000; i++) { /* all dismissed by the 1 ms retention */
        pthread_mutex_lock(&order.lock);
        int n = 0;
        for (int k = 1; k <= ORDER_JOBS; k++)
            n += order.state[k] == 3;
        pthread_mutex_unlock(&order.lock);
        if (n == ORDER_JOBS)
            break;
        usleep(5000);
    }
    jobs_free(js);
    ck_assert_msg(order.bad == 0, "%d events out of order, first: %s", order.bad, order.why);
    for (int k = 1; k <= ORDER_JOBS; k++)
        ck_assert_int_eq(order.state[k], 3);
    for (int i = 0; i < ORDER_JOBS; i++)
        free(ids[i]);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("jobs");
    TCase *tc = tcase_create("engine");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, pause_stops_progress_and_resume_continues);
    tcase_add_test(tc, pause_resume_cancel_race_with_workers);
    tcase_add_test(tc, records_survive_a_restart);
    tcase_add_test(tc, unreadable_records_are_set_aside);
    tcase_add_test(tc, records_stay_bounded_and_concluded_jobs_expire);
    tcase_add_test(tc, a_paused_job_gives_its_slot_up);
    tcase_add_test(tc, paused_threads_are_bounded);
    tcase_add_test(tc, a_pause_between_progress_points_answers_pausing);
    tcase_add_test(tc, slow_listener_loses_events_and_is_told);
    tcase_add_test(tc, replay_from_an_id);
    tcase_add_test(tc, history_bytes_are_bounded);
    tcase_add_test(tc, job_events_come_in_order);
    tcase_add_test(tc, job_waiting_for_its_image_leaves_the_worker);
    tcase_add_test(tc, queued_jobs_over_the_budget_are_refused);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
