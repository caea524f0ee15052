/* http.h: the one HTTP call qcowctl makes, over libcurl: a request with an
 * optional body (memory or a stream) and a response streamed to a FILE or kept. */
#ifndef QCOWCTL_HTTP_H
#define QCOWCTL_HTTP_H

#include <stdint.h>
#include <stdio.h>

/* Bodies of error answers and of answers kept in memory stop growing here. */
#define HTTP_KEEP_MAX (64u << 20)

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
    FILE *out;                /* 2xx bodies go here; NULL: kept in http_resp.body */
};

struct http_resp {
    long status;   /* HTTP status, 0 when no answer came */
    char *body;    /* the kept body (NUL-terminated), malloc'ed, or NULL */
    size_t len;    /* bytes in body */
    uint64_t sent; /* body bytes written to req.out */
};

/* Sets the server's base URL ("http://host:port" or "https://...", a trailing
 * '/' is dropped), the bearer token sent with every request (NULL: none) and the
 * CA certificate file that verifies the server (NULL: the system's); call once
 * before http_do. Returns 0, or -1 with a message printed. */
int http_init(const char *url, const char *token, const char *cacert);
void http_done(void);

/* Runs one request. Returns 0 when the server answered 2xx with the whole body;
 * otherwise prints `qcowctl: reason` (the server's JSON error message when it
 * sent one) and returns -1. resp->body is the caller's to free either way. */
int http_do(const struct http_req *req, struct http_resp *resp);

/* Returns the name percent-escaped for a URL path (malloc'ed), or NULL. */
char *http_escape(const char *s);

#endif
