/* meta.c: qcowctl's snapshot and bitmap commands: listings as tables (or JSON),
 * the snapshot jobs, and the synchronous bitmap changes. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ctl.h"

/* GET of a list under the image; JSON prints the whole answer, text a table made by row(). */
static int list_of(const char *name, const char *sub, const char *header, void (*row)(json_t *))
{
    char *p = item_path(name, sub, NULL, "");
    json_t *a = NULL;
    int r = p ? call_json("GET", p, NULL, &a) : EXIT_FAIL;
    free(p);
    if (r == EXIT_OK && ctl_json) {
        r = print_json(a);
    } else if (r == EXIT_OK) {
        json_t *list = json_object_get(a, sub), *it;
        size_t i;
        if (json_array_size(list))
            puts(header);
        json_array_foreach(list, i, it) row(it);
    }
    json_decref(a);
    return r;
}

static void snapshot_row(json_t *s)
{
    json_int_t vmsize = 0, date = 0, clock = 0;
    const char *id = "", *name = "";
    json_unpack(s, "{s?s, s?s, s?I, s?I, s?I}", "id", &id, "name", &name, "vm-state-size", &vmsize, "date-sec", &date,
                "vm-clock-sec", &clock);
    time_t t = (time_t)date;
    struct tm tm;
    char when[32] = "";
    if (localtime_r(&t, &tm))
        strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
    printf("%-4s %-20s %12" PRId64 " %s %4" PRId64 ":%02" PRId64 ":%02" PRId64 "\n", id, name, (int64_t)vmsize, when,
           (int64_t)clock / 3600, (int64_t)clock / 60 % 60, (int64_t)clock % 60);
}

int cmd_snapshot_list(int argc, char **argv)
{
    if (argc != 2)
        return usage_error("usage: qcowctl snapshot list NAME");
    return list_of(argv[1], "snapshots", "ID   TAG                   VM-SIZE     DATE                VM-CLOCK",
                   snapshot_row);
}

/* snapshot create|delete|revert NAME SNAP [--wait] */
int cmd_snapshot_job(int argc, char **argv)
{
    static const struct option opts[] = {{"wait", no_argument, 0, 'w'}, {0, 0, 0, 0}};
    const char *verb = argv[0];
    bool wait = false;
    int c;
    while ((c = ctl_getopt(argc, argv, opts)) != -1) {
        if (c == '?')
            return EXIT_USAGE;
        wait = true;
    }
    if (argc - optind != 2)
        return usage_error("usage: qcowctl snapshot %s NAME SNAP [--wait]", verb);
    const char *name = argv[optind], *snap = argv[optind + 1];
    if (strcmp(verb, "create") == 0) {
        char *p = item_path(name, "snapshots", NULL, "");
        json_t *body = json_pack("{s:s}", "name", snap);
        int r = p && body ? start_job("POST", p, body, wait) : (json_decref(body), fail("out of memory"));
        free(p);
        return r;
    }
    char *p = item_path(name, "snapshots", snap, strcmp(verb, "revert") == 0 ? "/revert" : "");
    if (!p)
        return EXIT_FAIL;
    /* revert is a POST, delete a DELETE; both answer 202 with the job */
    int r = start_job(strcmp(verb, "revert") == 0 ? "POST" : "DELETE", p, NULL, wait);
    free(p);
    return r;
}

int cmd_snapshot_read(int argc, char **argv)
{
    if (argc < 3 || argc > 5)
        return usage_error("usage: qcowctl snapshot read NAME SNAP [OFFSET [LENGTH]]");
    char *p = item_path(argv[1], "snapshots", argv[2], "/data");
    int r = p ? read_range(p, argc - 3, argv + 3) : EXIT_FAIL;
    free(p);
    return r;
}

static void bitmap_row(json_t *b)
{
    const char *name = "";
    json_int_t gran = 0;
    json_t *flags = NULL, *f;
    size_t i;
    json_unpack(b, "{s?s, s?I, s?o}", "name", &name, "granularity", &gran, "flags", &flags);
    printf("%-24s %11" PRId64 "  ", name, (int64_t)gran);
    json_array_foreach(flags, i, f) printf("%s%s", i ? "," : "", json_string_value(f) ? json_string_value(f) : "");
    printf("%s\n", json_array_size(flags) ? "" : "-");
}

int cmd_bitmap_list(int argc, char **argv)
{
    if (argc != 2)
        return usage_error("usage: qcowctl bitmap list NAME");
    return list_of(argv[1], "bitmaps", "NAME                     GRANULARITY  FLAGS", bitmap_row);
}

/* A bitmap request with an optional body, the answer printed. */
static int bitmap_call(const char *method, const char *name, const char *bitmap, const char *suffix, json_t *body)
{
    int r = call_at(method, item_path(name, "bitmaps", bitmap, suffix), body, true);
    json_decref(body);
    return r;
}

int cmd_bitmap_info(int argc, char **argv)
{
    if (argc != 3)
        return usage_error("usage: qcowctl bitmap info NAME BITMAP");
    return bitmap_call("GET", argv[1], argv[2], "", NULL);
}

int cmd_bitmap_add(int argc, char **argv)
{
    static const struct option opts[] = {
        {"granularity", required_argument, 0, 'g'}, {"disabled", no_argument, 0, 'd'}, {0, 0, 0, 0}};
    json_t *body = json_object();
    uint64_t g;
    int c;
    while ((c = ctl_getopt(argc, argv, opts)) != -1) {
        if (c == '?' || (c == 'g' && parse_size(optarg, "granularity", &g)))
            return json_decref(body), EXIT_USAGE;
        json_object_set_new(body, c == 'g' ? "granularity" : "disabled",
                            c == 'g' ? json_integer((json_int_t)g) : json_true());
    }
    if (argc - optind != 2)
        return json_decref(body), usage_error("usage: qcowctl bitmap add NAME BITMAP [--granularity N] [--disabled]");
    json_object_set_new(body, "name", json_string(argv[optind + 1]));
    char *p = item_path(argv[optind], "bitmaps", NULL, "");
    int r = p ? call_print("POST", p, body, NULL) : EXIT_FAIL;
    free(p);
    json_decref(body);
    return r;
}

int cmd_bitmap_remove(int argc, char **argv)
{
    if (argc != 3)
        return usage_error("usage: qcowctl bitmap remove NAME BITMAP");
    return call_at("DELETE", item_path(argv[1], "bitmaps", argv[2], ""), NULL, false);
}

/* bitmap clear|enable|disable NAME BITMAP */
int cmd_bitmap_op(int argc, char **argv)
{
    if (argc != 3)
        return usage_error("usage: qcowctl bitmap %s NAME BITMAP", argv[0]);
    char suffix[16];
    snprintf(suffix, sizeof suffix, "/%s", argv[0]);
    return bitmap_call("POST", argv[1], argv[2], suffix, NULL);
}

int cmd_bitmap_merge(int argc, char **argv)
{
    static const struct option opts[] = {{"source-image", required_argument, 0, 's'}, {0, 0, 0, 0}};
    const char *src_image = NULL;
    int c;
    while ((c = ctl_getopt(argc, argv, opts)) != -1) {
        if (c == '?')
            return EXIT_USAGE;
        src_image = optarg;
    }
    if (argc - optind != 3)
        return usage_error("usage: qcowctl bitmap merge NAME BITMAP SOURCE [--source-image IMAGE]");
    json_t *body = json_pack("{s:s}", "source", argv[optind + 2]);
    if (body && src_image)
        json_object_set_new(body, "source-image", json_string(src_image));
    return bitmap_call("POST", argv[optind], argv[optind + 1], "/merge", body);
}
