/* test_qimgjson.c: the qemu-img JSON library (service/qimgjson) on images made by
 * the engine on the mem: backend: strings as qemu-img shows them, which keys appear
 * when, the REST shape, and the check report. */
#include <check.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"
#include "qimgjson.h"

/* qj_str(in) as UTF-8 bytes (n of them): compared with want (wn bytes). */
static void str_is(const char *in, const char *want, size_t wn)
{
    json_t *j = qj_str(in);
    ck_assert_ptr_nonnull(j);
    ck_assert_uint_eq(json_string_length(j), wn);
    ck_assert_mem_eq(json_string_value(j), want, wn);
    json_decref(j);
}

#define FFFD "\xEF\xBF\xBD"

START_TEST(str_valid_utf8_is_kept)
{
    str_is("plain", "plain", 5);
    str_is("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80", "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80", 14);
    str_is("", "", 0);
}
END_TEST

START_TEST(str_bad_sequences_become_fffd_as_in_qemu)
{
    str_is("a\xFF"
           "b",
           "a" FFFD "b", 5); /* no UTF-8 byte */
    str_is("a\x80"
           "b",
           "a" FFFD "b", 5);                 /* a stray continuation byte */
    str_is("s\xC3x", "s" FFFD "x", 5);       /* a lead byte cut short: x is kept */
    str_is("\xE2\x82", FFFD, 3);             /* cut by the end */
    str_is("\xED\xA0\x80.", FFFD ".", 4);    /* a surrogate: one for the sequence */
    str_is("\xE0\x80\xAF", FFFD, 3);         /* overlong '/' */
    str_is("\xEF\xBF\xBE", FFFD, 3);         /* U+FFFE, a noncharacter */
    str_is("\xEF\xB7\x90", FFFD, 3);         /* U+FDD0, a noncharacter */
    str_is("\xF4\x90\x80\x80", FFFD, 3);     /* past U+10FFFF */
    str_is("\xF8\x88\x80\x80\x80", FFFD, 3); /* a 5-byte form */
    str_is("x\xC0\x80y", "x\0y", 3);         /* modified UTF-8's NUL */
}
END_TEST

START_TEST(full_backing_name_joins_the_folder)
{
    const char *cases[][3] = {
        {"top.qcow2", "base.qcow2", "base.qcow2"},
        {"d/top.qcow2", "base.qcow2", "d/base.qcow2"},
        {"/a/b/top.qcow2", "../c.qcow2", "/a/b/../c.qcow2"},
        {"d/top.qcow2", "/abs.qcow2", "/abs.qcow2"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *s = qj_full_backing_name(cases[i][0], cases[i][1]);
        ck_assert_str_eq(s, cases[i][2]);
        free(s);
    }
}
END_TEST

/* A new image at uri (mem:), opened read-write. */
static struct qcow2_image *make(const char *uri, int version, bool lazy)
{
    struct qcow2_create_opts c = {.size = 1 << 20, .version = version, .lazy_refcounts = lazy};
    ck_assert_int_eq(qcow2_create(uri, &c), 0);
    struct qcow2_open_opts o = {.read_write = true};
    struct qcow2_image *img;
    ck_assert_int_eq(qcow2_open(uri, &o, &img), 0);
    return img;
}

static json_t *data_of(json_t *info)
{
    return json_object_get(json_object_get(info, "format-specific"), "data");
}

START_TEST(info_keys_as_qemu_img_shows_them)
{
    struct qcow2_image *img = make("mem:q/v3.qcow2", 3, true);
    json_t *o = qj_info(img, &(struct qj_info_opts){.filename = "v3.qcow2"});
    ck_assert_ptr_nonnull(o);
    /* qemu-img 7.2's order: the text diffs with qemu-img's */
    const char *order[] = {"virtual-size", "cluster-size", "format", "actual-size", "format-specific", "dirty-flag"};
    const char *key;
    json_t *v;
    size_t at = 0;
    json_object_foreach(o, key, v)
    {
        if (at < 6 && !strcmp(key, order[at]))
            at++;
    }
    ck_assert_uint_eq(at, 6);
    ck_assert_ptr_null(json_object_get(o, "snapshots")); /* none: left out */
    ck_assert_ptr_null(json_object_get(data_of(o), "bitmaps"));
    ck_assert(json_is_true(json_object_get(data_of(o), "lazy-refcounts")));
    ck_assert_str_eq(json_string_value(json_object_get(o, "filename")), "v3.qcow2");
    json_decref(o);

    ck_assert_int_eq(qcow2_snapshot_create(img, "s1"), 0);
    ck_assert_int_eq(qcow2_bitmap_add(img, "b1", 0, true), 0);
    o = qj_info(img, &(struct qj_info_opts){.filename = "v3.qcow2"});
    json_t *s = json_array_get(json_object_get(o, "snapshots"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(s, "name")), "s1");
    ck_assert(json_is_integer(json_object_get(s, "vm-clock-sec")));
    json_t *b = json_array_get(json_object_get(data_of(o), "bitmaps"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(b, "name")), "b1");
    ck_assert_uint_eq(json_array_size(json_object_get(b, "flags")), 0); /* disabled: no "auto" */
    json_decref(o);
    ck_assert_int_eq(qcow2_close(img), 0);
}
END_TEST

START_TEST(info_rest_shape_lists_always_and_v3_keys)
{
    struct qcow2_image *img = make("mem:q/v2.qcow2", 2, false);
    json_t *o = qj_info(img, &(struct qj_info_opts){.filename = "v2.qcow2"});
    ck_assert_ptr_null(json_object_get(data_of(o), "corrupt")); /* compat 0.10: qemu-img leaves them out */
    ck_assert_ptr_null(json_object_get(data_of(o), "lazy-refcounts"));
    json_decref(o);
    o = qj_info(img, &(struct qj_info_opts){.filename = "v2.qcow2", .flags = QJ_ALWAYS_LISTED});
    ck_assert_uint_eq(json_array_size(json_object_get(o, "snapshots")), 0);
    ck_assert(json_is_array(json_object_get(data_of(o), "bitmaps")));
    ck_assert(json_is_false(json_object_get(data_of(o), "corrupt")));
    ck_assert(json_is_false(json_object_get(data_of(o), "extended-l2")));
    json_decref(o);
    /* a given snapshot list is taken and shown as it is */
    json_t *mark = json_array();
    o = qj_info(img, &(struct qj_info_opts){.filename = "v2.qcow2", .snapshots = mark});
    ck_assert_ptr_eq(json_object_get(o, "snapshots"), mark);
    json_decref(o);
    ck_assert_int_eq(qcow2_close(img), 0);
}
END_TEST

START_TEST(check_report_leaves_zero_counters_out)
{
    struct qcow2_check_result r = {.leaks = 3, .total_clusters = 16, .image_end_offset = 1 << 18};
    json_t *o = qj_check("x.qcow2", &r);
    ck_assert_int_eq(json_integer_value(json_object_get(o, "leaks")), 3);
    ck_assert_int_eq(json_integer_value(json_object_get(o, "check-errors")), 0); /* always there */
    ck_assert_ptr_null(json_object_get(o, "corruptions"));
    ck_assert_ptr_null(json_object_get(o, "leaks-fixed"));
    ck_assert_str_eq(json_string_value(json_object_get(o, "format")), "qcow2");
    ck_assert_uint_eq(json_object_size(o), 6);
    json_decref(o);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("qimgjson");
    TCase *tc = tcase_create("qimgjson");
    tcase_add_test(tc, str_valid_utf8_is_kept);
    tcase_add_test(tc, str_bad_sequences_become_fffd_as_in_qemu);
    tcase_add_test(tc, full_backing_name_joins_the_folder);
    tcase_add_test(tc, info_keys_as_qemu_img_shows_them);
    tcase_add_test(tc, info_rest_shape_lists_always_and_v3_keys);
    tcase_add_test(tc, check_report_leaves_zero_counters_out);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
