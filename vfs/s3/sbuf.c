/* sbuf.c: growable strings, URI encoding and the few bits of XML reading the
 * S3 answers need (ListObjectsV2, errors, multipart ids). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "s3_int.h"

static int grow(struct sbuf *b, size_t extra)
{
    if (b->oom)
        return -1;
    if (b->len + extra + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->oom = 1;
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

void sbuf_add(struct sbuf *b, const void *data, size_t n)
{
    if (grow(b, n) < 0)
        return;
    memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void sbuf_puts(struct sbuf *b, const char *s)
{
    sbuf_add(b, s, strlen(s));
}

void sbuf_printf(struct sbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || grow(b, (size_t)n) < 0)
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void sbuf_free(struct sbuf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

const char *sbuf_str(struct sbuf *b)
{
    if (b->oom)
        return NULL;
    return b->p ? b->p : "";
}

void s3_uri_encode(struct sbuf *b, const char *s, int keep_slash)
{
    static const char hex[] = "0123456789ABCDEF";
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        unsigned char c = *p;
        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
            c == '_' || c == '.' || c == '~' || (keep_slash && c == '/')) {
            sbuf_add(b, &c, 1);
        } else {
            char e[3] = {'%', hex[c >> 4], hex[c & 15]};
            sbuf_add(b, e, 3);
        }
    }
}

/* Decode the five named entities and numeric ones (&#NN; &#xNN;, ASCII only:
 * S3 keys we write are ASCII; others are passed through as UTF-8 anyway). */
static void xml_decode(struct sbuf *b, const char *s, size_t n)
{
    static const struct {
        const char *ent;
        char ch;
    } ents[] = {{"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''}};
    for (size_t i = 0; i < n;) {
        if (s[i] == '&') {
            size_t k;
            for (k = 0; k < sizeof ents / sizeof ents[0]; k++) {
                size_t el = strlen(ents[k].ent);
                if (i + el <= n && !memcmp(s + i, ents[k].ent, el)) {
                    sbuf_add(b, &ents[k].ch, 1);
                    i += el;
                    break;
                }
            }
            if (k < sizeof ents / sizeof ents[0])
                continue;
            if (i + 2 < n && s[i + 1] == '#') {
                char *end;
                int x = s[i + 2] == 'x';
                long v = strtol(s + i + 2 + x, &end, x ? 16 : 10);
                if (*end == ';' && v > 0 && v < 128) {
                    char ch = (char)v;
                    sbuf_add(b, &ch, 1);
                    i = (size_t)(end - s) + 1;
                    continue;
                }
            }
        }
        sbuf_add(b, s + i, 1);
        i++;
    }
}

static char *xml_find(const char *xml, const char *tag, const char **pos, int decode)
{
    char open[64], close[64];
    snprintf(open, sizeof open, "<%s>", tag);
    snprintf(close, sizeof close, "</%s>", tag);
    const char *from = pos && *pos ? *pos : xml;
    const char *a = strstr(from, open);
    if (!a)
        return NULL;
    a += strlen(open);
    const char *e = strstr(a, close);
    if (!e)
        return NULL;
    struct sbuf b = {0};
    if (decode)
        xml_decode(&b, a, (size_t)(e - a));
    else
        sbuf_add(&b, a, (size_t)(e - a));
    if (pos)
        *pos = e + strlen(close);
    if (b.oom) {
        sbuf_free(&b);
        return NULL;
    }
    return b.p ? b.p : strdup("");
}

char *s3_xml_next(const char *xml, const char *tag, const char **pos)
{
    return xml_find(xml, tag, pos, 1);
}

char *s3_xml_raw(const char *xml, const char *tag, const char **pos)
{
    return xml_find(xml, tag, pos, 0);
}
