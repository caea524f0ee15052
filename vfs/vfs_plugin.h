/* vfs_plugin.h: the versioned interface every storage backend implements.
 * A backend is one `const struct vfs_ops`; fields are only ever appended. */
#ifndef QCOWD_VFS_PLUGIN_H
#define QCOWD_VFS_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

/* The interface version this header describes. A backend sets .version to the
 * version it was written against; the host never calls a method the backend's
 * version does not have, and checks .struct_size before touching later fields.
 * Version 2 appended .config and .stats; version 1 backends (struct_size ending
 * at .rename) still load and simply have neither. */
#define VFS_OPS_VERSION 3

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
 * on failure, after setting a readable message with err_fail() (common/err.h).
 * Paths given to a backend have the "scheme:" prefix removed. */
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
     * NULL or -1: there is none (the host uses .pread). */
    int (*fd)(void *handle);
    /* ---- end of version 3 ---- */
};

/* A plugin shared object exports this symbol. host_version is VFS_OPS_VERSION of
 * the loading host; return NULL to decline. The returned struct must stay valid
 * until the process exits. */
typedef const struct vfs_ops *(*vfs_plugin_entry_fn)(int host_version);
#define VFS_PLUGIN_ENTRY "qcowd_vfs_plugin"

#endif
