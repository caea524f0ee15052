/* catalog.h: the daemon's image catalog: names -> qcow2 files in one folder of a
 * store, opened through the engine (read-write when the file allows it) and shared
 * as refcounted handles; create, remove, upload and download of whole images. */
#ifndef QCOWD_CATALOG_H
#define QCOWD_CATALOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct qcow2_image;
struct qcow2_create_opts;
struct catalog;       /* opaque: one catalog folder and its cache of open images */
struct catalog_image; /* opaque: one open image, shared; get/put */

#define CATALOG_SUFFIX       ".qcow2"
#define CATALOG_NAME_MAX     128 /* bytes in a name (without the suffix) */
#define CATALOG_DEFAULT_OPEN 64  /* open images kept cached when unused */
#define CATALOG_DEFAULT_UPLOAD       (1ull << 40) /* bytes of one upload */
#define CATALOG_DEFAULT_UPLOAD_TEXT  "1T"
#define CATALOG_DEFAULT_VIRTUAL      (64ull << 40) /* virtual size of an image */
#define CATALOG_DEFAULT_VIRTUAL_TEXT "64T"
#define CATALOG_UNLIMITED            UINT64_MAX
#define CATALOG_DEFAULT_UPLOAD_KEEP  900 /* seconds a broken upload waits to be resumed */
#define CATALOG_MAX_SUSPENDED        64  /* uploads kept suspended at once; the oldest goes first */

/* Budgets name the qcowd option that sets them in their refusals. */
struct catalog_opts {
    size_t l2_cache_bytes;     /* per open image; 0: the engine's default */
    unsigned max_open;         /* unused open images kept cached (--max-open-images); 0: CATALOG_DEFAULT_OPEN */
    uint64_t max_meta_bytes;   /* metadata budget per open image (--max-image-meta); 0: the engine's default */
    uint64_t max_upload;       /* bytes of one upload (--max-upload); 0: CATALOG_DEFAULT_UPLOAD */
    uint64_t max_catalog;      /* bytes of every file of the folder (--max-catalog); 0 or
                                  CATALOG_UNLIMITED: the store's space only */
    uint64_t max_virtual_size; /* of a created or uploaded image (--max-virtual-size); 0: CATALOG_DEFAULT_VIRTUAL */
    unsigned upload_keep_sec;  /* a suspended upload is kept this long (--upload-resume-time); 0: CATALOG_DEFAULT_UPLOAD_KEEP */
};

/* Open the catalog at root (a folder path or a "scheme:" URI; a path is made
 * absolute). Nothing is opened or listed yet. On success *out is a new catalog
 * the caller frees with catalog_free; on failure *out is unchanged and the
 * return is a negative errno with err_msg() set (-ENOENT/-ENOTDIR for a missing
 * folder). */
int catalog_new(const char *root, const struct catalog_opts *opts, struct catalog **out);

/* Close every cached image and free the catalog. Call it once no other thread
 * uses c and every handle from catalog_get has been put. */
void catalog_free(struct catalog *c);

/* Whether name is a valid image name: ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ and no
 * "..". Returns 0 or -EINVAL with err_msg() naming the problem. Thread-safe. */
int catalog_valid_name(const char *name);

/* The valid image names in the catalog now (the "*.qcow2" files), sorted. On
 * success *names is a new array of *count new strings (catalog_names_free);
 * on failure nothing is returned and the return is a negative errno. Images
 * put in or taken out of the folder behind qcowd's back join or leave the
 * backing-user index here. Thread-safe. */
int catalog_list(struct catalog *c, char ***names, size_t *count);
void catalog_names_free(char **names, size_t count);

/* Get the open image called name (-EBUSY while a job that changes it runs):
 * from the cache when its file has not changed
 * (size, mtime to the nanosecond and inode; changes made through the catalog's own
 * handle do not count),
 * else opened now: read-write when the engine accepts it (the file is writable,
 * the image not marked corrupt), else read-only; backing and data files are
 * contained in the catalog and always read-only. On success *out is a new reference the caller releases with
 * catalog_put. On failure *out is unchanged, err_msg() is set and the return is:
 * -EINVAL bad name, -ENOENT no such image, and for an image that cannot be used
 * -EUCLEAN (corrupt or not qcow2), -ENOTSUP (unsupported feature), -EPERM (its
 * chain leaves the catalog), -ELOOP (backing loop or too deep), -ENXIO (a backing
 * or data file is missing), or the store's errno (-EIO, -EACCES, -ENOSPC...).
 * Failures of the image are cached too, so a broken image costs one stat per call
 * until its file changes; failures of the store (and -ENOMEM) are not: the next
 * call tries again. Thread-safe. */
int catalog_get(struct catalog *c, const char *name, struct catalog_image **out);

/* Release a reference from catalog_get; the image is closed when the last one
 * goes and the cache no longer holds it. NULL is ignored. Thread-safe. */
void catalog_put(struct catalog_image *ci);

/* The engine handle (borrowed; valid until catalog_put) and the name. */
struct qcow2_image *catalog_image_qcow2(const struct catalog_image *ci);
const char *catalog_image_name(const struct catalog_image *ci);

/* The file of an open image as it was when this handle opened it, and which
 * open of the catalog it was: with the engine's generation (qcow2_get_changes)
 * what HTTP validators are made of. A handle that stops matching its file (a
 * change behind the catalog's back, a replacement, a job's private handle) is
 * replaced by a new open with a new seq. */
struct catalog_identity {
    uint64_t size;             /* bytes of the file at the open */
    int64_t mtime, mtime_nsec; /* its mtime then */
    uint64_t ino;              /* its inode (0 where the store has none) */
    uint64_t version;          /* the store's content version (0 where it has none) */
    uint64_t seq;              /* this open among the catalog's opens (from 1) */
};
/* Fill *out for ci (a reference from catalog_get). Returns 0. Thread-safe. */
int catalog_image_identity(const struct catalog_image *ci, struct catalog_identity *out);

/* Number of images open now (cached or in use). Thread-safe. */
unsigned catalog_open_count(struct catalog *c);
/* L2 cache hits and misses of every image opened so far (for metrics). */
void catalog_cache_stats(struct catalog *c, uint64_t *hits, uint64_t *misses);

/* Counters of the storage backends that keep them (the s3 plugin: requests by
 * kind, bytes moved, cache hits): cb(ctx, scheme, name, value) per counter. */
int catalog_storage_stats(int (*cb)(void *ctx, const char *scheme, const char *name, uint64_t value), void *ctx);

/* ---- writing ---- */

/* Like catalog_get, for writing through the handle: refused with -EROFS when the
 * file could only be opened read-only, or the image's own errno when the image
 * forbids writing (-EUCLEAN the corrupt bit, -ENOTSUP encryption; err_msg() says
 * why), -ETXTBSY when another image of the catalog has it in its backing chain
 * (naming it), and -EBUSY while its container is being downloaded
 * (catalog_file_open), a job runs on it or it is being deleted. While the reference
 * is held the catalog keeps this handle even though the file changes (its own
 * writes). Release with catalog_put_writable. Thread-safe. */
int catalog_get_writable(struct catalog *c, const char *name, struct catalog_image **out);
void catalog_put_writable(struct catalog_image *ci);

/* Whether the handle was opened read-write. */
bool catalog_image_writable(const struct catalog_image *ci);

/* Create the image name with o (o->backing_file, when set, is the NAME of a
 * catalog image, stored as "NAME.qcow2" with format qcow2; o->backing_format must
 * be NULL or "qcow2"). The image is built under a temporary name and renamed into
 * place, so no half-made image is ever listed; the build (a preallocation can
 * take long) runs outside the catalog's locks. Returns 0, or -EINVAL (bad name or
 * option, unknown backing image, a size over --max-virtual-size), -EEXIST (name
 * taken), -EBUSY (the backing image is being written, or the name is reserved:
 * a convert's target, another create or upload; nothing is made then), -ENOSPC (the folder is at
 * --max-catalog), an error of the backing image, or the engine's error. */
int catalog_create(struct catalog *c, const char *name, const struct qcow2_create_opts *o);

/* Remove the temporary files that create, upload and convert leave behind when
 * the daemon dies in the middle (".create-*", ".upload-*", ".convert-*"): those made on this
 * host (this boot, this pid namespace: their name records it) whose process is
 * no longer running, and those of any host not changed for a day (by their
 * mtime); other hosts' recent ones may be uploads in progress and are kept.
 * note, when set, is called for each with the reason ("its process 123 on this
 * host is gone") and 0 or the negative errno of its removal. Returns the number
 * removed, or a negative errno (the folder cannot be listed). Call it at
 * start-up. */
int catalog_clean_temp(struct catalog *c, void (*note)(void *ctx, const char *file, const char *why, int err),
                       void *ctx);

/* 0, or -ENOSPC naming --max-catalog when the catalog folder's files, the
 * images being made (not listed yet on a store with a deferred publish; an
 * upload counts the size it declared) and more bytes would pass it (0 at once
 * without that budget). Thread-safe. */
int catalog_check_space(struct catalog *c, uint64_t more);

/* Remove the image name. Returns 0, -EINVAL, -ENOENT, -ETXTBSY when another
 * image of the catalog has it in its backing chain, or -EBUSY while a write is in
 * flight, its container is downloaded, a job claims it (queued or running), or
 * its name is reserved (err_msg() names the holder). Holders of a handle keep
 * it until they put it. */
int catalog_remove(struct catalog *c, const char *name);
/* catalog_remove, with check(ctx, handle) called once the name is held
 * against writers and before anything is removed (handle NULL when the image
 * does not open): a nonzero return (a negative errno) is the result and
 * nothing is removed. A compare-and-delete:
 * no write lands between the check and the removal. */
int catalog_remove_if(struct catalog *c, const char *name, int (*check)(void *ctx, struct catalog_image *ci),
                      void *ctx);

/* Upload of a whole qcow2 container: begin creates a temporary file in the
 * catalog and reserves name until commit or abort (-EEXIST at once when name
 * is taken, -EBUSY when it is reserved: a convert's target, a create or another
 * upload; -EFBIG when length, the declared
 * size or UINT64_MAX when unknown, passes --max-upload; -ENOSPC when it would
 * take the folder past --max-catalog), write appends bytes (-EFBIG past
 * --max-upload; the first bytes must be a qcow2 header, -EUCLEAN when they are
 * not, -ENOTSUP for a disk over --max-virtual-size: refused before the rest of
 * the body is stored), commit
 * validates the file (it opens as qcow2 within max_meta_bytes, its backing file is
 * a catalog image named "NAME.qcow2", no external data file, no protocol names)
 * and renames it into place. commit and abort free u and, unless the commit
 * succeeded, delete the temporary file. Errors: -EEXIST, -EPERM (a name outside
 * the catalog), -EUCLEAN (not a valid qcow2 image), -ENXIO (missing backing),
 * -ENOTSUP, storage errors. Each upload is used by one thread at a time. */
struct catalog_upload;
int catalog_upload_begin(struct catalog *c, const char *name, uint64_t length, struct catalog_upload **out);
int catalog_upload_write(struct catalog_upload *u, const void *buf, size_t len);
/* Whether catalog_upload_write may go now without the store holding it back
 * (an S3 upload whose bytes not yet sent pass staging-max): 1 yes; 0 not yet,
 * and wake(ctx) is called exactly once later, from any thread, when it may
 * (or the store stopped holding back, or the upload was closed); a negative
 * errno on failure. A caller that never asks gets writes that block for room
 * instead (briefly each). One wait per upload: a new one first wakes the
 * earlier one (a resumed upload's new connection). Thread as write. */
int catalog_upload_ready(struct catalog_upload *u, void (*wake)(void *ctx), void *ctx);
int catalog_upload_commit(struct catalog_upload *u);
void catalog_upload_abort(struct catalog_upload *u);

/* Resumable uploads. An upload that declared its total size (catalog_upload_set_total;
 * then writes past it fail with -EINVAL) and stopped short of it, because its
 * connection broke or a piece of it ended, is suspended instead of aborted: its
 * temporary file and its name's reservation are kept for --upload-resume-time
 * seconds (at most CATALOG_MAX_SUSPENDED at once; the oldest is aborted to make
 * room). catalog_upload_resume takes it back to continue exactly at its received
 * count: -ENOENT when there is none for name (never begun, expired, committed),
 * -EBUSY while a connection is still sending it, -ERANGE with a message giving the
 * count when offset or total differ (nothing changes: the client resumes at the
 * count). catalog_upload_status reports it, being sent or waiting (-ENOENT when
 * none). catalog_upload_discard aborts the suspended upload of name,
 * if any (a new upload from the start replaces it). Thread-safe; expired uploads
 * are aborted by any of these calls. */
void catalog_upload_set_total(struct catalog_upload *u, uint64_t total);
uint64_t catalog_upload_received(const struct catalog_upload *u);
void catalog_upload_suspend(struct catalog_upload *u);
int catalog_upload_resume(struct catalog *c, const char *name, uint64_t offset, uint64_t total,
                          struct catalog_upload **out);
int catalog_upload_status(struct catalog *c, const char *name, uint64_t *received, uint64_t *total);
void catalog_upload_discard(struct catalog *c, const char *name);

/* The container file of name for reading (pending metadata of the catalog's
 * handle is flushed first). *size is the file's size. From open to close the
 * image takes no writes: catalog_get_writable fails with -EBUSY meanwhile, and
 * open itself fails with -EBUSY while a write runs or a job that changes the
 * image (snapshot, repair, commit) is queued or running, and such jobs wait
 * for the download to end, so what is read is one consistent container. A broken image (one catalog_get refuses) can still be
 * opened, to be looked at. */
struct catalog_file;
int catalog_file_open(struct catalog *c, const char *name, struct catalog_file **out, uint64_t *size);
int catalog_file_pread(struct catalog_file *f, void *buf, size_t len, uint64_t off);
void catalog_file_close(struct catalog_file *f);

/* ---- jobs: reservations, private handles, temporary images, notifications ---- */

/* ---- admission (access.c; the rules are written at its top and in the README) ----
 * Every refusal below is -EBUSY with err_msg() naming the holder ("image 'vm1'
 * is busy: job 7 (snapshot-create) is running"): the client may retry later. */

/* How a job uses an image it claims. */
enum catalog_use {
    CATALOG_USE_READ,   /* reads it (convert's source, check): writers wait for the run */
    CATALOG_USE_CHANGE, /* changes it (snapshots, repair, commit): downloads refused from submit to end */
    CATALOG_USE_CREATE, /* makes it (convert's target): the name is reserved from submit to end */
};

/* A job's claim on its images from its submit to its end (make it before
 * jobs_submit, free it from the job's free_arg). While it is held,
 * catalog_remove of each name fails with -EBUSY, catalog_file_open of a
 * CHANGE name too, and create and upload of a CREATE name. owner names the job
 * in refusals ("a convert job"; catalog_claim_owner sets "job 7 (convert)" once
 * the id is known). Fails with -EBUSY when a name is being deleted or a CREATE
 * name is reserved by someone else (nothing is claimed then), -EINVAL for a bad
 * name, -ENOMEM. Thread-safe. */
struct catalog_claim;
int catalog_claim(struct catalog *c, const char *owner, size_t n, const char *const *names,
                  const enum catalog_use *uses, struct catalog_claim **out);
void catalog_claim_owner(struct catalog_claim *cl, const char *owner);
/* One more reference to cl (a submitter keeps cl to name the job once it has
 * its id, though the job may end first); catalog_unclaim drops one, and the
 * claim ends and cl is freed with the last (NULL is ignored). Thread-safe. */
void catalog_claim_ref(struct catalog_claim *cl);
void catalog_unclaim(struct catalog_claim *cl);

/* The run of a job on name (owner: a short text such as "job 7 (commit)"): until
 * catalog_release, catalog_get_writable and catalog_remove of name fail with
 * -EBUSY naming the owner, and with exclusive (the job changes the image) also
 * catalog_get (readers) and catalog_file_open. Fails with -EBUSY (the job
 * retries later) while another job runs on name, a write is in flight, and for
 * an exclusive run while the container is being downloaded; -EINVAL for a bad
 * name. Thread-safe. */
int catalog_reserve(struct catalog *c, const char *name, bool exclusive, const char *owner);
void catalog_release(struct catalog *c, const char *name);

/* catalog_get_writable for the job holding the run of name (catalog_reserve; it
 * skips the admission and the backing-chain check). Release with
 * catalog_put_writable. */
int catalog_get_reserved(struct catalog *c, const char *name, struct catalog_image **out);

/* A private handle on a catalog image, for a job or a view that must see the
 * file as qemu-img would, apart from the shared handle. */
struct catalog_private_opts {
    bool write;           /* read-write (the shared handle is dropped at open and close) */
    const char *snapshot; /* open this snapshot's view (read-only), or NULL */
    bool allow_corrupt;   /* open an image with the corrupt bit set (check) */
    bool small_cache;     /* a 1 MiB L2 cache (a short-lived view) */
};
struct catalog_private;
/* Open name privately (o NULL: read-only): the shared handle's pending metadata
 * is written first, so the file is whole; for writing the shared handle is also
 * dropped, so nobody keeps serving the metadata this handle replaces. The
 * caller holds what admits it (a job's run, catalog_reserve; a view reads
 * under nothing). On success *out is a new handle for catalog_close_private;
 * on failure the return is -EUCLEAN (bad metadata, message naming the image
 * and the snapshot), -ENOENT (no such image, or no such snapshot), or the
 * engine's or store's error. */
int catalog_open_private(struct catalog *c, const char *name, const struct catalog_private_opts *o,
                         struct catalog_private **out);
/* The engine handle of h (borrowed, valid until the close). */
struct qcow2_image *catalog_private_qcow2(const struct catalog_private *h);
/* Close h (NULL is ignored). A handle opened for writing is flushed first; with
 * changed the shared handle is dropped again (the next catalog_get opens the
 * file anew), the backing-user index reads the header again and "image-changed"
 * is announced. Returns 0 or the first error of the flush and the close. */
int catalog_close_private(struct catalog_private *h, bool changed);

/* Call fn(ctx, user) for every catalog image with name in its backing chain
 * (its overlays, their overlays...), from the backing-user index after one
 * listing of the folder (images put there behind qcowd's back count too): no
 * image is opened. Stops at fn's first error and returns it; 0, or the
 * listing's error, or -ENOMEM. */
int catalog_backing_users(struct catalog *c, const char *name, int (*fn)(void *ctx, const char *user), void *ctx);

/* Write the pending metadata of name's cached handle, if any (0 when none). */
int catalog_flush(struct catalog *c, const char *name);
/* Drop the cached handle of name: the next catalog_get opens the file again
 * (holders keep the old one until they put it), and read its header into the
 * backing-user index again (a job may have rewritten it). Thread-safe. */
void catalog_drop(struct catalog *c, const char *name);

/* The file of name (new string, or NULL on ENOMEM). */
char *catalog_uri(struct catalog *c, const char *name);
/* The metadata budget every open of a catalog image passes (qcow2_open_opts.max_meta_bytes). */
uint64_t catalog_max_meta(const struct catalog *c);
/* The URI of file (a plain file name) in the catalog folder (new string, or NULL). */
char *catalog_path(struct catalog *c, const char *file);
/* Begin making the image name (the caller holds it by a CATALOG_USE_CREATE
 * claim), unseen until catalog_publish: *out is a deferred publish to its final
 * name where the store has one (S3: a multipart upload, completed at the
 * publish), else a temporary name of kind (".KIND-NAME@HOST-PID-SEQ.tmp", never
 * listed) renamed into place. Make the image at vfs_pending_uri(*out); the
 * caller ends it with catalog_publish_end (an abort unless published). Until
 * then its bytes count in catalog_check_space (the budget is checked by the
 * caller: a convert's size is known only as it is made). */
struct vfs_pending;
int catalog_publish_begin(struct catalog *c, const char *kind, const char *name, struct vfs_pending **out);
/* Publish what p made as name and announce "image-created": -EEXIST when the
 * name is taken (nothing published). Close the image's handles first. */
int catalog_publish(struct catalog *c, struct vfs_pending *p, const char *name);
/* End what catalog_publish_begin began (NULL: nothing): dropped unless published. */
void catalog_publish_end(struct catalog *c, struct vfs_pending *p);

/* Called after an image is created, installed, removed, or its last writer
 * leaves (what: "image-created", "image-deleted", "image-changed"), from the
 * thread that did it, with no catalog lock held. Set once before use. */
typedef void (*catalog_notify_fn)(void *opaque, const char *what, const char *name);
void catalog_set_notify(struct catalog *c, catalog_notify_fn fn, void *opaque);
/* Tell the listener that name changed behind the catalog's handles (a job that
 * wrote through a private handle). */
void catalog_changed(struct catalog *c, const char *name);

#endif
