/* jobops.c: snapshot, check and commit jobs: validation at submit time, then the
 * work on a worker with the images reserved in the catalog (writers refused, and
 * readers too while a snapshot table or a backing chain changes under them). */
#include "jobops.h"

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
    for (;;) {
        int ret = catalog_reserve(cat, name, exclusive, job_owner(j));
        if (ret != -EBUSY)
            return ret;
        /* a request is writing it now: wait for it to finish */
        if (job_cancelled(j))
            return -ECANCELED;
        usleep(20 * 1000);
    }
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

/* ---- snapshots ---- */

struct snap_arg {
    struct catalog *cat;
    char *image, *op, *snap;
};

static void snap_free(void *p)
{
    struct snap_arg *a = p;
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

int svc_snapshot_job(struct jobs *js, struct catalog *cat, const char *image, const char *op, const char *snap,
                     json_t **job)
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
    struct snap_arg *a = calloc(1, sizeof *a);
    if (!a || !(a->image = strdup(image)) || !(a->op = strdup(op)) || !(a->snap = strdup(snap))) {
        if (a)
            snap_free(a);
        return err_fail(ENOMEM, "out of memory");
    }
    a->cat = cat;
    char type[32];
    snprintf(type, sizeof type, "snapshot-%s", op);
    return jobs_submit(js, type, image, NULL, json_pack("{s:s}", "snapshot", snap), snap_run, a, snap_free, job);
}

/* ---- check ---- */

struct check_arg {
    struct catalog *cat;
    char *image;
    enum qcow2_repair repair;
};

static void check_free(void *p)
{
    struct check_arg *a = p;
    free(a->image);
    free(a);
}

static json_t *check_report(const char *file, const struct qcow2_check_result *r)
{
    json_t *o = json_object();
#define PUT_NZ(key, v)                                                                                                 \
    do {                                                                                                               \
        if (v)                                                                                                         \
            json_object_set_new(o, key, json_integer((json_int_t)(v)));                                                \
    } while (0)
    PUT_NZ("image-end-offset", r->image_end_offset);
    PUT_NZ("total-clusters", r->total_clusters);
    PUT_NZ("allocated-clusters", r->allocated_clusters);
    PUT_NZ("fragmented-clusters", r->fragmented_clusters);
    PUT_NZ("compressed-clusters", r->compressed_clusters);
    PUT_NZ("corruptions", r->corruptions);
    PUT_NZ("leaks", r->leaks);
    PUT_NZ("corruptions-fixed", r->corruptions_fixed);
    PUT_NZ("leaks-fixed", r->leaks_fixed);
#undef PUT_NZ
    json_object_set_new(o, "check-errors", json_integer((json_int_t)r->check_errors));
    json_object_set_new(o, "filename", json_string(file));
    json_object_set_new(o, "format", json_string("qcow2"));
    return o;
}

static int check_run(struct job *j, void *p, json_t **result)
{
    struct check_arg *a = p;
    bool repair = a->repair != QCOW2_REPAIR_NONE;
    int ret = svc_reserve(j, a->cat, a->image, repair);
    if (ret < 0)
        return ret;
    char *uri = catalog_uri(a->cat, a->image);
    struct qcow2_image *img = NULL;
    /* the file as qemu-img would see it: the shared handle's pending metadata
     * first, then a private handle (read-write only to repair) */
    ret = uri ? catalog_flush(a->cat, a->image) : err_fail(ENOMEM, "out of memory");
    if (ret == 0 && repair)
        catalog_drop(a->cat, a->image);
    if (ret == 0) {
        struct qcow2_open_opts o = {.contained = true, .read_write = repair, .allow_corrupt = true};
        ret = qcow2_open(uri, &o, &img);
        if (ret == -EINVAL)
            ret = err_prefix(-EUCLEAN, "cannot check image '%s'", a->image);
    }
    job_progress(j, 0, 1);
    struct qcow2_check_result r, fixed = {0};
    if (ret == 0)
        ret = qcow2_check(img, a->repair, &r, NULL, NULL);
    if (ret == 0 && repair) {
        fixed = r;
        ret = qcow2_check(img, QCOW2_REPAIR_NONE, &r, NULL, NULL);
        r.leaks_fixed = fixed.leaks_fixed;
        r.corruptions_fixed = fixed.corruptions_fixed;
    }
    if (img) {
        int cret = repair ? qcow2_flush(img) : 0;
        int cl = qcow2_close(img);
        if (ret == 0)
            ret = cret ? cret : cl;
    }
    if (repair)
        catalog_drop(a->cat, a->image);
    if (ret == 0) {
        char file[CATALOG_NAME_MAX + sizeof CATALOG_SUFFIX];
        snprintf(file, sizeof file, "%s%s", a->image, CATALOG_SUFFIX);
        *result = check_report(file, &r);
        job_progress(j, 1, 1);
    }
    free(uri);
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
    /* a corrupt image is what check is for: only a missing one is refused now */
    struct catalog_image *ci;
    int ret = catalog_get(cat, image, &ci);
    if (ret == -EINVAL || ret == -ENOENT)
        return ret;
    if (ret == 0)
        catalog_put(ci);
    struct check_arg *a = calloc(1, sizeof *a);
    if (!a || !(a->image = strdup(image))) {
        free(a);
        return err_fail(ENOMEM, "out of memory");
    }
    a->cat = cat;
    a->repair = rep;
    json_t *params = repair ? json_pack("{s:s}", "repair", repair) : json_object();
    return jobs_submit(js, "check", image, NULL, params, check_run, a, check_free, job);
}

/* ---- commit ---- */

int svc_commit_job(struct jobs *js, struct catalog *cat, const char *image, const char *base, json_t **job)
{
    int ret = svc_usable(cat, image);
    if (ret < 0)
        return ret;
    return err_fail(ENOTSUP, "commit is not available in this build of qcowd");
}
