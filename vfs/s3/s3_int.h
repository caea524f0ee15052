/* s3_int.h: what the files of the s3 plugin share: growable strings, the SigV4
 * signer (sigv4.c), the HTTP client with its handle pool (http.c), the block
 * cache (cache.c), and the configuration. */
#ifndef QCOWD_S3_INT_H
#define QCOWD_S3_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* ---- sbuf.c: a growable, always NUL-terminated byte string ---- */

struct sbuf {
    char *p;    /* NULL until the first append */
    size_t len; /* bytes, without the NUL */
    size_t cap;
    int oom;    /* an append failed: p is incomplete */
};

void sbuf_add(struct sbuf *b, const void *data, size_t n);
void sbuf_puts(struct sbuf *b, const char *s);
void sbuf_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sbuf_free(struct sbuf *b);
/* The string ("" when empty); NULL when an append ran out of memory. Borrowed. */
const char *sbuf_str(struct sbuf *b);

/* Append s percent-encoded as SigV4 wants (RFC 3986 unreserved kept, hex upper
 * case); '/' is kept when keep_slash (object keys in paths). */
void s3_uri_encode(struct sbuf *b, const char *s, int keep_slash);

/* The text between the first <tag> and </tag> at or after *pos in xml, XML
 * entities decoded, into a new string (free()); *pos moves past it. NULL when
 * there is none (or on ENOMEM). */
char *s3_xml_next(const char *xml, const char *tag, const char **pos);
/* The same, the text left as it is (for an element holding elements). */
char *s3_xml_raw(const char *xml, const char *tag, const char **pos);

/* ---- uploads.c: a ListMultipartUploads page ---- */

/* An ISO 8601 UTC time ("2026-12-03T18:27:29.000Z") in seconds since the
 * epoch, or -1 when s is NULL or not one. */
int64_t s3_iso_time(const char *s);

/* Called per upload; initiated is -1 when the store did not say (or said it
 * in a form not understood). 0 goes on; a negative errno stops the listing. */
typedef int (*s3_upload_fn)(void *ctx, const char *key, const char *id, int64_t initiated);

/* Where the next page starts (strings of the answer; NULL when not truncated). */
struct s3_uploads_page {
    int truncated;
    char *next_key, *next_id;
};

/* Parse one answer: cb for each <Upload> whose key starts with prefix (others
 * are never passed on, even when the store ignored the prefix), then pg. 0, a
 * negative errno of cb, -EPROTO for an answer out of bounds (an upload without
 * key or id, a key past 1024 bytes, more than 1000 uploads, truncated without
 * a place to go on), or -ENOMEM. pg is freed first and on failure. */
int s3_uploads_parse(const char *xml, const char *prefix, s3_upload_fn cb, void *ctx,
                     struct s3_uploads_page *pg);
void s3_uploads_page_free(struct s3_uploads_page *pg);

/* ---- sigv4.c: AWS Signature Version 4 ---- */

struct s3_hdr {
    const char *name;  /* any case; signed in lower case */
    const char *value; /* trimmed and inner runs of spaces folded when signed */
};

struct s3_param {
    const char *name; /* raw (not encoded) */
    const char *value; /* raw; "" gives "name=" */
};

struct s3_sign_in {
    const char *method;
    const char *path;  /* the canonical, already encoded path: "/bucket/key" */
    const struct s3_param *params; /* query parameters, any order */
    size_t nparams;
    const struct s3_hdr *hdrs; /* every header to sign, host and x-amz-date included */
    size_t nhdrs;
    const char *payload_hash; /* hex SHA-256 of the body, or "UNSIGNED-PAYLOAD" */
    const char *amz_date;     /* YYYYMMDDTHHMMSSZ */
    const char *region, *service, *access_key, *secret_key;
};

/* The canonical query string of params (sorted by encoded name, then value). */
void s3_canonical_query(struct sbuf *out, const struct s3_param *params, size_t n);

/* The Authorization header value for in, and (when not NULL) the canonical
 * request and the string to sign, for tests. 0, or -ENOMEM/-EINVAL. */
int s3_sigv4_sign(const struct s3_sign_in *in, struct sbuf *auth, struct sbuf *creq, struct sbuf *sts);

/* Lower-case hex SHA-256 of data into out[65]. */
void s3_sha256_hex(const void *data, size_t n, char out[65]);

/* The ETag S3 gives the object a multipart upload of these parts makes: the MD5
 * of the parts' binary MD5s, "-" and the part count, quoted ("\"hex-N\"").
 * etags are the parts' ETags as the store answered (quoted or not). 0, or
 * -EINVAL when one is not a hex MD5 (no such ETag to expect) or out is short. */
int s3_mpu_etag(const char (*etags)[128], unsigned n, char *out, size_t cap);

/* ---- config.c ---- */

struct s3_conf {
    char *endpoint;    /* "http://host:port", no trailing '/' */
    char *region;      /* default us-east-1 */
    char *access_key, *secret_key;
    char *staging_dir; /* local staging files of objects open for writing */
    uint64_t block_size;   /* read cache block, what a random read's miss fetches (default 64 KiB) */
    uint64_t cache_bytes;  /* block cache bound (default 64 MiB) */
    uint64_t readahead;    /* largest read-ahead window (default 32 MiB; at most half the cache is used) */
    unsigned readahead_gets; /* read-ahead GETs in flight at once, process-wide (default connections - 2;
                                0: read-ahead extends the reader's own GET, one at a time) */
    int readahead_gets_set;
    uint64_t part_size;    /* multipart part size (default 8 MiB, at least 5 MiB) */
    uint64_t staging_max;  /* dirty bytes per object before an early publish (default 1 GiB) */
    uint64_t copy_max;     /* largest CopyObject; larger copies go in parts of this size (default 5 GiB) */
    unsigned connections;  /* easy handles in the pool = requests in flight (default 8) */
    unsigned retries;      /* extra attempts for 5xx, throttling, transport errors (default 4) */
    long connect_timeout_ms; /* default 5000 */
    long timeout_ms;       /* no progress for this long: a timeout (default 30000) */
    uint64_t stat_ttl_ns;  /* how long what is known of an object answers stat and open (default 1 s) */
    int stat_ttl_set;      /* stat-ttl was given (0 is a value: always ask) */
    int allow_http;        /* allow-http=yes: a plain http:// endpoint is accepted */
    char *sweep_root;      /* "s3://bucket/prefix" whose stale uploads are aborted (qcowd sets its catalog) */
    uint64_t stale_upload_s; /* an upload started longer ago is stale (default 24 h; 0: never) */
    int stale_upload_set;
};

extern struct s3_conf s3_conf;

/* Fill unset fields from the environment and defaults, once; 0 or -errno with a
 * message (no endpoint, no credentials). Thread-safe. */
int s3_conf_ready(void);
int s3_conf_set(const char *key, const char *value);

/* ---- http.c ---- */

/* Counters for .stats, all atomics. */
enum s3_op { S3_OP_GET, S3_OP_HEAD, S3_OP_PUT, S3_OP_PART, S3_OP_COPY, S3_OP_LIST, S3_OP_DELETE,
             S3_OP_OTHER, S3_OP_COUNT };
struct s3_stats {
    atomic_ullong requests[S3_OP_COUNT];
    atomic_ullong bytes_in;   /* response bodies received */
    atomic_ullong bytes_out;  /* request bodies sent */
    atomic_ullong retries;
    atomic_ullong errors;
    atomic_ullong cache_hits, cache_misses;  /* blocks */
    atomic_ullong copied_bytes;  /* copied server-side by UploadPartCopy/CopyObject */
    atomic_ullong publishes;
    atomic_ullong gets_in_flight;    /* GETs of object data being received now */
    atomic_ullong gets_in_flight_peak; /* the most at once since the start */
    atomic_ullong readahead_gets;    /* GETs issued by read-ahead workers */
    atomic_ullong readahead_dropped; /* of those, answers not kept: failed, another version, object closed */
    atomic_ullong readahead_waits;   /* reads that waited for a read-ahead GET instead of their own */
    atomic_ullong uploads_aborted;   /* unfinished multipart uploads of dead runs or stale, aborted (sweep.c) */
};
extern struct s3_stats s3_stats;
extern const char *const s3_op_names[S3_OP_COUNT];

struct s3_req {
    /* in */
    enum s3_op op;
    const char *method;
    const char *bucket;
    const char *key;   /* NULL or "" for bucket requests */
    const struct s3_param *params;
    size_t nparams;
    const struct s3_hdr *hdrs; /* extra headers, signed */
    size_t nhdrs;
    const void *body;
    size_t body_len;
    void *into;        /* GET: the body goes here (at most into_cap bytes) ... */
    size_t into_cap;
    int quiet_404;     /* a 404 is an answer, not an error to count */
    /* out */
    long status;
    struct sbuf text;  /* ... else here */
    size_t into_len;
    char etag[128];
    char last_modified[64];
    uint64_t content_length;
    int status_ok_hint; /* the response being received is a 2xx (body goes to into) */
    int too_big;        /* the text body passed S3_TEXT_MAX: the transfer was stopped */
};

/* The most of a response body kept as text (listings, errors, multipart
 * answers): a ListObjectsV2 page of 1000 keys is well under 1 MiB. */
#define S3_TEXT_MAX (16u << 20)

/* Run r with retries. 0 when the server answered 2xx; else a negative errno with
 * a message naming what (e.g. "GET s3://b/k") and the cause: -EACCES (403: wrong
 * key or secret), -ENOENT (404; "no such bucket" when the server says so),
 * -ECONNREFUSED / -EHOSTUNREACH (endpoint unreachable), -ETIMEDOUT, -EAGAIN
 * (throttled after every retry), -EREMOTEIO (5xx after every retry), -ESTALE
 * (412), -EOPNOTSUPP (501), -EPROTO (another 4xx). r->status is set whenever
 * the server answered. Thread-safe: takes a handle from the pool. */
int s3_http(struct s3_req *r, const char *what);
void s3_req_free(struct s3_req *r);
/* Free the pool (at exit). */
void s3_http_cleanup(void);

/* ---- cache.c: the shared block cache ---- */

/* A new generation id: one per open object version. */
uint64_t s3_cache_gen(void);
/* If block idx of gen is cached, copy its bytes [from, from + n) (cut at its end)
 * into buf and return its length; else -1. */
long s3_cache_get(uint64_t gen, uint64_t idx, uint64_t from, size_t n, void *buf);
/* Insert (replaces); evicts least recently used blocks past the bound. */
/* Whether block idx of gen is cached (no LRU update, no counting). */
int s3_cache_has(uint64_t gen, uint64_t idx);
void s3_cache_put(uint64_t gen, uint64_t idx, const void *data, size_t len);
/* Drop blocks [first, last] of gen (last UINT64_MAX: to the end). */
void s3_cache_drop(uint64_t gen, uint64_t first, uint64_t last);

/* ---- pool.c: worker pools (read-ahead GETs; a deferred object's streamed parts) ---- */

/* A unit of background work; owner says whose it is (for s3_pool_cancel). */
struct s3_task {
    void (*run)(struct s3_task *t);       /* on a worker; owns t from then on */
    void (*cancelled)(struct s3_task *t); /* instead of run, when cancelled while queued */
    void *owner;
    struct s3_task *next;
};

/* A pool of worker threads, started on demand up to *max (read when work
 * comes: the configuration is complete by then), taking tasks from one FIFO
 * queue. Statically initialised with S3_POOL_INIT; fields private to pool.c. */
struct s3_pool {
    pthread_mutex_t lock;
    pthread_cond_t work;
    const unsigned *max;         /* the bound: a field of s3_conf */
    struct s3_task *head, *tail; /* the queue (under lock) */
    pthread_t *threads;
    unsigned nthreads, idle, queued; /* started; waiting for work; tasks queued (under lock) */
    int stopping;
};
#define S3_POOL_INIT(maxp) {.lock = PTHREAD_MUTEX_INITIALIZER, .work = PTHREAD_COND_INITIALIZER, .max = (maxp)}

/* The read-ahead GETs (readahead-gets workers) and the streamed parts of
 * deferred objects (connections workers): separate, so parts never wait
 * behind read-ahead and stream with readahead-gets 0. */
extern struct s3_pool s3_ra_pool, s3_upload_pool;

/* Queue t for one of pool's workers (started on demand, never more than the
 * bound); 0, or -1 when there are no workers (a bound of 0, none could start,
 * or the pool is stopped): the caller keeps t. */
int s3_pool_submit(struct s3_pool *pool, struct s3_task *t);
/* Take every queued task of owner off pool's queue and call its cancelled();
 * tasks already running are not waited for (their owner does that). */
void s3_pool_cancel(struct s3_pool *pool, void *owner);
/* Stop and join pool's workers; queued tasks are cancelled (at exit). */
void s3_pool_stop(struct s3_pool *pool);

/* ---- meta.c: what is known of objects, for stat-ttl ---- */

/* An object as the store last showed it, or as our own last change left it. */
struct s3_meta {
    int exists;      /* 0: there is no such object */
    uint64_t size;
    int64_t mtime;   /* seconds since the epoch */
    char etag[128];  /* as the store gives it, quoted */
    int listed;      /* learned from a listing (Swift lists a multipart copy with another ETag) */
};

/* A stamp to take before asking the store, for s3_meta_learn. */
uint64_t s3_meta_stamp(void);
/* 1 and *m when bucket/key was learned or changed by us less than stat-ttl ago;
 * else 0 (the caller asks the store). Thread-safe, as all of these. */
int s3_meta_get(const char *bucket, const char *key, struct s3_meta *m);
/* An answer of the store (a HEAD, a listing entry) asked for at stamp; dropped
 * when our own change of the key came after the stamp (the answer is older). */
void s3_meta_learn(const char *bucket, const char *key, const struct s3_meta *m, uint64_t stamp);
/* Our own change of bucket/key, known at once: m is what it is now, or NULL
 * when the outcome is unknown (a failed publish): the next stat asks. */
void s3_meta_set(const char *bucket, const char *key, const struct s3_meta *m);
/* What is known of bucket/key is wrong (a read met another ETag): ask next time. */
void s3_meta_drop(const char *bucket, const char *key);
/* Free everything (at exit). */
void s3_meta_cleanup(void);

#endif
