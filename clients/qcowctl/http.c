/* http.c: qcowctl's HTTP over libcurl. One easy handle (so consecutive requests
 * reuse the connection); bodies stream in and out; errors become one line and an exit status. */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <jansson.h>

#include "http.h"

static CURL *curl;
static char *base_url;
static char *auth_header; /* "Authorization: Bearer TOKEN", or NULL */
static char *ca_file;
static char *if_match; /* "If-Match: ETAG" for requests that change something, or NULL */

struct xfer {
    const struct http_req *req;
    struct http_resp *resp;
    size_t mem_off;  /* request body bytes of req->mem sent */
    int64_t in_left; /* request body bytes of req->in still to send */
    int out_error;   /* errno of a failed write to req->out */
    int read_error;  /* errno of a failed read of req->in */
};

int http_init(const char *url, const char *token, const char *cacert)
{
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || !(curl = curl_easy_init())) {
        fprintf(stderr, "qcowctl: cannot initialise libcurl\n");
        return EXIT_FAIL;
    }
    size_t n = strlen(url);
    while (n && url[n - 1] == '/')
        n--;
    if (!n) {
        fprintf(stderr, "qcowctl: empty server URL\n");
        return EXIT_USAGE;
    }
    base_url = strndup(url, n);
    if (token && *token) {
        if (strpbrk(token, "\r\n")) {
            fprintf(stderr, "qcowctl: the token has a line break in it\n");
            return EXIT_USAGE;
        }
        if (asprintf(&auth_header, "Authorization: Bearer %s", token) < 0)
            auth_header = NULL;
    }
    if (cacert && *cacert)
        ca_file = strdup(cacert);
    if (!base_url || (token && *token && !auth_header) || (cacert && *cacert && !ca_file)) {
        fprintf(stderr, "qcowctl: out of memory\n");
        return EXIT_FAIL;
    }
    return 0;
}

int http_if_match(const char *etag)
{
    free(if_match);
    if_match = NULL;
    if (!etag)
        return 0;
    if (strpbrk(etag, "\r\n")) {
        fprintf(stderr, "qcowctl: the ETag has a line break in it\n");
        return EXIT_USAGE;
    }
    if (asprintf(&if_match, "If-Match: %s", etag) < 0) {
        if_match = NULL;
        fprintf(stderr, "qcowctl: out of memory\n");
        return EXIT_FAIL;
    }
    return 0;
}

void http_done(void)
{
    if (curl)
        curl_easy_cleanup(curl);
    curl = NULL;
    free(base_url);
    base_url = NULL;
    if (auth_header) /* the secret does not outlive its use */
        memset(auth_header, 0, strlen(auth_header));
    free(auth_header);
    auth_header = NULL;
    free(ca_file);
    ca_file = NULL;
    free(if_match);
    if_match = NULL;
    curl_global_cleanup();
}

char *http_escape(const char *s)
{
    char *e = curl_easy_escape(curl, s, 0);
    if (!e)
        return NULL;
    char *r = strdup(e);
    curl_free(e);
    return r;
}

static int keep(struct http_resp *resp, const char *p, size_t n)
{
    if (resp->len + n > HTTP_KEEP_MAX)
        return -1;
    char *b = realloc(resp->body, resp->len + n + 1);
    if (!b)
        return -1;
    memcpy(b + resp->len, p, n);
    resp->body = b;
    resp->len += n;
    b[resp->len] = 0;
    return 0;
}

static size_t on_write(char *p, size_t size, size_t nmemb, void *arg)
{
    struct xfer *x = arg;
    size_t n = size * nmemb;
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    if (x->req->sink && !x->req->out && status >= 200 && status < 300) {
        x->resp->sent += n;
        if (x->req->sink(x->req->sink_arg, p, n) == 0)
            return n;
        x->resp->sink_stopped = 1;
        return 0; /* aborts the transfer */
    }
    if (x->req->out && status >= 200 && status < 300) {
        if (fwrite(p, 1, n, x->req->out) != n) {
            x->out_error = errno ? errno : EIO;
            return 0; /* aborts the transfer */
        }
        x->resp->sent += n;
        return n;
    }
    return keep(x->resp, p, n) < 0 ? 0 : n;
}

static size_t on_read(char *p, size_t size, size_t nmemb, void *arg)
{
    struct xfer *x = arg;
    size_t n = size * nmemb;
    const struct http_req *req = x->req;
    if (req->mem) {
        size_t left = req->mem_len - x->mem_off;
        if (n > left)
            n = left;
        memcpy(p, (const char *)req->mem + x->mem_off, n);
        x->mem_off += n;
        return n;
    }
    if ((int64_t)n > x->in_left)
        n = (size_t)x->in_left;
    if (!n)
        return 0;
    size_t got = fread(p, 1, n, req->in);
    if (got == 0) {
        /* shorter than announced: abort rather than let the server wait */
        x->read_error = ferror(req->in) ? (errno ? errno : EIO) : EPIPE;
        return CURL_READFUNC_ABORT;
    }
    x->in_left -= (int64_t)got;
    return got;
}

/* "CODE: message" of a JSON error body {"error": {"code", "message"}}, or NULL. */
static char *error_message(const struct http_resp *resp)
{
    if (!resp->body)
        return NULL;
    json_t *j = json_loadb(resp->body, resp->len, 0, NULL);
    const char *code = NULL, *msg = NULL;
    char *r = NULL;
    if (j && json_unpack(j, "{s:{s:s, s:s}}", "error", "code", &code, "message", &msg) == 0 && *msg &&
        asprintf(&r, "%s: %s", code, msg) < 0)
        r = NULL;
    json_decref(j);
    return r;
}

int http_do(const struct http_req *req, struct http_resp *resp)
{
    memset(resp, 0, sizeof *resp);
    resp->retry_after = -1;
    struct xfer x = {.req = req, .resp = resp, .in_left = req->in_len};
    size_t ulen = strlen(base_url) + strlen(req->path) + 1;
    char *url = malloc(ulen);
    struct curl_slist *hdrs = NULL;
    char ctype[128];
    int ret = EXIT_FAIL;
    if (!url) {
        fprintf(stderr, "qcowctl: out of memory\n");
        return EXIT_FAIL;
    }
    snprintf(url, ulen, "%s%s", base_url, req->path);

    curl_easy_reset(curl);
    curl_easy_setopt(curl, CURLOPT_URL, url);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_USERAGENT, "qcowctl/" QCOWD_VERSION);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &x);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT, 30L);
    if (req->low_speed_time > 0) {
        curl_easy_setopt(curl, CURLOPT_LOW_SPEED_LIMIT, 1L);
        curl_easy_setopt(curl, CURLOPT_LOW_SPEED_TIME, req->low_speed_time);
    }
    /* no "Expect: 100-continue" round trip before a body */
    hdrs = curl_slist_append(hdrs, "Expect:");
    if (auth_header)
        hdrs = curl_slist_append(hdrs, auth_header);
    if (ca_file)
        curl_easy_setopt(curl, CURLOPT_CAINFO, ca_file);
    if (if_match && strcmp(req->method, "GET") && strcmp(req->method, "HEAD") && strcmp(req->method, "OPTIONS"))
        hdrs = curl_slist_append(hdrs, if_match);
    for (int i = 0; i < 4 && req->headers[i]; i++)
        hdrs = curl_slist_append(hdrs, req->headers[i]);
    if (req->content_type) {
        snprintf(ctype, sizeof ctype, "Content-Type: %s", req->content_type);
        hdrs = curl_slist_append(hdrs, ctype);
    }
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, hdrs);

    bool has_body = req->mem || req->in_len >= 0;
    if (strcmp(req->method, "HEAD") == 0) {
        curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
    } else if (has_body) {
        curl_off_t blen = req->mem ? (curl_off_t)req->mem_len : (curl_off_t)req->in_len;
        curl_easy_setopt(curl, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(curl, CURLOPT_INFILESIZE_LARGE, blen);
        curl_easy_setopt(curl, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(curl, CURLOPT_READDATA, &x);
        if (strcmp(req->method, "PUT") != 0)
            curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, req->method);
    } else if (strcmp(req->method, "GET") != 0) {
        curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, req->method);
    }

    CURLcode rc = curl_easy_perform(curl);
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &resp->status);
    curl_off_t retry = -1;
    if (curl_easy_getinfo(curl, CURLINFO_RETRY_AFTER, &retry) == CURLE_OK && retry > 0)
        resp->retry_after = (long)retry;
    char *msg = resp->status >= 300 ? error_message(resp) : NULL;
    char later[48] = "";
    if (resp->retry_after > 0)
        snprintf(later, sizeof later, " (retry after %ld s)", resp->retry_after);
    if (msg) {
        /* the server's word wins, even when it cut the upload short */
        fprintf(stderr, "qcowctl: %s%s\n", msg, later);
    } else if (x.out_error) {
        fprintf(stderr, "qcowctl: writing the output: %s\n", strerror(x.out_error));
    } else if (x.read_error) {
        fprintf(stderr, "qcowctl: reading the input: %s\n",
                x.read_error == EPIPE ? "it ended before its announced length" : strerror(x.read_error));
    } else if (rc == CURLE_WRITE_ERROR && resp->sink_stopped) {
        ret = EXIT_OK;
    } else if (rc != CURLE_OK) {
        fprintf(stderr, "qcowctl: %s %s: %s\n", req->method, url, curl_easy_strerror(rc));
        ret = EXIT_CONN;
    } else if (resp->status < 200 || resp->status >= 300) {
        fprintf(stderr, "qcowctl: HTTP %ld: %s %s%s%s%.200s\n", resp->status, req->method, req->path, later,
                resp->body && resp->len ? ": " : "", resp->body ? resp->body : "");
    } else {
        ret = EXIT_OK;
    }
    free(msg);
    curl_slist_free_all(hdrs);
    free(url);
    return ret;
}
