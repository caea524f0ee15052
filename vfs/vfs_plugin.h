/* vfs_plugin.h: the storage-plugin SDK: the versioned interface every storage
 * backend implements, and the host functions a plugin may call. Self-contained:
 * a plugin needs this header only (pkg-config qcowd-plugin), links nothing of the
 * daemon, and finds every host function in the table it is given at load. */
#ifndef QCOWD_VFS_PLUGIN_H
#define QCOWD_VFS_PLUGIN_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* ---- Writing a plugin, in short ----
 *
 *   #include <qcowd/vfs_plugin.h>      (or "vfs_plugin.h" in the tree)
 *   static int my_open(const char *path, unsigned flags, void **handle) { ... }
 *   ...
 *   static const struct vfs_ops my_ops = {
 *       .version = VFS_OPS_VERSION, .struct_size = sizeof(struct vfs_ops),
 *       .name = "tar", .thread_model = VFS_THREAD_PARALLEL,
 *       .open = my_open, .close = my_close, .pread = my_pread, .size = my_size,
 *   };
 *   VFS_PLUGIN(my_ops)
 *
 * Build it as a shared object (cc -shared -fPIC $(pkg-config --cflags
 * qcowd-plugin)) named SCHEME.so and put it in the folder qcowd loads plugins
 * from (qcowd --plugin-dir, default `pkg-config --variable=plugindir
 * qcowd-plugin`). qcowd then serves URIs "SCHEME:PATH" through it, e.g.
 * `qcowd --catalog tar:/srv/images.tar`.
 *
 * Paths. The host strips "SCHEME:" and passes the rest as it is: for a catalog
 * "tar:/srv/images.tar" the folder is "/srv/images.tar" (.stat must report it
 * with is_dir = 1 and .list must name its entries), and its image "vm1" is
 * "/srv/images.tar/vm1.qcow2". Entries are joined with '/'; a backend gives
 * '/' whatever meaning suits its store (a bucket prefix, a member of an
 * archive). Names are never "." or "..", and never contain a NUL.
 *
 * Errors. Every method returns 0 (or a count where said) on success and a
 * negative errno on failure, after setting a readable message with vfs_fail():
 * `return vfs_fail(ENOENT, "open %s: no such member", path);`. The message goes
 * to the client that asked (paths of the host are scrubbed by the daemon), so
 * name what failed and why. The errno chooses the HTTP answer: ENOENT 404,
 * EROFS/EACCES 503 storage-denied, EIO/EPROTO 502 storage-error, ENOSPC 507,
 * EUCLEAN a corrupt store object (422), anything else 500.
 *
 * Threads. With VFS_THREAD_PARALLEL every method may be called from several
 * threads at once, on the same handle too; a backend that cannot cope says
 * VFS_THREAD_SERIALIZE and the host takes one lock around every call.
 *
 * Defaults of the optional methods are written beside each below: a read-only
 * backend gives no .pwrite (opens for writing are refused with EROFS before
 * .open is called), no .flush, .truncate, .discard, .remove or .rename.
 */

/* The interface version this header describes. A backend sets .version to the
 * version it was written against; the host never calls a method the backend's
 * version does not have, and checks .struct_size before touching later fields.
 * Version 2 appended .config and .stats; version 1 backends (struct_size ending
 * at .rename) still load and simply have neither. Version 3 appended .fd,
 * version 4 .open_deferred and .commit (a deferred publish), version 5
 * .release (a deferred handle's staged bytes the host will not read back),
 * version 6 .wait_room (a deferred handle's backpressure, without blocking). */
#define VFS_OPS_VERSION 6

/* Open flags. */
#define VFS_O_RDONLY 0x0u
#define VFS_O_RDWR   0x1u
#define VFS_O_CREATE 0x2u  /* create if missing (needs VFS_O_RDWR) */
#define VFS_O_EXCL   0x4u  /* with VFS_O_CREATE: fail with -EEXIST if it exists */

/* Thread models, as nbdkit's: how many calls the host may make at once. */
enum vfs_thread_model {
    VFS_THREAD_SERIALIZE = 0, /* one call at a time per backend (host takes a lock) */
    VFS_THREAD_PARALLEL = 1,  /* any calls on any handles at once */
};

/* Capability bits returned by .caps (NULL .caps means 0). */
#define VFS_CAP_DISCARD      0x1u /* .discard really frees space */
#define VFS_CAP_BLOCK_STATUS 0x2u /* .block_status knows holes */
/* .flush publishes every completed write at once: after a crash the object is
 * as of some earlier flush, never a mix (an object store publishing a new
 * version). Flushes that only order writes can then be skipped; a caller still
 * flushes where it needs durability. */
#define VFS_CAP_ATOMIC_FLUSH 0x4u

/* Flags of .commit. */
#define VFS_COMMIT_EXCL 0x1u /* fail with -EEXIST when an object has the name by then */

/* Results of .block_status. */
#define VFS_BS_HOLE 0 /* reads as zeroes (a hole, or past the end) */
#define VFS_BS_DATA 1 /* may hold data */

/* What .stat reports. */
struct vfs_stat {
    uint64_t size;      /* bytes */
    uint64_t allocated; /* bytes of storage used (0 if unknown) */
    int64_t mtime;      /* seconds since the epoch (0 if unknown) */
    int is_dir;         /* 1 for a directory-like prefix */
    /* appended: a backend built against the older struct leaves them 0 */
    int64_t mtime_nsec; /* nanoseconds within mtime (0 if unknown) */
    uint64_t ino;       /* the object's identity, e.g. the inode number (0 if unknown) */
    uint64_t version;   /* changes when the content is replaced (an object store's ETag,
                         * hashed); 0 if unknown. Added after version 1: hosts zero it */
};

/* Every method returns 0 (or a count where said) on success and a negative errno
 * on failure, after setting a readable message with vfs_fail() (see above).
 * Paths given to a backend have the "scheme:" prefix removed. Mandatory: .open,
 * .close, .pread, .size; the rest may be NULL. */
struct vfs_ops {
    int version;         /* VFS_OPS_VERSION the backend was written against */
    size_t struct_size;  /* sizeof(struct vfs_ops) as the backend saw it */
    const char *name;    /* the URI scheme it serves: "file", "mem", "s3" */
    int thread_model;    /* enum vfs_thread_model */

    /* ---- version 1 ---- */

    /* Open path with VFS_O_* flags; on success store an opaque handle in *handle.
     * On failure *handle is left alone and .close is not called. */
    int (*open)(const char *path, unsigned flags, void **handle);
    /* Release the handle; it never fails and is called exactly once per open. */
    void (*close)(void *handle);
    /* Read exactly len bytes at off. Bytes past the end of the object read as
     * zeroes (a short read is zero-filled, never reported as an error). */
    int (*pread)(void *handle, void *buf, size_t len, uint64_t off);
    /* Write exactly len bytes at off, growing the object if needed. */
    int (*pwrite)(void *handle, const void *buf, size_t len, uint64_t off);
    /* Make every completed write durable before returning. */
    int (*flush)(void *handle);
    /* Current size in bytes. */
    int (*size)(void *handle, uint64_t *size);
    /* Set the size; growing reads back as zeroes. */
    int (*truncate)(void *handle, uint64_t size);
    /* Optional. Deallocate a range; it reads back as zeroes afterwards.
     * NULL: the host reports -EOPNOTSUPP and callers treat discard as a hint. */
    int (*discard)(void *handle, uint64_t off, uint64_t len);
    /* Optional. VFS_CAP_* bits for this handle. NULL: 0. */
    unsigned (*caps)(void *handle);
    /* Optional. Whether [off, off+len) starts with data or a hole: returns
     * VFS_BS_DATA or VFS_BS_HOLE and sets *pnum (1..len) to the length of the run
     * with that status. Past the end is a hole. NULL: data up to the size, hole after. */
    int (*block_status)(void *handle, uint64_t off, uint64_t len, uint64_t *pnum);
    /* Optional. Call cb once per entry directly inside dir (names only, no "." or
     * ".."); a non-zero cb return stops the walk and is returned. */
    int (*list)(const char *dir, int (*cb)(void *ctx, const char *name), void *ctx);
    /* Optional. Facts about path without opening it; -ENOENT if missing. */
    int (*stat)(const char *path, struct vfs_stat *st);
    /* Optional. Remove the object at path. */
    int (*remove)(const char *path);
    /* Optional. Atomically replace `to` with `from` (like rename(2)). */
    int (*rename)(const char *from, const char *to);
    /* ---- end of version 1 ---- */

    /* ---- version 2 ---- */

    /* Optional. Configuration, as nbdkit's .config: the host passes each
     * key=value the user gave for this scheme (qcowd's --s3-endpoint becomes
     * config("endpoint", URL)) before the first open. Keys are lowercase words
     * with '-'; an unknown key or a bad value is refused with -EINVAL and a
     * message. NULL: the backend takes no configuration (the host refuses any). */
    int (*config)(const char *key, const char *value);
    /* Optional. Report the backend's counters (requests, bytes moved, cache hits):
     * cb once per counter, name in Prometheus style ("requests_get"). A non-zero
     * cb return stops the walk and is returned. NULL: no counters. */
    int (*stats)(int (*cb)(void *ctx, const char *name, uint64_t value), void *ctx);
    /* ---- end of version 2 ---- */

    /* ---- version 3 ---- */

    /* Optional. A file descriptor whose bytes at the handle's offsets are the
     * handle's bytes, for a host that hands reads to the kernel (sendfile). The
     * host only reads through it, never closes it, and stops using it before
     * .close. Only for a backend whose thread_model is VFS_THREAD_PARALLEL.
     * NULL or -1: there is none (the host uses .pread).
     * The page-cache rule: the kernel reads the descriptor's page cache, not the
     * backend, so offer a descriptor only when every byte .pread would return is
     * what the descriptor reads at the same offset at that moment: no bytes
     * staged elsewhere (an object store's local cache), no offset shift (a member
     * of an archive), and for a writable handle a .discard that drops the range
     * from the page cache (a hole punched in the file), since a discarded range
     * must never be served with its old bytes. When unsure, give none. */
    int (*fd)(void *handle);
    /* ---- end of version 3 ---- */

    /* ---- version 4: a deferred publish ---- */

    /* Optional, both or neither. A new object for path that nobody sees until
     * .commit: an object store's multipart upload to its final key, which is
     * invisible until completed, so that one request publishes it and no
     * temporary name, copy or rename is needed.
     * .open_deferred opens it empty and read-write in *handle. The handle takes
     * .pread, .pwrite, .size, .truncate, .flush (durable enough for the handle
     * itself; it never makes the object visible) and .caps; reads return what
     * was written through it. What is at path meanwhile is untouched, and other
     * opens of path see it (or nothing). Several threads may use the handle at
     * once under VFS_THREAD_PARALLEL.
     * .commit makes the handle's bytes the object at path, replacing what is
     * there at once (a reader sees the old object or the new one, whole). With
     * VFS_COMMIT_EXCL it fails with -EEXIST when an object has the name: a
     * store that cannot test and publish in one step tests just before, and
     * says so in its documentation. After a successful commit the host only
     * closes the handle. A failed commit publishes nothing; the host may commit
     * again or close.
     * .close of a handle not committed is the abort: nothing becomes visible,
     * whatever was sent is freed (best effort; a backend that can leave
     * something behind on a crash, such as an unfinished multipart upload,
     * removes it at a later start).
     * NULL: the host's vfs_pending_* calls fall back to a temporary name, a
     * normal create and .rename at the commit. */
    int (*open_deferred)(const char *path, void **handle);
    int (*commit)(void *handle, unsigned flags);
    /* ---- end of version 4 ---- */

    /* ---- version 5 ---- */

    /* Optional. On a handle of .open_deferred only: the host will not read
     * [off, off+len) back, nor write it again, before the commit (an upload
     * sent in order, whose few metadata ranges it keeps unreleased). A backend
     * that stages the object locally may then forget its copy of the range
     * once it is safely sent to the store, so staging stays bounded whatever
     * the object's size. Afterwards a read of a forgotten byte, a write into
     * it, or a commit that would need it again (a fallback publish) fails
     * with -EIO and a message saying so; the range must not be assumed
     * forgotten either (it may still read back). Releasing a range twice, or
     * past the end, is harmless. NULL: the host's vfs_release does nothing. */
    int (*release)(void *handle, uint64_t off, uint64_t len);
    /* ---- end of version 5 ---- */

    /* ---- version 6 ---- */

    /* Optional. On a handle of .open_deferred only: may the host write now
     * without the backend holding it back? A backend that sends the object
     * while it is written (an upload streamed in parts) and bounds what it
     * stages would otherwise block a .pwrite until the store took some of it;
     * a host that serves many clients on one thread asks first instead.
     * Returns 1 when a write may go now (nothing armed; wake is never called
     * for this call), 0 when it should wait: then the backend calls wake(ctx)
     * exactly once later, from any thread and with no lock of the host held,
     * when room came, when it stopped holding writes back (the send failed or
     * ended: the next write says why, if anything), or at .close, whichever
     * comes first; a negative errno on failure (nothing armed). One wait per
     * handle: arming again while one is armed first wakes the earlier one.
     * wake must be quick and must not call the backend. Once a host has asked,
     * the backend's .pwrite no longer holds it back; a host that never asks
     * gets the blocking behaviour (bounded by the backend). NULL: writes are
     * never held back (the host's vfs_wait_room returns 1). */
    int (*wait_room)(void *handle, void (*wake)(void *ctx), void *ctx);
    /* ---- end of version 6 ---- */
};

/* ---- the host's functions, given to the plugin at load ---- */

/* The version of struct vfs_host this header describes; fields are only ever
 * appended, and a plugin checks .struct_size before touching later ones. */
#define VFS_HOST_VERSION 1

struct vfs_host {
    int version;        /* VFS_HOST_VERSION of the host */
    size_t struct_size; /* sizeof(struct vfs_host) as the host saw it */
    /* Set the calling thread's error message (printf style; the arguments may
     * include the current message) and return -errnum (errnum positive or
     * negative). */
    int (*vfail)(int errnum, const char *fmt, va_list ap);
    /* Prefix the calling thread's message: "ctx: old message"; returns errnum
     * as given (negative stays negative). */
    int (*vprefix)(int errnum, const char *fmt, va_list ap);
    /* The calling thread's message; strerror(errnum) if none was set since
     * .clear. Borrowed, valid until the thread's next call of these. */
    const char *(*msg)(int errnum);
    /* Forget the calling thread's message. */
    void (*clear)(void);
};

/* The table the plugin was loaded with (VFS_PLUGIN stores it before anything
 * else of the plugin runs); NULL inside the host's built-in backends, which set it
 * to the host's own table. */
extern const struct vfs_host *vfs_host_table __attribute__((visibility("hidden")));

/* Report a failure: set the message, return -errnum. */
__attribute__((format(printf, 2, 3), unused)) static inline int vfs_fail(int errnum, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vfs_host_table->vfail(errnum, fmt, ap);
    va_end(ap);
    return r;
}

/* Add context in front of the message of a failure from below: returns errnum. */
__attribute__((format(printf, 2, 3), unused)) static inline int vfs_prefix(int errnum, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vfs_host_table->vprefix(errnum, fmt, ap);
    va_end(ap);
    return r;
}

/* The message of the calling thread (see struct vfs_host .msg). */
__attribute__((unused)) static inline const char *vfs_msg(int errnum)
{
    return vfs_host_table->msg(errnum);
}

/* The entry point: a plugin shared object exports VFS_PLUGIN_INIT. host_version
 * is VFS_OPS_VERSION of the loading host, host its function table (valid for the
 * life of the process). Return NULL to decline. The returned struct must stay
 * valid until the process exits. Write it with VFS_PLUGIN(ops), or by hand to
 * return another table for an older host (as the s3 plugin does). */
typedef const struct vfs_ops *(*vfs_plugin_init_fn)(int host_version, const struct vfs_host *host);
#define VFS_PLUGIN_INIT "qcowd_vfs_plugin_init"

/* Define the plugin's entry point for the backend ops (a const struct vfs_ops),
 * once per plugin, at file scope. It declines a host without the host table. */
#define VFS_PLUGIN(ops)                                                                                         \
    const struct vfs_host *vfs_host_table;                                                                      \
    __attribute__((visibility("default"))) const struct vfs_ops *qcowd_vfs_plugin_init(                        \
        int host_version, const struct vfs_host *host);                                                         \
    __attribute__((visibility("default"))) const struct vfs_ops *qcowd_vfs_plugin_init(                        \
        int host_version, const struct vfs_host *host)                                                          \
    {                                                                                                           \
        if (host_version < 1 || !host || host->version < 1 ||                                                   \
            host->struct_size < offsetof(struct vfs_host, clear) + sizeof host->clear)                          \
            return NULL;                                                                                        \
        vfs_host_table = host;                                                                                  \
        return &(ops);                                                                                          \
    }

/* Plugins of interface version 3 and older exported this instead and took the
 * error functions from the daemon's own symbols, which it no longer exports:
 * rebuild them with VFS_PLUGIN. The host still looks for it, to say so. */
#define VFS_PLUGIN_ENTRY_OLD "qcowd_vfs_plugin"
typedef const struct vfs_ops *(*vfs_plugin_entry_old_fn)(int host_version);

#endif
