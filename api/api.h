/* api.h: the daemon's HTTP layer: a libmicrohttpd server that routes REST calls
 * (openapi/openapi.yaml) to the catalog and the engine. */
#ifndef QCOWD_API_H
#define QCOWD_API_H

#include <stdbool.h>

#include <stddef.h>

struct catalog;
struct api_server; /* opaque: one listening server */

#define API_DEFAULT_CONNECTIONS          4096
#define API_DEFAULT_PER_CLIENT           128
#define API_DEFAULT_HEADER_TIMEOUT       30   /* seconds */
#define API_DEFAULT_MIN_RATE             4096 /* bytes per second */
#define API_RATE_OFF                     (~0u)
#define API_DEFAULT_LISTENERS_PER_CLIENT 8
#define API_FD_RESERVE                   256 /* descriptors kept for images, plugins and logs */

/* Who may do what: read by every request before its handler (api/admit.c). */
struct api_tls;
struct tickets;
struct access_names;
struct api_access_cfg {
    bool auth;                               /* bearer tokens required (access_tokens() holds them) */
    struct api_tls *tls;                     /* HTTPS with these credentials, or NULL: plain HTTP */
    struct tickets *tickets;                 /* data tickets (POST /v1/tickets), or NULL: none */
    const struct access_names *public_names; /* Host names besides IP literals and localhost */
    const struct access_names *cors;         /* origins allowed besides the server's own */
};

struct api_config {
    const char *listen;   /* "HOST:PORT" or "[V6]:PORT"; port 0 picks a free one; NULL:
                             no listen socket (api_server_add_connection only) */
    unsigned threads;     /* libmicrohttpd thread pool size (>= 1) */
    unsigned timeout_sec; /* idle connection timeout; 0: 60 */
    /* budgets (0: the default named) */
    unsigned max_connections;      /* connections at once in total (API_DEFAULT_CONNECTIONS, kept
                                      below the process's open-file limit) */
    unsigned max_per_client;       /* connections at once from one client address (API_DEFAULT_PER_CLIENT) */
    unsigned header_timeout_sec;   /* request headers must arrive within it (API_DEFAULT_HEADER_TIMEOUT) */
    unsigned min_rate;             /* bytes/s a request body or a container download must keep up,
                                      measured over header_timeout_sec (API_DEFAULT_MIN_RATE; API_RATE_OFF: none) */
    unsigned listeners_per_client; /* GET /v1/events streams from one client address
                                      (API_DEFAULT_LISTENERS_PER_CLIENT) */
    int log;              /* log one line per request to stderr */
    int no_sendfile;      /* copy every ranged read (no sendfile from the image file) */
    int quiet;            /* no libmicrohttpd error log on stderr */
    struct jobs *jobs;     /* the job engine (borrowed; NULL: job endpoints answer 503) */
    struct events *events; /* the event bus for GET /v1/events (borrowed; NULL: 503) */
    struct api_access_cfg access; /* copied; what it points to is borrowed */
};

/* Start serving cat (borrowed; must outlive the server). On success *out is a new
 * server the caller stops with api_server_stop; on failure *out is unchanged, the
 * return is a negative errno and err_msg() names the problem. */
int api_server_start(const struct api_config *cfg, struct catalog *cat, struct api_server **out);

/* Serve one connected socket (taken: closed by the server in every case), as a
 * client from 127.0.0.1; for in-process clients such as the fuzz target, over a
 * socketpair. Returns 0, or a negative errno. Thread-safe. */
int api_server_add_connection(struct api_server *s, int fd);

/* The address it listens on, with the real port ("127.0.0.1:40123"). Borrowed. */
const char *api_server_address(const struct api_server *s);

/* Stop accepting connections; requests in flight (and new ones on connections
 * already open) go on. Idempotent. */
void api_server_quiesce(struct api_server *s);

/* Wait until no request is in flight or timeout_ms passes. Returns 0, or
 * -ETIMEDOUT with the number still in flight in err_msg(). */
int api_server_drain(struct api_server *s, unsigned timeout_ms);

/* Close every connection, join the threads and free s. Every image handle the
 * server held has been put when this returns. */
void api_server_stop(struct api_server *s);

#endif
