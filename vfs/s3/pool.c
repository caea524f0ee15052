/* pool.c: the read-ahead workers of the s3 plugin: at most readahead-gets
 * threads, started when work first comes, taking tasks from one FIFO queue. */
#include <pthread.h>
#include <stdlib.h>

#include "s3_int.h"

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work = PTHREAD_COND_INITIALIZER;
static struct s3_task *head, *tail; /* the queue (under lock) */
static pthread_t *threads;
static unsigned nthreads, idle, queued; /* started; waiting for work; tasks queued (under lock) */
static int stopping;

static void *worker(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&lock);
    for (;;) {
        while (!head && !stopping) {
            idle++;
            pthread_cond_wait(&work, &lock);
            idle--;
        }
        if (stopping)
            break;
        struct s3_task *t = head;
        queued--;
        head = t->next;
        if (!head)
            tail = NULL;
        pthread_mutex_unlock(&lock);
        t->run(t);
        pthread_mutex_lock(&lock);
    }
    pthread_mutex_unlock(&lock);
    return NULL;
}

int s3_pool_submit(struct s3_task *t)
{
    pthread_mutex_lock(&lock);
    unsigned want = s3_conf.readahead_gets;
    if (!threads && want)
        threads = calloc(want, sizeof *threads);
    /* one more worker while the queue outgrows the idle ones, up to the bound */
    if (threads && !stopping && queued + 1 > idle && nthreads < want &&
        pthread_create(&threads[nthreads], NULL, worker, NULL) == 0)
        nthreads++;
    if (!nthreads || stopping) {
        pthread_mutex_unlock(&lock);
        return -1;
    }
    t->next = NULL;
    if (tail)
        tail->next = t;
    else
        head = t;
    tail = t;
    queued++;
    pthread_cond_signal(&work);
    pthread_mutex_unlock(&lock);
    return 0;
}

void s3_pool_cancel(void *owner)
{
    struct s3_task *mine = NULL;
    pthread_mutex_lock(&lock);
    for (struct s3_task **p = &head; *p;) {
        struct s3_task *t = *p;
        if (t->owner == owner) {
            *p = t->next;
            queued--;
            t->next = mine;
            mine = t;
        } else {
            p = &t->next;
        }
    }
    tail = NULL;
    for (struct s3_task *t = head; t; t = t->next)
        tail = t;
    pthread_mutex_unlock(&lock);
    while (mine) {
        struct s3_task *t = mine;
        mine = t->next;
        t->cancelled(t);
    }
}

void s3_pool_stop(void)
{
    pthread_mutex_lock(&lock);
    stopping = 1;
    struct s3_task *left = head;
    head = tail = NULL;
    queued = 0;
    pthread_cond_broadcast(&work);
    unsigned n = nthreads;
    pthread_mutex_unlock(&lock);
    for (unsigned i = 0; i < n; i++)
        pthread_join(threads[i], NULL);
    while (left) {
        struct s3_task *t = left;
        left = t->next;
        t->cancelled(t);
    }
    free(threads);
    threads = NULL;
    nthreads = 0;
}
