/* mpu.c: the requests of a multipart upload (start, copy a part server-side,
 * complete, abort), shared by publishing (object.c) and large copies (s3.c). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "s3_int.h"
#include "s3_obj.h"

int s3_mpu_start(const struct s3_name *n, char **id)
{
    char what[320];
    struct s3_param up = {"uploads", ""};
    struct s3_req r = {.op = S3_OP_OTHER, .method = "POST", .bucket = n->bucket, .key = n->key, .params = &up,
                       .nparams = 1};
    snprintf(what, sizeof what, "%s: start multipart upload", n->uri);
    int ret = s3_http(&r, what);
    *id = ret == 0 ? s3_xml_next(sbuf_str(&r.text) ? r.text.p : "", "UploadId", NULL) : NULL;
    s3_req_free(&r);
    if (ret == 0 && !*id)
        ret = err_fail(EREMOTEIO, "%s: no UploadId in the answer", what);
    if (ret == 0)
        s3_sweep_own(*id);
    return ret;
}

int s3_mpu_put_part(const struct s3_name *n, const char *id, unsigned partno, const void *buf, size_t len,
                    char *etag, size_t cap)
{
    char pn[16], what[320];
    snprintf(pn, sizeof pn, "%u", partno);
    struct s3_param p[2] = {{"partNumber", pn}, {"uploadId", id}};
    struct s3_req r = {.op = S3_OP_PART, .method = "PUT", .bucket = n->bucket, .key = n->key,
                       .params = p, .nparams = 2, .body = buf, .body_len = len};
    snprintf(what, sizeof what, "publish %s: upload part %u", n->uri, partno);
    int ret = s3_http(&r, what);
    if (ret == 0 && !r.etag[0])
        ret = err_fail(EREMOTEIO, "%s: no ETag in the answer", what);
    if (ret == 0)
        snprintf(etag, cap, "%s", r.etag);
    s3_req_free(&r);
    return ret;
}

int s3_mpu_copy_part(const struct s3_name *n, const char *id, unsigned partno, const struct s3_name *src,
                     uint64_t s, uint64_t e, char *etag, size_t cap)
{
    char pn[16], what[320], range[64];
    snprintf(pn, sizeof pn, "%u", partno);
    struct s3_param p[2] = {{"partNumber", pn}, {"uploadId", id}};
    struct sbuf from = {0};
    sbuf_puts(&from, "/");
    s3_uri_encode(&from, src->bucket, 0);
    sbuf_puts(&from, "/");
    s3_uri_encode(&from, src->key, 1);
    snprintf(range, sizeof range, "bytes=%llu-%llu", (unsigned long long)s, (unsigned long long)(e - 1));
    struct s3_hdr hd[2] = {{"x-amz-copy-source", sbuf_str(&from) ? from.p : ""}, {"x-amz-copy-source-range", range}};
    struct s3_req r = {.op = S3_OP_COPY, .method = "PUT", .bucket = n->bucket, .key = n->key, .params = p,
                       .nparams = 2, .hdrs = hd, .nhdrs = 2};
    snprintf(what, sizeof what, "%s: copy part %u from %s", n->uri, partno, src->uri);
    int ret = s3_http(&r, what);
    char *t = ret == 0 ? s3_xml_next(sbuf_str(&r.text) ? r.text.p : "", "ETag", NULL) : NULL;
    if (ret == 0 && !t)
        ret = err_fail(EREMOTEIO, "%s: no ETag in the answer", what);
    if (t) {
        snprintf(etag, cap, "%s", t);
        atomic_fetch_add(&s3_stats.copied_bytes, e - s);
    }
    free(t);
    s3_req_free(&r);
    sbuf_free(&from);
    return ret;
}

/* Whether a Complete that failed (c's last attempt) may have been done by the
 * store all the same: no answer came (a connection cut or a timeout after the
 * store got the request), a 5xx or an error inside a 200 (S3 may finish the
 * upload anyway), or NoSuchUpload, S3's answer to a retry of an upload an
 * earlier attempt completed. Other refusals (403, InvalidPart, ...) are sure. */
static int may_have_completed(int ret, struct s3_req *c)
{
    if (ret == -ENOMEM)
        return 0;
    if (c->status == 0 || c->status >= 500 || c->status / 100 == 2)
        return 1;
    const char *t = c->status == 404 ? sbuf_str(&c->text) : NULL;
    return t && strstr(t, "<Code>NoSuchUpload</Code>");
}

/* a and b the same ETag, quoted or not */
static int same_etag(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la >= 2 && a[0] == '"' && a[la - 1] == '"')
        a++, la -= 2;
    if (lb >= 2 && b[0] == '"' && b[lb - 1] == '"')
        b++, lb -= 2;
    return la == lb && !strncmp(a, b, la);
}

/* After a Complete that may have been done: the object at n has the ETag this
 * upload gives it (the MD5 of the parts' MD5s, "-N") only if it took effect, so
 * HEAD decides. 0 with *etag set when it did; else ret with its message. */
static int check_completed(const struct s3_name *n, char (*etags)[128], unsigned nparts, char *etag, size_t cap,
                           int ret)
{
    struct err_saved saved;
    char want[128];
    struct s3_head h;
    err_save(&saved, ret);
    if (s3_mpu_etag((const char(*)[128])etags, nparts, want, sizeof want) < 0)
        return err_restore(&saved);
    int r = s3_head_object(n, &h);
    if (r == 0 && same_etag(h.etag, want)) {
        fprintf(stderr,
                "qcowd: s3: %s: CompleteMultipartUpload did take effect (the object has the upload's ETag %s) "
                "although it seemed to fail: %s\n",
                n->uri, want, saved.msg);
        snprintf(etag, cap, "%s", h.etag);
        err_clear();
        return 0;
    }
    if (r == 0)
        return err_fail(-ret, "%s (the object is not the upload's: ETag %s, not %s)", saved.msg, h.etag, want);
    return err_fail(-ret, "%s (and asking whether it took effect failed: %s)", saved.msg, err_msg(r));
}

int s3_mpu_complete(const struct s3_name *n, const char *id, char (*etags)[128], unsigned nparts, char *etag,
                    size_t cap)
{
    char what[320];
    struct sbuf body = {0};
    sbuf_puts(&body, "<CompleteMultipartUpload>");
    for (unsigned i = 0; i < nparts; i++)
        sbuf_printf(&body, "<Part><PartNumber>%u</PartNumber><ETag>%s</ETag></Part>", i + 1, etags[i]);
    sbuf_puts(&body, "</CompleteMultipartUpload>");
    struct s3_param cp = {"uploadId", id};
    struct s3_req c = {.op = S3_OP_OTHER, .method = "POST", .bucket = n->bucket, .key = n->key, .params = &cp,
                       .nparams = 1, .body = body.p, .body_len = body.len};
    snprintf(what, sizeof what, "%s: complete multipart upload", n->uri);
    int ret = sbuf_str(&body) ? s3_http(&c, what) : err_fail(ENOMEM, "%s: out of memory", what);
    const char *t = ret == 0 && sbuf_str(&c.text) ? c.text.p : "";
    if (ret == 0 && strstr(t, "<Error>")) { /* S3 may fail a complete inside a 200 */
        char *code = s3_xml_next(t, "Code", NULL), *m = s3_xml_next(t, "Message", NULL);
        ret = err_fail(EREMOTEIO, "%s: %s: %s", what, code ? code : "error", m ? m : "");
        free(code);
        free(m);
    }
    if (ret == 0) {
        char *e = s3_xml_next(t, "ETag", NULL);
        snprintf(etag, cap, "%s", e ? e : "");
        free(e);
    } else if (may_have_completed(ret, &c)) {
        ret = check_completed(n, etags, nparts, etag, cap, ret);
    }
    if (ret == 0)
        s3_sweep_disown(id);
    s3_req_free(&c);
    sbuf_free(&body);
    return ret;
}

int s3_mpu_abort(const struct s3_name *n, const char *id)
{
    struct s3_param p = {"uploadId", id};
    struct s3_req r = {.op = S3_OP_DELETE, .method = "DELETE", .bucket = n->bucket, .key = n->key, .params = &p,
                       .nparams = 1};
    struct err_saved saved; /* the caller's failure, which the abort follows */
    err_save(&saved, -EIO);
    int ret = s3_http(&r, "abort multipart upload"); /* best effort: a lifecycle rule cleans what stays */
    err_restore(&saved);
    s3_req_free(&r);
    s3_sweep_disown(id);
    return ret;
}

/* The most pages of one listing: a million unfinished uploads. */
#define LIST_PAGES_MAX 1000

int s3_mpu_list(const char *bucket, const char *prefix, s3_upload_fn cb, void *ctx)
{
    char what[320];
    snprintf(what, sizeof what, "list the multipart uploads of s3://%s/%s", bucket, prefix);
    char *km = strdup(""), *im = strdup("");
    struct s3_uploads_page pg = {0};
    int ret = km && im ? 0 : err_fail(ENOMEM, "%s: out of memory", what);
    for (unsigned page = 0; ret == 0; page++) {
        if (page == LIST_PAGES_MAX) {
            ret = err_fail(EPROTO, "%s: more than %u pages", what, LIST_PAGES_MAX);
            break;
        }
        struct s3_param p[5] = {{"uploads", ""}, {"prefix", prefix}, {"max-uploads", "1000"}};
        size_t np = 3;
        if (*km)
            p[np++] = (struct s3_param){"key-marker", km};
        if (*im)
            p[np++] = (struct s3_param){"upload-id-marker", im};
        struct s3_req r = {.op = S3_OP_LIST, .method = "GET", .bucket = bucket, .params = p, .nparams = np};
        ret = s3_http(&r, what);
        const char *t = ret == 0 ? sbuf_str(&r.text) : NULL;
        if (ret == 0 && !t)
            ret = err_fail(ENOMEM, "%s: out of memory", what);
        if (ret == 0) {
            err_clear();
            ret = s3_uploads_parse(t, prefix, cb, ctx, &pg);
            if (ret == -EPROTO)
                ret = err_fail(EPROTO, "%s: not a ListMultipartUploads answer within S3's bounds", what);
            else if (ret == -ENOMEM)
                ret = err_fail(ENOMEM, "%s: out of memory", what);
        }
        s3_req_free(&r);
        if (ret < 0 || !pg.truncated)
            break;
        if (!strcmp(pg.next_key, km) && !strcmp(pg.next_id, im)) {
            ret = err_fail(EPROTO, "%s: a truncated answer that does not go on", what);
            break;
        }
        free(km);
        free(im);
        km = pg.next_key;
        im = pg.next_id;
        pg.next_key = pg.next_id = NULL;
    }
    s3_uploads_page_free(&pg);
    free(km);
    free(im);
    return ret;
}
