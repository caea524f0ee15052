/* test_commit.c: unit tests of qcow2_commit on the mem backend: the result, the
 * progress callback (cancel, a pause), errors, and readers of top running while
 * the commit copies (the TSan target of the commit code). Images are made by the
 * engine; the expected bytes are the top's view before the commit. */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "err.h"
#include "qcow2.h"
#include "vfs.h"

#define MiB (1u << 20)
#define SIZE (24 * MiB)

static unsigned char *expect; /* top's view before the commit */

static void fill(unsigned char *b, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)((i * 2654435761u + seed * 40503u) >> 13);
}

static struct qcow2_image *open_rw(const char *uri)
{
    struct qcow2_open_opts o = {.read_write = true};
    struct qcow2_image *img;
    int ret = qcow2_open(uri, &o, &img);
    ck_assert_msg(ret == 0, "open %s: %s", uri, err_msg(ret));
    return img;
}

/* Top's view, as it is now, into `expect`. */
static void load_expect(void)
{
    struct qcow2_image *v;
    ck_assert_int_eq(qcow2_open("mem:c/top.qcow2", NULL, &v), 0);
    free(expect);
    expect = malloc(SIZE);
    ck_assert_int_eq(qcow2_pread(v, expect, SIZE, 0), 0);
    qcow2_close(v);
}

/* mem:c/base.qcow2 (data everywhere, 16 MiB) <- mem:c/top.qcow2 (24 MiB: data,
 * zeroes, discards, a tail past base's end). Fills `expect`. */
static void make_chain(void)
{
    vfs_remove("mem:c/base.qcow2");
    vfs_remove("mem:c/top.qcow2");
    struct qcow2_create_opts bo = {.size = 16 * MiB, .cluster_size = 16384};
    ck_assert_int_eq(qcow2_create("mem:c/base.qcow2", &bo), 0);
    struct qcow2_image *b = open_rw("mem:c/base.qcow2");
    unsigned char *buf = malloc(16 * MiB);
    fill(buf, 16 * MiB, 1);
    ck_assert_int_eq(qcow2_pwrite(b, buf, 16 * MiB, 0), 0);
    ck_assert_int_eq(qcow2_close(b), 0);
    struct qcow2_create_opts to = {.size = SIZE, .backing_file = "base.qcow2", .backing_format = "qcow2"};
    ck_assert_int_eq(qcow2_create("mem:c/top.qcow2", &to), 0);
    struct qcow2_image *t = open_rw("mem:c/top.qcow2");
    fill(buf, 6 * MiB, 2);
    ck_assert_int_eq(qcow2_pwrite(t, buf, 6 * MiB, 1 * MiB + 512), 0);
    ck_assert_int_eq(qcow2_pwrite(t, buf, 3 * MiB, 12 * MiB), 0);
    ck_assert_int_eq(qcow2_pwrite(t, buf, 2 * MiB, 20 * MiB), 0);
    ck_assert_int_eq(qcow2_pwrite_zeroes(t, 9 * MiB, 1 * MiB + 4096), 0);
    ck_assert_int_eq(qcow2_discard(t, 14 * MiB, 512 * 1024), 0);
    ck_assert_int_eq(qcow2_close(t), 0);
    free(buf);
    load_expect();
}

static void assert_reads_as_before(struct qcow2_image *img, const char *what)
{
    unsigned char *buf = malloc(SIZE);
    ck_assert_int_eq(qcow2_pread(img, buf, SIZE, 0), 0);
    size_t i = 0;
    while (i < SIZE && buf[i] == expect[i]) /* one assertion: Check records each one */
        i++;
    unsigned got = i < SIZE ? buf[i] : 0, want = i < SIZE ? expect[i] : 0;
    free(buf);
    ck_assert_msg(i == SIZE, "%s: byte %zu is %u, want %u", what, i, got, want);
}

static void assert_file_reads_as_before(const char *uri, const char *what)
{
    struct qcow2_image *img;
    ck_assert_int_eq(qcow2_open(uri, NULL, &img), 0);
    assert_reads_as_before(img, what);
    qcow2_close(img);
}

/* Whether some guest byte of img comes from img itself. */
static bool holds_data(struct qcow2_image *img)
{
    for (uint64_t off = 0; off < qcow2_size(img);) {
        struct qcow2_extent e;
        ck_assert_int_eq(qcow2_block_status(img, off, qcow2_size(img) - off, &e), 0);
        if (e.depth == 0 && e.present)
            return true;
        off += e.length;
    }
    return false;
}

START_TEST(commit_moves_the_data_into_base_and_empties_top)
{
    make_chain();
    struct qcow2_image *t = open_rw("mem:c/top.qcow2");
    ck_assert(holds_data(t));
    int ret = qcow2_commit(t, NULL);
    ck_assert_msg(ret == 0, "commit: %s", err_msg(ret));
    ck_assert(!holds_data(t));
    assert_reads_as_before(t, "top, same handle");
    ck_assert_int_eq(qcow2_close(t), 0);
    assert_file_reads_as_before("mem:c/top.qcow2", "top, reopened");
    assert_file_reads_as_before("mem:c/base.qcow2", "base, grown to top's size");
}
END_TEST

START_TEST(keep_top_leaves_its_data)
{
    make_chain();
    struct qcow2_image *t = open_rw("mem:c/top.qcow2");
    struct qcow2_commit_opts o = {.keep_top = true};
    ck_assert_int_eq(qcow2_commit(t, &o), 0);
    ck_assert(holds_data(t));
    assert_reads_as_before(t, "top");
    qcow2_close(t);
    assert_file_reads_as_before("mem:c/base.qcow2", "base");
}
END_TEST

static atomic_bool copy_over; /* the copy is over (emptying top may still run) */

struct prog {
    uint64_t calls, last_done, last_total, cancel_at;
    bool went_back;
    unsigned pause_us;
};

static int progress(void *opaque, uint64_t done, uint64_t total)
{
    struct prog *p = opaque;
    if (done < p->last_done || done > total)
        p->went_back = true;
    p->calls++;
    p->last_done = done;
    p->last_total = total;
    if (done >= total)
        atomic_store(&copy_over, true);
    if (p->pause_us)
        usleep(p->pause_us); /* a paused job blocks here */
    return p->cancel_at && done >= p->cancel_at;
}

START_TEST(cancel_midway_leaves_top_as_before)
{
    make_chain();
    struct qcow2_image *t = open_rw("mem:c/top.qcow2");
    struct prog p = {.cancel_at = 5 * MiB};
    struct qcow2_commit_opts o = {.progress = progress, .opaque = &p};
    ck_assert_int_eq(qcow2_commit(t, &o), -ECANCELED);
    ck_assert(strstr(err_msg(-ECANCELED), "cancel") != NULL);
    ck_assert(p.last_done >= 5 * MiB && p.last_done < p.last_total);
    ck_assert(!p.went_back);
    ck_assert(holds_data(t));
    assert_reads_as_before(t, "top after the cancel");
    ck_assert_int_eq(qcow2_close(t), 0);
    assert_file_reads_as_before("mem:c/top.qcow2", "top after the cancel, reopened");
    /* and a second commit completes */
    t = open_rw("mem:c/top.qcow2");
    struct prog q = {0};
    o.opaque = &q;
    ck_assert_int_eq(qcow2_commit(t, &o), 0);
    ck_assert(q.last_done == q.last_total && q.calls > 2 && !q.went_back);
    assert_reads_as_before(t, "top after the second commit");
    qcow2_close(t);
}
END_TEST

START_TEST(errors_leave_everything_as_it_was)
{
    make_chain();
    struct qcow2_image *t;
    ck_assert_int_eq(qcow2_open("mem:c/top.qcow2", NULL, &t), 0);
    ck_assert_int_eq(qcow2_commit(t, NULL), -EROFS);
    qcow2_close(t);
    t = open_rw("mem:c/top.qcow2");
    struct qcow2_commit_opts o = {.base = "nosuch.qcow2"};
    ck_assert_int_eq(qcow2_commit(t, &o), -EINVAL);
    ck_assert(strstr(err_msg(-EINVAL), "nosuch.qcow2") != NULL);
    o.base = "top.qcow2";
    ck_assert_int_eq(qcow2_commit(t, &o), -EINVAL);
    o.base = "base.qcow2"; /* by the backing_file field: fine */
    o.keep_top = true;
    ck_assert_int_eq(qcow2_commit(t, &o), 0);
    qcow2_close(t);
    t = open_rw("mem:c/base.qcow2");
    ck_assert_int_eq(qcow2_commit(t, NULL), -EINVAL);
    ck_assert(strstr(err_msg(-EINVAL), "backing file") != NULL);
    qcow2_close(t);
}
END_TEST

/* Readers of top run during the whole commit (with pauses in the callback) and
 * always read what top read before. */
struct reader_arg {
    struct qcow2_image *img;
    atomic_bool stop;
    unsigned seed;
    unsigned long reads;
    char failure[200];
};

static atomic_bool commit_over;

static void *read_loop(void *arg)
{
    struct reader_arg *r = arg;
    unsigned char *buf = malloc(MiB);
    unsigned s = r->seed;
    while (!atomic_load(&r->stop) && !r->failure[0]) {
        s = s * 1103515245u + 12345u;
        uint64_t off = (s >> 4) % (SIZE - MiB), len = 1 + (s >> 8) % MiB;
        int ret = qcow2_pread(r->img, buf, len, off);
        if (ret < 0)
            snprintf(r->failure, sizeof r->failure, "read at %llu (%s the commit): %s", (unsigned long long)off,
                     atomic_load(&commit_over) ? "after" : atomic_load(&copy_over) ? "at the end of" : "during", err_msg(ret));
        else if (memcmp(buf, expect + off, len))
            snprintf(r->failure, sizeof r->failure, "read at %llu+%llu differs", (unsigned long long)off,
                     (unsigned long long)len);
        r->reads++;
    }
    free(buf);
    return NULL;
}

/* Base of compressed 64 KiB clusters, top of 4 KiB clusters writing pieces of
 * them: the commit rewrites (copies) base's compressed clusters and gives their
 * bytes back, while readers of top still read the rest through their cached view. */
static void make_compressed_chain(void)
{
    vfs_remove("mem:c/base.qcow2");
    vfs_remove("mem:c/top.qcow2");
    struct qcow2_create_opts bo = {.size = SIZE};
    ck_assert_int_eq(qcow2_create("mem:c/base.qcow2", &bo), 0);
    struct qcow2_image *b = open_rw("mem:c/base.qcow2");
    unsigned char *buf = malloc(MiB);
    for (uint64_t off = 0; off < SIZE; off += 65536) {
        fill(buf, 65536, (unsigned)(off >> 16) % 7); /* compressible: few distinct clusters */
        ck_assert_int_eq(qcow2_pwrite_compressed(b, buf, 65536, off), 0);
    }
    ck_assert_int_eq(qcow2_close(b), 0);
    struct qcow2_create_opts to = {.size = SIZE, .cluster_size = 4096, .backing_file = "base.qcow2",
                                   .backing_format = "qcow2"};
    ck_assert_int_eq(qcow2_create("mem:c/top.qcow2", &to), 0);
    struct qcow2_image *t = open_rw("mem:c/top.qcow2");
    fill(buf, 4096, 9);
    for (uint64_t off = 8192; off < SIZE; off += 65536)
        ck_assert_int_eq(qcow2_pwrite(t, buf, 4096, off), 0);
    ck_assert_int_eq(qcow2_close(t), 0);
    free(buf);
    load_expect();
}

static void readers_during_commit(void (*make)(void))
{
    make();
    struct qcow2_image *t = open_rw("mem:c/top.qcow2");
    struct reader_arg r[2] = {{.img = t, .seed = 1}, {.img = t, .seed = 2}};
    pthread_t tid[2];
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pthread_create(&tid[i], NULL, read_loop, &r[i]), 0);
    struct prog p = {.pause_us = 2000};
    struct qcow2_commit_opts o = {.progress = progress, .opaque = &p};
    atomic_store(&commit_over, false);
    atomic_store(&copy_over, false);
    int ret = qcow2_commit(t, &o);
    atomic_store(&commit_over, true);
    usleep(20000); /* and after it, through the refreshed base */
    for (int i = 0; i < 2; i++) {
        atomic_store(&r[i].stop, true);
        pthread_join(tid[i], NULL);
        ck_assert_msg(!r[i].failure[0], "reader %d: %s", i, r[i].failure);
        ck_assert(r[i].reads > 0);
    }
    ck_assert_msg(ret == 0, "commit: %s", err_msg(ret));
    assert_reads_as_before(t, "top");
    qcow2_close(t);
}

START_TEST(readers_of_top_see_the_same_bytes_during_a_commit)
{
    readers_during_commit(make_chain);
}
END_TEST

START_TEST(readers_see_the_same_bytes_while_compressed_base_clusters_are_rewritten)
{
    readers_during_commit(make_compressed_chain);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("commit");
    TCase *tc = tcase_create("commit");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, commit_moves_the_data_into_base_and_empties_top);
    tcase_add_test(tc, keep_top_leaves_its_data);
    tcase_add_test(tc, cancel_midway_leaves_top_as_before);
    tcase_add_test(tc, errors_leave_everything_as_it_was);
    tcase_add_test(tc, readers_of_top_see_the_same_bytes_during_a_commit);
    tcase_add_test(tc, readers_see_the_same_bytes_while_compressed_base_clusters_are_rewritten);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_set_fork_status(sr, CK_NOFORK); /* mem: objects live in this process */
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    free(expect);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
