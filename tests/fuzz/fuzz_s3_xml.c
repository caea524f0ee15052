/* fuzz_s3_xml.c: libFuzzer target for what the s3 plugin reads from a store's
 * XML answers: a ListMultipartUploads page (uploads.c: every upload passed on
 * is under the prefix and within S3's bounds, the next markers set exactly
 * when truncated), the element reader and entity decoder, ISO 8601 times. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "s3_int.h"

struct count {
    const char *prefix;
    unsigned n;
};

static int seen(void *ctx, const char *key, const char *id, int64_t initiated)
{
    struct count *c = ctx;
    CHECK(!strncmp(key, c->prefix, strlen(c->prefix)));
    CHECK(strlen(key) <= 1024 && *id && strlen(id) <= 1024 && initiated >= -1);
    c->n++;
    return c->n == 700 ? -ECANCELED : 0; /* a callback's stop is passed back */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* the first byte picks the prefix the listing asked for */
    static const char *const prefixes[] = {"", "p/", "case1/", "&amp;"};
    if (size < 1)
        return 0;
    char *xml = malloc(size);
    if (!xml)
        return 0;
    memcpy(xml, data + 1, size - 1);
    xml[size - 1] = '\0';
    struct count c = {.prefix = prefixes[data[0] % 4]};
    struct s3_uploads_page pg = {.truncated = 7};
    int r = s3_uploads_parse(xml, c.prefix, seen, &c, &pg);
    CHECK(r == 0 || r == -EPROTO || r == -ENOMEM || r == -ECANCELED);
    CHECK(c.n <= 1000);
    if (r == 0 && pg.truncated)
        CHECK(pg.next_key && *pg.next_key && pg.next_id);
    else
        CHECK(!pg.next_key && !pg.next_id && (r < 0 || pg.truncated == 0));
    s3_uploads_page_free(&pg);
    const char *pos = NULL;
    char *v;
    for (int i = 0; i < 4 && (v = s3_xml_next(xml, "Key", &pos)); i++) {
        CHECK(strlen(v) < size);
        (void)s3_iso_time(v);
        free(v);
    }
    free(xml);
    return 0;
}
