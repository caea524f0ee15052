/* uploads.c: one page of a ListMultipartUploads answer, parsed and checked (no
 * network here, so the unit tests and the fuzzer take it alone). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "s3_int.h"

/* S3's limits: a key is at most 1024 bytes; an answer holds at most 1000
 * uploads (what max-uploads asks). Anything past them is not a store's answer. */
#define KEY_MAX  1024
#define ID_MAX   1024
#define PAGE_MAX 1000

int64_t s3_iso_time(const char *s)
{
    struct tm tm = {0};
    const char *end = s ? strptime(s, "%Y-%m-%dT%H:%M:%S", &tm) : NULL;
    if (!end)
        return -1;
    if (*end == '.') /* a fraction of a second, dropped */
        for (end++; *end >= '0' && *end <= '9'; end++)
            ;
    if (strcmp(end, "Z") && strcmp(end, "+00:00"))
        return -1;
    time_t t = timegm(&tm);
    return t < 0 ? -1 : (int64_t)t;
}

/* The text of <tag> in block, at most max bytes, or NULL (*err set to -EPROTO
 * when it is too long, -ENOMEM). Missing: NULL with *err untouched. */
static char *field(const char *block, const char *tag, size_t max, int *err)
{
    char *v = s3_xml_next(block, tag, NULL);
    if (v && strlen(v) > max) {
        free(v);
        *err = -EPROTO;
        return NULL;
    }
    return v;
}

void s3_uploads_page_free(struct s3_uploads_page *pg)
{
    free(pg->next_key);
    free(pg->next_id);
    pg->next_key = pg->next_id = NULL;
}

int s3_uploads_parse(const char *xml, const char *prefix, s3_upload_fn cb, void *ctx,
                     struct s3_uploads_page *pg)
{
    int ret = 0;
    unsigned n = 0;
    size_t pl = strlen(prefix);
    char *last_key = NULL, *last_id = NULL, *block;
    const char *pos = xml;
    s3_uploads_page_free(pg);
    pg->truncated = 0;
    if (!strstr(xml, "<ListMultipartUploadsResult"))
        return -EPROTO;
    while (ret == 0 && (block = s3_xml_raw(xml, "Upload", &pos))) {
        char *key = field(block, "Key", KEY_MAX, &ret), *id = field(block, "UploadId", ID_MAX, &ret),
             *init = field(block, "Initiated", 64, &ret);
        free(block);
        if (ret == 0 && (!key || !id || !*id || ++n > PAGE_MAX))
            ret = -EPROTO;
        if (ret == 0 && !strncmp(key, prefix, pl)) /* a store that ignored the prefix: the others stay */
            ret = cb(ctx, key, id, s3_iso_time(init));
        free(init);
        free(last_key);
        free(last_id);
        last_key = key;
        last_id = id;
    }
    if (ret == 0) {
        char *trunc = s3_xml_next(xml, "IsTruncated", NULL);
        pg->truncated = trunc && !strcmp(trunc, "true");
        free(trunc);
    }
    if (ret == 0 && pg->truncated) {
        /* the markers of the next page; Swift may leave them empty: the last
         * upload of this page is where the next one starts */
        pg->next_key = field(xml, "NextKeyMarker", KEY_MAX, &ret);
        pg->next_id = field(xml, "NextUploadIdMarker", ID_MAX, &ret);
        if (ret == 0 && (!pg->next_key || !*pg->next_key)) {
            free(pg->next_key);
            free(pg->next_id);
            pg->next_key = last_key;
            pg->next_id = last_id;
            last_key = last_id = NULL;
        }
        if (ret == 0 && (!pg->next_key || !*pg->next_key))
            ret = -EPROTO; /* truncated, and nothing says where it goes on */
        if (ret == 0 && !pg->next_id && !(pg->next_id = strdup("")))
            ret = -ENOMEM;
    }
    free(last_key);
    free(last_id);
    if (ret < 0)
        s3_uploads_page_free(pg);
    return ret;
}
