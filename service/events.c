/* events.c: the event bus: one formatted text per event, shared by reference
 * among the listeners' bounded rings; a keepalive thread that also wakes
 * listeners, so a client that went away is noticed. */
#include "events.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "err.h"

/* One formatted event, shared by every queue holding it. */
struct msg {
    atomic_uint refs;
    size_t len;
    char text[];
};

struct events_listener {
    struct events *ev;
    pthread_mutex_t lock;
    struct msg *ring[EVENTS_QUEUE];
    unsigned head, count; /* ring[head] is the oldest */
    size_t pos;           /* bytes of ring[head] already read */
    uint64_t dropped;     /* since the last "lost" event */
    char lost[96];        /* a lost event being read */
    size_t lost_len, lost_pos;
    bool sleeping, closed;
    void (*wake)(void *);
    void *opaque;
    struct events_listener *next;
};

struct events {
    pthread_mutex_t lock; /* the list, count, seq, closed; before a listener's lock */
    struct events_listener *list;
    unsigned count, max;
    uint64_t seq;
    bool closed;
    pthread_t ticker;
    pthread_cond_t tick;
};

static void msg_put(struct msg *m)
{
    if (m && atomic_fetch_sub(&m->refs, 1) == 1)
        free(m);
}

static struct msg *msg_new(const char *text, size_t len)
{
    struct msg *m = malloc(sizeof *m + len + 1);
    if (!m)
        return NULL;
    atomic_init(&m->refs, 1);
    m->len = len;
    memcpy(m->text, text, len + 1);
    return m;
}

/* With ev->lock held: give m to every listener. */
static void deliver(struct events *ev, struct msg *m, bool droppable)
{
    for (struct events_listener *l = ev->list; l; l = l->next) {
        pthread_mutex_lock(&l->lock);
        if (l->count == EVENTS_QUEUE) {
            if (droppable)
                l->dropped++;
        } else {
            atomic_fetch_add(&m->refs, 1);
            l->ring[(l->head + l->count++) % EVENTS_QUEUE] = m;
        }
        if (l->sleeping) {
            l->sleeping = false;
            l->wake(l->opaque);
        }
        pthread_mutex_unlock(&l->lock);
    }
}

static void *ticker(void *arg)
{
    struct events *ev = arg;
    static const char ka[] = ": keepalive\n\n";
    pthread_mutex_lock(&ev->lock);
    while (!ev->closed) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_sec += EVENTS_KEEPALIVE_SEC;
        pthread_cond_timedwait(&ev->tick, &ev->lock, &t);
        if (ev->closed || !ev->list)
            continue;
        struct msg *m = msg_new(ka, sizeof ka - 1);
        if (m) {
            deliver(ev, m, false);
            msg_put(m);
        }
    }
    pthread_mutex_unlock(&ev->lock);
    return NULL;
}

int events_new(unsigned max_listeners, struct events **out)
{
    struct events *ev = calloc(1, sizeof *ev);
    if (!ev)
        return err_fail(ENOMEM, "out of memory");
    ev->max = max_listeners ? max_listeners : EVENTS_DEFAULT_LISTENERS;
    pthread_mutex_init(&ev->lock, NULL);
    pthread_cond_init(&ev->tick, NULL);
    int e = pthread_create(&ev->ticker, NULL, ticker, ev);
    if (e) {
        pthread_cond_destroy(&ev->tick);
        pthread_mutex_destroy(&ev->lock);
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
    for (struct events_listener *l = ev->list; l; l = l->next) {
        pthread_mutex_lock(&l->lock);
        l->closed = true;
        if (l->sleeping) {
            l->sleeping = false;
            l->wake(l->opaque);
        }
        pthread_mutex_unlock(&l->lock);
    }
    pthread_cond_broadcast(&ev->tick);
    pthread_mutex_unlock(&ev->lock);
}

void events_free(struct events *ev)
{
    if (!ev)
        return;
    events_close(ev);
    pthread_join(ev->ticker, NULL);
    pthread_cond_destroy(&ev->tick);
    pthread_mutex_destroy(&ev->lock);
    free(ev);
}

void events_publish(struct events *ev, const char *type, json_t *data)
{
    char *js = data ? json_dumps(data, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY) : strdup("{}");
    if (!js)
        return;
    pthread_mutex_lock(&ev->lock);
    if (!ev->closed && ev->list) {
        char *text = NULL;
        int n = asprintf(&text, "event: %s\nid: %" PRIu64 "\ndata: %s\n\n", type, ++ev->seq, js);
        struct msg *m = n >= 0 ? msg_new(text, (size_t)n) : NULL;
        free(text);
        if (m) {
            deliver(ev, m, true);
            msg_put(m);
        }
    } else {
        ev->seq++;
    }
    pthread_mutex_unlock(&ev->lock);
    free(js);
}

int events_listen(struct events *ev, void (*wake)(void *opaque), void *opaque, struct events_listener **out)
{
    struct events_listener *l = calloc(1, sizeof *l);
    if (!l)
        return err_fail(ENOMEM, "out of memory");
    l->ev = ev;
    l->wake = wake;
    l->opaque = opaque;
    pthread_mutex_init(&l->lock, NULL);
    int ret = 0;
    pthread_mutex_lock(&ev->lock);
    if (ev->closed)
        ret = err_fail(EPIPE, "qcowd is stopping");
    else if (ev->count >= ev->max)
        ret = err_fail(EAGAIN, "too many event listeners: --max-listeners is %u", ev->max);
    if (ret == 0) {
        l->next = ev->list;
        ev->list = l;
        ev->count++;
    }
    pthread_mutex_unlock(&ev->lock);
    if (ret < 0) {
        pthread_mutex_destroy(&l->lock);
        free(l);
        return ret;
    }
    *out = l;
    return 0;
}

ssize_t events_read(struct events_listener *l, char *buf, size_t cap, void (*sleep)(void *opaque))
{
    size_t n = 0;
    pthread_mutex_lock(&l->lock);
    while (n < cap) {
        if (l->lost_pos < l->lost_len) {
            size_t k = l->lost_len - l->lost_pos < cap - n ? l->lost_len - l->lost_pos : cap - n;
            memcpy(buf + n, l->lost + l->lost_pos, k);
            l->lost_pos += k;
            n += k;
            continue;
        }
        if (l->dropped && l->pos == 0) {
            l->lost_len = (size_t)snprintf(l->lost, sizeof l->lost, "event: lost\ndata: {\"dropped\":%" PRIu64 "}\n\n",
                                           l->dropped);
            l->lost_pos = 0;
            l->dropped = 0;
            continue;
        }
        if (!l->count)
            break;
        struct msg *m = l->ring[l->head];
        size_t k = m->len - l->pos < cap - n ? m->len - l->pos : cap - n;
        memcpy(buf + n, m->text + l->pos, k);
        l->pos += k;
        n += k;
        if (l->pos == m->len) {
            msg_put(m);
            l->head = (l->head + 1) % EVENTS_QUEUE;
            l->count--;
            l->pos = 0;
        }
    }
    ssize_t ret = (ssize_t)n;
    if (n == 0 && l->closed) {
        ret = -EPIPE;
    } else if (n == 0) {
        l->sleeping = true;
        sleep(l->opaque);
    }
    pthread_mutex_unlock(&l->lock);
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
            ev->count--;
            break;
        }
    pthread_mutex_unlock(&ev->lock);
    while (l->count) {
        msg_put(l->ring[l->head]);
        l->head = (l->head + 1) % EVENTS_QUEUE;
        l->count--;
    }
    pthread_mutex_destroy(&l->lock);
    free(l);
}

unsigned events_listeners(struct events *ev)
{
    pthread_mutex_lock(&ev->lock);
    unsigned n = ev->count;
    pthread_mutex_unlock(&ev->lock);
    return n;
}

void events_image_event(void *bus, const char *what, const char *name)
{
    json_t *o = json_pack("{s:s}", "name", name);
    events_publish(bus, what, o);
    json_decref(o);
}

void events_job_event(void *bus, const char *event, json_t *job)
{
    events_publish(bus, event, job);
}
