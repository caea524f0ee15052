/* object.c: one open S3 object. Reads: ranged GETs of the published version
 * through the block cache; sequential reads keep several read-ahead GETs in
 * flight (pool.c's workers). Writes:
 * a local sparse staging file plus a map of dirty ranges; flush publishes a new
 * object (one PUT, or a multipart upload whose unchanged parts are copied
 * server-side), so readers see the old version or the new one, never a mix.
 * A deferred object (.open_deferred) is a new object for a key, kept out of
 * the registry and published only by its commit. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "err.h"
#include "s3_int.h"
#include "s3_obj.h"

#define MAX_PART_BYTES (5ull << 30) /* S3's largest part and single PUT */
#define MIN_PART_BYTES (5ull << 20) /* S3's smallest part but the last */
#define MAX_PARTS      10000
#define RA_CHUNK_MAX   (8ull << 20) /* the largest read-ahead GET */
#define DEFERRED_TAIL  S3_DEFERRED_TAIL
#define STREAM_WAIT_MS 500 /* the longest one write waits for parts to be sent (staging-max) */

struct ra_job;

struct range {
    uint64_t start, end; /* [start, end) */
};

/* One object open in this process, shared by every handle on its key (as a
 * file's page cache is): a write through one handle is read through all. */
struct obj {
    struct s3_name n;
    int rw;       /* has staging: some handle opened it read-write (under pub) */
    int refs;     /* handles (under reg_lock) */
    int detached; /* removed or renamed away: not in the registry, never published */
    int deferred; /* a deferred publish: never in the registry, published only by s3_obj_commit */
    struct obj *next; /* registry list (under reg_lock) */
    /* Lock order: pub before state. Writers take both (pub so that no write
     * lands while a publish reads the staging file); readers take state shared;
     * a publish holds pub throughout, state shared while uploading and
     * exclusive for the switch to the new version. */
    pthread_mutex_t pub;
    pthread_rwlock_t state;
    /* the published version (under state; etag and list_etag: written with
     * state held (shared, for a read's adoption) and et, read with state
     * exclusive or et) */
    int exists;
    char etag[128];
    char list_etag[128]; /* the ETag a listing gave etag ("": none), until our own publish */
    pthread_mutex_t et;
    uint64_t base_size;  /* its size */
    uint64_t base_valid; /* bytes of it still visible (a shrink hides the rest) */
    uint64_t gen;        /* cache generation */
    /* the logical object (under state) */
    uint64_t size;
    int changed; /* differs from the published version */
    struct range *dirty;
    size_t nd, capd;
    uint64_t dirty_bytes;
    /* staging (rw only) */
    int sfd;
    char *spath, *mpath;
    /* read-ahead (under ra; lock order: state, then ra, then the cache's) */
    pthread_mutex_t ra;
    pthread_cond_t ra_done; /* a read-ahead GET of this object ended */
    uint64_t ra_next;  /* where a sequential read would start */
    uint64_t ra_win;   /* bytes kept ahead, doubling up to the limit */
    uint64_t ra_sched; /* read-ahead is queued up to here (0: none) */
    uint64_t ra_epoch; /* bumped by each publish: older read-ahead answers are dropped */
    struct ra_job *ra_jobs; /* queued or running */
    /* streaming (deferred only; under sp; lock order: state, then sp) */
    pthread_mutex_t sp;
    pthread_cond_t sp_done;  /* a streamed part ended */
    struct spart *parts;     /* the grid of part-size parts, by index */
    size_t nparts;           /* entries of parts */
    uint64_t psize;          /* the grid's part size */
    char *mpu_id;            /* the multipart upload parts are streamed to (NULL: none yet) */
    int stream_off;          /* streaming gave up: the commit publishes as a flush would */
    size_t sp_next;          /* parts below this were looked at for streaming */
    unsigned sp_inflight;    /* part uploads queued or running */
    uint64_t sp_size;        /* the size as streaming last saw it */
    int asks;                /* the host asks for room (.wait_room): writes never wait */
    void (*wake)(void *ctx); /* armed by .wait_room: called once room comes (NULL: none) */
    void *wake_ctx;
};

/* Streaming a deferred object's parts (below). */
static void stream_touch(struct obj *o, uint64_t s, uint64_t e);
static void stream_write(struct obj *o, uint64_t s, uint64_t e);
static void stream_stop(struct obj *o);
static int stream_dropped(struct obj *o, const char *op, uint64_t s, uint64_t e);
static void stream_wait(struct obj *o);
struct waker {
    void (*fn)(void *ctx);
    void *ctx;
};
static struct waker stream_take_wake(struct obj *o, int always);
static void stream_wake(struct waker w);

/* Released runs a part remembers: a writer may release out of order (a
 * convert releases a cluster of packed compressed data after the clusters
 * written beside it), and the runs join up once the gaps are released. */
#define SPART_RUNS 4

struct span {
    uint64_t s, e; /* bytes [s, e); empty when equal */
};

/* One part of a deferred object's grid. */
struct spart {
    uint64_t gen;    /* bumped by each write into it */
    uint64_t up_gen; /* the gen its upload read (valid when up) */
    int up, busy;    /* uploaded (etag); being uploaded */
    int dropped;     /* uploaded, released, and punched out of the staging file */
    struct span rel[SPART_RUNS]; /* the released runs inside it (.release): disjoint, not touching */
    char etag[128];
};

static uint64_t min64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* ---- dirty ranges ---- */

/* Index of the first range with end > off. */
static size_t dirty_after(const struct obj *o, uint64_t off)
{
    size_t lo = 0, hi = o->nd;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (o->dirty[mid].end > off)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

static int dirty_overlaps(const struct obj *o, uint64_t s, uint64_t e)
{
    size_t i = dirty_after(o, s);
    return i < o->nd && o->dirty[i].start < e;
}

static void dirty_recount(struct obj *o)
{
    o->dirty_bytes = 0;
    for (size_t i = 0; i < o->nd; i++)
        o->dirty_bytes += o->dirty[i].end - o->dirty[i].start;
}

/* Add [s, e), merging with touching ranges. */
static int dirty_add(struct obj *o, uint64_t s, uint64_t e)
{
    size_t i = s ? dirty_after(o, s - 1) : 0; /* first range with end >= s */
    size_t j = i;
    while (j < o->nd && o->dirty[j].start <= e) {
        s = min64(s, o->dirty[j].start);
        e = e > o->dirty[j].end ? e : o->dirty[j].end;
        j++;
    }
    if (i == j) { /* insert at i */
        if (o->nd == o->capd) {
            size_t cap = o->capd ? o->capd * 2 : 16;
            struct range *v = realloc(o->dirty, cap * sizeof *v);
            if (!v)
                return err_fail(ENOMEM, "write %s: out of memory", o->n.uri);
            o->dirty = v;
            o->capd = cap;
        }
        memmove(o->dirty + i + 1, o->dirty + i, (o->nd - i) * sizeof *o->dirty);
        o->nd++;
    } else if (j > i + 1) { /* ranges i..j-1 become one */
        memmove(o->dirty + i + 1, o->dirty + j, (o->nd - j) * sizeof *o->dirty);
        o->nd -= j - i - 1;
    }
    o->dirty[i] = (struct range){s, e};
    dirty_recount(o);
    return 0;
}

/* Forget everything at or past size. */
static void dirty_cut(struct obj *o, uint64_t size)
{
    size_t i = dirty_after(o, size);
    if (i < o->nd && o->dirty[i].start < size) {
        o->dirty[i].end = size;
        i++;
    }
    o->nd = i;
    dirty_recount(o);
}

/* ---- reading ---- */

/* Count a GET of object data in flight, and the most at once. */
static void gets_in_flight(int delta)
{
    if (delta < 0) {
        atomic_fetch_sub(&s3_stats.gets_in_flight, 1);
        return;
    }
    unsigned long long now = atomic_fetch_add(&s3_stats.gets_in_flight, 1) + 1;
    unsigned long long peak = atomic_load(&s3_stats.gets_in_flight_peak);
    while (now > peak && !atomic_compare_exchange_weak(&s3_stats.gets_in_flight_peak, &peak, now)) {
    }
}

/* A copy of o's ETag (cap bytes at out). */
static void etag_get(struct obj *o, char *out, size_t cap)
{
    pthread_mutex_lock(&o->et);
    snprintf(out, cap, "%s", o->etag);
    pthread_mutex_unlock(&o->et);
}

/* Whether a GET that expected etag but got seen still reads o's version: o's
 * ETag came only from a listing (Swift lists an object made by a multipart
 * copy with a plain MD5, and GET and HEAD give another ETag), so the first
 * GET's ETag is adopted (adopt: the caller holds o->state, shared at least),
 * and GETs sent with the listing's ETag before that take the adopted one. Once
 * a GET confirmed it, another ETag is a replacement. */
static int etag_same_version(struct obj *o, const char *etag, const char *seen, int adopt)
{
    pthread_mutex_lock(&o->et);
    int same = 0;
    if (o->list_etag[0] && !strcmp(etag, o->list_etag)) {
        if (!strcmp(o->etag, seen)) {
            same = 1;
        } else if (adopt && !strcmp(o->etag, o->list_etag)) {
            snprintf(o->etag, sizeof o->etag, "%s", seen);
            same = 1;
        }
    }
    pthread_mutex_unlock(&o->et);
    return same;
}

/* GET [off, off+len) of the version of o whose ETag is etag into buf; an
 * answer from another version is -ESTALE (but for a listing's ETag, see
 * etag_same_version; adopt as there). */
static int get_range(struct obj *o, const char *etag, void *buf, uint64_t off, size_t len, int adopt)
{
    char range[64], what[64];
    snprintf(range, sizeof range, "bytes=%llu-%llu", (unsigned long long)off, (unsigned long long)(off + len - 1));
    struct s3_hdr h = {"range", range};
    struct s3_req r = {.op = S3_OP_GET, .method = "GET", .bucket = o->n.bucket, .key = o->n.key, .hdrs = &h,
                       .nhdrs = 1, .into = buf, .into_cap = len};
    snprintf(what, sizeof what, "GET %s", "s3");
    struct sbuf w = {0};
    sbuf_printf(&w, "read %s (%s)", o->n.uri, range);
    gets_in_flight(1);
    int ret = s3_http(&r, sbuf_str(&w) ? w.p : what);
    gets_in_flight(-1);
    if (ret == 0 && etag[0] && r.etag[0] && strcmp(etag, r.etag) && !etag_same_version(o, etag, r.etag, adopt)) {
        s3_meta_drop(o->n.bucket, o->n.key); /* what stat knows is old too: the next one asks */
        ret = err_fail(ESTALE, "read %s: the object was replaced (ETag %s, this handle reads %s); reopen it",
                       o->n.uri, r.etag, etag);
    }
    if (ret == 0 && r.status != 206 && off != 0) /* a 200 is the object from byte 0 */
        ret = err_fail(EPROTO, "read %s: the S3 store ignored the Range header (%ld for %s)", o->n.uri, r.status,
                       range);
    if (ret == 0 && r.into_len != len)
        ret = err_fail(EREMOTEIO, "read %s: the S3 store sent %zu bytes for %s", o->n.uri, r.into_len, range);
    sbuf_free(&w);
    s3_req_free(&r);
    return ret;
}

/* ---- read-ahead ---- */

/* One read-ahead GET: blocks [first, last] of the version o showed at epoch. */
struct ra_job {
    struct s3_task task; /* first: pool.c hands it back */
    struct obj *o;       /* kept alive: close waits for o->ra_jobs to empty */
    uint64_t first, last, epoch;
    uint64_t size; /* of the version */
    char etag[128];
    struct ra_job *next; /* o->ra_jobs */
    struct ra_job *sub;  /* ra_schedule's list to submit */
};

/* Whether a read-ahead GET of the current version covers block idx (ra held). */
static int ra_covers(const struct obj *o, uint64_t idx)
{
    for (const struct ra_job *j = o->ra_jobs; j; j = j->next)
        if (j->epoch == o->ra_epoch && idx >= j->first && idx <= j->last)
            return 1;
    return 0;
}

/* Wait while a read-ahead GET covers block idx: 1 if one did (look again in
 * the cache: it may have failed or been dropped, then the reader GETs it). */
static int ra_wait(struct obj *o, uint64_t idx)
{
    int waited = 0;
    pthread_mutex_lock(&o->ra);
    while (ra_covers(o, idx)) {
        waited = 1;
        pthread_cond_wait(&o->ra_done, &o->ra);
    }
    pthread_mutex_unlock(&o->ra);
    if (waited)
        atomic_fetch_add(&s3_stats.readahead_waits, 1);
    return waited;
}

static int ra_busy(struct obj *o, uint64_t idx)
{
    pthread_mutex_lock(&o->ra);
    int r = ra_covers(o, idx);
    pthread_mutex_unlock(&o->ra);
    return r;
}

/* The end of a job: its blocks go to the cache only when data came and no
 * publish happened since it was queued (the same generation then holds other
 * bytes where the writes went); either way the job is gone and waiters wake. */
static void ra_finish(struct ra_job *j, const unsigned char *data, uint64_t fs, uint64_t fe)
{
    struct obj *o = j->o;
    uint64_t bs = s3_conf.block_size;
    pthread_mutex_lock(&o->ra);
    if (data && j->epoch == o->ra_epoch) {
        for (uint64_t k = j->first; k <= j->last; k++)
            s3_cache_put(o->gen, k, data + (k * bs - fs), (size_t)min64(bs, fe - k * bs));
    } else {
        atomic_fetch_add(&s3_stats.readahead_dropped, 1);
    }
    for (struct ra_job **p = &o->ra_jobs; *p; p = &(*p)->next)
        if (*p == j) {
            *p = j->next;
            break;
        }
    pthread_cond_broadcast(&o->ra_done);
    pthread_mutex_unlock(&o->ra);
    free(j);
}

static void ra_run(struct s3_task *t)
{
    struct ra_job *j = (struct ra_job *)t;
    struct obj *o = j->o;
    uint64_t bs = s3_conf.block_size;
    uint64_t fs = j->first * bs, fe = min64((j->last + 1) * bs, j->size);
    unsigned char *buf = fe > fs ? malloc(fe - fs) : NULL;
    int ret = buf ? get_range(o, j->etag, buf, fs, fe - fs, 0) : -ENOMEM;
    atomic_fetch_add(&s3_stats.readahead_gets, 1);
    err_clear(); /* a failure matters only to a reader that needs the data: it GETs it itself */
    ra_finish(j, ret == 0 ? buf : NULL, fs, fe);
    free(buf);
}

static void ra_cancelled(struct s3_task *t)
{
    ra_finish((struct ra_job *)t, NULL, 0, 0);
}

/* Queue read-ahead GETs for [from, from + win) of the published version, in
 * chunks that spread the window over the workers; blocks cached or already
 * coming are skipped. win 0 (not sequential): nothing, and the next window
 * starts afresh. Caller holds state (shared). */
static void ra_schedule(struct obj *o, uint64_t from, uint64_t win)
{
    uint64_t bs = s3_conf.block_size, limit = o->base_valid;
    unsigned gets = s3_conf.readahead_gets ? s3_conf.readahead_gets : 1;
    uint64_t chunk = (win / gets + bs - 1) / bs * bs;
    chunk = chunk < bs ? bs : chunk > RA_CHUNK_MAX ? RA_CHUNK_MAX / bs * bs : chunk;
    if (!chunk)
        chunk = bs;
    struct ra_job *todo = NULL;
    pthread_mutex_lock(&o->ra);
    if (!win) {
        o->ra_sched = 0;
        pthread_mutex_unlock(&o->ra);
        return;
    }
    uint64_t start = (from + bs - 1) / bs * bs, end = min64(from + win, limit);
    if (o->ra_sched > start)
        start = o->ra_sched;
    while (start < end) {
        uint64_t ce = min64(start + chunk, end);
        if (ce - start < chunk && ce < limit)
            break; /* a whole chunk at a time, but for the object's end */
        uint64_t a = start / bs, b = (ce - 1) / bs;
        while (a <= b && (s3_cache_has(o->gen, a) || ra_covers(o, a)))
            a++;
        struct ra_job *j = a <= b ? calloc(1, sizeof *j) : NULL;
        if (j) {
            *j = (struct ra_job){.task = {.run = ra_run, .cancelled = ra_cancelled, .owner = o},
                                 .o = o, .first = a, .last = b, .epoch = o->ra_epoch, .size = o->base_size,
                                 .next = o->ra_jobs,
                                 .sub = todo};
            etag_get(o, j->etag, sizeof j->etag);
            o->ra_jobs = j;
            todo = j;
        }
        start = ce;
    }
    o->ra_sched = start;
    pthread_mutex_unlock(&o->ra);
    /* oldest first: todo holds them newest first */
    struct ra_job *rev = NULL;
    while (todo) {
        struct ra_job *j = todo;
        todo = j->sub;
        j->sub = rev;
        rev = j;
    }
    while (rev) {
        struct ra_job *j = rev;
        rev = j->sub;
        if (s3_pool_submit(&s3_ra_pool, &j->task) < 0)
            ra_finish(j, NULL, 0, 0);
    }
}

/* Read [off, off+len) of the published version (all below base_valid) through
 * the cache; a block a read-ahead GET is bringing is waited for; runs of other
 * missing blocks are fetched with one GET, extended by ra bytes of inline
 * read-ahead (readahead-gets 0). */
static int read_base(struct obj *o, char *buf, size_t len, uint64_t off, uint64_t ra)
{
    uint64_t bs = s3_conf.block_size;
    uint64_t nblocks = (o->base_size + bs - 1) / bs;
    uint64_t first = off / bs, last = (off + len - 1) / bs;
    int ret = 0;
    for (uint64_t i = first; i <= last && ret == 0;) {
        /* only the part of the block this read wants is copied: a qcow2 check
         * or map reads a few bytes at a time, and a whole block per read made
         * such jobs tens of times slower than on a local file */
        uint64_t bstart = i * bs, at = off > bstart ? off : bstart;
        if (s3_cache_get(o->gen, i, at - bstart, (size_t)(min64(off + len, bstart + bs) - at), buf + (at - off)) >= 0) {
            i++;
            continue;
        }
        if (ra_wait(o, i))
            continue; /* look again */
        uint64_t j = i;
        while (j + 1 <= last && !s3_cache_has(o->gen, j + 1) && !ra_busy(o, j + 1))
            j++;
        uint64_t jmax = j, extra = (ra + bs - 1) / bs;
        while (extra-- && jmax + 1 < nblocks && !s3_cache_has(o->gen, jmax + 1))
            jmax++;
        uint64_t fs = i * bs, fe = min64((jmax + 1) * bs, o->base_size);
        unsigned char *fb = malloc(fe - fs);
        if (!fb) {
            ret = err_fail(ENOMEM, "read %s: out of memory", o->n.uri);
            break;
        }
        char etag[128];
        etag_get(o, etag, sizeof etag);
        ret = get_range(o, etag, fb, fs, fe - fs, 1);
        if (ret == 0) {
            for (uint64_t k = i; k <= jmax; k++) {
                uint64_t ks = k * bs;
                s3_cache_put(o->gen, k, fb + (ks - fs), min64(bs, fe - ks));
            }
            uint64_t s = off > fs ? off : fs, e = min64(off + len, min64(fe, (j + 1) * bs));
            memcpy(buf + (s - off), fb + (s - fs), e - s);
        }
        free(fb);
        i = j + 1;
    }
    return ret;
}

static int stage_read(struct obj *o, char *buf, size_t len, uint64_t off)
{
    uint64_t off0 = off, len0 = len;
    while (len) {
        ssize_t n = pread(o->sfd, buf, len, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return err_fail(errno, "read %s: staging file %s: %s", o->n.uri, o->spath, strerror(errno));
        if (n == 0) {
            memset(buf, 0, len);
            break;
        }
        buf += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    /* looked at after the read: a part dropped meanwhile read as a hole */
    return o->deferred ? stream_dropped(o, "read", off0, off0 + len0) : 0;
}

/* The logical bytes [off, off+len): staged writes over the published version,
 * zeroes past either's end. Caller holds state (shared or exclusive). */
static int read_at(struct obj *o, char *buf, size_t len, uint64_t off, uint64_t ra)
{
    while (len) {
        if (off >= o->size) {
            memset(buf, 0, len);
            return 0;
        }
        uint64_t n = min64(len, o->size - off);
        size_t i = dirty_after(o, off);
        int ret;
        if (i < o->nd && o->dirty[i].start <= off) {
            n = min64(n, o->dirty[i].end - off);
            ret = stage_read(o, buf, (size_t)n, off);
        } else {
            if (i < o->nd)
                n = min64(n, o->dirty[i].start - off);
            if (off < o->base_valid) {
                n = min64(n, o->base_valid - off);
                ret = read_base(o, buf, (size_t)n, off, ra);
            } else {
                memset(buf, 0, (size_t)n);
                ret = 0;
            }
        }
        if (ret < 0)
            return ret;
        buf += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

/* Read-ahead for this read: grows while reads follow each other, up to
 * readahead and half the cache (what is fetched ahead must stay until read),
 * else 0. */
static uint64_t ra_window(struct obj *o, uint64_t off, size_t len)
{
    pthread_mutex_lock(&o->ra);
    uint64_t bs = s3_conf.block_size, max = min64(s3_conf.readahead, s3_conf.cache_bytes / 2);
    if (off >= o->ra_next && off <= o->ra_next + bs && o->ra_next)
        o->ra_win = o->ra_win ? min64(o->ra_win * 2, max) : min64(bs, max);
    else
        o->ra_win = 0;
    o->ra_next = off + len;
    uint64_t w = o->ra_win;
    pthread_mutex_unlock(&o->ra);
    return w;
}

/* A handle: the shared object and how this opener may use it. */
struct handle {
    struct obj *o;
    int rw;
};

#define OBJ(h) (((struct handle *)(h))->o)

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER; /* the registry; held across opens */
static struct obj *registry;

int s3_obj_pread(void *h, void *buf, size_t len, uint64_t off)
{
    struct obj *o = OBJ(h);
    uint64_t ra = ra_window(o, off, len);
    int inline_ra = !s3_conf.readahead_gets;
    pthread_rwlock_rdlock(&o->state);
    int ret = read_at(o, buf, len, off, inline_ra ? ra : 0);
    if (!inline_ra && (ret == 0 || !ra))
        ra_schedule(o, off + len, ra);
    pthread_rwlock_unlock(&o->state);
    return ret;
}

int s3_obj_size(void *h, uint64_t *size)
{
    struct obj *o = OBJ(h);
    pthread_rwlock_rdlock(&o->state);
    *size = o->size;
    pthread_rwlock_unlock(&o->state);
    return 0;
}

/* ---- the staging files ---- */

static int mkdirs(const char *dir)
{
    char *p = strdup(dir);
    if (!p)
        return -ENOMEM;
    for (char *s = p + 1; *s; s++)
        if (*s == '/') {
            *s = '\0';
            mkdir(p, 0700);
            *s = '/';
        }
    int r = mkdir(p, 0700) < 0 && errno != EEXIST ? -errno : 0;
    free(p);
    return r;
}

/* The staging folder holds unpublished image data: it must be a real folder (not
 * a link), ours, and closed to everyone else. 0 or a negative errno with the
 * message. */
static int staging_private(const char *dir)
{
    struct stat st;
    if (lstat(dir, &st) < 0)
        return err_fail(errno, "staging folder %s: %s", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return err_fail(EPERM, "staging folder %s is %s, not a folder", dir,
                        S_ISLNK(st.st_mode) ? "a symbolic link" : "a file");
    if (st.st_uid != geteuid())
        return err_fail(EPERM, "staging folder %s belongs to uid %u, not to qcowd's uid %u", dir, (unsigned)st.st_uid,
                        (unsigned)geteuid());
    if (st.st_mode & 077)
        return err_fail(EPERM, "staging folder %s is open to others (mode %03o): chmod 700 it", dir,
                        (unsigned)(st.st_mode & 0777));
    return 0;
}

/* The meta file: what a later run needs to tell what it finds; started: when
 * a multipart upload is being started (its id not known yet), else 0. */
static void write_meta_at(struct obj *o, const char *upload_id, int64_t started)
{
    int fd = open(o->mpath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f) {
        if (fd >= 0)
            close(fd);
        return; /* only the log line of a later run is at stake */
    }
    char etag[128];
    etag_get(o, etag, sizeof etag);
    fprintf(f, "qcowd-s3-staging 1\nobject %s\nbucket %s\nkey %s\nbase-etag %s\npid %ld\n", o->n.uri,
            o->n.bucket, o->n.key, etag[0] ? etag : "-", (long)getpid());
    if (o->deferred)
        fprintf(f, "deferred yes\n");
    if (upload_id)
        fprintf(f, "upload-id %s\n", upload_id);
    if (started)
        fprintf(f, "mpu-start %lld\n", (long long)started);
    fclose(f);
}

static void write_meta(struct obj *o, const char *upload_id)
{
    write_meta_at(o, upload_id, 0);
}

/* A staging file left by a run that ended without closing: its writes were
 * never published (a crash before flush loses them), so it is discarded. */
static void discard_leftover(struct obj *o, struct stat *st)
{
    struct s3_staging_meta m;
    char cur[128];
    etag_get(o, cur, sizeof cur);
    s3_staging_meta_read(open(o->mpath, O_RDONLY | O_CLOEXEC | O_NOFOLLOW), &m);
    fprintf(stderr,
            "qcowd: s3: %s: discarded the staging cache of an earlier run (pid %ld) that ended without "
            "publishing: %llu bytes staged over version %s; the object stays as last published (ETag %s)%s\n",
            o->n.uri, m.pid, (unsigned long long)st->st_blocks * 512, m.etag, cur[0] ? cur : "none",
            m.upload_id[0] ? "; its unfinished multipart upload is aborted" : "");
    if (m.upload_id[0])
        s3_mpu_abort(&o->n, m.upload_id);
    else if (m.started > 0)
        s3_sweep_key(&o->n, m.started);
}

int s3_obj_staging_private(const char *dir)
{
    return staging_private(dir);
}

static int staging_open(struct obj *o)
{
    int r = mkdirs(s3_conf.staging_dir);
    if (r < 0)
        return err_fail(-r, "open %s: staging folder %s: %s", o->n.uri, s3_conf.staging_dir, strerror(-r));
    if ((r = staging_private(s3_conf.staging_dir)) < 0)
        return err_prefix(r, "open %s", o->n.uri);
    struct sbuf id = {0};
    sbuf_printf(&id, "%s\n%s\n%s", s3_conf.endpoint, o->n.bucket, o->n.key);
    char hash[65];
    s3_sha256_hex(id.p ? id.p : "", id.len, hash);
    sbuf_free(&id);
    static atomic_ulong deferred_seq;
    char tail[64] = ""; /* a deferred object's files are its own: several may be made of one key */
    if (o->deferred)
        snprintf(tail, sizeof tail, "-%ld-%lu" DEFERRED_TAIL, (long)getpid(), atomic_fetch_add(&deferred_seq, 1) + 1);
    if (asprintf(&o->spath, "%s/%.40s%s.data", s3_conf.staging_dir, hash, tail) < 0 ||
        asprintf(&o->mpath, "%s/%.40s%s.meta", s3_conf.staging_dir, hash, tail) < 0)
        return err_fail(ENOMEM, "open %s: out of memory", o->n.uri);
    o->sfd = open(o->spath, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (o->sfd < 0)
        return err_fail(errno, "open %s: staging file %s: %s", o->n.uri, o->spath, strerror(errno));
    if (flock(o->sfd, LOCK_EX | LOCK_NB) < 0) {
        int e = errno;
        close(o->sfd);
        o->sfd = -1;
        if (e == EWOULDBLOCK)
            return err_fail(EBUSY, "open %s: it is open for writing elsewhere (staging file %s is locked)",
                            o->n.uri, o->spath);
        return err_fail(e, "open %s: lock staging file %s: %s", o->n.uri, o->spath, strerror(e));
    }
    struct stat st;
    if (access(o->mpath, F_OK) == 0 && fstat(o->sfd, &st) == 0)
        discard_leftover(o, &st);
    if (ftruncate(o->sfd, 0) < 0)
        return err_fail(errno, "open %s: staging file %s: %s", o->n.uri, o->spath, strerror(errno));
    write_meta(o, NULL);
    return 0;
}

/* ---- open and close ---- */

static void obj_free(struct obj *o)
{
    if (o->sfd >= 0)
        close(o->sfd);
    free(o->spath);
    free(o->mpath);
    free(o->dirty);
    s3_name_free(&o->n);
    pthread_mutex_destroy(&o->pub);
    pthread_mutex_destroy(&o->et);
    pthread_mutex_destroy(&o->ra);
    pthread_cond_destroy(&o->ra_done);
    pthread_rwlock_destroy(&o->state);
    pthread_mutex_destroy(&o->sp);
    pthread_cond_destroy(&o->sp_done);
    free(o->parts);
    free(o->mpu_id);
    free(o);
}

static struct obj *reg_find(const struct s3_name *n)
{
    for (struct obj *o = registry; o; o = o->next)
        if (!strcmp(o->n.bucket, n->bucket) && !strcmp(o->n.key, n->key))
            return o;
    return NULL;
}

/* Take o out of the registry (reg_lock held): later opens of its key get a new
 * object; o's staging files go now, so the new one can lock its own. */
static void reg_detach(struct obj *o)
{
    for (struct obj **p = &registry; *p; p = &(*p)->next)
        if (*p == o) {
            *p = o->next;
            break;
        }
    o->detached = 1;
    if (o->spath) {
        unlink(o->mpath);
        unlink(o->spath);
    }
}

void s3_obj_forget(const struct s3_name *n)
{
    pthread_mutex_lock(&reg_lock);
    struct obj *o = reg_find(n);
    if (o)
        reg_detach(o);
    pthread_mutex_unlock(&reg_lock);
}

/* A new object for n (taken over: *n is cleared), knowing nothing of the store. */
static struct obj *obj_alloc(struct s3_name *n)
{
    struct obj *o = calloc(1, sizeof *o);
    if (!o)
        return NULL;
    o->sfd = -1;
    o->n = *n;
    memset(n, 0, sizeof *n);
    pthread_mutex_init(&o->pub, NULL);
    pthread_mutex_init(&o->et, NULL);
    pthread_mutex_init(&o->ra, NULL);
    pthread_cond_init(&o->ra_done, NULL);
    pthread_rwlock_init(&o->state, NULL);
    pthread_mutex_init(&o->sp, NULL);
    pthread_condattr_t ca; /* stream_wait's deadline is on the monotonic clock */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&o->sp_done, &ca);
    pthread_condattr_destroy(&ca);
    return o;
}

/* A new object for n: HEAD it; create it (on the first flush) if asked. */
static int obj_new(struct s3_name *n, unsigned flags, struct obj **out)
{
    struct obj *o = obj_alloc(n);
    if (!o)
        return err_fail(ENOMEM, "open %s: out of memory", n->uri);
    struct s3_head hd;
    int ret = s3_stat_object(&o->n, &hd); /* just listed or stat'ed: no second HEAD */
    if (ret == 0) {
        if (flags & VFS_O_EXCL) {
            ret = err_fail(EEXIST, "open %s: the object exists", o->n.uri);
            goto fail;
        }
        o->exists = 1;
        snprintf(o->etag, sizeof o->etag, "%s", hd.etag);
        if (hd.listed) /* the first GET may answer with another ETag of the same object */
            snprintf(o->list_etag, sizeof o->list_etag, "%s", hd.etag);
        o->base_size = o->base_valid = o->size = hd.size;
    } else if (ret == -ENOENT && (flags & VFS_O_CREATE) && strstr(err_msg(ret), "no such object")) {
        o->changed = 1; /* the first flush creates it, even empty */
        err_clear();
    } else {
        goto fail;
    }
    o->gen = s3_cache_gen();
    *out = o;
    return 0;
fail:
    obj_free(o);
    return ret;
}

/* Whether another writer replaced or removed the published object that o
 * shows, while o has nothing of its own to publish (else o's next flush wins,
 * as the last writer), as far as known within stat-ttl. A failing HEAD says
 * nothing: o is kept. */
static int replaced_outside(struct obj *o)
{
    pthread_rwlock_rdlock(&o->state);
    int mine = o->changed || !o->exists;
    char etag[128], listed[128];
    pthread_mutex_lock(&o->et);
    snprintf(etag, sizeof etag, "%s", o->etag);
    snprintf(listed, sizeof listed, "%s", o->list_etag);
    pthread_mutex_unlock(&o->et);
    pthread_rwlock_unlock(&o->state);
    if (mine)
        return 0;
    struct s3_head hd;
    int r = s3_stat_object(&o->n, &hd);
    /* a listing gives what o was opened with, even when a GET gave another ETag */
    int same = r == 0 && (!strcmp(hd.etag, etag) || (hd.listed && listed[0] && !strcmp(hd.etag, listed)));
    int gone = (r == 0 && !same) || (r == -ENOENT && strstr(err_msg(r), "no such object"));
    err_clear();
    return gone;
}

/* The object name of path for an open: 0, or -EISDIR for a bucket or folder. */
static int object_name(const char *path, struct s3_name *n)
{
    int ret = s3_conf_ready();
    if (ret < 0 || (ret = s3_name_parse(path, n)) < 0)
        return ret;
    if (!n->key[0] || n->key[strlen(n->key) - 1] == '/') {
        ret = err_fail(EISDIR, "open %s: a bucket or folder, not an object", n->uri);
        s3_name_free(n);
    }
    return ret;
}

int s3_obj_open(const char *path, unsigned flags, void **handle)
{
    struct s3_name n;
    int ret = object_name(path, &n);
    if (ret < 0)
        return ret;
    struct handle *h = calloc(1, sizeof *h);
    if (!h) {
        s3_name_free(&n);
        return err_fail(ENOMEM, "open s3:%s: out of memory", path);
    }
    h->rw = !!(flags & VFS_O_RDWR);
    /* opens are serialised, so two opens of one key never make two objects */
    pthread_mutex_lock(&reg_lock);
    struct obj *o = reg_find(&n);
    if (o && !(flags & VFS_O_EXCL) && replaced_outside(o)) {
        reg_detach(o); /* its handles keep the old version, as with a file renamed over */
        o = NULL;
    }
    if (o && (flags & VFS_O_EXCL)) {
        ret = err_fail(EEXIST, "open %s: the object exists (open in this process)", n.uri);
    } else if (!o && (ret = obj_new(&n, flags, &o)) == 0) {
        o->next = registry;
        registry = o;
    }
    if (ret == 0 && h->rw) {
        pthread_mutex_lock(&o->pub);
        pthread_rwlock_wrlock(&o->state);
        if (!o->rw && (ret = staging_open(o)) == 0)
            o->rw = 1;
        pthread_rwlock_unlock(&o->state);
        pthread_mutex_unlock(&o->pub);
    }
    if (ret == 0) {
        o->refs++;
        h->o = o;
        *handle = h;
    } else if (o && o->refs == 0) { /* new, unused: drop it */
        reg_detach(o);
        obj_free(o);
    }
    pthread_mutex_unlock(&reg_lock);
    s3_name_free(&n);
    if (ret < 0)
        free(h);
    return ret;
}

static int publish(struct obj *o);

/* The last handle publishes what is still staged (like a file's dirty pages
 * reaching the disk after close), under reg_lock so no open sees the object
 * half gone. */
void s3_obj_close(void *hp)
{
    struct handle *h = hp;
    struct obj *o = h->o;
    free(h);
    pthread_mutex_lock(&reg_lock);
    if (--o->refs > 0) {
        pthread_mutex_unlock(&reg_lock);
        return;
    }
    if (o->rw && !o->detached && !o->deferred) { /* a deferred one not committed: aborted */
        int r = publish(o);
        if (r < 0)
            fprintf(stderr, "qcowd: s3: %s: the writes since the last flush are lost: %s\n", o->n.uri,
                    err_msg(r));
    }
    if (!o->detached)
        reg_detach(o);
    pthread_mutex_unlock(&reg_lock);
    if (o->deferred) { /* not committed (a commit clears mpu_id): the streamed upload goes */
        stream_stop(o); /* wakes a waiter: never left hanging */
        if (o->mpu_id)
            s3_mpu_abort(&o->n, o->mpu_id);
    }
    /* read-ahead: what is queued goes, what runs is waited for (one GET each) */
    s3_pool_cancel(&s3_ra_pool, o);
    pthread_mutex_lock(&o->ra);
    while (o->ra_jobs)
        pthread_cond_wait(&o->ra_done, &o->ra);
    pthread_mutex_unlock(&o->ra);
    s3_cache_drop(o->gen, 0, UINT64_MAX);
    obj_free(o);
}

/* ---- writing ---- */

int s3_obj_pwrite(void *h, const void *buf, size_t len, uint64_t off)
{
    struct obj *o = OBJ(h);
    int ret = 0;
    pthread_mutex_lock(&o->pub);
    pthread_rwlock_wrlock(&o->state);
    const char *p = buf;
    if (o->deferred)
        ret = stream_dropped(o, "write", off, off + len);
    for (size_t done = 0; ret == 0 && done < len;) {
        ssize_t n = pwrite(o->sfd, p + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            int e = n < 0 ? errno : EIO;
            ret = err_fail(e, "write %s: staging file %s: %s", o->n.uri, o->spath, strerror(e));
            break;
        }
        done += (size_t)n;
    }
    if (ret == 0 && !o->rw)
        ret = err_fail(EBADF, "write %s: not opened for writing", o->n.uri);
    if (ret == 0)
        ret = dirty_add(o, off, off + len);
    if (ret == 0) {
        if (off + len > o->size)
            o->size = off + len;
        o->changed = 1;
        if (o->deferred)
            stream_write(o, off, off + len);
    }
    /* a deferred object never publishes early: a prefix of it is not the object */
    int over = !o->deferred && o->dirty_bytes > s3_conf.staging_max;
    pthread_rwlock_unlock(&o->state);
    pthread_mutex_unlock(&o->pub);
    if (ret == 0 && over) /* bounded staging: publish early (a prefix of the writes is a valid state) */
        ret = publish(o);
    if (ret == 0 && o->deferred) /* bounded staging: let the parts written go out first */
        stream_wait(o);
    return ret;
}

int s3_obj_truncate(void *h, uint64_t size)
{
    struct obj *o = OBJ(h);
    int ret = 0;
    pthread_mutex_lock(&o->pub);
    pthread_rwlock_wrlock(&o->state);
    if (o->deferred && size != o->size)
        ret = stream_dropped(o, "truncate", min64(size, o->size), size > o->size ? size : o->size);
    if (ret == 0 && size < o->size) {
        dirty_cut(o, size);
        if (ftruncate(o->sfd, (off_t)size) < 0)
            ret = err_fail(errno, "truncate %s: staging file %s: %s", o->n.uri, o->spath, strerror(errno));
        o->base_valid = min64(o->base_valid, size);
    }
    if (ret == 0 && size != o->size) {
        if (o->deferred) { /* the parts the new end cuts or grows change */
            pthread_mutex_lock(&o->sp);
            stream_touch(o, min64(size, o->size), size > o->size ? size : o->size);
            o->sp_size = size;
            pthread_mutex_unlock(&o->sp);
        }
        o->size = size;
        o->changed = 1;
    }
    pthread_rwlock_unlock(&o->state);
    pthread_mutex_unlock(&o->pub);
    return ret;
}

int s3_obj_flush(void *h)
{
    /* a deferred object is published by its commit only; a crash aborts it, so
     * its staging file needs no durability of its own */
    return ((struct handle *)h)->rw && !OBJ(h)->deferred ? publish(OBJ(h)) : 0;
}


/* ---- publishing ---- */

/* A part of a publish: bytes [s, e) of the new version, copied server-side
 * from the published one (copy) or uploaded. */
struct seg {
    uint64_t s, e;
    int copy;
};

/* A plan of parts (a growing array). */
struct plan {
    struct seg *v;
    unsigned n, cap;
};

static int plan_add(struct plan *p, uint64_t s, uint64_t e, int copy)
{
    if (p->n == p->cap) {
        unsigned cap = p->cap ? p->cap * 2 : 16;
        struct seg *v = realloc(p->v, cap * sizeof *v);
        if (!v)
            return -ENOMEM;
        p->v = v;
        p->cap = cap;
    }
    p->v[p->n++] = (struct seg){s, e, copy};
    return 0;
}

/* [s, e) as parts of at most max bytes each (every one at least the minimum
 * part when the stretch is, so that only the last part of all may be short). */
static int plan_split(struct plan *p, uint64_t s, uint64_t e, uint64_t max, int copy)
{
    uint64_t len = e - s, n = (len + max - 1) / max;
    if (n > 1 && len / n < MIN_PART_BYTES)
        n = len / max ? len / max : 1;
    for (uint64_t k = 0; k < n; k++) {
        uint64_t a = s + len / n * k, b = k + 1 == n ? e : s + len / n * (k + 1);
        if (plan_add(p, a, b, copy) < 0)
            return -ENOMEM;
    }
    return 0;
}

/* The parts of a publish of size bytes: what must be uploaded (written ranges
 * and what lies past the published version), each widened to a minimum part,
 * in parts of part-size; between them, what is unchanged copied server-side
 * in parts as large as the store allows (copy-max, S3's 5 GiB), a gap too
 * small for a part uploaded with its neighbour. So a small write to a large
 * object costs a few requests, not one per part-size. Caller holds state. */
static int plan_parts(struct obj *o, uint64_t size, uint64_t part, int copy_ok, struct plan *p)
{
    uint64_t maxcopy = s3_conf.copy_max < 2 * MIN_PART_BYTES ? 2 * MIN_PART_BYTES : s3_conf.copy_max;
    uint64_t pos = 0, us = 0, ue = 0; /* the upload stretch being widened: [us, ue) */
    int have = 0;
    size_t i = 0;
    uint64_t base = min64(o->base_valid, size);
    if (!copy_ok)
        base = 0;
    for (;;) {
        /* the next range to upload, in order: a written one, or the tail */
        uint64_t s, e;
        if (i < o->nd && o->dirty[i].start < base) {
            s = o->dirty[i].start;
            e = min64(o->dirty[i].end, base);
            i++;
        } else if (base < size) {
            s = base;
            e = size;
            base = size; /* once */
            i = o->nd;
        } else {
            break;
        }
        if (e - s < MIN_PART_BYTES) { /* widened to a part: forward, else back from the end */
            e = min64(s + MIN_PART_BYTES, size);
            if (e - s < MIN_PART_BYTES)
                s = e > MIN_PART_BYTES ? e - MIN_PART_BYTES : 0;
        }
        if (s < pos)
            s = pos; /* widened back over what is planned */
        if (have && s < ue + MIN_PART_BYTES) { /* overlaps, or the gap is too small to copy */
            ue = e > ue ? e : ue;
            us = s < us ? s : us;
            if (us < pos + MIN_PART_BYTES)
                us = pos;
            continue;
        }
        if (have) {
            if (plan_split(p, pos, us, maxcopy, 1) < 0 || plan_split(p, us, ue, part, 0) < 0)
                return -ENOMEM;
            pos = ue;
        }
        if (s < pos + MIN_PART_BYTES)
            s = pos; /* too small a gap to copy before it */
        us = s;
        ue = e;
        have = 1;
    }
    if (have) {
        if (plan_split(p, pos, us, maxcopy, 1) < 0 || plan_split(p, us, ue, part, 0) < 0)
            return -ENOMEM;
        pos = ue;
    }
    if (pos < size && plan_split(p, pos, size, maxcopy, 1) < 0)
        return -ENOMEM;
    return 0;
}

/* The fixed grid of parts of part bytes, each copied when nothing in it
 * changed: what a plan of too many parts falls back to. */
static int plan_grid(struct obj *o, uint64_t size, uint64_t part, int copy_ok, struct plan *p)
{
    for (uint64_t s = 0; s < size; s += part) {
        uint64_t e = min64(size, s + part);
        if (plan_add(p, s, e, copy_ok && e <= o->base_valid && !dirty_overlaps(o, s, e)) < 0)
            return -ENOMEM;
    }
    return 0;
}

/* One multipart upload in progress, shared by its workers. */
struct upload {
    struct obj *o;
    const char *id;
    struct seg *segs;
    unsigned nparts;
    char (*etags)[128];
    const unsigned char *done; /* NULL, or per part: uploaded already (its ETag in etags) */
    pthread_mutex_t lock;
    unsigned next;  /* next part to do (under lock) */
    struct err_saved err; /* first failure (under lock; err.ret 0: none) */
};

static atomic_int copy_unsupported; /* the server answered 501 to UploadPartCopy */

static int put_part(struct upload *u, unsigned i)
{
    struct obj *o = u->o;
    uint64_t s = u->segs[i].s, e = u->segs[i].e;
    int ret;
    if (u->done && u->done[i]) /* streamed already, unchanged since */
        return 0;
    if (u->segs[i].copy) {
        ret = s3_mpu_copy_part(&o->n, u->id, i + 1, &o->n, s, e, u->etags[i], sizeof u->etags[i]);
        if (ret == -EOPNOTSUPP && !atomic_exchange(&copy_unsupported, 1)) /* 501: publish() plans again */
            fprintf(stderr, "qcowd: s3: the store has no UploadPartCopy (501); uploading unchanged parts "
                            "instead\n");
        return ret;
    }
    char *buf = malloc(e - s ? e - s : 1);
    if (!buf)
        return err_fail(ENOMEM, "publish %s: out of memory", o->n.uri);
    ret = read_at(o, buf, e - s, s, 0);
    if (ret == 0)
        ret = s3_mpu_put_part(&o->n, u->id, i + 1, buf, e - s, u->etags[i], sizeof u->etags[i]);
    free(buf);
    return ret;
}

static void *part_worker(void *arg)
{
    struct upload *u = arg;
    for (;;) {
        pthread_mutex_lock(&u->lock);
        unsigned i = u->err.ret ? u->nparts : u->next++;
        pthread_mutex_unlock(&u->lock);
        if (i >= u->nparts)
            return NULL;
        int r = put_part(u, i);
        if (r < 0) {
            pthread_mutex_lock(&u->lock);
            if (!u->err.ret)
                err_save(&u->err, r);
            pthread_mutex_unlock(&u->lock);
        }
    }
}

/* Upload u's parts from up to connections threads: 0 or the first failure. */
static int upload_parts(struct upload *u)
{
    pthread_mutex_init(&u->lock, NULL);
    unsigned nw = u->nparts < s3_conf.connections ? u->nparts : s3_conf.connections;
    pthread_t *tids = calloc(nw ? nw : 1, sizeof *tids);
    unsigned started = 0;
    for (; tids && started < nw; started++)
        if (pthread_create(&tids[started], NULL, part_worker, u) != 0)
            break;
    if (started == 0)
        part_worker(u);
    for (unsigned i = 0; i < started; i++)
        pthread_join(tids[i], NULL);
    free(tids);
    pthread_mutex_destroy(&u->lock);
    return u->err.ret ? err_restore(&u->err) : 0;
}

/* The test seam of the crash test: QCOWD_S3_TEST_CRASH=before-complete kills
 * the process once every part is uploaded, before CompleteMultipartUpload. */
static void test_crash_point(const char *point, const char *uri)
{
    const char *v = getenv("QCOWD_S3_TEST_CRASH");
    if (v && !strcmp(v, point)) {
        fprintf(stderr, "qcowd: s3: %s: QCOWD_S3_TEST_CRASH=%s: killing the process now\n", uri, point);
        fflush(stderr);
        kill(getpid(), SIGKILL);
    }
}

static int multipart(struct obj *o, uint64_t size, char *etag_out, size_t cap)
{
    uint64_t part = s3_conf.part_size;
    int copy_ok = !atomic_load(&copy_unsupported);
    struct plan pl = {0};
    if (plan_parts(o, size, part, copy_ok, &pl) < 0 || pl.n > MAX_PARTS) {
        pl.n = 0; /* too many: the grid, parts doubled until they fit */
        while ((size + part - 1) / part > MAX_PARTS)
            part *= 2;
        if (part > MAX_PART_BYTES) {
            free(pl.v);
            return err_fail(EFBIG, "publish %s: %llu bytes is more than S3 takes", o->n.uri,
                            (unsigned long long)size);
        }
        if (plan_grid(o, size, part, copy_ok, &pl) < 0) {
            free(pl.v);
            return err_fail(ENOMEM, "publish %s: out of memory", o->n.uri);
        }
    }
    char *id = NULL;
    write_meta_at(o, NULL, time(NULL)); /* a crash before the id is written: a later run looks for it */
    int ret = s3_mpu_start(&o->n, &id);
    if (ret < 0) {
        write_meta(o, NULL);
        free(pl.v);
        return ret;
    }
    test_crash_point("after-mpu-start", o->n.uri);
    write_meta(o, id);

    struct upload u = {.o = o, .id = id, .segs = pl.v, .nparts = pl.n};
    u.etags = calloc(u.nparts, sizeof *u.etags);
    ret = u.etags ? upload_parts(&u) : err_fail(ENOMEM, "publish %s: out of memory", o->n.uri);
    if (ret == 0) {
        test_crash_point("before-complete", o->n.uri);
        ret = s3_mpu_complete(&o->n, id, u.etags, u.nparts, etag_out, cap);
    }
    if (ret < 0)
        s3_mpu_abort(&o->n, id);
    free(u.etags);
    free(pl.v);
    free(id);
    return ret;
}

static void publish_done(struct obj *o, int ret, uint64_t size, const char *etag, int64_t mtime);

static int put_whole(struct obj *o, uint64_t size, char *etag_out, size_t cap, int64_t *mtime)
{
    char what[128];
    char *buf = malloc(size ? size : 1);
    if (!buf)
        return err_fail(ENOMEM, "publish %s: out of memory", o->n.uri);
    int ret = read_at(o, buf, size, 0, 0);
    if (ret == 0) {
        struct s3_req r = {.op = S3_OP_PUT, .method = "PUT", .bucket = o->n.bucket, .key = o->n.key, .body = buf,
                           .body_len = size};
        snprintf(what, sizeof what, "publish %s", o->n.uri);
        ret = s3_http(&r, what);
        if (ret == 0) {
            snprintf(etag_out, cap, "%s", r.etag);
            *mtime = s3_http_date(r.last_modified);
        }
        s3_req_free(&r);
    }
    free(buf);
    return ret;
}

/* Make the logical object the published one. */
static int publish(struct obj *o)
{
    char etag[128] = "";
    int64_t mtime = 0;
    pthread_mutex_lock(&o->pub);
    pthread_rwlock_rdlock(&o->state); /* writers wait on pub; readers go on */
    if (!o->changed || o->detached) { /* detached: removed or renamed, like an unlinked file */
        pthread_rwlock_unlock(&o->state);
        pthread_mutex_unlock(&o->pub);
        return 0;
    }
    uint64_t size = o->size;
    int ret = size <= s3_conf.part_size ? put_whole(o, size, etag, sizeof etag, &mtime)
                                        : multipart(o, size, etag, sizeof etag);
    if (ret == -EOPNOTSUPP && size > s3_conf.part_size && atomic_load(&copy_unsupported)) {
        err_clear(); /* the store has no UploadPartCopy: once more, every part uploaded */
        ret = multipart(o, size, etag, sizeof etag);
    }
    pthread_rwlock_unlock(&o->state);
    publish_done(o, ret, size, etag, mtime);
    pthread_mutex_unlock(&o->pub);
    return ret;
}

/* After a publish of size bytes (ret 0: as etag), o->pub held, o->state not:
 * tell the stat cache, and on success make it o's published version. */
static void publish_done(struct obj *o, int ret, uint64_t size, const char *etag, int64_t mtime)
{
    /* stat and open see our own publish at once (an unknown outcome: they ask) */
    struct s3_head pub = {.size = size, .mtime = mtime};
    snprintf(pub.etag, sizeof pub.etag, "%s", etag);
    s3_meta_own(&o->n, ret == 0 && etag[0] ? &pub : NULL, 0);
    if (ret == 0) {
        atomic_fetch_add(&s3_stats.publishes, 1);
        pthread_rwlock_wrlock(&o->state);
        /* cached blocks of the old version stay valid where nothing was written;
         * read-ahead GETs under way may bring old bytes of what was: dropped */
        uint64_t bs = s3_conf.block_size;
        pthread_mutex_lock(&o->ra);
        o->ra_epoch++;
        o->ra_sched = 0;
        for (size_t i = 0; i < o->nd; i++)
            s3_cache_drop(o->gen, o->dirty[i].start / bs, (o->dirty[i].end - 1) / bs);
        s3_cache_drop(o->gen, o->base_valid / bs, UINT64_MAX);
        pthread_mutex_unlock(&o->ra);
        pthread_mutex_lock(&o->et);
        snprintf(o->etag, sizeof o->etag, "%s", etag);
        o->list_etag[0] = '\0';
        pthread_mutex_unlock(&o->et);
        o->exists = 1;
        o->base_size = o->base_valid = size;
        o->nd = 0;
        o->dirty_bytes = 0;
        o->changed = 0;
        if (ftruncate(o->sfd, 0) < 0) { /* only space is at stake: the map says nothing is staged */
        }
        write_meta(o, NULL);
        pthread_rwlock_unlock(&o->state);
    }
}

/* ---- streaming a deferred object's parts ---- */

/* Its parts go to a multipart upload on the final key while it is written:
 * part k (of the grid of psize) is queued on the upload pool (pool.c) once writes
 * reach past part k+1 (the writer has moved on), part 0 (the qcow2 header, and
 * what a maker rewrites last) never. A write into a part bumps its gen, so an
 * upload that raced a write, or a part written again later, is uploaded
 * again at the commit (S3 keeps the last upload of a part number). Uploads in
 * flight: at most connections, each one part in memory; a part that ends
 * queues the next one.
 * Bounded staging: the host releases what it will not read back (.release:
 * an upload keeps its qcow2 metadata); a part uploaded and wholly released is
 * punched out of the staging file (dropped), and a writer whose bytes not yet
 * sent pass staging-max waits, up to STREAM_WAIT_MS per write, for parts to
 * go out. Staging then holds part 0, the released-but-kept ranges, the parts
 * not yet sent and the last ones. A dropped part is never read again: the
 * commit completes the upload with its ETag, and a fallback publish that
 * would need its bytes fails (-EIO). */

struct stream_task {
    struct s3_task t;
    struct obj *o;
    size_t k;
};

/* Parts [s, e) touches changed (o->sp held); the grid grows to cover them. */
static void stream_touch(struct obj *o, uint64_t s, uint64_t e)
{
    if (e <= s || o->stream_off)
        return;
    size_t last = (size_t)((e - 1) / o->psize);
    if (last >= MAX_PARTS) { /* past what one upload takes: the commit publishes as usual */
        o->stream_off = 1;
        return;
    }
    if (last >= o->nparts) {
        size_t n = last + 1 + 64;
        struct spart *v = realloc(o->parts, n * sizeof *v);
        if (!v) {
            o->stream_off = 1;
            return;
        }
        memset(v + o->nparts, 0, (n - o->nparts) * sizeof *v);
        o->parts = v;
        o->nparts = n;
    }
    for (size_t k = (size_t)(s / o->psize); k <= last; k++)
        o->parts[k].gen++;
}

static void stream_run(struct s3_task *t);
static void stream_cancelled(struct s3_task *t);

/* Drop part k when it is sent, current and wholly released (o->sp held):
 * its staged bytes go (a hole; the size stays). Reads and writes of it fail
 * from now on (stream_dropped). */
static void stream_drop(struct obj *o, size_t k)
{
    struct spart *pt = &o->parts[k];
    uint64_t s = k * o->psize, e = s + o->psize;
    int whole = 0;
    for (int i = 0; i < SPART_RUNS && !whole; i++)
        whole = pt->rel[i].s <= s && pt->rel[i].e >= e;
    if (k == 0 || pt->dropped || pt->busy || !pt->up || pt->up_gen != pt->gen || !whole)
        return;
    pt->dropped = 1; /* before the punch: a read that saw the hole sees this after */
    if (fallocate(o->sfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)s, (off_t)o->psize) < 0)
        fprintf(stderr, "qcowd: s3: %s: punching a sent part out of the staging file: %s\n", o->n.uri,
                strerror(errno)); /* it only stays on the disk */
}

/* Queue the parts the writer has left behind (o->sp held): part k once the
 * size reaches past part k+1, at most connections in flight. */
static void stream_queue(struct obj *o)
{
    while (!o->stream_off && o->sp_inflight < s3_conf.connections && (o->sp_next + 2) * o->psize <= o->sp_size &&
           o->sp_next < o->nparts) {
        size_t k = o->sp_next++;
        struct spart *pt = &o->parts[k];
        if (k == 0 || pt->busy || (pt->up && pt->up_gen == pt->gen))
            continue;
        struct stream_task *st = calloc(1, sizeof *st);
        if (!st)
            break;
        *st = (struct stream_task){.t = {.run = stream_run, .cancelled = stream_cancelled, .owner = o}, .o = o, .k = k};
        pt->busy = 1;
        o->sp_inflight++;
        if (s3_pool_submit(&s3_upload_pool, &st->t) < 0) { /* no workers: the commit uploads everything */
            pt->busy = 0;
            o->sp_inflight--;
            o->stream_off = 1;
            free(st);
        }
    }
}

static void stream_finish(struct obj *o, size_t k, uint64_t g, int ret, const char *etag)
{
    pthread_mutex_lock(&o->sp);
    o->parts[k].busy = 0;
    if (ret == 0) {
        o->parts[k].up = 1;
        o->parts[k].up_gen = g;
        snprintf(o->parts[k].etag, sizeof o->parts[k].etag, "%s", etag);
        stream_drop(o, k);
    }
    o->sp_inflight--;
    if (ret == 0)
        stream_queue(o); /* the next part goes while the writer may be waiting (stream_wait) */
    pthread_cond_broadcast(&o->sp_done);
    struct waker w = stream_take_wake(o, 0); /* under sp: once it is released, o may go (stream_stop) */
    pthread_mutex_unlock(&o->sp);
    stream_wake(w);
}

static void stream_run(struct s3_task *t)
{
    struct stream_task *st = (struct stream_task *)t;
    struct obj *o = st->o;
    size_t k = st->k;
    free(st);
    char etag[128] = "";
    int ret = 0;
    pthread_mutex_lock(&o->sp);
    if (!o->mpu_id && !o->stream_off) { /* the first part starts the upload (the others wait) */
        char *id = NULL;
        write_meta_at(o, NULL, time(NULL)); /* a crash before the id is written: a later run looks for it */
        if ((ret = s3_mpu_start(&o->n, &id)) == 0) {
            test_crash_point("after-mpu-start", o->n.uri);
            o->mpu_id = id;
            write_meta(o, id); /* a later run aborts it if we die */
        } else {
            write_meta(o, NULL);
            o->stream_off = 1;
        }
    }
    uint64_t g = o->parts[k].gen, ps = o->psize;
    const char *id = o->stream_off ? NULL : o->mpu_id; /* fixed until the commit, which waits for us */
    pthread_mutex_unlock(&o->sp);
    char *buf = id ? malloc(ps) : NULL;
    if (!buf) {
        stream_finish(o, k, g, -ENOMEM, NULL);
        err_clear();
        return;
    }
    size_t done = 0; /* the staging file's bytes; past its end (a hole) zeroes */
    while (done < ps) {
        ssize_t n = pread(o->sfd, buf + done, ps - done, (off_t)(k * ps + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        done += (size_t)n;
    }
    memset(buf + done, 0, ps - done);
    ret = s3_mpu_put_part(&o->n, id, (unsigned)k + 1, buf, ps, etag, sizeof etag);
    free(buf);
    stream_finish(o, k, g, ret, etag); /* a failed part is uploaded again at the commit */
    err_clear();
}

static void stream_cancelled(struct s3_task *t)
{
    struct stream_task *st = (struct stream_task *)t;
    struct obj *o = st->o;
    size_t k = st->k;
    free(st);
    pthread_mutex_lock(&o->sp);
    uint64_t g = o->parts[k].gen;
    pthread_mutex_unlock(&o->sp);
    stream_finish(o, k, g, -ECANCELED, NULL);
}

/* After a write of [s, e) to a deferred object (o->state held for writing):
 * note it, and queue the parts the writer has left behind. */
static void stream_write(struct obj *o, uint64_t s, uint64_t e)
{
    pthread_mutex_lock(&o->sp);
    stream_touch(o, s, e);
    o->sp_size = o->size;
    stream_queue(o);
    pthread_mutex_unlock(&o->sp);
}

/* -EIO when [s, e) touches a dropped part (takes o->sp; state held). */
static int stream_dropped(struct obj *o, const char *op, uint64_t s, uint64_t e)
{
    int ret = 0;
    pthread_mutex_lock(&o->sp);
    for (size_t k = (size_t)(s / o->psize); s < e && k < o->nparts && k * o->psize < e && ret == 0; k++)
        if (o->parts[k].dropped)
            ret = err_fail(EIO,
                           "%s %s: bytes %llu to %llu were sent to the store and are no longer staged (an upload "
                           "is written once, in order)",
                           op, o->n.uri, (unsigned long long)(k * o->psize),
                           (unsigned long long)((k + 1) * o->psize - 1));
    pthread_mutex_unlock(&o->sp);
    return ret;
}

/* Bytes written but not sent: past the parts looked at, and those in flight
 * (o->sp held). Part 0 is never sent and not counted. */
static uint64_t stream_unsent(const struct obj *o)
{
    uint64_t sent = (uint64_t)(o->sp_next - o->sp_inflight) * o->psize;
    return o->sp_size > sent ? o->sp_size - sent : 0;
}

/* Whether a writer may go on (o->sp held): the unsent bytes are within
 * staging-max, or nothing is in flight that would free some (streaming
 * stopped, or what is left is part 0 and the last parts). */
static int stream_room(const struct obj *o)
{
    return o->stream_off || !o->sp_inflight || stream_unsent(o) <= s3_conf.staging_max;
}

/* The armed wake, disarmed, when there is room or always (the object closes,
 * streaming stops); {NULL} when none is due (o->sp held). Taken under the
 * lock, so it runs once; called after it (stream_wake), so a wake may take
 * locks of its own. */
static struct waker stream_take_wake(struct obj *o, int always)
{
    struct waker w = {NULL, NULL};
    if (o->wake && (always || stream_room(o))) {
        w = (struct waker){o->wake, o->wake_ctx};
        o->wake = NULL;
    }
    return w;
}

static void stream_wake(struct waker w)
{
    if (w.fn)
        w.fn(w.ctx);
}

int s3_obj_wait_room(void *h, void (*wake)(void *ctx), void *ctx)
{
    struct obj *o = OBJ(h);
    if (!o->deferred)
        return 1;
    pthread_mutex_lock(&o->sp);
    o->asks = 1;
    struct waker earlier = stream_take_wake(o, 1); /* one wait per handle: the earlier one goes */
    int ready = stream_room(o);
    if (!ready) {
        o->wake = wake;
        o->wake_ctx = ctx;
    }
    pthread_mutex_unlock(&o->sp);
    stream_wake(earlier);
    return ready;
}

/* Backpressure for a writer of a deferred object whose host does not ask
 * first (.wait_room; no lock held): while its unsent bytes pass staging-max
 * and parts are in flight, wait for them, at most STREAM_WAIT_MS. Such a
 * writer may be a thread that serves others too, so one wait stays short:
 * past it the write is taken and the next one waits again, so a stalled store
 * lets the staging grow by about one write per wait. */
static void stream_wait(struct obj *o)
{
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    dl.tv_nsec += STREAM_WAIT_MS * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec += dl.tv_nsec / 1000000000L;
        dl.tv_nsec %= 1000000000L;
    }
    pthread_mutex_lock(&o->sp);
    while (!o->asks && !stream_room(o))
        if (pthread_cond_timedwait(&o->sp_done, &o->sp, &dl) == ETIMEDOUT)
            break;
    pthread_mutex_unlock(&o->sp);
}

/* Note [a, b) released in pt: the runs it touches join it; past SPART_RUNS
 * runs the shortest is forgotten (never more than was released). */
static void spart_release(struct spart *pt, uint64_t a, uint64_t b)
{
    struct span v[SPART_RUNS + 1];
    int n = 0;
    for (int i = 0; i < SPART_RUNS; i++) {
        struct span r = pt->rel[i];
        if (r.s == r.e)
            continue;
        if (r.s <= b && a <= r.e) { /* the others touch neither r nor [a, b): no second pass */
            a = min64(a, r.s);
            b = r.e > b ? r.e : b;
        } else {
            v[n++] = r;
        }
    }
    v[n++] = (struct span){a, b};
    if (n > SPART_RUNS) {
        int m = 0;
        for (int i = 1; i < n; i++)
            if (v[i].e - v[i].s < v[m].e - v[m].s)
                m = i;
        v[m] = v[--n];
    }
    for (int i = 0; i < SPART_RUNS; i++)
        pt->rel[i] = i < n ? v[i] : (struct span){0, 0};
}

int s3_obj_release(void *h, uint64_t off, uint64_t len)
{
    struct obj *o = OBJ(h);
    uint64_t end;
    if (!o->deferred || __builtin_add_overflow(off, len, &end))
        return 0;
    pthread_mutex_lock(&o->sp);
    for (size_t k = (size_t)(off / o->psize); off < end && k < o->nparts && k * o->psize < end; k++) {
        struct spart *pt = &o->parts[k];
        uint64_t a = off > k * o->psize ? off : k * o->psize, b = min64(end, (k + 1) * o->psize);
        spart_release(pt, a, b);
        stream_drop(o, k);
    }
    pthread_mutex_unlock(&o->sp);
    return 0;
}

/* Wait until no part upload of o is queued or running; streaming stops. */
static void stream_stop(struct obj *o)
{
    pthread_mutex_lock(&o->sp);
    o->stream_off = 1; /* before the cancel: a part ending now queues no other */
    pthread_mutex_unlock(&o->sp);
    s3_pool_cancel(&s3_upload_pool, o);
    pthread_mutex_lock(&o->sp);
    while (o->sp_inflight)
        pthread_cond_wait(&o->sp_done, &o->sp);
    struct waker w = stream_take_wake(o, 1); /* writes are no longer held back: a waiter goes on */
    pthread_mutex_unlock(&o->sp);
    stream_wake(w);
}

/* The commit of a streamed object: the parts not uploaded, or written since,
 * uploaded now; then CompleteMultipartUpload. o->pub and o->state (shared)
 * held, streaming stopped. */
static int stream_complete(struct obj *o, uint64_t size, char *etag_out, size_t cap)
{
    uint64_t ps = o->psize;
    unsigned n = (unsigned)((size + ps - 1) / ps);
    struct upload u = {.o = o, .id = o->mpu_id, .nparts = n};
    struct seg *segs = calloc(n, sizeof *segs);
    unsigned char *done = calloc(n, 1);
    u.etags = calloc(n, sizeof *u.etags);
    int ret = 0;
    if (!segs || !done || !u.etags) {
        ret = err_fail(ENOMEM, "publish %s: out of memory", o->n.uri);
        goto out;
    }
    for (unsigned k = 0; k < n; k++) {
        segs[k] = (struct seg){k * ps, min64(size, (k + 1) * ps), 0};
        struct spart *pt = k < o->nparts ? &o->parts[k] : NULL;
        if (pt && pt->up && pt->up_gen == pt->gen && segs[k].e - segs[k].s == ps) {
            done[k] = 1;
            snprintf(u.etags[k], sizeof u.etags[k], "%s", pt->etag);
        }
    }
    u.segs = segs;
    u.done = done;
    ret = upload_parts(&u);
    if (ret == 0) {
        test_crash_point("before-complete", o->n.uri);
        ret = s3_mpu_complete(&o->n, o->mpu_id, u.etags, n, etag_out, cap);
    }
out:
    free(segs);
    free(done);
    free(u.etags);
    return ret;
}

/* Commit a deferred object whose parts were streamed: 1 when there is no
 * streamed upload to complete (the caller publishes as usual), else 0 or the
 * failure (the upload is aborted then, and a retry publishes as usual). */
static int stream_commit(struct obj *o)
{
    stream_stop(o);
    if (!o->mpu_id)
        return 1;
    pthread_mutex_lock(&o->pub);
    pthread_rwlock_rdlock(&o->state);
    uint64_t size = o->size;
    char etag[128] = "";
    int ret = 1;
    if (size > o->psize && (size + o->psize - 1) / o->psize <= MAX_PARTS)
        ret = stream_complete(o, size, etag, sizeof etag);
    pthread_rwlock_unlock(&o->state);
    if (ret != 0)
        s3_mpu_abort(&o->n, o->mpu_id);
    free(o->mpu_id);
    o->mpu_id = NULL;
    if (ret <= 0)
        publish_done(o, ret, size, etag, 0);
    pthread_mutex_unlock(&o->pub);
    return ret;
}

/* ---- a deferred publish ---- */

int s3_obj_open_deferred(const char *path, void **handle)
{
    struct s3_name n;
    int ret = object_name(path, &n);
    if (ret < 0)
        return ret;
    struct handle *h = calloc(1, sizeof *h);
    struct obj *o = h ? obj_alloc(&n) : NULL;
    if (!o) {
        ret = err_fail(ENOMEM, "open %s: out of memory", n.uri);
        s3_name_free(&n);
        free(h);
        return ret;
    }
    o->deferred = 1;
    o->changed = 1; /* the commit publishes it, even empty */
    o->psize = s3_conf.part_size < MIN_PART_BYTES ? MIN_PART_BYTES : s3_conf.part_size;
    o->gen = s3_cache_gen();
    if ((ret = staging_open(o)) < 0) {
        if (o->spath) {
            unlink(o->mpath);
            unlink(o->spath);
        }
        obj_free(o);
        free(h);
        return ret;
    }
    o->rw = 1;
    o->refs = 1;
    h->o = o;
    h->rw = 1;
    *handle = h;
    return 0;
}

/* The test seam of the crash tests (QCOWD_S3_TEST_CRASH). */
static void test_crash_point(const char *point, const char *uri);

int s3_obj_commit(void *h, unsigned flags)
{
    struct obj *o = OBJ(h);
    if (!o->deferred)
        return err_fail(EINVAL, "publish %s: not a deferred object", o->n.uri);
    if (flags & VFS_COMMIT_EXCL) {
        /* S3 (and Swift) cannot refuse a CompleteMultipartUpload on an existing
         * key: the name is looked for just before (the catalog holds the name
         * against its own makers meanwhile) */
        struct s3_head hd;
        int r = s3_head_object(&o->n, &hd);
        if (r == 0)
            return err_fail(EEXIST, "publish %s: the object exists", o->n.uri);
        if (r != -ENOENT || !strstr(err_msg(r), "no such object"))
            return r;
        err_clear();
    }
    test_crash_point("before-commit", o->n.uri);
    int ret = stream_commit(o);
    if (ret == 1)
        ret = publish(o);
    if (ret == 0)
        s3_obj_forget(&o->n); /* an object open on the key shows the old version: the next open starts afresh */
    return ret;
}
