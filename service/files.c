/* files.c: whole-image operations on the catalog folder: create, remove,
 * upload, download of the container, install of a job's result, and budgets. */
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

/* An image being made (publish_begin to publish_end): on a store with a
 * deferred publish it is not listed until the end, on the others its temporary
 * file is; either way the bytes it declared count before they arrive. */
struct cat_making {
    struct vfs_pending *p;
    uint64_t declared; /* the size it says it will have (0: not known) */
    struct cat_making *next;
};

static uint64_t add_sat(uint64_t a, uint64_t b)
{
    uint64_t s;
    return __builtin_add_overflow(a, b, &s) ? UINT64_MAX : s;
}

/* What m takes that the folder's listing does not show: all of it when its
 * publish is deferred, else what it declared beyond its temporary file. */
static uint64_t making_bytes(const struct cat_making *m)
{
    struct vfs_stat st;
    uint64_t have = vfs_stat(vfs_pending_uri(m->p), &st) == 0 ? st.size : 0; /* ENOENT: not created yet */
    if (!vfs_pending_deferred(m->p))
        return m->declared > have ? m->declared - have : 0;
    return m->declared > have ? m->declared : have;
}

/* catalog_check_space with c->space_lock held: one listing and a stat per
 * file and per image being made (called per upload, create and convert, never
 * per read or write). */
static int check_space_locked(struct catalog *c, uint64_t more)
{
    struct usage u = {.root = c->root};
    int ret = vfs_list(c->root, add_file, &u);
    if (ret < 0)
        return ret == -ENOMEM ? err_fail(ENOMEM, "out of memory") : err_prefix(ret, "listing the catalog");
    for (const struct cat_making *m = c->makings; m; m = m->next)
        u.bytes = add_sat(u.bytes, making_bytes(m));
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

int catalog_check_space(struct catalog *c, uint64_t more)
{
    if (c->opts.max_catalog == CATALOG_UNLIMITED)
        return 0;
    pthread_mutex_lock(&c->space_lock);
    int ret = check_space_locked(c, more);
    pthread_mutex_unlock(&c->space_lock);
    return ret;
}

/* Count p (declared bytes, 0: unknown) in the checks until publish_end; when
 * check, first refuse (-ENOSPC) if it would take the catalog past --max-catalog,
 * in one step with the count so two makers cannot both pass. */
static int making_add(struct catalog *c, struct vfs_pending *p, uint64_t declared, bool check)
{
    if (c->opts.max_catalog == CATALOG_UNLIMITED)
        return 0;
    struct cat_making *m = malloc(sizeof *m);
    if (!m)
        return err_fail(ENOMEM, "out of memory");
    *m = (struct cat_making){.p = p, .declared = declared == UINT64_MAX ? 0 : declared};
    pthread_mutex_lock(&c->space_lock);
    int ret = check ? check_space_locked(c, m->declared) : 0;
    if (ret == 0) {
        m->next = c->makings;
        c->makings = m;
    }
    pthread_mutex_unlock(&c->space_lock);
    if (ret < 0)
        free(m);
    return ret;
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

/* Who reserves a name while making its image (admission messages). */
static const char CREATE_OWNER[] = "a create (POST /v1/images)";
static const char UPLOAD_OWNER[] = "an upload (PUT .../file)";

/* Begin making the image name (the caller holds its reservation): a deferred
 * publish to its final name where the store has one (an S3 multipart upload),
 * else a temporary name of kind that the commit renames into place. Its
 * declared bytes (UINT64_MAX or 0: not known) count against --max-catalog from
 * now to publish_end; when check, refused (-ENOSPC) if they do not fit. */
static int publish_begin(struct catalog *c, const char *kind, const char *name, uint64_t declared, bool check,
                         struct vfs_pending **out)
{
    char *uri = cat_image_uri(c, name), *tmp = cat_temp_uri(c, kind, name);
    int ret = uri && tmp ? vfs_pending_begin(uri, tmp, out) : err_fail(ENOMEM, "out of memory");
    free(uri);
    free(tmp);
    if (ret == 0 && (ret = making_add(c, *out, declared, check)) < 0) {
        vfs_pending_end(*out);
        *out = NULL;
    }
    return ret;
}

/* ret (negative) with its message naming final where it named work, the
 * private URI an image is made at (pending:TOKEN on a store with a deferred
 * publish): messages name the image (the API shows its final URI as
 * NAME.qcow2), never that. */
static int name_final(int ret, const char *work, const char *final)
{
    size_t wl = strlen(work);
    if (ret >= 0 || !wl || !strstr(err_msg(ret), work))
        return ret;
    char *m = strdup(err_msg(ret)), *hit, *next;
    while (m && (hit = strstr(m, work))) {
        next = NULL;
        if (asprintf(&next, "%.*s%s%s", (int)(hit - m), m, final, hit + wl) < 0)
            next = NULL;
        free(m);
        m = next;
    }
    if (!m)
        return ret; /* out of memory: the message as it was */
    ret = err_fail(-ret, "%s", m);
    free(m);
    return ret;
}

/* End what publish_begin began (NULL: nothing): dropped unless published. */
static void publish_end(struct catalog *c, struct vfs_pending *p)
{
    if (!p)
        return;
    struct cat_making *m = NULL;
    pthread_mutex_lock(&c->space_lock);
    for (struct cat_making **q = &c->makings; *q; q = &(*q)->next)
        if ((*q)->p == p) {
            m = *q;
            *q = m->next;
            break;
        }
    pthread_mutex_unlock(&c->space_lock);
    free(m);
    vfs_pending_end(p);
}

/* Publish what p made as name, drop the cache's entry and announce it. The
 * caller holds the name's reservation (cat_admit_name or a job's claim), so
 * nobody else makes an image of that name meanwhile; the name is looked for
 * again all the same (-EEXIST publishes nothing). The caller ends p. */
static int install(struct catalog *c, struct vfs_pending *p, const char *name)
{
    int ret = vfs_pending_commit(p, VFS_COMMIT_EXCL);
    if (ret == -EEXIST)
        ret = err_fail(EEXIST, "an image named '%s' already exists", name);
    if (ret == 0) {
        cat_forget(c, name);
        cat_users_reread(c, name);
        cat_notify(c, "image-created", name);
    }
    return ret;
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
            ret = cat_flush_own(bi);
        catalog_put(bi);
        if (ret < 0)
            return ret;
        snprintf(backing, sizeof backing, "%s%s", o.backing_file, CATALOG_SUFFIX);
        o.backing_file = backing;
        o.backing_format = "qcow2";
    } else if (o.backing_format) {
        return err_fail(EINVAL, "backing-fmt without backing-file");
    }
    char *uri = cat_image_uri(c, name);
    if (!uri)
        return err_fail(ENOMEM, "out of memory");
    /* the name is ours from here to the publish (a convert's target, another
     * create or upload is refused, and we are refused while one holds it); the
     * image is built unseen (publish_begin) with no lock held (a preallocation
     * writes for as long as the disk is large) */
    ret = cat_admit_name(c, name, CREATE_OWNER);
    if (ret < 0)
        goto out;
    struct vfs_pending *p = NULL;
    ret = exists(uri, name);
    if (ret == 0)
        ret = publish_begin(c, "create", name, 0, true, &p);
    if (ret == 0)
        ret = name_final(qcow2_create(vfs_pending_uri(p), &o), vfs_pending_uri(p), uri);
    if (ret == 0)
        ret = install(c, p, name);
    publish_end(c, p); /* not published: dropped */
    cat_leave_name(c, name, CREATE_OWNER);
out:
    free(uri);
    return ret;
}

int catalog_remove(struct catalog *c, const char *name)
{
    return catalog_remove_if(c, name, NULL, NULL);
}

int catalog_remove_if(struct catalog *c, const char *name, int (*check)(void *ctx, struct catalog_image *ci), void *ctx)
{
    int ret = catalog_valid_name(name);
    if (ret < 0)
        return ret;
    char *uri = cat_image_uri(c, name);
    if (!uri)
        return err_fail(ENOMEM, "out of memory");
    /* the name is held against writers, downloads, jobs and makers from here
     * to the removal; the store is asked outside the admission lock */
    ret = cat_admit_delete(c, name);
    if (ret < 0) {
        free(uri);
        return ret;
    }
    struct vfs_stat st;
    ret = vfs_stat(uri, &st);
    if (ret == -ENOENT || (ret == 0 && st.is_dir))
        ret = err_fail(ENOENT, "no image named '%s' in the catalog", name);
    if (ret == 0)
        ret = cat_users_refuse(c, name);
    if (ret == 0 && check) { /* writers are held off from here: what it sees is what is removed */
        struct catalog_image *ci = NULL;
        if (catalog_get(c, name, &ci) < 0) /* it does not open (corrupt...): checked with no image */
            err_clear();
        ret = check(ctx, ci);
        catalog_put(ci);
    }
    if (ret == 0)
        ret = vfs_remove(uri);
    if (ret == 0) {
        cat_forget(c, name);
        cat_users_drop(c, name);
    }
    cat_leave_delete(c, name);
    if (ret == 0) {
        cat_notify(c, "image-deleted", name);
    }
    free(uri);
    return ret;
}

/* ---- upload ---- */

/* The first bytes of a qcow2 header: magic, version, cluster bits, disk size. */
#define UPLOAD_HEAD 32

struct catalog_upload {
    struct catalog *cat;
    char *name, *uri;
    struct vfs_pending *pend; /* the image being made */
    struct vfs_file *f;       /* on it */
    uint64_t off;   /* bytes written */
    uint64_t total; /* declared size of the whole upload, or UINT64_MAX: not resumable */
    unsigned char head[UPLOAD_HEAD];
    struct qcow2_range keep[QCOW2_META_RANGES_MAX]; /* what validation reads (once mapped) */
    unsigned nkeep;
    bool mapped;       /* the header cluster came: keep is known */
    uint64_t released; /* bytes below this not in keep were released (vfs_release) */
    bool named;     /* holds the name's reservation */
    bool listed;    /* on c->suspended (resumable) */
    bool active;    /* and a connection is sending it (else waiting to be resumed) */
    time_t expires; /* when waiting: aborted after this (monotonic seconds) */
    struct catalog_upload *next; /* on c->suspended */
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
    if (!u || !(u->name = strdup(name)) || !(u->uri = cat_image_uri(c, name))) {
        ret = err_fail(ENOMEM, "out of memory");
        goto fail;
    }
    u->cat = c;
    u->total = UINT64_MAX;
    ret = cat_admit_name(c, name, UPLOAD_OWNER); /* until the commit or the abort */
    if (ret < 0)
        goto fail;
    u->named = true;
    ret = exists(u->uri, name);
    if (ret == 0) /* counted from here: a concurrent upload's check sees it */
        ret = publish_begin(c, "upload", name, length, true, &u->pend);
    if (ret == 0)
        ret = vfs_open(vfs_pending_uri(u->pend), VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL, &u->f);
    if (ret < 0)
        goto fail;
    *out = u;
    return 0;
fail:
    if (u) {
        publish_end(c, u->pend);
        if (u->named)
            cat_leave_name(c, name, UPLOAD_OWNER);
        free(u->name);
        free(u->uri);
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

/* Bounded staging: once the header cluster has come, the ranges validation
 * reads are known (qcow2_meta_ranges); every byte written outside them is
 * released (all but the header cluster when validation will refuse the header
 * before reading further), so a store that stages the upload locally (S3) may
 * drop it once sent. The upload is written once and in order (a resumed piece
 * continues at the end), as release needs. */
static int upload_release(struct catalog_upload *u)
{
    if (!u->mapped) {
        if (u->off < UPLOAD_HEAD || u->off < 1ull << be32(u->head + 20)) /* check_head: 9 to 21 bits */
            return 0;
        int n = qcow2_meta_ranges(u->f, u->cat->opts.max_meta_bytes, u->keep);
        if (n == -EINVAL || n == -ENOTSUP) {
            /* validation refuses the header the same way, reading nothing past
             * its cluster: the answer comes then, after the body (as before) */
            u->keep[0] = (struct qcow2_range){0, 1ull << be32(u->head + 20)};
            n = 1;
            err_clear();
        }
        if (n < 0)
            return n;
        u->nkeep = (unsigned)n;
        u->mapped = true;
    }
    uint64_t s = u->released;
    int ret = 0;
    for (unsigned i = 0; i < u->nkeep && s < u->off && ret == 0; i++) {
        uint64_t ks = u->keep[i].off, ke = ks + u->keep[i].len; /* no overflow: qcow2_meta_ranges */
        if (ke <= s)
            continue;
        if (ks >= u->off)
            break;
        if (ks > s)
            ret = vfs_release(u->f, s, ks - s);
        s = ke < u->off ? ke : u->off;
    }
    if (ret == 0 && s < u->off)
        ret = vfs_release(u->f, s, u->off - s);
    if (ret == 0)
        u->released = u->off;
    return ret;
}

int catalog_upload_write(struct catalog_upload *u, const void *buf, size_t len)
{
    const struct catalog *c = u->cat;
    if (u->total != UINT64_MAX && (len > u->total || u->off > u->total - len))
        return err_fail(EINVAL, "the upload is longer than the %llu bytes it declared",
                        (unsigned long long)u->total);
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
    if (ret == 0 && u->listed) { /* catalog_upload_status reads it from other threads */
        pthread_mutex_lock(&u->cat->uploads_lock);
        u->off += len;
        pthread_mutex_unlock(&u->cat->uploads_lock);
    } else if (ret == 0) {
        u->off += len;
    }
    if (ret == 0)
        ret = upload_release(u);
    return ret;
}

int catalog_upload_ready(struct catalog_upload *u, void (*wake)(void *ctx), void *ctx)
{
    return u->f ? vfs_wait_room(u->f, wake, ctx) : 1;
}

/* Not published by then: the image made is dropped (the message of what
 * failed the upload outlives that). */
static void upload_free(struct catalog_upload *u)
{
    if (u->f)
        vfs_close(u->f);
    publish_end(u->cat, u->pend);
    if (u->named)
        cat_leave_name(u->cat, u->name, UPLOAD_OWNER);
    free(u->name);
    free(u->uri);
    free(u);
}

static void upload_unlist(struct catalog_upload *u);

void catalog_upload_abort(struct catalog_upload *u)
{
    if (u) {
        upload_unlist(u);
        upload_free(u);
    }
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
        ret = cat_check_chain(c, img);
    qcow2_close(img);
    if (ret == 0)
        err_clear();
    return ret;
}

int catalog_upload_commit(struct catalog_upload *u)
{
    struct catalog *c = u->cat;
    upload_unlist(u);
    int ret = vfs_flush(u->f);
    vfs_close(u->f);
    u->f = NULL;
    if (ret == 0 && u->off < UPLOAD_HEAD)
        ret = u->off ? err_fail(EUCLEAN, "not a qcow2 image: %llu bytes, shorter than a header",
                                (unsigned long long)u->off)
                     : err_fail(EUCLEAN, "not a qcow2 image: the upload is empty");
    if (ret == 0)
        ret = catalog_check_space(c, 0); /* the folder and the images being made, this one too */
    if (ret == 0)
        ret = name_final(validate_upload(c, vfs_pending_uri(u->pend)), vfs_pending_uri(u->pend), u->uri);
    if (ret == 0)
        ret = install(c, u->pend, u->name);
    upload_free(u);
    return ret;
}

/* ---- resumable uploads ---- */

/* c->suspended lists every resumable upload (one that declared its total): those
 * a connection is sending now (active) and those waiting to be resumed, which
 * expire. Under uploads_lock; no I/O under it: what is to be aborted is unlinked
 * and aborted after. */

static time_t now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec;
}

uint64_t catalog_upload_received(const struct catalog_upload *u)
{
    return u->off;
}

static void unlink_locked(struct catalog *c, struct catalog_upload *u)
{
    for (struct catalog_upload **p = &c->suspended; *p; p = &(*p)->next)
        if (*p == u) {
            *p = u->next;
            u->next = NULL;
            if (!u->active)
                c->nsuspended--;
            break;
        }
    u->listed = false;
}

/* Unlink (uploads_lock held) the waiting uploads expired by now or named name
 * (NULL: none), and the oldest waiting ones while room is wanted; returns them as
 * a list for the caller to abort outside the lock. */
static struct catalog_upload *take_waiting(struct catalog *c, const char *name, bool room)
{
    struct catalog_upload *dead = NULL;
    time_t now = now_sec();
    for (struct catalog_upload **p = &c->suspended; *p;) {
        struct catalog_upload *u = *p;
        bool full = room && c->nsuspended >= CATALOG_MAX_SUSPENDED;
        if (!u->active && (u->expires <= now || full || (name && !strcmp(u->name, name)))) {
            *p = u->next;
            c->nsuspended--;
            u->listed = false;
            u->next = dead;
            dead = u;
        } else {
            p = &u->next;
        }
    }
    return dead;
}

static void abort_list(struct catalog_upload *dead)
{
    while (dead) {
        struct catalog_upload *next = dead->next;
        dead->next = NULL;
        upload_free(dead);
        dead = next;
    }
}

/* Take u off the list before it is committed or aborted. */
static void upload_unlist(struct catalog_upload *u)
{
    if (!u->listed)
        return;
    pthread_mutex_lock(&u->cat->uploads_lock);
    unlink_locked(u->cat, u);
    pthread_mutex_unlock(&u->cat->uploads_lock);
}

void catalog_upload_set_total(struct catalog_upload *u, uint64_t total)
{
    struct catalog *c = u->cat;
    u->total = total;
    pthread_mutex_lock(&c->uploads_lock);
    if (!u->listed) {
        u->active = true;
        u->listed = true;
        u->next = c->suspended;
        c->suspended = u;
    }
    pthread_mutex_unlock(&c->uploads_lock);
}

void catalog_upload_suspend(struct catalog_upload *u)
{
    struct catalog *c = u->cat;
    if (!u->listed || u->off >= u->total) { /* not resumable, or nothing to wait for */
        catalog_upload_abort(u);
        return;
    }
    unsigned keep = c->opts.upload_keep_sec ? c->opts.upload_keep_sec : CATALOG_DEFAULT_UPLOAD_KEEP;
    pthread_mutex_lock(&c->uploads_lock);
    unlink_locked(c, u);
    struct catalog_upload *dead = take_waiting(c, NULL, true);
    u->expires = now_sec() + (time_t)keep;
    u->active = false;
    u->listed = true;
    struct catalog_upload **tail = &c->suspended; /* oldest first */
    while (*tail)
        tail = &(*tail)->next;
    *tail = u;
    c->nsuspended++;
    pthread_mutex_unlock(&c->uploads_lock);
    abort_list(dead);
}

static int no_upload(const char *name)
{
    return err_fail(ENOENT, "no upload of '%s' to resume (none begun, or it expired after --upload-resume-time)",
                    name);
}

int catalog_upload_resume(struct catalog *c, const char *name, uint64_t offset, uint64_t total,
                          struct catalog_upload **out)
{
    pthread_mutex_lock(&c->uploads_lock);
    struct catalog_upload *dead = take_waiting(c, NULL, false), *u = c->suspended;
    while (u && strcmp(u->name, name))
        u = u->next;
    int ret;
    if (!u) {
        ret = no_upload(name);
    } else if (u->active) {
        ret = err_fail(EBUSY, "the upload of '%s' is being sent on another connection (%llu of %llu bytes so far)",
                       name, (unsigned long long)u->off, (unsigned long long)u->total);
    } else if (u->total != total || u->off != offset) {
        ret = err_fail(ERANGE, "the upload of '%s' has %llu of %llu bytes: continue it at %llu", name,
                       (unsigned long long)u->off, (unsigned long long)u->total, (unsigned long long)u->off);
    } else {
        u->active = true;
        c->nsuspended--;
        *out = u;
        ret = 0;
    }
    pthread_mutex_unlock(&c->uploads_lock);
    abort_list(dead);
    return ret;
}

int catalog_upload_status(struct catalog *c, const char *name, uint64_t *received, uint64_t *total)
{
    pthread_mutex_lock(&c->uploads_lock);
    struct catalog_upload *dead = take_waiting(c, NULL, false), *u = c->suspended;
    while (u && strcmp(u->name, name))
        u = u->next;
    if (u) {
        *received = u->off;
        *total = u->total;
    }
    pthread_mutex_unlock(&c->uploads_lock);
    abort_list(dead);
    return u ? 0 : no_upload(name);
}

void catalog_upload_discard(struct catalog *c, const char *name)
{
    pthread_mutex_lock(&c->uploads_lock);
    struct catalog_upload *dead = take_waiting(c, name, false);
    pthread_mutex_unlock(&c->uploads_lock);
    abort_list(dead);
}

void cat_uploads_free(struct catalog *c)
{
    pthread_mutex_lock(&c->uploads_lock);
    struct catalog_upload *dead = c->suspended;
    c->suspended = NULL;
    c->nsuspended = 0;
    pthread_mutex_unlock(&c->uploads_lock);
    for (struct catalog_upload *u = dead; u; u = u->next)
        u->listed = false; /* every connection is gone at catalog_free */
    abort_list(dead);
}

/* ---- download ---- */

struct catalog_file {
    struct vfs_file *f;
    struct catalog *cat;
    char *name;               /* admitted as a download (cat_admit_download) while set */
    struct catalog_image *ci; /* NULL: a broken image */
};



int catalog_file_open(struct catalog *c, const char *name, struct catalog_file **out, uint64_t *size)
{
    struct catalog_file *f = calloc(1, sizeof *f);
    char *name_copy = strdup(name);
    if (!f || !name_copy) {
        free(f);
        free(name_copy);
        return err_fail(ENOMEM, "out of memory");
    }
    f->cat = c;
    int ret = catalog_get(c, name, &f->ci);
    if (ret < 0 && ret != -EUCLEAN && ret != -EPERM && ret != -ENXIO && ret != -ELOOP && ret != -ENOTSUP) {
        free(name_copy);
        free(f);
        return ret; /* a broken image can still be downloaded, to be looked at */
    }
    /* writers and changing jobs out, then the handle's pending metadata
     * written, so the file read is one consistent container */
    ret = cat_admit_download(c, name);
    if (ret < 0) {
        catalog_put(f->ci);
        free(name_copy);
        free(f);
        return ret;
    }
    f->name = name_copy;
    ret = f->ci ? cat_flush_own(f->ci) : 0;
    char *uri = NULL;
    if (ret == 0)
        ret = (uri = cat_image_uri(c, name)) ? vfs_open(uri, VFS_O_RDONLY, &f->f) : err_fail(ENOMEM, "out of memory");
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
    cat_leave_download(f->cat, f->name);
    catalog_put(f->ci);
    free(f->name);
    free(f);
}


int catalog_publish_begin(struct catalog *c, const char *kind, const char *name, struct vfs_pending **out)
{
    int ret = catalog_valid_name(name);
    return ret < 0 ? ret : publish_begin(c, kind, name, 0, false, out);
}

void catalog_publish_end(struct catalog *c, struct vfs_pending *p)
{
    publish_end(c, p);
}

int catalog_publish(struct catalog *c, struct vfs_pending *p, const char *name)
{
    int ret = catalog_valid_name(name);
    return ret < 0 ? ret : install(c, p, name);
}
