/* test_jobs.c: unit tests of the job engine and the event bus: the state machine,
 * pause/resume/cancel racing the workers, one job at a time per image, records
 * across a restart, and a slow listener that loses events without slowing anyone.
 * Threaded: this suite also runs under TSan. */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static const char *status_of(json_t *o)
{
    return json_string_value(json_object_get(o, "status"));
}

static json_t *wait_status(struct jobs *js, const char *id, const char *want)
{
    for (int i = 0; i < 20000; i++) {
        int err;
        json_t *o = jobs_get(js, id, &err);
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
    ck_assert_int_eq(jobs_pause(js, id, &o), 0);
    ck_assert_str_eq(status_of(o), "paused");
    json_decref(o);
    ck_assert_int_eq(jobs_pause(js, id, &o), -EBUSY);
    usleep(20000);
    int err;
    json_t *a = jobs_get(js, id, &err);
    usleep(50000);
    json_t *b = jobs_get(js, id, &err);
    /* at most the one progress call in flight when the pause came */
    json_int_t pa = json_integer_value(json_object_get(a, "current-progress"));
    json_int_t pb = json_integer_value(json_object_get(b, "current-progress"));
    ck_assert_int_le(pb - pa, 1);
    json_decref(a);
    json_decref(b);
    ck_assert_int_eq(jobs_resume(js, id, &o), 0);
    ck_assert_str_eq(status_of(o), "running");
    json_decref(o);
    ck_assert_int_eq(jobs_resume(js, id, &o), -EBUSY);
    ck_assert_int_eq(jobs_dismiss(js, id, &o), -EBUSY);
    ck_assert_int_eq(jobs_cancel(js, id, &o), 0);
    json_decref(o);
    o = wait_status(js, id, "concluded");
    ck_assert(json_is_true(json_object_get(o, "cancelled")));
    ck_assert(json_is_string(json_object_get(o, "error")));
    json_decref(o);
    ck_assert_int_eq(jobs_cancel(js, id, &o), -EBUSY);
    ck_assert_int_eq(jobs_dismiss(js, id, &o), 0);
    json_decref(o);
    int e2 = 0;
    ck_assert_ptr_null(jobs_get(js, id, &e2));
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
    json_t *o = jobs_get(js, behind, &err);
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
    ck_assert_int_eq(jobs_cancel(js, c, &o), 0);
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
        case 0: ret = jobs_cancel(r->js, id, &o); break;
        case 1:
        case 2:
        case 3: ret = jobs_pause(r->js, id, &o); break;
        default: ret = jobs_resume(r->js, id, &o); break;
        }
        ck_assert(ret == 0 || ret == -EBUSY);
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
        if (jobs_resume(js, ids[i], &o) == 0)
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

START_TEST(records_survive_a_restart)
{
    char path[] = "/tmp/test_jobs_XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    close(fd);
    unlink(path);
    struct jobs *js = start(1, path);
    char *done = submit(js, 0, 3);
    json_decref(wait_status(js, done, "concluded"));
    char *cut = submit(js, 1, 1000000); /* runs until the shutdown cancels it */
    json_decref(wait_status(js, cut, "running"));
    jobs_free(js);

    /* a record left "running" by a daemon that died */
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "{\"next-id\": 9, \"jobs\": [{\"id\": \"%s\", \"type\": \"check\", \"image\": \"img0\", \"status\": "
               "\"concluded\", \"cancelled\": false, \"error\": null, \"result\": {\"steps\": 3}},"
               "{\"id\": \"8\", \"type\": \"commit\", \"image\": \"img2\", \"status\": \"running\"}]}",
            done);
    fclose(f);
    js = start(1, path);
    int err;
    json_t *o = jobs_get(js, done, &err);
    ck_assert_str_eq(status_of(o), "concluded");
    ck_assert(json_is_null(json_object_get(o, "error")));
    json_decref(o);
    o = jobs_get(js, "8", &err);
    ck_assert_str_eq(status_of(o), "concluded");
    ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(o, "error")), "cut off by a restart"));
    json_decref(o);
    char *next = submit(js, 0, 1);
    ck_assert_str_eq(next, "9");
    json_decref(wait_status(js, next, "concluded"));
    jobs_free(js);
    unlink(path);
    free(done);
    free(cut);
    free(next);
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
    json_t *d = json_pack("{s:s}", "name", "x");
    for (int i = 0; i < p->n; i++)
        events_publish(p->ev, "image-changed", d);
    json_decref(d);
    return NULL;
}

START_TEST(slow_listener_loses_events_and_is_told)
{
    struct events *ev;
    ck_assert_int_eq(events_new(2, &ev), 0);
    struct events_listener *fast, *slow, *third;
    ck_assert_int_eq(events_listen(ev, wake, NULL, &fast), 0);
    ck_assert_int_eq(events_listen(ev, wake, NULL, &slow), 0);
    ck_assert_int_eq(events_listen(ev, wake, NULL, &third), -EAGAIN);
    pthread_t t[2];
    struct pub p = {ev, 2000};
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, publisher, &p);
    /* the fast one reads as it goes; the slow one not at all */
    char buf[4096];
    size_t got = 0;
    for (int i = 0; i < 20000; i++) {
        ssize_t n = events_read(fast, buf, sizeof buf, nap);
        ck_assert_int_ge(n, 0);
        got += (size_t)n;
        if (n == 0)
            usleep(50);
    }
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    ssize_t n;
    size_t total = 0;
    bool lost = false;
    while ((n = events_read(slow, buf, sizeof buf - 1, nap)) > 0) {
        buf[n] = '\0';
        lost |= strstr(buf, "event: lost") != NULL;
        total += (size_t)n;
    }
    ck_assert(lost);
    ck_assert_int_gt(total, 0);
    ck_assert_int_gt(got, 0);
    events_close(ev);
    while ((n = events_read(fast, buf, sizeof buf, nap)) > 0)
        ;
    ck_assert_int_eq(n, -EPIPE);
    events_unlisten(fast);
    events_unlisten(slow);
    events_free(ev);
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
    tcase_add_test(tc, slow_listener_loses_events_and_is_told);
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
