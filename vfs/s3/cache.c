/* cache.c: the block cache shared by every open s3 object: blocks of one
 * object version (a generation), bounded in bytes, least recently used out. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "s3_int.h"

struct block {
    uint64_t gen, idx;
    size_t len;
    struct block *hnext;       /* hash chain */
    struct block *prev, *next; /* LRU list, most recent first */
    unsigned char data[];
};

#define NBUCKETS 4096

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct block *table[NBUCKETS];
static struct block *mru, *lru;
static uint64_t bytes;  /* data held */
static uint64_t next_gen = 1;

static size_t slot(uint64_t gen, uint64_t idx)
{
    uint64_t h = (gen * 0x9e3779b97f4a7c15ull) ^ (idx * 0xc2b2ae3d27d4eb4full);
    return (size_t)((h ^ (h >> 29)) % NBUCKETS);
}

static void lru_unlink(struct block *b)
{
    if (b->prev)
        b->prev->next = b->next;
    else
        mru = b->next;
    if (b->next)
        b->next->prev = b->prev;
    else
        lru = b->prev;
    b->prev = b->next = NULL;
}

static void lru_front(struct block *b)
{
    b->next = mru;
    b->prev = NULL;
    if (mru)
        mru->prev = b;
    mru = b;
    if (!lru)
        lru = b;
}

static struct block **find(uint64_t gen, uint64_t idx)
{
    struct block **p = &table[slot(gen, idx)];
    while (*p && ((*p)->gen != gen || (*p)->idx != idx))
        p = &(*p)->hnext;
    return p;
}

static void remove_block(struct block **p)
{
    struct block *b = *p;
    *p = b->hnext;
    lru_unlink(b);
    bytes -= b->len;
    free(b);
}

uint64_t s3_cache_gen(void)
{
    pthread_mutex_lock(&lock);
    uint64_t g = next_gen++;
    pthread_mutex_unlock(&lock);
    return g;
}

long s3_cache_get(uint64_t gen, uint64_t idx, uint64_t from, size_t n, void *buf)
{
    long r = -1;
    pthread_mutex_lock(&lock);
    struct block *b = *find(gen, idx);
    if (b) {
        if (from < b->len)
            memcpy(buf, b->data + from, n < b->len - from ? n : b->len - from);
        r = (long)b->len;
        lru_unlink(b);
        lru_front(b);
    }
    pthread_mutex_unlock(&lock);
    atomic_fetch_add(r < 0 ? &s3_stats.cache_misses : &s3_stats.cache_hits, 1);
    return r;
}

int s3_cache_has(uint64_t gen, uint64_t idx)
{
    pthread_mutex_lock(&lock);
    int r = *find(gen, idx) != NULL;
    pthread_mutex_unlock(&lock);
    return r;
}

void s3_cache_put(uint64_t gen, uint64_t idx, const void *data, size_t len)
{
    if (len > s3_conf.cache_bytes)
        return;
    struct block *nb = malloc(sizeof *nb + len);
    if (!nb)
        return; /* a cache: nothing is lost */
    nb->gen = gen;
    nb->idx = idx;
    nb->len = len;
    memcpy(nb->data, data, len);
    pthread_mutex_lock(&lock);
    struct block **p = find(gen, idx);
    if (*p)
        remove_block(p);
    nb->hnext = table[slot(gen, idx)];
    table[slot(gen, idx)] = nb;
    nb->prev = nb->next = NULL;
    lru_front(nb);
    bytes += len;
    while (bytes > s3_conf.cache_bytes && lru) {
        struct block *v = lru;
        remove_block(find(v->gen, v->idx));
    }
    pthread_mutex_unlock(&lock);
}

void s3_cache_drop(uint64_t gen, uint64_t first, uint64_t last)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < NBUCKETS; i++)
        for (struct block **p = &table[i]; *p;) {
            if ((*p)->gen == gen && (*p)->idx >= first && (*p)->idx <= last)
                remove_block(p);
            else
                p = &(*p)->hnext;
        }
    pthread_mutex_unlock(&lock);
}
