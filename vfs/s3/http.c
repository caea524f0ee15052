/* http.c: signed S3 requests over libcurl: a bounded pool of easy handles (each
 * keeps its connections alive; DNS and TLS sessions shared), retries with
 * backoff for throttling, 5xx and transport errors, and S3 errors turned into
 * an errno and a message that names the cause. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#include "err.h"
#include "s3_int.h"

struct s3_stats s3_stats;
const char *const s3_op_names[S3_OP_COUNT] = {"get", "head", "put", "upload_part", "copy", "list", "delete",
                                              "other"};

/* ---- the handle pool ---- */

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_free = PTHREAD_COND_INITIALIZER;
static CURL **idle;       /* idle handles (a stack) */
static unsigned n_idle;
static unsigned n_alive;  /* handles existing, idle or in use */
static CURLSH *share;
static pthread_mutex_t share_locks[CURL_LOCK_DATA_LAST];
static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static int global_ok;

static void share_lock(CURL *h, curl_lock_data d, curl_lock_access a, void *u)
{
    pthread_mutex_lock(&share_locks[d]);
}

static void share_unlock(CURL *h, curl_lock_data d, void *u)
{
    pthread_mutex_unlock(&share_locks[d]);
}

static void global_init(void)
{
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return;
    for (int i = 0; i < CURL_LOCK_DATA_LAST; i++)
        pthread_mutex_init(&share_locks[i], NULL);
    share = curl_share_init();
    if (share) {
        curl_share_setopt(share, CURLSHOPT_LOCKFUNC, share_lock);
        curl_share_setopt(share, CURLSHOPT_UNLOCKFUNC, share_unlock);
        curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS);
        curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
    }
    global_ok = 1;
}

/* A handle for one request; blocks while every allowed handle is busy. */
static CURL *pool_get(void)
{
    pthread_once(&global_once, global_init);
    if (!global_ok)
        return NULL;
    pthread_mutex_lock(&pool_lock);
    while (!n_idle && n_alive >= s3_conf.connections)
        pthread_cond_wait(&pool_free, &pool_lock);
    CURL *h = NULL;
    if (n_idle) {
        h = idle[--n_idle];
    } else {
        n_alive++;
        pthread_mutex_unlock(&pool_lock);
        h = curl_easy_init();
        if (h && share)
            curl_easy_setopt(h, CURLOPT_SHARE, share);
        pthread_mutex_lock(&pool_lock);
        if (!h) {
            n_alive--;
            pthread_cond_signal(&pool_free);
        }
    }
    pthread_mutex_unlock(&pool_lock);
    return h;
}

/* Return h; a handle whose connection broke is closed instead of kept. */
static void pool_put(CURL *h, int broken)
{
    pthread_mutex_lock(&pool_lock);
    if (!broken && !idle) {
        idle = calloc(s3_conf.connections, sizeof *idle);
    }
    if (!broken && idle && n_idle < s3_conf.connections) {
        idle[n_idle++] = h;
        h = NULL;
    } else {
        n_alive--;
    }
    pthread_cond_signal(&pool_free);
    pthread_mutex_unlock(&pool_lock);
    if (h)
        curl_easy_cleanup(h);
}

void s3_http_cleanup(void)
{
    pthread_mutex_lock(&pool_lock);
    while (n_idle) {
        curl_easy_cleanup(idle[--n_idle]);
        n_alive--;
    }
    free(idle);
    idle = NULL;
    pthread_mutex_unlock(&pool_lock);
}

/* ---- one request ---- */

static size_t on_body(char *p, size_t sz, size_t n, void *u)
{
    struct s3_req *r = u;
    size_t len = sz * n;
    if (r->into && r->status_ok_hint) {
        size_t room = r->into_cap - r->into_len;
        size_t k = len < room ? len : room;
        memcpy((char *)r->into + r->into_len, p, k);
        r->into_len += k;
    } else {
        if (len > S3_TEXT_MAX - r->text.len) { /* a hostile or broken server: stop reading */
            r->too_big = 1;
            return 0;
        }
        sbuf_add(&r->text, p, len);
        if (r->text.oom)
            return 0;
    }
    atomic_fetch_add(&s3_stats.bytes_in, len);
    return len;
}

static void copy_hval(char *dst, size_t cap, const char *v, size_t n)
{
    while (n && (v[n - 1] == '\r' || v[n - 1] == '\n' || v[n - 1] == ' '))
        n--;
    while (n && *v == ' ') {
        v++;
        n--;
    }
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, v, n);
    dst[n] = '\0';
}

static size_t on_header(char *p, size_t sz, size_t n, void *u)
{
    struct s3_req *r = u;
    size_t len = sz * n;
    if (len > 5 && !strncmp(p, "HTTP/", 5)) { /* a new response (after 100-continue): reset */
        r->etag[0] = r->last_modified[0] = '\0';
        r->content_length = 0;
        int code = 0;
        const char *sp = memchr(p, ' ', len);
        if (sp)
            code = atoi(sp + 1);
        r->status_ok_hint = code >= 200 && code < 300;
        return len;
    }
    const char *colon = memchr(p, ':', len);
    if (!colon)
        return len;
    size_t nl = (size_t)(colon - p);
    const char *v = colon + 1;
    size_t vl = len - nl - 1;
    if (nl == 4 && !strncasecmp(p, "etag", 4))
        copy_hval(r->etag, sizeof r->etag, v, vl);
    else if (nl == 13 && !strncasecmp(p, "last-modified", 13))
        copy_hval(r->last_modified, sizeof r->last_modified, v, vl);
    else if (nl == 14 && !strncasecmp(p, "content-length", 14)) {
        char tmp[32];
        copy_hval(tmp, sizeof tmp, v, vl);
        r->content_length = strtoull(tmp, NULL, 10);
    }
    return len;
}

struct body_src {
    const char *base; /* the whole body */
    size_t len;
    const char *p;    /* what is still to send */
    size_t left;
};

static size_t on_read(char *buf, size_t sz, size_t n, void *u)
{
    struct body_src *b = u;
    size_t k = sz * n < b->left ? sz * n : b->left;
    memcpy(buf, b->p, k);
    b->p += k;
    b->left -= k;
    atomic_fetch_add(&s3_stats.bytes_out, k);
    return k;
}

/* curl sends the body again when a reused connection turns out dead under the
 * request (it then retries on a fresh one by itself); without a rewind that
 * would be CURLE_SEND_FAIL_REWIND, which is no answer to retry. */
static int seek_body(void *u, curl_off_t off, int origin)
{
    struct body_src *b = u;
    if (origin != SEEK_SET || off < 0 || (uint64_t)off > b->len)
        return CURL_SEEKFUNC_CANTSEEK;
    b->p = b->base + off;
    b->left = b->len - (size_t)off;
    return CURL_SEEKFUNC_OK;
}

/* The canonical path "/bucket/key" (key encoded, '/' kept). */
static void build_path(struct sbuf *p, const struct s3_req *r)
{
    sbuf_puts(p, "/");
    s3_uri_encode(p, r->bucket, 0);
    if (r->key && *r->key) {
        sbuf_puts(p, "/");
        s3_uri_encode(p, r->key, 1);
    }
}

/* One attempt. Returns the CURLcode; r->status is the HTTP status. */
static CURLcode attempt(CURL *h, struct s3_req *r, const char *host, struct sbuf *url, const char *payload_hash,
                        char *curl_err)
{
    char amz_date[17];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(amz_date, sizeof amz_date, "%Y%m%dT%H%M%SZ", &tm);

    struct sbuf path = {0}, auth = {0};
    build_path(&path, r);
    size_t nh = r->nhdrs + 3;
    struct s3_hdr *hs = calloc(nh, sizeof *hs);
    struct curl_slist *list = NULL;
    CURLcode cc = CURLE_OUT_OF_MEMORY;
    if (!hs || !sbuf_str(&path))
        goto out;
    hs[0] = (struct s3_hdr){"host", host};
    hs[1] = (struct s3_hdr){"x-amz-date", amz_date};
    hs[2] = (struct s3_hdr){"x-amz-content-sha256", payload_hash};
    for (size_t i = 0; i < r->nhdrs; i++)
        hs[3 + i] = r->hdrs[i];
    struct s3_sign_in in = {
        .method = r->method,
        .path = path.p,
        .params = r->params,
        .nparams = r->nparams,
        .hdrs = hs,
        .nhdrs = nh,
        .payload_hash = payload_hash,
        .amz_date = amz_date,
        .region = s3_conf.region,
        .service = "s3",
        .access_key = s3_conf.access_key,
        .secret_key = s3_conf.secret_key,
    };
    if (s3_sigv4_sign(&in, &auth, NULL, NULL) < 0)
        goto out;
    struct sbuf line = {0};
    for (size_t i = 1; i < nh; i++) { /* curl writes Host itself */
        sbuf_printf(&line, "%s: %s", hs[i].name, hs[i].value);
        list = curl_slist_append(list, sbuf_str(&line) ? line.p : "");
        line.len = 0;
    }
    sbuf_printf(&line, "Authorization: %s", auth.p);
    list = curl_slist_append(list, sbuf_str(&line) ? line.p : "");
    list = curl_slist_append(list, "Expect:"); /* no 100-continue round trip */
    sbuf_free(&line);

    curl_easy_reset(h);
    if (share)
        curl_easy_setopt(h, CURLOPT_SHARE, share);
    curl_easy_setopt(h, CURLOPT_URL, url->p);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, list);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, s3_conf.connect_timeout_ms);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, (s3_conf.timeout_ms + 999) / 1000);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, curl_err);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, r);
    struct body_src src = {r->body, r->body_len, r->body, r->body_len};
    if (!strcmp(r->method, "HEAD")) {
        curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    } else if (!strcmp(r->method, "PUT") || !strcmp(r->method, "POST")) {
        if (!strcmp(r->method, "PUT"))
            curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
        else
            curl_easy_setopt(h, CURLOPT_POST, 1L);
        curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(h, CURLOPT_READDATA, &src);
        curl_easy_setopt(h, CURLOPT_SEEKFUNCTION, seek_body);
        curl_easy_setopt(h, CURLOPT_SEEKDATA, &src);
        if (!strcmp(r->method, "PUT"))
            curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)r->body_len);
        else
            curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body_len);
    } else if (strcmp(r->method, "GET")) {
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, r->method);
    }
    r->status = 0;
    r->into_len = 0;
    r->text.len = 0;
    r->too_big = 0;
    if (r->text.p)
        r->text.p[0] = '\0';
    curl_err[0] = '\0';
    cc = curl_easy_perform(h);
    if (cc == CURLE_OK)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r->status);
out:
    curl_slist_free_all(list);
    free(hs);
    sbuf_free(&path);
    sbuf_free(&auth);
    return cc;
}

/* The S3 error code and message of an error body ("" when none). */
static void s3_error(struct s3_req *r, char *code, size_t ccap, char *msg, size_t mcap)
{
    code[0] = msg[0] = '\0';
    const char *t = sbuf_str(&r->text);
    if (!t || !*t)
        return;
    char *c = s3_xml_next(t, "Code", NULL), *m = s3_xml_next(t, "Message", NULL);
    if (c)
        snprintf(code, ccap, "%s", c);
    if (m)
        snprintf(msg, mcap, "%s", m);
    free(c);
    free(m);
}

static int retryable_status(long s)
{
    return s == 500 || s == 502 || s == 503 || s == 504 || s == 429;
}

static int retryable_curl(CURLcode cc)
{
    return cc == CURLE_COULDNT_CONNECT || cc == CURLE_OPERATION_TIMEDOUT || cc == CURLE_SEND_ERROR ||
           cc == CURLE_RECV_ERROR || cc == CURLE_GOT_NOTHING || cc == CURLE_PARTIAL_FILE ||
           cc == CURLE_COULDNT_RESOLVE_HOST;
}

static void backoff(unsigned attempt_no)
{
    /* 100 ms doubling, with jitter, capped at 3.2 s */
    unsigned ms = 100u << (attempt_no < 5 ? attempt_no : 5);
    ms = ms / 2 + (unsigned)(rand() % (int)(ms / 2 + 1));
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int fail_curl(CURLcode cc, const char *what, const char *curl_err, unsigned tries)
{
    const char *detail = curl_err && *curl_err ? curl_err : curl_easy_strerror(cc);
    int e;
    const char *cause;
    switch (cc) {
    case CURLE_COULDNT_CONNECT:
        e = ECONNREFUSED;
        cause = "the S3 endpoint is unreachable";
        break;
    case CURLE_COULDNT_RESOLVE_HOST:
        e = EHOSTUNREACH;
        cause = "the S3 endpoint's host name does not resolve";
        break;
    case CURLE_OPERATION_TIMEDOUT:
        e = ETIMEDOUT;
        cause = "the S3 endpoint timed out";
        break;
    case CURLE_OUT_OF_MEMORY:
        return err_fail(ENOMEM, "%s: out of memory", what);
    default:
        e = ECONNRESET;
        cause = "the connection to the S3 endpoint failed";
        break;
    }
    return err_fail(e, "%s: %s (%s; %s, %u attempt%s)", what, cause, detail, s3_conf.endpoint, tries,
                    tries == 1 ? "" : "s");
}

static int fail_status(struct s3_req *r, const char *what, unsigned tries)
{
    char code[64], msg[256];
    s3_error(r, code, sizeof code, msg, sizeof msg);
    long s = r->status;
    const char *sep = msg[0] ? ": " : "";
    if (s == 403)
        return err_fail(EACCES, "%s: access denied by the S3 store (403 %s%s%s%s)", what,
                        code[0] ? code : "Forbidden", sep, msg,
                        !strcmp(code, "SignatureDoesNotMatch") ? "; check the secret key"
                        : !strcmp(code, "InvalidAccessKeyId")  ? "; check the access key id"
                                                               : "");
    if (s == 404) {
        if (!strcmp(code, "NoSuchBucket"))
            return err_fail(ENOENT, "%s: bucket '%s' does not exist (404 NoSuchBucket)", what, r->bucket);
        return err_fail(ENOENT, "%s: no such object (404 %s)", what, code[0] ? code : "Not Found");
    }
    if (s == 412)
        return err_fail(ESTALE, "%s: the object changed (412 %s)", what, code[0] ? code : "PreconditionFailed");
    if (s == 416)
        return err_fail(ERANGE, "%s: range not satisfiable (416)", what);
    if (s == 501)
        return err_fail(EOPNOTSUPP, "%s: the S3 store does not implement it (501 %s%s%s)", what,
                        code[0] ? code : "NotImplemented", sep, msg);
    if (s == 503 && (!strcmp(code, "SlowDown") || !code[0]))
        return err_fail(EAGAIN, "%s: the S3 store is %s (503 %s) after %u attempts", what,
                        code[0] ? "throttling" : "unavailable or throttling", code[0] ? code : "Service Unavailable",
                        tries);
    if (s == 429)
        return err_fail(EAGAIN, "%s: the S3 store is throttling (429) after %u attempts", what, tries);
    if (s >= 500)
        return err_fail(EREMOTEIO, "%s: the S3 store failed (%ld %s%s%s) after %u attempts", what, s,
                        code[0] ? code : "server error", sep, msg, tries);
    if (!strcmp(code, "EntityTooLarge"))
        return err_fail(EFBIG, "%s: too large for the S3 store (%ld %s%s%s)", what, s, code, sep, msg);
    return err_fail(EPROTO, "%s: the S3 store refused the request (%ld %s%s%s)", what, s,
                    code[0] ? code : "error", sep, msg);
}

int s3_http(struct s3_req *r, const char *what)
{
    int ret = s3_conf_ready();
    if (ret < 0)
        return ret;
    /* URL and host, shared by every attempt */
    const char *hostp = strstr(s3_conf.endpoint, "://");
    hostp = hostp ? hostp + 3 : s3_conf.endpoint;
    char host[256];
    snprintf(host, sizeof host, "%.*s", (int)strcspn(hostp, "/"), hostp);
    struct sbuf url = {0};
    sbuf_puts(&url, s3_conf.endpoint);
    build_path(&url, r);
    if (r->nparams) {
        sbuf_puts(&url, "?");
        s3_canonical_query(&url, r->params, r->nparams);
    }
    char payload_hash[65];
    s3_sha256_hex(r->body ? r->body : "", r->body ? r->body_len : 0, payload_hash);
    if (!sbuf_str(&url)) {
        sbuf_free(&url);
        return err_fail(ENOMEM, "%s: out of memory", what);
    }

    char curl_err[CURL_ERROR_SIZE];
    unsigned tries = 0;
    for (;;) {
        CURL *h = pool_get();
        if (!h) {
            ret = err_fail(ENOMEM, "%s: cannot set up libcurl", what);
            break;
        }
        tries++;
        atomic_fetch_add(&s3_stats.requests[r->op], 1);
        CURLcode cc = attempt(h, r, host, &url, payload_hash, curl_err);
        pool_put(h, cc != CURLE_OK);
        if (cc == CURLE_OK && r->status >= 200 && r->status < 300) {
            ret = 0;
            break;
        }
        int again = tries <= s3_conf.retries &&
                    (cc == CURLE_OK ? retryable_status(r->status) : retryable_curl(cc));
        if (again) {
            atomic_fetch_add(&s3_stats.retries, 1);
            backoff(tries - 1);
            continue;
        }
        if (!(cc == CURLE_OK && r->status == 404 && r->quiet_404))
            atomic_fetch_add(&s3_stats.errors, 1);
        if (cc == CURLE_WRITE_ERROR && r->too_big)
            ret = err_fail(EREMOTEIO, "%s: the S3 server's answer is larger than %u MiB, the most qcowd reads", what,
                           S3_TEXT_MAX >> 20);
        else
            ret = cc != CURLE_OK ? fail_curl(cc, what, curl_err, tries) : fail_status(r, what, tries);
        break;
    }
    sbuf_free(&url);
    return ret;
}

void s3_req_free(struct s3_req *r)
{
    sbuf_free(&r->text);
}
