/* access.c: who may use an image now: reservations of jobs, writers, downloads
 * of the container, and the backing chains of other images. */
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

struct reservation *cat_reserved(const struct catalog *c, const char *name)
{
    for (struct reservation *r = c->reserved; r; r = r->next)
        if (!strcmp(r->name, name))
            return r;
    return NULL;
}

/* -EBUSY when name is reserved (for readers too when readers is set), else 0. */
int cat_check_reserved(struct catalog *c, const char *name, bool readers)
{
    pthread_mutex_lock(&c->lock);
    struct reservation *r = cat_reserved(c, name);
    int ret = 0;
    if (r && (!readers || r->exclusive))
        ret = err_fail(EBUSY, "image '%s' is busy: %s", name, r->owner);
    pthread_mutex_unlock(&c->lock);
    return ret;
}

/* ---- writing ---- */

/* -EBUSY when an image of the catalog other than name has the file target_uri in
 * its backing chain; 0 otherwise. Images that cannot be opened are skipped. */
int cat_find_user(struct catalog *c, const char *name, const char *target_uri)
{
    char **names;
    size_t n;
    int ret = catalog_list(c, &names, &n);
    if (ret < 0)
        return ret;
    for (size_t i = 0; i < n && ret == 0; i++) {
        struct catalog_image *ci;
        if (!strcmp(names[i], name) || cat_get_entry(c, names[i], &ci, true) < 0)
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
        cat_notify(c, "image-changed", ci->name);
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
    struct reservation *r = cat_reserved(c, ci->name);
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
int cat_refuse_write(const struct catalog_image *ci)
{
    const char *why = ci->ro_msg ? ci->ro_msg : "opened read-only";
    int e = ci->ro_err;
    if (!e || e == EROFS || e == EACCES || e == EPERM || cat_transient(-e))
        return err_fail(EROFS, "image '%s' is read-only: %s", ci->name, why);
    return err_fail(e, "image '%s' cannot be written: %s", ci->name, why);
}

int catalog_get_writable(struct catalog *c, const char *name, struct catalog_image **out)
{
    struct catalog_image *ci;
    int ret = catalog_valid_name(name);
    if (ret == 0)
        ret = cat_check_reserved(c, name, false);
    if (ret == 0)
        ret = catalog_get(c, name, &ci);
    if (ret < 0)
        return ret;
    if (!ci->rw) {
        ret = cat_refuse_write(ci);
        catalog_put(ci);
        return ret;
    }
    ret = cat_find_user(c, name, qcow2_get_info(ci->img)->uri);
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
    cat_writer_leave(ci);
    catalog_put(ci);
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


/* Stop writes to ci for a download: -EBUSY while a write runs, else the hold is
 * taken and the handle's pending metadata flushed, so the file is whole. */
int cat_download_enter(struct catalog_image *ci)
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
    cat_writer_leave(ci);
    if (ret < 0)
        cat_download_leave(ci);
    return ret;
}

void cat_download_leave(struct catalog_image *ci)
{
    pthread_mutex_lock(&ci->cat->lock);
    ci->downloads--;
    pthread_mutex_unlock(&ci->cat->lock);
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
    struct reservation *old = cat_reserved(c, name);
    struct catalog_image *e = cat_find(c, name);
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
    int ret = cat_get_entry(c, name, &ci, true);
    if (ret < 0)
        return ret;
    if (!ci->rw) {
        ret = cat_refuse_write(ci);
        catalog_put(ci);
        return ret;
    }
    cat_writer_enter(ci);
    *out = ci;
    return 0;
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
