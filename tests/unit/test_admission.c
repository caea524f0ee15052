/* test_admission.c: unit tests of the catalog's admission model (service/access.c)
 * on the mem: backend: each rule of the table in both directions (writes,
 * downloads, job claims and runs, name reservations, delete), that every
 * refusal is -EBUSY naming the holder and leaves nothing behind, and the
 * backing-user index (-ETXTBSY naming the users); threads contending for one
 * image never hold what excludes each other (also run under TSan). */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "catalog.h"
#include "err.h"
#include "qcow2.h"
#include "vfs.h"

static struct catalog *cat;
static int dir_seq;

/* A new catalog folder mem:admN with the images a and b (1 MiB each). */
static void setup(void)
{
    char root[32], seed[48];
    snprintf(root, sizeof root, "mem:adm%d", ++dir_seq);
    snprintf(seed, sizeof seed, "%s/.keep", root);
    struct vfs_file *f;
    ck_assert_int_eq(vfs_open(seed, VFS_O_RDWR | VFS_O_CREATE, &f), 0);
    vfs_close(f);
    ck_assert_int_eq(catalog_new(root, NULL, &cat), 0);
    struct qcow2_create_opts o = {.size = 1 << 20, .version = 3};
    ck_assert_int_eq(catalog_create(cat, "a", &o), 0);
    ck_assert_int_eq(catalog_create(cat, "b", &o), 0);
}

static void teardown(void)
{
    catalog_free(cat);
    cat = NULL;
}

/* -EBUSY with a message naming holder. */
static void busy(int ret, const char *holder)
{
    ck_assert_int_eq(ret, -EBUSY);
    ck_assert_msg(strstr(err_msg(ret), holder), "'%s' does not name '%s'", err_msg(ret), holder);
}

static struct catalog_file *download(const char *name, int want)
{
    struct catalog_file *f = NULL;
    uint64_t size;
    int ret = catalog_file_open(cat, name, &f, &size);
    ck_assert_int_eq(ret, want);
    return ret == 0 ? f : NULL;
}

static struct catalog_claim *claim(const char *name, enum catalog_use use)
{
    struct catalog_claim *cl;
    ck_assert_int_eq(catalog_claim(cat, "a test job", 1, &name, &use, &cl), 0);
    catalog_claim_owner(cl, "job 9 (test)");
    return cl;
}

START_TEST(write_excludes_download_and_back)
{
    struct catalog_image *w;
    ck_assert_int_eq(catalog_get_writable(cat, "a", &w), 0);
    busy(catalog_file_open(cat, "a", &(struct catalog_file *){0}, &(uint64_t){0}), "write");
    struct catalog_file *other = download("b", 0); /* only that image */
    catalog_file_close(other);
    catalog_put_writable(w);
    struct catalog_file *f = download("a", 0);
    busy(catalog_get_writable(cat, "a", &w), "downloaded");
    struct catalog_image *r;
    ck_assert_int_eq(catalog_get(cat, "a", &r), 0); /* readers share with a download */
    catalog_put(r);
    catalog_file_close(f);
    ck_assert_int_eq(catalog_get_writable(cat, "a", &w), 0);
    catalog_put_writable(w);
}
END_TEST

START_TEST(changing_job_excludes_download_and_back)
{
    /* queued: a download is refused at once */
    struct catalog_claim *cl = claim("a", CATALOG_USE_CHANGE);
    busy(catalog_file_open(cat, "a", &(struct catalog_file *){0}, &(uint64_t){0}), "job 9 (test) is queued");
    catalog_unclaim(cl);
    /* a reading job's claim lets downloads go on */
    cl = claim("a", CATALOG_USE_READ);
    struct catalog_file *f = download("a", 0);
    /* a changing run waits for the download; a reading one does not */
    busy(catalog_reserve(cat, "a", true, "job 9 (test)"), "downloaded");
    ck_assert_int_eq(catalog_reserve(cat, "a", false, "job 9 (test)"), 0);
    catalog_release(cat, "a");
    catalog_file_close(f);
    catalog_unclaim(cl);
    /* running and changing: downloads, readers and writers refused */
    ck_assert_int_eq(catalog_reserve(cat, "a", true, "job 9 (test)"), 0);
    busy(catalog_file_open(cat, "a", &(struct catalog_file *){0}, &(uint64_t){0}), "job 9 (test) is running");
    struct catalog_image *ci;
    busy(catalog_get(cat, "a", &ci), "job 9 (test) is running");
    busy(catalog_get_writable(cat, "a", &ci), "job 9 (test) is running");
    catalog_release(cat, "a");
    f = download("a", 0);
    catalog_file_close(f);
}
END_TEST

START_TEST(reading_job_run_excludes_writes)
{
    struct catalog_image *w;
    ck_assert_int_eq(catalog_get_writable(cat, "a", &w), 0);
    busy(catalog_reserve(cat, "a", false, "job 9 (test)"), "write");
    catalog_put_writable(w);
    ck_assert_int_eq(catalog_reserve(cat, "a", false, "job 9 (test)"), 0);
    busy(catalog_get_writable(cat, "a", &w), "job 9 (test) is running");
    struct catalog_image *r;
    ck_assert_int_eq(catalog_get(cat, "a", &r), 0);
    catalog_put(r);
    busy(catalog_reserve(cat, "a", false, "job 10 (test)"), "job 9 (test)");
    catalog_release(cat, "a");
}
END_TEST

START_TEST(delete_refused_while_held)
{
    struct catalog_image *w;
    ck_assert_int_eq(catalog_get_writable(cat, "a", &w), 0);
    busy(catalog_remove(cat, "a"), "write");
    catalog_put_writable(w);
    struct catalog_file *f = download("a", 0);
    busy(catalog_remove(cat, "a"), "downloaded");
    catalog_file_close(f);
    struct catalog_claim *cl = claim("a", CATALOG_USE_READ);
    busy(catalog_remove(cat, "a"), "job 9 (test) is queued");
    ck_assert_int_eq(catalog_reserve(cat, "a", false, "job 9 (test)"), 0);
    busy(catalog_remove(cat, "a"), "job 9 (test) is running");
    catalog_release(cat, "a");
    catalog_unclaim(cl);
    struct catalog_image *ci;
    ck_assert_int_eq(catalog_get(cat, "a", &ci), 0); /* still there */
    catalog_put(ci);
    ck_assert_int_eq(catalog_remove(cat, "a"), 0);
    ck_assert_int_eq(catalog_get(cat, "a", &ci), -ENOENT);
}
END_TEST

/* catalog_remove_if's check: a writer that comes while it runs is refused,
 * so what it compared is what is removed. */
static int check_calls;
static int try_write_in_check(void *ctx, struct catalog_image *ci)
{
    check_calls++;
    ck_assert_ptr_nonnull(ci);
    struct catalog_image *w;
    busy(catalog_get_writable(cat, "a", &w), "delete");
    return *(int *)ctx;
}

START_TEST(remove_if_holds_writers_off)
{
    int refuse = -ECANCELED, pass = 0;
    check_calls = 0;
    ck_assert_int_eq(catalog_remove_if(cat, "a", try_write_in_check, &refuse), -ECANCELED);
    struct catalog_image *ci;
    ck_assert_int_eq(catalog_get(cat, "a", &ci), 0); /* refused by the check: still there, writable again */
    catalog_put(ci);
    ck_assert_int_eq(catalog_get_writable(cat, "a", &ci), 0);
    catalog_put_writable(ci);
    ck_assert_int_eq(catalog_remove_if(cat, "a", try_write_in_check, &pass), 0);
    ck_assert_int_eq(check_calls, 2);
    ck_assert_int_eq(catalog_get(cat, "a", &ci), -ENOENT);
}
END_TEST

static int created;
static void count(void *opaque, const char *what, const char *name)
{
    if (!strcmp(what, "image-created") && !strcmp(name, "t"))
        created++;
}

START_TEST(reserved_name_refuses_create_and_upload)
{
    catalog_set_notify(cat, count, NULL);
    created = 0;
    const char *names[] = {"a", "t"};
    const enum catalog_use uses[] = {CATALOG_USE_READ, CATALOG_USE_CREATE};
    struct catalog_claim *cl;
    ck_assert_int_eq(catalog_claim(cat, "a convert job", 2, names, uses, &cl), 0);
    catalog_claim_owner(cl, "job 9 (convert)");
    struct qcow2_create_opts o = {.size = 1 << 20, .version = 3};
    busy(catalog_create(cat, "t", &o), "job 9 (convert)");
    struct catalog_upload *u;
    busy(catalog_upload_begin(cat, "t", 4096, &u), "job 9 (convert)");
    /* a second convert to the same target is refused at submit */
    struct catalog_claim *cl2;
    busy(catalog_claim(cat, "a convert job", 2, names, uses, &cl2), "job 9 (convert)");
    struct catalog_image *ci;
    ck_assert_int_eq(catalog_get(cat, "t", &ci), -ENOENT);
    ck_assert_int_eq(created, 0);
    /* and a delete of the source is refused */
    busy(catalog_remove(cat, "a"), "job 9 (convert)");
    catalog_unclaim(cl);
    ck_assert_int_eq(catalog_create(cat, "t", &o), 0);
    ck_assert_int_eq(created, 1);
}
END_TEST

START_TEST(upload_holds_its_name)
{
    struct catalog_upload *u;
    ck_assert_int_eq(catalog_upload_begin(cat, "up", 4096, &u), 0);
    struct qcow2_create_opts o = {.size = 1 << 20, .version = 3};
    busy(catalog_create(cat, "up", &o), "upload");
    struct catalog_upload *u2;
    busy(catalog_upload_begin(cat, "up", 4096, &u2), "upload");
    const char *names[] = {"a", "up"};
    const enum catalog_use uses[] = {CATALOG_USE_READ, CATALOG_USE_CREATE};
    struct catalog_claim *cl;
    busy(catalog_claim(cat, "a convert job", 2, names, uses, &cl), "upload");
    busy(catalog_remove(cat, "up"), "upload");
    catalog_upload_abort(u);
    ck_assert_int_eq(catalog_create(cat, "up", &o), 0);
}
END_TEST

START_TEST(backing_users_from_the_index)
{
    /* b over a: a is b's backing file */
    struct qcow2_create_opts o = {.size = 1 << 20, .version = 3, .backing_file = "a"};
    ck_assert_int_eq(catalog_create(cat, "over", &o), 0);
    struct catalog_image *w;
    int ret = catalog_get_writable(cat, "a", &w);
    ck_assert_int_eq(ret, -ETXTBSY);
    ck_assert_msg(strstr(err_msg(ret), "'over'"), "%s", err_msg(ret));
    ret = catalog_remove(cat, "a");
    ck_assert_int_eq(ret, -ETXTBSY);
    ck_assert_int_eq(catalog_get_writable(cat, "b", &w), 0); /* nobody's base */
    catalog_put_writable(w);
    ck_assert_int_eq(catalog_remove(cat, "over"), 0);
    ck_assert_int_eq(catalog_get_writable(cat, "a", &w), 0);
    catalog_put_writable(w);
}
END_TEST

/* An overlay put in the folder behind the catalog's back (after the index was
 * filled) counts once it is listed. */
START_TEST(backing_users_put_in_behind_its_back)
{
    struct catalog_image *w;
    ck_assert_int_eq(catalog_get_writable(cat, "a", &w), 0); /* fills the index */
    catalog_put_writable(w);
    char *uri = catalog_uri(cat, "side");
    struct qcow2_create_opts o = {.size = 1 << 20, .version = 3, .backing_file = "a.qcow2", .backing_format = "qcow2"};
    ck_assert_int_eq(qcow2_create(uri, &o), 0);
    free(uri);
    char **names;
    size_t n;
    ck_assert_int_eq(catalog_list(cat, &names, &n), 0);
    catalog_names_free(names, n);
    int ret = catalog_get_writable(cat, "a", &w);
    ck_assert_int_eq(ret, -ETXTBSY);
    ck_assert_msg(strstr(err_msg(ret), "'side'"), "%s", err_msg(ret));
}
END_TEST

/* ---- threads: the rules hold under contention ---- */

static atomic_int writers, downloads, changers, violations;

static void check_exclusion(void)
{
    usleep(20); /* hold it a moment: the others run meanwhile */
    int w = atomic_load(&writers), d = atomic_load(&downloads), x = atomic_load(&changers);
    if ((w && d) || (x && (w || d)) || x > 1)
        atomic_fetch_add(&violations, 1);
}

static void *hammer(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    for (int i = 0; i < 1000; i++) {
        seed = seed * 1103515245u + 12345u;
        switch ((seed >> 16) % 3) {
        case 0: {
            struct catalog_image *w;
            if (catalog_get_writable(cat, "a", &w) == 0) {
                atomic_fetch_add(&writers, 1);
                check_exclusion();
                atomic_fetch_sub(&writers, 1);
                catalog_put_writable(w);
            }
            break;
        }
        case 1: {
            struct catalog_file *f;
            uint64_t size;
            if (catalog_file_open(cat, "a", &f, &size) == 0) {
                atomic_fetch_add(&downloads, 1);
                check_exclusion();
                atomic_fetch_sub(&downloads, 1);
                catalog_file_close(f);
            }
            break;
        }
        default:
            if (catalog_reserve(cat, "a", true, "job 9 (test)") == 0) {
                atomic_fetch_add(&changers, 1);
                check_exclusion();
                atomic_fetch_sub(&changers, 1);
                catalog_release(cat, "a");
            }
        }
    }
    return NULL;
}

START_TEST(exclusion_under_contention)
{
    pthread_t t[4];
    for (uintptr_t i = 0; i < 4; i++)
        ck_assert_int_eq(pthread_create(&t[i], NULL, hammer, (void *)(i + 1)), 0);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    ck_assert_int_eq(atomic_load(&violations), 0);
    /* everything left: the name is free for a delete */
    ck_assert_int_eq(catalog_remove(cat, "a"), 0);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("admission");
    TCase *tc = tcase_create("rules");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, write_excludes_download_and_back);
    tcase_add_test(tc, changing_job_excludes_download_and_back);
    tcase_add_test(tc, reading_job_run_excludes_writes);
    tcase_add_test(tc, delete_refused_while_held);
    tcase_add_test(tc, remove_if_holds_writers_off);
    tcase_add_test(tc, reserved_name_refuses_create_and_upload);
    tcase_add_test(tc, upload_holds_its_name);
    tcase_add_test(tc, backing_users_from_the_index);
    tcase_add_test(tc, backing_users_put_in_behind_its_back);
    tcase_add_test(tc, exclusion_under_contention);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
