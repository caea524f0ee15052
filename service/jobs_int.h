/* jobs_int.h: the job engine's private header: a job and the pool as jobs.c
 * and jobs_records.c (the records file) see them. */
#ifndef QCOWD_JOBS_INT_H
#define QCOWD_JOBS_INT_H

#include <pthread.h>

#include "jobs.h"

struct job {
    struct jobs *js;
    uint64_t num;
    char id[24];
    char owner[96];
    char *type, *image;
    char **locks;   /* NULL-terminated image names held while it runs */
    json_t *params; /* owned */
    char *params_text;
    enum job_status status;
    bool started;    /* run was called (or is about to be) */
    bool cancel_req; /* cancel asked while started */
    bool pause_req;  /* pause asked while running on a thread, not yet at a progress point */
    bool held;       /* paused in job_progress: keeps its thread, not a run slot */
    bool cancelled;
    bool cut_off;   /* loaded from the records unconcluded: cut off by a restart */
    bool retry_req; /* run asked to be run again later (job_retry_later; worker's own) */
    bool parked;    /* started, waiting off any worker until retry_ms for an image */
    int64_t retry_ms;
    uint64_t cur, total;
    char *error;
    json_t *result; /* owned, or NULL */
    char *result_text;
    int64_t created_ms, started_ms, finished_ms; /* 0: not yet */
    int64_t progress_ms;                         /* last progress event */
    job_run_fn run;
    void *arg;
    void (*free_arg)(void *);
    struct job *next;
};

struct jobs {
    struct jobs_config cfg;
    char *state_uri;
    pthread_mutex_t lock; /* guards everything below and every job's fields */
    pthread_cond_t cond;  /* work queued, a slot or locks released, a job paused, resumed or cancelled */
    struct job *head, *tail;
    uint64_t next_num;
    unsigned active;  /* jobs in run on a thread holding a run slot (at most cfg.workers, but
                      * for a paused job woken to abort) */
    unsigned resumed; /* paused jobs resumed, their threads waiting for a slot: before queued jobs */
    bool stopping;
    pthread_t *threads; /* cfg.workers at the start, up to cfg.workers + cfg.max_paused: a job
                         * that pauses keeps its thread, and one more starts when none is idle */
    unsigned nthreads;
    unsigned idle;             /* threads waiting for a job */
    pthread_mutex_t save_lock; /* serialises saves; taken before lock */
};

/* ms since 1970 (CLOCK_REALTIME). */
int64_t jobs__now_ms(void);
/* Free j and what it owns (its argument too, when free_arg is still set). */
void jobs__job_free(struct job *j);
/* v as compact JSON text (malloc'ed), or NULL on ENOMEM. */
char *jobs__dump(json_t *v);

/* Write every job's record to cfg.state_uri (a temporary, then renamed over
 * it); takes save_lock, then lock. A failure is reported on stderr. */
void jobs__save(struct jobs *js);
/* Read the records of a previous run into js (before any thread starts);
 * see jobs_new for what is set aside. Returns 0 or -errno with err_msg(). */
int jobs__load(struct jobs *js);

#endif
