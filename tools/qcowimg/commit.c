/* commit.c: qcowimg commit, qemu-img commit on the engine: write an overlay's
 * data into its backing file (or a base further down with -b), then empty it. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcowimg.h"

struct progress {
    bool show;
    double last;        /* last percentage printed */
    uint64_t cancel_at; /* QCOWIMG_COMMIT_CANCEL_AT (tests): cancel once this many bytes are done */
};

static int on_progress(void *opaque, uint64_t done, uint64_t total)
{
    struct progress *p = opaque;
    if (p->show) {
        double pct = total ? 100.0 * (double)done / (double)total : 100.0;
        if (pct - p->last >= 1.0 || (pct == 100.0 && p->last < 100.0) || p->last < 0) {
            printf("    (%.2f/100%%)\r", pct);
            fflush(stdout);
            p->last = pct;
        }
    }
    return p->cancel_at && done >= p->cancel_at;
}

int cmd_commit(int argc, char **argv)
{
    static const struct option lo[] = {{"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char *fmt = NULL, *base = NULL;
    bool keep = false, quiet = false;
    struct progress p = {.last = -1};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "f:b:t:r:dpqh", lo, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'b':
            base = optarg;
            keep = true; /* as qemu-img: -b implies -d */
            break;
        case 'd': keep = true; break;
        case 'p': p.show = true; break;
        case 'q': quiet = true; break;
        case 't':
        case 'r': break; /* cache mode, rate limit: accepted, no effect */
        case 'h':
            printf("usage: qcowimg commit [-f qcow2] [-b BASE] [-d] [-p] [-q] IMG\n"
                   "  write IMG's data into its backing file, then empty IMG (its reads then\n"
                   "  fall through to the updated backing file)\n"
                   "  -b BASE  commit into BASE, an image further down IMG's backing chain; implies -d.\n"
                   "           The images between IMG and BASE no longer read as before.\n"
                   "  -d       leave IMG's data in place\n"
                   "  -p       show progress\n");
            return 0;
        default: return 1;
        }
    }
    if (optind != argc - 1)
        return fail("commit", "expected one image file (see --help)");
    if (fmt && strcmp(fmt, "qcow2"))
        return fail(argv[optind], "only a qcow2 image can be committed (it needs a backing file)");
    if (quiet)
        p.show = false;
    const char *env = getenv("QCOWIMG_COMMIT_CANCEL_AT");
    if (env && *env)
        p.cancel_at = (uint64_t)parse_size(env);
    const char *file = argv[optind];
    struct qcow2_open_opts oo = {.format = fmt, .read_write = true};
    struct qcow2_image *img;
    int ret = qcow2_open(file, &oo, &img);
    if (ret < 0)
        return fail_err(file, ret);
    struct qcow2_commit_opts co = {.base = base, .keep_top = keep, .progress = on_progress, .opaque = &p};
    ret = qcow2_commit(img, &co);
    if (p.show && ret == 0)
        printf("    (100.00/100%%)\n");
    else if (p.show)
        printf("\n");
    int rc = ret < 0 ? fail_err(file, ret) : 0;
    ret = qcow2_close(img);
    if (ret < 0 && rc == 0)
        rc = fail_err(file, ret);
    if (rc == 0 && !quiet)
        printf("Image committed.\n");
    return rc;
}
