/* pool.c: worker pools of the s3 plugin: each starts at most its bound of
 * threads, when work first comes, taking tasks from one FIFO queue. */
#include <pthread.h>
#include <stdlib.h>

#include "s3_int.h"

struct s3_pool s3_ra_pool = S3_POOL_INIT(&s3_conf.readahead_gets);
struct s3_pool s3_upload_pool = S3_POOL_INIT(&s3_conf.connections);

static void *worker(void *arg)
{
    struct s3_pool *p = arg;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->head && !p->stopping) {
            p->idle++;
            pthread_cond_wait(&p->work, &p->lock);
            p->idle--;
        }
        if (p->stopping)
            break;
        struct s3_task *t = p->head;
        p->queued--;
        p->head = t->next;
        if (!p->head)
            p->tail = NULL;
        pthread_mutex_unlock(&p->lock);
        t->run(t);
        pthread_mutex_lock(&p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

int s3_pool_submit(struct s3_pool *p, struct s3_task *t)
{
    pthread_mutex_lock(&p->lock);
    unsigned want = *p->max;
    if (!p->threads && want && !p->stopping)
        p->threads = calloc(want, sizeof *p->threads);
    /* one more worker while the queue outgrows the idle ones, up to the bound */
    if (p->threads && !p->stopping && p->queued + 1 > p->idle && p->nthreads < want &&
        pthread_create(&p->threads[p->nthreads], NULL, worker, p) == 0)
        p->nthreads++;
    if (!p->nthreads || p->stopping) {
        pthread_mutex_unlock(&p->lock);
        return -1;
    }
    t->next = NULL;
    if (p->tail)
        p->tail->next = t;
    else
        p->head = t;
    p->tail = t;
    p->queued++;
    pthread_cond_signal(&p->work);
    pthread_mutex_unlock(&p->lock);
    return 0;
}

void s3_pool_cancel(struct s3_pool *p, void *owner)
{
    struct s3_task *mine = NULL;
    pthread_mutex_lock(&p->lock);
    for (struct s3_task **q = &p->head; *q;) {
        struct s3_task *t = *q;
        if (t->owner == owner) {
            *q = t->next;
            p->queued--;
            t->next = mine;
            mine = t;
        } else {
            q = &t->next;
        }
    }
    p->tail = NULL;
    for (struct s3_task *t = p->head; t; t = t->next)
        p->tail = t;
    pthread_mutex_unlock(&p->lock);
    while (mine) {
        struct s3_task *t = mine;
        mine = t->next;
        t->cancelled(t);
    }
}

void s3_pool_stop(struct s3_pool *p)
{
    pthread_mutex_lock(&p->lock);
    p->stopping = 1;
    struct s3_task *left = p->head;
    p->head = p->tail = NULL;
    p->queued = 0;
    pthread_cond_broadcast(&p->work);
    unsigned n = p->nthreads;
    pthread_mutex_unlock(&p->lock);
    for (unsigned i = 0; i < n; i++)
        pthread_join(p->threads[i], NULL);
    while (left) {
        struct s3_task *t = left;
        left = t->next;
        t->cancelled(t);
    }
    pthread_mutex_lock(&p->lock);
    free(p->threads);
    p->threads = NULL;
    p->nthreads = 0;
    pthread_mutex_unlock(&p->lock);
}
