/* s3.c: the "s3" VFS plugin: s3://BUCKET/KEY on an S3-compatible store
 * (path-style URLs), its store-level calls (stat, list, remove, rename as copy
 * plus delete), configuration, counters, and the plugin's entry point. */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "err.h"
#include "s3_int.h"
#include "s3_obj.h"
#include "vfs_plugin.h"

/* ---- names ---- */

int s3_name_parse(const char *path, struct s3_name *n)
{
    memset(n, 0, sizeof *n);
    while (*path == '/')
        path++;
    size_t bl = strcspn(path, "/");
    if (bl == 0)
        return err_fail(EINVAL, "s3:%s: no bucket name (want s3://BUCKET/KEY)", path);
    const char *key = path[bl] == '/' ? path + bl + 1 : "";
    n->bucket = strndup(path, bl);
    n->key = strdup(key);
    if (!n->bucket || !n->key || asprintf(&n->uri, "s3://%s%s%s", n->bucket, *key ? "/" : "", key) < 0) {
        n->uri = NULL;
        s3_name_free(n);
        return err_fail(ENOMEM, "s3: out of memory");
    }
    return 0;
}

void s3_name_free(struct s3_name *n)
{
    free(n->bucket);
    free(n->key);
    free(n->uri);
    memset(n, 0, sizeof *n);
}

/* ---- HEAD ---- */

int64_t s3_http_date(const char *s)
{
    struct tm tm = {0};
    if (!s || !strptime(s, "%a, %d %b %Y %H:%M:%S", &tm))
        return 0;
    return (int64_t)timegm(&tm);
}

/* A HEAD answer has no body, so a 403 does not say why: ask the same resource
 * with a GET (one byte of the object, or a one-key listing of the bucket) whose
 * error body names the cause. */
static int explain_denied(const struct s3_name *n, int ret, const char *what)
{
    struct s3_param p[2] = {{"list-type", "2"}, {"max-keys", "1"}};
    struct s3_hdr h = {"range", "bytes=0-0"};
    char byte[1];
    struct s3_req r = {.op = S3_OP_GET, .method = "GET", .bucket = n->bucket, .into = byte, .into_cap = 1};
    if (n->key[0]) {
        r.key = n->key;
        r.hdrs = &h;
        r.nhdrs = 1;
    } else {
        r.params = p;
        r.nparams = 2;
    }
    int r2 = s3_http(&r, what);
    s3_req_free(&r);
    return r2 == -EACCES ? r2 : err_fail(-ret, "%s: access denied by the S3 store (403 Forbidden)", what);
}

int s3_head_bucket(const struct s3_name *n)
{
    struct s3_req r = {.op = S3_OP_HEAD, .method = "HEAD", .bucket = n->bucket, .quiet_404 = 1};
    char what[320];
    snprintf(what, sizeof what, "bucket s3://%s", n->bucket);
    int ret = s3_http(&r, what);
    if (ret == -ENOENT)
        ret = err_fail(ENOENT, "bucket '%s' does not exist at %s", n->bucket, s3_conf.endpoint);
    else if (ret == -EACCES)
        ret = explain_denied(n, ret, what);
    s3_req_free(&r);
    return ret;
}

uint64_t s3_etag_version(const char *etag)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)etag; *p; p++)
        h = (h ^ *p) * 0x100000001b3ull;
    return h ? h : 1;
}

int s3_head_object(const struct s3_name *n, struct s3_head *h)
{
    struct s3_req r = {.op = S3_OP_HEAD, .method = "HEAD", .bucket = n->bucket, .key = n->key, .quiet_404 = 1};
    char what[320];
    snprintf(what, sizeof what, "stat %s", n->uri);
    uint64_t stamp = s3_meta_stamp();
    int ret = s3_http(&r, what);
    if (ret == -EACCES)
        ret = explain_denied(n, ret, what);
    if (ret == 0) {
        h->size = r.content_length;
        h->mtime = s3_http_date(r.last_modified);
        snprintf(h->etag, sizeof h->etag, "%s", r.etag);
        h->listed = 0;
        struct s3_meta m = {.exists = 1, .size = h->size, .mtime = h->mtime};
        snprintf(m.etag, sizeof m.etag, "%s", h->etag);
        s3_meta_learn(n->bucket, n->key, &m, stamp);
    } else if (ret == -ENOENT) {
        /* a HEAD answer has no body: ask the bucket which one is missing */
        ret = s3_head_bucket(n);
        if (ret == 0) {
            struct s3_meta m = {.exists = 0};
            s3_meta_learn(n->bucket, n->key, &m, stamp);
            ret = err_fail(ENOENT, "%s: no such object", n->uri);
        }
    }
    s3_req_free(&r);
    return ret;
}

int s3_stat_object(const struct s3_name *n, struct s3_head *h)
{
    struct s3_meta m;
    if (!s3_meta_get(n->bucket, n->key, &m))
        return s3_head_object(n, h);
    if (!m.exists)
        return err_fail(ENOENT, "%s: no such object", n->uri);
    h->size = m.size;
    h->mtime = m.mtime;
    snprintf(h->etag, sizeof h->etag, "%s", m.etag);
    h->listed = m.listed;
    return 0;
}

void s3_meta_own(const struct s3_name *n, const struct s3_head *h, int gone)
{
    struct s3_meta m = {.exists = !!h};
    if (h) {
        m.size = h->size;
        m.mtime = h->mtime ? h->mtime : (int64_t)time(NULL);
        snprintf(m.etag, sizeof m.etag, "%s", h->etag);
    }
    s3_meta_set(n->bucket, n->key, h || gone ? &m : NULL);
}

/* An ISO 8601 time of a listing ("2026-11-24T23:02:53.000Z"), to whole seconds. */
static int64_t parse_iso_date(const char *s)
{
    struct tm tm = {0};
    if (!s || !strptime(s, "%Y-%m-%dT%H:%M:%S", &tm))
        return 0;
    return (int64_t)timegm(&tm);
}

/* What a listing's <Contents> entry tells of its object. */
static void learn_entry(const struct s3_name *n, const char *key, const char *block, uint64_t stamp)
{
    char *etag = s3_xml_next(block, "ETag", NULL), *size = s3_xml_next(block, "Size", NULL),
         *lm = s3_xml_next(block, "LastModified", NULL);
    char *end = NULL;
    struct s3_meta m = {.exists = 1, .mtime = parse_iso_date(lm), .listed = 1};
    if (size)
        m.size = strtoull(size, &end, 10);
    if (etag && *etag && size && end && end != size && !*end && strlen(etag) < sizeof m.etag) {
        snprintf(m.etag, sizeof m.etag, "%s", etag);
        s3_meta_learn(n->bucket, key, &m, stamp);
    }
    free(etag);
    free(size);
    free(lm);
}

/* ---- listing ---- */

struct list_page {
    struct sbuf token; /* continuation token, "" for the first page */
    int truncated;
};

/* One ListObjectsV2 page of prefix: cb per name below prefix (folders once,
 * without their '/'), or when max_keys is 1 just *any = 1 if there is something. */
static int list_page(const struct s3_name *n, const char *prefix, int max_keys, struct list_page *pg,
                     int (*cb)(void *ctx, const char *name), void *ctx, int *any)
{
    struct s3_param p[5] = {{"list-type", "2"}, {"prefix", prefix}, {"delimiter", "/"}};
    size_t np = 3;
    char mk[16];
    if (max_keys) {
        snprintf(mk, sizeof mk, "%d", max_keys);
        p[np++] = (struct s3_param){"max-keys", mk};
    }
    if (pg->token.len)
        p[np++] = (struct s3_param){"continuation-token", pg->token.p};
    struct s3_req r = {.op = S3_OP_LIST, .method = "GET", .bucket = n->bucket, .params = p, .nparams = np};
    char what[320];
    snprintf(what, sizeof what, "list s3://%s/%s", n->bucket, prefix);
    uint64_t stamp = s3_meta_stamp();
    int ret = s3_http(&r, what);
    const char *t = ret == 0 ? sbuf_str(&r.text) : NULL;
    if (ret == 0 && !t)
        ret = err_fail(ENOMEM, "%s: out of memory", what);
    size_t pl = strlen(prefix);
    const char *pos = t;
    static const char *const kinds[2][2] = {{"Contents", "Key"}, {"CommonPrefixes", "Prefix"}};
    for (int k = 0; k < 2 && ret == 0; k++) {
        char *block;
        pos = t;
        while (ret == 0 && (block = s3_xml_raw(t, kinds[k][0], &pos))) {
            char *name = s3_xml_next(block, kinds[k][1], NULL);
            if (name && k == 0)
                learn_entry(n, name, block, stamp);
            free(block);
            if (!name) {
                ret = err_fail(ENOMEM, "%s: out of memory", what);
                break;
            }
            size_t len = strlen(name);
            if (k == 1 && len && name[len - 1] == '/')
                name[--len] = '\0';
            if (len > pl && !strncmp(name, prefix, pl)) {
                if (any)
                    *any = 1;
                if (cb)
                    ret = cb(ctx, name + pl);
            } else if (any && len >= pl) {
                *any = 1; /* the folder marker "prefix/" itself */
            }
            free(name);
        }
    }
    if (ret == 0) {
        char *trunc = s3_xml_next(t, "IsTruncated", NULL), *tok = s3_xml_next(t, "NextContinuationToken", NULL);
        pg->truncated = trunc && !strcmp(trunc, "true") && tok && *tok;
        pg->token.len = 0;
        if (pg->truncated)
            sbuf_puts(&pg->token, tok);
        free(trunc);
        free(tok);
    }
    s3_req_free(&r);
    return ret;
}

static int s3_list(const char *dir, int (*cb)(void *ctx, const char *name), void *ctx)
{
    struct s3_name n;
    int ret = s3_name_parse(dir, &n);
    if (ret < 0)
        return ret;
    struct sbuf prefix = {0};
    sbuf_puts(&prefix, n.key);
    if (prefix.len && prefix.p[prefix.len - 1] != '/')
        sbuf_puts(&prefix, "/");
    struct list_page pg = {0};
    do
        ret = list_page(&n, sbuf_str(&prefix) ? sbuf_str(&prefix) : "", 0, &pg, cb, ctx, NULL);
    while (ret == 0 && pg.truncated);
    sbuf_free(&pg.token);
    sbuf_free(&prefix);
    s3_name_free(&n);
    return ret;
}

/* ---- stat, remove, rename ---- */

static int s3_stat(const char *path, struct vfs_stat *st)
{
    struct s3_name n;
    int ret = s3_conf_ready();
    if (ret < 0 || (ret = s3_name_parse(path, &n)) < 0)
        return ret;
    size_t kl = strlen(n.key);
    memset(st, 0, sizeof *st);
    if (kl == 0 || n.key[kl - 1] == '/') {
        /* the bucket, or a folder named with its '/': it exists with the bucket */
        ret = s3_head_bucket(&n);
        st->is_dir = ret == 0;
        goto out;
    }
    struct s3_head h;
    ret = s3_stat_object(&n, &h);
    if (ret == 0) {
        st->size = st->allocated = h.size;
        st->mtime = h.mtime;
        st->version = s3_etag_version(h.etag);
    } else if (ret == -ENOENT && strstr(err_msg(ret), "no such object")) {
        struct sbuf prefix = {0};
        struct list_page pg = {0};
        int any = 0;
        sbuf_printf(&prefix, "%s/", n.key);
        int r = list_page(&n, sbuf_str(&prefix) ? prefix.p : "", 1, &pg, NULL, NULL, &any);
        sbuf_free(&prefix);
        sbuf_free(&pg.token);
        if (r < 0)
            ret = r;
        else if (any) {
            st->is_dir = 1;
            ret = 0;
        } else
            ret = err_fail(ENOENT, "%s: no such object", n.uri);
    }
out:
    s3_name_free(&n);
    return ret;
}

static int delete_object(const struct s3_name *n)
{
    struct s3_req r = {.op = S3_OP_DELETE, .method = "DELETE", .bucket = n->bucket, .key = n->key};
    char what[320];
    snprintf(what, sizeof what, "remove %s", n->uri);
    int ret = s3_http(&r, what);
    s3_req_free(&r);
    return ret;
}

static int s3_remove(const char *path)
{
    struct s3_name n;
    int ret = s3_conf_ready();
    if (ret < 0 || (ret = s3_name_parse(path, &n)) < 0)
        return ret;
    s3_obj_forget(&n);
    ret = delete_object(&n);
    s3_meta_own(&n, NULL, ret == 0);
    s3_name_free(&n);
    return ret;
}

/* An object too large for CopyObject: a multipart upload of parts the store
 * copies (copy-max each, more when 10000 would not do). */
static int copy_large(const struct s3_name *from, const struct s3_name *to, uint64_t size, struct s3_head *out)
{
    uint64_t part = s3_conf.copy_max;
    while ((size + part - 1) / part > 10000)
        part *= 2;
    if (part > (5ull << 30))
        return err_fail(EFBIG, "copy %s: %llu bytes is more than S3 takes", from->uri, (unsigned long long)size);
    unsigned n = (unsigned)((size + part - 1) / part);
    char(*etags)[128] = calloc(n, sizeof *etags);
    char *id = NULL, etag[128];
    if (!etags)
        return err_fail(ENOMEM, "copy %s: out of memory", from->uri);
    int ret = s3_mpu_start(to, &id);
    for (unsigned i = 0; ret == 0 && i < n; i++) {
        uint64_t s = (uint64_t)i * part, e = s + part < size ? s + part : size;
        ret = s3_mpu_copy_part(to, id, i + 1, from, s, e, etags[i], sizeof etags[i]);
    }
    if (ret == 0)
        ret = s3_mpu_complete(to, id, etags, n, etag, sizeof etag);
    if (ret == 0)
        snprintf(out->etag, sizeof out->etag, "%s", etag);
    if (ret < 0 && id)
        s3_mpu_abort(to, id);
    free(id);
    free(etags);
    return ret;
}

/* CopyObject: the store copies from to to in one request. */
/* *out gets the new object's ETag and mtime when the answer gives them ("" and
 * 0 if not). */
static int copy_object(const struct s3_name *from, const struct s3_name *to, uint64_t size, struct s3_head *out)
{
    char what[640];
    snprintf(what, sizeof what, "rename %s to %s: copy", from->uri, to->uri);
    memset(out, 0, sizeof *out);
    out->size = size;
    if (size > s3_conf.copy_max)
        return copy_large(from, to, size, out);
    struct sbuf src = {0};
    sbuf_puts(&src, "/");
    s3_uri_encode(&src, from->bucket, 0);
    sbuf_puts(&src, "/");
    s3_uri_encode(&src, from->key, 1);
    struct s3_hdr h = {"x-amz-copy-source", sbuf_str(&src) ? src.p : ""};
    struct s3_req r = {.op = S3_OP_COPY, .method = "PUT", .bucket = to->bucket, .key = to->key, .hdrs = &h,
                       .nhdrs = 1};
    int ret = s3_http(&r, what);
    const char *t = sbuf_str(&r.text);
    if (ret == 0 && t && strstr(t, "<Error>"))
        ret = err_fail(EREMOTEIO, "%s: the store failed the copy", what);
    if (ret == 0) {
        atomic_fetch_add(&s3_stats.copied_bytes, size);
        char *etag = s3_xml_next(t, "ETag", NULL), *lm = s3_xml_next(t, "LastModified", NULL);
        if (etag && strlen(etag) < sizeof out->etag)
            snprintf(out->etag, sizeof out->etag, "%s", etag);
        out->mtime = parse_iso_date(lm);
        free(etag);
        free(lm);
    }
    s3_req_free(&r);
    sbuf_free(&src);
    return ret;
}

/* S3 has no rename: copy, then delete the source. The target appears whole
 * (a copy is atomic at its key); a crash in between leaves both. */
static int s3_rename(const char *from, const char *to)
{
    struct s3_name a, b;
    struct s3_head h, copied;
    int ret = s3_conf_ready();
    if (ret < 0 || (ret = s3_name_parse(from, &a)) < 0)
        return ret;
    if ((ret = s3_name_parse(to, &b)) < 0) {
        s3_name_free(&a);
        return ret;
    }
    ret = s3_head_object(&a, &h); /* asked, not known: the size decides how to copy */
    if (ret == 0) {
        s3_obj_forget(&b); /* like rename(2): handles on the old target keep the old file */
        ret = copy_object(&a, &b, h.size, &copied);
        /* an answer without the new ETag leaves the target unknown: asked next time */
        s3_meta_own(&b, ret == 0 && copied.etag[0] ? &copied : NULL, 0);
    }
    if (ret == 0)
        s3_obj_forget(&a);
    if (ret == 0) {
        ret = delete_object(&a);
        s3_meta_own(&a, NULL, ret == 0);
    }
    s3_name_free(&a);
    s3_name_free(&b);
    return ret;
}

/* ---- configuration and counters ---- */

static int s3_config(const char *key, const char *value)
{
    return s3_conf_set(key, value);
}

static int s3_stats_walk(int (*cb)(void *ctx, const char *name, uint64_t value), void *ctx)
{
    char name[64];
    int r = 0;
    for (int i = 0; i < S3_OP_COUNT && !r; i++) {
        snprintf(name, sizeof name, "requests_%s", s3_op_names[i]);
        r = cb(ctx, name, atomic_load(&s3_stats.requests[i]));
    }
    const struct {
        const char *name;
        atomic_ullong *v;
    } more[] = {
        {"bytes_received", &s3_stats.bytes_in},   {"bytes_sent", &s3_stats.bytes_out},
        {"retries", &s3_stats.retries},           {"errors", &s3_stats.errors},
        {"cache_hits", &s3_stats.cache_hits},     {"cache_misses", &s3_stats.cache_misses},
        {"bytes_copied", &s3_stats.copied_bytes}, {"publishes", &s3_stats.publishes},
        {"gets_in_flight_peak", &s3_stats.gets_in_flight_peak},
        {"readahead_gets", &s3_stats.readahead_gets},
        {"readahead_dropped", &s3_stats.readahead_dropped},
        {"readahead_waits", &s3_stats.readahead_waits},
        {"uploads_aborted", &s3_stats.uploads_aborted},
    };
    for (size_t i = 0; i < sizeof more / sizeof more[0] && !r; i++)
        r = cb(ctx, more[i].name, atomic_load(more[i].v));
    return r;
}

/* Each flush publishes a whole new version at once. */
static unsigned s3_caps(void *h)
{
    return VFS_CAP_ATOMIC_FLUSH;
}

static const struct vfs_ops s3_ops = {
    .version = VFS_OPS_VERSION,
    .struct_size = sizeof(struct vfs_ops),
    .name = "s3",
    .thread_model = VFS_THREAD_PARALLEL,
    .open = s3_obj_open,
    .close = s3_obj_close,
    .pread = s3_obj_pread,
    .pwrite = s3_obj_pwrite,
    .flush = s3_obj_flush,
    .size = s3_obj_size,
    .truncate = s3_obj_truncate,
    .caps = s3_caps,
    .list = s3_list,
    .stat = s3_stat,
    .remove = s3_remove,
    .rename = s3_rename,
    .config = s3_config,
    .stats = s3_stats_walk,
    .open_deferred = s3_obj_open_deferred,
    .commit = s3_obj_commit,
    .release = s3_obj_release,
    .wait_room = s3_obj_wait_room,
};

/* A version 1 host gets the table without .config and .stats (the environment
 * still configures the plugin). */
static struct vfs_ops s3_ops_v1;

static void cleanup(void)
{
    s3_sweep_stop();
    s3_pool_stop(&s3_upload_pool);
    s3_pool_stop(&s3_ra_pool);
    s3_http_cleanup();
    s3_meta_cleanup();
}

const struct vfs_host *vfs_host_table; /* the host's functions (plugin_err.c uses them) */

__attribute__((visibility("default"))) const struct vfs_ops *qcowd_vfs_plugin_init(int host_version,
                                                                                  const struct vfs_host *host);
__attribute__((visibility("default"))) const struct vfs_ops *qcowd_vfs_plugin_init(int host_version,
                                                                                  const struct vfs_host *host)
{
    static int registered;
    if (!host || host->version < 1 || host->struct_size < offsetof(struct vfs_host, clear) + sizeof host->clear)
        return NULL;
    vfs_host_table = host;
    if (!registered) {
        registered = 1;
        atexit(cleanup);
    }
    if (host_version >= 2)
        return &s3_ops;
    if (host_version == 1) {
        s3_ops_v1 = s3_ops;
        s3_ops_v1.version = 1;
        s3_ops_v1.struct_size = offsetof(struct vfs_ops, config);
        s3_ops_v1.config = NULL;
        s3_ops_v1.stats = NULL;
        return &s3_ops_v1;
    }
    return NULL;
}
