/* s3_obj.h: an open object (object.c) and the store-level helpers it shares
 * with the plugin table (s3.c). */
#ifndef QCOWD_S3_OBJ_H
#define QCOWD_S3_OBJ_H

#include <stdint.h>

#include "s3_int.h"
#include "vfs_plugin.h"

/* A path as the plugin gets it ("//bucket/key" or "bucket/key"), split. */
struct s3_name {
    char *bucket;
    char *key; /* "" for the bucket itself */
    char *uri; /* "s3://bucket/key", for messages */
};

/* Split path; 0 or -EINVAL (no bucket) / -ENOMEM with a message. */
int s3_name_parse(const char *path, struct s3_name *n);
void s3_name_free(struct s3_name *n);

/* What HEAD says of an object. */
struct s3_head {
    uint64_t size;
    int64_t mtime;
    char etag[128];
    int listed; /* answered from a listing's entry (whose ETag may differ from a HEAD's or GET's) */
};

/* An HTTP date (Last-Modified) in seconds since the epoch; 0 if s is NULL or not one. */
int64_t s3_http_date(const char *s);

/* A vfs_stat version for an ETag (FNV-1a; never 0). */
uint64_t s3_etag_version(const char *etag);

/* HEAD the object: 0, or -ENOENT with a message telling a missing bucket from a
 * missing object, or the request's error. What it learns is kept (meta.c). */
int s3_head_object(const struct s3_name *n, struct s3_head *h);
/* The same, answered from what is known of the object when that was learned
 * less than stat-ttl ago (a listing, a HEAD, our own write), else a HEAD. */
int s3_stat_object(const struct s3_name *n, struct s3_head *h);
/* Our own change of n: it now is h, or it is gone (h NULL, gone 1), or its
 * state is unknown (h NULL, gone 0: the next stat asks the store). */
void s3_meta_own(const struct s3_name *n, const struct s3_head *h, int gone);
/* HEAD the bucket: 0, -ENOENT ("bucket does not exist") or the request's error. */
int s3_head_bucket(const struct s3_name *n);

/* The object ops (object.c). */
int s3_obj_open(const char *path, unsigned flags, void **handle);
void s3_obj_close(void *h);
int s3_obj_pread(void *h, void *buf, size_t len, uint64_t off);
int s3_obj_pwrite(void *h, const void *buf, size_t len, uint64_t off);
int s3_obj_flush(void *h);
int s3_obj_size(void *h, uint64_t *size);
int s3_obj_truncate(void *h, uint64_t size);
/* A deferred publish (struct vfs_ops .open_deferred, .commit): a new object
 * for path, staged locally, out of the registry; the commit publishes it (one
 * PUT, or a multipart upload of every part, completed last); a close without
 * commit drops it. Its staging files are "HASH-PID-SEQ.new.data/.meta". */
int s3_obj_open_deferred(const char *path, void **handle);
int s3_obj_commit(void *h, unsigned flags);
/* The end of a deferred object's staging names, before .data/.meta. */
#define S3_DEFERRED_TAIL ".new"
/* 0 when the staging folder dir is a real folder of ours closed to others,
 * else a negative errno with the message. */
int s3_obj_staging_private(const char *dir);
/* Of a deferred object (struct vfs_ops .release): [off, off+len) is not read
 * back nor written again before the commit. A streamed part wholly released
 * and uploaded is punched out of the staging file (marked dropped); reads
 * and writes of a dropped part, and a commit that needs one again, fail with
 * -EIO. Released coverage is one run per part: a part released in pieces
 * that are not adjacent stays staged (never wrongly dropped). Any thread. */
int s3_obj_release(void *h, uint64_t off, uint64_t len);
/* Of a deferred object (struct vfs_ops .wait_room): 1 when a write may go now
 * (its bytes not yet sent are within staging-max, or nothing in flight would
 * lower them), else 0 and wake(ctx) is called once, without a lock held, from
 * the part worker that made room, or when streaming stops (commit, close, a
 * failed start). From then on .pwrite never waits (stream_wait). Any thread. */
int s3_obj_wait_room(void *h, void (*wake)(void *ctx), void *ctx);
/* The object at n is being removed or renamed away: handles open on it keep
 * reading what they had, but nothing of theirs is published any more, and a
 * new open of the key starts afresh. */
void s3_obj_forget(const struct s3_name *n);

/* ---- mpu.c: multipart upload requests; each returns 0 or -errno with a message ---- */

/* Start one on n: *id is a new string (free()). */
int s3_mpu_start(const struct s3_name *n, char **id);
/* Part partno (1-based) is the len bytes at buf; etag gets its ETag. */
int s3_mpu_put_part(const struct s3_name *n, const char *id, unsigned partno, const void *buf, size_t len,
                    char *etag, size_t cap);
/* Part partno (1-based) is bytes [s, e) of src, copied by the store. */
int s3_mpu_copy_part(const struct s3_name *n, const char *id, unsigned partno, const struct s3_name *src,
                     uint64_t s, uint64_t e, char *etag, size_t cap);
/* Complete with the parts' ETags; *etag gets the new object's. */
int s3_mpu_complete(const struct s3_name *n, const char *id, char (*etags)[128], unsigned nparts, char *etag,
                    size_t cap);
/* Abort (best effort): 0, or the request's negative errno; either way the
 * thread's error message stays the caller's. */
int s3_mpu_abort(const struct s3_name *n, const char *id);
/* ListMultipartUploads of bucket under prefix, every page (at most 1000 of
 * 1000 uploads): cb per upload whose key starts with prefix. 0, cb's negative
 * errno, or the request's error; -EPROTO for an answer out of bounds. */
int s3_mpu_list(const char *bucket, const char *prefix, s3_upload_fn cb, void *ctx);

/* ---- sweep.c: unfinished uploads nobody will finish ---- */

/* At the first complete configuration, before any other request: remove what
 * deferred publishes of dead processes left in the staging folder (their files
 * are unlocked), aborting the uploads their meta files name (or, for a dead
 * run that was starting one, that key's uploads started then); then abort
 * every upload under sweep-root older than stale-upload that is not ours,
 * and start the thread that does that again every hour. */
void s3_sweep_at_start(void);
/* Stop and join that thread (at exit). */
void s3_sweep_stop(void);
/* Uploads of n's key that a dead run started at started (seconds since the
 * epoch; give or take a clock-skew margin and the request's time) and did not
 * record: aborted, except ours. Best effort: failures are logged. */
void s3_sweep_key(const struct s3_name *n, int64_t started);
/* What a staging meta file says (object.c writes it): the fields of the
 * lines found, "" / 0 for the others (etag "-"). */
struct s3_staging_meta {
    char bucket[512], key[512], upload_id[512], etag[512];
    long pid;
    long long started; /* mpu-start: a multipart upload was being started then (seconds since the epoch) */
};
/* Read it from fd (an open meta file, or -1: all empty), which is closed. */
void s3_staging_meta_read(int fd, struct s3_staging_meta *m);
/* Upload id is ours (started by this process, not finished yet): the sweeps
 * leave it; disown when it is completed or aborted. */
void s3_sweep_own(const char *id);
void s3_sweep_disown(const char *id);

#endif
