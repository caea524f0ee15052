/* test_bitmap.c: unit tests of the engine's persistent dirty bitmaps on the mem
 * backend: error codes, persistence across close, and writers, readers and bitmap
 * changes on one image at once (a TSan target). */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "qcow2.h"
#include "vfs.h"

#define MiB (1024u * 1024u)
#define SIZE (16 * MiB)
#define GRAN 65536u

static struct qcow2_image *make(const char *uri, int version, bool rw)
{
    vfs_remove(uri);
    struct qcow2_create_opts c = {.size = SIZE, .version = version};
    int ret = qcow2_create(uri, &c);
    ck_assert_msg(ret == 0, "create: %s", err_msg(ret));
    struct qcow2_open_opts o = {.read_write = rw};
    struct qcow2_image *img;
    ret = qcow2_open(uri, &o, &img);
    ck_assert_msg(ret == 0, "open: %s", err_msg(ret));
    return img;
}

static struct qcow2_image *reopen(const char *uri, bool rw)
{
    struct qcow2_open_opts o = {.read_write = rw};
    struct qcow2_image *img;
    int ret = qcow2_open(uri, &o, &img);
    ck_assert_msg(ret == 0, "open: %s", err_msg(ret));
    return img;
}

/* The dirty granules of bitmap name as a byte per granule. */
static void dirty_map(struct qcow2_image *img, const char *name, unsigned char *map)
{
    memset(map, 0, SIZE / GRAN);
    for (uint64_t off = 0; off < SIZE;) {
        bool d;
        uint64_t n;
        int ret = qcow2_bitmap_dirty(img, name, off, SIZE - off, &d, &n);
        ck_assert_msg(ret == 0, "dirty: %s", err_msg(ret));
        ck_assert(n > 0 && n <= SIZE - off);
        for (uint64_t k = off / GRAN; d && k < (off + n) / GRAN; k++)
            map[k] = 1;
        off += n;
    }
}

static void clean_check(struct qcow2_image *img)
{
    struct qcow2_check_result r;
    ck_assert_int_eq(qcow2_flush(img), 0);
    ck_assert_int_eq(qcow2_check(img, QCOW2_REPAIR_NONE, &r, NULL, NULL), 0);
    ck_assert_uint_eq(r.corruptions, 0);
    ck_assert_uint_eq(r.leaks, 0);
}

START_TEST(errors_have_their_codes)
{
    struct qcow2_image *img = make("mem:b/e.qcow2", 3, true);
    ck_assert_int_eq(qcow2_bitmap_add(img, "a", 0, false), 0);
    ck_assert_int_eq(qcow2_bitmap_add(img, "a", 0, false), -EEXIST);
    ck_assert_int_eq(qcow2_bitmap_add(img, "", 0, false), -EINVAL);
    char big[1100];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = 0;
    ck_assert_int_eq(qcow2_bitmap_add(img, big, 0, false), -EINVAL);
    big[1023] = 0;
    ck_assert_int_eq(qcow2_bitmap_add(img, big, 0, true), 0);
    ck_assert_int_eq(qcow2_bitmap_add(img, "g", 256, false), -EINVAL);
    ck_assert_int_eq(qcow2_bitmap_add(img, "g", 3000, false), -EINVAL);
    ck_assert_int_eq(qcow2_bitmap_add(img, "g", 1u << 31, true), 0);
    ck_assert_int_eq(qcow2_bitmap_remove(img, "nope"), -ENOENT);
    ck_assert_int_eq(qcow2_bitmap_clear(img, "nope"), -ENOENT);
    ck_assert_int_eq(qcow2_bitmap_enable(img, "nope"), -ENOENT);
    ck_assert_int_eq(qcow2_bitmap_disable(img, "nope"), -ENOENT);
    ck_assert_int_eq(qcow2_bitmap_merge(img, "a", NULL, "nope"), -ENOENT);
    bool d;
    uint64_t n;
    ck_assert_int_eq(qcow2_bitmap_dirty(img, "nope", 0, 1, &d, &n), -ENOENT);
    ck_assert_int_eq(qcow2_bitmap_dirty(img, "a", 0, SIZE, &d, &n), 0);
    ck_assert(!d && n == SIZE);
    clean_check(img);
    ck_assert_int_eq(qcow2_close(img), 0);

    img = reopen("mem:b/e.qcow2", false);
    ck_assert_int_eq(qcow2_bitmap_add(img, "r", 0, false), -EROFS);
    ck_assert_int_eq(qcow2_bitmap_dirty(img, "g", 0, SIZE, &d, &n), 0); /* reading is fine */
    ck_assert(!d && n == SIZE);
    qcow2_close(img);

    img = make("mem:b/v2.qcow2", 2, true);
    ck_assert_int_eq(qcow2_bitmap_add(img, "a", 0, false), -ENOTSUP);
    qcow2_close(img);
}
END_TEST

START_TEST(enabled_bitmaps_persist_what_writes_marked)
{
    struct qcow2_image *img = make("mem:b/p.qcow2", 3, true);
    unsigned char buf[4096] = {1};
    ck_assert_int_eq(qcow2_bitmap_add(img, "on", 0, false), 0);
    ck_assert_int_eq(qcow2_bitmap_add(img, "off", 0, true), 0);
    ck_assert_int_eq(qcow2_pwrite(img, buf, 10, 3 * MiB + 5), 0);
    ck_assert_int_eq(qcow2_pwrite_zeroes(img, 5 * MiB, 2 * GRAN), 0);
    ck_assert_int_eq(qcow2_discard(img, 8 * MiB, 1), 0);
    ck_assert_int_eq(qcow2_close(img), 0);
    img = reopen("mem:b/p.qcow2", false);
    const struct qcow2_info *in = qcow2_get_info(img);
    ck_assert_uint_eq(in->nb_bitmaps, 2);
    ck_assert(in->bitmaps[0].auto_ && !in->bitmaps[0].in_use && !in->bitmaps[1].auto_);
    static unsigned char map[SIZE / GRAN];
    dirty_map(img, "on", map);
    for (unsigned k = 0; k < SIZE / GRAN; k++)
        ck_assert_msg(map[k] == (k == 3 * MiB / GRAN || k == 5 * MiB / GRAN || k == 5 * MiB / GRAN + 1 ||
                                 k == 8 * MiB / GRAN),
                      "granule %u", k);
    dirty_map(img, "off", map);
    for (unsigned k = 0; k < SIZE / GRAN; k++)
        ck_assert(!map[k]);
    qcow2_close(img);
}
END_TEST

/* ---- writers, readers and changes at once ---- */

struct shared {
    struct qcow2_image *img;
    struct qcow2_image *src; /* another image: its disabled bitmap "frozen" is merged and read */
    unsigned char written[SIZE / GRAN]; /* granules the writer touched */
    pthread_mutex_t lock;
    int bad;
};

static void *writer(void *arg)
{
    struct shared *s = arg;
    unsigned seed = 5;
    unsigned char *buf = malloc(200000);
    memset(buf, 0x5a, 200000);
    for (int i = 0; i < 200 && !s->bad; i++) {
        uint64_t n = 1 + rand_r(&seed) % 200000, off = (uint64_t)rand_r(&seed) % (SIZE - n);
        int ret = i % 5 == 0 ? qcow2_pwrite_zeroes(s->img, off, n) : qcow2_pwrite(s->img, buf, n, off);
        pthread_mutex_lock(&s->lock);
        for (uint64_t k = off / GRAN; k <= (off + n - 1) / GRAN; k++)
            s->written[k] = 1;
        if (ret)
            s->bad++;
        pthread_mutex_unlock(&s->lock);
    }
    free(buf);
    return NULL;
}

static void *changer(void *arg)
{
    struct shared *s = arg;
    char name[32];
    for (int i = 0; i < 40 && !s->bad; i++) {
        snprintf(name, sizeof name, "tmp%d", i);
        int ret = qcow2_bitmap_add(s->img, name, 4096u << (i % 4), i % 2);
        if (!ret)
            ret = qcow2_bitmap_merge(s->img, name, NULL, "main");
        if (!ret)
            ret = qcow2_bitmap_merge(s->img, name, s->src, "frozen");
        if (!ret)
            ret = i % 3 ? qcow2_bitmap_disable(s->img, name) : qcow2_bitmap_clear(s->img, name);
        if (!ret && i % 4)
            ret = qcow2_bitmap_remove(s->img, name);
        if (ret) {
            fprintf(stderr, "changer: %s\n", err_msg(ret));
            s->bad++;
        }
    }
    return NULL;
}

static void *reader(void *arg)
{
    struct shared *s = arg;
    unsigned char *buf = malloc(65536);
    for (int i = 0; i < 300 && !s->bad; i++) {
        bool d;
        uint64_t n;
        struct qcow2_bitmap_info *l;
        uint32_t cnt;
        if (qcow2_bitmap_dirty(s->img, "main", (uint64_t)i * 4096 % SIZE, SIZE, &d, &n) ||
            qcow2_bitmap_dirty(s->src, "frozen", (uint64_t)i * 4096 % SIZE, SIZE, &d, &n) ||
            qcow2_bitmap_list(s->img, &l, &cnt) || qcow2_pread(s->img, buf, 65536, (uint64_t)i * 12345 % (SIZE - 65536))) {
            s->bad++;
            break;
        }
        ck_assert(cnt >= 1 && !strcmp(l[0].name, "main"));
        qcow2_bitmap_list_free(l, cnt);
    }
    free(buf);
    return NULL;
}

START_TEST(writers_readers_and_changes_at_once)
{
    struct shared *s = calloc(1, sizeof *s);
    pthread_mutex_init(&s->lock, NULL);
    s->img = make("mem:b/c.qcow2", 3, true);
    ck_assert_int_eq(qcow2_bitmap_add(s->img, "main", GRAN, false), 0);
    /* the source image: one granule marked, then frozen, and reopened so its bits come from disk */
    s->src = make("mem:b/src.qcow2", 3, true);
    ck_assert_int_eq(qcow2_bitmap_add(s->src, "frozen", 4096, false), 0);
    ck_assert_int_eq(qcow2_pwrite(s->src, "x", 1, SIZE - 1), 0);
    ck_assert_int_eq(qcow2_bitmap_disable(s->src, "frozen"), 0);
    ck_assert_int_eq(qcow2_close(s->src), 0);
    s->src = reopen("mem:b/src.qcow2", false);
    pthread_t t[4];
    ck_assert_int_eq(pthread_create(&t[0], NULL, writer, s), 0);
    ck_assert_int_eq(pthread_create(&t[1], NULL, changer, s), 0);
    ck_assert_int_eq(pthread_create(&t[2], NULL, reader, s), 0);
    ck_assert_int_eq(pthread_create(&t[3], NULL, reader, s), 0);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    ck_assert_int_eq(s->bad, 0);
    qcow2_close(s->src);
    static unsigned char map[SIZE / GRAN];
    dirty_map(s->img, "main", map);
    ck_assert(memcmp(map, s->written, sizeof map) == 0);
    s->written[SIZE / GRAN - 1] = 1; /* what "frozen" brought into tmp4 */
    /* tmp0, tmp4, ...: kept, holding what main held when they merged it */
    ck_assert_int_eq(qcow2_bitmap_merge(s->img, "main", NULL, "tmp4"), 0);
    dirty_map(s->img, "main", map);
    ck_assert(memcmp(map, s->written, sizeof map) == 0);
    clean_check(s->img);
    ck_assert_int_eq(qcow2_close(s->img), 0);
    s->img = reopen("mem:b/c.qcow2", true);
    dirty_map(s->img, "main", map);
    ck_assert(memcmp(map, s->written, sizeof map) == 0);
    ck_assert_uint_eq(qcow2_get_info(s->img)->nb_bitmaps, 11);
    clean_check(s->img);
    qcow2_close(s->img);
    pthread_mutex_destroy(&s->lock);
    free(s);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("bitmap");
    TCase *tc = tcase_create("bitmap");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, errors_have_their_codes);
    tcase_add_test(tc, enabled_bitmaps_persist_what_writes_marked);
    tcase_add_test(tc, writers_readers_and_changes_at_once);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_set_fork_status(sr, CK_NOFORK); /* one process: the mem backend's objects live in it */
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
