/* map.c: `qcowimg map`, the allocation map in qemu-img's JSON lines or its
 * human table, with qemu-img's rule for merging neighbouring runs. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "err.h"
#include "qcowimg.h"

static bool mergeable(const struct qcow2_extent *a, const struct qcow2_extent *b)
{
    if (a->zero != b->zero || a->data != b->data || a->depth != b->depth || a->present != b->present ||
        a->offset_valid != b->offset_valid || !a->file != !b->file)
        return false;
    if (a->file && strcmp(a->file, b->file))
        return false;
    return !a->offset_valid || a->offset + a->length == b->offset;
}

static void print_json(const struct qcow2_extent *e, bool first)
{
    printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %d, \"present\": %s, \"zero\": %s, "
           "\"data\": %s",
           first ? "[" : ",\n", e->start, e->length, e->depth, e->present ? "true" : "false", e->zero ? "true" : "false",
           e->data ? "true" : "false");
    if (e->offset_valid)
        printf(", \"offset\": %" PRIu64, e->offset);
    printf("}");
}

static void print_human(const struct qcow2_extent *e)
{
    if (e->data && e->offset_valid)
        printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start, e->length, e->offset, e->file);
}

int cmd_map(int argc, char **argv)
{
    static const struct option lo[] = {
        {"output", required_argument, 0, 'o'}, {"help", no_argument, 0, 'h'}, {"force-share", no_argument, 0, 'U'},
        {0, 0, 0, 0},
    };
    const char *fmt = NULL, *output = "human", *snap = NULL;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "f:l:hU", lo, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'o': output = optarg; break;
        case 'l': snap = strncmp(optarg, "snapshot.name=", 14) ? optarg : optarg + 14; break;
        case 'U': break;
        case 'h':
            printf("usage: qcowimg map [-f qcow2|raw] [--output=human|json] [-l snapshot.name=S] IMG\n");
            return 0;
        default: return 1;
        }
    }
    if (optind != argc - 1)
        return fail("map", "expected one image file (see --help)");
    bool json = !strcmp(output, "json");
    if (!json && strcmp(output, "human"))
        return fail("map", "--output must be human or json");
    const char *file = argv[optind];
    struct qcow2_image *img;
    if (open_image(file, fmt, snap, &img))
        return 1;
    uint64_t size = qcow2_size(img), off = 0;
    struct qcow2_extent cur = {0}, next;
    bool have = false, first = true;
    int rc = 0;
    if (!json)
        printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    while (off < size) {
        int ret = qcow2_block_status(img, off, size - off, &next);
        if (ret < 0) {
            rc = fail_err(file, ret);
            break;
        }
        if (have && mergeable(&cur, &next)) {
            cur.length += next.length;
        } else {
            if (have) {
                if (json)
                    print_json(&cur, first);
                else
                    print_human(&cur);
                first = false;
            }
            cur = next;
            have = true;
        }
        off += next.length;
    }
    if (have && rc == 0) {
        if (json)
            print_json(&cur, first);
        else
            print_human(&cur);
        first = false;
    }
    if (json && rc == 0)
        printf("%s]\n", first ? "[" : "");
    qcow2_close(img);
    return rc;
}
