/* access.c: the admission model: who may do what to an image now. One small
 * state per image name, checked and changed under one lock by one function per
 * operation; refusals are -EBUSY naming the holder. */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "catalog_int.h"
#include "err.h"
#include "qcow2.h"
#include "vfs.h"

/* THE RULES. An image name has, while anything uses it, one state record
 * (struct name_state): it exists while no handle is open too (a queued job, a
 * reserved convert target, a create in progress). What it counts:
 *
 *   writers    client changes in flight: PUT/PATCH .../data, bitmap changes
 *              (catalog_get_writable .. catalog_put_writable);
 *   downloads  GET .../file: the container read as one file;
 *   jobs       jobs claiming the image from their submit to their end, queued
 *              or running (catalog_claim), and of those `changing`, the jobs
 *              that change it (snapshot, repair, commit);
 *   running    the job running on it now (catalog_reserve), and whether it
 *              changes the image (exclusive: readers wait too);
 *   reserver   a reservation of the NAME by whoever is making the image: a
 *              create, an upload, a convert's target (from its submit);
 *   deleting   a DELETE between its checks and the removal.
 *
 * Which operation excludes which (a refusal is -EBUSY, HTTP 409 with
 * Retry-After, naming the holder; a job refused at its run waits off its
 * worker, job_retry_later, and tries again):
 *
 *   read (catalog_get)   waits for nothing but a running changing job;
 *   write                refused by downloads, a running job (a reading job
 *                        needs a point in time too), a delete; queued jobs do
 *                        not stop writes: the job runs after them;
 *   download             refused by writers, by changing jobs queued or
 *                        running (the container would change under the
 *                        reader) and by a delete;
 *   job run, changing    waits for writers, downloads and a running job;
 *   job run, reading     waits for writers and a running job (the job engine
 *                        runs one job of an image at a time anyway);
 *   job submit (claim)   refused by a delete; a claim of a new name (convert
 *                        target) is a reservation: refused by another one;
 *   create / upload      refused while the name is reserved by someone else or
 *                        being deleted (and with -EEXIST when it exists);
 *                        the reservation holds from the start to the rename,
 *                        so the name is checked at the start and at the end;
 *   delete               refused by writers, downloads, any job claim,
 *                        a reservation and another delete.
 *
 * The lock (c->admit_lock) guards the states and the claims only: no store
 * I/O and no engine call is made under it. Callers do their I/O before or
 * after, holding their admission, so the state they were granted holds while
 * they work. */

struct name_state {
    char *name;
    unsigned writers, downloads;
    unsigned jobs, changing; /* claims by jobs, and of those changing the image */
    const char *running;     /* owner of the running job, or NULL */
    char running_buf[64];
    bool running_changes;
    const char *reserver;    /* who makes the image under this name, or NULL */
    bool deleting;
    struct name_state *next;
};

/* One item of a job's claim. */
struct claim_item {
    char *name;
    enum catalog_use use;
};

struct catalog_claim {
    struct catalog *cat;
    char owner[96]; /* "job 7 (convert)" once known; under admit_lock */
    unsigned refs;  /* the job's, and its submitter's until it has the id (under admit_lock) */
    size_t n;
    struct claim_item *items;
    struct catalog_claim *next;
};

/* With admit_lock held: the state of name, made when create is set (NULL on
 * ENOMEM). */
static struct name_state *state(struct catalog *c, const char *name, bool create)
{
    for (struct name_state *s = c->states; s; s = s->next)
        if (!strcmp(s->name, name))
            return s;
    if (!create)
        return NULL;
    struct name_state *s = calloc(1, sizeof *s);
    if (!s || !(s->name = strdup(name))) {
        free(s);
        return NULL;
    }
    s->next = c->states;
    c->states = s;
    return s;
}

/* With admit_lock held: free s once nothing holds it. */
static void state_tidy(struct catalog *c, struct name_state *s)
{
    if (s->writers || s->downloads || s->jobs || s->running || s->reserver || s->deleting)
        return;
    for (struct name_state **p = &c->states; *p; p = &(*p)->next)
        if (*p == s) {
            *p = s->next;
            break;
        }
    free(s->name);
    free(s);
}

/* With admit_lock held: the first claim naming name, or NULL. */
static struct catalog_claim *claim_of(struct catalog *c, const char *name)
{
    for (struct catalog_claim *cl = c->claims; cl; cl = cl->next)
        for (size_t i = 0; i < cl->n; i++)
            if (!strcmp(cl->items[i].name, name))
                return cl;
    return NULL;
}

/* The holders of s that the caller's operation must wait for, as a refusal:
 * -EBUSY "image 'vm1' is busy: job 7 (snapshot-create) is running". what
 * selects the holders that count (HOLD_*). With admit_lock held. */
enum {
    HOLD_WRITERS = 1,
    HOLD_DOWNLOADS = 2,
    HOLD_JOBS = 4,     /* any claim */
    HOLD_CHANGING = 8, /* claims of changing jobs */
    HOLD_RUNNING = 16, /* any running job */
    HOLD_RUN_CHANGE = 32,
    HOLD_RESERVED = 64,
    HOLD_DELETING = 128,
};

static int busy(struct catalog *c, const struct name_state *s, unsigned what)
{
    const char *n = s->name;
    if ((what & HOLD_DELETING) && s->deleting)
        return err_fail(EBUSY, "image '%s' is busy: it is being deleted", n);
    if ((what & HOLD_RUNNING) && s->running)
        return err_fail(EBUSY, "image '%s' is busy: %s is running", n, s->running);
    if ((what & HOLD_RUN_CHANGE) && s->running && s->running_changes)
        return err_fail(EBUSY, "image '%s' is busy: %s is running", n, s->running);
    if ((what & HOLD_RESERVED) && s->reserver)
        return err_fail(EBUSY, "image '%s' is busy: %s is making it", n, s->reserver);
    if ((what & HOLD_WRITERS) && s->writers)
        return err_fail(EBUSY, "image '%s' is busy: %u write%s in flight", n, s->writers, s->writers > 1 ? "s" : "");
    if ((what & HOLD_DOWNLOADS) && s->downloads)
        return err_fail(EBUSY, "image '%s' is busy: its container is being downloaded (GET .../file, %u running)", n,
                        s->downloads);
    if (((what & HOLD_JOBS) && s->jobs) || ((what & HOLD_CHANGING) && s->changing)) {
        const struct catalog_claim *cl = claim_of(c, n);
        return err_fail(EBUSY, "image '%s' is busy: %s is queued", n, cl && cl->owner[0] ? cl->owner : "a job");
    }
    return 0;
}

/* The one shape of every admission: under the lock, refuse when s has one of
 * the holders in what, else count the caller in with take(s). */
static int admit(struct catalog *c, const char *name, unsigned what, void (*take)(struct name_state *s, void *arg),
                 void *arg)
{
    pthread_mutex_lock(&c->admit_lock);
    struct name_state *s = state(c, name, true);
    int ret = s ? busy(c, s, what) : err_fail(ENOMEM, "out of memory");
    if (ret == 0)
        take(s, arg);
    else if (s)
        state_tidy(c, s);
    pthread_mutex_unlock(&c->admit_lock);
    return ret;
}

/* The matching leave: undo what take did, then drop the state if idle. */
static void leave(struct catalog *c, const char *name, void (*undo)(struct name_state *s, void *arg), void *arg)
{
    pthread_mutex_lock(&c->admit_lock);
    struct name_state *s = state(c, name, false);
    if (s) {
        undo(s, arg);
        state_tidy(c, s);
    }
    pthread_mutex_unlock(&c->admit_lock);
}

/* ---- read ---- */

int cat_admit_read(struct catalog *c, const char *name)
{
    pthread_mutex_lock(&c->admit_lock);
    const struct name_state *s = state(c, name, false);
    int ret = s ? busy(c, s, HOLD_RUN_CHANGE) : 0;
    pthread_mutex_unlock(&c->admit_lock);
    return ret;
}

/* ---- write ---- */

static void take_write(struct name_state *s, void *arg)
{
    s->writers++;
}

static void undo_write(struct name_state *s, void *arg)
{
    s->writers--;
}

int cat_admit_write(struct catalog *c, const char *name)
{
    return admit(c, name, HOLD_DELETING | HOLD_RUNNING | HOLD_DOWNLOADS, take_write, NULL);
}

void cat_leave_write(struct catalog *c, const char *name)
{
    leave(c, name, undo_write, NULL);
}

/* ---- download ---- */

static void take_download(struct name_state *s, void *arg)
{
    s->downloads++;
}

static void undo_download(struct name_state *s, void *arg)
{
    s->downloads--;
}

int cat_admit_download(struct catalog *c, const char *name)
{
    return admit(c, name, HOLD_DELETING | HOLD_WRITERS | HOLD_CHANGING | HOLD_RUN_CHANGE, take_download, NULL);
}

void cat_leave_download(struct catalog *c, const char *name)
{
    leave(c, name, undo_download, NULL);
}

/* ---- a reservation of the name (create, upload) ---- */

static void take_name(struct name_state *s, void *arg)
{
    s->reserver = arg;
}

static void undo_name(struct name_state *s, void *arg)
{
    if (s->reserver == arg)
        s->reserver = NULL;
}

int cat_admit_name(struct catalog *c, const char *name, const char *owner)
{
    return admit(c, name, HOLD_DELETING | HOLD_RESERVED, take_name, (void *)owner);
}

void cat_leave_name(struct catalog *c, const char *name, const char *owner)
{
    leave(c, name, undo_name, (void *)owner);
}

/* ---- delete ---- */

static void take_delete(struct name_state *s, void *arg)
{
    s->deleting = true;
}

static void undo_delete(struct name_state *s, void *arg)
{
    s->deleting = false;
}

int cat_admit_delete(struct catalog *c, const char *name)
{
    return admit(c, name,
                 HOLD_DELETING | HOLD_WRITERS | HOLD_DOWNLOADS | HOLD_JOBS | HOLD_RUNNING | HOLD_RESERVED,
                 take_delete, NULL);
}

void cat_leave_delete(struct catalog *c, const char *name)
{
    leave(c, name, undo_delete, NULL);
}

/* ---- jobs: the claim from submit to end, and the run ---- */

int catalog_claim(struct catalog *c, const char *owner, size_t n, const char *const *names,
                  const enum catalog_use *uses, struct catalog_claim **out)
{
    struct catalog_claim *cl = calloc(1, sizeof *cl);
    if (!cl || !(cl->items = calloc(n ? n : 1, sizeof *cl->items))) {
        free(cl);
        return err_fail(ENOMEM, "out of memory");
    }
    cl->cat = c;
    cl->refs = 1;
    snprintf(cl->owner, sizeof cl->owner, "%s", owner);
    int ret = 0;
    for (size_t i = 0; i < n && ret == 0; i++) {
        ret = catalog_valid_name(names[i]);
        if (ret == 0 && !(cl->items[i].name = strdup(names[i])))
            ret = err_fail(ENOMEM, "out of memory");
        cl->items[i].use = uses[i];
    }
    if (ret < 0) {
        for (size_t i = 0; i < n; i++)
            free(cl->items[i].name);
        free(cl->items);
        free(cl);
        return ret;
    }
    cl->n = n;
    /* every name or none: check them all, then take them all */
    pthread_mutex_lock(&c->admit_lock);
    size_t made = 0;
    for (size_t i = 0; i < n && ret == 0; i++) {
        struct name_state *s = state(c, cl->items[i].name, true);
        if (!s) {
            ret = err_fail(ENOMEM, "out of memory");
            break;
        }
        made = i + 1;
        ret = busy(c, s, HOLD_DELETING | (cl->items[i].use == CATALOG_USE_CREATE ? HOLD_RESERVED : 0));
    }
    for (size_t i = 0; i < made; i++) {
        struct name_state *s = state(c, cl->items[i].name, false);
        if (ret == 0) {
            s->jobs++;
            if (cl->items[i].use == CATALOG_USE_CHANGE)
                s->changing++;
            if (cl->items[i].use == CATALOG_USE_CREATE)
                s->reserver = cl->owner;
        } else {
            state_tidy(c, s);
        }
    }
    if (ret == 0) {
        cl->next = c->claims;
        c->claims = cl;
    }
    pthread_mutex_unlock(&c->admit_lock);
    if (ret < 0) {
        cl->n = 0;
        for (size_t i = 0; i < n; i++)
            free(cl->items[i].name);
        free(cl->items);
        free(cl);
        return ret;
    }
    *out = cl;
    return 0;
}

void catalog_claim_owner(struct catalog_claim *cl, const char *owner)
{
    if (!cl)
        return;
    pthread_mutex_lock(&cl->cat->admit_lock);
    snprintf(cl->owner, sizeof cl->owner, "%s", owner);
    pthread_mutex_unlock(&cl->cat->admit_lock);
}

void catalog_claim_ref(struct catalog_claim *cl)
{
    pthread_mutex_lock(&cl->cat->admit_lock);
    cl->refs++;
    pthread_mutex_unlock(&cl->cat->admit_lock);
}

void catalog_unclaim(struct catalog_claim *cl)
{
    if (!cl)
        return;
    struct catalog *c = cl->cat;
    pthread_mutex_lock(&c->admit_lock);
    if (--cl->refs > 0) {
        pthread_mutex_unlock(&c->admit_lock);
        return;
    }
    for (struct catalog_claim **p = &c->claims; *p; p = &(*p)->next)
        if (*p == cl) {
            *p = cl->next;
            break;
        }
    for (size_t i = 0; i < cl->n; i++) {
        struct name_state *s = state(c, cl->items[i].name, false);
        if (!s)
            continue;
        s->jobs--;
        if (cl->items[i].use == CATALOG_USE_CHANGE)
            s->changing--;
        if (s->reserver == cl->owner)
            s->reserver = NULL;
        state_tidy(c, s);
    }
    pthread_mutex_unlock(&c->admit_lock);
    for (size_t i = 0; i < cl->n; i++)
        free(cl->items[i].name);
    free(cl->items);
    free(cl);
}

struct run_arg {
    const char *owner;
    bool changes;
};

static void take_run(struct name_state *s, void *arg)
{
    const struct run_arg *ra = arg;
    snprintf(s->running_buf, sizeof s->running_buf, "%s", ra->owner);
    s->running = s->running_buf;
    s->running_changes = ra->changes;
}

static void undo_run(struct name_state *s, void *arg)
{
    s->running = NULL;
    s->running_changes = false;
}

int catalog_reserve(struct catalog *c, const char *name, bool exclusive, const char *owner)
{
    int ret = catalog_valid_name(name);
    if (ret < 0)
        return ret;
    struct run_arg ra = {owner, exclusive};
    unsigned what = HOLD_DELETING | HOLD_WRITERS | (exclusive ? HOLD_RUNNING | HOLD_DOWNLOADS : HOLD_RUN_CHANGE);
    /* two reading jobs of one image are kept apart by the job engine's locks;
     * here a running one of either kind blocks the other */
    return admit(c, name, what | HOLD_RUNNING, take_run, &ra);
}

void catalog_release(struct catalog *c, const char *name)
{
    leave(c, name, undo_run, NULL);
}

/* Free what is left at catalog_free (every handle put, every job ended). */
void cat_admit_free(struct catalog *c)
{
    while (c->states) {
        struct name_state *s = c->states;
        c->states = s->next;
        free(s->name);
        free(s);
    }
}

/* ---- writing through the shared handle ---- */

/* The handle of name for writing (bypass: skipping the readers' admission),
 * or -EROFS/the image's errno when it was opened read-only. */
static int get_rw(struct catalog *c, const char *name, bool bypass, struct catalog_image **out)
{
    struct catalog_image *ci;
    int ret = cat_get_entry(c, name, &ci, bypass);
    if (ret == 0 && !ci->rw) {
        ret = cat_refuse_write(ci);
        catalog_put(ci);
    }
    if (ret == 0)
        *out = ci;
    return ret;
}

int catalog_get_writable(struct catalog *c, const char *name, struct catalog_image **out)
{
    struct catalog_image *ci;
    int ret = get_rw(c, name, false, &ci);
    if (ret < 0)
        return ret;
    ret = cat_users_refuse(c, name); /* a lookup in the backing-user index */
    if (ret == 0)
        ret = cat_admit_write(c, name);
    if (ret < 0) {
        catalog_put(ci);
        return ret;
    }
    cat_writer_enter(ci);
    *out = ci;
    return 0;
}

void catalog_put_writable(struct catalog_image *ci)
{
    if (!ci)
        return;
    cat_writer_leave(ci);
    cat_leave_write(ci->cat, ci->name);
    catalog_put(ci);
}

int catalog_get_reserved(struct catalog *c, const char *name, struct catalog_image **out)
{
    struct catalog_image *ci;
    int ret = get_rw(c, name, true, &ci);
    if (ret < 0)
        return ret;
    ret = admit(c, name, 0, take_write, NULL); /* the job holds the image: nothing to refuse, only counted */
    if (ret < 0) {
        catalog_put(ci);
        return ret;
    }
    cat_writer_enter(ci);
    *out = ci;
    return 0;
}
