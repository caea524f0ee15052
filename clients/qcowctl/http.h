/* http.h: the one HTTP call qcowctl makes, over libcurl: a request with an
 * optional body (memory or a stream) and a response streamed to a FILE, a sink or kept. */
#ifndef QCOWCTL_HTTP_H
#define QCOWCTL_HTTP_H

#include <stdint.h>
#include <stdio.h>

/* Bodies of error answers and of answers kept in memory stop growing here. */
#define HTTP_KEEP_MAX (64u << 20)

/* qcowctl's exit statuses: http_do returns one of the first three. */
enum {
    EXIT_OK = 0,      /* done */
    EXIT_FAIL = 1,    /* the server answered an error, a job failed, or a local file failed */
    EXIT_USAGE = 2,   /* the command line is wrong; nothing was sent */
    EXIT_CONN = 3,    /* no answer: the server cannot be reached, TLS failed, the connection broke */
    EXIT_CORRUPT = 4, /* a check (--wait) found the image corrupt: corruptions or check errors left */
    EXIT_LEAKS = 5,   /* a check (--wait) found leaked clusters only (harmless: a repair reclaims them) */
};

struct http_req {
    const char *method;     /* "GET", "PUT", ... */
    const char *path;       /* "/v1/images/x/data?flush=n", already escaped */
    const char *headers[4]; /* extra "Name: value" lines, NULL-terminated */
    /* request body: mem/mem_len, or up to in_len bytes read from in (in_len < 0: none) */
    const void *mem;
    size_t mem_len;
    FILE *in;
    int64_t in_len;
    const char *content_type; /* of the request body, or NULL */
    FILE *out;                /* 2xx bodies go here; NULL: to sink, else kept in http_resp.body */
    /* 2xx bodies go to sink when set (out NULL): returns 0, or -1 to end the transfer
     * early, which http_do then reports as success */
    int (*sink)(void *arg, const char *p, size_t n);
    void *sink_arg;
    long low_speed_time; /* > 0: a body slower than 1 byte/s for this long is a broken connection */
};

struct http_resp {
    long status;      /* HTTP status, 0 when no answer came */
    char *body;       /* the kept body (NUL-terminated), malloc'ed, or NULL */
    size_t len;       /* bytes in body */
    uint64_t sent;    /* body bytes written to req.out or the sink */
    long retry_after; /* the answer's Retry-After in seconds, or -1 */
    int sink_stopped; /* the sink asked to stop */
};

/* Sets the server's base URL ("http://host:port" or "https://...", a trailing
 * '/' is dropped), the bearer token sent with every request (NULL: none) and the
 * CA certificate file that verifies the server (NULL: the system's); call once
 * before http_do. Returns 0, or EXIT_USAGE/EXIT_FAIL with a message printed. */
int http_init(const char *url, const char *token, const char *cacert);
void http_done(void);

/* Sends `If-Match: etag` with every later request that changes something (not GET,
 * HEAD or OPTIONS); NULL stops it. Returns 0, or EXIT_USAGE/EXIT_FAIL with a message. */
int http_if_match(const char *etag);

/* Runs one request. Returns EXIT_OK when the server answered 2xx with the whole
 * body (or the sink stopped it); otherwise prints one line on stderr and returns
 * EXIT_FAIL (an error answer: `qcowctl: CODE: message` from its JSON body, or a
 * local read/write error) or EXIT_CONN (no answer, or the connection broke).
 * resp->body is the caller's to free either way. */
int http_do(const struct http_req *req, struct http_resp *resp);

/* Returns the string percent-escaped for a URL path or query (malloc'ed), or NULL. */
char *http_escape(const char *s);

#endif
