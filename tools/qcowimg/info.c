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
#include "qimgjson.h"

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
        char *full = qj_full_backing_name(given, in->backing_file);
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
    bool nomem = !list || !given;
    for (struct qcow2_image *l = img; l && !nomem; l = chain ? qcow2_backing(l) : NULL) {
        if (json) {
            json_t *o = qj_info(l, &(struct qj_info_opts){.filename = given});
            nomem = !o || json_array_append_new(list, o) < 0;
        } else {
            if (l != img)
                printf("\n");
            info_human(l, given);
        }
        const struct qcow2_info *in = qcow2_get_info(l);
        char *next = in->backing_file ? qj_full_backing_name(given, in->backing_file) : NULL;
        nomem |= in->backing_file && !next;
        free(given);
        given = next;
    }
    free(given);
    int rc = 0;
    if (nomem)
        rc = fail(file, "out of memory");
    else if (json)
        rc = put_json(file, chain ? json_incref(list) : json_incref(json_array_get(list, 0)));
    json_decref(list);
    qcow2_close(img);
    return rc;
}
