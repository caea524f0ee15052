/* info.c: `qcowimg info`, human or JSON with qemu-img's field names. */
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qcowimg.h"

/* The backing file's name as qemu-img shows it: relative names joined to the
 * folder of the image's name as given. */
static char *full_backing_name(const char *given, const char *backing)
{
    char *out;
    if (backing[0] == '/' || !strchr(given, '/')) {
        out = strdup(backing);
    } else {
        const char *slash = strrchr(given, '/');
        if (asprintf(&out, "%.*s/%s", (int)(slash - given), given, backing) < 0)
            out = NULL;
    }
    return out;
}

static json_t *snapshots_json(const struct qcow2_info *in)
{
    json_t *a = json_array();
    for (uint32_t i = 0; i < in->nb_snapshots; i++) {
        const struct qcow2_snapshot_info *s = &in->snapshots[i];
        json_t *o = json_object();
        if (s->icount != UINT64_MAX)
            json_object_set_new(o, "icount", json_integer((json_int_t)s->icount));
        json_object_set_new(o, "vm-clock-nsec", json_integer((json_int_t)(s->vm_clock_nsec % 1000000000ull)));
        json_object_set_new(o, "name", json_string(s->name));
        json_object_set_new(o, "date-sec", json_integer(s->date_sec));
        json_object_set_new(o, "date-nsec", json_integer(s->date_nsec));
        json_object_set_new(o, "vm-clock-sec", json_integer((json_int_t)(s->vm_clock_nsec / 1000000000ull)));
        json_object_set_new(o, "id", json_string(s->id));
        json_object_set_new(o, "vm-state-size", json_integer((json_int_t)s->vm_state_size));
        json_array_append_new(a, o);
    }
    return a;
}

static json_t *info_json(struct qcow2_image *img, const char *given)
{
    const struct qcow2_info *in = qcow2_get_info(img);
    json_t *o = json_object();
    if (in->format == QCOW2_FMT_QCOW2 && in->nb_snapshots)
        json_object_set_new(o, "snapshots", snapshots_json(in));
    if (in->format == QCOW2_FMT_QCOW2 && in->backing_format)
        json_object_set_new(o, "backing-filename-format", json_string(in->backing_format));
    json_object_set_new(o, "virtual-size", json_integer((json_int_t)in->virtual_size));
    json_object_set_new(o, "filename", json_string(given));
    if (in->format == QCOW2_FMT_QCOW2)
        json_object_set_new(o, "cluster-size", json_integer(in->cluster_size));
    json_object_set_new(o, "format", json_string(in->format == QCOW2_FMT_RAW ? "raw" : "qcow2"));
    json_object_set_new(o, "actual-size", json_integer((json_int_t)in->file_allocated));
    if (in->format == QCOW2_FMT_QCOW2 && in->crypt_method)
        json_object_set_new(o, "encrypted", json_true());
    if (in->format == QCOW2_FMT_QCOW2) {
        json_t *d = json_object();
        json_object_set_new(d, "compat", json_string(in->version >= 3 ? "1.1" : "0.10"));
        json_object_set_new(d, "compression-type", json_string(in->compression));
        if (in->version >= 3)
            json_object_set_new(d, "lazy-refcounts", json_boolean(in->lazy_refcounts));
        if (in->nb_bitmaps) {
            json_t *bl = json_array();
            for (uint32_t i = 0; i < in->nb_bitmaps; i++) {
                const struct qcow2_bitmap_info *b = &in->bitmaps[i];
                json_t *flags = json_array();
                if (b->in_use)
                    json_array_append_new(flags, json_string("in-use"));
                if (b->auto_)
                    json_array_append_new(flags, json_string("auto"));
                json_t *bo = json_object();
                json_object_set_new(bo, "flags", flags);
                json_object_set_new(bo, "name", json_string(b->name));
                json_object_set_new(bo, "granularity", json_integer(b->granularity));
                json_array_append_new(bl, bo);
            }
            json_object_set_new(d, "bitmaps", bl);
        }
        json_object_set_new(d, "refcount-bits", json_integer(in->refcount_bits));
        if (in->data_file) {
            json_object_set_new(d, "data-file", json_string(in->data_file));
            json_object_set_new(d, "data-file-raw", json_boolean(in->data_file_raw));
        }
        if (in->crypt_method) {
            json_t *e = json_object();
            json_object_set_new(e, "format", json_string(in->crypt_method == 2 ? "luks" : "aes"));
            json_object_set_new(d, "encrypt", e);
        }
        if (in->version >= 3) {
            json_object_set_new(d, "corrupt", json_boolean(in->corrupt));
            json_object_set_new(d, "extended-l2", json_boolean(in->extended_l2));
        }
        json_t *fs = json_object();
        json_object_set_new(fs, "type", json_string("qcow2"));
        json_object_set_new(fs, "data", d);
        json_object_set_new(o, "format-specific", fs);
        if (in->backing_file) {
            char *full = full_backing_name(given, in->backing_file);
            json_object_set_new(o, "full-backing-filename", json_string(full ? full : in->backing_file));
            free(full);
            json_object_set_new(o, "backing-filename", json_string(in->backing_file));
        }
    }
    json_object_set_new(o, "dirty-flag", json_boolean(in->format == QCOW2_FMT_QCOW2 && in->dirty));
    return o;
}

/* Sizes as qemu-img prints them: "10 MiB", "392 KiB", "1.5 GiB". */
static void human_size(uint64_t v, char *buf, size_t len)
{
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    double d = (double)v;
    int u = 0;
    while (d >= 1024 && u < 6) {
        d /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%" PRIu64 " B", v);
    else
        snprintf(buf, len, "%.3g %s", d, units[u]);
}

void print_snapshot_table(const struct qcow2_info *in)
{
    printf("Snapshot list:\nID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n");
    for (uint32_t i = 0; i < in->nb_snapshots; i++) {
        const struct qcow2_snapshot_info *s = &in->snapshots[i];
        char date[32], vm[32];
        time_t t = s->date_sec;
        struct tm tm;
        localtime_r(&t, &tm);
        strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
        human_size(s->vm_state_size, vm, sizeof vm);
        uint64_t ms = s->vm_clock_nsec / 1000000;
        printf("%-9s %-17s %7s %s %02" PRIu64 ":%02" PRIu64 ":%02" PRIu64 ".%03" PRIu64, s->id, s->name, vm, date,
               ms / 3600000, ms / 60000 % 60, ms / 1000 % 60, ms % 1000);
        if (s->icount != UINT64_MAX)
            printf(" %10" PRIu64, s->icount);
        printf("\n");
    }
}

static void info_human(struct qcow2_image *img, const char *given)
{
    const struct qcow2_info *in = qcow2_get_info(img);
    char vs[32], ds[32];
    human_size(in->virtual_size, vs, sizeof vs);
    human_size(in->file_allocated, ds, sizeof ds);
    printf("image: %s\nfile format: %s\nvirtual size: %s (%" PRIu64 " bytes)\ndisk size: %s\n", given,
           in->format == QCOW2_FMT_RAW ? "raw" : "qcow2", vs, in->virtual_size, ds);
    if (in->format == QCOW2_FMT_RAW)
        return;
    printf("cluster_size: %u\n", in->cluster_size);
    if (in->backing_file) {
        char *full = full_backing_name(given, in->backing_file);
        printf("backing file: %s", in->backing_file);
        if (full && strcmp(full, in->backing_file))
            printf(" (actual path: %s)", full);
        printf("\n");
        free(full);
        if (in->backing_format)
            printf("backing file format: %s\n", in->backing_format);
    }
    if (in->nb_snapshots)
        print_snapshot_table(in);
    printf("Format specific information:\n    compat: %s\n    compression type: %s\n", in->version >= 3 ? "1.1" : "0.10",
           in->compression);
    if (in->version >= 3)
        printf("    lazy refcounts: %s\n", in->lazy_refcounts ? "true" : "false");
    if (in->nb_bitmaps) {
        printf("    bitmaps:\n");
        for (uint32_t i = 0; i < in->nb_bitmaps; i++) {
            const struct qcow2_bitmap_info *b = &in->bitmaps[i];
            printf("        [%u]:\n            flags:\n", i);
            int k = 0;
            if (b->in_use)
                printf("                [%d]: in-use\n", k++);
            if (b->auto_)
                printf("                [%d]: auto\n", k++);
            printf("            name: %s\n            granularity: %u\n", b->name, b->granularity);
        }
    }
    printf("    refcount bits: %u\n", in->refcount_bits);
    if (in->data_file)
        printf("    data file: %s\n    data file raw: %s\n", in->data_file, in->data_file_raw ? "true" : "false");
    if (in->version >= 3)
        printf("    corrupt: %s\n    extended l2: %s\n", in->corrupt ? "true" : "false",
               in->extended_l2 ? "true" : "false");
}

int cmd_info(int argc, char **argv)
{
    static const struct option lo[] = {
        {"output", required_argument, 0, 'o'}, {"backing-chain", no_argument, 0, 'b'},
        {"help", no_argument, 0, 'h'},         {"force-share", no_argument, 0, 'U'},
        {0, 0, 0, 0},
    };
    const char *fmt = NULL, *output = "human";
    bool chain = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "f:hU", lo, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'o': output = optarg; break;
        case 'b': chain = true; break;
        case 'U': break;
        case 'h':
            printf("usage: qcowimg info [-f qcow2|raw] [--output=human|json] [--backing-chain] IMG\n");
            return 0;
        default: return 1;
        }
    }
    if (optind != argc - 1)
        return fail("info", "expected one image file (see --help)");
    if (strcmp(output, "json") && strcmp(output, "human"))
        return fail("info", "--output must be human or json");
    const char *file = argv[optind];
    struct qcow2_image *img;
    if (open_image(file, fmt, NULL, &img))
        return 1;
    bool json = !strcmp(output, "json");
    json_t *list = json_array();
    char *given = strdup(file);
    for (struct qcow2_image *l = img; l; l = chain ? qcow2_backing(l) : NULL) {
        if (json) {
            json_array_append_new(list, info_json(l, given));
        } else {
            if (l != img)
                printf("\n");
            info_human(l, given);
        }
        const struct qcow2_info *in = qcow2_get_info(l);
        char *next = in->backing_file ? full_backing_name(given, in->backing_file) : NULL;
        free(given);
        given = next;
    }
    free(given);
    if (json) {
        json_t *out = chain ? json_incref(list) : json_incref(json_array_get(list, 0));
        char *s = json_dumps(out, JSON_INDENT(4) | JSON_PRESERVE_ORDER);
        printf("%s\n", s);
        free(s);
        json_decref(out);
    }
    json_decref(list);
    qcow2_close(img);
    return 0;
}
