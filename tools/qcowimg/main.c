/* main.c: qcowimg, the offline tool on the qcow2 engine: subcommand dispatch,
 * the shared error format and helpers. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "qcowimg.h"

static const char usage[] =
    "usage: qcowimg COMMAND [options]\n"
    "\n"
    "Commands (options as qemu-img's where they overlap):\n"
    "  info [-f FMT] [--output=human|json] [--backing-chain] IMG\n"
    "                          show what the image is (format, sizes, features, snapshots, bitmaps)\n"
    "  map [-f FMT] [--output=human|json] [-l snapshot.name=S] IMG\n"
    "                          show how guest ranges are allocated and where they live\n"
    "  convert [-f FMT] -O raw [-l snapshot.name=S] [-p] [-m THREADS] SRC DST\n"
    "                          write the guest disk (or a snapshot of it) to a sparse raw file\n"
    "  read [-f FMT] [-l snapshot.name=S] IMG OFFSET LENGTH\n"
    "                          write LENGTH guest bytes from OFFSET to standard output\n"
    "  create -f qcow2 [-o OPTIONS] [-b BACKING -F FMT] IMG [SIZE]\n"
    "                          make a new image (options as qemu-img's: cluster_size, compat, ...)\n"
    "  write [-f FMT] [-c] IMG OFFSET\n"
    "                          write standard input into the guest disk at OFFSET (-c: compressed)\n"
    "  zero [-f FMT] IMG OFFSET LENGTH\n"
    "                          make a range read as zeroes (whole clusters become zero clusters)\n"
    "  discard [-f FMT] IMG OFFSET LENGTH\n"
    "                          free whole clusters of a range\n"
    "  snapshot [-l | -c NAME | -d NAME | -a NAME] IMG\n"
    "                          list, create, delete or apply internal snapshots\n"
    "  check [-r leaks|all] [--output=human|json] IMG\n"
    "                          verify refcounts and flags; exit 0 clean, 2 corrupt, 3 leaks\n"
    "  bitmap (--add|--remove|--clear|--enable|--disable|--merge SRC [-b FILE [-F FMT]])... [-g GRAN] IMG BITMAP\n"
    "                          change persistent dirty bitmaps\n"
    "  dirty [--output=human|json] IMG BITMAP\n"
    "                          list the runs a persistent dirty bitmap marks dirty or clean\n"
    "  commit [-b BASE] [-d] [-p] IMG\n"
    "                          write IMG's data into its backing file (or BASE further down), then empty IMG\n"
    "\n"
    "FMT is qcow2 (the default) or raw; a file without the qcow2 magic is raw only with -f raw.\n"
    "Relative backing and data file names resolve against the image's own folder.\n"
    "Run 'qcowimg COMMAND --help' for a command's options. Errors: exit 1 and 'qcowimg: FILE: reason'.\n";

int fail(const char *file, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "qcowimg: %s: ", file ? file : "");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return 1;
}

int put_json(const char *file, json_t *j)
{
    char *s = j ? json_dumps(j, JSON_INDENT(4) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(j);
    if (!s)
        return fail(file, "out of memory");
    printf("%s\n", s);
    free(s);
    return 0;
}

int fail_err(const char *file, int ret)
{
    return fail(file, "%s", err_msg(ret));
}

int open_image(const char *file, const char *fmt, const char *snapshot, struct qcow2_image **img)
{
    struct qcow2_open_opts o = {.format = fmt, .snapshot = snapshot};
    if (fmt && strcmp(fmt, "qcow2") && strcmp(fmt, "raw"))
        return fail(file, "unknown format '%s' (qcow2 or raw)", fmt);
    int ret = qcow2_open(file, &o, img);
    if (ret < 0)
        return fail_err(file, ret);
    return 0;
}

int64_t parse_size(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *s == '-')
        return -1;
    unsigned shift = 0;
    switch (*end) {
    case 0: break;
    case 'k': case 'K': shift = 10; end++; break;
    case 'M': shift = 20; end++; break;
    case 'G': shift = 30; end++; break;
    case 'T': shift = 40; end++; break;
    default: return -1;
    }
    if (*end || v > (unsigned long long)(INT64_MAX >> shift))
        return -1;
    return (int64_t)(v << shift);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs(usage, stderr);
        return 1;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        fputs(usage, stdout);
        return 0;
    }
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "-V")) {
        printf("qcowimg version %s\n", QCOWD_VERSION);
        return 0;
    }
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } cmds[] = {
        {"info", cmd_info},   {"map", cmd_map},   {"convert", cmd_convert}, {"read", cmd_read},
        {"create", cmd_create}, {"write", cmd_write}, {"zero", cmd_zero},     {"discard", cmd_discard},
        {"check", cmd_check}, {"snapshot", cmd_snapshot},
        {"bitmap", cmd_bitmap}, {"dirty", cmd_dirty},
        {"commit", cmd_commit},
    };
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (!strcmp(cmd, cmds[i].name))
            return cmds[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "qcowimg: unknown command '%s'\n%s", cmd, usage);
    return 1;
}
