/* range.c: the parsers for what arrives in a request line and headers (one
 * "Range: bytes=...", a PUT's Content-Range, %XX escapes) and ranged answers. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "api_int.h"
#include "err.h"

static const char *skip_ws(const char *p)
{
    while (*p == ' ' || *p == '\t')
        p++;
    return p;
}

/* Digits at *p into *v, saturating at UINT64_MAX (a huge position is still a
 * position: past any end). Returns whether there was at least one digit. */
static bool number(const char **p, uint64_t *v)
{
    const char *s = *p;
    uint64_t n = 0;
    while (isdigit((unsigned char)*s)) {
        unsigned d = (unsigned)(*s - '0');
        if (__builtin_mul_overflow(n, 10, &n) || __builtin_add_overflow(n, d, &n))
            n = UINT64_MAX;
        s++;
    }
    if (s == *p)
        return false;
    *v = n;
    *p = s;
    return true;
}

/* One byte-range-spec "a-b", "a-" or "-n" ending at ',' or the end. */
struct spec {
    bool has_first, has_last;
    uint64_t first, last;
};

static int parse_spec(const char **pp, struct spec *sp)
{
    const char *p = skip_ws(*pp);
    memset(sp, 0, sizeof *sp);
    sp->has_first = number(&p, &sp->first);
    if (*p != '-')
        return err_fail(EINVAL,
                        "malformed Range: expected \"bytes=FIRST-LAST\", \"bytes=FIRST-\" or \"bytes=-SUFFIX\"");
    p++;
    sp->has_last = number(&p, &sp->last);
    p = skip_ws(p);
    if (!sp->has_first && !sp->has_last)
        return err_fail(EINVAL, "malformed Range: a range needs a first position or a suffix length");
    if (*p != ',' && *p != '\0')
        return err_fail(EINVAL, "malformed Range: unexpected '%c'", *p);
    if (sp->has_first && sp->has_last && sp->last < sp->first)
        return err_fail(EINVAL, "malformed Range: last position %llu is before first position %llu",
                        (unsigned long long)sp->last, (unsigned long long)sp->first);
    *pp = p;
    return 0;
}

int api_parse_range(const char *value, uint64_t size, uint64_t *start, uint64_t *len)
{
    const char *p = skip_ws(value);
    if (strncasecmp(p, "bytes", 5))
        return err_fail(EINVAL, "malformed Range: only the unit \"bytes\" is supported");
    p = skip_ws(p + 5);
    if (*p++ != '=')
        return err_fail(EINVAL, "malformed Range: expected '=' after \"bytes\"");
    struct spec sp;
    unsigned n = 0;
    for (;;) {
        struct spec one;
        int ret = parse_spec(&p, &one);
        if (ret < 0)
            return ret;
        if (n++ == 0)
            sp = one;
        if (*p != ',')
            break;
        p++;
    }
    if (n > 1)
        return err_fail(ERANGE, "multiple ranges are not supported: ask for one range per request");
    if (!sp.has_first) { /* suffix: the last n bytes */
        if (sp.last == 0)
            return err_fail(ERANGE, "range not satisfiable: the suffix length is 0");
        if (size == 0)
            return err_fail(ERANGE, "range not satisfiable: the disk is empty");
        *len = sp.last < size ? sp.last : size;
        *start = size - *len;
        return 0;
    }
    if (sp.first >= size)
        return err_fail(ERANGE, "range not satisfiable: it starts at %llu, the disk has %llu bytes",
                        (unsigned long long)sp.first, (unsigned long long)size);
    uint64_t last = sp.has_last && sp.last < size - 1 ? sp.last : size - 1;
    *start = sp.first;
    *len = last - sp.first + 1;
    return 0;
}

/* Digits at *p into *v (at most 19, so no overflow). */
static bool digits(const char **p, uint64_t *v)
{
    const char *s = *p;
    uint64_t n = 0;
    while (*s >= '0' && *s <= '9' && s - *p < 19)
        n = n * 10 + (uint64_t)(*s++ - '0');
    if (s == *p || (*s >= '0' && *s <= '9'))
        return false;
    *v = n;
    *p = s;
    return true;
}

int api_parse_content_range(const char *v, uint64_t *first, uint64_t *last, uint64_t *complete)
{
    const char *p = v;
    while (*p == ' ')
        p++;
    bool ok = !strncasecmp(p, "bytes ", 6);
    p += ok ? 6 : 0;
    ok = ok && digits(&p, first) && *p++ == '-' && digits(&p, last) && *p++ == '/';
    if (ok && *p == '*') {
        *complete = UINT64_MAX;
        p++;
    } else {
        ok = ok && digits(&p, complete);
    }
    while (ok && *p == ' ')
        p++;
    if (!ok || *p)
        return err_fail(EINVAL, "malformed Content-Range: expected \"bytes FIRST-LAST/SIZE\" or \"bytes FIRST-LAST/*\"");
    if (*last < *first)
        return err_fail(EINVAL, "malformed Content-Range: last position %" PRIu64 " is before first position %" PRIu64,
                        *last, *first);
    return 0;
}

int api_parse_content_range_size(const char *v, uint64_t *complete)
{
    const char *p = v;
    while (*p == ' ')
        p++;
    bool ok = !strncasecmp(p, "bytes */", 8);
    p += ok ? 8 : 0;
    ok = ok && digits(&p, complete);
    while (ok && *p == ' ')
        p++;
    return ok && !*p ? 0 : -EINVAL;
}

char *api_decode(const char *s, size_t len)
{
    char *out = malloc(len + 1), *o = out;
    if (!out) {
        err_set("out of memory");
        return NULL;
    }
    for (size_t i = 0; i < len; i++) {
        if (s[i] != '%') {
            *o++ = s[i];
            continue;
        }
        int hi = i + 1 < len ? auth_hexval(s[i + 1]) : -1;
        int lo = i + 2 < len ? auth_hexval(s[i + 2]) : -1;
        if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
            free(out);
            err_set(hi < 0 || lo < 0 ? "malformed %%-escape in the URL" : "the URL contains an encoded NUL (%%00)");
            return NULL;
        }
        *o++ = (char)(hi * 16 + lo);
        i += 2;
    }
    *o = '\0';
    return out;
}

/* ---- ranged bodies: GET .../data, GET .../file ---- */

/* Ranges up to this many bytes are read before answering, into one buffer: no
 * stream state, no reader block for MHD to allocate and zero, one read, and a
 * failed read becomes a JSON error instead of a cut-off body. Longer ones stream
 * in blocks of RANGE_BLOCK. 1 MiB (a common client chunk) measured 10-20% less CPU
 * per request than streaming it, at the same peak RSS with 64 clients. The cost:
 * a client that stops reading holds up to this much per request it has open. */
#define RANGE_INLINE (1024u << 10)
#define RANGE_BLOCK  (256u << 10)

/* Ranges from this size up that are one run of a file go out with sendfile.
 * Below it the copy is cheaper than a descriptor per answer and a send from
 * the file (CPU per request, 8 clients: 4 KiB 0.035 ms copied vs 0.044 ms sent,
 * even at 32 KiB, 64 KiB 0.063 vs 0.048, 1 MiB 0.55 vs 0.25); and a cluster
 * read only in small pieces is never copied on its next write (pin.c). */
#define RANGE_SENDFILE_MIN (32u << 10)

struct range_stream {
    struct api_source src;
    struct req *r;  /* for the byte count; valid while MHD calls the reader */
    uint64_t start; /* source offset of the body's first byte */
    uint64_t len;   /* body bytes */
    bool released;  /* src let go once its last byte was read */
};

static ssize_t range_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct range_stream *rs = cls;
    if (pos >= rs->len)
        return MHD_CONTENT_READER_END_OF_STREAM;
    if (max > rs->len - pos)
        max = (size_t)(rs->len - pos);
    int ret = rs->src.pread(rs->src.ctx, buf, max, rs->start + pos);
    if (ret < 0) {
        fprintf(stderr, "qcowd: %s: read at %" PRIu64 ": %s\n", rs->src.what, rs->start + pos, err_msg(ret));
        return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    rs->r->bytes += max;
    if (pos + max == rs->len) {
        /* every byte is in MHD's hands: the source (a download's hold on the
         * image) goes now, not when MHD calls range_free after the last send,
         * which may come after the client has the last byte and sends a write */
        rs->src.release(rs->src.ctx);
        rs->released = true;
    }
    return (ssize_t)max;
}

static void range_free(void *cls)
{
    struct range_stream *rs = cls;
    if (!rs->released)
        rs->src.release(rs->src.ctx);
    free(rs);
}

/* The body of [start, start+len): read now when short (not for HEAD, whose body
 * is never sent), else a stream that owns src. NULL with *res queued (an error) or
 * MHD_NO (out of memory); src is released in every case but a stream's. */
static struct MHD_Response *range_body(struct req *r, const struct api_source *src, uint64_t start, uint64_t len,
                                       enum MHD_Result *res)
{
    *res = MHD_NO;
    int fd;
    uint64_t fd_off;
    if (!r->head && !r->no_sendfile && len >= RANGE_SENDFILE_MIN && src->pin && src->pin(src->ctx, start, len, &fd, &fd_off) == 1) {
        /* one run of a file: the kernel sends it from the page cache (sendfile)
         * with no copy through us; the source stays pinned until the request
         * is over, MHD closes its own descriptor */
        int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        struct MHD_Response *resp =
            own < 0 ? NULL : MHD_create_response_from_fd_at_offset64(len, own, (int64_t)fd_off);
        if (!resp) {
            if (own >= 0)
                close(own);
            src->release(src->ctx);
            return NULL;
        }
        r->done = src->release;
        r->done_ctx = src->ctx;
        r->bytes += len;
        atomic_fetch_add(&r->metrics->sendfile, 1);
        return resp;
    }
    if (len <= RANGE_INLINE && !r->head) {
        char *buf = malloc(len ? (size_t)len : 1);
        int ret = buf ? src->pread(src->ctx, buf, (size_t)len, start) : -ENOMEM;
        src->release(src->ctx);
        if (ret < 0) {
            free(buf);
            if (ret != -ENOMEM)
                *res = api_reply_errno(r, ret);
            return NULL;
        }
        struct MHD_Response *resp = MHD_create_response_from_buffer((size_t)len, buf, MHD_RESPMEM_MUST_FREE);
        if (!resp)
            free(buf);
        else
            r->bytes += len;
        return resp;
    }
    struct range_stream *rs = malloc(sizeof *rs);
    if (!rs) {
        src->release(src->ctx);
        return NULL;
    }
    *rs = (struct range_stream){.src = *src, .r = r, .start = start, .len = len};
    /* MHD allocates (and zeroes) a block of this size per response: no bigger
     * than the body */
    size_t block = len < RANGE_BLOCK ? (len ? (size_t)len : 1) : RANGE_BLOCK;
    struct MHD_Response *resp = MHD_create_response_from_callback(len, block, range_read, rs, range_free);
    if (!resp)
        range_free(rs);
    return resp;
}

enum MHD_Result api_reply_ranged(struct req *r, uint64_t size, const struct api_source *src)
{
    uint64_t start = 0, len = size;
    char cr[96];
    const char *range = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_RANGE);
    if (range && !api_if_range(r))
        range = NULL; /* If-Range names another version: the whole new body, not a piece to join to the old */
    if (range) {
        int ret = api_parse_range(range, size, &start, &len);
        if (ret < 0) {
            src->release(src->ctx);
            if (ret != -ERANGE)
                return api_reply_errno(r, ret);
            snprintf(cr, sizeof cr, "bytes */%" PRIu64, size);
            return api_reply_status(r, 416, api_errno_code(ret), err_msg(ret), MHD_HTTP_HEADER_CONTENT_RANGE, cr);
        }
        snprintf(cr, sizeof cr, "bytes %" PRIu64 "-%" PRIu64 "/%" PRIu64, start, start + len - 1, size);
    }
    enum MHD_Result res;
    struct MHD_Response *resp = range_body(r, src, start, len, &res);
    if (!resp)
        return res;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/octet-stream");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_ACCEPT_RANGES, "bytes");
    if (range)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_RANGE, cr);
    return api_queue(r, range ? 206 : 200, resp);
}
