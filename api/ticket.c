/* ticket.c: the in-memory store of scoped data tickets: add, find by secret,
 * revoke, list; expired tickets are dropped as they are met. */
#include "ticket.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"

struct entry {
    struct ticket_info info;
    uint8_t hash[AUTH_HASH_LEN]; /* SHA-256 of the secret */
};

struct tickets {
    pthread_mutex_t lock; /* guards v and n */
    struct entry *v;
    size_t n, max;
};

struct tickets *tickets_new(size_t max)
{
    struct tickets *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->max = max ? max : TICKET_DEFAULT_MAX;
    pthread_mutex_init(&t->lock, NULL);
    return t;
}

void tickets_free(struct tickets *t)
{
    if (!t)
        return;
    if (t->v)
        memset(t->v, 0, t->n * sizeof *t->v);
    free(t->v);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

/* Drop the expired entries (lock held). */
static void expire(struct tickets *t, time_t now)
{
    size_t o = 0;
    for (size_t i = 0; i < t->n; i++)
        if (t->v[i].info.expires > now)
            t->v[o++] = t->v[i];
    if (o < t->n)
        memset(t->v + o, 0, (t->n - o) * sizeof *t->v);
    t->n = o;
}

unsigned ticket_op_parse(const char *s)
{
    if (!strcmp(s, "read"))
        return TICKET_OP_READ;
    if (!strcmp(s, "write"))
        return TICKET_OP_WRITE;
    return 0;
}

int tickets_add(struct tickets *t, const char *image, unsigned ops, unsigned timeout, const char *owner,
                struct ticket_info *info, char token[AUTH_TOKEN_LEN + 1])
{
    if (!ops || (ops & ~(TICKET_OP_READ | TICKET_OP_WRITE)))
        return err_fail(EINVAL, "ops must name read, write or both");
    if (!timeout || timeout > TICKET_MAX_TIMEOUT)
        return err_fail(EINVAL, "timeout must be 1 to %d seconds", TICKET_MAX_TIMEOUT);
    if (strlen(image) > TICKET_IMAGE_MAX)
        return err_fail(EINVAL, "the image name is longer than %d bytes", TICKET_IMAGE_MAX);
    struct entry e = {0};
    char idraw[AUTH_TOKEN_LEN + 1];
    int ret = auth_token_new(token);
    if (ret == 0)
        ret = auth_token_new(idraw);
    if (ret == 0)
        ret = auth_sha256(token, strlen(token), e.hash);
    if (ret < 0)
        return ret;
    /* the id: 64 bits of its own randomness, hex, unrelated to the secret */
    uint8_t idh[AUTH_HASH_LEN];
    if ((ret = auth_sha256(idraw, strlen(idraw), idh)) < 0)
        return ret;
    for (int i = 0; i < TICKET_ID_LEN / 2; i++)
        snprintf(e.info.id + 2 * i, 3, "%02x", idh[i]);
    snprintf(e.info.image, sizeof e.info.image, "%s", image);
    snprintf(e.info.owner, sizeof e.info.owner, "%s", owner ? owner : "");
    e.info.ops = ops;
    e.info.created = time(NULL);
    e.info.expires = e.info.created + (time_t)timeout;
    pthread_mutex_lock(&t->lock);
    expire(t, e.info.created);
    if (t->n >= t->max) {
        pthread_mutex_unlock(&t->lock);
        return err_fail(ENOSPC, "%zu tickets are live, the limit (--max-tickets); revoke some or wait for them to expire",
                        t->max);
    }
    if (t->n % 64 == 0) {
        struct entry *v = realloc(t->v, (t->n + 64) * sizeof *v);
        if (!v) {
            pthread_mutex_unlock(&t->lock);
            return err_fail(ENOMEM, "out of memory");
        }
        t->v = v;
    }
    t->v[t->n++] = e;
    pthread_mutex_unlock(&t->lock);
    *info = e.info;
    memset(&e, 0, sizeof e);
    return 0;
}

int tickets_find(struct tickets *t, const char *bearer, size_t len, struct ticket_info *info)
{
    uint8_t h[AUTH_HASH_LEN];
    if (auth_sha256(bearer, len, h) < 0)
        return -ENOENT;
    time_t now = time(NULL);
    int ret = -ENOENT;
    pthread_mutex_lock(&t->lock);
    for (size_t i = 0; i < t->n; i++) {
        bool eq = auth_equal(h, t->v[i].hash, AUTH_HASH_LEN);
        if (eq && ret < 0 && t->v[i].info.expires > now) {
            *info = t->v[i].info;
            ret = 0;
        }
    }
    pthread_mutex_unlock(&t->lock);
    return ret;
}

int tickets_remove(struct tickets *t, const char *id)
{
    int ret = -ENOENT;
    pthread_mutex_lock(&t->lock);
    expire(t, time(NULL));
    for (size_t i = 0; i < t->n; i++)
        if (!strcmp(t->v[i].info.id, id)) {
            t->v[i] = t->v[--t->n];
            memset(&t->v[t->n], 0, sizeof t->v[t->n]);
            ret = 0;
            break;
        }
    pthread_mutex_unlock(&t->lock);
    return ret < 0 ? err_fail(ENOENT, "no live ticket %s", id) : 0;
}

int tickets_list(struct tickets *t, struct ticket_info **out, size_t *n)
{
    pthread_mutex_lock(&t->lock);
    expire(t, time(NULL));
    struct ticket_info *v = malloc((t->n ? t->n : 1) * sizeof *v);
    if (!v) {
        pthread_mutex_unlock(&t->lock);
        return err_fail(ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < t->n; i++)
        v[i] = t->v[i].info;
    *n = t->n;
    pthread_mutex_unlock(&t->lock);
    *out = v;
    return 0;
}
