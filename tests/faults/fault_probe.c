/* fault_probe.c: counts the storage calls one qcowimg command makes, for faults.py.
 * It opens "fault:IMG" and makes exactly the engine calls `qcowimg write/zero/discard`
 * makes (open read-write, the op, qcow2_flush, close) with the fault filter counting
 * and never firing, then prints "read R write W flush F truncate T". faults.py arms
 * QCOWD_FAULT at each of those calls in turn.
 *
 *   fault_probe write IMG OFFSET < DATA     (qcow2_pwrite in 1 MiB pieces)
 *   fault_probe writec IMG OFFSET < DATA    (qcow2_pwrite_compressed per cluster)
 *   fault_probe zero IMG OFFSET LENGTH
 *   fault_probe discard IMG OFFSET LENGTH
 * Exit 0, or 1 with the engine's message when the op itself fails. */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "qcow2.h"
#include "vfs.h"

static int fail(const char *what, int ret)
{
    fprintf(stderr, "fault_probe: %s: %s\n", what, err_msg(ret));
    return 1;
}

/* A plain number (no size suffixes: faults.py passes bytes). */
static int parse_u64(const char *s, uint64_t *v)
{
    char *end;
    errno = 0;
    unsigned long long x = strtoull(s, &end, 0);
    if (errno || end == s || *end || *s == '-') {
        fprintf(stderr, "fault_probe: bad number '%s'\n", s);
        return -1;
    }
    *v = x;
    return 0;
}

/* What cmd_write does: fill whole chunks from stdin, compressed when asked and
 * the chunk is a whole cluster (or the disk's tail). */
static int do_write(struct qcow2_image *img, uint64_t pos, bool compress)
{
    uint64_t cs = qcow2_get_info(img)->cluster_size, size = qcow2_size(img);
    size_t bufsz = compress ? cs : (1u << 20);
    unsigned char *buf = malloc(bufsz);
    int ret = buf ? 0 : -ENOMEM;
    while (ret == 0) {
        size_t n = 0, r;
        while (n < bufsz && (r = fread(buf + n, 1, bufsz - n, stdin)) > 0)
            n += r;
        if (n == 0)
            break;
        if (pos + n > size) {
            ret = err_fail(EINVAL, "data runs past the end of the disk");
            break;
        }
        ret = compress && (n == cs || pos + n == size) ? qcow2_pwrite_compressed(img, buf, n, pos)
                                                       : qcow2_pwrite(img, buf, n, pos);
        pos += n;
    }
    free(buf);
    return ret;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: fault_probe write|writec IMG OFFSET < DATA\n"
                        "       fault_probe zero|discard IMG OFFSET LENGTH\n");
        return 2;
    }
    const char *cmd = argv[1];
    char uri[4096];
    snprintf(uri, sizeof uri, "fault:%s", argv[2]);
    uint64_t off, len = 0;
    if (parse_u64(argv[3], &off) < 0 || (argc > 4 && parse_u64(argv[4], &len) < 0))
        return 2;

    vfs_fault_arm(VFS_FAULT_ANY, 0, EIO); /* nth 0: count, never fire */
    struct qcow2_open_opts o = {.read_write = true};
    struct qcow2_image *img;
    int ret = qcow2_open(uri, &o, &img);
    if (ret < 0)
        return fail(uri, ret);
    if (!strcmp(cmd, "write") || !strcmp(cmd, "writec"))
        ret = do_write(img, off, !strcmp(cmd, "writec"));
    else if (!strcmp(cmd, "zero"))
        ret = qcow2_pwrite_zeroes(img, off, len);
    else if (!strcmp(cmd, "discard"))
        ret = qcow2_discard(img, off, len);
    else
        ret = err_fail(EINVAL, "unknown command %s", cmd);
    if (ret == 0)
        ret = qcow2_flush(img);
    qcow2_close(img);
    if (ret < 0)
        return fail(cmd, ret);
    printf("read %lu write %lu flush %lu truncate %lu\n", vfs_fault_count(VFS_FAULT_READ),
           vfs_fault_count(VFS_FAULT_WRITE), vfs_fault_count(VFS_FAULT_FLUSH), vfs_fault_count(VFS_FAULT_TRUNCATE));
    return vfs_fault_fired() ? 1 : 0;
}
