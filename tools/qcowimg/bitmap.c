/* bitmap.c: `qcowimg bitmap`, qemu-img bitmap's options: add, remove, clear,
 * enable, disable and merge persistent dirty bitmaps, in the order given. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "qcowimg.h"

enum act { ACT_ADD, ACT_REMOVE, ACT_CLEAR, ACT_ENABLE, ACT_DISABLE, ACT_MERGE };

static const char *act_name[] = {"add", "remove", "clear", "enable", "disable", "merge"};

struct action {
    enum act act;
    const char *src; /* merge: the source bitmap */
};

static const char help[] =
    "usage: qcowimg bitmap (--add | --remove | --clear | --enable | --disable |\n"
    "                       --merge SOURCE [-b SOURCE_FILE [-F SOURCE_FMT]])...\n"
    "                      [-g GRANULARITY] [-f FMT] IMG BITMAP\n"
    "Change the persistent dirty bitmap BITMAP of IMG; the operations run in the order given.\n"
    "  --add          create it, empty (enabled unless --disable is given too)\n"
    "  --remove       delete it (also works on a bitmap left in use by a crash)\n"
    "  --clear        make it empty (also works on a bitmap left in use by a crash)\n"
    "  --enable       writes mark it from now on\n"
    "  --disable      writes no longer mark it\n"
    "  --merge SOURCE mark in it everything bitmap SOURCE marks (of IMG, or of SOURCE_FILE with -b)\n"
    "  -g GRANULARITY bytes per bit for --add (a power of 2, at least 512; default: as qemu-img)\n";

int cmd_bitmap(int argc, char **argv)
{
    enum { O_ADD = 256, O_REMOVE, O_CLEAR, O_ENABLE, O_DISABLE, O_MERGE };
    static const struct option lo[] = {
        {"add", no_argument, 0, O_ADD},         {"remove", no_argument, 0, O_REMOVE},
        {"clear", no_argument, 0, O_CLEAR},     {"enable", no_argument, 0, O_ENABLE},
        {"disable", no_argument, 0, O_DISABLE}, {"merge", required_argument, 0, O_MERGE},
        {"help", no_argument, 0, 'h'},          {0, 0, 0, 0},
    };
    struct action acts[64];
    int nacts = 0, c;
    const char *fmt = NULL, *src_file = NULL, *src_fmt = NULL;
    int64_t gran = 0;
    bool add = false, disabled = false, merge = false;
    optind = 1;
    while ((c = getopt_long(argc, argv, "f:g:b:F:h", lo, NULL)) != -1) {
        if (c >= O_ADD && c <= O_MERGE) {
            if (nacts == (int)(sizeof acts / sizeof acts[0]))
                return fail("bitmap", "too many operations");
            acts[nacts++] = (struct action){.act = (enum act)(c - O_ADD), .src = c == O_MERGE ? optarg : NULL};
            add |= c == O_ADD;
            disabled |= c == O_DISABLE;
            merge |= c == O_MERGE;
            continue;
        }
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'b': src_file = optarg; break;
        case 'F': src_fmt = optarg; break;
        case 'g':
            if ((gran = parse_size(optarg)) <= 0 || gran > (1ll << 31))
                return fail("bitmap", "bad granularity '%s': a power of 2, at least 512", optarg);
            break;
        case 'h': fputs(help, stdout); return 0;
        default: return 1;
        }
    }
    if (nacts == 0)
        return fail("bitmap", "need at least one operation (see --help)");
    if (optind != argc - 2)
        return fail("bitmap", "expected IMG BITMAP (see --help)");
    if (gran && !add)
        return fail("bitmap", "-g (granularity) only goes with --add");
    if (src_fmt && !src_file)
        return fail("bitmap", "-F only goes with -b");
    if (src_file && !merge)
        return fail("bitmap", "-b (merge source file) only goes with --merge");
    if (fmt && strcmp(fmt, "qcow2"))
        return fail(argv[optind], "only qcow2 images have bitmaps (not -f %s)", fmt);
    const char *file = argv[optind], *name = argv[optind + 1];
    struct qcow2_open_opts o = {.format = fmt, .read_write = true};
    struct qcow2_image *img, *src = NULL;
    int ret = qcow2_open(file, &o, &img);
    if (ret < 0)
        return fail_err(file, ret);
    if (src_file && open_image(src_file, src_fmt, NULL, &src)) {
        qcow2_close(img);
        return 1;
    }
    int rc = 0;
    for (int i = 0; i < nacts && rc == 0; i++) {
        switch (acts[i].act) {
        case ACT_ADD: ret = qcow2_bitmap_add(img, name, (uint32_t)gran, disabled); break;
        case ACT_REMOVE: ret = qcow2_bitmap_remove(img, name); break;
        case ACT_CLEAR: ret = qcow2_bitmap_clear(img, name); break;
        case ACT_ENABLE: ret = qcow2_bitmap_enable(img, name); break;
        case ACT_DISABLE: ret = qcow2_bitmap_disable(img, name); break;
        case ACT_MERGE: ret = qcow2_bitmap_merge(img, name, src, acts[i].src); break;
        }
        if (ret < 0)
            rc = fail(file, "%s on bitmap '%s' failed: %s", act_name[acts[i].act], name, err_msg(ret));
    }
    qcow2_close(src);
    ret = qcow2_close(img);
    if (ret < 0 && rc == 0)
        rc = fail_err(file, ret);
    return rc;
}

/* `qcowimg dirty IMG BITMAP`: the dirty and clean runs of a bitmap, as
 * `nbdinfo --map=qemu:dirty-bitmap:BITMAP` lists them over qemu-nbd. */
int cmd_dirty(int argc, char **argv)
{
    static const struct option lo[] = {{"output", required_argument, 0, 'o'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char *fmt = NULL, *output = "human";
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "f:h", lo, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'o': output = optarg; break;
        case 'h':
            printf("usage: qcowimg dirty [-f qcow2] [--output=human|json] IMG BITMAP\n"
                   "List the runs of the disk that bitmap BITMAP marks dirty or clean.\n");
            return 0;
        default: return 1;
        }
    }
    if (optind != argc - 2)
        return fail("dirty", "expected IMG BITMAP (see --help)");
    bool json = !strcmp(output, "json");
    if (!json && strcmp(output, "human"))
        return fail("dirty", "--output must be human or json");
    const char *file = argv[optind], *name = argv[optind + 1];
    struct qcow2_image *img;
    if (open_image(file, fmt, NULL, &img))
        return 1;
    uint64_t size = qcow2_size(img), off = 0, start = 0, len = 0;
    bool cur = false;
    int rc = 0;
    for (bool first = true; off < size || len; ) {
        bool d = false;
        uint64_t n = 0;
        if (off < size) {
            int ret = qcow2_bitmap_dirty(img, name, off, size - off, &d, &n);
            if (ret < 0) {
                rc = fail_err(file, ret);
                break;
            }
        }
        if (len && (n == 0 || d != cur)) {
            if (json)
                printf("%s\n{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"dirty\": %s }", first ? "[" : ",", start,
                       len, cur ? "true" : "false");
            else
                printf("%12" PRIu64 " %12" PRIu64 "  %s\n", start, len, cur ? "dirty" : "clean");
            first = false;
            len = 0;
        }
        if (!len) {
            start = off;
            cur = d;
        }
        len += n;
        off += n;
    }
    if (json && rc == 0)
        printf(size ? "\n]\n" : "[]\n");
    qcow2_close(img);
    return rc;
}
