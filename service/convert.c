/* convert.c: the convert job: a catalog image (or one of its snapshots) copied
 * into a new catalog image with other options, built unseen and published at the
 * end (catalog_publish_begin); a cancel or a failure drops it. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "catalog.h"
#include "err.h"
#include "jobops.h"
#include "jobs.h"
#include "qcow2.h"
#include "vfs.h"

#define WINDOW (1u << 20) /* guest bytes read at a time (at least one cluster) */

struct convert_arg {
    struct catalog *cat;
    struct catalog_claim *claim; /* the source read, the target's name reserved */
    char *image, *target, *snapshot;
    struct svc_convert_opts o; /* strings point at the fields above */
};

static void convert_free(void *p)
{
    struct convert_arg *a = p;
    catalog_unclaim(a->claim);
    free(a->image);
    free(a->target);
    free(a->snapshot);
    free(a);
}

static bool all_zero(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

/* One run of guest bytes and what to do with it. */
struct seg {
    uint64_t start, len;
    bool copy; /* belongs in the target */
    bool zero; /* reads as zeroes */
};

/* Copy [w, w+wlen) of src into dst. Flattening copies every cluster that is not
 * all zeroes; keeping the backing file copies only what the top layer holds
 * (its zero runs as zero writes, so they still hide the backing file). */
static int copy_window(struct qcow2_image *src, struct qcow2_image *dst, const struct svc_convert_opts *o,
                       uint32_t cs, uint64_t w, uint64_t wlen, unsigned char *buf)
{
    struct seg segs[64];
    unsigned n = 0;
    bool any = false;
    for (uint64_t off = w; off < w + wlen;) {
        struct qcow2_extent e;
        int ret = qcow2_block_status(src, off, w + wlen - off, &e);
        if (ret < 0)
            return ret;
        if (!e.length || e.start != off)
            return err_fail(ENOTRECOVERABLE, "block status at %" PRIu64 " returned a bad run", off);
        bool copy = o->keep_backing ? e.depth == 0 && e.present : !e.zero;
        if (n && segs[n - 1].copy == copy && segs[n - 1].zero == e.zero) {
            segs[n - 1].len += e.length;
        } else {
            if (n == sizeof segs / sizeof segs[0])
                return err_fail(ENOTRECOVERABLE, "too many runs in one window at %" PRIu64, w);
            segs[n++] = (struct seg){off, e.length, copy, e.zero};
        }
        any |= copy;
        off += e.length;
    }
    if (!any)
        return 0;
    int ret = qcow2_pread(src, buf, (size_t)wlen, w);
    if (ret < 0)
        return ret;
    for (unsigned i = 0; i < n; i++) {
        struct seg *s = &segs[i];
        if (!s->copy)
            continue;
        if (s->zero) {
            /* in keep-backing mode only: hide the backing file's bytes */
            ret = qcow2_pwrite_zeroes(dst, s->start, s->len);
            if (ret < 0)
                return ret;
            continue;
        }
        for (uint64_t p = s->start; p < s->start + s->len;) {
            uint64_t cend = (p / cs + 1) * cs, end = s->start + s->len;
            uint64_t q = cend < end ? cend : end;
            unsigned char *b = buf + (p - w);
            size_t len = (size_t)(q - p);
            bool whole = p % cs == 0 && (q == cend || q == qcow2_size(dst));
            if (!o->keep_backing && all_zero(b, len))
                ret = 0; /* the new image reads zeroes there already */
            else if (o->compress && whole)
                ret = qcow2_pwrite_compressed(dst, b, len, p);
            else
                ret = qcow2_pwrite(dst, b, len, p);
            if (ret < 0)
                return ret;
            p = q;
        }
    }
    return 0;
}

static int convert_run(struct job *j, void *p, json_t **result)
{
    struct convert_arg *a = p;
    struct catalog *cat = a->cat;
    /* writers out of the source for a point-in-time copy; nobody near the target */
    int ret = svc_reserve(j, cat, a->image, false);
    if (ret < 0)
        return ret;
    ret = svc_reserve(j, cat, a->target, true);
    if (ret < 0) {
        catalog_release(cat, a->image);
        return ret;
    }
    struct vfs_pending *pend = NULL;
    struct catalog_private *srch = NULL;
    struct qcow2_image *src = NULL, *dst = NULL;
    unsigned char *buf = NULL;
    ret = catalog_publish_begin(cat, "convert", a->target, &pend);
    if (ret < 0)
        goto out;
    const char *tmp = vfs_pending_uri(pend);
    struct catalog_private_opts so = {.snapshot = a->snapshot};
    ret = catalog_open_private(cat, a->image, &so, &srch);
    if (ret < 0)
        goto out;
    src = catalog_private_qcow2(srch);
    const struct qcow2_info *in = qcow2_get_info(src);
    struct qcow2_create_opts co = {
        .size = qcow2_size(src),
        .cluster_size = a->o.cluster_size ? a->o.cluster_size : in->cluster_size,
        .extended_l2 = a->o.extended_l2 < 0 ? in->extended_l2 : a->o.extended_l2 != 0,
        .refcount_bits = a->o.refcount_bits,
        .compression_zstd = a->o.zstd,
    };
    if (a->o.keep_backing && in->backing_file) {
        co.backing_file = in->backing_file; /* a catalog name, as the catalog checked */
        co.backing_format = "qcow2";
    }
    ret = qcow2_create(tmp, &co);
    if (ret < 0)
        goto out;
    /* on a store that stages the new object (S3), the data it has sent need not
     * stay: every guest cluster is written once and the target is never read */
    struct qcow2_open_opts d = {
        .contained = true, .read_write = true, .cache_unsafe = true, .release_data = vfs_pending_deferred(pend)};
    ret = qcow2_open(tmp, &d, &dst);
    if (ret < 0)
        goto out;
    uint32_t cs = qcow2_get_info(dst)->cluster_size;
    uint64_t win = WINDOW > cs ? WINDOW : cs, size = qcow2_size(src);
    buf = malloc(win);
    if (!buf) {
        ret = err_fail(ENOMEM, "out of memory");
        goto out;
    }
    for (uint64_t w = 0; w < size && ret == 0; w += win) {
        ret = job_progress(j, w, size);
        if (ret == 0)
            ret = copy_window(src, dst, &a->o, cs, w, size - w < win ? size - w : win, buf);
    }
    if (ret == 0)
        ret = job_progress(j, size, size);
    if (ret == 0) {
        /* durable before it gets its name, whatever cache_unsafe skipped */
        struct vfs_file *f;
        ret = qcow2_flush(dst);
        int cl = qcow2_close(dst);
        dst = NULL;
        if (ret == 0)
            ret = cl;
        if (ret == 0 && (ret = vfs_open(tmp, VFS_O_RDWR, &f)) == 0) {
            ret = vfs_flush(f);
            vfs_close(f);
        }
    }
    if (ret == 0)
        ret = catalog_publish(cat, pend, a->target);
    if (ret == 0) {
        *result = json_pack("{s:s}", "target", a->target);
    }
out:
    if (dst)
        qcow2_close(dst);
    catalog_close_private(srch, false);
    catalog_publish_end(cat, pend); /* not published: dropped */
    free(buf);
    catalog_release(cat, a->target);
    catalog_release(cat, a->image);
    return ret;
}

int svc_convert_job(struct jobs *js, struct catalog *cat, const char *image, const struct svc_convert_opts *o,
                    json_t *params, json_t **job)
{
    int ret = catalog_valid_name(image);
    if (ret == 0 && !o->target)
        ret = err_fail(EINVAL, "\"target\" (a new image name) is required");
    if (ret == 0 && (ret = catalog_valid_name(o->target)) < 0)
        ret = err_prefix(ret, "target");
    /* the target's name is reserved from now to the job's end (a create or an
     * upload of it is refused), and the source kept from a delete */
    struct catalog_claim *cl = NULL;
    if (ret == 0 && strcmp(image, o->target)) {
        const char *names[] = {image, o->target};
        const enum catalog_use uses[] = {CATALOG_USE_READ, CATALOG_USE_CREATE};
        ret = svc_claim(cat, "convert", 2, names, uses, &cl);
    }
    uint32_t cs = o->cluster_size;
    if (ret == 0 && cs && (cs < 512 || cs > (2u << 20) || (cs & (cs - 1))))
        ret = err_fail(EINVAL, "cluster-size must be a power of two from 512 to 2097152");
    unsigned rb = o->refcount_bits;
    if (ret == 0 && rb && (rb > 64 || (rb & (rb - 1))))
        ret = err_fail(EINVAL, "refcount-bits must be 1, 2, 4, 8, 16, 32 or 64");
    if (ret == 0 && !strcmp(image, o->target))
        ret = err_fail(EINVAL, "the target must be another image");
    struct catalog_image *ci = NULL;
    if (ret == 0)
        ret = catalog_get(cat, o->target, &ci);
    if (ret == 0) {
        catalog_put(ci);
        ret = err_fail(EEXIST, "an image named '%s' already exists", o->target);
    } else if (ret == -ENOENT || ret == -EBUSY) {
        ret = 0;
    } else if (ret != -EINVAL) {
        ret = err_fail(EEXIST, "an image named '%s' already exists (and cannot be used: %s)", o->target,
                       err_msg(ret));
    }
    if (ret == 0)
        ret = svc_usable(cat, image);
    if (ret == 0)
        ret = catalog_check_space(cat, 0); /* the copy's size is known only as it is made */
    if (ret == 0 && o->snapshot && !svc_has_snapshot(cat, image, o->snapshot))
        ret = err_fail(ENOENT, "image '%s' has no snapshot '%s'", image, o->snapshot);
    if (ret < 0) {
        catalog_unclaim(cl);
        json_decref(params);
        return ret;
    }
    struct convert_arg *a = calloc(1, sizeof *a);
    if (!a || !(a->image = strdup(image)) || !(a->target = strdup(o->target)) ||
        (o->snapshot && !(a->snapshot = strdup(o->snapshot)))) {
        if (a)
            convert_free(a);
        catalog_unclaim(cl);
        json_decref(params);
        return err_fail(ENOMEM, "out of memory");
    }
    a->cat = cat;
    a->claim = cl;
    a->o = *o;
    a->o.target = a->target;
    a->o.snapshot = a->snapshot;
    const char *locks[] = {o->target, NULL};
    return svc_submit(js, cl, "convert", image, locks, params, convert_run, a, convert_free, job);
}
