/* catalog.c: image names -> files "NAME.qcow2" in the catalog folder, opened
 * through the engine and cached as refcounted handles (failures cached too), and
 * the whole-image operations: create, remove, upload, download. */
#include "catalog.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "err.h"
#include "qcow2.h"
#include "vfs.h"

/* One cached image, or one cached failure to open it (img == NULL). */
struct catalog_image {
    struct catalog *cat;
    char *name;
    char *uri;     /* the image file */
    uint64_t size; /* identity of the file when opened: size, mtime (ns), inode */
    int64_t mtime, mtime_nsec;
    uint64_t ino;
    uint64_t version;        /* and the store's content version, where it has one */
    struct qcow2_image *img; /* NULL: opening failed with err/msg */
    int err;                 /* positive errno of the failure */
    char *msg;               /* its message */
    bool rw;                 /* img was opened read-write */
    char *ro_msg;            /* else why not (NULL for a failure entry) */
    int ro_err;              /* and the positive errno of that read-write open */
    struct catalog_identity opened; /* the file when img was opened, and the open's seq */
    unsigned refs;           /* holders, the cache included (under cat->lock) */
    unsigned writers;        /* holders from catalog_get_writable (under cat->lock) */
    unsigned downloads;      /* GET .../file readers of the container (under cat->lock) */
    bool written;            /* a writer has held it: metadata may be pending */
    bool cached;             /* on cat->list */
    uint64_t used;           /* LRU tick of the last get */
    struct catalog_image *next;
};

struct catalog {
    char *root; /* the folder: absolute path or "scheme:..." */
    struct catalog_opts opts;
    pthread_mutex_t lock; /* guards list, count, tick and every entry's refs/cached/used */
    struct catalog_image *list;
    unsigned count; /* entries on list */
    unsigned open;  /* entries alive with an image (cached or held) */
    uint64_t tick;
    struct catalog_image *closing; /* entries whose image is being closed now */
    pthread_cond_t closed;         /* signalled when one of them is done */
    pthread_mutex_t create_lock;   /* serialises create, remove and upload commits; before lock */
    unsigned long seq;             /* temporary names (under lock) */
    uint64_t open_seq;             /* images opened so far (under lock) */
    char host[64];                 /* this host in temporary names (host_id) */
    uint64_t closed_hits, closed_misses; /* L2 cache counts of images already closed (under lock) */
    struct reservation *reserved;        /* images reserved by jobs (under lock) */
    catalog_notify_fn notify;            /* image events, or NULL */
    void *notify_opaque;
};

/* One image reserved by a job (catalog_reserve). */
struct reservation {
    char *name;
    char *owner;
    bool exclusive; /* readers refused too */
    struct reservation *next;
};

static struct reservation *reserved(const struct catalog *c, const char *name)
{
    for (struct reservation *r = c->reserved; r; r = r->next)
        if (!strcmp(r->name, name))
            return r;
    return NULL;
}

/* -EBUSY when name is reserved (for readers too when readers is set), else 0. */
static int check_reserved(struct catalog *c, const char *name, bool readers)
{
    pthread_mutex_lock(&c->lock);
    struct reservation *r = reserved(c, name);
    int ret = 0;
    if (r && (!readers || r->exclusive))
        ret = err_fail(EBUSY, "image '%s' is busy: %s", name, r->owner);
    pthread_mutex_unlock(&c->lock);
    return ret;
}

static void notify(struct catalog *c, const char *what, const char *name)
{
    if (c->notify)
        c->notify(c->notify_opaque, what, name);
}

static void host_id(char *out, size_t cap);

static bool is_uri(const char *s)
{
    size_t n = strcspn(s, ":/");
    return n > 0 && s[n] == ':';
}

int catalog_new(const char *root, const struct catalog_opts *opts, struct catalog **out)
{
    struct catalog *c = calloc(1, sizeof *c);
    if (!c)
        return err_fail(ENOMEM, "out of memory");
    if (opts)
        c->opts = *opts;
    if (!c->opts.max_open)
        c->opts.max_open = CATALOG_DEFAULT_OPEN;
    if (!c->opts.max_upload)
        c->opts.max_upload = CATALOG_DEFAULT_UPLOAD;
    if (!c->opts.max_catalog)
        c->opts.max_catalog = CATALOG_UNLIMITED;
    if (!c->opts.max_virtual_size)
        c->opts.max_virtual_size = CATALOG_DEFAULT_VIRTUAL;
    int ret;
    if (is_uri(root)) {
        c->root = strdup(root);
        if (!c->root) {
            ret = err_fail(ENOMEM, "out of memory");
            goto fail;
        }
    } else {
        /* canonical, so the chain check below compares like with like */
        c->root = realpath(root, NULL);
        if (!c->root) {
            ret = err_fail(errno, "catalog folder %s: %s", root, strerror(errno));
            goto fail;
        }
    }
    size_t len = strlen(c->root);
    while (len > 1 && c->root[len - 1] == '/')
        c->root[--len] = '\0';
    struct vfs_stat st;
    ret = vfs_stat(c->root, &st);
    if (ret == -ENOENT && is_uri(c->root)) {
        /* an object store's folder exists once something is under it; asked as
         * "root/", a backend may take an empty prefix of a bucket as a folder */
        char *slashed;
        if (asprintf(&slashed, "%s/", c->root) >= 0) {
            ret = vfs_stat(slashed, &st);
            free(slashed);
        }
    }
    if (ret < 0) {
        ret = err_prefix(ret, "catalog folder %s", root);
        goto fail;
    }
    if (!st.is_dir) {
        ret = err_fail(ENOTDIR, "catalog folder %s is not a folder", root);
        goto fail;
    }
    host_id(c->host, sizeof c->host);
    pthread_mutex_init(&c->lock, NULL);
    pthread_mutex_init(&c->create_lock, NULL);
    pthread_cond_init(&c->closed, NULL);
    *out = c;
    return 0;
fail:
    free(c->root);
    free(c);
    return ret;
}

/* Free e (off the list, no refs). Its image is closed while e sits on the
 * closing list, so nobody opens the same file again before the close has written
 * the handle's pending metadata. */
static void entry_free(struct catalog_image *e)
{
    struct catalog *c = e->cat;
    if (e->img) {
        uint64_t h, m;
        qcow2_cache_stats(e->img, &h, &m);
        pthread_mutex_lock(&c->lock);
        c->closed_hits += h;
        c->closed_misses += m;
        e->next = c->closing;
        c->closing = e;
        pthread_mutex_unlock(&c->lock);
        qcow2_close(e->img);
        pthread_mutex_lock(&c->lock);
        for (struct catalog_image **p = &c->closing; *p; p = &(*p)->next)
            if (*p == e) {
                *p = e->next;
                break;
            }
        c->open--;
        pthread_cond_broadcast(&c->closed);
        pthread_mutex_unlock(&c->lock);
    }
    free(e->name);
    free(e->uri);
    free(e->msg);
    free(e->ro_msg);
    free(e);
}

void catalog_free(struct catalog *c)
{
    if (!c)
        return;
    struct catalog_image *e = c->list;
    while (e) {
        struct catalog_image *next = e->next;
        if (--e->refs == 0)
            entry_free(e);
        else
            fprintf(stderr, "catalog: image %s still in use at shutdown\n", e->name);
        e = next;
    }
    while (c->reserved) {
        struct reservation *r = c->reserved;
        c->reserved = r->next;
        free(r->name);
        free(r->owner);
        free(r);
    }
    pthread_cond_destroy(&c->closed);
    pthread_mutex_destroy(&c->create_lock);
    pthread_mutex_destroy(&c->lock);
    free(c->root);
    free(c);
}

int catalog_valid_name(const char *name)
{
    size_t n = strlen(name);
    if (n == 0)
        return err_fail(EINVAL, "image name is empty");
    if (n > CATALOG_NAME_MAX)
        return err_fail(EINVAL, "image name is %zu bytes long, more than %d", n, CATALOG_NAME_MAX);
    if (strstr(name, ".."))
        return err_fail(EINVAL, "image name contains \"..\"");
    if (strchr(name, '/'))
        return err_fail(EINVAL, "image name contains '/'");
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)name[i];
        bool alnum = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9');
        if (!alnum && (i == 0 || (ch != '.' && ch != '_' && ch != '-')))
            return err_fail(EINVAL, "image name has a character not allowed %s (0x%02x at byte %zu)",
                            i == 0 ? "first" : "in names", ch, i);
    }
    return 0;
}

static char *image_uri(const struct catalog *c, const char *name)
{
    char *uri;
    const char *sep = c->root[strlen(c->root) - 1] == '/' ? "" : "/";
    if (asprintf(&uri, "%s%s%s%s", c->root, sep, name, CATALOG_SUFFIX) < 0)
        return NULL;
    return uri;
}

/* ---- listing ---- */

struct name_list {
    char **v;
    size_t n, cap;
};

static int collect(void *ctx, const char *file)
{
    struct name_list *l = ctx;
    size_t n = strlen(file), sl = strlen(CATALOG_SUFFIX);
    if (n <= sl || strcmp(file + n - sl, CATALOG_SUFFIX))
        return 0;
    char *name = strndup(file, n - sl);
    if (!name)
        return -ENOMEM;
    if (catalog_valid_name(name) < 0) {
        free(name); /* a file no URL can name: not part of the catalog */
        err_clear();
        return 0;
    }
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        char **v = realloc(l->v, cap * sizeof *v);
        if (!v) {
            free(name);
            return -ENOMEM;
        }
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = name;
    return 0;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int catalog_list(struct catalog *c, char ***names, size_t *count)
{
    struct name_list l = {0};
    int ret = vfs_list(c->root, collect, &l);
    if (ret < 0) {
        catalog_names_free(l.v, l.n);
        if (ret == -ENOMEM)
            return err_fail(ENOMEM, "out of memory");
        return err_prefix(ret, "listing the catalog");
    }
    if (l.n)
        qsort(l.v, l.n, sizeof *l.v, cmp_names);
    *names = l.v;
    *count = l.n;
    return 0;
}

void catalog_names_free(char **names, size_t count)
{
    for (size_t i = 0; i < count; i++)
        free(names[i]);
    free(names);
}

/* ---- the cache ---- */

/* Whether uri lies inside the catalog folder. */
static bool inside(const struct catalog *c, const char *uri)
{
    size_t n = strlen(c->root);
    if (strncmp(uri, c->root, n))
        return false;
    return c->root[n - 1] == '/' || uri[n] == '/';
}

/* The engine refuses absolute and ".." names already; this also catches a name
 * that reaches outside through a symbolic link, since layer URIs are canonical. */
static int check_chain(const struct catalog *c, struct qcow2_image *img)
{
    for (struct qcow2_image *l = img; l; l = qcow2_backing(l)) {
        const struct qcow2_info *in = qcow2_get_info(l);
        if (!inside(c, in->uri))
            return err_fail(EPERM, "%s %s resolves outside the catalog", l == img ? "image file" : "backing file",
                            l == img           ? in->uri
                            : in->backing_file ? in->backing_file
                                               : in->uri);
    }
    return 0;
}

/* Failures of the store or of the moment rather than of the image: a retry may
 * succeed, so they are not cached, and they are no reason to serve the image
 * read-only. (EACCES is one too, but a read-only open may still succeed: a file
 * of mode 0444.) */
static bool transient(int err)
{
    switch (-err) {
    case ENOMEM:
    case EIO:
    case EACCES:
    case EAGAIN:
    case EINTR:
    case ETIMEDOUT:
    case ECONNREFUSED:
    case ECONNRESET:
    case EHOSTUNREACH:
    case EREMOTEIO:
    case ESTALE:
    case EMFILE:
    case ENFILE:
    case ENOSPC:
    case EDQUOT:
        return true;
    default:
        return false;
    }
}

/* Open name into a new entry (one ref, not cached); failures of the image give
 * an entry too, transient ones only their error. */
static int open_entry(struct catalog *c, const char *name, const char *uri, const struct vfs_stat *st,
                      struct catalog_image **out)
{
    struct catalog_image *e = calloc(1, sizeof *e);
    if (!e || !(e->name = strdup(name)) || !(e->uri = strdup(uri))) {
        if (e)
            free(e->name);
        free(e);
        return err_fail(ENOMEM, "out of memory");
    }
    e->cat = c;
    e->size = st->size;
    e->mtime = st->mtime;
    e->mtime_nsec = st->mtime_nsec;
    e->ino = st->ino;
    e->version = st->version;
    e->refs = 1;
    /* One handle serves readers and writers (the engine serialises them), so a
     * first write never has to swap handles under readers. Opening read-write
     * writes nothing until the first write. */
    struct qcow2_open_opts o = {
        .contained = true,
        .read_write = true,
        .no_rebuild = true, /* a dirty image's refcount rebuild is a check job, not this request's work */
        .l2_cache_bytes = c->opts.l2_cache_bytes,
        .max_meta_bytes = c->opts.max_meta_bytes,
    };
    int ret = qcow2_open(uri, &o, &e->img);
    e->rw = ret == 0;
    if (ret < 0 && ret != -ENOENT && (!transient(ret) || ret == -EACCES)) {
        /* read-only file, corrupt bit, encrypted, dirty...: serve it read-only */
        char msg[ERR_MSG_MAX];
        int rw_ret = ret;
        snprintf(msg, sizeof msg, "%s", err_msg(ret));
        e->ro_err = -ret;
        o.read_write = false;
        ret = qcow2_open(uri, &o, &e->img);
        if (ret == 0 && rw_ret == -EROFS && qcow2_get_info(e->img)->dirty) {
            size_t n = strlen(msg);
            snprintf(msg + n, sizeof msg - n, ": POST /v1/images/%s/check with {\"repair\": \"leaks\"} (or \"all\")",
                     name);
        }
        e->ro_msg = strdup(msg);
    }
    if (ret == 0) {
        ret = check_chain(c, e->img);
        if (ret < 0) {
            qcow2_close(e->img);
            e->img = NULL;
        } else {
            e->opened = (struct catalog_identity){.size = st->size,
                                                  .mtime = st->mtime,
                                                  .mtime_nsec = st->mtime_nsec,
                                                  .ino = st->ino,
                                                  .version = st->version};
            pthread_mutex_lock(&c->lock);
            c->open++;
            e->opened.seq = ++c->open_seq;
            pthread_mutex_unlock(&c->lock);
        }
    } else if (ret == -EINVAL) {
        ret = -EUCLEAN; /* the engine's "bad format": the image is corrupt */
    } else if (ret == -ENOENT) {
        ret = -ENXIO; /* the image exists (stat said so): a file it needs is missing */
    }
    if (ret < 0) {
        if (transient(ret)) {
            entry_free(e); /* not a property of the image: do not cache */
            return ret;
        }
        e->err = -ret;
        e->msg = strdup(err_msg(ret));
        if (!e->msg) {
            entry_free(e);
            return err_fail(ENOMEM, "out of memory");
        }
    }
    *out = e;
    return 0;
}

static void unlink_entry(struct catalog *c, struct catalog_image *e)
{
    for (struct catalog_image **p = &c->list; *p; p = &(*p)->next)
        if (*p == e) {
            *p = e->next;
            break;
        }
    e->next = NULL;
    e->cached = false;
    c->count--;
}

/* Drop unused entries beyond max_open, least recently used first. Entries whose
 * last ref went are moved to *dead, closed by the caller outside the lock. */
static void evict(struct catalog *c, struct catalog_image **dead)
{
    while (c->count > c->opts.max_open) {
        struct catalog_image *lru = NULL;
        for (struct catalog_image *e = c->list; e; e = e->next)
            if (e->refs == 1 && (!lru || e->used < lru->used))
                lru = e;
        if (!lru)
            return;
        unlink_entry(c, lru);
        lru->refs = 0;
        lru->next = *dead;
        *dead = lru;
    }
}

static void free_dead(struct catalog *c, struct catalog_image *dead)
{
    while (dead) {
        struct catalog_image *next = dead->next;
        entry_free(dead);
        dead = next;
    }
}

static struct catalog_image *find(struct catalog *c, const char *name)
{
    for (struct catalog_image *e = c->list; e; e = e->next)
        if (!strcmp(e->name, name))
            return e;
    return NULL;
}

/* With c->lock held: hand out e (a ref) or its cached failure. */
static int take(struct catalog *c, struct catalog_image *e, struct catalog_image **out)
{
    e->used = ++c->tick;
    if (!e->img)
        return err_fail(e->err, "%s", e->msg);
    e->refs++;
    *out = e;
    return 0;
}

/* Whether the cached e still stands for the file: unchanged, or changed by our
 * own writers (who record the new identity when the last one leaves). */
static bool same_file(const struct catalog_image *e, const struct vfs_stat *st)
{
    return e->writers > 0 || (e->size == st->size && e->mtime == st->mtime && e->mtime_nsec == st->mtime_nsec &&
                              e->ino == st->ino && e->version == st->version);
}

static bool is_closing(const struct catalog *c, const char *name)
{
    for (const struct catalog_image *e = c->closing; e; e = e->next)
        if (!strcmp(e->name, name))
            return true;
    return false;
}

/* With c->lock held: take e off the list and drop the cache's ref. */
static void uncache(struct catalog *c, struct catalog_image *e, struct catalog_image **dead)
{
    unlink_entry(c, e);
    if (--e->refs == 0) {
        e->next = *dead;
        *dead = e;
    }
}

static int get_entry(struct catalog *c, const char *name, struct catalog_image **out, bool bypass);

int catalog_get(struct catalog *c, const char *name, struct catalog_image **out)
{
    return get_entry(c, name, out, false);
}

/* catalog_get; bypass skips the reservation check (for the reserving job and
 * for looking at other images' chains). */
static int get_entry(struct catalog *c, const char *name, struct catalog_image **out, bool bypass)
{
    int ret = catalog_valid_name(name);
    if (ret < 0)
        return ret;
    if (!bypass && (ret = check_reserved(c, name, true)) < 0)
        return ret;
    char *uri = image_uri(c, name);
    if (!uri)
        return err_fail(ENOMEM, "out of memory");
    struct vfs_stat st;
    ret = vfs_stat(uri, &st);
    if (ret == -ENOENT || (ret == 0 && st.is_dir))
        ret = err_fail(ENOENT, "no image named '%s' in the catalog", name);
    if (ret < 0)
        goto out;

    struct catalog_image *dead = NULL, *e;
    pthread_mutex_lock(&c->lock);
    e = find(c, name);
    if (e && e->written && !same_file(e, &st)) {
        /* our own writers may have changed the file between the stat above and
         * the lock; no writer runs now, so a stat under the lock tells an outside
         * change from ours (reopening on our own change would read metadata the
         * handle has not written yet) */
        struct vfs_stat again;
        if (vfs_stat(uri, &again) == 0)
            st = again;
    }
    while ((!e || !same_file(e, &st)) && is_closing(c, name)) {
        /* an old handle of this file is still writing its metadata */
        pthread_cond_wait(&c->closed, &c->lock);
        e = find(c, name);
    }
    if (!e || !same_file(e, &st)) {
        /* open without the lock: other images stay available meanwhile */
        pthread_mutex_unlock(&c->lock);
        struct catalog_image *fresh = NULL;
        ret = open_entry(c, name, uri, &st, &fresh);
        if (ret < 0)
            goto out;
        pthread_mutex_lock(&c->lock);
        e = find(c, name);
        if (e && same_file(e, &st)) { /* another thread was quicker: use its handle */
            fresh->refs = 0;
            fresh->next = dead;
            dead = fresh;
        } else {
            if (e) /* the file changed: holders keep the old handle until they put it */
                uncache(c, e, &dead);
            fresh->next = c->list;
            c->list = fresh;
            fresh->cached = true;
            c->count++;
            e = fresh;
        }
    }
    ret = take(c, e, out);
    evict(c, &dead);
    pthread_mutex_unlock(&c->lock);
    if (dead) {
        struct err_saved saved;
        err_save(&saved, ret);
        free_dead(c, dead);
        err_restore(&saved);
    }
out:
    free(uri);
    return ret;
}

void catalog_put(struct catalog_image *ci)
{
    if (!ci)
        return;
    struct catalog *c = ci->cat;
    pthread_mutex_lock(&c->lock);
    bool last = --ci->refs == 0;
    pthread_mutex_unlock(&c->lock);
    if (last)
        entry_free(ci);
}

struct qcow2_image *catalog_image_qcow2(const struct catalog_image *ci)
{
    return ci->img;
}

const char *catalog_image_name(const struct catalog_image *ci)
{
    return ci->name;
}

int catalog_image_identity(const struct catalog_image *ci, struct catalog_identity *out)
{
    *out = ci->opened; /* set before the entry was handed out, never changed after */
    return 0;
}

unsigned catalog_open_count(struct catalog *c)
{
    pthread_mutex_lock(&c->lock);
    unsigned n = c->open;
    pthread_mutex_unlock(&c->lock);
    return n;
}

void catalog_cache_stats(struct catalog *c, uint64_t *hits, uint64_t *misses)
{
    pthread_mutex_lock(&c->lock);
    *hits = c->closed_hits;
    *misses = c->closed_misses;
    for (struct catalog_image *e = c->list; e; e = e->next)
        if (e->img) {
            uint64_t h, m;
            qcow2_cache_stats(e->img, &h, &m);
            *hits += h;
            *misses += m;
        }
    pthread_mutex_unlock(&c->lock);
}

int catalog_storage_stats(int (*cb)(void *ctx, const char *scheme, const char *name, uint64_t value), void *ctx)
{
    return vfs_stats(cb, ctx);
}

bool catalog_image_writable(const struct catalog_image *ci)
{
    return ci->rw;
}

/* ---- writing ---- */

/* -EBUSY when an image of the catalog other than name has the file target_uri in
 * its backing chain; 0 otherwise. Images that cannot be opened are skipped. */
static int find_user(struct catalog *c, const char *name, const char *target_uri)
{
    char **names;
    size_t n;
    int ret = catalog_list(c, &names, &n);
    if (ret < 0)
        return ret;
    for (size_t i = 0; i < n && ret == 0; i++) {
        struct catalog_image *ci;
        if (!strcmp(names[i], name) || get_entry(c, names[i], &ci, true) < 0)
            continue;
        for (struct qcow2_image *l = qcow2_backing(ci->img); l; l = qcow2_backing(l))
            if (!strcmp(qcow2_get_info(l)->uri, target_uri)) {
                ret = err_fail(EBUSY, "image '%s' is in the backing chain of image '%s'", name, names[i]);
                break;
            }
        catalog_put(ci);
    }
    if (ret == 0)
        err_clear();
    catalog_names_free(names, n);
    return ret;
}

static void writer_enter(struct catalog_image *ci)
{
    pthread_mutex_lock(&ci->cat->lock);
    ci->writers++;
    ci->written = true;
    pthread_mutex_unlock(&ci->cat->lock);
}

static void writer_leave(struct catalog_image *ci)
{
    struct catalog *c = ci->cat;
    pthread_mutex_lock(&c->lock);
    bool last = --ci->writers == 0;
    if (last) {
        /* our own changes: the file's new identity is still this handle. Under
         * the lock, so no get compares against a stale identity meanwhile. */
        struct vfs_stat st;
        if (vfs_stat(ci->uri, &st) == 0) {
            ci->size = st.size;
            ci->mtime = st.mtime;
            ci->mtime_nsec = st.mtime_nsec;
            ci->ino = st.ino;
            ci->version = st.version;
        }
    }
    pthread_mutex_unlock(&c->lock);
    if (last)
        notify(c, "image-changed", ci->name);
}

/* writer_enter for a client's write: refused while the container is being
 * downloaded, so a download is one consistent file, and while a job has
 * reserved the image (looked at again here, under the lock catalog_reserve
 * takes, since the caller's first look). */
static int writer_try_enter(struct catalog_image *ci)
{
    struct catalog *c = ci->cat;
    int ret = 0;
    pthread_mutex_lock(&c->lock);
    unsigned downloads = ci->downloads;
    struct reservation *r = reserved(c, ci->name);
    if (r)
        ret = err_fail(EBUSY, "image '%s' is busy: %s", ci->name, r->owner);
    else if (downloads)
        ret = err_fail(EBUSY, "image '%s' is being downloaded (GET .../file, %u running); write after it ends",
                       ci->name, downloads);
    else {
        ci->writers++;
        ci->written = true;
    }
    pthread_mutex_unlock(&c->lock);
    return ret;
}

/* Why ci, open read-only, cannot be written: a file qcowd may not write is
 * -EROFS (409), an image property keeps its own errno (the corrupt bit -EUCLEAN,
 * encryption -ENOTSUP: 422), so the client learns what is wrong with it. */
static int refuse_write(const struct catalog_image *ci)
{
    const char *why = ci->ro_msg ? ci->ro_msg : "opened read-only";
    int e = ci->ro_err;
    if (!e || e == EROFS || e == EACCES || e == EPERM || transient(-e))
        return err_fail(EROFS, "image '%s' is read-only: %s", ci->name, why);
    return err_fail(e, "image '%s' cannot be written: %s", ci->name, why);
}

int catalog_get_writable(struct catalog *c, const char *name, struct catalog_image **out)
{
    struct catalog_image *ci;
    int ret = catalog_valid_name(name);
    if (ret == 0)
        ret = check_reserved(c, name, false);
    if (ret == 0)
        ret = catalog_get(c, name, &ci);
    if (ret < 0)
        return ret;
    if (!ci->rw) {
        ret = refuse_write(ci);
        catalog_put(ci);
        return ret;
    }
    ret = find_user(c, name, qcow2_get_info(ci->img)->uri);
    if (ret == 0)
        ret = writer_try_enter(ci);
    if (ret < 0) {
        catalog_put(ci);
        return ret;
    }
    *out = ci;
    return 0;
}

void catalog_put_writable(struct catalog_image *ci)
{
    if (!ci)
        return;
    writer_leave(ci);
    catalog_put(ci);
}

/* Flush the pending metadata of ci's handle, if any, so the file can be read by
 * others; as a writer, so the change does not look like someone else's. */
static int flush_own(struct catalog_image *ci)
{
    pthread_mutex_lock(&ci->cat->lock);
    bool written = ci->written;
    pthread_mutex_unlock(&ci->cat->lock);
    if (!written || !ci->rw)
        return 0;
    writer_enter(ci);
    int ret = qcow2_flush(ci->img);
    writer_leave(ci);
    return ret;
}

/* Drop the cache's entry for name (the file was removed or replaced by us). */
static void forget(struct catalog *c, const char *name)
{
    struct catalog_image *dead = NULL;
    pthread_mutex_lock(&c->lock);
    struct catalog_image *e = find(c, name);
    if (e)
        uncache(c, e, &dead);
    pthread_mutex_unlock(&c->lock);
    free_dead(c, dead);
}

/* A new temporary URI in the catalog folder: ".KIND-NAME@HOST-PID-SEQ.tmp",
 * which is never an image name (it starts with '.' and lacks the suffix), HOST
 * being host_id()'s. */
static char *temp_uri(struct catalog *c, const char *kind, const char *name)
{
    pthread_mutex_lock(&c->lock);
    unsigned long seq = ++c->seq;
    pthread_mutex_unlock(&c->lock);
    char *uri;
    const char *sep = c->root[strlen(c->root) - 1] == '/' ? "" : "/";
    if (asprintf(&uri, "%s%s.%s-%s@%s-%ld-%lu.tmp", c->root, sep, kind, name, c->host, (long)getpid(), seq) < 0)
        return NULL;
    return uri;
}

/* Where kill(pid, 0) means something: this boot of this kernel, in this pid
 * namespace. Several daemons on one bucket (other machines, other containers)
 * write temporary names too, and a pid of theirs says nothing here. So HOST is
 * 16 hex digits of the kernel's random boot id, '.', and the pid namespace's
 * inode in hex; without /proc, 'r' and random digits (no name is ever judged
 * by its pid then, only by its age). */
static void host_id(char *out, size_t cap)
{
    char boot[64] = "", hex[17] = "";
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f) {
        if (!fgets(boot, sizeof boot, f))
            boot[0] = '\0';
        fclose(f);
    }
    size_t n = 0;
    for (const char *p = boot; *p && n < 16; p++)
        if ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))
            hex[n++] = *p;
    hex[n] = '\0';
    struct stat ns;
    if (n == 16 && stat("/proc/self/ns/pid", &ns) == 0) {
        snprintf(out, cap, "%s.%llx", hex, (unsigned long long)ns.st_ino);
        return;
    }
    unsigned long long r = 0;
    f = fopen("/dev/urandom", "r");
    if (!f || fread(&r, sizeof r, 1, f) != 1)
        r = (unsigned long long)time(NULL) ^ ((unsigned long long)getpid() << 32);
    if (f)
        fclose(f);
    snprintf(out, cap, "r%016llx", r);
}

/* Temporary names older than this (by their mtime) are stale whoever made them. */
#define TEMP_MAX_AGE (24 * 3600)

static int64_t temp_max_age(void)
{
    const char *v = getenv("QCOWD_TEST_TEMP_AGE"); /* the tests' seam: objects cannot be aged */
    return v && *v ? strtoll(v, NULL, 10) : TEMP_MAX_AGE;
}

/* Whether file is a temporary name of temp_uri left behind: ".create-",
 * ".upload-" or ".convert-", NAME, then "@HOST-PID-SEQ.tmp" (names from before
 * hosts were recorded lack "@HOST"). Stale when HOST is this one and its
 * process is gone, or when it has not changed for TEMP_MAX_AGE (any host: a
 * machine gone for good, or this one before a reboot). why gets the reason. */
/* The length of the ".KIND-" prefix when file starts as a temporary name of a
 * create, an upload or a convert, else 0. */
static size_t temp_prefix(const char *file)
{
    static const char *const kinds[] = {".create-", ".upload-", ".convert-"};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (!strncmp(file, kinds[i], strlen(kinds[i])))
            return strlen(kinds[i]);
    return 0;
}

static bool is_temp_name(const char *file)
{
    return temp_prefix(file) > 0;
}

static bool stale_temp(struct catalog *c, const char *file, char *why, size_t cap)
{
    size_t pre = temp_prefix(file);
    if (!pre)
        return false;
    size_t n = strlen(file);
    if (n < pre + 4 || strcmp(file + n - 4, ".tmp"))
        return false;
    /* PID and SEQ are the last two '-' fields (names may hold '-' too; '@' never) */
    const char *end = file + n - 4, *p = end;
    int dashes = 0;
    while (p > file + pre && dashes < 2)
        if (*--p == '-')
            dashes++;
    if (dashes < 2)
        return false;
    char *after;
    long pid = strtol(p + 1, &after, 10);
    if (*after != '-' || pid <= 0)
        return false;
    const char *at = strrchr(file, '@');
    char host[64] = "";
    if (at && at < p && (size_t)(p - at - 1) < sizeof host)
        snprintf(host, sizeof host, "%.*s", (int)(p - at - 1), at + 1);
    if (!strcmp(host, c->host) && pid != (long)getpid() && kill((pid_t)pid, 0) < 0 && errno == ESRCH) {
        snprintf(why, cap, "its process %ld on this host is gone", pid);
        return true;
    }
    char *uri = catalog_path(c, file);
    struct vfs_stat st;
    int r = uri ? vfs_stat(uri, &st) : -ENOMEM;
    free(uri);
    err_clear();
    int64_t age = r == 0 && st.mtime > 0 ? (int64_t)time(NULL) - st.mtime : -1;
    if (age < 0 || age <= temp_max_age())
        return false;
    snprintf(why, cap, "not changed for %lld hours; made by process %ld on %s", (long long)(age / 3600), pid,
             !host[0] ? "a host not recorded" : !strcmp(host, c->host) ? "this host" : "another host");
    return true;
}

/* Temporary names of the folder (candidates, judged after the listing). */
static int collect_temp(void *ctx, const char *file)
{
    struct name_list *l = ctx;
    if (!is_temp_name(file))
        return 0;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        char **v = realloc(l->v, cap * sizeof *v);
        if (!v)
            return -ENOMEM;
        l->v = v;
        l->cap = cap;
    }
    if (!(l->v[l->n] = strdup(file)))
        return -ENOMEM;
    l->n++;
    return 0;
}

int catalog_clean_temp(struct catalog *c, void (*note)(void *ctx, const char *file, const char *why, int err),
                       void *ctx)
{
    struct name_list l = {0};
    int ret = vfs_list(c->root, collect_temp, &l);
    if (ret < 0) {
        catalog_names_free(l.v, l.n);
        return ret == -ENOMEM ? err_fail(ENOMEM, "out of memory") : err_prefix(ret, "listing the catalog");
    }
    int removed = 0;
    for (size_t i = 0; i < l.n; i++) {
        char why[160];
        if (!stale_temp(c, l.v[i], why, sizeof why))
            continue;
        char *uri = catalog_path(c, l.v[i]);
        if (!uri) {
            ret = err_fail(ENOMEM, "out of memory");
            break;
        }
        int r = vfs_remove(uri);
        free(uri);
        if (r == 0)
            removed++;
        if (note)
            note(ctx, l.v[i], why, r);
    }
    catalog_names_free(l.v, l.n);
    return ret < 0 ? ret : removed;
}

/* ---- budgets ---- */

/* "1.5 GiB" for the messages that name a budget. */
static void human(uint64_t v, char *out, size_t cap)
{
    static const char *const units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    unsigned u = 0;
    double d = (double)v;
    while (d >= 1024 && u < 6) {
        d /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(out, cap, "%llu bytes", (unsigned long long)v);
    else
        snprintf(out, cap, "%.4g %s", d, units[u]);
}

static int over_virtual(const struct catalog *c, int err, uint64_t size)
{
    char a[32], b[32];
    human(size, a, sizeof a);
    human(c->opts.max_virtual_size, b, sizeof b);
    return err_fail(err, "a virtual size of %s is over --max-virtual-size (%s)", a, b);
}

struct usage {
    const char *root;
    uint64_t bytes;
};

static int add_file(void *ctx, const char *file)
{
    struct usage *u = ctx;
    char *uri;
    if (asprintf(&uri, "%s/%s", u->root, file) < 0)
        return -ENOMEM;
    struct vfs_stat st;
    if (vfs_stat(uri, &st) == 0 && !st.is_dir)
        u->bytes += st.size;
    free(uri);
    return 0;
}

/* One listing and a stat per file: called per upload, create and convert,
 * never per read or write. */
int catalog_check_space(struct catalog *c, uint64_t more)
{
    if (c->opts.max_catalog == CATALOG_UNLIMITED)
        return 0;
    struct usage u = {.root = c->root};
    int ret = vfs_list(c->root, add_file, &u);
    if (ret < 0)
        return ret == -ENOMEM ? err_fail(ENOMEM, "out of memory") : err_prefix(ret, "listing the catalog");
    err_clear();
    if (u.bytes <= c->opts.max_catalog && more <= c->opts.max_catalog - u.bytes)
        return 0;
    char used[32], cap[32], add[32];
    human(u.bytes, used, sizeof used);
    human(c->opts.max_catalog, cap, sizeof cap);
    human(more, add, sizeof add);
    return err_fail(ENOSPC, "the catalog holds %s%s%s: over --max-catalog (%s)", used, more ? " and needs " : "",
                    more ? add : "", cap);
}

static int exists(const char *uri, const char *name)
{
    struct vfs_stat st;
    int ret = vfs_stat(uri, &st);
    if (ret == 0)
        return err_fail(EEXIST, "an image named '%s' already exists", name);
    if (ret != -ENOENT)
        return ret;
    err_clear();
    return 0;
}

int catalog_create(struct catalog *c, const char *name, const struct qcow2_create_opts *opts)
{
    int ret = catalog_valid_name(name);
    if (ret < 0)
        return ret;
    if (opts->size > c->opts.max_virtual_size)
        return over_virtual(c, EINVAL, opts->size);
    struct qcow2_create_opts o = *opts;
    o.max_meta_bytes = c->opts.max_meta_bytes; /* an image the catalog could not open is not made */
    char backing[CATALOG_NAME_MAX + sizeof CATALOG_SUFFIX];
    if (o.backing_format && strcmp(o.backing_format, "qcow2"))
        return err_fail(EINVAL, "backing-fmt must be \"qcow2\": catalog images are qcow2");
    if (o.data_file)
        return err_fail(EINVAL, "external data files are not supported in the catalog");
    if (o.backing_file) {
        if (catalog_valid_name(o.backing_file) < 0)
            return err_prefix(-EINVAL, "backing-file");
        struct catalog_image *bi;
        ret = catalog_get(c, o.backing_file, &bi);
        if (ret == -ENOENT)
            return err_fail(EINVAL, "backing-file: no image named '%s' in the catalog", o.backing_file);
        if (ret < 0)
            return err_prefix(ret, "backing-file '%s'", o.backing_file);
        pthread_mutex_lock(&c->lock);
        unsigned writers = bi->writers;
        pthread_mutex_unlock(&c->lock);
        if (writers)
            ret = err_fail(EBUSY, "backing-file '%s' is being written", o.backing_file);
        else /* the new image reads it from the disk */
            ret = flush_own(bi);
        catalog_put(bi);
        if (ret < 0)
            return ret;
        snprintf(backing, sizeof backing, "%s%s", o.backing_file, CATALOG_SUFFIX);
        o.backing_file = backing;
        o.backing_format = "qcow2";
    } else if (o.backing_format) {
        return err_fail(EINVAL, "backing-fmt without backing-file");
    }
    char *uri = image_uri(c, name), *tmp = temp_uri(c, "create", name);
    if (!uri || !tmp) {
        ret = err_fail(ENOMEM, "out of memory");
        goto out;
    }
    /* built under its temporary name with no lock held (a preallocation writes
     * for as long as the disk is large); the lock covers the name's check and
     * the rename only */
    ret = exists(uri, name);
    if (ret == 0)
        ret = catalog_check_space(c, 0);
    if (ret == 0)
        ret = qcow2_create(tmp, &o);
    if (ret == 0) {
        pthread_mutex_lock(&c->create_lock);
        ret = exists(uri, name);
        if (ret == 0)
            ret = vfs_rename(tmp, uri);
        pthread_mutex_unlock(&c->create_lock);
    }
    if (ret < 0) {
        struct err_saved saved;
        err_save(&saved, ret);
        vfs_remove(tmp);
        err_restore(&saved);
    }
    if (ret == 0) {
        forget(c, name);
        notify(c, "image-created", name);
    }
out:
    free(uri);
    free(tmp);
    return ret;
}

int catalog_remove(struct catalog *c, const char *name)
{
    int ret = catalog_valid_name(name);
    if (ret < 0)
        return ret;
    char *uri = image_uri(c, name);
    if (!uri)
        return err_fail(ENOMEM, "out of memory");
    pthread_mutex_lock(&c->create_lock);
    struct vfs_stat st;
    ret = check_reserved(c, name, false);
    if (ret == 0)
        ret = vfs_stat(uri, &st);
    if (ret == -ENOENT || (ret == 0 && st.is_dir))
        ret = err_fail(ENOENT, "no image named '%s' in the catalog", name);
    if (ret == 0) {
        /* the canonical name, as the layers of other chains show it */
        char *canon = realpath(uri, NULL);
        ret = find_user(c, name, canon ? canon : uri);
        free(canon);
    }
    if (ret == 0)
        ret = vfs_remove(uri);
    pthread_mutex_unlock(&c->create_lock);
    if (ret == 0) {
        forget(c, name);
        notify(c, "image-deleted", name);
    }
    free(uri);
    return ret;
}

/* ---- upload ---- */

/* The first bytes of a qcow2 header: magic, version, cluster bits, disk size. */
#define UPLOAD_HEAD 32

struct catalog_upload {
    struct catalog *cat;
    char *name, *uri, *tmp;
    struct vfs_file *f;
    uint64_t off; /* bytes written */
    unsigned char head[UPLOAD_HEAD];
};

int catalog_upload_begin(struct catalog *c, const char *name, uint64_t length, struct catalog_upload **out)
{
    int ret = catalog_valid_name(name);
    if (ret < 0)
        return ret;
    char a[32], b[32];
    if (length != UINT64_MAX && length > c->opts.max_upload) {
        human(length, a, sizeof a);
        human(c->opts.max_upload, b, sizeof b);
        return err_fail(EFBIG, "an upload of %s is over --max-upload (%s)", a, b);
    }
    struct catalog_upload *u = calloc(1, sizeof *u);
    if (!u || !(u->name = strdup(name)) || !(u->uri = image_uri(c, name)) || !(u->tmp = temp_uri(c, "upload", name))) {
        ret = err_fail(ENOMEM, "out of memory");
        goto fail;
    }
    u->cat = c;
    ret = exists(u->uri, name);
    if (ret == 0)
        ret = catalog_check_space(c, length == UINT64_MAX ? 0 : length);
    if (ret == 0)
        ret = vfs_open(u->tmp, VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL, &u->f);
    if (ret < 0)
        goto fail;
    *out = u;
    return 0;
fail:
    if (u) {
        free(u->name);
        free(u->uri);
        free(u->tmp);
        free(u);
    }
    return ret;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The header's first bytes, as far as they came (have of them): refused at
 * once when they cannot start a qcow2 image the catalog would take. */
static int check_head(const struct catalog *c, const unsigned char *h, size_t have)
{
    static const unsigned char magic[4] = {'Q', 'F', 'I', 0xfb};
    for (size_t i = 0; i < have && i < 4; i++)
        if (h[i] != magic[i])
            return err_fail(EUCLEAN, "not a qcow2 image: its first bytes are not the qcow2 magic \"QFI\\xfb\"");
    if (have >= 8 && be32(h + 4) != 2 && be32(h + 4) != 3)
        return err_fail(EUCLEAN, "not a valid qcow2 image: version %u (2 or 3 expected)", be32(h + 4));
    if (have >= 24 && (be32(h + 20) < 9 || be32(h + 20) > 21))
        return err_fail(EUCLEAN, "not a valid qcow2 image: cluster_bits %u (9 to 21 expected)", be32(h + 20));
    if (have >= 32) {
        uint64_t size = (uint64_t)be32(h + 24) << 32 | be32(h + 28);
        if (size > c->opts.max_virtual_size)
            return over_virtual(c, ENOTSUP, size);
    }
    return 0;
}

int catalog_upload_write(struct catalog_upload *u, const void *buf, size_t len)
{
    const struct catalog *c = u->cat;
    if (len > c->opts.max_upload || u->off > c->opts.max_upload - len) {
        char b[32];
        human(c->opts.max_upload, b, sizeof b);
        return err_fail(EFBIG, "the upload is over --max-upload (%s)", b);
    }
    if (u->off < UPLOAD_HEAD) {
        size_t k = len < UPLOAD_HEAD - u->off ? len : UPLOAD_HEAD - (size_t)u->off;
        memcpy(u->head + u->off, buf, k);
        int ret = check_head(c, u->head, (size_t)u->off + k);
        if (ret < 0)
            return ret;
    }
    int ret = vfs_pwrite(u->f, buf, len, u->off);
    if (ret == 0)
        u->off += len;
    return ret;
}

static void upload_free(struct catalog_upload *u, bool keep)
{
    if (u->f)
        vfs_close(u->f);
    if (!keep) {
        /* the message of what failed the upload outlives the removal */
        struct err_saved saved;
        err_save(&saved, -EIO);
        vfs_remove(u->tmp);
        err_restore(&saved);
    }
    free(u->name);
    free(u->uri);
    free(u->tmp);
    free(u);
}

void catalog_upload_abort(struct catalog_upload *u)
{
    if (u)
        upload_free(u, false);
}

/* The uploaded file opens as qcow2 inside the catalog, with nothing that reaches
 * another store: its backing file must be a catalog image by its plain name. */
static int validate_upload(struct catalog *c, const char *uri)
{
    struct qcow2_open_opts o = {
        .contained = true,
        .l2_cache_bytes = 1u << 20,
        .max_meta_bytes = c->opts.max_meta_bytes,
    };
    struct qcow2_image *img;
    int ret = qcow2_open(uri, &o, &img);
    if (ret == -EINVAL)
        return err_prefix(-EUCLEAN, "not a valid qcow2 image");
    if (ret == -ENOENT)
        return -ENXIO;
    if (ret < 0)
        return ret;
    const struct qcow2_info *in = qcow2_get_info(img);
    size_t sl = strlen(CATALOG_SUFFIX);
    if (in->virtual_size > c->opts.max_virtual_size) {
        ret = over_virtual(c, ENOTSUP, in->virtual_size);
    } else if (in->data_file) {
        ret = err_fail(ENOTSUP, "the image has an external data file ('%s'); the catalog takes self-contained images",
                       in->data_file);
    } else if (in->backing_file) {
        size_t n = strlen(in->backing_file);
        char stem[CATALOG_NAME_MAX + 1];
        bool ok = n > sl && n - sl <= CATALOG_NAME_MAX && !strcmp(in->backing_file + n - sl, CATALOG_SUFFIX);
        if (ok) {
            memcpy(stem, in->backing_file, n - sl);
            stem[n - sl] = '\0';
            ok = catalog_valid_name(stem) == 0;
        }
        if (!ok)
            ret = err_fail(EPERM, "backing file '%s' is not an image of the catalog (NAME%s)", in->backing_file,
                           CATALOG_SUFFIX);
    }
    if (ret == 0)
        ret = check_chain(c, img);
    qcow2_close(img);
    if (ret == 0)
        err_clear();
    return ret;
}

int catalog_upload_commit(struct catalog_upload *u)
{
    struct catalog *c = u->cat;
    int ret = vfs_flush(u->f);
    vfs_close(u->f);
    u->f = NULL;
    if (ret == 0 && u->off < UPLOAD_HEAD)
        ret = u->off ? err_fail(EUCLEAN, "not a qcow2 image: %llu bytes, shorter than a header",
                                (unsigned long long)u->off)
                     : err_fail(EUCLEAN, "not a qcow2 image: the upload is empty");
    if (ret == 0)
        ret = catalog_check_space(c, 0); /* the folder with this upload in it */
    if (ret == 0)
        ret = validate_upload(c, u->tmp);
    if (ret == 0) {
        pthread_mutex_lock(&c->create_lock);
        ret = exists(u->uri, u->name);
        if (ret == 0)
            ret = vfs_rename(u->tmp, u->uri);
        pthread_mutex_unlock(&c->create_lock);
    }
    if (ret == 0) {
        forget(c, u->name);
        notify(c, "image-created", u->name);
    }
    upload_free(u, ret == 0);
    return ret;
}

/* ---- download ---- */

struct catalog_file {
    struct vfs_file *f;
    struct catalog_image *ci; /* holds writers off while set (NULL: a broken image) */
};

static void download_leave(struct catalog_image *ci);

/* Stop writes to ci for a download: -EBUSY while a write runs, else the hold is
 * taken and the handle's pending metadata flushed, so the file is whole. */
static int download_enter(struct catalog_image *ci)
{
    struct catalog *c = ci->cat;
    pthread_mutex_lock(&c->lock);
    unsigned writers = ci->writers;
    if (!writers) {
        ci->downloads++;
        ci->writers++; /* the flush below is our own change */
    }
    bool written = ci->written;
    pthread_mutex_unlock(&c->lock);
    if (writers)
        return err_fail(EBUSY, "image '%s' is being written; download it after the write ends", ci->name);
    int ret = written && ci->rw ? qcow2_flush(ci->img) : 0;
    writer_leave(ci);
    if (ret < 0)
        download_leave(ci);
    return ret;
}

static void download_leave(struct catalog_image *ci)
{
    pthread_mutex_lock(&ci->cat->lock);
    ci->downloads--;
    pthread_mutex_unlock(&ci->cat->lock);
}

int catalog_file_open(struct catalog *c, const char *name, struct catalog_file **out, uint64_t *size)
{
    struct catalog_file *f = calloc(1, sizeof *f);
    if (!f)
        return err_fail(ENOMEM, "out of memory");
    int ret = catalog_get(c, name, &f->ci);
    if (ret < 0 && ret != -EUCLEAN && ret != -EPERM && ret != -ENXIO && ret != -ELOOP && ret != -ENOTSUP) {
        free(f);
        return ret; /* a broken image can still be downloaded, to be looked at */
    }
    if (ret == 0) {
        ret = download_enter(f->ci);
        if (ret < 0) {
            catalog_put(f->ci);
            free(f);
            return ret;
        }
    }
    char *uri = image_uri(c, name);
    ret = uri ? vfs_open(uri, VFS_O_RDONLY, &f->f) : err_fail(ENOMEM, "out of memory");
    if (ret == 0)
        ret = vfs_size(f->f, size);
    free(uri);
    if (ret < 0) {
        struct err_saved saved;
        err_save(&saved, ret);
        catalog_file_close(f);
        return err_restore(&saved);
    }
    err_clear();
    *out = f;
    return 0;
}

int catalog_file_pread(struct catalog_file *f, void *buf, size_t len, uint64_t off)
{
    return vfs_pread(f->f, buf, len, off);
}

void catalog_file_close(struct catalog_file *f)
{
    if (!f)
        return;
    if (f->f)
        vfs_close(f->f);
    if (f->ci) {
        download_leave(f->ci);
        catalog_put(f->ci);
    }
    free(f);
}

/* ---- jobs ---- */

int catalog_reserve(struct catalog *c, const char *name, bool exclusive, const char *owner)
{
    int ret = catalog_valid_name(name);
    if (ret < 0)
        return ret;
    struct reservation *r = calloc(1, sizeof *r);
    if (!r || !(r->name = strdup(name)) || !(r->owner = strdup(owner))) {
        if (r)
            free(r->name);
        free(r);
        return err_fail(ENOMEM, "out of memory");
    }
    r->exclusive = exclusive;
    pthread_mutex_lock(&c->lock);
    struct reservation *old = reserved(c, name);
    struct catalog_image *e = find(c, name);
    if (old)
        ret = err_fail(EBUSY, "image '%s' is busy: %s", name, old->owner);
    else if (e && e->writers)
        ret = err_fail(EBUSY, "image '%s' is being written", name);
    if (ret == 0) {
        r->next = c->reserved;
        c->reserved = r;
    }
    pthread_mutex_unlock(&c->lock);
    if (ret < 0) {
        free(r->name);
        free(r->owner);
        free(r);
    }
    return ret;
}

void catalog_release(struct catalog *c, const char *name)
{
    pthread_mutex_lock(&c->lock);
    for (struct reservation **p = &c->reserved; *p; p = &(*p)->next)
        if (!strcmp((*p)->name, name)) {
            struct reservation *r = *p;
            *p = r->next;
            free(r->name);
            free(r->owner);
            free(r);
            break;
        }
    pthread_mutex_unlock(&c->lock);
}

int catalog_get_reserved(struct catalog *c, const char *name, struct catalog_image **out)
{
    struct catalog_image *ci;
    int ret = get_entry(c, name, &ci, true);
    if (ret < 0)
        return ret;
    if (!ci->rw) {
        ret = refuse_write(ci);
        catalog_put(ci);
        return ret;
    }
    writer_enter(ci);
    *out = ci;
    return 0;
}

int catalog_flush(struct catalog *c, const char *name)
{
    pthread_mutex_lock(&c->lock);
    struct catalog_image *e = find(c, name);
    if (e && e->img)
        e->refs++;
    else
        e = NULL;
    pthread_mutex_unlock(&c->lock);
    if (!e)
        return 0;
    int ret = flush_own(e);
    catalog_put(e);
    return ret;
}

uint64_t catalog_max_meta(const struct catalog *c)
{
    return c->opts.max_meta_bytes;
}

void catalog_drop(struct catalog *c, const char *name)
{
    forget(c, name);
}

char *catalog_uri(struct catalog *c, const char *name)
{
    return image_uri(c, name);
}

char *catalog_temp(struct catalog *c, const char *kind, const char *name)
{
    return temp_uri(c, kind, name);
}

int catalog_install(struct catalog *c, const char *tmp, const char *name)
{
    int ret = catalog_valid_name(name);
    if (ret < 0)
        return ret;
    char *uri = image_uri(c, name);
    if (!uri)
        return err_fail(ENOMEM, "out of memory");
    pthread_mutex_lock(&c->create_lock);
    ret = exists(uri, name);
    if (ret == 0)
        ret = vfs_rename(tmp, uri);
    pthread_mutex_unlock(&c->create_lock);
    free(uri);
    if (ret == 0) {
        forget(c, name);
        notify(c, "image-created", name);
    }
    return ret;
}

void catalog_set_notify(struct catalog *c, catalog_notify_fn fn, void *opaque)
{
    c->notify = fn;
    c->notify_opaque = opaque;
}

char *catalog_path(struct catalog *c, const char *file)
{
    char *uri;
    const char *sep = c->root[strlen(c->root) - 1] == '/' ? "" : "/";
    if (asprintf(&uri, "%s%s%s", c->root, sep, file) < 0)
        return NULL;
    return uri;
}

void catalog_changed(struct catalog *c, const char *name)
{
    notify(c, "image-changed", name);
}
