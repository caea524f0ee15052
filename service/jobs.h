/* jobs.h: the job engine: long operations (snapshots, check, convert, commit) run
 * on a pool of worker threads, one job at a time per image, with QEMU's job states,
 * progress, pause/resume/cancel, and records that outlive a restart. */
#ifndef QCOWD_JOBS_H
#define QCOWD_JOBS_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

struct jobs; /* opaque: the pool, the queue and every job record */
struct job;  /* opaque: one job, as its run function sees it */

enum job_status { JOB_CREATED, JOB_RUNNING, JOB_PAUSED, JOB_ABORTING, JOB_CONCLUDED };

/* An event about a job: "job-created", "job-status" (status, error or result
 * changed), "job-progress" (at most JOBS_PROGRESS_HZ per second per job, and a
 * last one when the work ends) or "job-dismissed"; job is the job object
 * (borrowed). Called from the thread that made the change, with no jobs lock held. */
typedef void (*jobs_event_fn)(void *opaque, const char *event, json_t *job);
#define JOBS_PROGRESS_HZ 4

#define JOBS_DEFAULT_QUEUED 256

struct jobs_config {
    unsigned workers;       /* worker threads (>= 1) */
    unsigned max_queued;    /* jobs waiting to run (--max-queued-jobs); 0: JOBS_DEFAULT_QUEUED */
    const char *state_uri;  /* VFS file holding the records (JSON), or NULL: not kept */
    jobs_event_fn event;    /* or NULL */
    void *event_opaque;
};

/* What a job does, on a worker thread. It calls job_progress as it goes (which
 * blocks while the job is paused and returns -ECANCELED once it is cancelled),
 * and returns 0 with *result set (a new reference, or NULL), or a negative errno
 * with err_msg() set; -ECANCELED concludes it as cancelled. It must leave every
 * image consistent on any return. */
typedef int (*job_run_fn)(struct job *j, void *arg, json_t **result);

/* Start the pool and load the records of state_uri: a job that was not concluded
 * when the daemon stopped is concluded with an error saying it was cut off.
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
 * Returns 0 with *job_json a new reference to the job object, or -errno (arg is
 * freed then too; -EAGAIN naming --max-queued-jobs when that many wait to run).
 * Thread-safe. */
int jobs_submit(struct jobs *js, const char *type, const char *image, const char *const *locks, json_t *params,
                job_run_fn run, void *arg, void (*free_arg)(void *), json_t **job_json);

/* The array of every job object (new reference), in id order. */
json_t *jobs_list(struct jobs *js);
/* The job object of id (new reference), or NULL with -ENOENT in *err. */
json_t *jobs_get(struct jobs *js, const char *id, int *err);

/* State changes by id. Each returns 0 with *job_json (new reference) the job
 * after the change, -ENOENT for an unknown id, or -EBUSY (409) when the job's
 * state forbids it, with err_msg() saying why:
 * cancel: created or paused-before-start concludes at once; running or paused
 *   goes to aborting, concluded at the job's next progress call;
 * pause: created or running -> paused; resume: paused -> created or running;
 * dismiss: concluded only; the record is removed (job_json is the last view). */
int jobs_cancel(struct jobs *js, const char *id, json_t **job_json);
int jobs_pause(struct jobs *js, const char *id, json_t **job_json);
int jobs_resume(struct jobs *js, const char *id, json_t **job_json);
int jobs_dismiss(struct jobs *js, const char *id, json_t **job_json);

/* ---- for run functions (on the job's worker thread) ---- */

/* Report progress (qcow2_progress_fn's shape: opaque is the job). Blocks while
 * the job is paused; returns -ECANCELED once it is cancelled, else 0. */
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

#endif
