/* testplugin.c: a tiny read-only VFS plugin for the loader tests. "testplug:N"
 * is an object of N bytes whose byte at offset i is i % 251. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "vfs_plugin.h"

#define PATTERN(i) ((unsigned char)((i) % 251))

static int testplug_open(const char *path, unsigned flags, void **handle)
{
    char *end;
    unsigned long long n = strtoull(path, &end, 10);
    if (!*path || *end)
        return vfs_fail(ENOENT, "open testplug:%s: want a decimal size", path);
    uint64_t *size = malloc(sizeof *size);
    if (!size)
        return vfs_fail(ENOMEM, "open testplug:%s: out of memory", path);
    *size = n;
    *handle = size;
    return 0;
}

static void testplug_close(void *h)
{
    free(h);
}

static int testplug_pread(void *h, void *buf, size_t len, uint64_t off)
{
    uint64_t size = *(uint64_t *)h;
    unsigned char *p = buf;
    for (size_t i = 0; i < len; i++)
        p[i] = off + i < size ? PATTERN(off + i) : 0;
    return 0;
}

static int testplug_size(void *h, uint64_t *size)
{
    *size = *(uint64_t *)h;
    return 0;
}

static const struct vfs_ops testplug_ops = {
    .version = VFS_OPS_VERSION,
    .struct_size = sizeof(struct vfs_ops),
    .name = "testplug",
    .thread_model = VFS_THREAD_PARALLEL,
    .open = testplug_open,
    .close = testplug_close,
    .pread = testplug_pread,
    .size = testplug_size,
    /* read-only: no pwrite, flush, truncate; default block status */
};

VFS_PLUGIN(testplug_ops)
