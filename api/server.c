/* server.c: the libmicrohttpd server: start/quiesce/stop, dispatch through the
 * route table (route.c), the per-request state, request bodies and the log. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "api.h"
#include "api_int.h"
#include "err.h"
#include "events.h"
#include "tls.h"

struct api_server {
    struct MHD_Daemon *daemon;
    struct catalog *cat;
    struct api_metrics metrics; /* also holds the in-flight count */
    unsigned threads;
    bool no_sendfile;
    int log;
    char addr[80]; /* "host:port" as bound */
    struct jobs *jobs;
    struct events *events;
    struct api_guard *guard;                  /* the watchdog of slow clients, per-address counts */
    unsigned max_connections, max_per_client; /* as given to MHD */
    pthread_mutex_t off_lock;                 /* guards offloads, waits and stopping */
    pthread_cond_t off_done;                  /* an offloaded work ended */
    unsigned offloads;                        /* api_offload threads running */
    struct body_wait *waits;                  /* bodies that may sleep (body_hold) */
    bool stopping;                            /* quiesced: no body sleeps any more */
    struct api_access_cfg acc;                /* who may do what */
};

static enum MHD_Result dispatch(struct req *r, const char *url)
{
    struct api_routing rt;
    enum MHD_Result res;
    bool routed = api_route(r->method, url, &rt) == 0;
    if (!api_admit(r, url, &rt, routed, &res))
        ; /* refused, or a preflight answered */
    else if (routed)
        res = rt.fn(r, rt.args);
    else
        res = api_reply_status(r, rt.status, rt.code, rt.msg, rt.status == 405 ? MHD_HTTP_HEADER_ALLOW : NULL,
                               rt.status == 405 ? rt.allow : NULL);
    api_routing_free(&rt);
    return res;
}

/* ---- work off the server threads ---- */

struct api_offload {
    atomic_int refs; /* the thread and the request */
    struct api_server *srv;
    struct MHD_Connection *conn;
    void (*work)(void *ctx);
    enum MHD_Result (*then)(struct req *r, void *ctx);
    void *ctx;
    void (*free_ctx)(void *ctx);
};

static void offload_put(struct api_offload *o)
{
    if (o && atomic_fetch_sub(&o->refs, 1) == 1) {
        o->free_ctx(o->ctx);
        free(o);
    }
}

static void *offload_main(void *p)
{
    struct api_offload *o = p;
    struct api_server *s = o->srv;
    o->work(o->ctx);
    MHD_resume_connection(o->conn); /* MHD calls on_request again: then answers */
    offload_put(o);
    pthread_mutex_lock(&s->off_lock);
    s->offloads--;
    pthread_cond_broadcast(&s->off_done);
    pthread_mutex_unlock(&s->off_lock);
    return NULL;
}

enum MHD_Result api_offload(struct req *r, void (*work)(void *ctx), enum MHD_Result (*then)(struct req *r, void *ctx),
                            void *ctx, void (*free_ctx)(void *ctx))
{
    struct api_server *s = r->srv;
    struct api_offload *o = calloc(1, sizeof *o);
    if (!o) {
        free_ctx(ctx);
        return MHD_NO;
    }
    *o = (struct api_offload){.srv = s, .conn = r->conn, .work = work, .then = then, .ctx = ctx, .free_ctx = free_ctx};
    atomic_init(&o->refs, 2);
    r->off = o;
    pthread_mutex_lock(&s->off_lock);
    s->offloads++;
    pthread_mutex_unlock(&s->off_lock);
    MHD_suspend_connection(r->conn);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int e = pthread_create(&(pthread_t){0}, &attr, offload_main, o);
    pthread_attr_destroy(&attr);
    if (e) { /* no thread: the work runs here after all */
        MHD_resume_connection(r->conn);
        pthread_mutex_lock(&s->off_lock);
        s->offloads--;
        pthread_mutex_unlock(&s->off_lock);
        atomic_fetch_sub(&o->refs, 1);
        work(ctx);
    }
    return MHD_YES;
}

/* ---- bodies held back by their store ---- */

/* A body whose store holds writes back (api_body .ready) sleeps with its
 * connection suspended rather than on the thread, which serves the other
 * connections meanwhile. Suspend comes first and resume after it under
 * lock: a wake that comes before the suspend is seen (woken) and the bytes
 * go at once; MHD would otherwise turn that suspend into nothing and the
 * kept bytes would wait for the next socket event. */
struct body_wait {
    atomic_int refs; /* the request's, and one per armed wake */
    pthread_mutex_t lock;
    struct MHD_Connection *conn;
    bool woken;                    /* the wake armed last came */
    bool suspended;                /* conn sleeps: the first to resume it clears this */
    bool gone;                     /* the request ended: conn is not touched any more */
    bool cut;                      /* the watchdog cut the connection while it slept */
    struct body_wait *prev, *next; /* on srv->waits (under off_lock) */
};

static void wait_put(struct body_wait *w)
{
    if (atomic_fetch_sub(&w->refs, 1) == 1) {
        pthread_mutex_destroy(&w->lock);
        free(w);
    }
}

/* Resume w's connection if it sleeps, after setting *mark (when given),
 * both under w->lock. */
static void wait_resume(struct body_wait *w, bool *mark)
{
    pthread_mutex_lock(&w->lock);
    if (mark)
        *mark = true;
    if (w->suspended && !w->gone) {
        w->suspended = false;
        MHD_resume_connection(w->conn); /* MHD hands the kept bytes again */
    }
    pthread_mutex_unlock(&w->lock);
}

/* The store has room: any thread, exactly once per armed wait. */
static void body_wake(void *ctx)
{
    struct body_wait *w = ctx;
    wait_resume(w, &w->woken);
    wait_put(w);
}

/* The watchdog cut the connection (too slow, however it came to be): woken
 * so that MHD closes it. */
static void body_kick(void *ctx)
{
    struct body_wait *w = ctx;
    wait_resume(w, &w->cut);
}

/* Every sleeping body of s resumed, and none sleeps from now on: MHD stops
 * only without suspended connections, and a body held back by its store is
 * refused (503) rather than drained at the store's pace (one the store takes
 * goes on as before). */
static void wake_all(struct api_server *s)
{
    pthread_mutex_lock(&s->off_lock);
    s->stopping = true;
    for (struct body_wait *w = s->waits; w; w = w->next)
        wait_resume(w, NULL);
    pthread_mutex_unlock(&s->off_lock);
}

enum hold { HOLD_GO, HOLD_SLEEP, HOLD_CUT, HOLD_STOP };

/* Before a body's bytes go to body->data: HOLD_GO, or HOLD_SLEEP with the
 * connection suspended (the bytes stay with MHD), HOLD_CUT when the watchdog
 * cut it, HOLD_STOP when it would sleep but the server stops. */
static enum hold body_hold(struct req *r)
{
    struct api_server *s = r->srv;
    struct body_wait *w = r->wait;
    if (!r->body->ready)
        return HOLD_GO;
    if (!w) {
        if (!(w = calloc(1, sizeof *w)))
            return HOLD_GO; /* the write then waits (briefly) in the store */
        atomic_init(&w->refs, 1);
        pthread_mutex_init(&w->lock, NULL);
        w->conn = r->conn;
        pthread_mutex_lock(&s->off_lock);
        w->next = s->waits;
        if (s->waits)
            s->waits->prev = w;
        s->waits = w;
        pthread_mutex_unlock(&s->off_lock);
        r->wait = w;
        api_guard_kick(r->gc, body_kick, w);
    }
    pthread_mutex_lock(&w->lock);
    bool cut = w->cut;
    w->woken = false;
    pthread_mutex_unlock(&w->lock);
    if (cut)
        return HOLD_CUT;
    atomic_fetch_add(&w->refs, 1); /* the wake's */
    int ready = r->body->ready(r, body_wake, w);
    if (ready != 0) { /* room, or a failure the write reports */
        wait_put(w);
        err_clear();
        return HOLD_GO;
    }
    pthread_mutex_lock(&s->off_lock);
    bool stopping = s->stopping;
    pthread_mutex_unlock(&s->off_lock);
    if (stopping) /* the wake armed finds nothing asleep */
        return HOLD_STOP;
    pthread_mutex_lock(&w->lock);
    bool woken = w->woken;
    if (!woken) {
        MHD_suspend_connection(r->conn);
        w->suspended = true;
    }
    pthread_mutex_unlock(&w->lock);
    if (woken)
        return HOLD_GO;
    pthread_mutex_lock(&s->off_lock); /* a stop that swept before the suspend: resumed here */
    if (s->stopping)
        wait_resume(w, NULL);
    pthread_mutex_unlock(&s->off_lock);
    return HOLD_SLEEP;
}

/* The request is over: nothing touches its connection from now on. */
static void body_wait_end(struct req *r)
{
    struct body_wait *w = r->wait;
    struct api_server *s = r->srv;
    if (!w)
        return;
    api_guard_kick(r->gc, NULL, NULL);
    pthread_mutex_lock(&s->off_lock);
    if (w->prev)
        w->prev->next = w->next;
    else
        s->waits = w->next;
    if (w->next)
        w->next->prev = w->prev;
    pthread_mutex_unlock(&s->off_lock);
    pthread_mutex_lock(&w->lock);
    w->gone = true;
    pthread_mutex_unlock(&w->lock);
    r->wait = NULL;
    wait_put(w);
}

/* ---- MHD callbacks ---- */

/* A refusal on a body's first bytes (not qcow2, over a budget): answered now,
 * not after the whole body. MHD 0.9.75 takes no response in the middle of a
 * body, so the JSON error is written to the socket (MHD writes nothing there
 * while a body comes in) and the connection closed. */
static enum MHD_Result refuse_now(struct req *r)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    int err = r->body_err;
    unsigned status = api_errno_status(err);
    json_t *e = json_pack("{s:{s:s,s:o}}", "error", "code", api_errno_code(err), "message",
                          api_jstr(r->body_msg ? r->body_msg : err_msg(err)));
    char *body = e ? json_dumps(e, JSON_COMPACT) : NULL;
    json_decref(e);
    char *msg = NULL;
    int n = body && ci ? asprintf(&msg,
                                  "HTTP/1.1 %u %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                  "Content-Length: %zu\r\n\r\n%s\n",
                                  status, MHD_get_reason_phrase_for(status), strlen(body) + 1, body)
                       : -1;
    if (n > 0) {
        (void)!send(ci->connect_fd, msg, (size_t)n, MSG_NOSIGNAL);
        shutdown(ci->connect_fd, SHUT_WR);
    }
    free(msg);
    free(body);
    r->status = status;
    r->answered = true;
    return MHD_NO;
}

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode code)
{
    struct api_server *s = cls;
    if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        api_guard_close(*socket_context);
        *socket_context = NULL;
        return;
    }
    const union MHD_ConnectionInfo *fd = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    const union MHD_ConnectionInfo *sa = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    *socket_context = fd ? api_guard_open(s->guard, fd->connect_fd, sa ? sa->client_addr : NULL) : NULL;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
    struct api_server *s = cls;
    struct req *r = *con_cls;
    if (r && r->off && !r->answered) { /* back from api_offload */
        err_clear();
        return r->off->then(r, r->off->ctx);
    }
    if (r && r->deferred) {
        if (*upload_data_size) { /* a body nobody asked for */
            *upload_data_size = 0;
            return MHD_YES;
        }
        r->deferred = false;
        err_clear();
        return dispatch(r, url);
    }
    if (r) {
        if (r->answered || !r->body) {
            /* answered on the headers (an error): drop what comes */
            *upload_data_size = 0;
            return r->answered ? MHD_YES : MHD_NO;
        }
        size_t n = *upload_data_size;
        if (n) {
            enum hold h = r->body_err ? HOLD_GO : body_hold(r);
            if (h == HOLD_SLEEP)
                return MHD_YES; /* the bytes stay unconsumed: handed again on resume */
            if (h == HOLD_CUT)
                return MHD_NO; /* the watchdog answered and shut it */
            if (h == HOLD_STOP) {
                r->body_err = err_fail(EAGAIN, "the server is stopping: send the request again once it is back");
                r->body_msg = strdup(err_msg(r->body_err));
                r->body_now = true;
            }
            if (!r->body_err) {
                err_clear();
                int ret = r->body->data(r, upload_data, n);
                if (ret < 0) {
                    r->body_err = ret;
                    r->body_msg = strdup(err_msg(ret));
                }
            }
            r->bytes_in += n;
            api_guard_bytes(r->gc, n);
            *upload_data_size = 0;
            if (r->body_err && r->body_now) /* refused on its first bytes: answer before the rest */
                return refuse_now(r);
            return MHD_YES;
        }
        api_guard_phase(r->gc, GUARD_BUSY);
        err_clear();
        if (r->body_err)
            return api_reply_error(r, r->body_err, r->body_msg ? r->body_msg : err_msg(r->body_err));
        return r->body->end(r);
    }
    r = calloc(1, sizeof *r);
    if (!r)
        return MHD_NO;
    clock_gettime(CLOCK_MONOTONIC, &r->t0);
    r->srv = s;
    r->cat = s->cat;
    r->conn = conn;
    r->metrics = &s->metrics;
    r->threads = s->threads;
    r->no_sendfile = s->no_sendfile;
    r->jobs = s->jobs;
    r->events = s->events;
    r->guard = s->guard;
    r->acc = &s->acc;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    r->gc = ci ? ci->socket_context : NULL;
    api_guard_phase(r->gc, GUARD_BUSY);
    snprintf(r->method, sizeof r->method, "%s", method);
    r->head = !strcmp(method, "HEAD");
    r->path = strdup(url);
    *con_cls = r;
    atomic_fetch_add(&s->metrics.inflight, 1);
    if (!r->path)
        return MHD_NO;
    if (strcmp(method, "PUT") && strcmp(method, "POST") && strcmp(method, "PATCH")) {
        /* answered on the next call, once MHD has the whole request: libmicrohttpd
         * 0.9.75 closes the connection after a response queued on the first
         * call, which would cost every read a new TCP connection. Methods with a
         * body keep answering on the headers, so an error comes before the body
         * is sent (the connection closes then, as it must). */
        r->deferred = true;
        return MHD_YES;
    }
    err_clear();
    enum MHD_Result res = dispatch(r, url);
    if (r->body && !r->answered)
        api_guard_phase(r->gc, GUARD_BODY);
    return res;
}

/* The path for the log: printable ASCII kept, the rest as \xNN, bounded. */
static void log_path(const char *p, char *out, size_t cap)
{
    size_t o = 0;
    for (; p && *p && o + 5 < cap; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch >= 0x20 && ch < 0x7f && ch != '\\')
            out[o++] = (char)ch;
        else
            o += (size_t)snprintf(out + o, cap - o, "\\x%02x", ch);
    }
    out[o] = '\0';
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe)
{
    struct api_server *s = cls;
    struct req *r = *con_cls;
    if (!r)
        return;
    bool ok = toe == MHD_REQUEST_TERMINATED_COMPLETED_OK;
    /* an upload cut short is settled before the log line; its wait ends
     * first (closing the upload wakes it) */
    body_wait_end(r);
    if (r->body)
        r->body->done(r, r->answered);
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - r->t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - r->t0.tv_nsec) / 1e6;
    api_metrics_record(&s->metrics, r->method, r->status, r->bytes_in, r->bytes, ms / 1e3);
    bool change = strcmp(r->method, "GET") && strcmp(r->method, "HEAD") && strcmp(r->method, "OPTIONS");
    if (s->log || change) {
        char path[512], method[sizeof r->method * 4];
        log_path(r->path, path, sizeof path);
        log_path(r->method, method, sizeof method); /* MHD passes any token as the method */
        if (s->log)
            fprintf(stderr, "qcowd: %s %s %u %llu %.2fms%s\n", method, path, r->status,
                    (unsigned long long)(r->bytes + r->bytes_in), ms, ok ? "" : " (aborted)");
        /* the audit trail: every request that may change state, with who sent it
         * (a token's name, never the token), also with --quiet */
        if (change)
            fprintf(stderr, "qcowd: audit: %s %s %s %u%s\n", r->who[0] ? r->who : "(unauthenticated)", method, path,
                    r->status, ok ? "" : " (aborted)");
    }
    if (r->done)
        r->done(r->done_ctx);
    offload_put(r->off);
    api_guard_phase(r->gc, GUARD_HEADERS); /* the next request on the connection */
    free(r->body_msg);
    free(r->path);
    free(r);
    *con_cls = NULL;
    atomic_fetch_sub(&s->metrics.inflight, 1);
}

/* Keep %XX escapes: the router decodes each segment itself, so an encoded '/'
 * stays inside a name (and fails its validation) instead of becoming a separator. */
static size_t no_unescape(void *cls, struct MHD_Connection *c, char *s)
{
    return strlen(s);
}

/* ---- lifecycle ---- */

static int parse_listen(const char *listen, struct addrinfo **res)
{
    char host[256];
    const char *colon = strrchr(listen, ':');
    if (!colon || colon == listen)
        return err_fail(EINVAL, "--listen %s: expected HOST:PORT", listen);
    size_t hl = (size_t)(colon - listen);
    const char *h = listen;
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl >= sizeof host)
        return err_fail(EINVAL, "--listen %s: host too long", listen);
    memcpy(host, h, hl);
    host[hl] = '\0';
    const char *port = colon + 1;
    char *end;
    long pn = strtol(port, &end, 10);
    if (!*port || *end || pn < 0 || pn > 65535)
        return err_fail(EINVAL, "--listen %s: bad port '%s'", listen, port);
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    int e = getaddrinfo(host, port, &hints, res);
    if (e)
        return err_fail(EINVAL, "--listen %s: %s", listen, gai_strerror(e));
    return 0;
}

/* The connection budgets: the total stays below the open-file limit (less a
 * reserve for images and plugins), or accept() would fail for everyone at
 * once; one address gets at most max_per_client of them, so a flood from one
 * address (MHD accepts and closes what is over) leaves room for the others. */
static void size_limits(const struct api_config *cfg, struct api_server *s)
{
    struct rlimit rl;
    uint64_t fds = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY ? rl.rlim_cur : 1u << 20;
    uint64_t cap = fds > 2 * API_FD_RESERVE ? fds - API_FD_RESERVE : fds / 2;
    s->max_connections = cfg->max_connections ? cfg->max_connections : API_DEFAULT_CONNECTIONS;
    if (s->max_connections > cap) {
        if (cfg->max_connections)
            fprintf(stderr, "qcowd: --max-connections %u lowered to %llu: the open-file limit is %llu\n",
                    cfg->max_connections, (unsigned long long)cap, (unsigned long long)fds);
        s->max_connections = (unsigned)cap;
    }
    s->max_per_client = cfg->max_per_client ? cfg->max_per_client : API_DEFAULT_PER_CLIENT;
    if (s->max_per_client > s->max_connections)
        s->max_per_client = s->max_connections;
}

/* libmicrohttpd's messages; "connection limit" ones (a flood) once a minute at most. */
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    static _Atomic long long last;
    struct api_server *s = cls;
    if (strstr(fmt, "connection limit")) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        long long prev = atomic_load(&last);
        if ((prev && ts.tv_sec - prev < 60) || !atomic_compare_exchange_strong(&last, &prev, (long long)ts.tv_sec))
            return;
        fprintf(stderr,
                "qcowd: connections refused: over --max-connections (%u) or --max-connections-per-client "
                "(%u); this is said once a minute\n",
                s->max_connections, s->max_per_client);
        return;
    }
    if (strstr(fmt, "Application reported internal error"))
        return; /* our MHD_NO: a refusal already answered (refuse_now) or logged */
    fputs("qcowd: libmicrohttpd: ", stderr);
    vfprintf(stderr, fmt, ap);
}

int api_server_start(const struct api_config *cfg, struct catalog *cat, struct api_server **out)
{
    struct addrinfo *ai = NULL;
    int ret = cfg->listen ? parse_listen(cfg->listen, &ai) : 0;
    if (ret < 0)
        return ret;
    struct api_server *s = calloc(1, sizeof *s);
    if (!s) {
        if (ai)
            freeaddrinfo(ai);
        return err_fail(ENOMEM, "out of memory");
    }
    s->cat = cat;
    s->log = cfg->log;
    s->threads = cfg->threads ? cfg->threads : 1;
    s->no_sendfile = cfg->no_sendfile;
    s->jobs = cfg->jobs;
    s->events = cfg->events;
    s->acc = cfg->access;
    pthread_mutex_init(&s->off_lock, NULL);
    pthread_cond_init(&s->off_done, NULL);
    size_limits(cfg, s);
    ret = api_guard_new(cfg, &s->guard);
    if (ret < 0) {
        freeaddrinfo(ai);
        free(s);
        return ret;
    }
    /* poll, not epoll: with epoll, libmicrohttpd 0.9.75 notices a client that
     * closes in the middle of a request body only at the idle timeout, which
     * would hold the image's writer reference (and delay the abort) for a minute. */
    unsigned flags = MHD_USE_POLL_INTERNAL_THREAD | MHD_USE_ITC | (cfg->quiet ? 0 : MHD_USE_ERROR_LOG);
    flags |= MHD_ALLOW_SUSPEND_RESUME; /* event streams sleep suspended (api/events.c) */
    /* TLS: the certificate comes from a callback, so SIGHUP's reload reaches new
     * handshakes; a client CA makes libmicrohttpd ask for client certificates,
     * which api_admit verifies against the current CA */
    struct MHD_OptionItem tls_opts[4] = {{MHD_OPTION_END, 0, NULL}};
    if (s->acc.tls) {
        const char *ca = api_tls_client_ca_pem(s->acc.tls);
        unsigned n = 0;
        flags |= MHD_USE_TLS;
        tls_opts[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_CERT_CALLBACK, 0, (void *)api_tls_cert_callback};
        tls_opts[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_PRIORITIES, 0, (void *)API_TLS_PRIORITIES};
        if (ca)
            tls_opts[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_TRUST, 0, (void *)ca};
        tls_opts[n] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    }
    if (!ai) /* connections come from api_server_add_connection only */
        flags |= MHD_USE_NO_LISTEN_SOCKET;
    else if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    s->daemon = MHD_start_daemon(
        flags, 0, NULL, NULL, on_request, s, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, s, MHD_OPTION_SOCK_ADDR, ai ? ai->ai_addr : NULL,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned)(cfg->threads ? cfg->threads : 1), MHD_OPTION_NOTIFY_COMPLETED,
        on_completed, s, MHD_OPTION_NOTIFY_CONNECTION, on_connection, s, MHD_OPTION_UNESCAPE_CALLBACK, no_unescape,
        NULL, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)(cfg->timeout_sec ? cfg->timeout_sec : 60),
        MHD_OPTION_CONNECTION_LIMIT, s->max_connections, MHD_OPTION_PER_IP_CONNECTION_LIMIT, s->max_per_client,
        MHD_OPTION_ARRAY, tls_opts, MHD_OPTION_END);
    if (ai)
        freeaddrinfo(ai);
    if (!s->daemon) {
        api_guard_free(s->guard);
        free(s);
        return err_fail(EADDRNOTAVAIL, "cannot listen on %s (in use, or not an address of this machine?)",
                        cfg->listen ? cfg->listen : "no address");
    }
    if (!cfg->listen) {
        snprintf(s->addr, sizeof s->addr, "(no listen socket)");
        *out = s;
        return 0;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_LISTEN_FD);
    struct sockaddr_storage ss = {0};
    socklen_t sl = sizeof ss;
    char host[64] = "?";
    unsigned port = 0;
    if (di && getsockname(di->listen_fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
            inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
            port = ntohs(a->sin6_port);
        } else {
            struct sockaddr_in *a = (struct sockaddr_in *)&ss;
            inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
            port = ntohs(a->sin_port);
        }
    }
    snprintf(s->addr, sizeof s->addr, ss.ss_family == AF_INET6 ? "[%s]:%u" : "%s:%u", host, port);
    *out = s;
    return 0;
}

int api_server_add_connection(struct api_server *s, int fd)
{
    struct sockaddr_in peer = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (MHD_add_connection(s->daemon, fd, (const struct sockaddr *)&peer, sizeof peer) != MHD_YES)
        return err_fail(EIO, "the server does not take the connection");
    return 0;
}

const char *api_server_address(const struct api_server *s)
{
    return s->addr;
}

void api_server_quiesce(struct api_server *s)
{
    /* a body held back by its store is refused, not drained at its pace */
    wake_all(s);
    if (s->events) /* end the event streams, or the drain would wait for them */
        events_close(s->events);
    MHD_socket fd = MHD_quiesce_daemon(s->daemon);
    if (fd != MHD_INVALID_SOCKET)
        close(fd);
}

int api_server_drain(struct api_server *s, unsigned timeout_ms)
{
    for (unsigned waited = 0;; waited += 10) {
        unsigned n = atomic_load(&s->metrics.inflight);
        if (n == 0)
            return 0;
        if (waited >= timeout_ms)
            return err_fail(ETIMEDOUT, "%u requests still in flight after %u ms", n, timeout_ms);
        usleep(10 * 1000);
    }
}

void api_server_stop(struct api_server *s)
{
    if (!s)
        return;
    /* offloaded work resumes its connection at the end: MHD must be there */
    pthread_mutex_lock(&s->off_lock);
    while (s->offloads)
        pthread_cond_wait(&s->off_done, &s->off_lock);
    pthread_mutex_unlock(&s->off_lock);
    wake_all(s); /* MHD stops only without suspended connections */
    MHD_stop_daemon(s->daemon);
    api_guard_free(s->guard);
    pthread_cond_destroy(&s->off_done);
    pthread_mutex_destroy(&s->off_lock);
    free(s);
}
