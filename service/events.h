/* events.h: the event bus behind GET /v1/events: publishers format an event once,
 * each listener has its own bounded queue, so a slow listener loses events (and
 * is told so) instead of slowing anyone down. */
#ifndef QCOWD_EVENTS_H
#define QCOWD_EVENTS_H

#include <jansson.h>
#include <stddef.h>
#include <sys/types.h>

struct events;          /* opaque: the bus */
struct events_listener; /* opaque: one listener and its queue */

#define EVENTS_DEFAULT_LISTENERS 32
#define EVENTS_QUEUE             1024 /* events a listener may fall behind before it loses some */
#define EVENTS_KEEPALIVE_SEC     5   /* a comment line this often, so dead clients are noticed */

/* A new bus for at most max_listeners (0: the default). Returns 0 or -errno. */
int events_new(unsigned max_listeners, struct events **out);
/* Close (see events_close) and free. Every listener must be gone. */
void events_free(struct events *ev);

/* Queue the Server-Sent Event "event: TYPE / id: N / data: JSON" for every
 * listener (data borrowed). A full queue drops the event and counts it. Thread-safe;
 * never blocks on a listener. */
void events_publish(struct events *ev, const char *type, json_t *data);

/* Add a listener. wake(opaque) is called (under the listener's lock, so it must
 * not call back into the bus) when something arrives for a listener that went to
 * sleep in events_read. Returns 0, or -EAGAIN when max_listeners are listening,
 * -EPIPE when the bus is closed. */
int events_listen(struct events *ev, void (*wake)(void *opaque), void *opaque, struct events_listener **out);
/* Copy up to cap bytes of what is queued into buf and return the count; when
 * nothing is queued, call sleep(opaque) under the listener's lock (the caller
 * suspends itself there; wake undoes it) and return 0; return -EPIPE once the bus
 * is closed and the queue drained. A "lost" event (data {"dropped": N}) comes
 * first after events were dropped. */
ssize_t events_read(struct events_listener *l, char *buf, size_t cap, void (*sleep)(void *opaque));
/* Remove and free the listener. */
void events_unlisten(struct events_listener *l);

/* Stop: listeners drain what they have and then read -EPIPE; sleeping ones are
 * woken. Idempotent. */
void events_close(struct events *ev);

/* Listeners now, and events published so far. */
unsigned events_listeners(struct events *ev);

/* Glue with the shapes of catalog_notify_fn and jobs_event_fn (opaque: the bus):
 * image events carry {"name": NAME}, job events the job object. */
void events_image_event(void *bus, const char *what, const char *name);
void events_job_event(void *bus, const char *event, json_t *job);

#endif
