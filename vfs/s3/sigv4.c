/* sigv4.c: AWS Signature Version 4 over gnutls' HMAC and SHA-256: canonical
 * query (sorted, RFC 3986 encoded), canonical headers, signing key, signature;
 * and the other digests S3 asks for (a multipart upload's ETag). */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>

#include "s3_int.h"

static void hex(const unsigned char *d, size_t n, char *out)
{
    static const char h[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = h[d[i] >> 4];
        out[2 * i + 1] = h[d[i] & 15];
    }
    out[2 * n] = '\0';
}

void s3_sha256_hex(const void *data, size_t n, char out[65])
{
    unsigned char d[32];
    gnutls_hash_fast(GNUTLS_DIG_SHA256, data, n, d);
    hex(d, 32, out);
}

/* One hex digit's value, or -1. */
static int unhex(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

int s3_mpu_etag(const char (*etags)[128], unsigned n, char *out, size_t cap)
{
    unsigned char *md5s = n ? malloc((size_t)n * 16) : NULL, d[16];
    if (!md5s)
        return -EINVAL;
    for (unsigned i = 0; i < n; i++) {
        const char *e = etags[i];
        size_t len = strlen(e);
        if (len == 34 && e[0] == '"' && e[33] == '"') {
            e++;
            len -= 2;
        }
        for (size_t k = 0; k < 16; k++) {
            int hi = len == 32 ? unhex(e[2 * k]) : -1, lo = len == 32 ? unhex(e[2 * k + 1]) : -1;
            if (hi < 0 || lo < 0) {
                free(md5s);
                return -EINVAL;
            }
            md5s[16 * i + k] = (unsigned char)(hi << 4 | lo);
        }
    }
    gnutls_hash_fast(GNUTLS_DIG_MD5, md5s, (size_t)n * 16, d);
    free(md5s);
    char h[33];
    hex(d, 16, h);
    int k = snprintf(out, cap, "\"%s-%u\"", h, n);
    return k > 0 && (size_t)k < cap ? 0 : -EINVAL;
}

static void hmac(const void *key, size_t klen, const char *msg, unsigned char out[32])
{
    gnutls_hmac_fast(GNUTLS_MAC_SHA256, key, klen, msg, strlen(msg), out);
}

/* One encoded parameter, for sorting. */
struct enc_param {
    char *name, *value;
};

static int cmp_param(const void *a, const void *b)
{
    const struct enc_param *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    return c ? c : strcmp(x->value, y->value);
}

void s3_canonical_query(struct sbuf *out, const struct s3_param *params, size_t n)
{
    struct enc_param *v = n ? calloc(n, sizeof *v) : NULL;
    if (n && !v) {
        out->oom = 1;
        return;
    }
    for (size_t i = 0; i < n; i++) {
        struct sbuf a = {0}, b = {0};
        s3_uri_encode(&a, params[i].name, 0);
        s3_uri_encode(&b, params[i].value ? params[i].value : "", 0);
        v[i].name = a.p ? a.p : strdup("");
        v[i].value = b.p ? b.p : strdup("");
        if (a.oom || b.oom || !v[i].name || !v[i].value)
            out->oom = 1;
    }
    if (!out->oom && n)
        qsort(v, n, sizeof *v, cmp_param);
    for (size_t i = 0; i < n && !out->oom; i++) {
        if (i)
            sbuf_puts(out, "&");
        sbuf_puts(out, v[i].name);
        sbuf_puts(out, "=");
        sbuf_puts(out, v[i].value);
    }
    for (size_t i = 0; i < n; i++) {
        free(v[i].name);
        free(v[i].value);
    }
    free(v);
}

/* A header as signed: lower-case name, value trimmed with inner space runs
 * folded to one. */
struct canon_hdr {
    char *name, *value;
};

static int cmp_hdr(const void *a, const void *b)
{
    return strcmp(((const struct canon_hdr *)a)->name, ((const struct canon_hdr *)b)->name);
}

static char *fold_value(const char *v)
{
    char *r = malloc(strlen(v) + 1), *o = r;
    if (!r)
        return NULL;
    while (*v == ' ' || *v == '\t')
        v++;
    while (*v) {
        if (*v == ' ' || *v == '\t') {
            while (*v == ' ' || *v == '\t')
                v++;
            if (*v)
                *o++ = ' ';
        } else {
            *o++ = *v++;
        }
    }
    *o = '\0';
    return r;
}

int s3_sigv4_sign(const struct s3_sign_in *in, struct sbuf *auth, struct sbuf *creq_out, struct sbuf *sts_out)
{
    if (!in->method || !in->path || !in->amz_date || strlen(in->amz_date) != 16 || !in->secret_key)
        return -EINVAL;
    struct canon_hdr *h = in->nhdrs ? calloc(in->nhdrs, sizeof *h) : NULL;
    struct sbuf creq = {0}, sts = {0}, signed_names = {0}, key = {0};
    int ret = -ENOMEM;
    if (in->nhdrs && !h)
        return -ENOMEM;
    for (size_t i = 0; i < in->nhdrs; i++) {
        h[i].name = strdup(in->hdrs[i].name);
        h[i].value = fold_value(in->hdrs[i].value);
        if (!h[i].name || !h[i].value)
            goto out;
        for (char *p = h[i].name; *p; p++)
            *p = (char)tolower((unsigned char)*p);
    }
    if (in->nhdrs)
        qsort(h, in->nhdrs, sizeof *h, cmp_hdr);

    /* the canonical request */
    sbuf_printf(&creq, "%s\n%s\n", in->method, in->path);
    s3_canonical_query(&creq, in->params, in->nparams);
    sbuf_puts(&creq, "\n");
    for (size_t i = 0; i < in->nhdrs; i++) {
        sbuf_printf(&creq, "%s:%s\n", h[i].name, h[i].value);
        sbuf_printf(&signed_names, "%s%s", i ? ";" : "", h[i].name);
    }
    sbuf_printf(&creq, "\n%s\n%s", sbuf_str(&signed_names) ? sbuf_str(&signed_names) : "",
                in->payload_hash ? in->payload_hash : "UNSIGNED-PAYLOAD");
    if (!sbuf_str(&creq) || !sbuf_str(&signed_names))
        goto out;

    /* the string to sign */
    char chash[65], date[9];
    memcpy(date, in->amz_date, 8);
    date[8] = '\0';
    s3_sha256_hex(creq.p, creq.len, chash);
    sbuf_printf(&sts, "AWS4-HMAC-SHA256\n%s\n%s/%s/%s/aws4_request\n%s", in->amz_date, date, in->region,
                in->service, chash);

    /* the signing key: HMAC chain from "AWS4" + secret over date, region, service */
    unsigned char k[32], sig[32];
    sbuf_printf(&key, "AWS4%s", in->secret_key);
    if (!sbuf_str(&sts) || !sbuf_str(&key))
        goto out;
    hmac(key.p, key.len, date, k);
    hmac(k, 32, in->region, k);
    hmac(k, 32, in->service, k);
    hmac(k, 32, "aws4_request", k);
    hmac(k, 32, sts.p, sig);
    char sighex[65];
    hex(sig, 32, sighex);
    sbuf_printf(auth, "AWS4-HMAC-SHA256 Credential=%s/%s/%s/%s/aws4_request, SignedHeaders=%s, Signature=%s",
                in->access_key, date, in->region, in->service, signed_names.p ? signed_names.p : "", sighex);
    if (!sbuf_str(auth))
        goto out;
    if (creq_out)
        sbuf_add(creq_out, creq.p, creq.len);
    if (sts_out)
        sbuf_add(sts_out, sts.p, sts.len);
    ret = 0;
out:
    for (size_t i = 0; i < in->nhdrs; i++) {
        free(h[i].name);
        free(h[i].value);
    }
    free(h);
    if (key.p)
        memset(key.p, 0, key.len);
    sbuf_free(&key);
    sbuf_free(&creq);
    sbuf_free(&sts);
    sbuf_free(&signed_names);
    return ret;
}
