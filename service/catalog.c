/* catalog.c: image names -> files "NAME.qcow2" in the catalog folder, opened
 * through the engine and cached as refcounted handles (failures cached too). */
#include "catalog.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "err.h"
#include "qcow2.h"
#include "vfs.h"

/* One cached image, or one cached failure to open it (img == NULL). */
struct catalog_image {
    struct catalog *cat;
    char *name;
    uint64_t size; /* identity of the file when opened: size and mtime */
    int64_t mtime;
    struct qcow2_image *img; /* NULL: opening failed with err/msg */
    int err;                 /* positive errno of the failure */
    char *msg;               /* its message */
    unsigned refs;           /* holders, the cache included (under cat->lock) */
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
};

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
    if (ret < 0) {
        ret = err_prefix(ret, "catalog folder %s", root);
        goto fail;
    }
    if (!st.is_dir) {
        ret = err_fail(ENOTDIR, "catalog folder %s is not a folder", root);
        goto fail;
    }
    pthread_mutex_init(&c->lock, NULL);
    *out = c;
    return 0;
fail:
    free(c->root);
    free(c);
    return ret;
}

static void entry_free(struct catalog_image *e)
{
    if (e->img)
        qcow2_close(e->img);
    free(e->name);
    free(e->msg);
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

/* Open name into a new entry (one ref, not cached); failures give an entry too. */
static int open_entry(struct catalog *c, const char *name, const char *uri, const struct vfs_stat *st,
                      struct catalog_image **out)
{
    struct catalog_image *e = calloc(1, sizeof *e);
    if (!e || !(e->name = strdup(name))) {
        free(e);
        return err_fail(ENOMEM, "out of memory");
    }
    e->cat = c;
    e->size = st->size;
    e->mtime = st->mtime;
    e->refs = 1;
    struct qcow2_open_opts o = {
        .contained = true,
        .l2_cache_bytes = c->opts.l2_cache_bytes,
        .max_meta_bytes = c->opts.max_meta_bytes,
    };
    int ret = qcow2_open(uri, &o, &e->img);
    if (ret == 0) {
        ret = check_chain(c, e->img);
        if (ret < 0) {
            qcow2_close(e->img);
            e->img = NULL;
        } else {
            pthread_mutex_lock(&c->lock);
            c->open++;
            pthread_mutex_unlock(&c->lock);
        }
    } else if (ret == -EINVAL) {
        ret = -EUCLEAN; /* the engine's "bad format": the image is corrupt */
    } else if (ret == -ENOENT) {
        ret = -ENXIO; /* the image exists (stat said so): a file it needs is missing */
    }
    if (ret < 0) {
        if (ret == -ENOMEM) {
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
        if (dead->img) {
            pthread_mutex_lock(&c->lock);
            c->open--;
            pthread_mutex_unlock(&c->lock);
        }
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

static bool same_file(const struct catalog_image *e, const struct vfs_stat *st)
{
    return e->size == st->size && e->mtime == st->mtime;
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

int catalog_get(struct catalog *c, const char *name, struct catalog_image **out)
{
    int ret = catalog_valid_name(name);
    if (ret < 0)
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
        char msg[ERR_MSG_MAX];
        snprintf(msg, sizeof msg, "%s", err_msg(ret));
        free_dead(c, dead);
        if (ret < 0)
            err_fail(-ret, "%s", msg);
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
    if (last && ci->img)
        c->open--;
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

unsigned catalog_open_count(struct catalog *c)
{
    pthread_mutex_lock(&c->lock);
    unsigned n = c->open;
    pthread_mutex_unlock(&c->lock);
    return n;
}
