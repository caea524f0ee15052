/* guard.c: the server's budgets for slow and greedy clients: a watchdog thread that
 * cuts connections past the header deadline or below the minimum rate, and the
 * count of event listeners per client address. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "api.h"
#include "api_int.h"
#include "err.h"

#define GUARD_TICK_MS 200 /* how often the watchdog looks */

/* One connection, from MHD's "started" notification to its "closed" one. */
struct guard_conn {
    struct api_guard *g;
    struct guard_conn *prev, *next; /* on g->head (under g->lock) */
    int fd;                         /* the socket (MHD closes it after the "closed" notification) */
    char addr[INET6_ADDRSTRLEN];    /* the client's address, without the port */
    pthread_mutex_t lock;           /* guards the fields below */
    enum guard_phase phase;
    int64_t since_ms;        /* when the phase began */
    int64_t mark_ms;         /* start of the rate window */
    uint64_t mark_bytes;     /* bytes at its start */
    bool served;             /* a request was completed on it (keep-alive) */
    bool cut;                /* the watchdog shut it down */
    void (*kick)(void *ctx); /* called when it is cut (api_guard_kick) */
    void *kick_ctx;
    atomic_ullong bytes; /* body bytes moved in this phase */
};

/* Event listeners of one client address. */
struct addr_count {
    char addr[INET6_ADDRSTRLEN];
    unsigned n;
    struct addr_count *next;
};

struct api_guard {
    pthread_mutex_t lock; /* guards head and listeners; never held with a catalog lock */
    struct guard_conn *head;
    struct addr_count *listeners;
    unsigned header_ms, min_rate, listeners_per_client;
    int log;
    pthread_t thread;
    bool started;
    pthread_mutex_t stop_lock;
    pthread_cond_t stop_cond;
    bool stopping;
    atomic_ullong cut_headers, cut_slow; /* connections cut, for the log and metrics */
    atomic_uint open;                    /* connections open now */
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Best effort: a short JSON error written straight to the socket before it is
 * shut, while MHD is not writing to it (waiting for headers or a body). */
static void send_error(int fd, unsigned status, const char *reason, const char *code, const char *msg)
{
    char body[400], buf[700];
    int bl = snprintf(body, sizeof body, "{\"error\":{\"code\":\"%s\",\"message\":\"%s\"}}\n", code, msg);
    if (bl < 0 || (size_t)bl >= sizeof body)
        return;
    int n = snprintf(buf, sizeof buf,
                     "HTTP/1.1 %u %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     "Content-Length: %d\r\n\r\n%s",
                     status, reason, bl, body);
    if (n > 0 && (size_t)n < sizeof buf)
        (void)!send(fd, buf, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
}

/* With gc->lock held: whether gc is past its budget now; cuts it if so. */
static void judge(struct guard_conn *gc, int64_t now)
{
    struct api_guard *g = gc->g;
    if (gc->cut)
        return;
    char msg[200];
    if (gc->phase == GUARD_HEADERS) {
        if (now - gc->since_ms < (int64_t)g->header_ms)
            return;
        if (!gc->served) { /* nothing of ours is in flight: say why */
            snprintf(msg, sizeof msg, "the request headers did not arrive within --header-timeout (%u s)",
                     g->header_ms / 1000);
            send_error(gc->fd, 408, "Request Timeout", "request-timeout", msg);
        }
        atomic_fetch_add(&g->cut_headers, 1);
    } else if (gc->phase == GUARD_BODY || gc->phase == GUARD_SEND) {
        if (!g->min_rate || now - gc->mark_ms < (int64_t)g->header_ms)
            return;
        uint64_t b = atomic_load(&gc->bytes), want = (uint64_t)g->min_rate * (uint64_t)(now - gc->mark_ms) / 1000;
        if (b - gc->mark_bytes >= want) {
            gc->mark_ms = now;
            gc->mark_bytes = b;
            return;
        }
        if (gc->phase == GUARD_BODY) {
            snprintf(msg, sizeof msg,
                     "the request body came slower than --min-rate (%u bytes/s over --header-timeout, %u s)",
                     g->min_rate, g->header_ms / 1000);
            send_error(gc->fd, 408, "Request Timeout", "too-slow", msg);
        }
        atomic_fetch_add(&g->cut_slow, 1);
    } else {
        return;
    }
    gc->cut = true;
    if (g->log)
        fprintf(stderr, "qcowd: closed a connection from %s: %s\n", gc->addr,
                gc->phase == GUARD_HEADERS ? "request headers past --header-timeout"
                : gc->phase == GUARD_BODY  ? "request body below --min-rate"
                                           : "download below --min-rate (the client stopped reading)");
    shutdown(gc->fd, SHUT_RDWR); /* MHD sees the end and closes it */
    if (gc->kick)
        gc->kick(gc->kick_ctx); /* a connection asleep (suspended) is woken to see it */
}

static void *watchdog(void *arg)
{
    struct api_guard *g = arg;
    pthread_mutex_lock(&g->stop_lock);
    while (!g->stopping) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += GUARD_TICK_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&g->stop_cond, &g->stop_lock, &ts);
        if (g->stopping)
            break;
        pthread_mutex_unlock(&g->stop_lock);
        int64_t now = mono_ms();
        pthread_mutex_lock(&g->lock);
        for (struct guard_conn *gc = g->head; gc; gc = gc->next) {
            pthread_mutex_lock(&gc->lock);
            judge(gc, now);
            pthread_mutex_unlock(&gc->lock);
        }
        pthread_mutex_unlock(&g->lock);
        pthread_mutex_lock(&g->stop_lock);
    }
    pthread_mutex_unlock(&g->stop_lock);
    return NULL;
}

int api_guard_new(const struct api_config *cfg, struct api_guard **out)
{
    struct api_guard *g = calloc(1, sizeof *g);
    if (!g)
        return err_fail(ENOMEM, "out of memory");
    g->header_ms = (cfg->header_timeout_sec ? cfg->header_timeout_sec : API_DEFAULT_HEADER_TIMEOUT) * 1000u;
    g->min_rate = cfg->min_rate == API_RATE_OFF ? 0 : cfg->min_rate ? cfg->min_rate : API_DEFAULT_MIN_RATE;
    g->listeners_per_client = cfg->listeners_per_client ? cfg->listeners_per_client : API_DEFAULT_LISTENERS_PER_CLIENT;
    g->log = cfg->log;
    pthread_mutex_init(&g->lock, NULL);
    pthread_mutex_init(&g->stop_lock, NULL);
    pthread_cond_init(&g->stop_cond, NULL);
    int e = pthread_create(&g->thread, NULL, watchdog, g);
    if (e) {
        api_guard_free(g);
        return err_fail(e, "starting the connection watchdog: %s", strerror(e));
    }
    g->started = true;
    *out = g;
    return 0;
}

void api_guard_free(struct api_guard *g)
{
    if (!g)
        return;
    if (g->started) {
        pthread_mutex_lock(&g->stop_lock);
        g->stopping = true;
        pthread_cond_signal(&g->stop_cond);
        pthread_mutex_unlock(&g->stop_lock);
        pthread_join(g->thread, NULL);
    }
    while (g->listeners) {
        struct addr_count *a = g->listeners;
        g->listeners = a->next;
        free(a);
    }
    pthread_cond_destroy(&g->stop_cond);
    pthread_mutex_destroy(&g->stop_lock);
    pthread_mutex_destroy(&g->lock);
    free(g);
}

struct guard_conn *api_guard_open(struct api_guard *g, int fd, const struct sockaddr *sa)
{
    struct guard_conn *gc = calloc(1, sizeof *gc);
    if (!gc)
        return NULL;
    gc->g = g;
    gc->fd = fd;
    snprintf(gc->addr, sizeof gc->addr, "?");
    if (sa && sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, gc->addr, sizeof gc->addr);
    else if (sa && sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, gc->addr, sizeof gc->addr);
    pthread_mutex_init(&gc->lock, NULL);
    gc->phase = GUARD_HEADERS;
    gc->since_ms = gc->mark_ms = mono_ms();
    atomic_fetch_add(&g->open, 1);
    pthread_mutex_lock(&g->lock);
    gc->next = g->head;
    if (g->head)
        g->head->prev = gc;
    g->head = gc;
    pthread_mutex_unlock(&g->lock);
    return gc;
}

void api_guard_close(struct guard_conn *gc)
{
    if (!gc)
        return;
    struct api_guard *g = gc->g;
    pthread_mutex_lock(&g->lock);
    if (gc->prev)
        gc->prev->next = gc->next;
    else
        g->head = gc->next;
    if (gc->next)
        gc->next->prev = gc->prev;
    pthread_mutex_unlock(&g->lock);
    atomic_fetch_sub(&g->open, 1);
    pthread_mutex_destroy(&gc->lock);
    free(gc);
}

void api_guard_phase(struct guard_conn *gc, enum guard_phase phase)
{
    if (!gc)
        return;
    int64_t now = mono_ms();
    pthread_mutex_lock(&gc->lock);
    if (phase == GUARD_HEADERS && gc->phase != GUARD_HEADERS)
        gc->served = true;
    gc->phase = phase;
    gc->since_ms = gc->mark_ms = now;
    gc->mark_bytes = 0;
    atomic_store(&gc->bytes, 0);
    pthread_mutex_unlock(&gc->lock);
}

void api_guard_kick(struct guard_conn *gc, void (*kick)(void *ctx), void *ctx)
{
    if (!gc)
        return;
    pthread_mutex_lock(&gc->lock);
    gc->kick = kick;
    gc->kick_ctx = ctx;
    pthread_mutex_unlock(&gc->lock);
}

void api_guard_bytes(struct guard_conn *gc, uint64_t n)
{
    if (gc)
        atomic_fetch_add_explicit(&gc->bytes, n, memory_order_relaxed);
}

const char *api_guard_addr(const struct guard_conn *gc)
{
    return gc ? gc->addr : "?";
}

int api_guard_listen(struct api_guard *g, const char *addr)
{
    int ret = 0;
    pthread_mutex_lock(&g->lock);
    struct addr_count *a = g->listeners;
    while (a && strcmp(a->addr, addr))
        a = a->next;
    if (!a && (a = calloc(1, sizeof *a))) {
        snprintf(a->addr, sizeof a->addr, "%s", addr);
        a->next = g->listeners;
        g->listeners = a;
    }
    if (!a)
        ret = err_fail(ENOMEM, "out of memory");
    else if (a->n >= g->listeners_per_client)
        ret = err_fail(EAGAIN, "%s has %u event streams open: --max-listeners-per-client is %u", addr, a->n,
                       g->listeners_per_client);
    else
        a->n++;
    pthread_mutex_unlock(&g->lock);
    return ret;
}

void api_guard_unlisten(struct api_guard *g, const char *addr)
{
    pthread_mutex_lock(&g->lock);
    struct addr_count **pp = &g->listeners;
    while (*pp && strcmp((*pp)->addr, addr))
        pp = &(*pp)->next;
    if (*pp && --(*pp)->n == 0) {
        struct addr_count *a = *pp;
        *pp = a->next;
        free(a);
    }
    pthread_mutex_unlock(&g->lock);
}

void api_guard_counts(struct api_guard *g, unsigned *open, uint64_t *cut_headers, uint64_t *cut_slow)
{
    *open = atomic_load(&g->open);
    *cut_headers = atomic_load(&g->cut_headers);
    *cut_slow = atomic_load(&g->cut_slow);
}
