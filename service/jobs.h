/* jobs.h: the job engine: long operations (snapshots, check, convert, commit) run
 * on a pool of worker threads, one job at a time per image, with QEMU's job states,
 * progress, pause/resume/cancel, and records that outlive a restart. */
#ifndef QCOWD_JOBS_H
#define QCOWD_JOBS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct jobs; /* opaque: the pool, the queue and every job record */
struct job;  /* opaque: one job, as its run function sees it */

enum job_status { JOB_CREATED, JOB_RUNNING, JOB_PAUSED, JOB_ABORTING, JOB_CONCLUDED };
#define JOB_STATUS_COUNT 5

/* A job as the service shows it: what api/ turns into the REST job object, and
 * what job events carry. Strings are NUL-terminated; result and params are JSON
 * texts. Either a view borrowed from the engine (valid only during the call that
 * gives it) or a copy owned by its holder (job_info_copy, freed with
 * job_info_release). */
struct job_info {
    char id[24];
    const char *type, *image;
    enum job_status status;
    bool pausing; /* running, asked to pause, not yet at its next progress point */
    bool cancelled;
    uint64_t current, total;
    const char *error;                           /* or NULL */
    const char *result;                          /* JSON text, or NULL */
    const char *params;                          /* JSON text (an object) */
    int64_t created_ms, started_ms, finished_ms; /* ms since 1970; 0: not yet */
    void *mem;                                   /* a copy: the one block holding its strings; a view: NULL */
};

/* Copy src into *dst (one allocation). Returns 0 or -ENOMEM (*dst then empty). */
int job_info_copy(struct job_info *dst, const struct job_info *src);
/* Free a copy's strings (a view or an empty one: nothing). */
void job_info_release(struct job_info *ji);
/* Estimated bytes a copy holds. */
size_t job_info_size(const struct job_info *ji);

/* An event about a job: "job-created", "job-status" (status, error, result or
 * pausing changed), "job-progress" (at most JOBS_PROGRESS_HZ per second per job, and a
 * last one when the work ends) or "job-dismissed"; job is a view. Called with
 * the engine's lock held, in the order of the changes: a job's events come
 * created, then its statuses and progress, concluded last but for dismissed.
 * It must not call back into the engine and must not block (copy and return). */
typedef void (*jobs_event_fn)(void *opaque, const char *event, const struct job_info *job);
#define JOBS_PROGRESS_HZ 4

#define JOBS_DEFAULT_QUEUED       256
#define JOBS_DEFAULT_PAUSED       8             /* jobs paused on a worker thread at once (--max-paused-jobs) */
#define JOBS_DEFAULT_RECORDS      1000          /* concluded jobs kept (--max-job-records); the oldest go */
#define JOBS_DEFAULT_RETENTION_MS (3600 * 1000) /* concluded jobs are dismissed after (--job-retention) */
#define JOBS_RECORDS_MAX_BYTES    (16u << 20)   /* a records file larger than this is not read */
#define JOBS_RECORDS_FORMAT       "qcowd-jobs"
#define JOBS_RECORDS_VERSION      1

struct jobs_config {
    unsigned workers;      /* run slots: jobs running at once (>= 1) */
    unsigned max_queued;   /* jobs waiting to run (--max-queued-jobs); 0: JOBS_DEFAULT_QUEUED */
    const char *state_uri; /* VFS file holding the records (JSON), or NULL: not kept */
    jobs_event_fn event;   /* or NULL */
    void *event_opaque;
    /* added with issue 12; 0 means the default */
    unsigned max_paused;  /* running jobs paused (each keeps a thread, not a slot); 0: JOBS_DEFAULT_PAUSED */
    unsigned max_records; /* concluded jobs kept; 0: JOBS_DEFAULT_RECORDS */
    int64_t retention_ms; /* concluded jobs dismissed after; 0: JOBS_DEFAULT_RETENTION_MS, <0: never */
};

/* What a job does, on a worker thread. It calls job_progress as it goes (which
 * blocks while the job is paused and returns -ECANCELED once it is cancelled),
 * and returns 0 with *result set (a new reference, or NULL), or a negative errno
 * with err_msg() set; -ECANCELED concludes it as cancelled. It must leave every
 * image consistent on any return. */
typedef int (*job_run_fn)(struct job *j, void *arg, json_t **result);

/* Start the pool and load the records of state_uri: a job that was not concluded
 * when the daemon stopped is concluded with an error saying it was cut off. A
 * records file that cannot be read as JOBS_RECORDS_FORMAT of JOBS_RECORDS_VERSION
 * (garbage, another version, over JOBS_RECORDS_MAX_BYTES) is set aside as
 * STATE_URI.rejected with a message on stderr, and the engine starts with none.
 * Returns 0 with *out set, or a negative errno with err_msg(). */
int jobs_new(const struct jobs_config *cfg, struct jobs **out);

/* Call cb once for each job the records showed unconcluded when the daemon
 * stopped (now concluded as cut off), with its id, type, image and
 * params, e.g. to queue a repair of what it may have leaked. Each is reported
 * once. cb runs without the pool's lock (it may submit jobs). */
void jobs_foreach_cut_off(struct jobs *js,
                          void (*cb)(void *ctx, const char *id, const char *type, const char *image, json_t *params),
                          void *ctx);

/* Cancel every job, wait for the workers, save the records and free js. Jobs
 * running at that moment are recorded as cancelled by the shutdown. */
void jobs_free(struct jobs *js);

/* Queue a job of type on image. locks: NULL-terminated image names the job needs
 * alone (image included): it runs only when no running job holds one of them.
 * params: what was asked (reference stolen; shown in the job object). arg is
 * passed to run and freed with free_arg (may be NULL) when the job ends.
 * Returns 0 with *job_json a new reference to {"id": ID}, the handle api/ turns
 * into the job object (jobs_info), or -errno (arg is freed then too; -EAGAIN
 * naming --max-queued-jobs when that many wait to run). Thread-safe. */
int jobs_submit(struct jobs *js, const char *type, const char *image, const char *const *locks, json_t *params,
                job_run_fn run, void *arg, void (*free_arg)(void *), json_t **job_json);

/* The job id as it is now: a copy in *out (job_info_release it). Returns 0, or
 * -ENOENT with err_msg(). */
int jobs_info(struct jobs *js, const char *id, struct job_info *out);
/* The jobs as they are now, in id order, those of image only (NULL: all) and in
 * status only (-1: any): *out an array of *n copies (jobs_info_free). Returns 0
 * or -ENOMEM. */
int jobs_list(struct jobs *js, const char *image, int status, struct job_info **out, size_t *n);
void jobs_info_free(struct job_info *a, size_t n);

/* State changes by id. Each returns 0 with *out (a copy) the job after the
 * change, -ENOENT for an unknown id, or -EBUSY (409) when the job's state
 * forbids it, with err_msg() saying why:
 * cancel: created or paused-before-start concludes at once; running or paused
 *   goes to aborting, concluded at the job's next progress call;
 * pause: created -> paused at once. A running job is asked to stop: it does at
 *   its next progress call, where it becomes paused and gives its run slot up
 *   (its thread waits, up to max_paused such threads; over that -EBUSY), so a
 *   queued job can run. jobs_pause waits up to wait_ms for that: *out shows
 *   "paused", or still "running" with pausing set when the job did not get there
 *   in time (it will). A job parked by job_retry_later pauses at once.
 * resume: paused -> created or running (a thread that paused waits for a free
 *   slot before it goes on);
 * dismiss: concluded only; the record is removed (*out is the last view). */
int jobs_cancel(struct jobs *js, const char *id, struct job_info *out);
int jobs_pause(struct jobs *js, const char *id, unsigned wait_ms, struct job_info *out);
int jobs_resume(struct jobs *js, const char *id, struct job_info *out);
int jobs_dismiss(struct jobs *js, const char *id, struct job_info *out);

/* ---- for run functions (on the job's worker thread) ---- */

/* Report progress (qcow2_progress_fn's shape: opaque is the job). This is where
 * a job pauses: it blocks while the job is paused (holding no run slot, and
 * waiting for one after a resume); returns -ECANCELED once it is cancelled,
 * else 0. */
int job_progress(void *job, uint64_t done, uint64_t total);
/* For a run function that cannot start yet (an image it needs is being written
 * by a client): returns -EAGAIN for run to return, once it has released what it
 * took and done nothing else. The job then leaves its worker, keeps its status
 * and its place (other jobs of its images wait behind it), and run is called
 * again after JOBS_RETRY_MS; a cancel or a stop concludes it as cancelled. */
#define JOBS_RETRY_MS 100
int job_retry_later(struct job *j);
/* Whether the job has been asked to cancel (no blocking). */
bool job_cancelled(struct job *j);
/* The job's id ("7") and a short owner text for reservations ("job 7 (commit)"). */
const char *job_id(const struct job *j);
const char *job_owner(const struct job *j);

const char *job_status_name(enum job_status s);
/* The status named name ("running"), or -1. */
int job_status_parse(const char *name);

#endif
