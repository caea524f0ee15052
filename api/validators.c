/* validators.c: HTTP validators of image answers (a strong ETag, Last-Modified)
 * and the conditional requests built on them: If-Match, If-None-Match,
 * If-Modified-Since, If-Unmodified-Since and If-Range (RFC 9110 section 13). */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "api_int.h"
#include "catalog.h"
#include "err.h"
#include "qcow2.h"

/* ---- the entity-tag ----
 * "NNNNNNNNNNNNNNNN-SEQ-GEN": N is 64 bits mixed from a random number drawn
 * once per process and the file's identity when the handle opened it; SEQ is
 * which open of the catalog that handle is; GEN the engine's count of changes
 * made through it since. So a tag never repeats: not within a handle (GEN only
 * grows, and moves before a change is visible), not across handles (SEQ), not
 * across restarts (the random number), and a file changed behind the daemon's
 * back, replaced, or rewritten by a job through a handle of its own is opened
 * again by the catalog (a new SEQ). The price is a new tag for the same bytes
 * after a restart or after the image left the cache: a client then downloads
 * again from the start, which is the safe side. */

static uint64_t nonce;
static pthread_once_t nonce_once = PTHREAD_ONCE_INIT;

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void draw_nonce(void)
{
    uint64_t v = 0;
    if (getrandom(&v, sizeof v, 0) != (ssize_t)sizeof v) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        v = mix((uint64_t)ts.tv_sec ^ mix((uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 32)));
    }
    nonce = v;
}

/* FNV-1a over n bytes, continuing h. */
static uint64_t fnv(uint64_t h, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 0x100000001b3ull;
    return h;
}

void api_validators_image(struct req *r, const struct catalog_image *ci, bool snapshot)
{
    pthread_once(&nonce_once, draw_nonce);
    struct catalog_identity id;
    catalog_image_identity(ci, &id);
    struct qcow2_image *img = catalog_image_qcow2(ci);
    struct qcow2_changes ch;
    qcow2_get_changes(img, &ch);
    uint64_t n = mix(
        nonce ^ mix(id.size ^ mix((uint64_t)id.mtime ^ mix((uint64_t)id.mtime_nsec ^ mix(id.ino ^ mix(id.version))))));
    struct api_validators *v = &r->val;
    /* a snapshot's bytes change only with the snapshot table: writes to the
     * active image leave its tag alone */
    if (snapshot)
        snprintf(v->etag, sizeof v->etag, "\"%016" PRIx64 "-%" PRIx64 "-s%" PRIx64 "\"", n, id.seq, ch.snap_generation);
    else
        snprintf(v->etag, sizeof v->etag, "\"%016" PRIx64 "-%" PRIx64 "-%" PRIx64 "\"", n, id.seq, ch.generation);
    /* Last-Modified: our last change, else the file's mtime at the open; never
     * later than now. As a validator on its own (a date in If-Range or
     * If-*-Since) it is strong only when it names one representation: the
     * last change is in a second of its own, after the one before it (of this
     * handle, or the open) and after the file's mtime at the open. */
    time_t now = time(NULL);
    v->lm = ch.generation ? ch.changed : id.mtime;
    if (v->lm > (int64_t)now)
        v->lm = (int64_t)now;
    v->lm_strong = ch.generation && ch.changed > ch.before && ch.changed > id.mtime && ch.changed <= (int64_t)now;
    v->img = img;
    v->gen = ch.generation;
    v->set = true;
}

void api_validators_body(struct req *r, const char *a, const char *b)
{
    struct api_validators *v = &r->val;
    size_t len = strlen(v->etag);
    if (!v->set || len < 2 || len + 10 > sizeof v->etag)
        return;
    uint64_t h = fnv(fnv(0xcbf29ce484222325ull, a, strlen(a)), b, strlen(b));
    snprintf(v->etag + len - 1, sizeof v->etag - (len - 1), "-%08" PRIx32 "\"", (uint32_t)(h ^ (h >> 32)));
}

/* ---- parsers ---- */

static const char *ows(const char *p)
{
    while (*p == ' ' || *p == '\t')
        p++;
    return p;
}

/* api_etag_match; family: a tag of the same image state that only adds a body
 * hash (api_validators_body: "...-HHHHHHHH\"") matches too, so a change of an
 * image accepts its info's tag as well as its data's. */
static int match_list(const char *field, const char *etag, bool weak, bool family)
{
    const char *p = ows(field);
    if (*p == '*') {
        p = ows(p + 1);
        if (*p)
            return err_fail(EINVAL, "malformed entity-tag list: '*' must stand alone");
        return etag != NULL;
    }
    /* the current tag without W/ and quotes: ours are always strong */
    const char *cur = etag && etag[0] == '"' ? etag : NULL;
    size_t clen = cur ? strlen(cur) : 0;
    bool match = false, any = false;
    for (;;) {
        p = ows(p);
        if (*p == ',') { /* empty list elements are allowed */
            p++;
            continue;
        }
        if (!*p)
            break;
        bool w = false;
        if (p[0] == 'W' && p[1] == '/') {
            w = true;
            p += 2;
        }
        if (*p != '"')
            return err_fail(EINVAL, "malformed entity-tag list: expected a quoted tag at '%.20s'", p);
        const char *q = p + 1;
        while (*q && *q != '"') {
            unsigned char ch = (unsigned char)*q;
            if (ch < 0x21 || ch == 0x7f)
                return err_fail(EINVAL, "malformed entity-tag list: a control character or space in a tag");
            q++;
        }
        if (*q != '"')
            return err_fail(EINVAL, "malformed entity-tag list: unterminated tag");
        q++;
        size_t tlen = (size_t)(q - p);
        /* strong comparison: both strong and the same; weak: the same opaque part */
        bool same = cur && tlen == clen && !memcmp(p, cur, clen);
        if (cur && family && tlen == clen + 9 && !memcmp(p, cur, clen - 1) && p[clen - 1] == '-')
            same = true;
        if (same && (weak || !w))
            match = true;
        any = true;
        p = ows(q);
        if (*p && *p != ',')
            return err_fail(EINVAL, "malformed entity-tag list: expected ',' at '%.20s'", p);
    }
    if (!any)
        return err_fail(EINVAL, "malformed entity-tag list: no tag");
    return match;
}

int api_etag_match(const char *field, const char *etag, bool weak)
{
    return match_list(field, etag, weak, false);
}

static const char *const wdays[7] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
static const char *const months[12] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};

/* Days since 1970-01-01 of a proleptic Gregorian date (m 1..12). */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

static bool num(const char **p, unsigned digits, unsigned *out)
{
    unsigned v = 0;
    for (unsigned i = 0; i < digits; i++) {
        char c = (*p)[i];
        if (c < '0' || c > '9')
            return false;
        v = v * 10 + (unsigned)(c - '0');
    }
    *p += digits;
    *out = v;
    return true;
}

/* A month's three letters at *p: 1..12, *p moved past them; else false. */
static bool month(const char **p, int *m)
{
    for (int i = 0; i < 12; i++)
        if (!strncmp(*p, months[i], 3)) {
            *m = i + 1;
            *p += 3;
            return true;
        }
    return false;
}

static bool hms(const char **p, unsigned *h, unsigned *mi, unsigned *s)
{
    return num(p, 2, h) && *(*p)++ == ':' && num(p, 2, mi) && *(*p)++ == ':' && num(p, 2, s) && *h < 24 && *mi < 60 &&
           *s < 61;
}

int api_parse_http_date(const char *s, int64_t *out)
{
    const char *p = ows(s);
    unsigned d = 0, y = 0, h = 0, mi = 0, sec = 0;
    int m = 0;
    const char *comma = strchr(p, ',');
    bool ok;
    if (comma && comma - p == 3) { /* IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT */
        p = comma + 1;
        ok = *p++ == ' ' && num(&p, 2, &d) && *p++ == ' ' && month(&p, &m) && *p++ == ' ' && num(&p, 4, &y) &&
             *p++ == ' ' && hms(&p, &h, &mi, &sec) && !strncmp(p, " GMT", 4);
        p += ok ? 4 : 0;
    } else if (comma && comma - p >= 6 && comma - p <= 9) { /* rfc850: Sunday, 06-Nov-94 08:49:37 GMT */
        p = comma + 1;
        ok = *p++ == ' ' && num(&p, 2, &d) && *p++ == '-' && month(&p, &m) && *p++ == '-' && num(&p, 2, &y) &&
             *p++ == ' ' && hms(&p, &h, &mi, &sec) && !strncmp(p, " GMT", 4);
        p += ok ? 4 : 0;
        /* its two-digit year: 70..99 the 1900s, 00..69 the 2000s */
        y += y < 70 ? 2000 : 1900;
    } else { /* asctime: Sun Nov  6 08:49:37 1994 */
        ok = strlen(p) >= 24 && p[3] == ' ';
        p += ok ? 4 : 0;
        ok = ok && month(&p, &m) && *p == ' ';
        if (ok) {
            p++;
            if (*p == ' ')
                p++, ok = num(&p, 1, &d);
            else
                ok = num(&p, 2, &d);
            ok = ok && *p++ == ' ' && hms(&p, &h, &mi, &sec) && *p++ == ' ' && num(&p, 4, &y);
        }
    }
    if (!ok || *ows(p) || d < 1 || d > 31 || m < 1)
        return err_fail(EINVAL, "malformed HTTP date: expected e.g. \"Sun, 06 Nov 1994 08:49:37 GMT\"");
    *out = days_from_civil(y, (unsigned)m, d) * 86400 + h * 3600 + mi * 60 + (sec > 59 ? 59 : sec);
    return 0;
}

void api_format_http_date(int64_t t, char out[API_DATE_MAX])
{
    time_t tt = (time_t)t;
    struct tm tm;
    if (!gmtime_r(&tt, &tm)) {
        snprintf(out, API_DATE_MAX, "Thu, 01 Jan 1970 00:00:00 GMT");
        return;
    }
    snprintf(out, API_DATE_MAX, "%s, %02d %s %04d %02d:%02d:%02d GMT", wdays[tm.tm_wday % 7], tm.tm_mday,
             months[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/* ---- conditional requests ---- */

static const char *header(struct req *r, const char *name)
{
    return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, name);
}

/* Whether the representation is unchanged since date d: its last change falls
 * before d's second, or in it when that date names it alone (lm_strong). */
static bool unchanged_since(const struct api_validators *v, int64_t d)
{
    return v->lm < d || (v->lm == d && v->lm_strong);
}

static enum MHD_Result precondition_failed(struct req *r, const char *why)
{
    char msg[200];
    if (r->val.set)
        snprintf(msg, sizeof msg, "precondition failed: %s; the current ETag is %s", why, r->val.etag);
    else
        snprintf(msg, sizeof msg, "precondition failed: %s", why);
    return api_reply_status(r, 412, "precondition-failed", msg, NULL, NULL);
}

/* The current tag as api_etag_match takes it: NULL when nothing exists, ""
 * when something exists but has no tag (a broken image). */
static const char *current(const struct req *r, bool exists)
{
    return !exists ? NULL : r->val.set ? r->val.etag : "";
}

/* Steps 1 to 4 of RFC 9110 13.2.2 for r. read: a GET or HEAD (If-None-Match
 * then answers 304, and If-Modified-Since counts). exists: whether the target
 * exists (r->val set when it has validators). */
static bool evaluate(struct req *r, bool read, bool exists, enum MHD_Result *res)
{
    const char *im = header(r, MHD_HTTP_HEADER_IF_MATCH), *inm = header(r, MHD_HTTP_HEADER_IF_NONE_MATCH);
    const struct api_validators *v = &r->val;
    int64_t d;
    if (im) {
        int m = match_list(im, current(r, exists), false, !read);
        if (m < 0) {
            *res = api_reply_errno(r, m);
            return false;
        }
        if (!m) {
            *res = precondition_failed(r, exists ? "If-Match names no current ETag" : "If-Match: nothing exists");
            return false;
        }
    } else if (exists && v->set && (im = header(r, MHD_HTTP_HEADER_IF_UNMODIFIED_SINCE)) &&
               api_parse_http_date(im, &d) == 0 && !unchanged_since(v, d)) {
        *res = precondition_failed(r, "modified since the If-Unmodified-Since date");
        return false;
    }
    if (inm) {
        int m = api_etag_match(inm, current(r, exists), true);
        if (m < 0) {
            *res = api_reply_errno(r, m);
            return false;
        }
        if (m) {
            *res = read ? api_reply_empty(r, 304, NULL, NULL)
                        : precondition_failed(r, exists && !strchr(inm, '"') ? "If-None-Match: * and it exists"
                                                                             : "If-None-Match names the current ETag");
            return false;
        }
    } else if (read && exists && v->set && (inm = header(r, MHD_HTTP_HEADER_IF_MODIFIED_SINCE)) &&
               api_parse_http_date(inm, &d) == 0 && unchanged_since(v, d)) {
        *res = api_reply_empty(r, 304, NULL, NULL);
        return false;
    }
    return true;
}

bool api_check_read(struct req *r, enum MHD_Result *res)
{
    return evaluate(r, true, true, res);
}

/* Atomicity: two clients that read the same ETag and send it in If-Match must
 * not both write. The comparison above is against the generation read when
 * r->val was made; the claim then moves that generation on only if it is
 * still the same (one compare-and-set under the engine's change lock), so of
 * two such writers exactly one claims it and the other answers 412, whatever
 * the order of their bodies' writes. A write that does not ask (no If-Match)
 * may still land between the claim and the claimant's first write: unordered
 * writers are unordered, as without validators. */
bool api_check_write(struct req *r, const struct catalog_image *ci, enum MHD_Result *res)
{
    if (ci)
        api_validators_image(r, ci, false);
    if (!evaluate(r, false, true, res))
        return false;
    const char *im = header(r, MHD_HTTP_HEADER_IF_MATCH);
    if (im && r->val.set && strchr(im, '"') && qcow2_claim_generation(r->val.img, r->val.gen) < 0) {
        *res = precondition_failed(r, "the image changed while If-Match was checked");
        return false;
    }
    r->val.set = false; /* what a change answers is not the image's representation */
    return true;
}

bool api_check_absent(struct req *r, enum MHD_Result *res)
{
    return evaluate(r, false, false, res);
}

bool api_has_preconditions(struct req *r)
{
    return header(r, MHD_HTTP_HEADER_IF_MATCH) || header(r, MHD_HTTP_HEADER_IF_NONE_MATCH) ||
           header(r, MHD_HTTP_HEADER_IF_UNMODIFIED_SINCE);
}

bool api_if_none_match_any(struct req *r)
{
    const char *inm = header(r, MHD_HTTP_HEADER_IF_NONE_MATCH);
    return inm && *ows(inm) == '*';
}

bool api_if_range(struct req *r)
{
    const char *ir = header(r, MHD_HTTP_HEADER_IF_RANGE);
    if (!ir)
        return true;
    const struct api_validators *v = &r->val;
    if (!v->set)
        return false;
    const char *p = ows(ir);
    if (*p == '"' || (p[0] == 'W' && p[1] == '/')) /* one entity-tag, compared strongly */
        return api_etag_match(p, v->etag, false) == 1 && !strchr(p, ',');
    int64_t d;
    return api_parse_http_date(p, &d) == 0 && d == v->lm && v->lm_strong;
}

void api_validator_headers(const struct req *r, unsigned status, struct MHD_Response *resp)
{
    const struct api_validators *v = &r->val;
    if (!v->set || !(status == 200 || status == 206 || status == 304 || status == 412))
        return;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, v->etag);
    if (status == 412)
        return;
    char date[API_DATE_MAX];
    api_format_http_date(v->lm, date);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_LAST_MODIFIED, date);
}
