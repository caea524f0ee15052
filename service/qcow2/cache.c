/* cache.c: a bounded cache of L2 table slices shared by all readers of one
 * image. Slices are borrowed (get) and returned (put); only unborrowed slices
 * are evicted, least recently used first. A miss reads from disk without the
 * lock held, so a slow store does not block hits on other slices. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_int.h"

int l2_cache_init(struct l2_cache *c, size_t bytes, uint32_t slice_bytes)
{
    memset(c, 0, sizeof *c);
    c->slice_bytes = slice_bytes;
    size_t n = bytes / slice_bytes;
    if (n < 4)
        n = 4; /* enough for every thread of a small pool to hold one and still load */
    if (n > 65536)
        n = 65536;
    c->nslots = (unsigned)n;
    c->nbuckets = 1;
    while (c->nbuckets < 2 * n)
        c->nbuckets <<= 1;
    c->slots = calloc(n, sizeof *c->slots);
    c->loading = calloc(n, sizeof *c->loading);
    c->next = malloc(n * sizeof *c->next);
    c->bucket = malloc(c->nbuckets * sizeof *c->bucket);
    if (!c->slots || !c->loading || !c->next || !c->bucket) {
        free(c->slots);
        free(c->loading);
        free(c->next);
        free(c->bucket);
        return err_fail(ENOMEM, "out of memory for the L2 cache");
    }
    for (size_t i = 0; i < n; i++)
        c->next[i] = -1;
    for (unsigned i = 0; i < c->nbuckets; i++)
        c->bucket[i] = -1;
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->loaded, NULL);
    return 0;
}

void l2_cache_destroy(struct l2_cache *c)
{
    if (!c->slots)
        return;
    for (unsigned i = 0; i < c->nslots; i++)
        free(c->slots[i].entries);
    free(c->slots);
    free(c->loading);
    free(c->next);
    free(c->bucket);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->loaded);
    memset(c, 0, sizeof *c);
}

static unsigned bucket_of(const struct l2_cache *c, uint64_t key)
{
    return (unsigned)((key * 0x9e3779b97f4a7c15ull) >> 40) & (c->nbuckets - 1);
}

static int find(struct l2_cache *c, uint64_t key)
{
    for (int i = c->bucket[bucket_of(c, key)]; i >= 0; i = c->next[i])
        if (c->slots[i].key == key)
            return i;
    return -1;
}

static void unlink_slot(struct l2_cache *c, int i)
{
    int *pp = &c->bucket[bucket_of(c, c->slots[i].key)];
    while (*pp >= 0 && *pp != i)
        pp = &c->next[*pp];
    if (*pp == i)
        *pp = c->next[i];
    c->next[i] = -1;
}

static void link_slot(struct l2_cache *c, int i)
{
    unsigned b = bucket_of(c, c->slots[i].key);
    c->next[i] = c->bucket[b];
    c->bucket[b] = i;
}

int l2_cache_get(struct qcow2_image *img, uint64_t key, struct l2_slice **out)
{
    struct l2_cache *c = &img->cache;
    pthread_mutex_lock(&c->lock);
    for (;;) {
        int i = find(c, key);
        if (i >= 0 && c->loading[i]) {
            pthread_cond_wait(&c->loaded, &c->lock);
            continue;
        }
        if (i >= 0) {
            struct l2_slice *s = &c->slots[i];
            s->refs++;
            s->lru = ++c->tick;
            c->hits++;
            pthread_mutex_unlock(&c->lock);
            *out = s;
            return 0;
        }
        /* miss: pick a free slot, or the least recently used unborrowed one */
        int victim = -1;
        for (unsigned j = 0; j < c->nslots; j++) {
            struct l2_slice *s = &c->slots[j];
            if (c->loading[j] || s->refs || s->dirty)
                continue; /* dirty slices leave only through a writeback */
            if (!s->valid) {
                victim = (int)j;
                break;
            }
            if (victim < 0 || s->lru < c->slots[victim].lru)
                victim = (int)j;
        }
        if (victim < 0) { /* every slot borrowed or loading: wait for one */
            pthread_cond_wait(&c->loaded, &c->lock);
            continue;
        }
        struct l2_slice *s = &c->slots[victim];
        c->misses++;
        if (s->valid)
            unlink_slot(c, victim);
        s->valid = false;
        s->key = key;
        c->loading[victim] = true;
        link_slot(c, victim);
        uint64_t *buf = s->entries;
        s->entries = NULL;
        pthread_mutex_unlock(&c->lock);

        int ret = 0;
        if (!buf && !(buf = malloc(c->slice_bytes)))
            ret = err_fail(ENOMEM, "out of memory for an L2 slice");
        if (ret == 0)
            ret = vfs_pread(img->file, buf, c->slice_bytes, key);
        if (ret == 0)
            for (uint32_t k = 0; k < c->slice_bytes / 8; k++)
                buf[k] = be64toh(buf[k]);

        pthread_mutex_lock(&c->lock);
        c->loading[victim] = false;
        s->entries = buf;
        if (ret == 0) {
            s->valid = true;
            s->refs = 1;
            s->lru = ++c->tick;
            *out = s;
        } else {
            unlink_slot(c, victim);
        }
        pthread_cond_broadcast(&c->loaded);
        pthread_mutex_unlock(&c->lock);
        return ret;
    }
}

void l2_cache_put(struct qcow2_image *img, struct l2_slice *s)
{
    struct l2_cache *c = &img->cache;
    pthread_mutex_lock(&c->lock);
    s->refs--;
    if (s->refs == 0)
        pthread_cond_broadcast(&c->loaded);
    pthread_mutex_unlock(&c->lock);
}

void l2_cache_mark_dirty(struct qcow2_image *img, struct l2_slice *s)
{
    struct l2_cache *c = &img->cache;
    pthread_mutex_lock(&c->lock);
    if (!s->dirty) {
        s->dirty = true;
        c->ndirty++;
    }
    pthread_mutex_unlock(&c->lock);
}

/* Called with the image's write lock held: no reader runs, so slices do not move. */
int l2_cache_writeback(struct qcow2_image *img)
{
    struct l2_cache *c = &img->cache;
    uint64_t *buf = NULL;
    int ret = 0;
    for (unsigned i = 0; i < c->nslots && c->ndirty; i++) {
        struct l2_slice *s = &c->slots[i];
        if (!s->valid || !s->dirty)
            continue;
        if (!buf && !(buf = malloc(c->slice_bytes)))
            return err_fail(ENOMEM, "out of memory");
        ret = overlap_check(img, s->key, c->slice_bytes, "L2 table");
        if (ret < 0)
            break;
        for (uint32_t k = 0; k < c->slice_bytes / 8; k++)
            buf[k] = htobe64(s->entries[k]);
        ret = vfs_pwrite(img->file, buf, c->slice_bytes, s->key);
        if (ret < 0)
            break;
        s->dirty = false;
        c->ndirty--;
    }
    free(buf);
    return ret;
}

void l2_cache_forget(struct qcow2_image *img, uint64_t table_off)
{
    struct l2_cache *c = &img->cache;
    pthread_mutex_lock(&c->lock);
    for (unsigned i = 0; i < c->nslots; i++) {
        struct l2_slice *s = &c->slots[i];
        if (s->valid && !s->refs && (!table_off || (s->key >= table_off && s->key < table_off + img->cluster_size))) {
            if (s->dirty)
                c->ndirty--;
            unlink_slot(c, (int)i);
            s->valid = s->dirty = false;
        }
    }
    pthread_mutex_unlock(&c->lock);
}

void qcow2_cache_stats(struct qcow2_image *img, uint64_t *hits, uint64_t *misses)
{
    struct l2_cache *c = &img->cache;
    *hits = *misses = 0;
    if (!c->slots)
        return; /* raw images have no cache */
    pthread_mutex_lock(&c->lock);
    *hits = c->hits;
    *misses = c->misses;
    pthread_mutex_unlock(&c->lock);
}
