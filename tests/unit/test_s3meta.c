/* test_s3meta.c: the s3 plugin's table of what it knows of objects (meta.c):
 * answers kept for stat-ttl, own changes winning over older answers, one mtime
 * per unchanged version, the bound, and many threads at once (also under TSan). */
#include <check.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "s3_int.h"

struct s3_conf s3_conf; /* meta.c reads stat_ttl_ns only */

static struct s3_meta obj(uint64_t size, const char *etag, int64_t mtime)
{
    struct s3_meta m = {.exists = 1, .size = size, .mtime = mtime};
    snprintf(m.etag, sizeof m.etag, "%s", etag);
    return m;
}

static void setup(void)
{
    s3_meta_cleanup();
    s3_conf.stat_ttl_ns = 60ull * 1000000000u;
}

static void nap_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

START_TEST(test_answer_kept_for_the_ttl)
{
    struct s3_meta m = obj(100, "\"e1\"", 1000), got;
    ck_assert_int_eq(s3_meta_get("b", "k", &got), 0);
    s3_meta_learn("b", "k", &m, s3_meta_stamp());
    ck_assert_int_eq(s3_meta_get("b", "k", &got), 1);
    ck_assert_uint_eq(got.size, 100);
    ck_assert_str_eq(got.etag, "\"e1\"");
    ck_assert_int_eq(s3_meta_get("b", "k2", &got), 0);
    ck_assert_int_eq(s3_meta_get("b2", "k", &got), 0);
    s3_conf.stat_ttl_ns = 50u * 1000000u;
    nap_ms(80);
    ck_assert_int_eq(s3_meta_get("b", "k", &got), 0); /* older than the TTL: ask */
    s3_conf.stat_ttl_ns = 0;
    s3_meta_learn("b", "k", &m, s3_meta_stamp());
    ck_assert_int_eq(s3_meta_get("b", "k", &got), 0); /* 0: always ask */
}
END_TEST

START_TEST(test_own_change_wins_over_older_answers)
{
    struct s3_meta old = obj(100, "\"old\"", 1000), mine = obj(200, "\"mine\"", 2000), got;
    uint64_t asked = s3_meta_stamp(); /* a HEAD leaves ... */
    s3_meta_set("b", "k", &mine);     /* ... we publish ... */
    s3_meta_learn("b", "k", &old, asked); /* ... its answer, older, arrives */
    ck_assert_int_eq(s3_meta_get("b", "k", &got), 1);
    ck_assert_str_eq(got.etag, "\"mine\"");
    s3_meta_learn("b", "k", &old, s3_meta_stamp()); /* asked after: someone replaced it */
    ck_assert_int_eq(s3_meta_get("b", "k", &got), 1);
    ck_assert_str_eq(got.etag, "\"old\"");
    /* an unknown outcome (a failed publish): the next stat asks, older answers do not count */
    asked = s3_meta_stamp();
    s3_meta_set("b", "k", NULL);
    ck_assert_int_eq(s3_meta_get("b", "k", &got), 0);
    s3_meta_learn("b", "k", &old, asked);
    ck_assert_int_eq(s3_meta_get("b", "k", &got), 0);
    /* removed by us: known missing at once */
    struct s3_meta gone = {.exists = 0};
    s3_meta_set("b", "k", &gone);
    ck_assert_int_eq(s3_meta_get("b", "k", &got), 1);
    ck_assert_int_eq(got.exists, 0);
}
END_TEST

START_TEST(test_one_mtime_per_version)
{
    struct s3_meta head = obj(100, "\"e1\"", 1001), listed = obj(100, "\"e1\"", 1000), got;
    s3_meta_learn("b", "k", &head, s3_meta_stamp());
    s3_meta_learn("b", "k", &listed, s3_meta_stamp()); /* the same version in other units */
    ck_assert_int_eq(s3_meta_get("b", "k", &got), 1);
    ck_assert_int_eq(got.mtime, 1001);
    struct s3_meta next = obj(100, "\"e2\"", 1000);
    s3_meta_learn("b", "k", &next, s3_meta_stamp());
    ck_assert_int_eq(s3_meta_get("b", "k", &got), 1);
    ck_assert_int_eq(got.mtime, 1000);
    ck_assert_str_eq(got.etag, "\"e2\"");
    s3_meta_drop("b", "k"); /* a read met another ETag */
    ck_assert_int_eq(s3_meta_get("b", "k", &got), 0);
}
END_TEST

START_TEST(test_bounded)
{
    char key[32];
    struct s3_meta m = obj(1, "\"e\"", 1), got;
    uint64_t asked = s3_meta_stamp();
    s3_meta_set("b", "first", &m);
    for (int i = 0; i < 20000; i++) {
        snprintf(key, sizeof key, "k%d", i);
        s3_meta_learn("b", key, &m, s3_meta_stamp());
    }
    ck_assert_int_eq(s3_meta_get("b", "first", &got), 0); /* evicted */
    ck_assert_int_eq(s3_meta_get("b", "k0", &got), 0);
    ck_assert_int_eq(s3_meta_get("b", "k19999", &got), 1);
    /* an answer older than our change of an evicted key is not taken either */
    struct s3_meta old = obj(9, "\"old\"", 9);
    s3_meta_learn("b", "first", &old, asked);
    ck_assert_int_eq(s3_meta_get("b", "first", &got), 0);
}
END_TEST

static void *hammer(void *arg)
{
    long t = (long)arg;
    char key[16], etag[32];
    for (int i = 0; i < 20000; i++) {
        snprintf(key, sizeof key, "k%d", i % 37);
        snprintf(etag, sizeof etag, "\"%ld-%d\"", t, i);
        struct s3_meta m = obj((uint64_t)i, etag, i), got;
        switch ((i + t) % 4) {
        case 0: s3_meta_learn("b", key, &m, s3_meta_stamp()); break;
        case 1: s3_meta_set("b", key, &m); break;
        case 2: s3_meta_drop("b", key); break;
        default:
            if (s3_meta_get("b", key, &got))
                ck_assert(got.exists && got.etag[0] == '"');
        }
    }
    return NULL;
}

START_TEST(test_threads)
{
    pthread_t th[4];
    for (long i = 0; i < 4; i++)
        ck_assert_int_eq(pthread_create(&th[i], NULL, hammer, (void *)i), 0);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    struct s3_meta mine = obj(7, "\"last\"", 7), got;
    s3_meta_set("b", "k1", &mine);
    ck_assert_int_eq(s3_meta_get("b", "k1", &got), 1);
    ck_assert_str_eq(got.etag, "\"last\"");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("s3meta");
    TCase *tc = tcase_create("meta");
    tcase_add_checked_fixture(tc, setup, NULL);
    tcase_add_test(tc, test_answer_kept_for_the_ttl);
    tcase_add_test(tc, test_own_change_wins_over_older_answers);
    tcase_add_test(tc, test_one_mtime_per_version);
    tcase_add_test(tc, test_bounded);
    tcase_add_test(tc, test_threads);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    s3_meta_cleanup();
    return failed ? 1 : 0;
}
