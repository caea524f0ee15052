/* cache.c: the cache of open images: names opened through the engine into
 * refcounted handles (failures cached too), get/put, LRU eviction, file changes. */
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

#include "catalog_int.h"
#include "err.h"
#include "qcow2.h"
#include "vfs.h"

/* Free e (off the list, no refs). Its image is closed while e sits on the
 * closing list, so nobody opens the same file again before the close has written
 * the handle's pending metadata. */
void cat_entry_free(struct catalog_image *e)
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
    pthread_mutex_destroy(&e->ident_lock);
    free(e->name);
    free(e->uri);
    free(e->msg);
    free(e->ro_msg);
    free(e);
}

/* ---- the cache ---- */

/* Whether uri lies inside the catalog folder (an image being made there, by
 * its final name). */
static bool inside(const struct catalog *c, const char *uri)
{
    char *final = vfs_pending_final(uri);
    if (final)
        uri = final;
    size_t n = strlen(c->root);
    bool in = !strncmp(uri, c->root, n) && (c->root[n - 1] == '/' || uri[n] == '/');
    free(final);
    return in;
}

/* The engine refuses absolute and ".." names already; this also catches a name
 * that reaches outside through a symbolic link, since layer URIs are canonical. */
int cat_check_chain(const struct catalog *c, struct qcow2_image *img)
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
bool cat_transient(int err)
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
    pthread_mutex_init(&e->ident_lock, NULL);
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
    if (ret < 0 && ret != -ENOENT && (!cat_transient(ret) || ret == -EACCES)) {
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
        ret = cat_check_chain(c, e->img);
        /* the file may have changed: what it names as its backing file now */
        cat_users_set(c, name, qcow2_get_info(e->img)->backing_file);
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
        if (cat_transient(ret)) {
            cat_entry_free(e); /* not a property of the image: do not cache */
            return ret;
        }
        e->err = -ret;
        e->msg = strdup(err_msg(ret));
        if (!e->msg) {
            cat_entry_free(e);
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
        cat_entry_free(dead);
        dead = next;
    }
}

struct catalog_image *cat_find(struct catalog *c, const char *name)
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

int catalog_get(struct catalog *c, const char *name, struct catalog_image **out)
{
    return cat_get_entry(c, name, out, false);
}

/* catalog_get; bypass skips the reservation check (for the reserving job and
 * for looking at other images' chains). */
int cat_get_entry(struct catalog *c, const char *name, struct catalog_image **out, bool bypass)
{
    int ret = catalog_valid_name(name);
    if (ret < 0)
        return ret;
    if (!bypass && (ret = cat_admit_read(c, name)) < 0)
        return ret;
    char *uri = cat_image_uri(c, name);
    if (!uri)
        return err_fail(ENOMEM, "out of memory");
    /* where the recorded identity of a cached handle stood before the stat */
    pthread_mutex_lock(&c->lock);
    struct catalog_image *seen = cat_find(c, name);
    uint64_t seq0 = seen ? seen->ident_seq : 0;
    pthread_mutex_unlock(&c->lock);
    struct vfs_stat st;
    ret = vfs_stat(uri, &st);
    if (ret == -ENOENT || (ret == 0 && st.is_dir))
        ret = err_fail(ENOENT, "no image named '%s' in the catalog", name);
    if (ret < 0)
        goto out;

    struct catalog_image *dead = NULL, *e;
    pthread_mutex_lock(&c->lock);
    for (int tries = 0;; tries++) {
        e = cat_find(c, name);
        while (e && e->ident_busy) { /* our last writer is recording the file's new identity */
            pthread_cond_wait(&c->closed, &c->lock);
            e = cat_find(c, name);
        }
        /* Our own writers may have changed the file after the stat above and
         * recorded its new identity since (ident_seq moved): stat again, without
         * the lock, rather than take our change for someone else's (reopening on
         * our own change would read metadata the handle has not written yet). */
        if (!e || !e->written || same_file(e, &st) || e->ident_seq == seq0 || tries == 3)
            break;
        seq0 = e->ident_seq;
        pthread_mutex_unlock(&c->lock);
        struct vfs_stat again;
        int r = vfs_stat(uri, &again);
        pthread_mutex_lock(&c->lock);
        if (r == 0)
            st = again;
    }
    while ((!e || !same_file(e, &st)) && is_closing(c, name)) {
        /* an old handle of this file is still writing its metadata */
        pthread_cond_wait(&c->closed, &c->lock);
        e = cat_find(c, name);
    }
    if (!e || !same_file(e, &st)) {
        /* open without the lock: other images stay available meanwhile */
        pthread_mutex_unlock(&c->lock);
        struct catalog_image *fresh = NULL;
        ret = open_entry(c, name, uri, &st, &fresh);
        if (ret < 0)
            goto out;
        pthread_mutex_lock(&c->lock);
        e = cat_find(c, name);
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
        cat_entry_free(ci);
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

/* Drop the cache's entry for name (the file was removed or replaced by us). */
void cat_forget(struct catalog *c, const char *name)
{
    struct catalog_image *dead = NULL;
    pthread_mutex_lock(&c->lock);
    struct catalog_image *e = cat_find(c, name);
    if (e)
        uncache(c, e, &dead);
    pthread_mutex_unlock(&c->lock);
    free_dead(c, dead);
}


void catalog_drop(struct catalog *c, const char *name)
{
    cat_forget(c, name);
    cat_users_reread(c, name); /* a job may have rewritten its header */
}

/* ---- changes through a handle ---- */

void cat_writer_enter(struct catalog_image *ci)
{
    pthread_mutex_lock(&ci->cat->lock);
    ci->writers++;
    ci->written = true;
    pthread_mutex_unlock(&ci->cat->lock);
}

void cat_writer_leave(struct catalog_image *ci)
{
    struct catalog *c = ci->cat;
    pthread_mutex_lock(&c->lock);
    bool last = --ci->writers == 0;
    if (last)
        ci->ident_busy++; /* gets wait until the new identity is recorded */
    pthread_mutex_unlock(&c->lock);
    if (!last)
        return;
    /* our own changes: the file's new identity is still this handle. The stat
     * runs under the entry's own lock (refreshes in order), not the catalog's. */
    pthread_mutex_lock(&ci->ident_lock);
    struct vfs_stat st;
    int r = vfs_stat(ci->uri, &st);
    pthread_mutex_lock(&c->lock);
    if (r == 0 && ci->writers == 0) { /* else a writer came back: its leave records it */
        ci->size = st.size;
        ci->mtime = st.mtime;
        ci->mtime_nsec = st.mtime_nsec;
        ci->ino = st.ino;
        ci->version = st.version;
    }
    ci->ident_seq++;
    ci->ident_busy--;
    pthread_cond_broadcast(&c->closed);
    pthread_mutex_unlock(&c->lock);
    pthread_mutex_unlock(&ci->ident_lock);
    cat_notify(c, "image-changed", ci->name);
}

/* Why ci, open read-only, cannot be written: a file qcowd may not write is
 * -EROFS (409), an image property keeps its own errno (the corrupt bit -EUCLEAN,
 * encryption -ENOTSUP: 422), so the client learns what is wrong with it. */
int cat_refuse_write(const struct catalog_image *ci)
{
    const char *why = ci->ro_msg ? ci->ro_msg : "opened read-only";
    int e = ci->ro_err;
    if (!e || e == EROFS || e == EACCES || e == EPERM || cat_transient(-e))
        return err_fail(EROFS, "image '%s' is read-only: %s", ci->name, why);
    return err_fail(e, "image '%s' cannot be written: %s", ci->name, why);
}

/* Flush the pending metadata of ci's handle, if any, so the file can be read by
 * others; as a writer, so the change does not look like someone else's. */
int cat_flush_own(struct catalog_image *ci)
{
    pthread_mutex_lock(&ci->cat->lock);
    bool written = ci->written;
    pthread_mutex_unlock(&ci->cat->lock);
    if (!written || !ci->rw)
        return 0;
    cat_writer_enter(ci);
    int ret = qcow2_flush(ci->img);
    cat_writer_leave(ci);
    return ret;
}

int catalog_flush(struct catalog *c, const char *name)
{
    pthread_mutex_lock(&c->lock);
    struct catalog_image *e = cat_find(c, name);
    if (e && e->img)
        e->refs++;
    else
        e = NULL;
    pthread_mutex_unlock(&c->lock);
    if (!e)
        return 0;
    int ret = cat_flush_own(e);
    catalog_put(e);
    return ret;
}

/* ---- private handles ---- */

struct catalog_private {
    struct catalog *cat;
    char *name;
    struct qcow2_image *img;
    bool write;
};

int catalog_open_private(struct catalog *c, const char *name, const struct catalog_private_opts *o,
                         struct catalog_private **out)
{
    static const struct catalog_private_opts ro;
    if (!o)
        o = &ro;
    struct catalog_private *h = calloc(1, sizeof *h);
    char *uri = cat_image_uri(c, name);
    int ret = h && uri && (h->name = strdup(name)) ? 0 : err_fail(ENOMEM, "out of memory");
    if (ret == 0)
        ret = catalog_flush(c, name);
    if (ret == 0 && o->write)
        catalog_drop(c, name);
    if (ret == 0) {
        struct qcow2_open_opts qo = {
            .contained = true,
            .read_write = o->write,
            .snapshot = o->snapshot,
            .allow_corrupt = o->allow_corrupt,
            .l2_cache_bytes = o->small_cache ? 1u << 20 : c->opts.l2_cache_bytes,
            .max_meta_bytes = c->opts.max_meta_bytes,
        };
        ret = qcow2_open(uri, &qo, &h->img);
        struct vfs_stat st;
        if (ret == -ENOENT && vfs_stat(uri, &st) < 0) {
            ret = err_fail(ENOENT, "no image named '%s' in the catalog", name);
        } else if (ret == -ENOENT && o->snapshot) {
            ret = err_fail(ENOENT, "image '%s' has no snapshot '%s'", name, o->snapshot);
        } else if (ret == -ENOENT) {
            ret = -ENXIO; /* the image is there: a file it needs is missing (the engine's message says which) */
        } else if (ret == -EINVAL) { /* the engine's "bad format": corrupt metadata */
            ret = o->snapshot ? err_prefix(-EUCLEAN, "image '%s', snapshot '%s'", name, o->snapshot)
                              : err_prefix(-EUCLEAN, "image '%s'", name);
        }
    }
    free(uri);
    if (ret < 0) {
        if (h)
            free(h->name);
        free(h);
        return ret;
    }
    h->cat = c;
    h->write = o->write;
    *out = h;
    return 0;
}

struct qcow2_image *catalog_private_qcow2(const struct catalog_private *h)
{
    return h->img;
}

int catalog_close_private(struct catalog_private *h, bool changed)
{
    if (!h)
        return 0;
    int ret = h->write ? qcow2_flush(h->img) : 0;
    int cl = qcow2_close(h->img);
    if (ret == 0)
        ret = cl;
    if (changed) {
        struct err_saved saved;
        err_save(&saved, ret);
        catalog_drop(h->cat, h->name);
        catalog_changed(h->cat, h->name);
        err_restore(&saved);
    }
    free(h->name);
    free(h);
    return ret;
}
