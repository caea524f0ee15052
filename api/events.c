/* events.c: GET /v1/events, a Server-Sent Events stream of the bus. A listener
 * with nothing to read suspends its connection (no server thread waits for it)
 * and the bus resumes it when an event or a keepalive arrives. */
#include <errno.h>
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
    size_t hello_pos; /* bytes of the greeting sent */
    struct api_guard *guard;
    char addr[64]; /* the client's address, counted in guard's listeners */
};

static const char hello[] = "retry: 2000\n: qcowd events\n\n";

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

static ssize_t sse_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct sse *s = cls;
    if (s->hello_pos < sizeof hello - 1) {
        size_t k = sizeof hello - 1 - s->hello_pos < max ? sizeof hello - 1 - s->hello_pos : max;
        memcpy(buf, hello + s->hello_pos, k);
        s->hello_pos += k;
        return (ssize_t)k;
    }
    ssize_t n = events_read(s->l, buf, max, sse_sleep);
    if (n < 0)
        return MHD_CONTENT_READER_END_OF_STREAM;
    s->r->bytes += (uint64_t)n;
    return n; /* 0: suspended until the bus has something */
}

static void sse_free(void *cls)
{
    struct sse *s = cls;
    events_unlisten(s->l);
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
    struct sse *s = calloc(1, sizeof *s);
    if (!s)
        return MHD_NO;
    s->conn = r->conn;
    s->r = r;
    s->guard = r->guard;
    snprintf(s->addr, sizeof s->addr, "%s", api_guard_addr(r->gc));
    int ret = api_guard_listen(s->guard, s->addr);
    if (ret < 0) {
        free(s);
        return api_reply_status(r, 503, "unavailable", err_msg(ret), MHD_HTTP_HEADER_RETRY_AFTER, "5");
    }
    ret = events_listen(r->events, sse_wake, s, &s->l);
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
