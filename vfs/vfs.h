/* vfs.h: what callers use to reach bytes on a store, whatever the backend.
 * URIs: "scheme:path" picks a registered backend; a plain path means "file". */
#ifndef QCOWD_VFS_H
#define QCOWD_VFS_H

#include <stddef.h>
#include <stdint.h>

#include "vfs_plugin.h"

struct vfs_file; /* opaque: one open object */

/* Register a backend under ops->name. Fails with -EEXIST if the scheme is taken,
 * -EINVAL if the version or struct_size is unusable. Thread-safe. */
int vfs_register(const struct vfs_ops *ops);

/* Load one plugin shared object (dlopen, then its VFS_PLUGIN_INIT, given the host table) and register it. */
int vfs_load_plugin(const char *so_path);

/* Load every "*.so" in dir; returns the number loaded or a negative errno. A
 * plugin that fails to load is skipped with its message written to stderr. */
int vfs_load_plugins(const char *dir);

/* Pass key=value to the backend of scheme (its .config): -EINVAL for an unknown
 * scheme or a backend without .config, else the backend's answer. Call before
 * the scheme is used; not thread-safe against opens of that scheme. */
int vfs_config(const char *scheme, const char *key, const char *value);

/* Walk the counters of every backend that has .stats: cb(ctx, scheme, name,
 * value). A non-zero cb return stops the walk and is returned. */
int vfs_stats(int (*cb)(void *ctx, const char *scheme, const char *name, uint64_t value), void *ctx);

/* Open the object at uri. On success *out is a new handle the caller closes with
 * vfs_close; on failure *out is unchanged. The built-in backends ("file", "mem",
 * "fault") are registered on first use. */
int vfs_open(const char *uri, unsigned flags, struct vfs_file **out);
void vfs_close(struct vfs_file *f);

/* Forwarders to the backend, with the contracts of struct vfs_ops. Reads past
 * the end are zero-filled. discard returns -EOPNOTSUPP where the backend has none. */
int vfs_pread(struct vfs_file *f, void *buf, size_t len, uint64_t off);
int vfs_pwrite(struct vfs_file *f, const void *buf, size_t len, uint64_t off);
int vfs_flush(struct vfs_file *f);
int vfs_size(struct vfs_file *f, uint64_t *size);
int vfs_truncate(struct vfs_file *f, uint64_t size);
int vfs_discard(struct vfs_file *f, uint64_t off, uint64_t len);
/* Tell a deferred publish's backend that [off, off+len) of f (opened on a
 * vfs_pending_uri) will not be read back nor written again before the commit:
 * it may drop its staged copy once sent (struct vfs_ops .release). 0, or a
 * negative errno (f read-only, a bad range); 0 and nothing done where the
 * backend has no .release. Thread-safe as vfs_pwrite. */
int vfs_release(struct vfs_file *f, uint64_t off, uint64_t len);
/* Whether a write to f (opened read-write on a vfs_pending_uri) may go now
 * without the backend holding it back (struct vfs_ops .wait_room): 1 yes, 0
 * not yet: wake(ctx) is then called exactly once later, from any thread, when
 * it may (or the backend stopped holding writes back, or f's backend handle
 * closed); a negative errno on failure, nothing armed. 1 where the backend
 * never holds writes back. One wait per backend handle: a new one first wakes
 * the earlier one. Once asked, vfs_pwrite on f no longer blocks for room.
 * Thread-safe as vfs_pwrite. */
int vfs_wait_room(struct vfs_file *f, void (*wake)(void *ctx), void *ctx);
/* A descriptor to read f's bytes from directly (sendfile), or -1 when the
 * backend has none. Borrowed: valid until vfs_close(f); never close it. */
int vfs_fd(struct vfs_file *f);
unsigned vfs_caps(struct vfs_file *f);
int vfs_block_status(struct vfs_file *f, uint64_t off, uint64_t len, uint64_t *pnum);

/* The canonical URI this handle was opened as (for files: "file:" is dropped and
 * the path made absolute and free of symlinks, so two names of one file compare
 * equal). Borrowed; lives as long as f. */
const char *vfs_file_uri(const struct vfs_file *f);

/* Store-level calls on URIs; -EOPNOTSUPP where the backend lacks them. */
int vfs_list(const char *dir_uri, int (*cb)(void *ctx, const char *name), void *ctx);
int vfs_stat(const char *uri, struct vfs_stat *st);
int vfs_remove(const char *uri);
int vfs_rename(const char *from_uri, const char *to_uri);

/* Resolve name relative to the folder of base_uri: "img/b.qcow2" against
 * "mem:dir/a.qcow2" gives "mem:dir/img/b.qcow2"; an absolute path or a name with a
 * scheme is returned unchanged. Returns a new string (free()) or NULL on ENOMEM. */
char *vfs_resolve(const char *base_uri, const char *name);

/* Whether name, taken relative to some image, would stay inside that image's
 * store: relative, no scheme, no ".." component. */
int vfs_name_is_contained(const char *name);

/* ---- a deferred publish: a new object seen whole under its final name, or not at all ---- */

/* Begin making a new object that appears at final_uri only at
 * vfs_pending_commit. Then vfs_pending_uri(p) names the object being made:
 * open it (the first open with VFS_O_CREATE creates it, CREATE | EXCL as
 * qcow2_create opens is fine), write it, read it back, open it again (each
 * vfs_file shares the one object), stat it, resolve names beside it
 * (vfs_resolve gives names beside final_uri). Close those, commit, and end
 * with vfs_pending_end, which aborts when there was no commit.
 * A backend with .open_deferred (an object store's multipart upload to the
 * final key) makes it there: nothing is visible meanwhile, and the commit is
 * one request, no copy and no rename. Others fall back to temp_uri, a name
 * the caller chose in the same store (it creates it through the work URI,
 * which then is temp_uri itself), renamed over final_uri at the commit and
 * removed at an abort; a crash leaves it for the caller's cleanup of its
 * temporary names. *out is a new pending; 0 or a negative errno. */
struct vfs_pending;
int vfs_pending_begin(const char *final_uri, const char *temp_uri, struct vfs_pending **out);
/* The final URI of a pending's work URI (a new string, free()), or NULL when
 * uri is no deferred pending's (a fallback's work URI is a name of its own). */
char *vfs_pending_final(const char *uri);
/* The URI to open the object being made as (borrowed; lives until _end). */
const char *vfs_pending_uri(const struct vfs_pending *p);
/* 1 when the backend defers the publish itself, 0 for the temp + rename fallback. */
int vfs_pending_deferred(const struct vfs_pending *p);
/* Publish: the object made becomes final_uri's at once, replacing what was
 * there (VFS_COMMIT_EXCL: -EEXIST if something is). Close every vfs_file of
 * it first (an open image may still hold writes). On failure nothing is
 * published; commit again or end. */
int vfs_pending_commit(struct vfs_pending *p, unsigned flags);
/* Release p; not committed: the object made is dropped (an open vfs_file on it
 * keeps the deferred one alive until closed, but it is never published). The
 * thread's error message is kept. NULL: nothing. */
void vfs_pending_end(struct vfs_pending *p);

/* ---- test seams ---- */

/* The fault filter: opening "fault:INNER-URI" opens INNER-URI through a filter that
 * counts calls across all fault handles and fails the armed one. Arm it with
 * vfs_fault_arm(VFS_FAULT_WRITE, 3, ENOSPC): the third pwrite from now fails with
 * -ENOSPC (once). Also armed from the environment at first use:
 * QCOWD_FAULT="write:3:ENOSPC" (op read|write|flush|truncate|any|open, n >= 1,
 * errno EIO|ENOSPC|EROFS|EACCES|EDQUOT or a number; KILL: SIGKILL just before that
 * call, a crash at that instant). Two more forms, for a daemon serving a catalog
 * through the filter (qcowd --catalog fault:DIR): "n+" fails the nth call and every
 * later one, and a fourth field counts (and fails) only the calls on files whose
 * URI contains it: QCOWD_FAULT="open:1+:EACCES:locked.qcow2" makes that one image
 * unreadable as a file of mode 000 would be, whoever runs the test. "any" counts
 * every kind but open. */
enum vfs_fault_op {
    VFS_FAULT_READ,
    VFS_FAULT_WRITE,
    VFS_FAULT_FLUSH,
    VFS_FAULT_TRUNCATE,
    VFS_FAULT_ANY,
    VFS_FAULT_OPEN
};
void vfs_fault_arm(enum vfs_fault_op op, unsigned long nth, int errnum);
void vfs_fault_disarm(void);
/* Calls of each kind counted since the last arm (for tests that step through). */
unsigned long vfs_fault_count(enum vfs_fault_op op);
/* Whether the armed fault has fired. */
int vfs_fault_fired(void);

#endif
