/* modify.c: the commands that change images: create, write, zero, discard, and
 * check (with repair). */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "err.h"
#include "qcowimg.h"
#include "qimgjson.h"

static int parse_bool(const char *file, const char *key, const char *v, bool *out)
{
    if (!strcmp(v, "on") || !strcmp(v, "true") || !strcmp(v, "yes"))
        *out = true;
    else if (!strcmp(v, "off") || !strcmp(v, "false") || !strcmp(v, "no"))
        *out = false;
    else
        return fail(file, "option %s takes on or off, not '%s'", key, v);
    return 0;
}

/* -o key=value,key=value with qemu-img's names. */
int parse_create_opts(const char *file, char *s, struct qcow2_create_opts *o)
{
    for (char *save = NULL, *kv = strtok_r(s, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *v = strchr(kv, '=');
        if (!v)
            return fail(file, "option '%s' needs a value (key=value)", kv);
        *v++ = 0;
        int64_t n;
        if (!strcmp(kv, "cluster_size")) {
            if ((n = parse_size(v)) <= 0 || n > (2 << 20))
                return fail(file, "bad cluster_size '%s'", v);
            o->cluster_size = (uint32_t)n;
        } else if (!strcmp(kv, "compat")) {
            if (!strcmp(v, "0.10") || !strcmp(v, "v2"))
                o->version = 2;
            else if (!strcmp(v, "1.1") || !strcmp(v, "v3"))
                o->version = 3;
            else
                return fail(file, "compat must be 0.10 or 1.1, not '%s'", v);
        } else if (!strcmp(kv, "refcount_bits")) {
            if ((n = parse_size(v)) <= 0 || n > 64)
                return fail(file, "bad refcount_bits '%s'", v);
            o->refcount_bits = (unsigned)n;
        } else if (!strcmp(kv, "extended_l2")) {
            if (parse_bool(file, kv, v, &o->extended_l2))
                return 1;
        } else if (!strcmp(kv, "lazy_refcounts")) {
            if (parse_bool(file, kv, v, &o->lazy_refcounts))
                return 1;
        } else if (!strcmp(kv, "data_file_raw")) {
            if (parse_bool(file, kv, v, &o->data_file_raw))
                return 1;
        } else if (!strcmp(kv, "compression_type")) {
            if (strcmp(v, "zlib") && strcmp(v, "zstd"))
                return fail(file, "compression_type must be zlib or zstd, not '%s'", v);
            o->compression_zstd = !strcmp(v, "zstd");
        } else if (!strcmp(kv, "preallocation")) {
            if (!strcmp(v, "metadata"))
                o->prealloc_metadata = true;
            else if (strcmp(v, "off"))
                return fail(file, "preallocation must be off or metadata, not '%s'", v);
        } else if (!strcmp(kv, "data_file")) {
            o->data_file = v;
        } else if (!strcmp(kv, "backing_file")) {
            o->backing_file = v;
        } else if (!strcmp(kv, "backing_fmt")) {
            o->backing_format = v;
        } else {
            return fail(file, "unknown option '%s'", kv);
        }
    }
    return 0;
}

int cmd_create(int argc, char **argv)
{
    static const struct option lo[] = {{"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    struct qcow2_create_opts o = {0};
    const char *fmt = "qcow2";
    char *optstr[16];
    int nopt = 0, c;
    bool quiet = false;
    optind = 1;
    while ((c = getopt_long(argc, argv, "f:o:b:F:qhu", lo, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'o':
            if (nopt == 16)
                return fail("create", "too many -o options");
            optstr[nopt++] = optarg;
            break;
        case 'b': o.backing_file = optarg; break;
        case 'F': o.backing_format = optarg; break;
        case 'q': quiet = true; break;
        case 'u': break;
        case 'h':
            printf("usage: qcowimg create -f qcow2 [-o OPTIONS] [-b BACKING -F FMT] IMG [SIZE]\n"
                   "OPTIONS (comma-separated key=value): cluster_size, compat (0.10|1.1), refcount_bits,\n"
                   "  extended_l2, compression_type (zlib|zstd), lazy_refcounts, preallocation (off|metadata),\n"
                   "  data_file, data_file_raw, backing_file, backing_fmt\n");
            return 0;
        default: return 1;
        }
    }
    if (strcmp(fmt, "qcow2"))
        return fail("create", "only -f qcow2 images can be created");
    if (optind != argc - 1 && optind != argc - 2)
        return fail("create", "expected IMG [SIZE] (see --help)");
    const char *file = argv[optind];
    for (int i = 0; i < nopt; i++)
        if (parse_create_opts(file, optstr[i], &o))
            return 1;
    if (optind == argc - 2) {
        int64_t n = parse_size(argv[optind + 1]);
        if (n < 0)
            return fail(file, "bad size '%s'", argv[optind + 1]);
        o.size = (uint64_t)n;
    } else if (!o.backing_file) {
        return fail(file, "a size is needed when there is no backing file");
    }
    int ret = qcow2_create(file, &o);
    if (ret < 0)
        return fail_err(file, ret);
    if (!quiet)
        printf("Formatting '%s', fmt=qcow2 size=%" PRIu64 "\n", file, o.size);
    return 0;
}

static int open_rw(const char *file, const char *fmt, struct qcow2_image **img)
{
    struct qcow2_open_opts o = {.format = fmt, .read_write = true};
    int ret = qcow2_open(file, &o, img);
    return ret < 0 ? fail_err(file, ret) : 0;
}

/* Flush, then close; a failed flush is the command's failure. */
static int finish(const char *file, struct qcow2_image *img, int rc)
{
    int ret = qcow2_flush(img);
    if (ret < 0 && rc == 0)
        rc = fail_err(file, ret);
    ret = qcow2_close(img); /* bitmaps and header flags are written here */
    if (ret < 0 && rc == 0)
        rc = fail_err(file, ret);
    return rc;
}

int cmd_write(int argc, char **argv)
{
    const char *fmt = NULL;
    bool compress = false;
    int c;
    optind = 1;
    while ((c = getopt(argc, argv, "f:ch")) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'c': compress = true; break;
        case 'h': printf("usage: qcowimg write [-f FMT] [-c] IMG OFFSET < DATA\n"); return 0;
        default: return 1;
        }
    }
    if (optind != argc - 2)
        return fail("write", "expected IMG OFFSET (see --help)");
    const char *file = argv[optind];
    int64_t off = parse_size(argv[optind + 1]);
    if (off < 0)
        return fail(file, "bad offset '%s'", argv[optind + 1]);
    struct qcow2_image *img;
    if (open_rw(file, fmt, &img))
        return 1;
    uint32_t cs = qcow2_get_info(img)->cluster_size;
    size_t bufsz = 1u << 20;
    if (compress && (off % cs))
        return finish(file, img, fail(file, "-c needs a cluster-aligned offset"));
    if (compress)
        bufsz = cs;
    unsigned char *buf = malloc(bufsz);
    int rc = 0;
    uint64_t pos = (uint64_t)off, size = qcow2_size(img);
    for (;;) {
        size_t n = 0;
        while (n < bufsz) { /* fill whole chunks so compressed writes see whole clusters */
            size_t r = fread(buf + n, 1, bufsz - n, stdin);
            if (r == 0)
                break;
            n += r;
        }
        if (n == 0)
            break;
        if (pos + n > size) {
            rc = fail(file, "data runs past the end of the disk (%" PRIu64 " bytes)", size);
            break;
        }
        int ret = compress && (n == cs || pos + n == size) ? qcow2_pwrite_compressed(img, buf, n, pos)
                                                            : qcow2_pwrite(img, buf, n, pos);
        if (ret < 0) {
            rc = fail_err(file, ret);
            break;
        }
        pos += n;
    }
    if (ferror(stdin) && rc == 0)
        rc = fail(file, "reading standard input: %s", strerror(errno));
    free(buf);
    return finish(file, img, rc);
}

static int zero_or_discard(int argc, char **argv, bool discard)
{
    const char *fmt = NULL, *name = discard ? "discard" : "zero";
    int c;
    optind = 1;
    while ((c = getopt(argc, argv, "f:h")) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'h': printf("usage: qcowimg %s [-f FMT] IMG OFFSET LENGTH\n", name); return 0;
        default: return 1;
        }
    }
    if (optind != argc - 3)
        return fail(name, "expected IMG OFFSET LENGTH (see --help)");
    const char *file = argv[optind];
    int64_t off = parse_size(argv[optind + 1]), len = parse_size(argv[optind + 2]);
    if (off < 0 || len < 0)
        return fail(file, "bad offset or length");
    struct qcow2_image *img;
    if (open_rw(file, fmt, &img))
        return 1;
    int ret = discard ? qcow2_discard(img, (uint64_t)off, (uint64_t)len)
                      : qcow2_pwrite_zeroes(img, (uint64_t)off, (uint64_t)len);
    return finish(file, img, ret < 0 ? fail_err(file, ret) : 0);
}

int cmd_zero(int argc, char **argv)
{
    return zero_or_discard(argc, argv, false);
}

int cmd_discard(int argc, char **argv)
{
    return zero_or_discard(argc, argv, true);
}

static void print_line(void *ctx, const char *line)
{
    (void)ctx;
    fprintf(stderr, "%s\n", line);
}

static void check_human(const struct qcow2_check_result *r)
{
    if (r->corruptions)
        printf("\n%" PRIu64 " errors were found on the image.\n"
               "Data may be corrupted, or further writes to the image may corrupt it.\n",
               r->corruptions);
    if (r->leaks)
        printf("\n%" PRIu64 " leaked clusters were found on the image.\n"
               "This means waste of disk space, but no harm to data.\n",
               r->leaks);
    if (r->check_errors)
        printf("\n%" PRIu64 " internal errors have occurred during the check.\n", r->check_errors);
    if (!r->corruptions && !r->leaks && !r->check_errors)
        printf("No errors were found on the image.\n");
    if (r->total_clusters && r->allocated_clusters)
        printf("%" PRIu64 "/%" PRIu64 " = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters\n",
               r->allocated_clusters, r->total_clusters, 100.0 * (double)r->allocated_clusters / (double)r->total_clusters,
               r->allocated_clusters ? 100.0 * (double)r->fragmented_clusters / (double)r->allocated_clusters : 0.0,
               r->allocated_clusters ? 100.0 * (double)r->compressed_clusters / (double)r->allocated_clusters : 0.0);
    if (r->image_end_offset)
        printf("Image end offset: %" PRIu64 "\n", r->image_end_offset);
}

int cmd_check(int argc, char **argv)
{
    static const struct option lo[] = {
        {"output", required_argument, 0, 'o'}, {"help", no_argument, 0, 'h'}, {"force-share", no_argument, 0, 'U'},
        {0, 0, 0, 0},
    };
    const char *fmt = NULL, *output = "human", *rep = NULL;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "f:r:hqU", lo, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'o': output = optarg; break;
        case 'r': rep = optarg; break;
        case 'q':
        case 'U': break;
        case 'h':
            printf("usage: qcowimg check [-f qcow2] [-r leaks|all] [--output=human|json] IMG\n"
                   "exit status: 0 clean, 1 check failed, 2 corruptions, 3 leaks only\n");
            return 0;
        default: return 1;
        }
    }
    if (optind != argc - 1)
        return fail("check", "expected one image file (see --help)");
    bool json = !strcmp(output, "json");
    if (!json && strcmp(output, "human"))
        return fail("check", "--output must be human or json");
    enum qcow2_repair repair = QCOW2_REPAIR_NONE;
    if (rep && !strcmp(rep, "leaks"))
        repair = QCOW2_REPAIR_LEAKS;
    else if (rep && !strcmp(rep, "all"))
        repair = QCOW2_REPAIR_ALL;
    else if (rep)
        return fail("check", "-r takes leaks or all, not '%s'", rep);
    const char *file = argv[optind];
    struct qcow2_open_opts o = {.format = fmt, .read_write = repair != QCOW2_REPAIR_NONE, .allow_corrupt = true};
    struct qcow2_image *img;
    int ret = qcow2_open(file, &o, &img);
    if (ret < 0)
        return fail_err(file, ret);
    struct qcow2_check_result r, fixed = {0};
    ret = qcow2_check(img, repair, &r, print_line, NULL); /* findings on stderr, as qemu-img prints them */
    if (ret == 0 && repair) {
        fixed = r;
        ret = qcow2_check(img, QCOW2_REPAIR_NONE, &r, print_line, NULL);
        r.leaks_fixed = fixed.leaks_fixed;
        r.corruptions_fixed = fixed.corruptions_fixed;
    }
    int flush = qcow2_flush(img);
    int closed = qcow2_close(img);
    if (flush == 0)
        flush = closed;
    if (ret < 0 || flush < 0)
        return fail_err(file, ret < 0 ? ret : flush);
    if (json) {
        if (put_json(file, qj_check(file, &r)))
            return 1;
    } else {
        if (repair && (fixed.leaks_fixed || fixed.corruptions_fixed))
            printf("The following inconsistencies were found and repaired:\n\n    %" PRIu64 " leaked clusters\n"
                   "    %" PRIu64 " corruptions\n\nDouble checking the fixed image now...\n",
                   fixed.leaks_fixed, fixed.corruptions_fixed);
        check_human(&r);
    }
    if (r.check_errors)
        return 1;
    if (r.corruptions)
        return 2;
    if (r.leaks)
        return 3;
    return 0;
}

int cmd_snapshot(int argc, char **argv)
{
    const char *fmt = NULL, *name = NULL;
    char op = 0;
    int c;
    optind = 1;
    while ((c = getopt(argc, argv, "f:c:d:a:lhqU")) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'c':
        case 'd':
        case 'a':
        case 'l':
            if (op)
                return fail("snapshot", "give one of -l, -c, -d, -a");
            op = (char)c;
            name = optarg;
            break;
        case 'q':
        case 'U': break;
        case 'h':
            printf("usage: qcowimg snapshot [-l | -c NAME | -d NAME | -a NAME] IMG\n"
                   "  -l list, -c create, -d delete, -a apply (revert the disk to the snapshot)\n");
            return 0;
        default: return 1;
        }
    }
    if (optind != argc - 1)
        return fail("snapshot", "expected one image file (see --help)");
    const char *file = argv[optind];
    if (!op)
        op = 'l';
    struct qcow2_image *img;
    if (op == 'l') {
        if (open_image(file, fmt, NULL, &img))
            return 1;
        if (qcow2_get_info(img)->nb_snapshots)
            print_snapshot_table(qcow2_get_info(img));
        qcow2_close(img);
        return 0;
    }
    if (open_rw(file, fmt, &img))
        return 1;
    int ret = op == 'c' ? qcow2_snapshot_create(img, name)
              : op == 'd' ? qcow2_snapshot_delete(img, name)
                          : qcow2_snapshot_revert(img, name);
    return finish(file, img, ret < 0 ? fail_err(file, ret) : 0);
}
