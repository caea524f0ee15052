/* test_s3sig.c: the s3 plugin's SigV4 signer against AWS's published vectors
 * (the aws-sig-v4-test-suite cases get-vanilla, get-vanilla-query-order-key-case,
 * get-vanilla-query-order-value, get-unreserved, and the S3 documentation's
 * ranged GET example), plus the canonical forms S3 needs. */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "s3_int.h"

#define SUITE_KEY    "AKIDEXAMPLE"
#define SUITE_SECRET "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
#define SUITE_DATE   "20150830T123600Z"
#define EMPTY_SHA    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

/* Sign a request of the suite (service "service", host example.amazonaws.com)
 * and return the signature's hex (static buffer). */
static const char *suite_sign(const char *path, const struct s3_param *params, size_t n, struct sbuf *creq)
{
    static char sig[65];
    struct s3_hdr h[2] = {{"Host", "example.amazonaws.com"}, {"X-Amz-Date", SUITE_DATE}};
    struct s3_sign_in in = {.method = "GET", .path = path, .params = params, .nparams = n, .hdrs = h, .nhdrs = 2,
                            .payload_hash = EMPTY_SHA, .amz_date = SUITE_DATE, .region = "us-east-1",
                            .service = "service", .access_key = SUITE_KEY, .secret_key = SUITE_SECRET};
    struct sbuf auth = {0};
    ck_assert_int_eq(s3_sigv4_sign(&in, &auth, creq, NULL), 0);
    const char *s = strstr(auth.p, "Signature=");
    ck_assert_ptr_nonnull(s);
    ck_assert(strstr(auth.p, "Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
                             "SignedHeaders=host;x-amz-date, ") != NULL);
    snprintf(sig, sizeof sig, "%s", s + 10);
    sbuf_free(&auth);
    return sig;
}

START_TEST(test_get_vanilla)
{
    struct sbuf creq = {0};
    ck_assert_str_eq(suite_sign("/", NULL, 0, &creq),
                     "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31");
    ck_assert_str_eq(creq.p, "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
                             "host;x-amz-date\n" EMPTY_SHA);
    sbuf_free(&creq);
}
END_TEST

START_TEST(test_query_sorted_by_name)
{
    struct s3_param p[2] = {{"Param2", "value2"}, {"Param1", "value1"}};
    struct sbuf creq = {0};
    ck_assert_str_eq(suite_sign("/", p, 2, &creq),
                     "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500");
    ck_assert(strstr(creq.p, "\nParam1=value1&Param2=value2\n") != NULL);
    sbuf_free(&creq);
}
END_TEST

START_TEST(test_query_same_name_sorted_by_value)
{
    struct s3_param p[2] = {{"Param1", "value2"}, {"Param1", "value1"}};
    ck_assert_str_eq(suite_sign("/", p, 2, NULL), "5772eed61e12b33fae39ee5e7012498b51d56abc0abb7c60486157bd471c4694");
}
END_TEST

START_TEST(test_unreserved_path_kept)
{
    struct sbuf path = {0};
    sbuf_puts(&path, "/");
    s3_uri_encode(&path, "-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", 1);
    ck_assert_str_eq(suite_sign(path.p, NULL, 0, NULL),
                     "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f");
    sbuf_free(&path);
}
END_TEST

/* The S3 documentation's example: GET /test.txt with Range, signed for s3. */
START_TEST(test_s3_doc_ranged_get)
{
    struct s3_hdr h[4] = {{"host", "examplebucket.s3.amazonaws.com"},
                          {"range", "bytes=0-9"},
                          {"x-amz-content-sha256", EMPTY_SHA},
                          {"x-amz-date", "20130524T000000Z"}};
    struct s3_sign_in in = {.method = "GET", .path = "/test.txt", .hdrs = h, .nhdrs = 4, .payload_hash = EMPTY_SHA,
                            .amz_date = "20130524T000000Z", .region = "us-east-1", .service = "s3",
                            .access_key = "AKIAIOSFODNN7EXAMPLE",
                            .secret_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"};
    struct sbuf auth = {0}, sts = {0};
    ck_assert_int_eq(s3_sigv4_sign(&in, &auth, NULL, &sts), 0);
    ck_assert_str_eq(sts.p, "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n"
                            "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972");
    ck_assert_str_eq(auth.p, "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
                             "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
                             "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41");
    sbuf_free(&auth);
    sbuf_free(&sts);
}
END_TEST

/* What libcurl 7.88 gets wrong: "uploads" must be "uploads=", '/' and '+' in a
 * value are encoded, and parameters are sorted. */
START_TEST(test_canonical_query_encodes_and_sorts)
{
    struct s3_param p[4] = {{"uploads", ""}, {"prefix", "a b/c"}, {"continuation-token", "x+y/z="}, {"list-type", "2"}};
    struct sbuf q = {0};
    s3_canonical_query(&q, p, 4);
    ck_assert_str_eq(q.p, "continuation-token=x%2By%2Fz%3D&list-type=2&prefix=a%20b%2Fc&uploads=");
    sbuf_free(&q);
}
END_TEST

/* Headers sort by name: x-amz-copy-source before x-amz-copy-source-range
 * (sorting whole "name:value" lines puts them the other way round). */
START_TEST(test_copy_source_headers_sorted_by_name)
{
    struct s3_hdr h[3] = {{"x-amz-copy-source-range", "bytes=0-5242879"},
                          {"x-amz-copy-source", "/bkt/img/a.qcow2"},
                          {"host", "127.0.0.1:9000"}};
    struct s3_sign_in in = {.method = "PUT", .path = "/bkt/b", .hdrs = h, .nhdrs = 3, .payload_hash = EMPTY_SHA,
                            .amz_date = SUITE_DATE, .region = "us-east-1", .service = "s3", .access_key = "k",
                            .secret_key = "s"};
    struct sbuf auth = {0}, creq = {0};
    ck_assert_int_eq(s3_sigv4_sign(&in, &auth, &creq, NULL), 0);
    ck_assert(strstr(auth.p, "SignedHeaders=host;x-amz-copy-source;x-amz-copy-source-range,") != NULL);
    ck_assert(strstr(creq.p, "x-amz-copy-source:/bkt/img/a.qcow2\nx-amz-copy-source-range:bytes=0-5242879\n"));
    sbuf_free(&auth);
    sbuf_free(&creq);
}
END_TEST

START_TEST(test_key_encoding_keeps_slashes_only)
{
    struct sbuf b = {0};
    s3_uri_encode(&b, "dir one/img+1~.qcow2", 1);
    ck_assert_str_eq(b.p, "dir%20one/img%2B1~.qcow2");
    sbuf_free(&b);
}
END_TEST

START_TEST(test_header_values_trimmed_and_folded)
{
    struct s3_hdr h[2] = {{"My-Header1", "  a   b   c  "}, {"host", "h"}};
    struct s3_sign_in in = {.method = "GET", .path = "/", .hdrs = h, .nhdrs = 2, .payload_hash = EMPTY_SHA,
                            .amz_date = SUITE_DATE, .region = "r", .service = "s", .access_key = "k",
                            .secret_key = "s"};
    struct sbuf auth = {0}, creq = {0};
    ck_assert_int_eq(s3_sigv4_sign(&in, &auth, &creq, NULL), 0);
    ck_assert(strstr(creq.p, "\nhost:h\nmy-header1:a b c\n\nhost;my-header1\n") != NULL);
    sbuf_free(&auth);
    sbuf_free(&creq);
}
END_TEST

START_TEST(test_xml_reading)
{
    const char *x = "<R><Contents><Key>a&amp;b&lt;1&gt;</Key></Contents><Contents><Key>c</Key></Contents></R>";
    const char *pos = NULL;
    char *blk = s3_xml_raw(x, "Contents", &pos);
    char *k = s3_xml_next(blk, "Key", NULL);
    ck_assert_str_eq(k, "a&b<1>");
    free(blk);
    free(k);
    blk = s3_xml_raw(x, "Contents", &pos);
    ck_assert_str_eq(blk, "<Key>c</Key>");
    free(blk);
    ck_assert_ptr_null(s3_xml_raw(x, "Contents", &pos));
}
END_TEST

/* MD5("a"), quoted as S3 answers, and MD5("b") in upper case: the expected
 * value is MD5 of the 32 binary bytes, "-2" (computed with Python's hashlib). */
START_TEST(test_multipart_etag)
{
    char etags[3][128] = {"\"0cc175b9c0f1b6a831c399e269772661\"", "92EB5FFEE6AE2FEC3AD71C777531578F",
                          "\"0cc175b9c0f1b6a831c399e26977266\""};
    char out[64];
    ck_assert_int_eq(s3_mpu_etag((const char(*)[128])etags, 2, out, sizeof out), 0);
    ck_assert_str_eq(out, "\"96e024ba2074fe77e8e965ba43a704be-2\"");
    ck_assert_int_eq(s3_mpu_etag((const char(*)[128])etags, 3, out, sizeof out), -EINVAL); /* 31 digits */
    ck_assert_int_eq(s3_mpu_etag((const char(*)[128])etags, 2, out, 20), -EINVAL);
}
END_TEST

/* ---- ListMultipartUploads pages (uploads.c) ---- */

struct seen {
    char keys[8][64];
    int64_t when[8];
    unsigned n;
};

static int collect(void *ctx, const char *key, const char *id, int64_t initiated)
{
    struct seen *s = ctx;
    ck_assert(*id);
    if (s->n < 8) {
        snprintf(s->keys[s->n], sizeof s->keys[0], "%s", key);
        s->when[s->n] = initiated;
    }
    s->n++;
    return 0;
}

#define UP(k, id, t) "<Upload><Key>" k "</Key><UploadId>" id "</UploadId><Initiated>" t "</Initiated></Upload>"
#define PAGE(inner) "<?xml version='1.0'?><ListMultipartUploadsResult xmlns=\"x\">" inner "</ListMultipartUploadsResult>"

START_TEST(test_iso_time)
{
    ck_assert_int_eq(s3_iso_time("2026-12-03T18:27:29.000Z"), 1796322449);
    ck_assert_int_eq(s3_iso_time("2026-12-03T18:27:29Z"), 1796322449);
    ck_assert_int_eq(s3_iso_time("1970-01-01T00:00:00+00:00"), 0);
    ck_assert_int_eq(s3_iso_time("2026-12-03T18:27:29+02:00"), -1);
    ck_assert_int_eq(s3_iso_time("2026-12-03"), -1);
    ck_assert_int_eq(s3_iso_time("Thu, 03 Dec 2026 18:27:29 GMT"), -1);
    ck_assert_int_eq(s3_iso_time(NULL), -1);
}
END_TEST

START_TEST(test_uploads_page)
{
    /* Swift's answer: truncated, with empty next markers (the last upload is where to go on) */
    const char *swift = PAGE("<Bucket>b</Bucket><NextKeyMarker></NextKeyMarker><NextUploadIdMarker></NextUploadIdMarker>"
                             "<Prefix>p/</Prefix><IsTruncated>true</IsTruncated>"
                             UP("p/a.qcow2", "ID1", "2026-12-03T18:27:29.000Z")
                             UP("p/b&amp;c.qcow2", "ID2", "not a time")
                             UP("q/outside", "ID3", "2026-12-03T18:27:29.000Z"));
    struct seen s = {0};
    struct s3_uploads_page pg = {0};
    ck_assert_int_eq(s3_uploads_parse(swift, "p/", collect, &s, &pg), 0);
    ck_assert_uint_eq(s.n, 2); /* the key outside the prefix is never passed on */
    ck_assert_str_eq(s.keys[0], "p/a.qcow2");
    ck_assert_int_eq(s.when[0], 1796322449);
    ck_assert_str_eq(s.keys[1], "p/b&c.qcow2");
    ck_assert_int_eq(s.when[1], -1);
    ck_assert(pg.truncated);
    ck_assert_str_eq(pg.next_key, "q/outside");
    ck_assert_str_eq(pg.next_id, "ID3");
    /* AWS's: the markers given */
    const char *aws = PAGE("<NextKeyMarker>p/z</NextKeyMarker><NextUploadIdMarker>ZZ</NextUploadIdMarker>"
                           "<IsTruncated>true</IsTruncated>" UP("p/a", "ID1", "2026-12-03T18:27:29Z"));
    memset(&s, 0, sizeof s);
    ck_assert_int_eq(s3_uploads_parse(aws, "p/", collect, &s, &pg), 0);
    ck_assert_str_eq(pg.next_key, "p/z");
    ck_assert_str_eq(pg.next_id, "ZZ");
    /* the last page */
    ck_assert_int_eq(s3_uploads_parse(PAGE("<IsTruncated>false</IsTruncated>"), "p/", collect, &s, &pg), 0);
    ck_assert(!pg.truncated);
    ck_assert_ptr_null(pg.next_key);
    s3_uploads_page_free(&pg);
}
END_TEST

START_TEST(test_uploads_page_bounds)
{
    struct seen s = {0};
    struct s3_uploads_page pg = {0};
    /* not the answer asked for, an upload without key or id, truncated with nowhere to go */
    ck_assert_int_eq(s3_uploads_parse("<Error><Code>x</Code></Error>", "", collect, &s, &pg), -EPROTO);
    ck_assert_int_eq(s3_uploads_parse(PAGE("<Upload><UploadId>I</UploadId></Upload>"), "", collect, &s, &pg),
                     -EPROTO);
    ck_assert_int_eq(s3_uploads_parse(PAGE(UP("k", "", "")), "", collect, &s, &pg), -EPROTO);
    ck_assert_int_eq(s3_uploads_parse(PAGE("<IsTruncated>true</IsTruncated>"), "", collect, &s, &pg), -EPROTO);
    ck_assert_ptr_null(pg.next_key);
    /* a key past S3's 1024 bytes */
    struct sbuf b = {0};
    sbuf_puts(&b, "<ListMultipartUploadsResult><Upload><Key>");
    for (int i = 0; i < 1025; i++)
        sbuf_puts(&b, "k");
    sbuf_puts(&b, "</Key><UploadId>I</UploadId></Upload></ListMultipartUploadsResult>");
    ck_assert_int_eq(s3_uploads_parse(b.p, "", collect, &s, &pg), -EPROTO);
    sbuf_free(&b);
    /* more uploads than one answer holds */
    sbuf_puts(&b, "<ListMultipartUploadsResult>");
    for (int i = 0; i < 1001; i++)
        sbuf_puts(&b, UP("k", "I", "2026-12-03T18:27:29Z"));
    sbuf_puts(&b, "</ListMultipartUploadsResult>");
    memset(&s, 0, sizeof s);
    ck_assert_int_eq(s3_uploads_parse(b.p, "", collect, &s, &pg), -EPROTO);
    ck_assert_uint_eq(s.n, 1000);
    sbuf_free(&b);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("s3sig");
    TCase *tc = tcase_create("vectors");
    tcase_add_test(tc, test_get_vanilla);
    tcase_add_test(tc, test_query_sorted_by_name);
    tcase_add_test(tc, test_query_same_name_sorted_by_value);
    tcase_add_test(tc, test_unreserved_path_kept);
    tcase_add_test(tc, test_s3_doc_ranged_get);
    suite_add_tcase(s, tc);
    tc = tcase_create("canonical");
    tcase_add_test(tc, test_canonical_query_encodes_and_sorts);
    tcase_add_test(tc, test_copy_source_headers_sorted_by_name);
    tcase_add_test(tc, test_key_encoding_keeps_slashes_only);
    tcase_add_test(tc, test_header_values_trimmed_and_folded);
    tcase_add_test(tc, test_xml_reading);
    tcase_add_test(tc, test_multipart_etag);
    tcase_add_test(tc, test_iso_time);
    tcase_add_test(tc, test_uploads_page);
    tcase_add_test(tc, test_uploads_page_bounds);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
