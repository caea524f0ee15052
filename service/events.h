/* events.h: the event bus behind GET /v1/events: typed events (a kind, an id, a
 * payload) kept in one bounded history ring; each listener is a cursor into it, so
 * a reconnecting client replays what it missed and a slow one skips what fell out. */
#ifndef QCOWD_EVENTS_H
#define QCOWD_EVENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "jobs.h"

struct events;          /* opaque: the bus */
struct events_listener; /* opaque: one listener, a cursor into the history */

#define EVENTS_DEFAULT_LISTENERS     32
#define EVENTS_DEFAULT_HISTORY       4096        /* events kept for replay (--event-history) */
#define EVENTS_DEFAULT_HISTORY_BYTES (16u << 20) /* and their bytes at most (--event-history-bytes) */
#define EVENTS_KEEPALIVE_SEC         5           /* a keepalive this often, so dead clients are noticed */
/* Ids: the first of a run is (milliseconds since 1970 at its start) *
 * EVENTS_IDS_PER_MS + 1, then one more per event, so ids also grow across
 * restarts (while the clock does, and a run publishes fewer than that many
 * events per millisecond of its life) and an id of an earlier run is recognised.
 * They stay below 2^53, exact in JavaScript. */
#define EVENTS_IDS_PER_MS   1000ull
#define EVENTS_LOST_UNKNOWN UINT64_MAX /* a count of lost events that is not known */

enum event_kind { EVENT_IMAGE, EVENT_JOB };

/* One event as it happened, immutable once published. */
struct event {
    uint64_t id; /* strictly increasing for the bus's life */
    enum event_kind kind;
    const char *type;    /* "image-created", "job-status", ... */
    const char *image;   /* EVENT_IMAGE: the image's name */
    struct job_info job; /* EVENT_JOB: the job as it was then (a copy) */
};

struct events_config {
    unsigned max_listeners; /* 0: EVENTS_DEFAULT_LISTENERS */
    unsigned history;       /* events kept; 0: EVENTS_DEFAULT_HISTORY */
    size_t history_bytes;   /* their bytes (estimated) at most; 0: EVENTS_DEFAULT_HISTORY_BYTES */
    uint64_t first_id;      /* 0: from the clock, as above (tests set it) */
};

/* A new bus. Returns 0 with *out set, or -errno with err_msg(). */
int events_new(const struct events_config *cfg, struct events **out);
/* Close (see events_close) and free. Every listener must be gone. */
void events_free(struct events *ev);

/* Publish an event: it gets the next id, goes into the history (the oldest
 * events leave it when it is over either bound) and sleeping listeners are woken.
 * The payload is copied. Thread-safe, never blocks on a listener; events of one
 * publisher are in the order of the calls, so a publisher that calls under its
 * own lock orders its events as its changes. An event that cannot be stored (out
 * of memory) still uses its id, so listeners are told one was lost. */
void events_publish_image(struct events *ev, const char *type, const char *name);
void events_publish_job(struct events *ev, const char *type, const struct job_info *job);

/* Add a listener. after: the id of the last event the client saw (its
 * Last-Event-ID), or NULL for "from now on". Events after it that the history
 * still holds are replayed; missed ones it no longer holds are reported as lost
 * (with the count), and an id the bus never gave (an earlier run's) as lost with
 * EVENTS_LOST_UNKNOWN, followed by everything the history holds of this run.
 * wake(opaque) is called, under the bus's lock (so it must not call back into
 * the bus), when something arrives for a listener that went to sleep in
 * events_next. Returns 0, or -EAGAIN when max_listeners are listening, -EPIPE
 * when the bus is closed. */
int events_listen(struct events *ev, const uint64_t *after, void (*wake)(void *opaque), void *opaque,
                  struct events_listener **out);

enum events_item {
    EVENTS_SLEPT = 0, /* nothing now: sleep(opaque) was called, wake will follow */
    EVENTS_EVENT,     /* *evp is the next event: a reference, give it back with events_put */
    EVENTS_LOST,      /* *lost events were missed (EVENTS_LOST_UNKNOWN: how many is not known) */
    EVENTS_KEEPALIVE, /* nothing for a while: say something so a dead client is noticed */
};
/* The listener's next item (an enum events_item), or -EPIPE once the bus is
 * closed and the listener has read everything published before. A lost item
 * comes before the events after the gap. sleep(opaque) is called under the bus's
 * lock (the caller suspends itself there; wake undoes it); with sleep NULL,
 * EVENTS_SLEPT only says there is nothing now. */
int events_next(struct events_listener *l, const struct event **evp, uint64_t *lost, void (*sleep)(void *opaque));
void events_put(const struct event *e);
/* Remove and free the listener. */
void events_unlisten(struct events_listener *l);

/* Stop: listeners read what was published and then -EPIPE; sleeping ones are
 * woken. Idempotent. */
void events_close(struct events *ev);

/* Listeners now. */
unsigned events_listeners(struct events *ev);
/* The id the next event will get (the last one given is one less). */
uint64_t events_next_id(struct events *ev);

/* Glue with the shapes of catalog_notify_fn and jobs_event_fn (opaque: the bus). */
void events_image_event(void *bus, const char *what, const char *name);
void events_job_event(void *bus, const char *event, const struct job_info *job);

#endif
