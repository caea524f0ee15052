/* events.c: the event bus: one history ring of typed, reference-counted events
 * under one lock, listeners as cursors (ids) into it, and a keepalive thread
 * that also wakes listeners, so a client that went away is noticed. */
#include "events.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "err.h"

/* One published event and what it owns; listeners holding it keep it alive
 * after it left the history. */
struct slot {
    atomic_uint refs;
    size_t bytes;
    struct event ev;
    char text[]; /* type, then the image's name (EVENT_IMAGE) */
};

struct events_listener {
    struct events *ev;
    uint64_t cursor; /* the id of the next event it reads */
    uint64_t lost;   /* missed before cursor, to report; EVENTS_LOST_UNKNOWN: unknown */
    bool keepalive;  /* the ticker asked for a keepalive */
    bool sleeping;
    void (*wake)(void *);
    void *opaque;
    struct events_listener *next;
};

struct events {
    pthread_mutex_t lock; /* everything below and every listener's fields */
    struct events_config cfg;
    struct slot **ring; /* cfg.history entries; ring[head] the oldest */
    unsigned head, count;
    size_t bytes;      /* of the events in the ring */
    uint64_t first_id; /* the first id of this run */
    uint64_t next_id;
    struct events_listener *list;
    unsigned nlisteners;
    bool closed;
    pthread_t ticker;
    pthread_cond_t tick;
};

static struct slot *slot_of(const struct event *e)
{
    return (struct slot *)(void *)((char *)e - offsetof(struct slot, ev));
}

void events_put(const struct event *e)
{
    if (!e)
        return;
    struct slot *s = slot_of(e);
    if (atomic_fetch_sub(&s->refs, 1) == 1) {
        job_info_release(&s->ev.job);
        free(s);
    }
}

/* A slot for type and (EVENT_IMAGE) name; the job copy is the caller's. */
static struct slot *slot_new(enum event_kind kind, const char *type, const char *name)
{
    size_t tl = strlen(type) + 1, nl = name ? strlen(name) + 1 : 0;
    struct slot *s = calloc(1, sizeof *s + tl + nl);
    if (!s)
        return NULL;
    atomic_init(&s->refs, 1);
    memcpy(s->text, type, tl);
    s->ev.type = s->text;
    s->ev.kind = kind;
    if (name) {
        memcpy(s->text + tl, name, nl);
        s->ev.image = s->text + tl;
    }
    s->bytes = sizeof *s + tl + nl;
    return s;
}

/* ---- the history ---- */

/* With ev->lock held: the id of the oldest event held (next_id when none). */
static uint64_t oldest_id(const struct events *ev)
{
    return ev->count ? ev->ring[ev->head]->ev.id : ev->next_id;
}

static void drop_oldest(struct events *ev)
{
    struct slot *s = ev->ring[ev->head];
    ev->ring[ev->head] = NULL;
    ev->head = (ev->head + 1) % ev->cfg.history;
    ev->count--;
    ev->bytes -= s->bytes;
    events_put(&s->ev);
}

static void wake_sleepers(struct events *ev)
{
    for (struct events_listener *l = ev->list; l; l = l->next)
        if (l->sleeping) {
            l->sleeping = false;
            l->wake(l->opaque);
        }
}

/* Give s (or, out of memory, NULL) the next id and keep it. */
static void publish(struct events *ev, struct slot *s)
{
    pthread_mutex_lock(&ev->lock);
    uint64_t id = ev->next_id++;
    if (s) {
        s->ev.id = id;
        while (ev->count && (ev->count == ev->cfg.history || ev->bytes + s->bytes > ev->cfg.history_bytes))
            drop_oldest(ev);
        ev->ring[(ev->head + ev->count++) % ev->cfg.history] = s;
        ev->bytes += s->bytes;
    } else {
        /* not stored: drop what is older too, so cursors before it see a gap */
        while (ev->count)
            drop_oldest(ev);
    }
    wake_sleepers(ev);
    pthread_mutex_unlock(&ev->lock);
}

void events_publish_image(struct events *ev, const char *type, const char *name)
{
    publish(ev, slot_new(EVENT_IMAGE, type, name));
}

void events_publish_job(struct events *ev, const char *type, const struct job_info *job)
{
    struct slot *s = slot_new(EVENT_JOB, type, NULL);
    if (s && job_info_copy(&s->ev.job, job) < 0) {
        free(s);
        s = NULL;
    }
    if (s)
        s->bytes += job_info_size(&s->ev.job);
    publish(ev, s);
}

/* ---- the bus ---- */

static void *ticker(void *arg)
{
    struct events *ev = arg;
    pthread_mutex_lock(&ev->lock);
    while (!ev->closed) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_sec += EVENTS_KEEPALIVE_SEC;
        pthread_cond_timedwait(&ev->tick, &ev->lock, &t);
        if (ev->closed)
            continue;
        for (struct events_listener *l = ev->list; l; l = l->next)
            l->keepalive = true;
        wake_sleepers(ev);
    }
    pthread_mutex_unlock(&ev->lock);
    return NULL;
}

int events_new(const struct events_config *cfg, struct events **out)
{
    struct events *ev = calloc(1, sizeof *ev);
    if (!ev)
        return err_fail(ENOMEM, "out of memory");
    ev->cfg = *cfg;
    if (!ev->cfg.max_listeners)
        ev->cfg.max_listeners = EVENTS_DEFAULT_LISTENERS;
    if (!ev->cfg.history)
        ev->cfg.history = EVENTS_DEFAULT_HISTORY;
    if (!ev->cfg.history_bytes)
        ev->cfg.history_bytes = EVENTS_DEFAULT_HISTORY_BYTES;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t ms = (uint64_t)now.tv_sec * 1000 + (uint64_t)now.tv_nsec / 1000000;
    ev->first_id = cfg->first_id ? cfg->first_id : ms * EVENTS_IDS_PER_MS + 1;
    ev->next_id = ev->first_id;
    if (!(ev->ring = calloc(ev->cfg.history, sizeof *ev->ring))) {
        free(ev);
        return err_fail(ENOMEM, "out of memory");
    }
    pthread_mutex_init(&ev->lock, NULL);
    pthread_cond_init(&ev->tick, NULL);
    int e = pthread_create(&ev->ticker, NULL, ticker, ev);
    if (e) {
        pthread_cond_destroy(&ev->tick);
        pthread_mutex_destroy(&ev->lock);
        free(ev->ring);
        free(ev);
        return err_fail(e, "starting the events thread: %s", strerror(e));
    }
    *out = ev;
    return 0;
}

void events_close(struct events *ev)
{
    pthread_mutex_lock(&ev->lock);
    ev->closed = true;
    wake_sleepers(ev);
    pthread_cond_broadcast(&ev->tick);
    pthread_mutex_unlock(&ev->lock);
}

void events_free(struct events *ev)
{
    if (!ev)
        return;
    events_close(ev);
    pthread_join(ev->ticker, NULL);
    while (ev->count)
        drop_oldest(ev);
    free(ev->ring);
    pthread_cond_destroy(&ev->tick);
    pthread_mutex_destroy(&ev->lock);
    free(ev);
}

/* ---- listeners ---- */

int events_listen(struct events *ev, const uint64_t *after, void (*wake)(void *opaque), void *opaque,
                  struct events_listener **out)
{
    struct events_listener *l = calloc(1, sizeof *l);
    if (!l)
        return err_fail(ENOMEM, "out of memory");
    l->ev = ev;
    l->wake = wake;
    l->opaque = opaque;
    int ret = 0;
    pthread_mutex_lock(&ev->lock);
    if (ev->closed)
        ret = err_fail(EPIPE, "qcowd is stopping");
    else if (ev->nlisteners >= ev->cfg.max_listeners)
        ret = err_fail(EAGAIN, "too many event listeners: --max-listeners is %u", ev->cfg.max_listeners);
    if (ret == 0) {
        l->cursor = ev->next_id;
        if (after && *after >= ev->first_id - 1 && *after < ev->next_id) {
            l->cursor = *after + 1; /* events_next reports what left the history */
        } else if (after) {
            /* not an id of this run: whatever came before is unknown */
            l->cursor = oldest_id(ev);
            l->lost = EVENTS_LOST_UNKNOWN;
        }
        l->next = ev->list;
        ev->list = l;
        ev->nlisteners++;
    }
    pthread_mutex_unlock(&ev->lock);
    if (ret < 0) {
        free(l);
        return ret;
    }
    *out = l;
    return 0;
}

int events_next(struct events_listener *l, const struct event **evp, uint64_t *lost, void (*sleep)(void *opaque))
{
    struct events *ev = l->ev;
    int ret;
    pthread_mutex_lock(&ev->lock);
    uint64_t oldest = oldest_id(ev);
    if (l->cursor < oldest) { /* fell out of the history before it was read */
        if (l->lost != EVENTS_LOST_UNKNOWN)
            l->lost += oldest - l->cursor;
        l->cursor = oldest;
    }
    if (l->lost) {
        *lost = l->lost;
        l->lost = 0;
        ret = EVENTS_LOST;
    } else if (l->cursor < ev->next_id) {
        struct slot *s = ev->ring[(ev->head + (unsigned)(l->cursor - oldest)) % ev->cfg.history];
        atomic_fetch_add(&s->refs, 1);
        *evp = &s->ev;
        l->cursor++;
        ret = EVENTS_EVENT;
    } else if (ev->closed) {
        ret = -EPIPE;
    } else if (l->keepalive) {
        ret = EVENTS_KEEPALIVE;
    } else {
        if (sleep) {
            l->sleeping = true;
            sleep(l->opaque);
        }
        ret = EVENTS_SLEPT;
    }
    if (ret > 0)
        l->keepalive = false;
    pthread_mutex_unlock(&ev->lock);
    return ret;
}

void events_unlisten(struct events_listener *l)
{
    if (!l)
        return;
    struct events *ev = l->ev;
    pthread_mutex_lock(&ev->lock);
    for (struct events_listener **p = &ev->list; *p; p = &(*p)->next)
        if (*p == l) {
            *p = l->next;
            ev->nlisteners--;
            break;
        }
    pthread_mutex_unlock(&ev->lock);
    free(l);
}

unsigned events_listeners(struct events *ev)
{
    pthread_mutex_lock(&ev->lock);
    unsigned n = ev->nlisteners;
    pthread_mutex_unlock(&ev->lock);
    return n;
}

uint64_t events_next_id(struct events *ev)
{
    pthread_mutex_lock(&ev->lock);
    uint64_t id = ev->next_id;
    pthread_mutex_unlock(&ev->lock);
    return id;
}

void events_image_event(void *bus, const char *what, const char *name)
{
    events_publish_image(bus, what, name);
}

void events_job_event(void *bus, const char *event, const struct job_info *job)
{
    events_publish_job(bus, event, job);
}
