/* catalog_int.h: what the files of the catalog share (catalog.c, cache.c, access.c,
 * temp.c, files.c): the catalog and cache entry structures and internal calls. */
#ifndef QCOWD_CATALOG_INT_H
#define QCOWD_CATALOG_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "catalog.h"

struct vfs_stat;

/* One cached image, or one cached failure to open it (img == NULL). */
struct catalog_image {
    struct catalog *cat;
    char *name;
    char *uri;     /* the image file */
    uint64_t size; /* identity of the file when opened: size, mtime (ns), inode */
    int64_t mtime, mtime_nsec;
    uint64_t ino;
    uint64_t version;        /* and the store's content version, where it has one */
    struct qcow2_image *img; /* NULL: opening failed with err/msg */
    int err;                 /* positive errno of the failure */
    char *msg;               /* its message */
    bool rw;                 /* img was opened read-write */
    char *ro_msg;            /* else why not (NULL for a failure entry) */
    int ro_err;              /* and the positive errno of that read-write open */
    struct catalog_identity opened; /* the file when img was opened, and the open's seq */
    unsigned refs;           /* holders, the cache included (under cat->lock) */
    unsigned writers;        /* holders changing the file through this handle (under cat->lock):
                                the file's changes are its own meanwhile */
    pthread_mutex_t ident_lock; /* one refresh of the identity above at a time (the stat is made
                                   under it, never under cat->lock) */
    unsigned ident_busy;     /* refreshes under way (under cat->lock): gets wait for them */
    uint64_t ident_seq;      /* moves with every refresh (under cat->lock) */
    bool written;            /* a writer has held it: metadata may be pending */
    bool cached;             /* on cat->list */
    uint64_t used;           /* LRU tick of the last get */
    struct catalog_image *next;
};

struct catalog {
    char *root; /* the folder: absolute path or "scheme:..." */
    struct catalog_opts opts;
    pthread_mutex_t lock; /* guards list, count, tick and every entry's refs/cached/used */
    struct catalog_image *list;
    unsigned count; /* entries on list */
    unsigned open;  /* entries alive with an image (cached or held) */
    uint64_t tick;
    struct catalog_image *closing; /* entries whose image is being closed now */
    pthread_cond_t closed;         /* signalled when one of them is done */
    unsigned long seq;             /* temporary names (under lock) */
    uint64_t open_seq;             /* images opened so far (under lock) */
    char host[64];                 /* this host in temporary names (host_id) */
    uint64_t closed_hits, closed_misses; /* L2 cache counts of images already closed (under lock) */
    pthread_mutex_t admit_lock;          /* the admission states and claims (access.c); no I/O under it */
    struct name_state *states;           /* per image name in use (under admit_lock) */
    struct catalog_claim *claims;        /* of the jobs not ended (under admit_lock) */
    struct backing_link *links;          /* the backing-user index (users.c; under admit_lock) */
    bool links_ready;                    /* filled from the folder */
    uint64_t links_gen;                  /* bumped by every removal of a link */
    catalog_notify_fn notify;            /* image events, or NULL */
    void *notify_opaque;
    pthread_mutex_t uploads_lock;        /* the suspended uploads (files.c); no I/O under it */
    struct catalog_upload *suspended;    /* oldest first (under uploads_lock) */
    unsigned nsuspended;
    pthread_mutex_t space_lock;          /* --max-catalog checks and makings (files.c); a check lists under it */
    struct cat_making *makings;          /* images being made, counted by the checks (under space_lock) */
};

/* A growing array of names (catalog_names_free frees it). */
struct name_list {
    char **v;
    size_t n, cap;
};

/* ---- catalog.c ---- */
/* Call the listener of image events, if any (no catalog lock held). */
void cat_notify(struct catalog *c, const char *what, const char *name);
/* The file of name (new string, or NULL on ENOMEM). */
char *cat_image_uri(const struct catalog *c, const char *name);

/* ---- files.c ---- */
/* Abort every suspended upload (at catalog_free). */
void cat_uploads_free(struct catalog *c);

/* ---- cache.c ---- */
/* Free e (off the list, no refs), closing its image outside the lock. */
void cat_entry_free(struct catalog_image *e);
/* -EPERM when a layer of img's chain resolves outside the catalog folder. */
int cat_check_chain(const struct catalog *c, struct qcow2_image *img);
/* Whether err (negative) is a failure of the store or of the moment. */
bool cat_transient(int err);
/* With c->lock held: the cached entry of name, or NULL. */
struct catalog_image *cat_find(struct catalog *c, const char *name);
/* catalog_get; bypass skips the reservation check (for the reserving job and
 * for looking at other images' chains). */
int cat_get_entry(struct catalog *c, const char *name, struct catalog_image **out, bool bypass);
/* Drop the cache's entry for name (the file was removed or replaced by us). */
void cat_forget(struct catalog *c, const char *name);

/* Count a change through ci's own handle (the file's identity follows it). */
void cat_writer_enter(struct catalog_image *ci);
void cat_writer_leave(struct catalog_image *ci);
/* Why ci, open read-only, cannot be written (its errno, err_msg() set). */
int cat_refuse_write(const struct catalog_image *ci);
/* Flush the pending metadata of ci's handle, if any. */
int cat_flush_own(struct catalog_image *ci);

/* ---- access.c ---- */
/* The admissions of access.c: each returns 0 (counted in: call the leave) or
 * -EBUSY naming the holder, as its rules say. */
int cat_admit_read(struct catalog *c, const char *name); /* a check only */
int cat_admit_write(struct catalog *c, const char *name);
void cat_leave_write(struct catalog *c, const char *name);
int cat_admit_download(struct catalog *c, const char *name);
void cat_leave_download(struct catalog *c, const char *name);
/* owner: a string that lives until the leave ("a create (POST /v1/images)"). */
int cat_admit_name(struct catalog *c, const char *name, const char *owner);
void cat_leave_name(struct catalog *c, const char *name, const char *owner);
int cat_admit_delete(struct catalog *c, const char *name);
void cat_leave_delete(struct catalog *c, const char *name);
void cat_admit_free(struct catalog *c);

/* ---- users.c: the backing-user index ---- */
/* -ETXTBSY naming the images whose backing file is name (0: none). The index
 * is filled by one scan of the folder at the first call, outside any lock. */
int cat_users_refuse(struct catalog *c, const char *name);
/* Record that name's header stores the backing file name stored (NULL: none). */
void cat_users_set(struct catalog *c, const char *name, const char *stored);
/* Read name's header again (after an install or a job that rewrote it). */
void cat_users_reread(struct catalog *c, const char *name);
/* names (sorted) is the folder now (catalog_list): images put in or taken out
 * behind qcowd's back join or leave the index. */
void cat_users_listed(struct catalog *c, char *const *names, size_t n);
/* name is gone. */
void cat_users_drop(struct catalog *c, const char *name);
void cat_users_free(struct catalog *c);

/* ---- temp.c ---- */
/* A new temporary URI ".KIND-NAME@HOST-PID-SEQ.tmp" in the folder, or NULL. */
char *cat_temp_uri(struct catalog *c, const char *kind, const char *name);
/* This host's id in temporary names (boot id and pid namespace). */
void cat_host_id(char *out, size_t cap);

#endif
