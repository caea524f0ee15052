/* meta.c: what the s3 plugin knows of objects (size, ETag, mtime, or missing),
 * learned from HEAD answers, listings and its own writes, kept for stat-ttl. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "s3_int.h"

#define META_BUCKETS 4096  /* hash chains (a power of two) */
#define META_MAX     16384 /* entries kept; the least recently learned go first */

struct entry {
    char *id;               /* "bucket\nkey" */
    size_t chain;           /* its hash chain */
    int valid;              /* meta is known (else only changed_at matters) */
    struct s3_meta meta;
    uint64_t learned_ns;    /* monotonic time meta was learned */
    uint64_t changed_at;    /* stamp of our own last change of the key (0: none) */
    struct entry *hnext;    /* hash chain */
    struct entry *prev, *next; /* LRU list, most recently learned first */
};

static pthread_mutex_t meta_lock = PTHREAD_MUTEX_INITIALIZER; /* everything below */
static struct entry *chains[META_BUCKETS];
static struct entry *lru_head, *lru_tail;
static size_t nentries;
static uint64_t evicted_changed; /* largest changed_at of an evicted entry */
static atomic_ullong stamps;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t s3_meta_stamp(void)
{
    return atomic_fetch_add(&stamps, 1) + 1;
}

static size_t hash(const char *bucket, const char *key)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)bucket; *p; p++)
        h = (h ^ *p) * 0x100000001b3ull;
    h = (h ^ '\n') * 0x100000001b3ull;
    for (const unsigned char *p = (const unsigned char *)key; *p; p++)
        h = (h ^ *p) * 0x100000001b3ull;
    return (size_t)(h & (META_BUCKETS - 1));
}

static int same_id(const char *id, const char *bucket, const char *key)
{
    size_t bl = strlen(bucket);
    return !strncmp(id, bucket, bl) && id[bl] == '\n' && !strcmp(id + bl + 1, key);
}

static struct entry *find(const char *bucket, const char *key)
{
    for (struct entry *e = chains[hash(bucket, key)]; e; e = e->hnext)
        if (same_id(e->id, bucket, key))
            return e;
    return NULL;
}

static void lru_unlink(struct entry *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        lru_head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        lru_tail = e->prev;
    e->prev = e->next = NULL;
}

static void lru_front(struct entry *e)
{
    e->next = lru_head;
    if (lru_head)
        lru_head->prev = e;
    lru_head = e;
    if (!lru_tail)
        lru_tail = e;
}

static void evict_one(void)
{
    struct entry *e = lru_tail;
    if (!e)
        return;
    lru_unlink(e);
    for (struct entry **p = &chains[e->chain]; *p; p = &(*p)->hnext)
        if (*p == e) {
            *p = e->hnext;
            break;
        }
    if (e->changed_at > evicted_changed)
        evicted_changed = e->changed_at;
    nentries--;
    free(e->id);
    free(e);
}

/* The entry of bucket/key, made when missing (NULL on ENOMEM: nothing is kept). */
static struct entry *get_or_add(const char *bucket, const char *key)
{
    struct entry *e = find(bucket, key);
    if (e)
        return e;
    size_t bl = strlen(bucket), kl = strlen(key);
    e = calloc(1, sizeof *e);
    char *id = malloc(bl + kl + 2);
    if (!e || !id) {
        free(e);
        free(id);
        return NULL;
    }
    memcpy(id, bucket, bl);
    id[bl] = '\n';
    memcpy(id + bl + 1, key, kl + 1);
    e->id = id;
    e->chain = hash(bucket, key);
    e->hnext = chains[e->chain];
    chains[e->chain] = e;
    lru_front(e);
    if (++nentries > META_MAX)
        evict_one();
    return e;
}

/* Put m into e as learned now. The same version again keeps the mtime known
 * first: a listing may give it in other units than a HEAD (milliseconds against
 * whole seconds), and an unchanged object must keep one identity. */
static void store(struct entry *e, const struct s3_meta *m)
{
    int same = e->valid && e->meta.exists && m->exists && e->meta.size == m->size && !strcmp(e->meta.etag, m->etag);
    int64_t mtime = e->meta.mtime;
    e->meta = *m;
    if (same && mtime)
        e->meta.mtime = mtime;
    e->valid = 1;
    e->learned_ns = now_ns();
    lru_unlink(e);
    lru_front(e);
}

int s3_meta_get(const char *bucket, const char *key, struct s3_meta *m)
{
    uint64_t ttl = s3_conf.stat_ttl_ns;
    if (!ttl)
        return 0;
    int hit = 0;
    pthread_mutex_lock(&meta_lock);
    struct entry *e = find(bucket, key);
    if (e && e->valid && now_ns() - e->learned_ns < ttl) {
        *m = e->meta;
        hit = 1;
    }
    pthread_mutex_unlock(&meta_lock);
    return hit;
}

void s3_meta_learn(const char *bucket, const char *key, const struct s3_meta *m, uint64_t stamp)
{
    pthread_mutex_lock(&meta_lock);
    struct entry *e = find(bucket, key);
    /* an answer asked for before our own last change of the key is older than
     * what we know (or knew, for an entry evicted since) */
    if (e ? e->changed_at < stamp : evicted_changed < stamp) {
        if (e || (e = get_or_add(bucket, key)))
            store(e, m);
    }
    pthread_mutex_unlock(&meta_lock);
}

void s3_meta_set(const char *bucket, const char *key, const struct s3_meta *m)
{
    uint64_t stamp = s3_meta_stamp();
    pthread_mutex_lock(&meta_lock);
    struct entry *e = get_or_add(bucket, key);
    if (e) {
        e->changed_at = stamp;
        if (m) {
            store(e, m);
        } else {
            e->valid = 0;
        }
    } else if (stamp > evicted_changed) {
        evicted_changed = stamp; /* out of memory: no older answer may be kept either */
    }
    pthread_mutex_unlock(&meta_lock);
}

void s3_meta_drop(const char *bucket, const char *key)
{
    pthread_mutex_lock(&meta_lock);
    struct entry *e = find(bucket, key);
    if (e)
        e->valid = 0;
    pthread_mutex_unlock(&meta_lock);
}

void s3_meta_cleanup(void)
{
    pthread_mutex_lock(&meta_lock);
    while (lru_tail)
        evict_one();
    pthread_mutex_unlock(&meta_lock);
}
