/* events.c: GET /v1/events, the bus's typed events framed as Server-Sent Events,
 * replayed from Last-Event-ID; a listener with nothing to read suspends its
 * connection (no server thread waits) until the bus resumes it. */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_int.h"
#include "err.h"
#include "events.h"

#define SSE_BLOCK 16384

struct sse {
    struct MHD_Connection *conn;
    struct events_listener *l;
    struct req *r;
    char *frame;     /* the frame being sent (malloc'ed, or the greeting) */
    size_t len, pos; /* its bytes, and those sent */
    bool own;        /* frame is malloc'ed */
    struct api_guard *guard;
    char addr[64]; /* the client's address, counted in guard's listeners */
};

static const char hello[] = "retry: 2000\n: qcowd events\n\n";
static const char keepalive[] = ": keepalive\n\n";

static void sse_wake(void *opaque)
{
    struct sse *s = opaque;
    MHD_resume_connection(s->conn);
}

static void sse_sleep(void *opaque)
{
    struct sse *s = opaque;
    MHD_suspend_connection(s->conn);
}

/* The data of an event: image events {"name": NAME}, job events the job object. */
static json_t *event_data(const struct event *e, struct catalog *cat)
{
    if (e->kind == EVENT_JOB)
        return api_job_json(&e->job, cat);
    return json_pack("{s:o}", "name", api_jstr(e->image ? e->image : ""));
}

/* The SSE frame of an event: "event: TYPE\nid: ID\ndata: JSON\n\n" (JSON in one
 * line). NULL on ENOMEM. */
static char *frame_event(const struct event *e, struct catalog *cat, size_t *len)
{
    json_t *d = event_data(e, cat);
    char *js = d ? json_dumps(d, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(d);
    char *text = NULL;
    int n = js ? asprintf(&text, "event: %s\nid: %" PRIu64 "\ndata: %s\n\n", e->type, e->id, js) : -1;
    free(js);
    if (n < 0)
        return NULL;
    *len = (size_t)n;
    return text;
}

/* "event: lost" with the count of events missed (or "unknown"); no id, so the
 * client's Last-Event-ID stays the last event it had. */
static char *frame_lost(uint64_t lost, size_t *len)
{
    char *text = NULL;
    int n = lost == EVENTS_LOST_UNKNOWN ? asprintf(&text, "event: lost\ndata: {\"dropped\":\"unknown\"}\n\n")
                                        : asprintf(&text, "event: lost\ndata: {\"dropped\":%" PRIu64 "}\n\n", lost);
    if (n < 0)
        return NULL;
    *len = (size_t)n;
    return text;
}

static void set_frame(struct sse *s, char *frame, size_t len, bool own)
{
    if (s->own)
        free(s->frame);
    s->frame = frame;
    s->len = len;
    s->pos = 0;
    s->own = own;
}

/* The next frame into s: 1, 0 when there is none (the connection was
 * suspended if may_sleep), -1 at the end. */
static int next_frame(struct sse *s, bool may_sleep)
{
    const struct event *e = NULL;
    uint64_t lost = 0;
    size_t len = 0;
    char *f;
    switch (events_next(s->l, &e, &lost, may_sleep ? sse_sleep : NULL)) {
    case EVENTS_SLEPT:
        return 0;
    case EVENTS_EVENT:
        f = frame_event(e, s->r->cat, &len);
        events_put(e);
        if (!f) /* out of memory: the client learns it missed one */
            f = frame_lost(1, &len);
        break;
    case EVENTS_LOST:
        f = frame_lost(lost, &len);
        break;
    case EVENTS_KEEPALIVE:
        set_frame(s, (char *)keepalive, sizeof keepalive - 1, false);
        return 1;
    default:
        return -1;
    }
    if (!f)
        return -1;
    set_frame(s, f, len, true);
    return 1;
}

static ssize_t sse_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct sse *s = cls;
    size_t n = 0;
    while (n < max) {
        if (s->pos == s->len) {
            /* sleep only with nothing to send: else send what there is */
            int got = next_frame(s, n == 0);
            if (got == 0 && n == 0)
                return 0; /* suspended until the bus has something */
            if (got < 0 && n == 0)
                return MHD_CONTENT_READER_END_OF_STREAM;
            if (got <= 0)
                break;
            continue;
        }
        size_t k = s->len - s->pos < max - n ? s->len - s->pos : max - n;
        memcpy(buf + n, s->frame + s->pos, k);
        s->pos += k;
        n += k;
    }
    s->r->bytes += (uint64_t)n;
    return (ssize_t)n;
}

static void sse_free(void *cls)
{
    struct sse *s = cls;
    events_unlisten(s->l);
    set_frame(s, NULL, 0, false);
    api_guard_unlisten(s->guard, s->addr);
    free(s);
}

enum MHD_Result api_events(struct req *r, char **args)
{
    if (!r->events)
        return api_reply_status(r, 503, "unavailable", "events are not enabled", NULL, NULL);
    if (r->head) {
        struct MHD_Response *resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
        if (resp)
            MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        return api_queue(r, 200, resp);
    }
    /* a reconnecting client says the last event it had (browsers send
     * Last-Event-ID; a client that cannot set headers may say ?last-event-id=) */
    const char *last = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Last-Event-ID");
    if (!last)
        last = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "last-event-id");
    uint64_t after = 0;
    if (last && api_parse_u64_arg("Last-Event-ID", last, &after) < 0)
        return api_reply_errno(r, -EINVAL);
    struct sse *s = calloc(1, sizeof *s);
    if (!s)
        return MHD_NO;
    set_frame(s, (char *)hello, sizeof hello - 1, false);
    s->conn = r->conn;
    s->r = r;
    s->guard = r->guard;
    snprintf(s->addr, sizeof s->addr, "%s", api_guard_addr(r->gc));
    int ret = api_guard_listen(s->guard, s->addr);
    if (ret < 0) {
        free(s);
        return api_reply_status(r, 503, "unavailable", err_msg(ret), MHD_HTTP_HEADER_RETRY_AFTER, "5");
    }
    ret = events_listen(r->events, last ? &after : NULL, sse_wake, s, &s->l);
    if (ret < 0) {
        api_guard_unlisten(s->guard, s->addr);
        free(s);
        return api_reply_status(r, 503, "unavailable", err_msg(ret), MHD_HTTP_HEADER_RETRY_AFTER, "5");
    }
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, SSE_BLOCK, sse_read, s, sse_free);
    if (!resp) {
        sse_free(s);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    return api_queue(r, 200, resp);
}
