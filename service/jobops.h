/* jobops.h: the kinds of jobs qcowd runs on the job engine: internal snapshots
 * (create, delete, revert), check (with repair), convert and commit. Each submit
 * function validates what it can at once (so the caller answers 4xx without a
 * job), then queues the job; the work itself runs on a worker. */
#ifndef QCOWD_JOBOPS_H
#define QCOWD_JOBOPS_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "catalog.h"
#include "jobs.h"

struct catalog;
struct jobs;

/* Every submit function returns 0 with *job (a new reference to the job object),
 * or a negative errno with err_msg(): -EINVAL bad name or option, -ENOENT unknown
 * image or snapshot, -EEXIST name taken, an error of the image (-EUCLEAN ...). */

/* op: "create", "delete" or "revert". */
int svc_snapshot_job(struct jobs *js, struct catalog *cat, const char *image, const char *op, const char *snap,
                     json_t **job);

/* repair: NULL, "leaks" or "all". The result is qemu-img check's JSON report. */
int svc_check_job(struct jobs *js, struct catalog *cat, const char *image, const char *repair, json_t **job);

struct svc_convert_opts {
    const char *target;      /* new catalog image */
    const char *snapshot;    /* NULL: the active disk; else a snapshot's name or id */
    bool compress;           /* write data clusters compressed */
    bool zstd;               /* compression-type zstd (else zlib) */
    bool keep_backing;       /* keep the source's backing file; only its top layer is copied */
    uint32_t cluster_size;   /* 0: the source's */
    int extended_l2;         /* -1: the source's; 0/1 */
    unsigned refcount_bits;  /* 0: 16 */
};
/* params: the request as asked (reference stolen), shown in the job. */
int svc_convert_job(struct jobs *js, struct catalog *cat, const char *image, const struct svc_convert_opts *o,
                    json_t *params, json_t **job);

/* Commit image into base (NULL: its backing file; else a catalog image further
 * down its chain). -ENOTSUP when the engine has no commit. -ETXTBSY (409) when
 * another catalog image reads base other than through the committed chain
 * (its disk would change), naming it, unless force: then it is held like the
 * chain while the job runs and sees the committed data afterwards, as with
 * qemu-img commit. */
int svc_commit_job(struct jobs *js, struct catalog *cat, const char *image, const char *base, bool force,
                   json_t **job);

/* Reserve name for job j. While a client's write holds it, -EAGAIN from
 * job_retry_later (the run function returns it, having released what it took:
 * the job waits off its worker and runs again later); -ECANCELED when the job
 * is cancelled. (Shared by the job kinds.) */
struct job;
int svc_reserve(struct job *j, struct catalog *cat, const char *name, bool exclusive);

/* Claim names (uses[i] each) for a job of type, before it is submitted: the
 * claim's owner reads "a TYPE job" until svc_submit names it "job 7 (TYPE)".
 * catalog_claim's errors. */
int svc_claim(struct catalog *cat, const char *type, size_t n, const char *const *names, const enum catalog_use *uses,
              struct catalog_claim **out);
/* jobs_submit of a job whose arg holds the claim cl (free_arg ends it); on
 * success cl is named after the job. jobs_submit's returns. */
int svc_submit(struct jobs *js, struct catalog_claim *cl, const char *type, const char *image,
               const char *const *locks, json_t *params, job_run_fn run, void *arg, void (*free_arg)(void *),
               json_t **job);

/* 0 when image opens now (or is reserved by a job), else its error. */
int svc_usable(struct catalog *cat, const char *image);
/* Whether image has a snapshot with that id or name (true when it cannot tell). */
bool svc_has_snapshot(struct catalog *cat, const char *image, const char *snap);

#endif
