/* snapshots.c: /v1/images/{name}/snapshots: the list (qemu-img's fields), create,
 * delete and revert as jobs, and the guest bytes of one snapshot (Range). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_int.h"
#include "catalog.h"
#include "err.h"
#include "jobops.h"
#include "qcow2.h"

enum MHD_Result api_snapshots_list(struct req *r, char **args)
{
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, args[0], &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    json_t *a = api_snapshots_json(catalog_image_qcow2(ci));
    catalog_put(ci);
    return api_reply_json(r, 200, json_pack("{s:o}", "snapshots", a));
}

static enum MHD_Result snap_job(struct req *r, const char *image, const char *op, const char *snap)
{
    if (!r->jobs)
        return api_reply_status(r, 503, "unavailable", "the job engine is not running", NULL, NULL);
    json_t *job;
    int ret = svc_snapshot_job(r->jobs, r->cat, image, op, snap, &job);
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_reply_job(r, job);
}

static enum MHD_Result create_end(struct req *r, const char *name, json_t *body)
{
    const char *snap = NULL;
    json_error_t je;
    if (json_unpack_ex(body, &je, JSON_STRICT, "{s:s}", "name", &snap) < 0) {
        char msg[300];
        snprintf(msg, sizeof msg, "bad snapshot request: %s", je.text);
        return api_reply_error(r, -EINVAL, msg);
    }
    return snap_job(r, name, "create", snap);
}

enum MHD_Result api_snapshot_create(struct req *r, char **args)
{
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, args[0], &ci);
    if (ret < 0 && ret != -EBUSY)
        return api_reply_errno(r, ret);
    catalog_put(ret == 0 ? ci : NULL);
    return api_json_body(r, args[0], create_end);
}

enum MHD_Result api_snapshot_delete(struct req *r, char **args)
{
    return snap_job(r, args[0], "delete", args[1]);
}

enum MHD_Result api_snapshot_revert(struct req *r, char **args)
{
    return snap_job(r, args[0], "revert", args[1]);
}

enum MHD_Result api_snapshot_data(struct req *r, char **args)
{
    struct catalog_image *ci;
    int ret = catalog_get(r->cat, args[0], &ci);
    if (ret < 0)
        return api_reply_errno(r, ret);
    /* the view reads the file: the shared handle's pending metadata first */
    char *uri = catalog_uri(r->cat, args[0]);
    ret = uri ? catalog_flush(r->cat, args[0]) : err_fail(ENOMEM, "out of memory");
    catalog_put(ci);
    struct qcow2_image *view = NULL;
    if (ret == 0) {
        struct qcow2_open_opts o = {.contained = true, .snapshot = args[1], .l2_cache_bytes = 1u << 20};
        ret = qcow2_open(uri, &o, &view);
        if (ret == -ENOENT)
            ret = err_fail(ENOENT, "image '%s' has no snapshot '%s'", args[0], args[1]);
        else if (ret == -EINVAL) /* the image opened above: the snapshot's own metadata is bad */
            ret = err_prefix(-EUCLEAN, "image '%s', snapshot '%s'", args[0], args[1]);
    }
    free(uri);
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_send_data(r, view, NULL, view);
}
