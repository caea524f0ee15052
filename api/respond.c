/* respond.c: queueing responses: JSON bodies, JSON errors and the one table
 * that turns a negative errno into an HTTP status and an error code. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "api_int.h"
#include "catalog.h"
#include "err.h"

/* errno -> status and code: the one place an engine, catalog or store failure
 * becomes HTTP. The rules:
 * - 4xx: the request or the image is at fault, and sending it again as it is
 *   will fail again. 422 is a property of the image: EUCLEAN corrupt or invalid
 *   metadata (the engine's word for every corruption it finds, the corrupt bit
 *   included), ENOTSUP a feature qcowd does not handle, EPERM a file reaching
 *   outside the catalog (the catalog's and the engine's own meaning of EPERM: the
 *   file backend returns the system's EPERM as EACCES),
 *   ELOOP/ENXIO a broken backing chain, E2BIG/EOVERFLOW past one of qcowd's
 *   limits (the message names it). EFBIG is 413: a request body too large (and,
 *   until they move to EOVERFLOW, the engine's size limits: a virtual size or an
 *   L1 table too large).
 * - 5xx: the service or its store failed, and the request may succeed later.
 *   EIO is the store's own I/O error (the VFS passes it through; the engine never
 *   uses it for corruption): 502, the image may be fine; so is EPROTO, a store
 *   answering what it should not (an object store ignoring Range). EACCES is the
 *   store refusing qcowd (file mode, a bucket policy): 503 with the store's
 *   message naming the file, not 403, which is kept for the client's own rights:
 *   the operator, not the client, can fix it. ENOMEM is 503 too (retryable),
 *   ENOSPC/EDQUOT 507.
 * - Anything else is a bug: 500 internal-error (qcowd's own consistency checks
 *   use ENOTRECOVERABLE, which is left out on purpose).
 * ENOTSUP equals EOPNOTSUPP on Linux, so it appears once. EBUSY is an image
 * busy for now (409 with Retry-After); ETXTBSY an image in use as another
 * image's backing file, which time does not cure (409 without). */
#define API_ERRNO_TABLE(X)                  \
    X(EINVAL, 400, "bad-request")           \
    X(ENAMETOOLONG, 400, "bad-request")     \
    X(ENOENT, 404, "not-found")             \
    X(EEXIST, 409, "conflict")              \
    X(EBUSY, 409, "conflict")               \
    X(ETXTBSY, 409, "conflict")             \
    X(EROFS, 409, "read-only")              \
    X(EFBIG, 413, "too-large")              \
    X(ERANGE, 416, "range-not-satisfiable") \
    X(ENOTSUP, 422, "unsupported")          \
    X(EUCLEAN, 422, "corrupt-image")        \
    X(EPERM, 422, "outside-catalog")        \
    X(ELOOP, 422, "bad-backing-chain")      \
    X(ENXIO, 422, "bad-backing-chain")      \
    X(E2BIG, 422, "limit-exceeded")         \
    X(EOVERFLOW, 422, "limit-exceeded")     \
    X(EIO, 502, "storage-error")            \
    X(EPROTO, 502, "storage-error")         \
    X(EACCES, 503, "storage-denied")        \
    X(ENOMEM, 503, "out-of-memory")         \
    X(EMFILE, 503, "unavailable")           \
    X(ENFILE, 503, "unavailable")           \
    X(ECONNREFUSED, 503, "unavailable")     \
    X(EHOSTUNREACH, 503, "unavailable")     \
    X(ECONNRESET, 503, "unavailable")       \
    X(ETIMEDOUT, 503, "unavailable")        \
    X(EAGAIN, 503, "unavailable")           \
    X(EREMOTEIO, 503, "unavailable")        \
    X(ESTALE, 503, "unavailable")           \
    X(ENOSPC, 507, "no-space")              \
    X(EDQUOT, 507, "no-space")

static const struct {
    int err;
    unsigned status;
    const char *code;
} errno_table[] = {
#define ROW(e, s, c) {e, s, c},
    API_ERRNO_TABLE(ROW)
#undef ROW
};

static int find_errno(int err)
{
    err = abs(err);
    for (size_t i = 0; i < sizeof errno_table / sizeof errno_table[0]; i++)
        if (errno_table[i].err == err)
            return (int)i;
    return -1;
}

unsigned api_errno_status(int err)
{
    int i = find_errno(err);
    return i < 0 ? 500 : errno_table[i].status;
}

const char *api_errno_code(int err)
{
    int i = find_errno(err);
    return i < 0 ? "internal-error" : errno_table[i].code;
}

enum MHD_Result api_queue(struct req *r, unsigned status, struct MHD_Response *resp)
{
    if (!resp)
        return MHD_NO; /* out of memory: MHD closes the connection */
    api_cors_headers(r, resp);
    api_validator_headers(r, status, resp);
    enum MHD_Result ret = MHD_queue_response(r->conn, status, resp);
    MHD_destroy_response(resp);
    if (ret == MHD_YES) {
        r->answered = true;
        r->status = status;
    }
    return ret;
}

json_t *api_jstr(const char *s)
{
    json_t *j = json_string(s);
    if (j)
        return j;
    /* not UTF-8 (a file name, a corrupt image's bytes): show it in ASCII */
    char *copy = strdup(s);
    if (!copy)
        return NULL;
    for (char *p = copy; *p; p++)
        if ((unsigned char)*p >= 0x80)
            *p = '?';
    j = json_string(copy);
    free(copy);
    return j;
}

/* Queue body (stolen) as compact JSON plus a newline, with one optional header. */
static enum MHD_Result queue_json(struct req *r, unsigned status, json_t *body, const char *hdr, const char *hdr_value)
{
    char *text = body ? json_dumps(body, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(body);
    if (!text)
        return MHD_NO;
    size_t len = strlen(text);
    /* a final newline keeps curl output readable; JSON parsers ignore it */
    char *nl = realloc(text, len + 2);
    if (!nl) {
        free(text);
        return MHD_NO;
    }
    nl[len++] = '\n';
    nl[len] = '\0';
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, nl, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(nl);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    if (hdr)
        MHD_add_response_header(resp, hdr, hdr_value);
    if (!r->head)
        r->bytes = len;
    return api_queue(r, status, resp);
}

enum MHD_Result api_reply_json(struct req *r, unsigned status, json_t *body)
{
    return queue_json(r, status, body, NULL, NULL);
}

enum MHD_Result api_reply_json_hdr(struct req *r, unsigned status, json_t *body, const char *hdr,
                                   const char *hdr_value)
{
    return queue_json(r, status, body, hdr, hdr_value);
}

/* msg without the server's own paths: every "CATALOG/" (the catalog folder as
 * the store names it, with or without its "scheme:") is cut, so a client reads
 * "open a.qcow2: ..." and learns nothing of the server's file system. A new
 * string, or NULL (then msg goes as it is). */
char *api_scrub_paths(struct catalog *cat, const char *msg)
{
    char *root = cat ? catalog_path(cat, "") : NULL;
    if (!root)
        return NULL;
    const char *colon = strchr(root, ':');
    const char *forms[2] = {root, colon && colon[1] == '/' ? colon + 1 : NULL};
    char *out = strdup(msg);
    for (int f = 0; out && f < 2; f++) {
        size_t n = forms[f] ? strlen(forms[f]) : 0;
        if (n < 2)
            continue;
        char *hit;
        while ((hit = strstr(out, forms[f])))
            memmove(hit, hit + n, strlen(hit + n) + 1);
    }
    free(root);
    return out;
}

enum MHD_Result api_reply_status(struct req *r, unsigned status, const char *code, const char *msg, const char *hdr,
                                 const char *hdr_value)
{
    char *clean = api_scrub_paths(r->cat, msg);
    enum MHD_Result res = queue_json(
        r, status, json_pack("{s:{s:s,s:o}}", "error", "code", code, "message", api_jstr(clean ? clean : msg)), hdr,
        hdr_value);
    free(clean);
    return res;
}

enum MHD_Result api_reply_empty(struct req *r, unsigned status, const char *hdr, const char *hdr_value)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
    if (resp && hdr)
        MHD_add_response_header(resp, hdr, hdr_value);
    return api_queue(r, status, resp);
}

enum MHD_Result api_reply_error(struct req *r, int err, const char *msg)
{
    /* EAGAIN: a budget is full for now (queued jobs, listeners): come back
     * later. EBUSY: the image is busy (a write, a download, a job holds it; the
     * message names the holder): retry soon. EEXIST, the other 409, is not a
     * matter of time and has no Retry-After. */
    bool later = abs(err) == EAGAIN, busy = abs(err) == EBUSY;
    return api_reply_status(r, api_errno_status(err), api_errno_code(err), msg,
                            later || busy ? MHD_HTTP_HEADER_RETRY_AFTER : NULL, later ? "5" : busy ? "1" : NULL);
}

enum MHD_Result api_reply_errno(struct req *r, int err)
{
    return api_reply_error(r, err, err_msg(err));
}

int api_parse_u64_arg(const char *name, const char *raw, uint64_t *v)
{
    if (!raw)
        return 0;
    char *s = api_decode(raw, strlen(raw));
    if (!s)
        return err_fail(EINVAL, "query argument %s: %s", name, err_msg(EINVAL));
    char *end;
    errno = 0;
    unsigned long long n = strtoull(s, &end, 10);
    int ret = 1;
    if (!*s || *end || s[0] == '-' || s[0] == '+' || s[0] == ' ' || errno)
        ret = err_fail(EINVAL, "query argument %s=%.40s: expected a decimal number of bytes", name, s);
    else
        *v = n;
    free(s);
    return ret;
}

int api_parse_bool_arg(const char *name, const char *raw, bool *v)
{
    if (!raw)
        return 0;
    char *s = api_decode(raw, strlen(raw));
    if (!s)
        return err_fail(EINVAL, "query argument %s: %s", name, err_msg(EINVAL));
    int ret = 1;
    if (!strcmp(s, "y") || !strcmp(s, "yes") || !strcmp(s, "true") || !strcmp(s, "1"))
        *v = true;
    else if (!strcmp(s, "n") || !strcmp(s, "no") || !strcmp(s, "false") || !strcmp(s, "0"))
        *v = false;
    else
        ret = err_fail(EINVAL, "query argument %s=%.40s: expected y or n", name, s);
    free(s);
    return ret;
}

int api_query_u64(struct req *r, const char *name, uint64_t *v)
{
    return api_parse_u64_arg(name, MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, name), v);
}

int api_query_bool(struct req *r, const char *name, bool *v)
{
    return api_parse_bool_arg(name, MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, name), v);
}
