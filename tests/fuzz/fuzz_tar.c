/* fuzz_tar.c: the example storage plugin's archive parser (examples/vfs-tar/tar.c),
 * built from the SDK header alone as a third party builds it, on hostile archives:
 * each input is written to a file that the plugin then stats, lists, and opens and
 * reads member by member. Every call must answer or fail with a message; a member
 * it lists must stat and read within its size. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../examples/vfs-tar/tar.c"

#define CHECK(cond)           \
    do {                      \
        if (!(cond))          \
            __builtin_trap(); \
    } while (0)

static char msg[512];

static int h_vfail(int errnum, const char *fmt, va_list ap)
{
    vsnprintf(msg, sizeof msg, fmt, ap);
    return -abs(errnum);
}

static int h_vprefix(int errnum, const char *fmt, va_list ap)
{
    (void)fmt;
    (void)ap;
    return errnum;
}

static const char *h_msg(int errnum)
{
    (void)errnum;
    return msg;
}

static void h_clear(void)
{
    msg[0] = '\0';
}

static const struct vfs_host host = {VFS_HOST_VERSION, sizeof(struct vfs_host), h_vfail, h_vprefix, h_msg, h_clear};
static char archive[64];

struct walk {
    unsigned n;
};

static int member(void *ctx, const char *name)
{
    struct walk *w = ctx;
    if (++w->n > 16)
        return 1; /* enough of this archive */
    char path[sizeof archive + TAR_NAME_MAX + 2];
    snprintf(path, sizeof path, "%s/%s", archive, name);
    struct vfs_stat st;
    CHECK(tar_stat(path, &st) == 0 && !st.is_dir);
    void *h;
    CHECK(tar_open(path, VFS_O_RDONLY, &h) == 0);
    uint64_t size;
    CHECK(tar_size(h, &size) == 0 && size == st.size);
    unsigned char buf[4096];
    const uint64_t offs[] = {0, size ? size - 1 : 0, size / 2, size + 10, UINT64_MAX - sizeof buf};
    for (size_t i = 0; i < sizeof offs / sizeof offs[0]; i++) {
        CHECK(tar_pread(h, buf, sizeof buf, offs[i]) == 0);
        if (offs[i] >= size)
            for (size_t k = 0; k < sizeof buf; k++)
                CHECK(buf[k] == 0); /* past the member: zeroes, never the next member's bytes */
    }
    tar_close(h);
    return 0;
}

static void remove_archive(void)
{
    unlink(archive);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!archive[0]) {
        CHECK(qcowd_vfs_plugin_init(VFS_OPS_VERSION, &host) == &tar_ops);
        snprintf(archive, sizeof archive, "/tmp/fuzz-tar-%ld.tar", (long)getpid());
        atexit(remove_archive);
    }
    int fd = open(archive, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0);
    CHECK(size == 0 || write(fd, data, size) == (ssize_t)size);
    close(fd);
    /* a new archive each time: the plugin's index of the last one goes (one thread here) */
    index_free(last);
    last = NULL;
    struct vfs_stat st;
    int r = tar_stat(archive, &st);
    if (r == 0) {
        CHECK(st.is_dir);
        struct walk w = {0};
        r = tar_list(archive, member, &w);
        CHECK(r == 0 || r == 1);
    } else {
        CHECK(r < 0 && msg[0]);
    }
    char missing[sizeof archive + 16];
    snprintf(missing, sizeof missing, "%s/no such member", archive);
    void *h;
    r = tar_open(missing, VFS_O_RDONLY, &h);
    CHECK(r < 0);
    return 0;
}
