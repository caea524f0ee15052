/* vfs.c: the backend registry, URI dispatch, plugin loading, and the forwarders
 * that check arguments and apply struct vfs_ops' documented defaults. */
#include "vfs.h"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "err.h"
#include "vfs_int.h"

/* One registered backend. Never freed: handles and callers keep borrowed
 * pointers to it for the life of the process. */
struct backend {
    struct vfs_ops ops;              /* copy; fields past the backend's struct_size are NULL */
    char name[VFS_SCHEME_MAX + 1];   /* ops.name points here */
    int serialize;                   /* thread model is not PARALLEL: take .lock per call */
    pthread_mutex_t lock;            /* recursive, so a backend may call itself via vfs_* */
    struct backend *next;
};

struct vfs_pending;

struct vfs_file {
    struct backend *be; /* borrowed, lives forever */
    void *handle;       /* the backend's, closed exactly once (pend's: by the pending) */
    unsigned flags;     /* VFS_O_* as opened */
    char *uri;          /* canonical URI, owned */
    struct vfs_pending *pend; /* opened by a pending publish's work URI: holds a reference */
};

/* A publish under way (vfs_pending_begin). Deferred (be set): the backend's
 * .open_deferred handle, shared by every vfs_file opened on work, closed when
 * the last reference goes. Fallback (be NULL): work is the temporary name. */
struct vfs_pending {
    struct backend *be;
    void *handle;
    char *final, *work;
    unsigned refs;  /* under pend_lock: the owner's, and one per vfs_file on work */
    int created;    /* under pend_lock: work was opened with VFS_O_CREATE */
    int committed;
    int ended;      /* the owner called vfs_pending_end */
    struct vfs_pending *next; /* on pendings (deferred only) */
};

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER; /* guards the list */
static struct backend *backends;                             /* in registration order */
static pthread_once_t builtin_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t pend_lock = PTHREAD_MUTEX_INITIALIZER; /* guards pendings and their refs */
static struct vfs_pending *pendings;

/* The scheme of the work URIs of deferred publishes: "pending:" and a random token. */
#define PENDING_PREFIX "pending:"

/* ---- names ---- */

static int scheme_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '.' || c == '-';
}

size_t vfs__scheme_len(const char *uri)
{
    size_t i = 1;
    if (!uri || !(uri[0] >= 'a' && uri[0] <= 'z'))
        return 0;
    while (scheme_char(uri[i]))
        i++;
    return uri[i] == ':' ? i : 0;
}

static int valid_scheme(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    if (n == 0 || n > VFS_SCHEME_MAX || !(s[0] >= 'a' && s[0] <= 'z'))
        return 0;
    for (size_t i = 1; i < n; i++)
        if (!scheme_char(s[i]))
            return 0;
    return 1;
}

static int is_scheme(const char *uri, size_t n, const char *scheme)
{
    return n == strlen(scheme) && memcmp(uri, scheme, n) == 0;
}

/* ---- registry ---- */

static struct backend *find_locked(const char *name, size_t len)
{
    for (struct backend *b = backends; b; b = b->next)
        if (strlen(b->name) == len && memcmp(b->name, name, len) == 0)
            return b;
    return NULL;
}

static struct backend *lookup(const char *name, size_t len)
{
    pthread_mutex_lock(&reg_lock);
    struct backend *b = find_locked(name, len);
    pthread_mutex_unlock(&reg_lock);
    return b;
}

static const char *missing_method(const struct vfs_ops *ops)
{
    if (!ops->open)
        return "open";
    if (!ops->close)
        return "close";
    if (!ops->pread)
        return "pread";
    if (!ops->size)
        return "size";
    return NULL;
}

/* Validate and copy ops into a new backend. Newer versions are accepted: we copy
 * only the fields this host knows (up to our sizeof) and never look further. */
static int do_register(const struct vfs_ops *ops)
{
    const char *miss;
    pthread_mutexattr_t attr;

    if (!ops)
        return err_fail(EINVAL, "register backend: no vfs_ops given");
    const char *nm = ops->name ? ops->name : "(unnamed)";
    if (ops->version < 1)
        return err_fail(EINVAL, "register backend %s: vfs_ops version %d is not valid", nm,
                        ops->version);
    if (ops->struct_size < VFS_OPS_V1_SIZE)
        return err_fail(EINVAL,
                        "register backend %s: struct_size %zu is smaller than version 1's %zu",
                        nm, ops->struct_size, (size_t)VFS_OPS_V1_SIZE);
    if (!valid_scheme(ops->name))
        return err_fail(EINVAL, "register backend: \"%s\" is not a valid scheme name", nm);
    if ((miss = missing_method(ops)))
        return err_fail(EINVAL, "register backend %s: mandatory method .%s is missing", nm, miss);
    if (!strcmp(ops->name, "pending"))
        return err_fail(EINVAL, "register backend pending: the scheme is the host's own");

    struct backend *b = calloc(1, sizeof *b);
    if (!b)
        return err_fail(ENOMEM, "register backend %s: out of memory", nm);
    size_t n = ops->struct_size < sizeof b->ops ? ops->struct_size : sizeof b->ops;
    memcpy(&b->ops, ops, n);
    if (ops->version < 2) { /* methods a v1 backend does not know it has */
        b->ops.config = NULL;
        b->ops.stats = NULL;
    }
    if (ops->version < 3)
        b->ops.fd = NULL;
    if (ops->version < 4 || !b->ops.open_deferred || !b->ops.commit || !b->ops.pwrite) {
        b->ops.open_deferred = NULL; /* both or neither, and only on a writable store */
        b->ops.commit = NULL;
    }
    if (ops->version < 5 || !b->ops.open_deferred)
        b->ops.release = NULL; /* only deferred handles take it */
    if (ops->version < 6 || !b->ops.open_deferred)
        b->ops.wait_room = NULL; /* the same */
    snprintf(b->name, sizeof b->name, "%s", ops->name);
    b->ops.name = b->name;
    b->serialize = ops->thread_model != VFS_THREAD_PARALLEL;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&b->lock, &attr);
    pthread_mutexattr_destroy(&attr);

    pthread_mutex_lock(&reg_lock);
    if (find_locked(b->name, strlen(b->name))) {
        pthread_mutex_unlock(&reg_lock);
        pthread_mutex_destroy(&b->lock);
        free(b);
        return err_fail(EEXIST, "register backend %s: the scheme is already taken", nm);
    }
    struct backend **tail = &backends;
    while (*tail)
        tail = &(*tail)->next;
    *tail = b;
    pthread_mutex_unlock(&reg_lock);
    return 0;
}

static void register_builtins(void)
{
    const struct vfs_ops *builtin[] = {&vfs__file_ops, &vfs__mem_ops, &vfs__fault_ops};
    for (size_t i = 0; i < sizeof builtin / sizeof builtin[0]; i++) {
        int r = do_register(builtin[i]);
        if (r < 0) /* only ENOMEM can get here; the scheme then reports "unknown" */
            fprintf(stderr, "qcowd: vfs: %s\n", err_msg(r));
    }
}

static void init(void)
{
    pthread_once(&builtin_once, register_builtins);
}

static int ensure_msg_cfg(int r, const char *scheme, const char *key)
{
    if (strcmp(err_msg(r), VFS_ESTR(r)) == 0)
        return err_fail(-r, "configure %s: %s: %s", scheme, key, VFS_ESTR(r));
    return r;
}

/* vfs_stats: adds the scheme to each counter of one backend. */
struct stats_ctx {
    int (*cb)(void *ctx, const char *scheme, const char *name, uint64_t value);
    void *ctx;
    const char *scheme;
};

static int stats_fwd(void *ctx, const char *name, uint64_t value)
{
    struct stats_ctx *sc = ctx;
    return sc->cb(sc->ctx, sc->scheme, name, value);
}

int vfs_register(const struct vfs_ops *ops)
{
    init(); /* built-ins first, so nobody can take "file" from under them */
    return do_register(ops);
}

int vfs_config(const char *scheme, const char *key, const char *value)
{
    init();
    struct backend *b = scheme ? lookup(scheme, strlen(scheme)) : NULL;
    if (!b)
        return err_fail(EINVAL, "configure %s: unknown storage scheme (is its plugin loaded?)",
                        scheme ? scheme : "(null)");
    if (!b->ops.config)
        return err_fail(EINVAL, "configure %s: the backend takes no configuration (%s=%s)", b->name,
                        key, value);
    err_clear();
    int r = b->ops.config(key, value);
    return r < 0 ? ensure_msg_cfg(r, b->name, key) : 0;
}

int vfs_stats(int (*cb)(void *ctx, const char *scheme, const char *name, uint64_t value), void *ctx)
{
    init();
    int r = 0;
    pthread_mutex_lock(&reg_lock); /* a backend's .stats must not register backends */
    for (struct backend *b = backends; b && !r; b = b->next) {
        struct stats_ctx sc = {cb, ctx, b->name};
        if (b->ops.stats)
            r = b->ops.stats(stats_fwd, &sc);
    }
    pthread_mutex_unlock(&reg_lock);
    return r;
}

/* ---- serialization ---- */

static void enter(struct backend *b)
{
    if (b->serialize)
        pthread_mutex_lock(&b->lock);
}

static void leave(struct backend *b)
{
    if (b->serialize)
        pthread_mutex_unlock(&b->lock);
}

/* ---- plugins ---- */

/* The host table plugins get: the error channel of common/err.h, with the
 * caller's format expanded here first (a message may quote the current one). */
static int host_vfail(int errnum, const char *fmt, va_list ap)
{
    char buf[ERR_MSG_MAX];
    vsnprintf(buf, sizeof buf, fmt, ap);
    return err_fail(errnum, "%s", buf);
}

static int host_vprefix(int errnum, const char *fmt, va_list ap)
{
    char buf[ERR_MSG_MAX];
    vsnprintf(buf, sizeof buf, fmt, ap);
    return err_prefix(errnum, "%s", buf);
}

static const struct vfs_host host_fns = {
    .version = VFS_HOST_VERSION,
    .struct_size = sizeof(struct vfs_host),
    .vfail = host_vfail,
    .vprefix = host_vprefix,
    .msg = err_msg,
    .clear = err_clear,
};

/* Built-in backends may use vfs_fail() too. */
const struct vfs_host *vfs_host_table = &host_fns;

int vfs_load_plugin(const char *so_path)
{
    struct stat st;
    char *local = NULL;

    init();
    if (!so_path || !*so_path)
        return err_fail(EINVAL, "load plugin: no path given");
    if (stat(so_path, &st) < 0) {
        int e = errno;
        return err_fail(e, "load plugin %s: %s", so_path, VFS_ESTR(e));
    }
    /* dlopen searches the library path for a name without '/': we mean this file */
    if (!strchr(so_path, '/') && asprintf(&local, "./%s", so_path) < 0)
        return err_fail(ENOMEM, "load plugin %s: out of memory", so_path);
    void *dl = dlopen(local ? local : so_path, RTLD_NOW | RTLD_LOCAL);
    free(local);
    if (!dl) {
        const char *m = dlerror();
        return err_fail(ENOEXEC, "load plugin %s: %s", so_path, m ? m : "dlopen failed");
    }
    dlerror();
    const struct vfs_ops *ops;
    void *sym = dlsym(dl, VFS_PLUGIN_INIT);
    if (sym) {
        vfs_plugin_init_fn init_fn;
        memcpy(&init_fn, &sym, sizeof init_fn); /* object pointer to function pointer, as POSIX allows */
        ops = init_fn(VFS_OPS_VERSION, &host_fns);
    } else if ((sym = dlsym(dl, VFS_PLUGIN_ENTRY_OLD))) {
        /* an older plugin that needs nothing of the host (one that took the
         * error functions from the daemon failed in dlopen, naming them) */
        vfs_plugin_entry_old_fn entry;
        memcpy(&entry, &sym, sizeof entry);
        ops = entry(VFS_OPS_VERSION);
    } else {
        dlclose(dl);
        return err_fail(ENOEXEC, "load plugin %s: not a qcowd plugin (no symbol %s)", so_path, VFS_PLUGIN_INIT);
    }
    if (!ops) {
        dlclose(dl);
        return err_fail(ENOTSUP, "load plugin %s: the plugin declined host version %d", so_path,
                        VFS_OPS_VERSION);
    }
    int r = do_register(ops);
    if (r < 0) {
        dlclose(dl); /* do_register kept nothing of it */
        return err_prefix(r, "load plugin %s", so_path);
    }
    return 0; /* the object stays loaded for good: its methods are registered */
}

static int so_filter(const struct dirent *d)
{
    size_t n = strlen(d->d_name);
    return n > 3 && strcmp(d->d_name + n - 3, ".so") == 0;
}

int vfs_load_plugins(const char *dir)
{
    struct dirent **ents;
    int loaded = 0;

    init();
    if (!dir)
        return err_fail(EINVAL, "load plugins: no folder given");
    int n = scandir(dir, &ents, so_filter, alphasort);
    if (n < 0) {
        int e = errno;
        return err_fail(e, "load plugins from %s: %s", dir, VFS_ESTR(e));
    }
    for (int i = 0; i < n; i++) {
        char *path;
        int r;
        struct stat st;
        if (asprintf(&path, "%s/%s", dir, ents[i]->d_name) < 0) {
            r = err_fail(ENOMEM, "load plugin %s: out of memory", ents[i]->d_name);
        } else {
            /* code anyone may replace is not loaded */
            if (lstat(path, &st) < 0 || !S_ISREG(st.st_mode) || (st.st_mode & (S_IWOTH | S_IWGRP)))
                r = err_fail(EPERM, "load plugin %s: not a regular file that only its owner may write; skipped",
                             path);
            else
                r = vfs_load_plugin(path);
            free(path);
        }
        if (r < 0)
            fprintf(stderr, "qcowd: %s\n", err_msg(r));
        else
            loaded++;
        free(ents[i]);
    }
    free(ents);
    return loaded;
}

/* ---- URIs ---- */

/* Find the backend for uri and the path it gets (the part after "scheme:").
 * op names the caller in the message. */
static int split_uri(const char *op, const char *uri, struct backend **be, const char **path)
{
    init();
    if (!uri)
        return err_fail(EINVAL, "%s: no URI given", op);
    size_t n = vfs__scheme_len(uri);
    if (n == 0) {
        *be = lookup("file", 4);
        *path = uri;
    } else {
        *be = n <= VFS_SCHEME_MAX ? lookup(uri, n) : NULL;
        *path = uri + n + 1;
    }
    if (!*be)
        return err_fail(EINVAL, "%s %s: unknown storage scheme \"%.*s\"", op, uri,
                        n ? (int)n : 4, n ? uri : "file");
    return 0;
}

/* An absolute, symlink-free spelling of a file path; if realpath fails (a
 * dangling name), at least absolute. NULL on ENOMEM. */
static char *abs_path(const char *path)
{
    char cwd[PATH_MAX];
    char *r = realpath(path, NULL);
    if (r || path[0] == '/' || !getcwd(cwd, sizeof cwd))
        return r ? r : strdup(path);
    return asprintf(&r, "%s/%s", cwd, path) < 0 ? NULL : r;
}

/* The canonical URI for vfs_file_uri: files lose "file:" and get abs_path;
 * "fault:" keeps its prefix over a canonical inner URI; others stay as given. */
static char *canon_uri(const char *uri)
{
    size_t n = vfs__scheme_len(uri);
    char *in, *r;
    if (n == 0 || is_scheme(uri, n, "file"))
        return abs_path(n ? uri + n + 1 : uri);
    if (is_scheme(uri, n, "fault")) {
        if (!(in = canon_uri(uri + n + 1)))
            return NULL;
        if (asprintf(&r, "fault:%s", in) < 0)
            r = NULL;
        free(in);
        return r;
    }
    return strdup(uri);
}

static char *pending_final(const char *uri);

char *vfs_resolve(const char *base_uri, const char *name)
{
    if (!name)
        return NULL;
    if (!base_uri || name[0] == '/' || vfs__scheme_len(name))
        return strdup(name);
    if (!strncmp(base_uri, PENDING_PREFIX, strlen(PENDING_PREFIX))) {
        /* a name beside a pending publish is beside its final name */
        char *final = pending_final(base_uri);
        char *r = final ? vfs_resolve(final, name) : strdup(name);
        free(final);
        return r;
    }
    /* Keep the base's scheme prefix (looking through "fault:" to the inner
     * scheme) and its folder, then append name. */
    const char *p = base_uri;
    for (;;) {
        size_t n = vfs__scheme_len(p);
        if (!n)
            break;
        int through = is_scheme(p, n, "fault");
        p += n + 1;
        if (!through)
            break;
    }
    const char *slash = strrchr(p, '/');
    size_t keep = slash ? (size_t)(slash - base_uri) + 1 : (size_t)(p - base_uri);
    size_t nlen = strlen(name);
    char *r = malloc(keep + nlen + 1);
    if (!r)
        return NULL;
    memcpy(r, base_uri, keep);
    memcpy(r + keep, name, nlen + 1);
    return r;
}

int vfs_name_is_contained(const char *name)
{
    if (!name || !*name || name[0] == '/')
        return 0;
    /* Any ':' in the first component could read as a scheme or protocol
     * ("json:{...}", "nbd:host"); refuse rather than guess. */
    if (memchr(name, ':', strcspn(name, "/")))
        return 0;
    for (const char *p = name; *p;) {
        size_t n = strcspn(p, "/");
        if (n == 2 && p[0] == '.' && p[1] == '.')
            return 0;
        p += n;
        while (*p == '/')
            p++;
    }
    return 1;
}

/* ---- handles ---- */

/* After a failing call that was given a fresh message slot: if the backend
 * left no message of its own, name the operation and the URI. */
static int ensure_msg(int r, const char *op, const char *uri)
{
    if (strcmp(err_msg(r), VFS_ESTR(r)) == 0)
        return err_fail(-r, "%s %s: %s", op, uri, VFS_ESTR(r));
    return r;
}

static int pending_open(const char *uri, unsigned flags, struct vfs_file **out);

int vfs_open(const char *uri, unsigned flags, struct vfs_file **out)
{
    struct backend *be;
    const char *path;
    void *h = NULL;

    if (uri && !strncmp(uri, PENDING_PREFIX, strlen(PENDING_PREFIX)))
        return pending_open(uri, flags, out);
    int r = split_uri("open", uri, &be, &path);
    if (r < 0)
        return r;
    if (flags & ~(VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL))
        return err_fail(EINVAL, "open %s: unknown flags %#x", uri, flags);
    if ((flags & VFS_O_CREATE) && !(flags & VFS_O_RDWR))
        return err_fail(EINVAL, "open %s: creating needs read-write", uri);
    if ((flags & VFS_O_EXCL) && !(flags & VFS_O_CREATE))
        return err_fail(EINVAL, "open %s: exclusive open needs create", uri);
    if ((flags & VFS_O_RDWR) && !be->ops.pwrite)
        return err_fail(EROFS, "open %s: backend \"%s\" is read-only", uri, be->name);

    struct vfs_file *f = calloc(1, sizeof *f);
    if (!f)
        return err_fail(ENOMEM, "open %s: out of memory", uri);
    err_clear();
    enter(be);
    r = be->ops.open(path, flags, &h);
    leave(be);
    if (r < 0) {
        free(f);
        return ensure_msg(r, "open", uri);
    }
    f->be = be;
    f->handle = h;
    f->flags = flags;
    if (!(f->uri = canon_uri(uri))) {
        vfs_close(f);
        return err_fail(ENOMEM, "open %s: out of memory", uri);
    }
    *out = f;
    return 0;
}

static void pending_put(struct vfs_pending *p);

void vfs_close(struct vfs_file *f)
{
    if (!f)
        return;
    if (f->pend) {
        pending_put(f->pend);
        free(f->uri);
        free(f);
        return;
    }
    enter(f->be);
    f->be->ops.close(f->handle);
    leave(f->be);
    free(f->uri);
    free(f);
}

const char *vfs_file_uri(const struct vfs_file *f)
{
    return f->uri;
}

/* The URI messages about f name: a pending publish's work URI is private
 * (pending:TOKEN), so they name the object's final URI instead. */
static const char *shown_uri(const struct vfs_file *f)
{
    return f->pend ? f->pend->final : f->uri;
}

/* off+len must not wrap and must fit an off_t. */
static int check_range(const struct vfs_file *f, const char *op, uint64_t off, uint64_t len)
{
    uint64_t end;
    if (__builtin_add_overflow(off, len, &end) || end > (uint64_t)INT64_MAX)
        return err_fail(EINVAL, "%s %s: range %llu+%llu is out of bounds", op, shown_uri(f),
                        (unsigned long long)off, (unsigned long long)len);
    return 0;
}

static int check_writable(const struct vfs_file *f, const char *op)
{
    if (!(f->flags & VFS_O_RDWR))
        return err_fail(EBADF, "%s %s: opened read-only", op, shown_uri(f));
    return 0;
}

int vfs_pread(struct vfs_file *f, void *buf, size_t len, uint64_t off)
{
    int r = check_range(f, "pread", off, len);
    if (r < 0 || len == 0)
        return r;
    enter(f->be);
    r = f->be->ops.pread(f->handle, buf, len, off);
    leave(f->be);
    return r < 0 ? r : 0;
}

int vfs_pwrite(struct vfs_file *f, const void *buf, size_t len, uint64_t off)
{
    int r = check_writable(f, "pwrite");
    if (r == 0)
        r = check_range(f, "pwrite", off, len);
    if (r < 0 || len == 0)
        return r;
    enter(f->be);
    r = f->be->ops.pwrite(f->handle, buf, len, off);
    leave(f->be);
    return r < 0 ? r : 0;
}

int vfs_flush(struct vfs_file *f)
{
    int r;
    if (!f->be->ops.flush) {
        /* Nothing written through this handle can be pending without a writer. */
        if (!(f->flags & VFS_O_RDWR) || !f->be->ops.pwrite)
            return 0;
        return err_fail(EOPNOTSUPP, "flush %s: backend \"%s\" cannot make writes durable",
                        shown_uri(f), f->be->name);
    }
    enter(f->be);
    r = f->be->ops.flush(f->handle);
    leave(f->be);
    return r < 0 ? r : 0;
}

int vfs_size(struct vfs_file *f, uint64_t *size)
{
    uint64_t s = 0;
    enter(f->be);
    int r = f->be->ops.size(f->handle, &s);
    leave(f->be);
    if (r < 0)
        return r;
    *size = s;
    return 0;
}

int vfs_truncate(struct vfs_file *f, uint64_t size)
{
    int r = check_writable(f, "truncate");
    if (r < 0)
        return r;
    if (size > (uint64_t)INT64_MAX)
        return err_fail(EFBIG, "truncate %s: size %llu is too large", shown_uri(f),
                        (unsigned long long)size);
    if (!f->be->ops.truncate)
        return err_fail(EOPNOTSUPP, "truncate %s: backend \"%s\" cannot resize", shown_uri(f),
                        f->be->name);
    enter(f->be);
    r = f->be->ops.truncate(f->handle, size);
    leave(f->be);
    return r < 0 ? r : 0;
}

int vfs_fd(struct vfs_file *f)
{
    if (!f->be->ops.fd || f->be->serialize)
        return -1;
    return f->be->ops.fd(f->handle);
}

int vfs_discard(struct vfs_file *f, uint64_t off, uint64_t len)
{
    int r = check_writable(f, "discard");
    if (r == 0)
        r = check_range(f, "discard", off, len);
    if (r < 0 || len == 0)
        return r;
    if (!f->be->ops.discard)
        return err_fail(EOPNOTSUPP, "discard %s: backend \"%s\" has no discard", shown_uri(f),
                        f->be->name);
    enter(f->be);
    r = f->be->ops.discard(f->handle, off, len);
    leave(f->be);
    return r < 0 ? r : 0;
}

int vfs_release(struct vfs_file *f, uint64_t off, uint64_t len)
{
    int r = check_writable(f, "release");
    if (r == 0)
        r = check_range(f, "release", off, len);
    if (r < 0 || len == 0 || !f->be->ops.release || !f->pend)
        return r;
    enter(f->be);
    r = f->be->ops.release(f->handle, off, len);
    leave(f->be);
    return r < 0 ? r : 0;
}

int vfs_wait_room(struct vfs_file *f, void (*wake)(void *ctx), void *ctx)
{
    if (!f->be->ops.wait_room || !f->pend || !(f->flags & VFS_O_RDWR))
        return 1;
    enter(f->be);
    int r = f->be->ops.wait_room(f->handle, wake, ctx);
    leave(f->be);
    return r < 0 ? r : r > 0;
}

unsigned vfs_caps(struct vfs_file *f)
{
    unsigned c;
    if (!f->be->ops.caps)
        return 0;
    enter(f->be);
    c = f->be->ops.caps(f->handle);
    leave(f->be);
    return c;
}

int vfs_block_status(struct vfs_file *f, uint64_t off, uint64_t len, uint64_t *pnum)
{
    uint64_t n = 0, size;
    int r;
    if (len == 0)
        return err_fail(EINVAL, "block status %s: empty range", shown_uri(f));
    if ((r = check_range(f, "block status", off, len)) < 0)
        return r;
    if (!f->be->ops.block_status) { /* the default: data up to the size, hole after */
        if ((r = vfs_size(f, &size)) < 0)
            return r;
        if (off >= size) {
            *pnum = len;
            return VFS_BS_HOLE;
        }
        *pnum = size - off < len ? size - off : len;
        return VFS_BS_DATA;
    }
    enter(f->be);
    r = f->be->ops.block_status(f->handle, off, len, &n);
    leave(f->be);
    if (r < 0)
        return r;
    if ((r != VFS_BS_DATA && r != VFS_BS_HOLE) || n == 0 || n > len)
        return err_fail(EIO, "block status %s: backend \"%s\" answered %d for %llu bytes",
                        shown_uri(f), f->be->name, r, (unsigned long long)n);
    *pnum = n;
    return r;
}

/* ---- store-level calls ---- */

/* Find the backend for uri and make sure it has the store-level method. */
#define STORE_BACKEND(opname, method, uri, be, path)                                          \
    do {                                                                                      \
        int r_ = split_uri(opname, uri, &be, &path);                                          \
        if (r_ < 0)                                                                           \
            return r_;                                                                        \
        if (!be->ops.method)                                                                  \
            return err_fail(EOPNOTSUPP, "%s %s: backend \"%s\" does not support it", opname, \
                            uri, be->name);                                                   \
    } while (0)

int vfs_list(const char *dir_uri, int (*cb)(void *ctx, const char *name), void *ctx)
{
    struct backend *be;
    const char *path;
    STORE_BACKEND("list", list, dir_uri, be, path);
    enter(be);
    int r = be->ops.list(path, cb, ctx);
    leave(be);
    return r;
}

static int pending_stat(const char *uri, struct vfs_stat *st);

int vfs_stat(const char *uri, struct vfs_stat *st)
{
    struct vfs_stat tmp = {0};
    struct backend *be;
    const char *path;
    if (uri && !strncmp(uri, PENDING_PREFIX, strlen(PENDING_PREFIX)))
        return pending_stat(uri, st);
    STORE_BACKEND("stat", stat, uri, be, path);
    enter(be);
    int r = be->ops.stat(path, &tmp);
    leave(be);
    if (r < 0)
        return r;
    *st = tmp;
    return 0;
}

int vfs_remove(const char *uri)
{
    struct backend *be;
    const char *path;
    STORE_BACKEND("remove", remove, uri, be, path);
    enter(be);
    int r = be->ops.remove(path);
    leave(be);
    return r;
}

/* Both names must be in one store (the same backend): -EXDEV otherwise. */
int vfs_rename(const char *from_uri, const char *to_uri)
{
    struct backend *be, *to_be;
    const char *path, *to_path;
    STORE_BACKEND("rename", rename, from_uri, be, path);
    int r = split_uri("rename", to_uri, &to_be, &to_path);
    if (r < 0)
        return r;
    if (to_be != be)
        return err_fail(EXDEV, "rename %s to %s: not in the same store", from_uri, to_uri);
    enter(be);
    r = be->ops.rename(path, to_path);
    leave(be);
    return r;
}

/* ---- deferred publish ---- */

/* The pending of a work URI (pend_lock held), or NULL. */
static struct vfs_pending *pending_find(const char *uri)
{
    for (struct vfs_pending *p = pendings; p; p = p->next)
        if (!strcmp(p->work, uri))
            return p;
    return NULL;
}

char *vfs_pending_final(const char *uri)
{
    return uri && !strncmp(uri, PENDING_PREFIX, strlen(PENDING_PREFIX)) ? pending_final(uri) : NULL;
}

/* A copy of the final URI of the pending named uri, or NULL (none, or ENOMEM). */
static char *pending_final(const char *uri)
{
    pthread_mutex_lock(&pend_lock);
    struct vfs_pending *p = pending_find(uri);
    char *r = p ? strdup(p->final) : NULL;
    pthread_mutex_unlock(&pend_lock);
    return r;
}

static void pending_free(struct vfs_pending *p)
{
    free(p->final);
    free(p->work);
    free(p);
}

/* Drop one reference of a deferred pending; the last closes the backend's
 * handle, which aborts the publish when it was not committed. */
static void pending_put(struct vfs_pending *p)
{
    pthread_mutex_lock(&pend_lock);
    unsigned left = --p->refs;
    if (!left)
        for (struct vfs_pending **pp = &pendings; *pp; pp = &(*pp)->next)
            if (*pp == p) {
                *pp = p->next;
                break;
            }
    pthread_mutex_unlock(&pend_lock);
    if (left)
        return;
    struct err_saved saved; /* the caller's message outlives the abort */
    err_save(&saved, -EIO);
    enter(p->be);
    p->be->ops.close(p->handle);
    leave(p->be);
    err_restore(&saved);
    pending_free(p);
}

/* vfs_open of a work URI: a new vfs_file on the shared handle. The object
 * counts as missing until the first open with VFS_O_CREATE (so that a maker
 * opening with CREATE | EXCL, as qcow2_create does, gets it). */
static int pending_open(const char *uri, unsigned flags, struct vfs_file **out)
{
    if (flags & ~(VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL))
        return err_fail(EINVAL, "open %s: unknown flags %#x", uri, flags);
    struct vfs_file *f = calloc(1, sizeof *f);
    if (!f || !(f->uri = strdup(uri))) {
        free(f);
        return err_fail(ENOMEM, "open: out of memory");
    }
    int r = 0;
    pthread_mutex_lock(&pend_lock);
    struct vfs_pending *p = pending_find(uri);
    if (!p || p->ended || p->committed)
        r = err_fail(ENOENT, "open: no such pending object");
    else if (!p->created && !(flags & VFS_O_CREATE))
        r = err_fail(ENOENT, "open: the pending object is not created yet");
    else if (p->created && (flags & VFS_O_CREATE) && (flags & VFS_O_EXCL))
        r = err_fail(EEXIST, "open: the pending object exists");
    if (r == 0) {
        p->created |= !!(flags & VFS_O_CREATE);
        p->refs++;
        f->be = p->be;
        f->handle = p->handle;
        f->flags = flags;
        f->pend = p;
    }
    pthread_mutex_unlock(&pend_lock);
    if (r < 0) {
        free(f->uri);
        free(f);
        return r;
    }
    *out = f;
    return 0;
}

static int pending_stat(const char *uri, struct vfs_stat *st)
{
    struct vfs_file *f;
    int r = pending_open(uri, VFS_O_RDONLY, &f);
    if (r < 0)
        return r;
    uint64_t size = 0;
    r = vfs_size(f, &size);
    vfs_close(f);
    if (r == 0)
        *st = (struct vfs_stat){.size = size};
    return r;
}

int vfs_pending_begin(const char *final_uri, const char *temp_uri, struct vfs_pending **out)
{
    struct backend *be;
    const char *path;
    int r = split_uri("publish", final_uri, &be, &path);
    if (r < 0)
        return r;
    if (!be->ops.pwrite)
        return err_fail(EROFS, "publish %s: backend \"%s\" is read-only", final_uri, be->name);
    struct vfs_pending *p = calloc(1, sizeof *p);
    if (!p || !(p->final = strdup(final_uri)))
        goto nomem;
    p->refs = 1;
    if (!be->ops.open_deferred) {
        if (!temp_uri) {
            pending_free(p);
            return err_fail(EINVAL, "publish %s: backend \"%s\" needs a temporary name", final_uri, be->name);
        }
        if (!(p->work = strdup(temp_uri)))
            goto nomem;
        *out = p;
        return 0;
    }
    uint64_t token;
    if (getrandom(&token, sizeof token, 0) != sizeof token)
        token = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)p;
    static unsigned long seq; /* unique even if two tokens met */
    if (asprintf(&p->work, PENDING_PREFIX "%016llx-%lu", (unsigned long long)token,
                 __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED)) < 0) {
        p->work = NULL;
        goto nomem;
    }
    err_clear();
    enter(be);
    r = be->ops.open_deferred(path, &p->handle);
    leave(be);
    if (r < 0) {
        pending_free(p);
        return ensure_msg(r, "publish", final_uri);
    }
    p->be = be;
    pthread_mutex_lock(&pend_lock);
    p->next = pendings;
    pendings = p;
    pthread_mutex_unlock(&pend_lock);
    *out = p;
    return 0;
nomem:
    if (p)
        pending_free(p);
    return err_fail(ENOMEM, "publish %s: out of memory", final_uri);
}

const char *vfs_pending_uri(const struct vfs_pending *p)
{
    return p->work;
}

int vfs_pending_deferred(const struct vfs_pending *p)
{
    return p->be != NULL;
}

int vfs_pending_commit(struct vfs_pending *p, unsigned flags)
{
    int r;
    if (flags & ~VFS_COMMIT_EXCL)
        return err_fail(EINVAL, "publish %s: unknown flags %#x", p->final, flags);
    if (p->committed)
        return err_fail(EINVAL, "publish %s: already published", p->final);
    if (!p->be) { /* the fallback: the temporary name renamed into place */
        struct vfs_stat st;
        if (flags & VFS_COMMIT_EXCL) {
            r = vfs_stat(p->final, &st);
            if (r == 0)
                return err_fail(EEXIST, "publish %s: the object exists", p->final);
            if (r != -ENOENT)
                return r;
            err_clear();
        }
        r = vfs_rename(p->work, p->final);
    } else {
        pthread_mutex_lock(&pend_lock);
        int created = p->created;
        pthread_mutex_unlock(&pend_lock);
        if (!created)
            return err_fail(ENOENT, "publish %s: nothing was created to publish", p->final);
        err_clear();
        enter(p->be);
        r = p->be->ops.commit(p->handle, flags);
        leave(p->be);
        if (r < 0)
            r = ensure_msg(r, "publish", p->final);
    }
    if (r == 0)
        p->committed = 1;
    return r < 0 ? r : 0;
}

void vfs_pending_end(struct vfs_pending *p)
{
    if (!p)
        return;
    if (p->be) {
        pthread_mutex_lock(&pend_lock);
        p->ended = 1;
        pthread_mutex_unlock(&pend_lock);
        pending_put(p);
        return;
    }
    if (!p->committed) {
        struct err_saved saved;
        err_save(&saved, -EIO);
        vfs_remove(p->work); /* ENOENT when it was never created */
        err_restore(&saved);
    }
    pending_free(p);
}
