/* test_err.c: unit tests of the error channel: the thread-local message (formatted
 * from itself, prefixed past its length, saved across cleanup, one per thread) and
 * the one errno -> HTTP status and code table of the API. */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "api_int.h"
#include "err.h"

/* ---- the message ---- */

START_TEST(fail_returns_the_negative_errno_and_sets_the_message)
{
    err_clear();
    ck_assert_int_eq(err_fail(EINVAL, "L1 table at %#x is not aligned", 0x30008), -EINVAL);
    ck_assert_str_eq(err_msg(-EINVAL), "L1 table at 0x30008 is not aligned");
    ck_assert_int_eq(err_fail(-ENOSPC, "full"), -ENOSPC); /* a negative errnum is taken as is */
}
END_TEST

START_TEST(without_a_message_err_msg_is_strerror)
{
    err_fail(EIO, "old");
    err_clear();
    ck_assert_str_eq(err_msg(-EIO), strerror(EIO));
    ck_assert_str_eq(err_msg(ENOENT), strerror(ENOENT));
}
END_TEST

START_TEST(fail_may_format_from_err_msg)
{
    err_fail(EINVAL, "bad escape");
    ck_assert_int_eq(err_fail(EINVAL, "query argument %s: %s", "size", err_msg(EINVAL)), -EINVAL);
    ck_assert_str_eq(err_msg(EINVAL), "query argument size: bad escape");
    /* the same message twice, and the strerror text err_msg writes into the buffer */
    err_set("%s + %s", err_msg(0), err_msg(0));
    ck_assert_str_eq(err_msg(0), "query argument size: bad escape + query argument size: bad escape");
    err_clear();
    err_fail(EIO, "%s (and again: %s)", err_msg(EIO), err_msg(EIO));
    char want[128];
    snprintf(want, sizeof want, "%s (and again: %s)", strerror(EIO), strerror(EIO));
    ck_assert_str_eq(err_msg(EIO), want);
}
END_TEST

START_TEST(fail_from_a_full_message_truncates_cleanly)
{
    char big[ERR_MSG_MAX + 100];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = 0;
    err_set("%s", big);
    ck_assert_uint_eq(strlen(err_msg(0)), ERR_MSG_MAX - 1);
    err_fail(EIO, "x%s", err_msg(0)); /* shifts the buffer by one while reading it */
    const char *m = err_msg(0);
    ck_assert_uint_eq(strlen(m), ERR_MSG_MAX - 1);
    ck_assert_int_eq(m[0], 'x');
    for (size_t i = 1; i < ERR_MSG_MAX - 1; i++)
        ck_assert_int_eq(m[i], 'a');
}
END_TEST

START_TEST(prefix_adds_context)
{
    err_fail(ENOENT, "no such file");
    ck_assert_int_eq(err_prefix(-ENOENT, "backing file %s", "b.qcow2"), -ENOENT);
    ck_assert_str_eq(err_msg(ENOENT), "backing file b.qcow2: no such file");
    err_clear();
    err_prefix(-EIO, "read"); /* no message yet: strerror is the reason */
    char want[64];
    snprintf(want, sizeof want, "read: %s", strerror(EIO));
    ck_assert_str_eq(err_msg(EIO), want);
    err_prefix(-EIO, "%s", err_msg(EIO)); /* from its own buffer */
    snprintf(want, sizeof want, "read: %s: read: %s", strerror(EIO), strerror(EIO));
    ck_assert_str_eq(err_msg(EIO), want);
}
END_TEST

START_TEST(prefix_of_long_messages_keeps_the_start_and_the_reason)
{
    char ctx[400], old[ERR_MSG_MAX];
    memset(ctx, 'c', sizeof ctx - 1);
    ctx[sizeof ctx - 1] = 0;
    memset(old, 'o', sizeof old - 1);
    old[sizeof old - 1] = 0;
    memcpy(old + sizeof old - 1 - 10, "the reason", 10);
    err_set("%s", old);
    err_prefix(-EUCLEAN, "%s", ctx);
    const char *m = err_msg(0);
    ck_assert_uint_eq(strlen(m), ERR_MSG_MAX - 1);
    ck_assert_int_eq(strncmp(m, ctx, 100), 0);
    ck_assert_ptr_nonnull(strstr(m, ": ... "));
    ck_assert_str_eq(m + strlen(m) - 10, "the reason");
    /* exactly at the limit: no gap */
    char a[200], b[ERR_MSG_MAX];
    memset(a, 'a', sizeof a);
    a[99] = 0;
    memset(b, 'b', sizeof b);
    b[ERR_MSG_MAX - 1 - 99 - 2] = 0;
    err_set("%s", b);
    err_prefix(-EIO, "%s", a);
    ck_assert_uint_eq(strlen(err_msg(0)), ERR_MSG_MAX - 1);
    ck_assert_ptr_null(strstr(err_msg(0), "..."));
}
END_TEST

/* A cleanup that fails with a message of its own, as vfs_remove or a close may. */
static void failing_cleanup(void)
{
    err_fail(ENOENT, "remove /tmp/x.upload-1: No such file or directory");
}

START_TEST(save_and_restore_keep_the_first_failure_across_cleanup)
{
    struct err_saved s;
    ck_assert_int_eq(err_save(&s, err_fail(EIO, "pwrite /data/a.qcow2: Input/output error")), -EIO);
    failing_cleanup();
    ck_assert_int_eq(err_restore(&s), -EIO);
    ck_assert_str_eq(err_msg(-EIO), "pwrite /data/a.qcow2: Input/output error");
    /* restoring twice, or from a copy, gives the same */
    struct err_saved copy = s;
    failing_cleanup();
    ck_assert_int_eq(err_restore(&copy), -EIO);
    ck_assert_str_eq(err_msg(-EIO), "pwrite /data/a.qcow2: Input/output error");
}
END_TEST

START_TEST(save_without_a_message_keeps_strerror)
{
    struct err_saved s;
    err_clear();
    err_save(&s, -ENOSPC);
    failing_cleanup();
    ck_assert_int_eq(err_restore(&s), -ENOSPC);
    ck_assert_str_eq(err_msg(-ENOSPC), strerror(ENOSPC));
}
END_TEST

START_TEST(save_of_success_restores_nothing)
{
    struct err_saved s;
    err_clear();
    ck_assert_int_eq(err_save(&s, 0), 0);
    failing_cleanup();
    ck_assert_int_eq(err_restore(&s), 0);
    ck_assert_str_eq(err_msg(0), "remove /tmp/x.upload-1: No such file or directory");
}
END_TEST

struct thread_arg {
    char seen[ERR_MSG_MAX]; /* err_msg in the new thread before it set anything */
    struct err_saved saved; /* a failure of the thread, for the main thread */
};

static void *other_thread(void *p)
{
    struct thread_arg *a = p;
    snprintf(a->seen, sizeof a->seen, "%s", err_msg(EIO));
    err_save(&a->saved, err_fail(EUCLEAN, "L2 entry for guest offset 0x10000 is corrupt"));
    err_fail(EINVAL, "the thread's later message");
    return NULL;
}

START_TEST(messages_are_per_thread_and_saved_ones_cross_threads)
{
    struct thread_arg a;
    err_fail(EBUSY, "the main thread's message");
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, other_thread, &a), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    ck_assert_str_eq(a.seen, strerror(EIO));
    ck_assert_str_eq(err_msg(EBUSY), "the main thread's message");
    ck_assert_int_eq(err_restore(&a.saved), -EUCLEAN);
    ck_assert_str_eq(err_msg(EUCLEAN), "L2 entry for guest offset 0x10000 is corrupt");
}
END_TEST

/* ---- the errno -> HTTP table ---- */

/* one row a line, as in the table */
/* clang-format off */
static const struct {
    int err;
    unsigned status;
    const char *code;
} rows[] = {
    {EINVAL, 400, "bad-request"},
    {ENAMETOOLONG, 400, "bad-request"},
    {ENOENT, 404, "not-found"},
    {EEXIST, 409, "conflict"},
    {EBUSY, 409, "conflict"},
    {ETXTBSY, 409, "conflict"},
    {EROFS, 409, "read-only"},
    {EFBIG, 413, "too-large"},
    {ERANGE, 416, "range-not-satisfiable"},
    {ENOTSUP, 422, "unsupported"},
    {EOPNOTSUPP, 422, "unsupported"},
    {EUCLEAN, 422, "corrupt-image"},
    {EPERM, 422, "outside-catalog"},
    {ELOOP, 422, "bad-backing-chain"},
    {ENXIO, 422, "bad-backing-chain"},
    {E2BIG, 422, "limit-exceeded"},
    {EOVERFLOW, 422, "limit-exceeded"},
    {EIO, 502, "storage-error"},
    {EPROTO, 502, "storage-error"},
    {EACCES, 503, "storage-denied"},
    {ENOMEM, 503, "out-of-memory"},
    {EMFILE, 503, "unavailable"},
    {ENFILE, 503, "unavailable"},
    {ECONNREFUSED, 503, "unavailable"},
    {EHOSTUNREACH, 503, "unavailable"},
    {ECONNRESET, 503, "unavailable"},
    {ETIMEDOUT, 503, "unavailable"},
    {EAGAIN, 503, "unavailable"},
    {EREMOTEIO, 503, "unavailable"},
    {ESTALE, 503, "unavailable"},
    {ENOSPC, 507, "no-space"},
    {EDQUOT, 507, "no-space"},
};
/* clang-format on */

START_TEST(every_row_of_the_errno_table)
{
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        /* the API passes negative errnos; a positive one means the same */
        ck_assert_msg(api_errno_status(-rows[i].err) == rows[i].status, "errno %d (%s): status %u, want %u",
                      rows[i].err, strerror(rows[i].err), api_errno_status(-rows[i].err), rows[i].status);
        ck_assert_str_eq(api_errno_code(-rows[i].err), rows[i].code);
        ck_assert_uint_eq(api_errno_status(rows[i].err), rows[i].status);
        ck_assert_str_eq(api_errno_code(rows[i].err), rows[i].code);
    }
}
END_TEST

START_TEST(corruption_and_storage_errors_differ)
{
    ck_assert_uint_eq(api_errno_status(-EUCLEAN) / 100, 4);
    ck_assert_uint_eq(api_errno_status(-EIO) / 100, 5);
    ck_assert_str_ne(api_errno_code(-EUCLEAN), api_errno_code(-EIO));
}
END_TEST

START_TEST(unknown_errnos_are_internal_errors)
{
    const int unknown[] = {ENOTRECOVERABLE, EBADMSG, EBADF, EFAULT, EDOM, 0, 4095, 100000};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        ck_assert_uint_eq(api_errno_status(-unknown[i]), 500);
        ck_assert_str_eq(api_errno_code(-unknown[i]), "internal-error");
    }
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("err");
    TCase *tc = tcase_create("message");
    tcase_add_test(tc, fail_returns_the_negative_errno_and_sets_the_message);
    tcase_add_test(tc, without_a_message_err_msg_is_strerror);
    tcase_add_test(tc, fail_may_format_from_err_msg);
    tcase_add_test(tc, fail_from_a_full_message_truncates_cleanly);
    tcase_add_test(tc, prefix_adds_context);
    tcase_add_test(tc, prefix_of_long_messages_keeps_the_start_and_the_reason);
    tcase_add_test(tc, save_and_restore_keep_the_first_failure_across_cleanup);
    tcase_add_test(tc, save_without_a_message_keeps_strerror);
    tcase_add_test(tc, save_of_success_restores_nothing);
    tcase_add_test(tc, messages_are_per_thread_and_saved_ones_cross_threads);
    suite_add_tcase(s, tc);
    tc = tcase_create("http");
    tcase_add_test(tc, every_row_of_the_errno_table);
    tcase_add_test(tc, corruption_and_storage_errors_differ);
    tcase_add_test(tc, unknown_errnos_are_internal_errors);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
