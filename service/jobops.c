/* jobops.c: snapshot, check and commit jobs: validation at submit time, then the
 * work on a worker with the images reserved in the catalog (writers refused, and
 * readers too while a snapshot table or a backing chain changes under them). */
#include "jobops.h"
#include "qimgjson.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "catalog.h"
#include "err.h"
#include "jobs.h"
#include "qcow2.h"

int svc_reserve(struct job *j, struct catalog *cat, const char *name, bool exclusive)
{
    int ret = catalog_reserve(cat, name, exclusive, job_owner(j));
    if (ret != -EBUSY)
        return ret;
    if (job_cancelled(j))
        return -ECANCELED;
    /* a request is writing it now: try again later, off the worker (a slow
     * client would hold the worker for as long as it writes) */
    return job_retry_later(j);
}

int svc_claim(struct catalog *cat, const char *type, size_t n, const char *const *names, const enum catalog_use *uses,
              struct catalog_claim **out)
{
    char owner[64];
    snprintf(owner, sizeof owner, "a %s job", type);
    return catalog_claim(cat, owner, n, names, uses, out);
}

int svc_submit(struct jobs *js, struct catalog_claim *cl, const char *type, const char *image,
               const char *const *locks, json_t *params, job_run_fn run, void *arg, void (*free_arg)(void *),
               json_t **job)
{
    catalog_claim_ref(cl); /* the job may end, and free arg, before the id is read */
    int ret = jobs_submit(js, type, image, locks, params, run, arg, free_arg, job);
    if (ret == 0) {
        char owner[96];
        snprintf(owner, sizeof owner, "job %s (%s)", json_string_value(json_object_get(*job, "id")), type);
        catalog_claim_owner(cl, owner);
    }
    catalog_unclaim(cl);
    return ret;
}

/* The image must open now (a clear error for a corrupt one comes at once). */
int svc_usable(struct catalog *cat, const char *image)
{
    struct catalog_image *ci;
    int ret = catalog_get(cat, image, &ci);
    if (ret == -EBUSY) /* reserved by a job: the new one queues behind it */
        return 0;
    if (ret == 0)
        catalog_put(ci);
    return ret;
}

bool svc_has_snapshot(struct catalog *cat, const char *image, const char *snap)
{
    struct catalog_image *ci;
    if (catalog_get(cat, image, &ci) < 0)
        return true; /* busy: the job will tell */
    const struct qcow2_info *in = qcow2_get_info(catalog_image_qcow2(ci));
    bool found = false;
    for (uint32_t i = 0; i < in->nb_snapshots && !found; i++)
        found = !strcmp(in->snapshots[i].id, snap) || !strcmp(in->snapshots[i].name, snap);
    catalog_put(ci);
    return found;
}

static int refuse_user(void *ctx, const char *name)
{
    return err_fail(ETXTBSY, "image '%s' is in the backing chain of image '%s': reverting it would change that disk",
                    (const char *)ctx, name);
}

/* ---- snapshots ---- */

struct snap_arg {
    struct catalog *cat;
    struct catalog_claim *claim;
    char *image, *op, *snap;
};

static void snap_free(void *p)
{
    struct snap_arg *a = p;
    catalog_unclaim(a->claim);
    free(a->image);
    free(a->op);
    free(a->snap);
    free(a);
}

static int snap_run(struct job *j, void *p, json_t **result)
{
    struct snap_arg *a = p;
    /* readers too: the snapshot list they would read is replaced */
    int ret = svc_reserve(j, a->cat, a->image, true);
    if (ret < 0)
        return ret;
    struct catalog_image *ci;
    ret = catalog_get_reserved(a->cat, a->image, &ci);
    if (ret == 0) {
        job_progress(j, 0, 1);
        struct qcow2_image *img = catalog_image_qcow2(ci);
        if (!strcmp(a->op, "create"))
            ret = qcow2_snapshot_create(img, a->snap);
        else if (!strcmp(a->op, "delete"))
            ret = qcow2_snapshot_delete(img, a->snap);
        else
            ret = qcow2_snapshot_revert(img, a->snap);
        if (ret == 0)
            ret = qcow2_flush(img);
        if (ret == 0) {
            job_progress(j, 1, 1);
            *result = json_pack("{s:s,s:s}", "snapshot", a->snap, "op", a->op);
        }
        catalog_put_writable(ci);
    }
    catalog_release(a->cat, a->image);
    return ret;
}

/* The checks of a snapshot request that need no job. */
static int snap_check(struct catalog *cat, const char *image, const char *op, const char *snap)
{
    int ret = svc_usable(cat, image);
    if (ret < 0)
        return ret;
    if (!snap || !*snap)
        return err_fail(EINVAL, "a snapshot name is required");
    if (strlen(snap) > 1023)
        return err_fail(EINVAL, "a snapshot name has at most 1023 bytes");
    bool found = svc_has_snapshot(cat, image, snap);
    if (!strcmp(op, "create") && found)
        ; /* an id may equal the new name; the engine decides (-EEXIST) */
    else if (strcmp(op, "create") && !found)
        return err_fail(ENOENT, "image '%s' has no snapshot '%s'", image, snap);
    if (!strcmp(op, "revert"))
        ret = catalog_backing_users(cat, image, refuse_user, (void *)image);
    return ret;
}

int svc_snapshot_job(struct jobs *js, struct catalog *cat, const char *image, const char *op, const char *snap,
                     json_t **job)
{
    char type[32];
    snprintf(type, sizeof type, "snapshot-%s", op);
    /* claimed before it is looked at: no delete slips in between */
    struct catalog_claim *cl;
    enum catalog_use use = CATALOG_USE_CHANGE;
    int ret = svc_claim(cat, type, 1, &image, &use, &cl);
    if (ret < 0)
        return ret;
    ret = snap_check(cat, image, op, snap);
    if (ret < 0) {
        catalog_unclaim(cl);
        return ret;
    }
    struct snap_arg *a = calloc(1, sizeof *a);
    if (!a || !(a->image = strdup(image)) || !(a->op = strdup(op)) || !(a->snap = strdup(snap))) {
        if (a)
            snap_free(a);
        catalog_unclaim(cl);
        return err_fail(ENOMEM, "out of memory");
    }
    a->cat = cat;
    a->claim = cl;
    return svc_submit(js, cl, type, image, NULL, json_pack("{s:s}", "snapshot", snap), snap_run, a, snap_free, job);
}

/* ---- check ---- */

struct check_arg {
    struct catalog *cat;
    struct catalog_claim *claim;
    char *image;
    enum qcow2_repair repair;
};

static void check_free(void *p)
{
    struct check_arg *a = p;
    catalog_unclaim(a->claim);
    free(a->image);
    free(a);
}

static int check_run(struct job *j, void *p, json_t **result)
{
    struct check_arg *a = p;
    bool repair = a->repair != QCOW2_REPAIR_NONE;
    int ret = svc_reserve(j, a->cat, a->image, repair);
    if (ret < 0)
        return ret;
    /* the file as qemu-img would see it (read-write only to repair) */
    struct catalog_private *h = NULL;
    struct catalog_private_opts po = {.write = repair, .allow_corrupt = true};
    ret = catalog_open_private(a->cat, a->image, &po, &h);
    struct qcow2_image *img = h ? catalog_private_qcow2(h) : NULL;
    job_progress(j, 0, 1);
    struct qcow2_check_result r, fixed = {0};
    if (ret == 0)
        ret = qcow2_check_progress(img, a->repair, &r, NULL, NULL, job_progress, j); /* pause/cancel inside */
    if (ret == 0 && repair) {
        fixed = r;
        ret = qcow2_check(img, QCOW2_REPAIR_NONE, &r, NULL, NULL);
        r.leaks_fixed = fixed.leaks_fixed;
        r.corruptions_fixed = fixed.corruptions_fixed;
    }
    int cl = catalog_close_private(h, repair);
    if (ret == 0)
        ret = cl;
    if (ret == 0) {
        char file[CATALOG_NAME_MAX + sizeof CATALOG_SUFFIX];
        snprintf(file, sizeof file, "%s%s", a->image, CATALOG_SUFFIX);
        *result = qj_check(file, &r);
        job_progress(j, 1, 1);
    }
    catalog_release(a->cat, a->image);
    return ret;
}

int svc_check_job(struct jobs *js, struct catalog *cat, const char *image, const char *repair, json_t **job)
{
    enum qcow2_repair rep = QCOW2_REPAIR_NONE;
    if (repair && !strcmp(repair, "leaks"))
        rep = QCOW2_REPAIR_LEAKS;
    else if (repair && !strcmp(repair, "all"))
        rep = QCOW2_REPAIR_ALL;
    else if (repair)
        return err_fail(EINVAL, "repair must be \"leaks\" or \"all\"");
    struct catalog_claim *cl;
    enum catalog_use use = rep == QCOW2_REPAIR_NONE ? CATALOG_USE_READ : CATALOG_USE_CHANGE;
    int ret = svc_claim(cat, "check", 1, &image, &use, &cl);
    if (ret < 0)
        return ret;
    /* a corrupt image is what check is for: only a missing one is refused now */
    struct catalog_image *ci;
    ret = catalog_get(cat, image, &ci);
    if (ret == -EINVAL || ret == -ENOENT) {
        catalog_unclaim(cl);
        return ret;
    }
    if (ret == 0)
        catalog_put(ci);
    struct check_arg *a = calloc(1, sizeof *a);
    if (!a || !(a->image = strdup(image))) {
        free(a);
        catalog_unclaim(cl);
        return err_fail(ENOMEM, "out of memory");
    }
    a->cat = cat;
    a->claim = cl;
    a->repair = rep;
    json_t *params = repair ? json_pack("{s:s}", "repair", repair) : json_object();
    return svc_submit(js, cl, "check", image, NULL, params, check_run, a, check_free, job);
}

/* ---- commit ---- */

#define COMMIT_MAX_NAMES 80 /* images a commit may hold: its chain and the users of its base */

struct commit_arg {
    struct catalog *cat;
    struct catalog_claim *claim;
    char *image, *base;                 /* base: a catalog name */
    char *names[COMMIT_MAX_NAMES + 1]; /* reserved while it runs (image first); NULL-terminated */
};

static void commit_free(void *p)
{
    struct commit_arg *a = p;
    catalog_unclaim(a->claim);
    free(a->image);
    free(a->base);
    for (char **n = a->names; *n; n++)
        free(*n);
    free(a);
}

/* The catalog name of a layer's file ("/cat/NAME.qcow2" -> "NAME"), or NULL. */
static char *layer_name(struct qcow2_image *l)
{
    const char *uri = qcow2_get_info(l)->uri, *slash = strrchr(uri, '/');
    const char *file = slash ? slash + 1 : uri;
    size_t n = strlen(file), sl = strlen(CATALOG_SUFFIX);
    if (n <= sl || strcmp(file + n - sl, CATALOG_SUFFIX))
        return NULL;
    return strndup(file, n - sl);
}

static int add_name(struct commit_arg *a, const char *name)
{
    size_t i = 0;
    for (; a->names[i]; i++)
        if (!strcmp(a->names[i], name))
            return 0;
    if (i == COMMIT_MAX_NAMES)
        return err_fail(E2BIG, "the commit would hold more than %d images", COMMIT_MAX_NAMES);
    return (a->names[i] = strdup(name)) ? 0 : err_fail(ENOMEM, "out of memory");
}

/* The users of base met by commit_plan: those reading base through the
 * committed chain (above top, or top itself) see the same disk afterwards;
 * the others see the committed data appear under them. */
struct users {
    struct commit_arg *a;
    size_t chain;       /* a->names[0..chain) is the committed chain */
    char **above;       /* images with top in their chain (their view is kept) */
    size_t n_above;
    char others[512];   /* the other users' names, for the refusal */
    size_t n_others;
    bool force;
};

static int add_above(void *ctx, const char *name)
{
    struct users *u = ctx;
    char **v = realloc(u->above, (u->n_above + 1) * sizeof *v);
    if (!v)
        return err_fail(ENOMEM, "out of memory");
    u->above = v;
    return (u->above[u->n_above++] = strdup(name)) ? 0 : err_fail(ENOMEM, "out of memory");
}

static int add_user(void *ctx, const char *name)
{
    struct users *u = ctx;
    bool kept = false;
    for (size_t i = 0; i < u->chain && !kept; i++)
        kept = !strcmp(u->a->names[i], name);
    for (size_t i = 0; i < u->n_above && !kept; i++)
        kept = !strcmp(u->above[i], name);
    if (!kept && !u->force) {
        size_t len = strlen(u->others);
        if (len + strlen(name) + 5 < sizeof u->others)
            snprintf(u->others + len, sizeof u->others - len, "%s'%s'", u->n_others ? ", " : "", name);
        u->n_others++;
    }
    return add_name(u->a, name);
}

/* Every image of the chain from image down to base, and every catalog image that
 * reads base (their view of it changes). Without force, -ETXTBSY when an image
 * outside the committed chain reads base other than through it (it would see
 * the committed data), naming those images. */
static int commit_plan(struct catalog *cat, struct commit_arg *a, const char *base, bool force)
{
    struct catalog_image *ci;
    int ret = catalog_get(cat, a->image, &ci);
    if (ret < 0)
        return ret;
    struct qcow2_image *top = catalog_image_qcow2(ci), *l = qcow2_backing(top);
    if (!l) {
        catalog_put(ci);
        return err_fail(EINVAL, "image '%s' has no backing file to commit into", a->image);
    }
    ret = add_name(a, a->image);
    for (; l && ret == 0; l = qcow2_backing(l)) {
        char *n = layer_name(l);
        if (!n) {
            ret = err_fail(ENOTSUP, "a backing file of '%s' is not a catalog image", a->image);
            break;
        }
        ret = add_name(a, n);
        bool last = !base || !strcmp(n, base);
        if (last) {
            a->base = n;
            break;
        }
        free(n);
    }
    catalog_put(ci);
    if (ret == 0 && !a->base)
        ret = err_fail(EINVAL, "image '%s' is not in the backing chain of '%s'", base, a->image);
    struct users u = {.a = a, .force = force};
    while (a->names[u.chain])
        u.chain++;
    if (ret == 0 && !force)
        ret = catalog_backing_users(cat, a->image, add_above, &u);
    if (ret == 0)
        ret = catalog_backing_users(cat, a->base, add_user, &u);
    if (ret == 0 && u.n_others)
        ret = err_fail(ETXTBSY,
                       "image '%s' is also the backing file of %s%s: a commit into it changes what %s read%s; "
                       "send \"force\": true to commit all the same",
                       a->base, u.others, u.n_others > 1 && strlen(u.others) + 40 > sizeof u.others ? " and more" : "",
                       u.n_others > 1 ? "they" : "it", u.n_others > 1 ? "" : "s");
    for (size_t i = 0; i < u.n_above; i++)
        free(u.above[i]);
    free(u.above);
    if (ret == 0)
        err_clear();
    return ret;
}

static int commit_run(struct job *j, void *p, json_t **result)
{
    struct commit_arg *a = p;
    struct catalog *cat = a->cat;
    int ret = 0;
    size_t held = 0;
    /* everyone out: base's data changes under every image that reads it */
    for (; a->names[held] && ret == 0; held++)
        if ((ret = svc_reserve(j, cat, a->names[held], true)) < 0)
            break;
    for (size_t i = 0; ret == 0 && i < held; i++)
        ret = catalog_flush(cat, a->names[i]);
    for (size_t i = 0; i < held; i++)
        catalog_drop(cat, a->names[i]);
    char *base_uri = ret == 0 ? catalog_uri(cat, a->base) : NULL;
    struct catalog_private *top = NULL;
    if (ret == 0 && !base_uri)
        ret = err_fail(ENOMEM, "out of memory");
    struct catalog_private_opts po = {.write = true};
    if (ret == 0)
        ret = catalog_open_private(cat, a->image, &po, &top);
    bool opened = ret == 0;
    if (ret == 0) {
        struct qcow2_commit_opts co = {.base = base_uri, .progress = job_progress, .opaque = j};
        ret = qcow2_commit(catalog_private_qcow2(top), &co);
        int cl = catalog_close_private(top, false); /* every name is dropped and announced below */
        if (ret == 0)
            ret = cl;
    }
    /* the cached handles read the old base: open afresh from now on */
    for (size_t i = 0; i < held; i++)
        catalog_drop(cat, a->names[i]);
    for (size_t i = 0; i < held; i++)
        catalog_release(cat, a->names[i]);
    for (size_t i = 0; i < held && opened; i++)
        catalog_changed(cat, a->names[i]);
    if (ret == 0)
        *result = json_pack("{s:s,s:s}", "top", a->image, "base", a->base);
    free(base_uri);
    return ret;
}

int svc_commit_job(struct jobs *js, struct catalog *cat, const char *image, const char *base, bool force,
                   json_t **job)
{
    int ret = svc_usable(cat, image);
    if (ret == 0 && base && (ret = catalog_valid_name(base)) < 0)
        ret = err_prefix(ret, "base");
    if (ret < 0)
        return ret;
    struct commit_arg *a = calloc(1, sizeof *a);
    if (!a || !(a->image = strdup(image))) {
        free(a);
        return err_fail(ENOMEM, "out of memory");
    }
    a->cat = cat;
    ret = commit_plan(cat, a, base, force);
    if (ret < 0) {
        commit_free(a);
        return ret;
    }
    size_t n = 0;
    enum catalog_use uses[COMMIT_MAX_NAMES];
    for (; a->names[n]; n++)
        uses[n] = CATALOG_USE_CHANGE;
    ret = svc_claim(cat, "commit", n, (const char *const *)a->names, uses, &a->claim);
    if (ret < 0) {
        commit_free(a);
        return ret;
    }
    json_t *params = json_pack("{s:s}", "base", a->base);
    return svc_submit(js, a->claim, "commit", image, (const char *const *)a->names, params, commit_run, a, commit_free,
                      job);
}
