/* sweep.c: unfinished multipart uploads nobody will finish: those of dead runs
 * (by their staging meta files) and, store-wide under the catalog, those older
 * than stale-upload that this process does not own; at start, then hourly. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include "err.h"
#include "s3_int.h"
#include "s3_obj.h"

/* A store's clock and ours may differ; SigV4 itself refuses requests more
 * than 15 minutes off, so a store we talk to is within this of us. */
#define CLOCK_SKEW_S (15 * 60)
/* The periodic sweep's period (shorter when stale-upload is). */
#define SWEEP_PERIOD_S 3600

/* ---- the uploads this process owns ---- */

static pthread_mutex_t own_lock = PTHREAD_MUTEX_INITIALIZER;
static char **own;
static size_t nown, capown;

void s3_sweep_own(const char *id)
{
    char *s = strdup(id);
    pthread_mutex_lock(&own_lock);
    if (s && nown == capown) {
        size_t n = capown ? capown * 2 : 16;
        char **v = realloc(own, n * sizeof *v);
        if (v) {
            own = v;
            capown = n;
        }
    }
    if (s && nown < capown) {
        own[nown++] = s;
        s = NULL;
    }
    pthread_mutex_unlock(&own_lock);
    free(s); /* out of memory: only a sweep with stale-upload shorter than the upload is at stake */
}

void s3_sweep_disown(const char *id)
{
    pthread_mutex_lock(&own_lock);
    for (size_t i = 0; i < nown; i++)
        if (!strcmp(own[i], id)) {
            free(own[i]);
            own[i] = own[--nown];
            break;
        }
    pthread_mutex_unlock(&own_lock);
}

static int owned(const char *id)
{
    int r = 0;
    pthread_mutex_lock(&own_lock);
    for (size_t i = 0; i < nown && !r; i++)
        r = !strcmp(own[i], id);
    pthread_mutex_unlock(&own_lock);
    return r;
}

/* ---- aborting what the listings find ---- */

struct pick {
    const char *bucket;
    const char *key;   /* only this key (a dead run's), or NULL: any under the prefix */
    int64_t since;     /* key: initiated at or after this ... */
    int64_t until;     /* ... and at or before this */
    int64_t before;    /* no key: initiated before this */
    const char *why;   /* for the log line */
};

static int abort_if(void *ctx, const char *key, const char *id, int64_t initiated)
{
    struct pick *p = ctx;
    if (initiated < 0 || owned(id)) /* ours, or an age not understood (left to a lifecycle rule) */
        return 0;
    if (p->key ? strcmp(key, p->key) || initiated < p->since || initiated > p->until : initiated >= p->before)
        return 0;
    char *uri = NULL;
    if (asprintf(&uri, "s3://%s/%s", p->bucket, key) < 0)
        return 0;
    struct s3_name n = {.bucket = (char *)p->bucket, .key = (char *)key, .uri = uri};
    int r = s3_mpu_abort(&n, id);
    if (r == 0)
        atomic_fetch_add(&s3_stats.uploads_aborted, 1);
    fprintf(stderr, "qcowd: s3: %s: %s an unfinished multipart upload started %lld s ago (%s)%s%s\n", uri,
            r == 0 ? "aborted" : "could not abort", (long long)(time(NULL) - initiated), p->why, r == 0 ? "" : ": ",
            r == 0 ? "" : strerror(-r));
    free(uri);
    err_clear();
    return 0;
}

void s3_sweep_key(const struct s3_name *n, int64_t started)
{
    /* the dead run's CreateMultipartUpload went out at started and took at most
     * every attempt's timeout: an upload of the key from outside that window
     * (another daemon's, later) is not its */
    int64_t took = (int64_t)(s3_conf.retries + 1) * (s3_conf.timeout_ms / 1000 + s3_conf.connect_timeout_ms / 1000);
    struct pick p = {.bucket = n->bucket, .key = n->key, .since = started - CLOCK_SKEW_S,
                     .until = started + took + CLOCK_SKEW_S, .why = "a dead run started it before recording its id"};
    if (s3_mpu_list(n->bucket, n->key, abort_if, &p) < 0)
        fprintf(stderr, "qcowd: s3: %s: looking for the dead run's unrecorded multipart upload: %s\n", n->uri,
                err_msg(-EIO));
    err_clear();
}

/* Every upload under sweep-root older than stale-upload that is not ours. */
static void sweep_store(void)
{
    struct s3_name root;
    if (!s3_conf.sweep_root || !s3_conf.stale_upload_s || s3_name_parse(s3_conf.sweep_root, &root) < 0) {
        err_clear();
        return;
    }
    struct sbuf prefix = {0};
    sbuf_puts(&prefix, root.key);
    if (prefix.len && prefix.p[prefix.len - 1] != '/')
        sbuf_puts(&prefix, "/"); /* s3://b/img never reaches s3://b/img2/ */
    char why[96];
    snprintf(why, sizeof why, "older than stale-upload %llu s", (unsigned long long)s3_conf.stale_upload_s);
    struct pick p = {.bucket = root.bucket, .before = (int64_t)time(NULL) - (int64_t)s3_conf.stale_upload_s,
                     .why = why};
    if (!sbuf_str(&prefix) || s3_mpu_list(root.bucket, prefix.p, abort_if, &p) < 0)
        fprintf(stderr, "qcowd: s3: %s: looking for stale multipart uploads: %s\n", root.uri, err_msg(-ENOMEM));
    err_clear();
    sbuf_free(&prefix);
    s3_name_free(&root);
}

/* ---- dead runs' staging files ---- */

void s3_staging_meta_read(int fd, struct s3_staging_meta *m)
{
    char line[512];
    memset(m, 0, sizeof *m);
    snprintf(m->etag, sizeof m->etag, "-");
    FILE *f = fd >= 0 ? fdopen(fd, "r") : NULL;
    if (!f && fd >= 0)
        close(fd);
    while (f && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (!strncmp(line, "bucket ", 7))
            snprintf(m->bucket, sizeof m->bucket, "%s", line + 7);
        else if (!strncmp(line, "key ", 4))
            snprintf(m->key, sizeof m->key, "%s", line + 4);
        else if (!strncmp(line, "upload-id ", 10))
            snprintf(m->upload_id, sizeof m->upload_id, "%s", line + 10);
        else if (!strncmp(line, "base-etag ", 10))
            snprintf(m->etag, sizeof m->etag, "%s", line + 10);
        else if (!strncmp(line, "pid ", 4))
            m->pid = atol(line + 4);
        else if (!strncmp(line, "mpu-start ", 10))
            m->started = atoll(line + 10);
    }
    if (f)
        fclose(f);
}

/* One deferred publish's leftover, by its meta file name (in the staging
 * folder): removed unless its owner lives (its data file is locked). */
static void sweep_one(const char *dir, const char *name)
{
    char *mpath = NULL, *spath = NULL;
    struct s3_staging_meta m;
    size_t n = strlen(name) - strlen(".meta");
    if (asprintf(&mpath, "%s/%s", dir, name) < 0 || asprintf(&spath, "%s/%.*s.data", dir, (int)n, name) < 0)
        goto out;
    int fd = open(spath, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) < 0) { /* alive */
        close(fd);
        goto out;
    }
    s3_staging_meta_read(open(mpath, O_RDONLY | O_CLOEXEC | O_NOFOLLOW), &m);
    char uri[1100];
    snprintf(uri, sizeof uri, "s3://%s/%s", m.bucket, m.key);
    fprintf(stderr, "qcowd: s3: %s: dropped the unfinished publish of an earlier run (pid %ld)%s\n", uri, m.pid,
            m.upload_id[0] ? "; its multipart upload is aborted"
            : m.started > 0 ? "; it was starting a multipart upload: looking for it" : "");
    struct s3_name nm = {.bucket = m.bucket, .key = m.key, .uri = uri};
    if (m.upload_id[0] && m.bucket[0] && m.key[0]) {
        if (s3_mpu_abort(&nm, m.upload_id) == 0)
            atomic_fetch_add(&s3_stats.uploads_aborted, 1);
        err_clear();
    } else if (m.started > 0 && m.bucket[0] && m.key[0]) {
        s3_sweep_key(&nm, m.started);
    }
    unlink(spath);
    unlink(mpath);
    if (fd >= 0)
        close(fd);
out:
    free(mpath);
    free(spath);
}

static void sweep_staging(void)
{
    const char *dir = s3_conf.staging_dir, *tail = S3_DEFERRED_TAIL ".meta";
    char mine[32];
    snprintf(mine, sizeof mine, "-%ld-", (long)getpid()); /* ours are alive, and may be half made */
    DIR *d = dir && s3_obj_staging_private(dir) == 0 ? opendir(dir) : NULL;
    err_clear();
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name), tl = strlen(tail);
        if (n > tl && !strcmp(e->d_name + n - tl, tail) && !strstr(e->d_name, mine))
            sweep_one(dir, e->d_name);
    }
    closedir(d);
}

/* ---- the periodic sweep ---- */

static pthread_mutex_t tick_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t tick;
static pthread_t ticker;
static int ticking, stopping;

static void *ticker_main(void *arg)
{
    (void)arg;
    uint64_t period = s3_conf.stale_upload_s < SWEEP_PERIOD_S ? s3_conf.stale_upload_s : SWEEP_PERIOD_S;
    pthread_mutex_lock(&tick_lock);
    while (!stopping) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += (time_t)period;
        while (!stopping && pthread_cond_timedwait(&tick, &tick_lock, &until) != ETIMEDOUT)
            ;
        if (stopping)
            break;
        pthread_mutex_unlock(&tick_lock);
        sweep_store();
        pthread_mutex_lock(&tick_lock);
    }
    pthread_mutex_unlock(&tick_lock);
    return NULL;
}

void s3_sweep_at_start(void)
{
    sweep_staging();
    sweep_store();
    if (!s3_conf.sweep_root || !s3_conf.stale_upload_s)
        return;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_lock(&tick_lock);
    if (!ticking && !stopping && pthread_cond_init(&tick, &ca) == 0) {
        if (pthread_create(&ticker, NULL, ticker_main, NULL) == 0)
            ticking = 1;
        else
            pthread_cond_destroy(&tick);
    }
    pthread_mutex_unlock(&tick_lock);
    pthread_condattr_destroy(&ca);
}

void s3_sweep_stop(void)
{
    pthread_mutex_lock(&tick_lock);
    stopping = 1;
    int t = ticking;
    if (t)
        pthread_cond_signal(&tick);
    pthread_mutex_unlock(&tick_lock);
    if (!t)
        return;
    pthread_join(ticker, NULL);
    pthread_cond_destroy(&tick);
    ticking = 0;
}
