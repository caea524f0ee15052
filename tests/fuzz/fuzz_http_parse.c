/* fuzz_http_parse.c: libFuzzer target for what qcowd parses from a request line
 * and headers: routing, Range, Content-Range, query arguments and %XX escapes,
 * Host, Origin and Authorization; If-Match/If-None-Match entity-tag lists and
 * HTTP dates (If-Range, If-*-Since); and the --tokens file. */
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "access.h"
#include "api_int.h"
#include "auth.h"
#include "err.h"
#include "fuzz_util.h"

/* The first byte picks the parser; the rest is its text (NUL-terminated copy). */
enum { P_ROUTE, P_RANGE, P_CONTENT_RANGE, P_QUERY, P_ACCESS, P_TOKENS, P_VALIDATORS, P_COUNT };

static void fuzz_route(const char *text)
{
    /* "METHOD PATH": the method is what comes before the first space */
    char method[16] = "GET";
    const char *path = text, *sp = strchr(text, ' ');
    if (sp && (size_t)(sp - text) < sizeof method) {
        memcpy(method, text, (size_t)(sp - text));
        method[sp - text] = '\0';
        path = sp + 1;
    }
    struct api_routing rt;
    int ret = api_route(method, path, &rt);
    CHECK(rt.nsegs <= API_ROUTE_SEGS);
    if (ret == 0) {
        CHECK(rt.fn != NULL);
        /* every route but health and the dashboard's public files names its role */
        CHECK(rt.role > AUTH_NONE || rt.fn == api_health || rt.fn == api_web_index || rt.fn == api_web_file);
        for (unsigned a = 0; a < API_MAX_ARGS; a++) {
            bool found = rt.args[a] == NULL;
            for (unsigned i = 0; i < rt.nsegs && !found; i++)
                found = rt.args[a] == rt.segs[i];
            CHECK(found); /* a capture is one of the decoded segments */
        }
    } else {
        CHECK(ret == -1 && rt.fn == NULL && rt.code && rt.msg[0]);
        CHECK(rt.status == 400 || rt.status == 404 || rt.status == 405);
        CHECK(rt.status != 405 || rt.allow[0]);
    }
    api_routing_free(&rt);
}

static void fuzz_range(const char *text, uint64_t size)
{
    uint64_t start = 0, len = 0;
    int ret = api_parse_range(text, size, &start, &len);
    if (ret == 0)
        CHECK(len > 0 && start < size && len <= size - start);
    else
        CHECK((ret == -EINVAL || ret == -ERANGE) && err_msg(ret)[0]);
}

static void fuzz_content_range(const char *text)
{
    uint64_t first = 0, last = 0, complete = 0;
    int ret = api_parse_content_range(text, &first, &last, &complete);
    if (ret == 0)
        CHECK(first <= last);
    else
        CHECK(ret == -EINVAL);
    /* the two forms never both match */
    ret = api_parse_content_range_size(text, &complete);
    CHECK(ret == 0 || ret == -EINVAL);
    CHECK(ret < 0 || api_parse_content_range(text, &first, &last, &complete) < 0);
}

static void fuzz_query(const char *text, size_t len)
{
    uint64_t v = 0;
    bool b = false;
    int ret = api_parse_u64_arg("offset", text, &v);
    CHECK(ret == 0 || ret == 1 || ret == -EINVAL);
    ret = api_parse_bool_arg("flush", text, &b);
    CHECK(ret == 0 || ret == 1 || ret == -EINVAL);
    char *d = api_decode(text, len);
    if (d) {
        CHECK(strlen(d) <= len);
        free(d);
    }
}

/* Host, Origin and the bearer header: no crash, and what is admitted looks right. */
static void fuzz_access(const char *text)
{
    static struct access_names names, cors;
    if (!names.n) {
        access_names_add(&names, "qcowd.example.net", "--public-name");
        access_names_add(&cors, "https://dash.example", "--cors-origin");
    }
    if (access_host_allowed(text, &names) && *text)
        CHECK(!strchr(text, '/') && !strchr(text, ' ')); /* a Host never holds a path or a space */
    access_origin_allowed(text, "127.0.0.1:8080", text[0] & 1, &cors);
    const char *tok;
    size_t len;
    if (access_bearer(text, &tok, &len) == 0) {
        CHECK(len > 0 && len <= 512 && tok >= text && tok + len <= text + strlen(text));
        for (size_t i = 0; i < len; i++)
            CHECK((unsigned char)tok[i] > 0x20 && (unsigned char)tok[i] < 0x7f);
    }
}

/* If-Match / If-None-Match lists and HTTP dates: 1, 0 or -EINVAL; a list
 * always matches a tag it names, and a parsed date prints and parses back. */
static void fuzz_validators(const char *text)
{
    static const char *const tags[] = {NULL, "", "\"a\"", "\"7bc5d3b5adf110f4-b-0\""};
    for (size_t i = 0; i < sizeof tags / sizeof tags[0]; i++) {
        int s = api_etag_match(text, tags[i], false), w = api_etag_match(text, tags[i], true);
        CHECK((s == 0 || s == 1 || s == -EINVAL) && (w == 0 || w == 1 || w == -EINVAL));
        CHECK(s != 1 || w == 1);  /* a strong match is a weak one too */
        CHECK(tags[i] || s <= 0); /* nothing exists: nothing matches, not even "*" */
    }
    if (text[0] == '"' && !strchr(text + 1, '"') && strlen(text) < 100) {
        char list[256], tag[128];
        snprintf(tag, sizeof tag, "%s\"", text);
        snprintf(list, sizeof list, "W/\"x\", %s", tag);
        int m = api_etag_match(list, tag, false);
        CHECK(m == 1 || m == -EINVAL); /* -EINVAL: a control character in the tag */
    }
    int64_t t;
    if (api_parse_http_date(text, &t) == 0) {
        char out[API_DATE_MAX];
        int64_t back;
        api_format_http_date(t, out);
        if (t >= 0 && t < 253402300800) /* years 1970..9999 print in four digits */
            CHECK(api_parse_http_date(out, &back) == 0 && back == t);
    } else {
        CHECK(err_msg(EINVAL)[0]);
    }
}

/* The token file: parsed or refused with a message, never half a table. */
static void fuzz_tokens(const uint8_t *data, size_t size)
{
    struct auth_tokens *t = NULL;
    err_clear();
    if (auth_tokens_parse((const char *)data, size, "fuzz", &t) == 0) {
        CHECK(t != NULL);
        for (size_t i = 0; i < t->n; i++)
            CHECK(t->v[i].role >= AUTH_READER && t->v[i].role <= AUTH_ADMIN && t->v[i].name[0]);
        auth_tokens_find(t, (const char *)data, size < 64 ? size : 64);
        auth_tokens_free(t);
    } else {
        CHECK(t == NULL && err_msg(EINVAL)[0]);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    unsigned which = data[0] % P_COUNT;
    data++, size--;
    uint64_t disk = 0;
    if (which == P_RANGE) { /* a disk size: one byte's power of two plus another's */
        if (size < 2)
            return 0;
        disk = (data[0] < 64 ? 1ull << data[0] : 0) + data[1];
        data += 2, size -= 2;
    }
    if (which == P_TOKENS) { /* raw bytes, NULs and all */
        fuzz_tokens(data, size);
        return 0;
    }
    char *text = malloc(size + 1);
    if (!text)
        abort();
    memcpy(text, data, size);
    text[size] = '\0'; /* headers and paths reach us as C strings */
    err_clear();
    switch (which) {
    case P_ROUTE:
        fuzz_route(text);
        break;
    case P_RANGE:
        fuzz_range(text, disk);
        break;
    case P_CONTENT_RANGE:
        fuzz_content_range(text);
        break;
    case P_ACCESS:
        fuzz_access(text);
        break;
    case P_VALIDATORS:
        fuzz_validators(text);
        break;
    default:
        fuzz_query(text, strlen(text));
        break;
    }
    free(text);
    return 0;
}
