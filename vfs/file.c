/* file.c: the "file" backend: POSIX files through pread/pwrite on one descriptor,
 * holes through SEEK_DATA/SEEK_HOLE and fallocate(PUNCH_HOLE). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "err.h"
#include "vfs_int.h"

/* One open file. The descriptor's file position is never used (only pread,
 * pwrite and lseek-for-holes), so any number of threads may share it. */
struct fhandle {
    int fd;
    bool direct; /* the descriptor may be handed out (.fd) */
    char path[]; /* as opened, for messages */
};

#define FH(h) ((struct fhandle *)(h))

/* confine=yes (the daemon sets it before serving): the last component of a path
 * is never followed when it is a symbolic link, only regular files are opened,
 * and new files are private to the owner and the group (0640). Off (qcowimg):
 * links are followed and devices opened, as qemu-img does, and new files get
 * 0666 less the umask. Set once before any open; read without a lock after. */
static bool confine;

/* err_fail with "OP PATH: strerror(e)". The system's EPERM (an immutable or
 * append-only file, a seal) is returned as EACCES, the store refusing us: above
 * the VFS, EPERM means a name reaching outside the catalog. The message keeps the
 * system's words. */
static int fail(int e, const char *op, const char *path)
{
    return err_fail(e == EPERM ? EACCES : e, "%s %s: %s", op, path, VFS_ESTR(e));
}

/* Whether the file system of fd deallocates on FALLOC_FL_PUNCH_HOLE, so that
 * the page cache pages of a punched range leave the file: bytes the kernel is
 * still sending from them (sendfile) cannot be changed by later writes there.
 * Only file systems known to do so; anything else gets no .fd when writable. */
static bool punches_holes(int fd)
{
    struct statfs sf;
    if (fstatfs(fd, &sf) < 0)
        return false;
    switch ((unsigned long)sf.f_type) {
    case EXT4_SUPER_MAGIC: /* also ext2/ext3 mounted by the ext4 driver */
    case XFS_SUPER_MAGIC:
    case BTRFS_SUPER_MAGIC:
    case TMPFS_MAGIC:
    case F2FS_SUPER_MAGIC:
        return true;
    default:
        return false;
    }
}

/* The error for a path that confine refuses: a link is not followed, a FIFO or a
 * device is not an image. */
static int refuse_kind(const char *op, const char *path, mode_t mode)
{
    if (S_ISLNK(mode))
        return err_fail(EPERM, "%s %s: a symbolic link (qcowd does not follow links in its catalog)", op, path);
    return err_fail(EPERM, "%s %s: not a regular file", op, path);
}

static int file_open(const char *path, unsigned flags, void **handle)
{
    struct stat st;
    int oflags = O_CLOEXEC | ((flags & VFS_O_RDWR) ? O_RDWR : O_RDONLY);
    if (confine) /* O_NONBLOCK: opening a FIFO must not wait for a writer */
        oflags |= O_NOFOLLOW | O_NONBLOCK | O_NOCTTY;
    if (flags & VFS_O_CREATE)
        oflags |= O_CREAT;
    if (flags & VFS_O_EXCL)
        oflags |= O_EXCL;

    size_t n = strlen(path);
    struct fhandle *fh = malloc(sizeof *fh + n + 1);
    if (!fh)
        return fail(ENOMEM, "open", path);
    memcpy(fh->path, path, n + 1);
    do
        fh->fd = open(path, oflags, confine ? 0640 : 0666);
    while (fh->fd < 0 && errno == EINTR);
    if (fh->fd < 0) {
        int e = errno;
        free(fh);
        if (e == ELOOP && confine && lstat(path, &st) == 0 && S_ISLNK(st.st_mode))
            return refuse_kind("open", path, st.st_mode);
        return fail(e, "open", path);
    }
    /* A read-only open of a directory succeeds in POSIX; an image never is one. */
    int e = fstat(fh->fd, &st) < 0 ? errno : S_ISDIR(st.st_mode) ? EISDIR : 0;
    if (!e && confine && !S_ISREG(st.st_mode)) {
        close(fh->fd);
        free(fh);
        return refuse_kind("open", path, st.st_mode);
    }
    if (!e && confine && fcntl(fh->fd, F_SETFL, fcntl(fh->fd, F_GETFL) & ~O_NONBLOCK) < 0)
        e = errno;
    if (e) {
        close(fh->fd);
        free(fh);
        return fail(e, "open", path);
    }
    fh->direct = !(flags & VFS_O_RDWR) || punches_holes(fh->fd);
    *handle = fh;
    return 0;
}

static void file_close(void *h)
{
    close(FH(h)->fd); /* an error here cannot be acted on: flush reports durability */
    free(h);
}

static int file_pread(void *h, void *buf, size_t len, uint64_t off)
{
    char *p = buf;
    while (len > 0) {
        ssize_t n = pread(FH(h)->fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail(errno, "pread", FH(h)->path);
        }
        if (n == 0) { /* end of file: the rest reads as zeroes */
            memset(p, 0, len);
            break;
        }
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

static int file_pwrite(void *h, const void *buf, size_t len, uint64_t off)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = pwrite(FH(h)->fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail(errno, "pwrite", FH(h)->path);
        }
        if (n == 0) /* no progress and no error: do not spin */
            return fail(EIO, "pwrite", FH(h)->path);
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

static int file_flush(void *h)
{
    int r;
    do
        r = fdatasync(FH(h)->fd);
    while (r < 0 && errno == EINTR);
    return r < 0 ? fail(errno, "flush", FH(h)->path) : 0;
}

static int file_size(void *h, uint64_t *size)
{
    struct stat st;
    if (fstat(FH(h)->fd, &st) < 0)
        return fail(errno, "stat", FH(h)->path);
    *size = (uint64_t)st.st_size;
    return 0;
}

static int file_truncate(void *h, uint64_t size)
{
    int r;
    do
        r = ftruncate(FH(h)->fd, (off_t)size);
    while (r < 0 && errno == EINTR);
    return r < 0 ? fail(errno, "truncate", FH(h)->path) : 0;
}

/* Punch a hole; the size stays. -EOPNOTSUPP (a filesystem without holes) is
 * passed on for the caller to treat discard as the hint it is. */
static int file_discard(void *h, uint64_t off, uint64_t len)
{
    int r;
    do
        r = fallocate(FH(h)->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                      (off_t)len);
    while (r < 0 && errno == EINTR);
    return r < 0 ? fail(errno, "discard", FH(h)->path) : 0;
}

static unsigned file_caps(void *h)
{
    return VFS_CAP_DISCARD | VFS_CAP_BLOCK_STATUS;
}

static uint64_t min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

static int file_block_status(void *h, uint64_t off, uint64_t len, uint64_t *pnum)
{
    uint64_t size;
    int r = file_size(h, &size);
    if (r < 0)
        return r;
    if (off >= size) {
        *pnum = len;
        return VFS_BS_HOLE;
    }
    off_t data = lseek(FH(h)->fd, (off_t)off, SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO) { /* no data from off on: hole to the end, and past it */
            *pnum = len;
            return VFS_BS_HOLE;
        }
        if (errno == EINVAL || errno == EOPNOTSUPP) /* no hole support: all data */
            goto all_data;
        return fail(errno, "seek data", FH(h)->path);
    }
    if ((uint64_t)data > off) {
        *pnum = min_u64(len, (uint64_t)data - off);
        return VFS_BS_HOLE;
    }
    off_t hole = lseek(FH(h)->fd, (off_t)off, SEEK_HOLE);
    if (hole < 0 || (uint64_t)hole <= off) /* raced with a shrink, or no support */
        goto all_data;
    *pnum = min_u64(len, (uint64_t)hole - off);
    return VFS_BS_DATA;
all_data:
    *pnum = min_u64(len, size - off);
    return VFS_BS_DATA;
}

static int file_list(const char *dir, int (*cb)(void *ctx, const char *name), void *ctx)
{
    const char *d = *dir ? dir : ".";
    DIR *dp = opendir(d);
    struct dirent *de;
    int r = 0;
    if (!dp)
        return fail(errno, "list", d);
    for (;;) {
        errno = 0;
        if (!(de = readdir(dp))) {
            if (errno)
                r = fail(errno, "list", d);
            break;
        }
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        if ((r = cb(ctx, de->d_name)) != 0)
            break;
    }
    closedir(dp);
    return r;
}

static int file_stat(const char *path, struct vfs_stat *st)
{
    struct stat s;
    if ((confine ? lstat(path, &s) : stat(path, &s)) < 0)
        return fail(errno, "stat", path);
    if (confine && !S_ISREG(s.st_mode) && !S_ISDIR(s.st_mode))
        return refuse_kind("stat", path, s.st_mode);
    st->size = (uint64_t)s.st_size;
    st->allocated = (uint64_t)s.st_blocks * 512;
    st->mtime = (int64_t)s.st_mtim.tv_sec;
    st->mtime_nsec = (int64_t)s.st_mtim.tv_nsec;
    st->ino = (uint64_t)s.st_ino;
    st->is_dir = S_ISDIR(s.st_mode);
    return 0;
}

/* Make a change of path's directory entry durable: fsync the folder holding it. */
static int sync_dir_of(const char *path, const char *op)
{
    const char *slash = strrchr(path, '/');
    char dir[4096];
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else if (slash == path)
        snprintf(dir, sizeof dir, "/");
    else if ((size_t)(slash - path) < sizeof dir)
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    else
        return fail(ENAMETOOLONG, op, path);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return fail(errno, op, dir);
    int r;
    do
        r = fsync(fd);
    while (r < 0 && errno == EINTR);
    int e = errno;
    close(fd);
    /* some file systems cannot sync a folder: the change stands, only its durability is theirs */
    return r < 0 && e != EINVAL && e != EROFS ? fail(e, op, dir) : 0;
}

static int file_remove(const char *path)
{
    if (unlink(path) < 0)
        return fail(errno, "remove", path);
    return sync_dir_of(path, "remove");
}

static int file_rename(const char *from, const char *to)
{
    if (rename(from, to) < 0) {
        int e = errno;
        return err_fail(e, "rename %s to %s: %s", from, to, VFS_ESTR(e));
    }
    int r = sync_dir_of(to, "rename");
    const char *fs = strrchr(from, '/'), *ts = strrchr(to, '/');
    bool same = (!fs && !ts) || (fs && ts && fs - from == ts - to && !memcmp(from, to, (size_t)(fs - from)));
    if (r == 0 && !same)
        r = sync_dir_of(from, "rename");
    return r;
}

static int file_config(const char *key, const char *value)
{
    if (!strcmp(key, "confine")) {
        if (!strcmp(value, "yes"))
            confine = true;
        else if (!strcmp(value, "no"))
            confine = false;
        else
            return err_fail(EINVAL, "confine takes yes or no, not '%s'", value);
        return 0;
    }
    return err_fail(EINVAL, "unknown setting '%s' (the file backend has: confine)", key);
}

static int file_fd(void *h)
{
    return FH(h)->direct ? FH(h)->fd : -1;
}

const struct vfs_ops vfs__file_ops = {
    .version = VFS_OPS_VERSION,
    .struct_size = sizeof(struct vfs_ops),
    .name = "file",
    .thread_model = VFS_THREAD_PARALLEL,
    .open = file_open,
    .close = file_close,
    .pread = file_pread,
    .pwrite = file_pwrite,
    .flush = file_flush,
    .size = file_size,
    .truncate = file_truncate,
    .discard = file_discard,
    .caps = file_caps,
    .block_status = file_block_status,
    .list = file_list,
    .stat = file_stat,
    .remove = file_remove,
    .rename = file_rename,
    .fd = file_fd,
    .config = file_config,
};
