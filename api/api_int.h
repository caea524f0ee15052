/* api_int.h: what the files of the HTTP layer share: per-request state, request
 * bodies, replies, the errno -> HTTP table, Range parsing, metrics and the route
 * handlers. */
#ifndef QCOWD_API_INT_H
#define QCOWD_API_INT_H

#include <jansson.h>
#include <microhttpd.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "auth.h"
#include "qimgjson.h"

struct catalog;
struct catalog_image;
struct qcow2_image;
struct qcow2_bitmap_info;
struct qcow2_snapshot_info;
struct req;

/* How a request with a body (PUT, POST, PATCH) goes on after its handler ran on
 * the headers and left no answer queued. The server calls data for each piece
 * as it arrives (a failure is remembered, the rest of the body dropped and the
 * failure answered once the body is complete), then end to queue the answer, and
 * done in every case from the completion callback (completed false: the client
 * went away before the body was complete, end was never called). */
struct api_body {
    int (*data)(struct req *r, const char *buf, size_t n); /* 0 or -errno with err_msg() */
    enum MHD_Result (*end)(struct req *r);
    void (*done)(struct req *r, bool completed);
    /* Optional: asked before each data call. 1 (or a failure, which data then
     * reports): data may go now. 0: its store holds it back; wake(ctx) is called
     * exactly once later, from any thread, and meanwhile the connection sleeps
     * suspended with the bytes kept (no server thread waits; data gets the same
     * bytes after the wake). NULL: data is called at once. */
    int (*ready)(struct req *r, void (*wake)(void *ctx), void *ctx);
};

/* Counters for GET /metrics, updated from the completion callback. */
#define API_METHODS 8 /* GET HEAD PUT POST PATCH DELETE OPTIONS other */
#define API_BUCKETS 12
struct api_metrics {
    atomic_ullong requests[API_METHODS][500]; /* by method and status 100..599 */
    atomic_ullong bytes_in, bytes_out;        /* request and response body bytes */
    atomic_ullong sendfile;                   /* responses sent from a file by the kernel */
    atomic_ullong buckets[API_BUCKETS];       /* latency histogram (not cumulative) */
    atomic_ullong count, usec_sum;            /* completed requests, their total latency */
    atomic_uint inflight;                     /* requests between their first call and completion */
};

/* The validators of an image answer (validators.c): set by the handler before
 * the answer's bytes are read, so a tag never labels bytes older than itself. */
struct api_validators {
    bool set;                /* the rest is valid */
    char etag[72];           /* the strong entity-tag, quotes included */
    int64_t lm;              /* Last-Modified, seconds since the epoch */
    bool lm_strong;          /* lm alone names this representation (dates in If-Range, If-*-Since) */
    struct qcow2_image *img; /* whose generation gen is (borrowed: valid while the handler holds the image) */
    uint64_t gen;
};

/* One request, kept in MHD's con_cls from the first call to the completion callback. */
struct req {
    struct api_server *srv;
    struct catalog *cat;
    struct MHD_Connection *conn;
    char method[16];
    char *path;      /* the raw path as received (for the log) */
    bool head;       /* a HEAD request: headers only */
    bool answered;   /* a response was queued */
    bool deferred;   /* routed on the next call (methods without a body) */
    unsigned status; /* the status queued */
    uint64_t bytes;  /* body bytes produced (streams add as they go) */
    struct timespec t0;
    struct api_metrics *metrics;
    unsigned threads;           /* the server's worker threads (max readers) */
    bool no_sendfile;           /* --sendfile=no */
    /* requests with a body */
    const struct api_body *body; /* set by the handler to receive the body */
    void *ctx;                   /* the handler's state; freed by body->done */
    uint64_t bytes_in;           /* body bytes received */
    int body_err;                /* first failure of body->data (negative errno) */
    char *body_msg;              /* its message */
    bool body_now;               /* answer body_err at once, without the rest of the body */
    void (*done)(void *ctx);     /* called once the request is over (after the body is sent) */
    void *done_ctx;
    struct jobs *jobs;           /* the job engine, or NULL */
    struct events *events;       /* the event bus, or NULL */
    struct api_offload *off;     /* work running on a thread of its own (api_offload) */
    struct api_guard *guard;     /* the server's budgets for slow clients */
    struct guard_conn *gc;       /* this connection in it (NULL: not tracked) */
    struct body_wait *wait;      /* the body's sleep while its store holds it back (body->ready) */
    const struct api_access_cfg *acc; /* who may do what (the server's) */
    char who[80];                /* who was admitted: a token's name, "ticket:ID", "-" without tokens */
    char cors_origin[256];       /* an allowed Origin to echo in CORS headers, or "" */
    struct api_validators val;   /* of the image answered (ETag, Last-Modified), when set */
};

#define API_MAX_ARGS 2 /* path segments a route captures */

/* Run work(ctx) on a thread of its own, with r's connection suspended (no
 * server thread waits for it, nor do the other connections of that thread);
 * once it is done, then(r, ctx) answers on a server thread. free_ctx(ctx) is
 * called once neither needs ctx (also when the client went away). For work
 * whose length the client controls (a preallocating create). Returns what the
 * handler returns. */
struct api_offload;
enum MHD_Result api_offload(struct req *r, void (*work)(void *ctx), enum MHD_Result (*then)(struct req *r, void *ctx),
                            void *ctx, void (*free_ctx)(void *ctx));

typedef enum MHD_Result (*api_handler)(struct req *r, char **args);

/* ---- route.c ---- */

#define API_ROUTE_SEGS 6 /* segments of the longest route; a longer path is 404 */

/* Where a request goes: a handler with its captured segments, or a verdict. */
#define ROUTE_JSON         0x1u /* a request body, if any, must be application/json (415) */
#define ROUTE_TICKET_READ  0x2u /* a data ticket with "read" for the image may call it */
#define ROUTE_TICKET_WRITE 0x4u /* a data ticket with "write" for the image may call it */

struct api_routing {
    api_handler fn;              /* the handler, or NULL: answer status */
    enum auth_role role;         /* fn set: the least role that may call it */
    unsigned flags;              /* fn set: ROUTE_* */
    char *args[API_MAX_ARGS];    /* the segments the route captures (borrowed from segs) */
    unsigned status;             /* fn NULL: 400 (bad path), 404 or 405 */
    const char *code;            /* fn NULL: the error code ("not-found", ...) */
    char msg[200];               /* fn NULL: the error message */
    char allow[80];              /* 405: the Allow header ("GET, HEAD") */
    char *segs[API_ROUTE_SEGS];  /* the decoded segments (owned) */
    unsigned nsegs;
};

/* Route method (as sent, e.g. "GET") and url (the raw path, %XX escapes kept)
 * through the route table: 0 with out->fn and out->args set, or -1 with the
 * verdict in out. Either way the caller frees out with api_routing_free. Pure:
 * no MHD calls, no allocation beyond the segments; thread-safe. */
int api_route(const char *method, const char *url, struct api_routing *out);
void api_routing_free(struct api_routing *rt);

/* ---- respond.c ---- */

/* Status and error code for a negative errno (one table for the whole API). */
unsigned api_errno_status(int err);
const char *api_errno_code(int err);

/* A new JSON string of s; bytes that are not UTF-8 become '?'. NULL on ENOMEM. */
json_t *api_jstr(const char *s);
/* msg without the server's own paths: every "CATALOG/" (the catalog folder as
 * the store names it, with or without its "scheme:") is cut. A new string, or
 * NULL (then msg may go as it is). */
char *api_scrub_paths(struct catalog *cat, const char *msg);
/* Queue body (reference stolen) as JSON with status. */
enum MHD_Result api_reply_json(struct req *r, unsigned status, json_t *body);
/* The same with one extra header (e.g. Location). */
enum MHD_Result api_reply_json_hdr(struct req *r, unsigned status, json_t *body, const char *hdr,
                                   const char *hdr_value);
/* Queue {"error":{"code","message"}} for err (negative errno) with message msg. */
enum MHD_Result api_reply_error(struct req *r, int err, const char *msg);
/* The same with err_msg(err) as the message. */
enum MHD_Result api_reply_errno(struct req *r, int err);
/* Queue an error with an explicit status and code (405, 404 for routes). */
enum MHD_Result api_reply_status(struct req *r, unsigned status, const char *code, const char *msg, const char *hdr,
                                 const char *hdr_value);
/* Queue an empty answer (204, or a status whose body is not needed). */
enum MHD_Result api_reply_empty(struct req *r, unsigned status, const char *hdr, const char *hdr_value);
/* Queue resp with status; takes care of the bookkeeping; destroys resp. */
enum MHD_Result api_queue(struct req *r, unsigned status, struct MHD_Response *resp);

/* ---- range.c ---- */

/* Parse a Range header value for a body of size bytes into [*start, *start+*len).
 * Returns 0, -EINVAL for a malformed header, -ERANGE for a range that cannot be
 * served (past the end, an empty suffix, or more than one range); err_msg() says
 * which. */
int api_parse_range(const char *value, uint64_t size, uint64_t *start, uint64_t *len);

/* Where the bytes of a ranged answer come from. pread reads exactly len bytes at
 * off (0 or -errno with err_msg()); it may run on any of MHD's threads, one call
 * at a time per answer. release frees ctx; what names the source in log lines
 * (valid until release). */
struct api_source {
    void *ctx;
    int (*pread)(void *ctx, void *buf, size_t len, uint64_t off);
    /* Optional: when [off, off+len) is one run of bytes in a file descriptor,
     * store it (borrowed) and the run's offset and return 1; the run stays those
     * bytes until release. 0: use pread. */
    int (*pin)(void *ctx, uint64_t off, uint64_t len, int *fd, uint64_t *fd_off);
    void (*release)(void *ctx);
    const char *what;
};

/* Answer a GET/HEAD of a body of size bytes from src, honouring one Range: 200
 * with everything, 206 with Content-Range, 416 (the size in Content-Range) or 400 for a
 * bad Range; short ranges are read before answering (a failure is a JSON error),
 * long ones streamed. Takes src: released on every path. */
enum MHD_Result api_reply_ranged(struct req *r, uint64_t size, const struct api_source *src);

/* Decode %XX escapes of s (len bytes) into a new string; NULL with err_msg() set
 * for a bad escape or an encoded NUL. */
char *api_decode(const char *s, size_t len);

/* Parse "bytes FIRST-LAST/SIZE" or "bytes FIRST-LAST/ *" (no space), the
 * Content-Range of a PUT. Returns 0 with *last >= *first (*complete UINT64_MAX for
 * '*'), or -EINVAL with err_msg() for a malformed header. */
int api_parse_content_range(const char *v, uint64_t *first, uint64_t *last, uint64_t *complete);
/* Parse "bytes * /SIZE" (no space: RFC 9110's form naming only the whole size),
 * which a PUT .../file sends to ask how much of a resumable upload arrived.
 * Returns 0 with *complete, or -EINVAL (no message: the caller tries the other form). */
int api_parse_content_range_size(const char *v, uint64_t *complete);

/* Parse a decimal query argument "name" (percent-decoded) into *v; 0 when absent
 * (v unchanged), 1 when present, -EINVAL with err_msg() for a bad value. */
int api_query_u64(struct req *r, const char *name, uint64_t *v);
/* A yes/no query argument ("y"/"n", also "yes"/"no", "true"/"false", "1"/"0"). */
int api_query_bool(struct req *r, const char *name, bool *v);
/* The value parsers of the two above: raw is the argument as received (%XX
 * escapes kept), or NULL when absent; same returns. */
int api_parse_u64_arg(const char *name, const char *raw, uint64_t *v);
int api_parse_bool_arg(const char *name, const char *raw, bool *v);

/* ---- validators.c: ETag, Last-Modified, If-* ---- */

/* Set r->val for the image ci (a reference the caller holds): its info, data and
 * file answers (snapshot: the data of one of its snapshots, whose tag follows
 * the snapshot table only). Call before reading what the answer sends. */
void api_validators_image(struct req *r, const struct catalog_image *ci, bool snapshot);
/* Fold the bytes of a body built whole (a + b) into r->val's tag, so a
 * representation that changes with more than the image (an info's actual-size)
 * gets a tag of its own. */
void api_validators_body(struct req *r, const char *a, const char *b);
/* The preconditions of RFC 9110 13.2.2 against r->val. A GET or HEAD of an
 * existing image: true: go on; false: 304 (If-None-Match, If-Modified-Since),
 * 412 (If-Match, If-Unmodified-Since) or 400 (a malformed list) queued in *res. */
bool api_check_read(struct req *r, enum MHD_Result *res);
/* The same for a change of the existing image ci, a reference the caller holds
 * until the change is made (NULL: one without validators, e.g. broken: only "*"
 * matches). With an If-Match that matched, the generation the validators were
 * made from is claimed (qcow2_claim_generation) before true is returned: of two
 * writers with one tag only one goes on. r->val is unset again on true. */
bool api_check_write(struct req *r, const struct catalog_image *ci, enum MHD_Result *res);
/* The same for a target that does not exist (an upload, a create): If-Match
 * fails (412); If-None-Match: * holds. */
bool api_check_absent(struct req *r, enum MHD_Result *res);
/* Whether the request says "If-None-Match: *" (create only if absent: a name
 * taken then answers 412, not 409). */
bool api_if_none_match_any(struct req *r);
/* Whether r has a precondition a change honours (If-Match, If-None-Match,
 * If-Unmodified-Since): for handlers that look the image up only for them. */
bool api_has_preconditions(struct req *r);
/* Whether a Range of r is to be served (true without If-Range): If-Range holds
 * r->val's ETag (strong comparison) or its Last-Modified while that is strong. */
bool api_if_range(struct req *r);
/* ETag and Last-Modified of r->val on resp when set and status is 200, 206 or
 * 304 (412: the ETag only). Called by api_queue. */
void api_validator_headers(const struct req *r, unsigned status, struct MHD_Response *resp);

/* Parsers (pure, thread-safe; fuzzed). api_etag_match: whether the If-Match /
 * If-None-Match value field names etag (strong comparison unless weak): 1 or 0,
 * -EINVAL with err_msg() when malformed. etag NULL: nothing exists ("*" fails
 * too); "": something without a tag ("*" only). */
int api_etag_match(const char *field, const char *etag, bool weak);
/* An HTTP-date (IMF-fixdate, rfc850 or asctime) into seconds since the epoch:
 * 0 or -EINVAL. */
int api_parse_http_date(const char *s, int64_t *out);
#define API_DATE_MAX 32
void api_format_http_date(int64_t t, char out[API_DATE_MAX]);

/* ---- images.c ---- */

enum MHD_Result api_health(struct req *r, char **args);
enum MHD_Result api_images_list(struct req *r, char **args);
enum MHD_Result api_image_info(struct req *r, char **args);
enum MHD_Result api_image_data(struct req *r, char **args);
enum MHD_Result api_image_extents(struct req *r, char **args);
/* The info object of an open image (a new reference, NULL on ENOMEM). */
json_t *api_info_json(const char *name, struct qcow2_image *img);

/* ---- manage.c: create, delete, and JSON request bodies ---- */

#define API_JSON_MAX (64u << 10) /* bytes a JSON request body may have */

/* Start collecting a JSON body for r, then call end with the parsed object. */
enum MHD_Result api_json_body(struct req *r, const char *name,
                              enum MHD_Result (*end)(struct req *r, const char *name, json_t *body));
enum MHD_Result api_image_create(struct req *r, char **args);
enum MHD_Result api_image_delete(struct req *r, char **args);

/* ---- write.c: PUT/PATCH/OPTIONS .../data ---- */

enum MHD_Result api_data_put(struct req *r, char **args);
enum MHD_Result api_data_patch(struct req *r, char **args);
enum MHD_Result api_data_options(struct req *r, char **args);

/* ---- file.c: GET/PUT .../file ---- */

enum MHD_Result api_file_get(struct req *r, char **args);
enum MHD_Result api_file_put(struct req *r, char **args);

/* ---- bitmaps.c: persistent dirty bitmaps ---- */

enum MHD_Result api_bitmaps_list(struct req *r, char **args);
enum MHD_Result api_bitmap_create(struct req *r, char **args);
enum MHD_Result api_bitmap_get(struct req *r, char **args);
enum MHD_Result api_bitmap_delete(struct req *r, char **args);
enum MHD_Result api_bitmap_clear(struct req *r, char **args);
enum MHD_Result api_bitmap_enable(struct req *r, char **args);
enum MHD_Result api_bitmap_disable(struct req *r, char **args);
enum MHD_Result api_bitmap_merge(struct req *r, char **args);
/* GET .../extents?context=dirty&bitmap=B of image. */
enum MHD_Result api_dirty_extents(struct req *r, const char *image);
struct catalog_image;
/* The next segment of a streamed answer: *head, *list (of *n, from
 * qcow2_snapshot_list, or NULL) and *tail, all taken by the stream. Returns 1,
 * 0 when there is none left, or a negative errno. */
typedef int (*api_segment_fn)(void *ctx, char **head, char **tail, struct qcow2_snapshot_info **list, uint32_t *n);
/* Answer 200 with head, the snapshot list (JSON objects, commas between) and
 * tail, then the segments more gives (may be NULL), streamed an entry at a
 * time; everything is taken (ctx freed with ctx_free at the end). */
enum MHD_Result api_reply_segments(struct req *r, char *head, char *tail, struct qcow2_snapshot_info *list,
                                   uint32_t n, api_segment_fn more, void *ctx, void (*ctx_free)(void *));
/* Answer a GET/HEAD of guest bytes of img (Range honoured). ci (a catalog
 * reference) or own (a private image, closed at the end) is released when the
 * response is done, also on failure. */
struct catalog_private;
enum MHD_Result api_send_data(struct req *r, struct qcow2_image *img, struct catalog_image *ci,
                              struct catalog_private *own);

/* ---- jobs.c: /v1/jobs and the endpoints that start jobs ---- */

/* Answer 202 with Location: /v1/jobs/ID and the job object; job is the handle
 * jobs_submit gave ({"id": ID}, reference stolen). */
enum MHD_Result api_reply_job(struct req *r, json_t *job);
/* The REST job object of a job view (a new reference, NULL on ENOMEM); its
 * error message names no server path (cat: the catalog whose folder is cut). */
struct job_info;
json_t *api_job_json(const struct job_info *ji, struct catalog *cat);
enum MHD_Result api_jobs_list(struct req *r, char **args);
enum MHD_Result api_job_get(struct req *r, char **args);
enum MHD_Result api_job_dismiss(struct req *r, char **args);
enum MHD_Result api_job_cancel(struct req *r, char **args);
enum MHD_Result api_job_pause(struct req *r, char **args);
enum MHD_Result api_job_resume(struct req *r, char **args);
enum MHD_Result api_image_convert(struct req *r, char **args);
enum MHD_Result api_image_check(struct req *r, char **args);
enum MHD_Result api_image_commit(struct req *r, char **args);

/* ---- snapshots.c ---- */

enum MHD_Result api_snapshots_list(struct req *r, char **args);
enum MHD_Result api_snapshot_create(struct req *r, char **args);
enum MHD_Result api_snapshot_delete(struct req *r, char **args);
enum MHD_Result api_snapshot_revert(struct req *r, char **args);
enum MHD_Result api_snapshot_data(struct req *r, char **args);

/* ---- events.c: GET /v1/events (Server-Sent Events) ---- */

enum MHD_Result api_events(struct req *r, char **args);

/* ---- tickets.c ---- */
enum MHD_Result api_tickets_list(struct req *r, char **args);
enum MHD_Result api_ticket_create(struct req *r, char **args);
enum MHD_Result api_ticket_delete(struct req *r, char **args);

/* ---- web.c: the dashboard's files (GET /, GET /ui/NAME) and GET /v1/whoami ---- */
enum MHD_Result api_web_index(struct req *r, char **args);
enum MHD_Result api_web_file(struct req *r, char **args);
enum MHD_Result api_whoami(struct req *r, char **args);

/* ---- admit.c ---- */

/* The checks before a handler: Host (421), Origin (403; a CORS preflight is
 * answered here), the client certificate (403), the bearer token or ticket
 * against rt's role (401/403), and a JSON endpoint's Content-Type (415). routed:
 * rt names a handler (else only the first checks run, then the router's verdict
 * is answered by the caller). true: go on; false: an answer is queued in *res. */
bool api_admit(struct req *r, const char *url, const struct api_routing *rt, bool routed, enum MHD_Result *res);

/* The CORS headers of an admitted cross-origin request, on resp. */
void api_cors_headers(const struct req *r, struct MHD_Response *resp);

/* ---- guard.c: budgets for slow and greedy clients ---- */

struct api_config;
struct api_guard;  /* the watchdog and the per-address counts */
struct guard_conn; /* one connection as the watchdog sees it */

/* What a connection is doing, for the watchdog: waiting for request headers
 * (cut past --header-timeout), receiving a body or sending a container download
 * (cut below --min-rate over each --header-timeout window), or anything else
 * (a handler at work, an event stream: never cut). */
enum guard_phase { GUARD_HEADERS, GUARD_BUSY, GUARD_BODY, GUARD_SEND };

/* Start the watchdog thread with cfg's budgets. 0 with *out, or -errno. */
int api_guard_new(const struct api_config *cfg, struct api_guard **out);
/* Stop the thread and free g; every connection must be closed. */
void api_guard_free(struct api_guard *g);
/* A connection accepted (fd, the client's address) and closed (before MHD
 * closes fd); called from MHD's connection notifications. open returns NULL on
 * ENOMEM (the connection is then not watched). Thread-safe. */
struct guard_conn *api_guard_open(struct api_guard *g, int fd, const struct sockaddr *sa);
void api_guard_close(struct guard_conn *gc);
/* The connection enters phase (its clock and byte count start again); bytes
 * counts n body bytes moved. NULL gc is ignored. From the connection's thread. */
void api_guard_phase(struct guard_conn *gc, enum guard_phase phase);
void api_guard_bytes(struct guard_conn *gc, uint64_t n);
/* What the watchdog calls (under its lock; kick must be quick and take no lock
 * of the guard) when it cuts gc: a connection sleeping suspended sees no
 * socket event, so kick resumes it to find the end. NULL kick: none. A kick
 * running when kick is replaced has returned by then. Thread-safe. */
void api_guard_kick(struct guard_conn *gc, void (*kick)(void *ctx), void *ctx);
/* The client's address ("127.0.0.3"; "?" for NULL gc). Borrowed, valid while gc is. */
const char *api_guard_addr(const struct guard_conn *gc);
/* Count one more event stream of addr: 0, or -EAGAIN with err_msg() naming
 * --max-listeners-per-client. unlisten takes one back. Thread-safe. */
int api_guard_listen(struct api_guard *g, const char *addr);
void api_guard_unlisten(struct api_guard *g, const char *addr);
/* Connections open now, and cut so far: past the header deadline, below the
 * minimum rate. */
void api_guard_counts(struct api_guard *g, unsigned *open, uint64_t *cut_headers, uint64_t *cut_slow);

/* ---- metrics.c ---- */

void api_metrics_record(struct api_metrics *m, const char *method, unsigned status, uint64_t in, uint64_t out,
                        double seconds);
enum MHD_Result api_metrics(struct req *r, char **args);

#endif
