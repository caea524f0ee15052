/* tar.c: an example qcowd storage plugin, built out of tree against the SDK
 * (pkg-config qcowd-plugin): "tar:ARCHIVE.tar" serves the regular files at the
 * top of a POSIX (ustar) tar archive, read-only, as a catalog folder. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <qcowd/vfs_plugin.h>

/* An archive is hostile input like any image: every header is checked, every
 * offset stays inside the file, and the index is bounded. */
#define TAR_BLOCK       512
#define TAR_MAX_MEMBERS 65536
#define TAR_NAME_MAX    256 /* prefix (155) + '/' + name (100) */

struct member {
    char name[TAR_NAME_MAX];
    uint64_t off;  /* of its data in the archive */
    uint64_t size;
    int64_t mtime;
};

/* The parsed table of contents of one archive file, as of its identity. */
struct index {
    char *path;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime;
    size_t n;
    struct member *m;
};

/* The last archive parsed (a catalog asks about one archive over and over). */
static pthread_mutex_t last_lock = PTHREAD_MUTEX_INITIALIZER;
static struct index *last;

static void index_free(struct index *ix)
{
    if (ix) {
        free(ix->path);
        free(ix->m);
        free(ix);
    }
}

/* An octal field of a header (NUL or space terminated); -1 when not octal.
 * GNU's base-256 form (sizes past 8 GiB) is refused: images that big are better
 * served from a folder. */
static int64_t octal(const unsigned char *f, size_t len)
{
    uint64_t v = 0;
    size_t i = 0;
    while (i < len && f[i] == ' ')
        i++;
    size_t digits = 0;
    for (; i < len && f[i] >= '0' && f[i] <= '7'; i++, digits++) {
        if (v > (UINT64_MAX >> 4))
            return -1;
        v = v * 8 + (uint64_t)(f[i] - '0');
    }
    if (!digits || (i < len && f[i] != ' ' && f[i] != '\0') || v > INT64_MAX)
        return -1;
    return (int64_t)v;
}

static bool checksum_ok(const unsigned char *h)
{
    int64_t want = octal(h + 148, 8);
    uint64_t sum = 0;
    for (int i = 0; i < TAR_BLOCK; i++)
        sum += (i >= 148 && i < 156) ? ' ' : h[i];
    return want >= 0 && (uint64_t)want == sum;
}

static int read_block(int fd, unsigned char *b, uint64_t off, const char *path)
{
    size_t got = 0;
    while (got < TAR_BLOCK) {
        ssize_t n = pread(fd, b + got, TAR_BLOCK - got, (off_t)(off + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return vfs_fail(errno, "tar %s: read at %llu: %s", path, (unsigned long long)off, strerror(errno));
        if (n == 0)
            return vfs_fail(EUCLEAN, "tar %s: truncated at %llu", path, (unsigned long long)off);
        got += (size_t)n;
    }
    return 0;
}

/* Parse the archive at path (open as fd, identity st) into a new index. */
static int parse(const char *path, int fd, const struct stat *st, struct index **out)
{
    struct index *ix = calloc(1, sizeof *ix);
    if (!ix || !(ix->path = strdup(path))) {
        index_free(ix);
        return vfs_fail(ENOMEM, "tar %s: out of memory", path);
    }
    ix->dev = st->st_dev;
    ix->ino = st->st_ino;
    ix->size = st->st_size;
    ix->mtime = st->st_mtim;
    size_t cap = 0;
    uint64_t off = 0, end = (uint64_t)st->st_size;
    bool skip_next = false; /* a GNU long-name header: the next entry's name is not its own */
    unsigned char h[TAR_BLOCK];
    int r;
    while (off + TAR_BLOCK <= end) {
        if ((r = read_block(fd, h, off, path)) < 0)
            goto fail;
        bool zero = true;
        for (int i = 0; i < TAR_BLOCK && zero; i++)
            zero = h[i] == 0;
        if (zero)
            break; /* the end-of-archive marker */
        if (!checksum_ok(h)) {
            r = vfs_fail(EUCLEAN, "tar %s: header at %llu has a bad checksum", path, (unsigned long long)off);
            goto fail;
        }
        int64_t size = octal(h + 124, 12), mtime = octal(h + 136, 12);
        uint64_t data = off + TAR_BLOCK;
        if (size < 0 || (uint64_t)size > end - data) {
            r = vfs_fail(EUCLEAN, "tar %s: member at %llu has a bad size or runs past the end", path,
                         (unsigned long long)off);
            goto fail;
        }
        uint64_t padded = ((uint64_t)size + TAR_BLOCK - 1) / TAR_BLOCK * TAR_BLOCK;
        char type = (char)h[156];
        bool ustar = !memcmp(h + 257, "ustar", 5);
        if ((type == '0' || type == '\0') && !skip_next) {
            char name[TAR_NAME_MAX];
            int n = ustar && h[345] ? snprintf(name, sizeof name, "%.155s/%.100s", (const char *)h + 345,
                                               (const char *)h)
                                    : snprintf(name, sizeof name, "%.100s", (const char *)h);
            const char *base = name;
            if (!strncmp(base, "./", 2))
                base += 2;
            /* only the top level of the archive is the folder */
            if (n > 0 && *base && !strchr(base, '/')) {
                if (ix->n == TAR_MAX_MEMBERS) {
                    r = vfs_fail(E2BIG, "tar %s: more than %d members", path, TAR_MAX_MEMBERS);
                    goto fail;
                }
                if (ix->n == cap) {
                    size_t ncap = cap ? cap * 2 : 16;
                    struct member *m = realloc(ix->m, ncap * sizeof *m);
                    if (!m) {
                        r = vfs_fail(ENOMEM, "tar %s: out of memory", path);
                        goto fail;
                    }
                    ix->m = m;
                    cap = ncap;
                }
                struct member *m = &ix->m[ix->n++];
                snprintf(m->name, sizeof m->name, "%s", base);
                m->off = data;
                m->size = (uint64_t)size;
                m->mtime = mtime < 0 ? 0 : mtime;
            }
        }
        skip_next = type == 'L' || type == 'K';
        off = data + padded; /* cannot wrap: data + size <= end, end < 2^63 */
    }
    *out = ix;
    return 0;
fail:
    index_free(ix);
    return r;
}

/* The index of the archive at path, parsed again only when the file changed.
 * *fd (when not NULL) gets a descriptor of the archive, for reading members. */
static int lookup(const char *path, struct index **out, int *fdp)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return vfs_fail(errno, "tar %s: %s", path, strerror(errno));
    struct stat st;
    int r = 0;
    if (fstat(fd, &st) < 0) {
        r = vfs_fail(errno, "tar %s: %s", path, strerror(errno));
        goto done;
    }
    if (!S_ISREG(st.st_mode)) {
        r = vfs_fail(ENOTDIR, "tar %s: not a regular file", path);
        goto done;
    }
    pthread_mutex_lock(&last_lock);
    struct index *ix = last;
    if (ix && !strcmp(ix->path, path) && ix->dev == st.st_dev && ix->ino == st.st_ino && ix->size == st.st_size &&
        ix->mtime.tv_sec == st.st_mtim.tv_sec && ix->mtime.tv_nsec == st.st_mtim.tv_nsec) {
        *out = ix; /* indexes are never freed while the plugin is loaded but replaced ones */
    } else if ((r = parse(path, fd, &st, &ix)) == 0) {
        /* the old index may still be read by another thread: keep it (an
         * archive changing under a running qcowd is rare; each parse is bounded) */
        last = ix;
        *out = ix;
    }
    pthread_mutex_unlock(&last_lock);
done:
    if (r == 0 && fdp)
        *fdp = fd;
    else
        close(fd);
    return r;
}

/* Split "ARCHIVE.tar/MEMBER" at the first component ending in ".tar" that is a
 * file. Returns the length of ARCHIVE, or 0 when path names no member. */
static size_t split(const char *path)
{
    for (const char *s = strchr(path, '/'); s; s = strchr(s + 1, '/')) {
        size_t n = (size_t)(s - path);
        if (n >= 4 && !memcmp(s - 4, ".tar", 4))
            return n;
    }
    return 0;
}

static const struct member *find(const struct index *ix, const char *name)
{
    for (size_t i = 0; i < ix->n; i++)
        if (!strcmp(ix->m[i].name, name))
            return &ix->m[i];
    return NULL;
}

struct handle {
    int fd;
    uint64_t off, size;
};

static int tar_open(const char *path, unsigned flags, void **handle)
{
    (void)flags; /* always VFS_O_RDONLY: without .pwrite the host refuses the rest */
    size_t n = split(path);
    if (!n)
        return vfs_fail(EISDIR, "tar %s: not a member of an archive", path);
    char *archive = strndup(path, n);
    if (!archive)
        return vfs_fail(ENOMEM, "tar: out of memory");
    struct index *ix;
    int fd, r = lookup(archive, &ix, &fd);
    if (r == 0) {
        const struct member *m = find(ix, path + n + 1);
        struct handle *h = m ? malloc(sizeof *h) : NULL;
        if (!m)
            r = vfs_fail(ENOENT, "tar %s: no member %s", archive, path + n + 1);
        else if (!h)
            r = vfs_fail(ENOMEM, "tar: out of memory");
        if (r == 0) {
            *h = (struct handle){fd, m->off, m->size};
            *handle = h;
        } else {
            close(fd);
        }
    }
    free(archive);
    return r;
}

static void tar_close(void *handle)
{
    struct handle *h = handle;
    close(h->fd);
    free(h);
}

static int tar_pread(void *handle, void *buf, size_t len, uint64_t off)
{
    struct handle *h = handle;
    unsigned char *p = buf;
    /* past the member's end reads as zeroes, as the interface says */
    size_t have = off >= h->size ? 0 : (h->size - off < len ? (size_t)(h->size - off) : len);
    memset(p + have, 0, len - have);
    size_t got = 0;
    while (got < have) {
        ssize_t r = pread(h->fd, p + got, have - got, (off_t)(h->off + off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return vfs_fail(errno, "tar: read: %s", strerror(errno));
        if (r == 0)
            return vfs_fail(EIO, "tar: the archive shrank under us");
        got += (size_t)r;
    }
    return 0;
}

static int tar_size(void *handle, uint64_t *size)
{
    *size = ((struct handle *)handle)->size;
    return 0;
}

static int tar_stat(const char *path, struct vfs_stat *st)
{
    size_t n = split(path);
    char *archive = strndup(path, n ? n : strlen(path));
    if (!archive)
        return vfs_fail(ENOMEM, "tar: out of memory");
    struct index *ix;
    int r = lookup(archive, &ix, NULL);
    if (r == 0) {
        memset(st, 0, sizeof *st);
        if (!n) {
            st->is_dir = 1;
            st->mtime = ix->mtime.tv_sec;
        } else {
            const struct member *m = find(ix, path + n + 1);
            if (!m) {
                r = vfs_fail(ENOENT, "tar %s: no member %s", archive, path + n + 1);
            } else {
                st->size = st->allocated = m->size;
                st->mtime = m->mtime;
                /* identity: the archive file and the member's place in it */
                st->ino = (uint64_t)ix->ino * 1000003u ^ m->off;
                st->version = (uint64_t)ix->mtime.tv_sec * 1000000000u + (uint64_t)ix->mtime.tv_nsec;
            }
        }
    }
    free(archive);
    return r;
}

static int tar_list(const char *dir, int (*cb)(void *ctx, const char *name), void *ctx)
{
    struct index *ix;
    int r = lookup(dir, &ix, NULL);
    for (size_t i = 0; r == 0 && i < ix->n; i++)
        r = cb(ctx, ix->m[i].name);
    return r;
}

static const struct vfs_ops tar_ops = {
    .version = VFS_OPS_VERSION,
    .struct_size = sizeof(struct vfs_ops),
    .name = "tar",
    .thread_model = VFS_THREAD_PARALLEL,
    .open = tar_open,
    .close = tar_close,
    .pread = tar_pread,
    .size = tar_size,
    .stat = tar_stat,
    .list = tar_list,
    /* read-only: no .pwrite (the host refuses writing opens with EROFS), and no
     * .fd: a member's bytes sit at a shifted offset in the archive (the .fd rule) */
};

VFS_PLUGIN(tar_ops)
