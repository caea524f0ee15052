/* range.c: the parsers for what arrives in a request line and headers: one
 * "Range: bytes=..." and %XX escapes in path segments and query values. */
#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

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

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
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
        int hi = i + 1 < len ? hexval(s[i + 1]) : -1;
        int lo = i + 2 < len ? hexval(s[i + 2]) : -1;
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
