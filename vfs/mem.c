/* mem.c: the "mem" backend: named byte arrays in one process-wide table. An
 * object lives from its creating open until vfs_remove, across closes. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "err.h"
#include "vfs_int.h"

/* No object grows past this, so a hostile size (a truncate to 2^62, a write at
 * a huge offset) fails with -EFBIG instead of exhausting memory. The default;
 * vfs_config("mem", "max-object", BYTES) lowers or raises it (the fuzz targets
 * keep a hostile image's growth far below their memory limit). */
#define MEM_MAX_OBJECT_DEFAULT (1ull << 30)
static uint64_t max_object = MEM_MAX_OBJECT_DEFAULT;
#define MEM_MAX_OBJECT max_object

/* One object. Lock order: table_lock before an object's lock, never the
 * reverse; the table lock is never held across a callback. */
struct mobj {
    char *name;            /* table_lock */
    unsigned refs;         /* table_lock: 1 while in the table, +1 per open handle */
    struct mobj *next;     /* table_lock */
    pthread_rwlock_t lock; /* guards the fields below: reads share, writes exclude */
    unsigned char *data;   /* cap bytes; [0, size) are the object's contents */
    size_t size, cap;
    int64_t mtime; /* seconds since the epoch of the last change */
};

static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static struct mobj *table;

/* One open handle: the object and the name it was opened as (the object's own
 * name may change under a rename, so messages use this copy). */
struct mem_handle {
    struct mobj *o;
    char name[];
};

#define MH(h) ((struct mem_handle *)(h))
#define MO(h) (MH(h)->o)

static struct mobj **find_locked(const char *name)
{
    struct mobj **pp = &table;
    while (*pp && strcmp((*pp)->name, name) != 0)
        pp = &(*pp)->next;
    return pp;
}

/* Drop one reference; the last frees the object. */
static void put(struct mobj *o)
{
    pthread_mutex_lock(&table_lock);
    unsigned left = --o->refs;
    pthread_mutex_unlock(&table_lock);
    if (left)
        return;
    pthread_rwlock_destroy(&o->lock);
    free(o->data);
    free(o->name);
    free(o);
}

static int mem_open(const char *path, unsigned flags, void **handle)
{
    size_t n = strlen(path);
    if (n == 0 || path[n - 1] == '/')
        return err_fail(EINVAL, "open mem:%s: not an object name", path);
    struct mem_handle *mh = malloc(sizeof *mh + n + 1);
    if (!mh)
        return err_fail(ENOMEM, "open mem:%s: out of memory", path);
    memcpy(mh->name, path, n + 1);

    pthread_mutex_lock(&table_lock);
    struct mobj **pp = find_locked(path), *o = *pp;
    if (o) {
        if ((flags & VFS_O_CREATE) && (flags & VFS_O_EXCL)) {
            pthread_mutex_unlock(&table_lock);
            free(mh);
            return err_fail(EEXIST, "open mem:%s: %s", path, VFS_ESTR(EEXIST));
        }
        o->refs++;
    } else {
        if (!(flags & VFS_O_CREATE)) {
            pthread_mutex_unlock(&table_lock);
            free(mh);
            return err_fail(ENOENT, "open mem:%s: %s", path, VFS_ESTR(ENOENT));
        }
        if (!(o = calloc(1, sizeof *o)) || !(o->name = strdup(path))) {
            pthread_mutex_unlock(&table_lock);
            free(o);
            free(mh);
            return err_fail(ENOMEM, "open mem:%s: out of memory", path);
        }
        pthread_rwlock_init(&o->lock, NULL);
        o->refs = 2;
        o->mtime = (int64_t)time(NULL);
        *pp = o;
    }
    pthread_mutex_unlock(&table_lock);
    mh->o = o;
    *handle = mh;
    return 0;
}

static void mem_close(void *h)
{
    put(MO(h));
    free(h);
}

static int mem_pread(void *h, void *buf, size_t len, uint64_t off)
{
    struct mobj *o = MO(h);
    size_t n = 0;
    pthread_rwlock_rdlock(&o->lock);
    if (off < o->size) {
        n = o->size - off < len ? o->size - (size_t)off : len;
        memcpy(buf, o->data + off, n);
    }
    pthread_rwlock_unlock(&o->lock);
    memset((char *)buf + n, 0, len - n);
    return 0;
}

/* Make the object size bytes long, new bytes zero. Caller holds the write lock
 * and has checked size <= MEM_MAX_OBJECT. */
static int resize_locked(struct mobj *o, const char *name, size_t size)
{
    if (size > o->cap || size < o->cap / 4) {
        size_t cap = size;
        if (size > o->cap) { /* grow geometrically so appends stay linear */
            cap = o->cap * 2 > size ? o->cap * 2 : size;
            if (cap > MEM_MAX_OBJECT)
                cap = MEM_MAX_OBJECT;
        }
        unsigned char *d = realloc(o->data, cap ? cap : 1);
        if (!d) {
            if (size > o->cap)
                return err_fail(ENOMEM, "resize mem:%s to %zu bytes: out of memory", name,
                                size);
        } else {
            o->data = d;
            o->cap = cap;
        }
    }
    if (size > o->size)
        memset(o->data + o->size, 0, size - o->size);
    o->size = size;
    o->mtime = (int64_t)time(NULL);
    return 0;
}

static int too_big(const char *name, const char *op, uint64_t size)
{
    return err_fail(EFBIG, "%s mem:%s: %llu bytes is over the %llu byte limit of mem objects",
                    op, name, (unsigned long long)size, (unsigned long long)MEM_MAX_OBJECT);
}

static int mem_pwrite(void *h, const void *buf, size_t len, uint64_t off)
{
    struct mobj *o = MO(h);
    uint64_t end = off + len; /* the host checked that this does not wrap */
    int r = 0;
    if (end > MEM_MAX_OBJECT)
        return too_big(MH(h)->name, "pwrite", end);
    pthread_rwlock_wrlock(&o->lock);
    if (end > o->size)
        r = resize_locked(o, MH(h)->name, (size_t)end);
    if (r == 0) {
        memcpy(o->data + off, buf, len);
        o->mtime = (int64_t)time(NULL);
    }
    pthread_rwlock_unlock(&o->lock);
    return r;
}

static int mem_flush(void *h)
{
    return 0; /* memory is as durable as it gets */
}

static int mem_size(void *h, uint64_t *size)
{
    pthread_rwlock_rdlock(&MO(h)->lock);
    *size = MO(h)->size;
    pthread_rwlock_unlock(&MO(h)->lock);
    return 0;
}

static int mem_truncate(void *h, uint64_t size)
{
    struct mobj *o = MO(h);
    if (size > MEM_MAX_OBJECT)
        return too_big(MH(h)->name, "truncate", size);
    pthread_rwlock_wrlock(&o->lock);
    int r = resize_locked(o, MH(h)->name, (size_t)size);
    pthread_rwlock_unlock(&o->lock);
    return r;
}

/* Zero the range (past the end there is nothing to do). Memory is not given
 * back, so the backend does not claim VFS_CAP_DISCARD. */
static int mem_discard(void *h, uint64_t off, uint64_t len)
{
    struct mobj *o = MO(h);
    pthread_rwlock_wrlock(&o->lock);
    if (off < o->size) {
        size_t n = o->size - off < len ? o->size - (size_t)off : (size_t)len;
        memset(o->data + off, 0, n);
        o->mtime = (int64_t)time(NULL);
    }
    pthread_rwlock_unlock(&o->lock);
    return 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Names are flat strings; "/" in them makes folders, as in an object store.
 * List the first component of every name under "dir/" once, sorted. */
static int mem_list(const char *dir, int (*cb)(void *ctx, const char *name), void *ctx)
{
    size_t dlen = strlen(dir), n = 0, cap = 0;
    char **names = NULL;
    int r = 0;

    pthread_mutex_lock(&table_lock);
    for (struct mobj *o = table; o; o = o->next) {
        const char *rest = o->name;
        if (dlen) {
            if (strncmp(o->name, dir, dlen) != 0)
                continue;
            rest += dlen;
            if (dir[dlen - 1] != '/') {
                if (*rest != '/')
                    continue;
                rest++;
            }
        }
        if (!*rest)
            continue;
        if (n == cap) {
            char **nn = realloc(names, (cap = cap ? cap * 2 : 16) * sizeof *names);
            if (!nn) {
                r = err_fail(ENOMEM, "list mem:%s: out of memory", dir);
                break;
            }
            names = nn;
        }
        if (!(names[n] = strndup(rest, strcspn(rest, "/")))) {
            r = err_fail(ENOMEM, "list mem:%s: out of memory", dir);
            break;
        }
        n++;
    }
    pthread_mutex_unlock(&table_lock);

    if (r == 0 && n)
        qsort(names, n, sizeof *names, cmp_str);
    for (size_t i = 0; i < n; i++) {
        if (r == 0 && (i == 0 || strcmp(names[i], names[i - 1]) != 0))
            r = cb(ctx, names[i]);
    }
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return r;
}

static int mem_stat(const char *path, struct vfs_stat *st)
{
    size_t plen = strlen(path);
    if (plen == 0) { /* the root folder always exists */
        *st = (struct vfs_stat){.is_dir = 1};
        return 0;
    }
    pthread_mutex_lock(&table_lock);
    struct mobj *o = *find_locked(path);
    if (o) {
        pthread_rwlock_rdlock(&o->lock);
        *st = (struct vfs_stat){.size = o->size, .allocated = o->cap, .mtime = o->mtime};
        pthread_rwlock_unlock(&o->lock);
        pthread_mutex_unlock(&table_lock);
        return 0;
    }
    /* No such object: a folder if some name lies under "path/". */
    for (o = table; o; o = o->next) {
        if (strncmp(o->name, path, plen) == 0 &&
            (o->name[plen] == '/' || path[plen - 1] == '/')) {
            pthread_mutex_unlock(&table_lock);
            *st = (struct vfs_stat){.is_dir = 1};
            return 0;
        }
    }
    pthread_mutex_unlock(&table_lock);
    return err_fail(ENOENT, "stat mem:%s: %s", path, VFS_ESTR(ENOENT));
}

/* Take the object out of the table; open handles keep it alive until closed,
 * as an unlinked POSIX file. */
static int mem_remove(const char *path)
{
    pthread_mutex_lock(&table_lock);
    struct mobj **pp = find_locked(path), *o = *pp;
    if (o)
        *pp = o->next;
    pthread_mutex_unlock(&table_lock);
    if (!o)
        return err_fail(ENOENT, "remove mem:%s: %s", path, VFS_ESTR(ENOENT));
    put(o);
    return 0;
}

static int mem_rename(const char *from, const char *to)
{
    size_t tlen = strlen(to);
    if (tlen == 0 || to[tlen - 1] == '/')
        return err_fail(EINVAL, "rename mem:%s to mem:%s: not an object name", from, to);
    char *name = strdup(to);
    if (!name)
        return err_fail(ENOMEM, "rename mem:%s: out of memory", from);

    pthread_mutex_lock(&table_lock);
    struct mobj **fp = find_locked(from), *o = *fp, *old = NULL;
    if (!o) {
        pthread_mutex_unlock(&table_lock);
        free(name);
        return err_fail(ENOENT, "rename mem:%s to mem:%s: %s", from, to, VFS_ESTR(ENOENT));
    }
    if (strcmp(from, to) != 0) {
        struct mobj **tp = find_locked(to);
        if ((old = *tp))
            *tp = old->next; /* replaced atomically: nobody sees the name missing */
        free(o->name);
        o->name = name;
        name = NULL;
    }
    pthread_mutex_unlock(&table_lock);
    free(name);
    if (old)
        put(old);
    return 0;
}

/* A deferred object: like a created one, but out of the table until the commit. */
static int mem_open_deferred(const char *path, void **handle)
{
    size_t n = strlen(path);
    if (n == 0 || path[n - 1] == '/')
        return err_fail(EINVAL, "open mem:%s: not an object name", path);
    struct mem_handle *mh = malloc(sizeof *mh + n + 1);
    struct mobj *o = calloc(1, sizeof *o);
    if (!mh || !o || !(o->name = strdup(path))) {
        free(mh);
        free(o);
        return err_fail(ENOMEM, "open mem:%s: out of memory", path);
    }
    memcpy(mh->name, path, n + 1);
    pthread_rwlock_init(&o->lock, NULL);
    o->refs = 1; /* the handle's; the table takes its own at the commit */
    o->mtime = (int64_t)time(NULL);
    mh->o = o;
    *handle = mh;
    return 0;
}

/* Put the deferred object in the table under its name, replacing what was there. */
static int mem_commit(void *h, unsigned flags)
{
    struct mobj *o = MO(h), *old;
    pthread_mutex_lock(&table_lock);
    struct mobj **pp = find_locked(o->name);
    if ((old = *pp) && (flags & VFS_COMMIT_EXCL)) {
        pthread_mutex_unlock(&table_lock);
        return err_fail(EEXIST, "publish mem:%s: %s", MH(h)->name, VFS_ESTR(EEXIST));
    }
    if (old)
        *pp = old->next;
    o->refs++;
    o->next = table;
    table = o;
    pthread_mutex_unlock(&table_lock);
    if (old)
        put(old);
    return 0;
}

static int mem_config(const char *key, const char *value)
{
    char *end;
    unsigned long long v = strtoull(value, &end, 10);
    if (strcmp(key, "max-object"))
        return err_fail(EINVAL, "mem: unknown setting %s", key);
    if (!*value || *end || v == 0 || v > SIZE_MAX / 2)
        return err_fail(EINVAL, "mem: max-object=%s: expected a number of bytes", value);
    max_object = v;
    return 0;
}

const struct vfs_ops vfs__mem_ops = {
    .version = VFS_OPS_VERSION,
    .struct_size = sizeof(struct vfs_ops),
    .name = "mem",
    .thread_model = VFS_THREAD_PARALLEL,
    .open = mem_open,
    .close = mem_close,
    .pread = mem_pread,
    .pwrite = mem_pwrite,
    .flush = mem_flush,
    .size = mem_size,
    .truncate = mem_truncate,
    .discard = mem_discard,
    .list = mem_list,
    .stat = mem_stat,
    .remove = mem_remove,
    .rename = mem_rename,
    /* no .block_status: the host's default (data up to the size) is exact here */
    .config = mem_config,
    .open_deferred = mem_open_deferred,
    .commit = mem_commit,
};
