/* ticket.h: scoped data tickets (ovirt-imageio's model): a secret that grants
 * some operations on one image's data until it expires or is revoked. Kept in
 * memory only (a restart revokes them all); HTTP-free. Thread-safe. */
#ifndef QCOWD_TICKET_H
#define QCOWD_TICKET_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "auth.h"

#define TICKET_OP_READ  0x1u
#define TICKET_OP_WRITE 0x2u

#define TICKET_ID_LEN        16        /* hex characters of an id */
#define TICKET_DEFAULT_MAX   10000     /* live tickets at once */
#define TICKET_MAX_TIMEOUT   604800    /* seconds: a week */
#define TICKET_IMAGE_MAX     128       /* bytes of an image name */

/* What a ticket grants, as listed (never the secret). */
struct ticket_info {
    char id[TICKET_ID_LEN + 1];
    char image[TICKET_IMAGE_MAX + 1];
    unsigned ops;                    /* TICKET_OP_* */
    time_t created, expires;         /* wall-clock seconds */
    char owner[AUTH_NAME_MAX + 1];   /* the token name that made it ("" without tokens) */
};

struct tickets;

/* A new, empty store holding at most max live tickets (0: TICKET_DEFAULT_MAX).
 * NULL on ENOMEM. */
struct tickets *tickets_new(size_t max);
void tickets_free(struct tickets *t);

/* A new ticket for image with ops for timeout seconds (1..TICKET_MAX_TIMEOUT).
 * On success fills *info and token (the secret, shown once) and returns 0; else
 * -EINVAL (bad ops or timeout, with the message), -ENOSPC (the store is full:
 * the message names the budget), -EIO (no randomness), -ENOMEM. */
int tickets_add(struct tickets *t, const char *image, unsigned ops, unsigned timeout, const char *owner,
                struct ticket_info *info, char token[AUTH_TOKEN_LEN + 1]);

/* The live ticket whose secret is bearer: 0 with *info filled, -ENOENT when
 * none matches or it has expired. Constant time in where it matches. */
int tickets_find(struct tickets *t, const char *bearer, size_t len, struct ticket_info *info);

/* Revoke the ticket id: 0, or -ENOENT. */
int tickets_remove(struct tickets *t, const char *id);

/* The live tickets (expired ones are dropped first): *out a new array of *n
 * entries the caller frees. 0 or -ENOMEM. */
int tickets_list(struct tickets *t, struct ticket_info **out, size_t *n);

/* The ops word of a name ("read", "write"), 0 for another. */
unsigned ticket_op_parse(const char *s);

#endif
