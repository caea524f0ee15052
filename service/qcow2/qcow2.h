/* qcow2.h: the format engine's public interface: open a disk image (qcow2, or
 * raw when asked) with its backing chain, read guest bytes, map allocation. */
#ifndef QCOWD_QCOW2_H
#define QCOWD_QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct qcow2_image; /* opaque: one open image and its backing chain */

enum qcow2_format { QCOW2_FMT_QCOW2 = 0, QCOW2_FMT_RAW = 1 };

/* How to open. Zeroed means: qcow2 only, read-only, defaults for the rest. */
struct qcow2_open_opts {
    const char *format;        /* NULL or "qcow2": must have the qcow2 magic; "raw": raw */
    const char *snapshot;      /* NULL, or an internal snapshot's name or id: a read-only view */
    bool read_write;           /* open the top image for writing (backing files stay read-only) */
    bool no_backing;           /* do not open the backing chain (unallocated reads as zero) */
    bool contained;            /* backing/data file names must stay inside the image's store */
    size_t l2_cache_bytes;     /* 0: QCOW2_DEFAULT_L2_CACHE */
    unsigned max_chain_depth;  /* 0: QCOW2_DEFAULT_CHAIN_DEPTH */
    uint64_t max_meta_bytes;   /* budget per layer of the chain: bytes of metadata held in memory (L1 and
                                  refcount tables, snapshot table, bitmap directory, tracked bitmaps);
                                  an image needing more is refused with -ENOTSUP naming it.
                                  0: QCOW2_DEFAULT_META_BYTES */
    bool allow_corrupt;        /* open a corrupt or dirty image read-write as it is (check and repair) */
    bool no_rebuild;           /* read_write on a dirty image (lazy refcounts left by a crash): fail with
                                  -EROFS instead of rebuilding its refcounts inside the open (a walk of
                                  every table: for callers that must not block, e.g. request threads) */
    bool cache_unsafe;         /* never flush to the disk (qemu-img's cache=unsafe): for new images whose
                                  loss in a power cut does not matter, e.g. a convert target */
    bool release_data;         /* read_write, for a new image written once and not read back (a convert
                                  target on a deferred publish): the caller writes each guest cluster at
                                  most once and never reads this image. A data cluster written whole into
                                  a host cluster allocated for it, and a host cluster of compressed data
                                  once filled, are handed to vfs_release (the store may then forget its
                                  staged copy); metadata never is. A read or a rewrite of such a cluster
                                  may then fail with -EIO. L2 tables and refcount blocks are made ahead of
                                  need, side by side (up to 1 MiB / 16 at once; a sparse image may get a
                                  few empty ones), so that little metadata lies between the data. */
};

#define QCOW2_DEFAULT_L2_CACHE (4u << 20)
#define QCOW2_DEFAULT_CHAIN_DEPTH 64
#define QCOW2_DEFAULT_META_BYTES (64ull << 20)

/* Open uri with opts (NULL for defaults). On success *out is a new image the caller
 * closes; on failure *out is unchanged, the return is a negative errno and
 * err_msg() names the problem ("L1 table at 0x30008 is not cluster aligned").
 * Format errors in the header and the tables it names use -EINVAL (the catalog
 * reports them as -EUCLEAN), a corrupt bit that forbids read_write -EUCLEAN,
 * unsupported features -ENOTSUP, storage errors the backend's errno (-EIO is only
 * ever the store's: corruption found later, by any call, is -EUCLEAN). */
int qcow2_open(const char *uri, const struct qcow2_open_opts *opts, struct qcow2_image **out);

struct vfs_file;

/* A byte range of an image file. */
struct qcow2_range {
    uint64_t off, len;
};
#define QCOW2_META_RANGES_MAX 6

/* The byte ranges of the qcow2 image in f that a read-only qcow2_open with
 * max_meta_bytes (0: the default) reads of f itself: the header cluster, the
 * L1 and refcount tables, the snapshot table (with the window its walk reads
 * past the last entry), the bitmap directory, the LUKS header. Known from the
 * header cluster alone, so f may hold only its first cluster (an upload still
 * arriving): nothing past it is read, and tables past f's end are not refused
 * here. Tables over their limits are left out (the open refuses them before
 * reading). Fills out with the ranges sorted and merged and returns their
 * count (1 to QCOW2_META_RANGES_MAX), or the negative errno with which
 * qcow2_open would refuse the header (-EINVAL format, -ENOTSUP unsupported)
 * or of the read. Thread-safe on distinct f. */
int qcow2_meta_ranges(struct vfs_file *f, uint64_t max_meta_bytes, struct qcow2_range out[QCOW2_META_RANGES_MAX]);
/* Close img (NULL is fine). An image open read-write gets its last metadata,
 * bitmaps and header flags written first; the return is 0, or the negative
 * errno of that final write (the image is freed either way, and what failed to
 * reach the disk leaves it as consistent as a crash would). */
int qcow2_close(struct qcow2_image *img);

/* Guest size in bytes (of the snapshot when opened on one). */
uint64_t qcow2_size(const struct qcow2_image *img);

/* Read len guest bytes at off into buf; off+len must be within the size.
 * Thread-safe: many threads may read one image at once. Returns 0 or -errno
 * (a corrupt mapping fails only the read that meets it). */
int qcow2_pread(struct qcow2_image *img, void *buf, size_t len, uint64_t off);

/* A guest range pinned to its host bytes, for a reader that hands them to the
 * kernel (sendfile) and so reads them after the image's locks are gone. */
struct qcow2_pin {
    struct qcow2_image *img;
    unsigned slot;
};

/* When guest [off, off+len) of img's own layer is one run of plain data in one
 * host file that has a descriptor (vfs_fd), store the descriptor (borrowed: valid
 * while img is open) and the run's host offset, pin the run and return 1. Until
 * qcow2_unpin, no cluster img frees is deallocated or given to new data, so the
 * host bytes stay the guest's bytes or become those of a later write to the same
 * range (as a pread racing that write could see). 0: not such a run (compressed,
 * zero, unallocated, split, in a backing file, past the file's end...): read it
 * with qcow2_pread. Never fails: a lookup error is a 0 and the pread reports it.
 * Thread-safe, like qcow2_pread. */
int qcow2_pin_run(struct qcow2_image *img, uint64_t off, uint64_t len, int *fd, uint64_t *host_off,
                  struct qcow2_pin *pin);
/* Let go of a pin; img must still be open. */
void qcow2_unpin(struct qcow2_pin *pin);

/* One run of guest bytes with the same status, as qemu-img map sees it. */
struct qcow2_extent {
    uint64_t start, length; /* guest bytes */
    int depth;              /* chain layer the bytes come from (0 = this image) */
    bool present;           /* allocated in some layer (else reads from nowhere: zero) */
    bool zero;              /* known to read as zeroes */
    bool data;              /* backed by data in some file */
    bool compressed;        /* a compressed cluster */
    bool offset_valid;      /* offset below is meaningful */
    uint64_t offset;        /* host offset in `file` where the bytes are */
    const char *file;       /* URI holding them (borrowed; lives as long as img) */
};

/* Status of the guest range starting at off (at most len bytes): fills *ext with
 * the longest run of one status. Thread-safe. */
int qcow2_block_status(struct qcow2_image *img, uint64_t off, uint64_t len, struct qcow2_extent *ext);

/* Internal snapshot, as the snapshot table holds it. */
struct qcow2_snapshot_info {
    char *id;             /* unique id string */
    char *name;
    uint64_t vm_state_size;
    uint64_t disk_size;   /* guest size when taken */
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t icount;      /* UINT64_MAX when absent */
    uint32_t l1_size;
    uint64_t l1_offset;
};

/* Persistent bitmap, as the bitmap directory holds it. */
struct qcow2_bitmap_info {
    char *name;
    uint32_t granularity;  /* bytes per bit */
    bool in_use;            /* in use by another writer, or left so by a crash: its bits cannot be
                               trusted (this handle's own tracking of an enabled bitmap does not count) */
    bool auto_;             /* enabled: writes mark it */
    bool consistent;        /* no unknown extra data */
    uint8_t type;
    uint64_t entry_offset;  /* host offset of its directory entry */
    uint64_t table_offset;  /* host offset of its bitmap table */
    uint32_t table_size;    /* entries */
};

/* The LUKS header of an encrypted image (its fields as stored; strings cut at
 * their first NUL), for qemu-img info's "encrypt". */
#define QCOW2_LUKS_SLOTS 8
struct qcow2_luks_info {
    char cipher_name[33], cipher_mode[33], hash_spec[33], uuid[41];
    uint32_t payload_offset; /* in 512-byte sectors */
    uint32_t key_bytes;      /* of the master key (both halves for xts) */
    uint32_t mk_iterations;  /* of the master key digest */
    struct {
        bool active;
        uint32_t iterations, key_offset, stripes; /* key_offset in 512-byte sectors */
    } slots[QCOW2_LUKS_SLOTS];
};

/* Facts about the open image (top layer). All borrowed; live as long as img. */
struct qcow2_info {
    enum qcow2_format format;
    const char *uri;              /* the image file */
    uint64_t virtual_size;        /* of the active image (not the snapshot view) */
    uint64_t file_size;           /* bytes of the image file */
    uint64_t file_allocated;      /* storage used by the image file (0 if unknown) */
    /* qcow2 only below */
    uint32_t version;             /* 2 or 3 */
    uint32_t cluster_size;
    uint32_t refcount_bits;
    bool extended_l2, lazy_refcounts, dirty, corrupt;
    const char *compression;      /* "zlib" or "zstd" */
    const char *backing_file;     /* as stored, or NULL */
    const char *backing_format;   /* from the extension, or NULL */
    const char *backing_uri;      /* resolved, or NULL */
    const char *data_file;        /* as stored, or NULL */
    const char *data_file_uri;    /* resolved, or NULL */
    bool data_file_raw;
    int crypt_method;             /* 0 none, 1 aes, 2 luks */
    const struct qcow2_luks_info *luks; /* LUKS: its header, or NULL when it is not LUKS version 1 */
    uint64_t incompatible, compatible, autoclear;
    uint32_t nb_snapshots;
    const struct qcow2_snapshot_info *snapshots;
    uint32_t nb_bitmaps;
    const struct qcow2_bitmap_info *bitmaps;
    uint32_t l1_size;
    uint64_t l1_offset, refcount_table_offset;
    uint32_t refcount_table_clusters;
};
const struct qcow2_info *qcow2_get_info(const struct qcow2_image *img);

/* L2 cache lookups of img so far (thread-safe). */
void qcow2_cache_stats(struct qcow2_image *img, uint64_t *hits, uint64_t *misses);

/* The change record of an open image, for validators (ETag, Last-Modified).
 * generation starts at 0 at the open and moves on before every change made
 * through this handle becomes visible to its readers: writes, zeroes, discards,
 * snapshot create/delete/revert, bitmap changes, commit, repairs (and claims).
 * Changes through other handles or behind the process's back are not seen:
 * the caller tells those apart by the file's identity. Thread-safe. */
struct qcow2_changes {
    uint64_t generation;      /* changes through this handle so far */
    uint64_t snap_generation; /* of them, changes of the snapshot table (and repairs) */
    int64_t changed;          /* CLOCK_REALTIME second of the last change; 0: none yet */
    int64_t before;           /* the second of the change before it, or of the open;
                                 never above changed */
};
void qcow2_get_changes(struct qcow2_image *img, struct qcow2_changes *out);
uint64_t qcow2_generation(const struct qcow2_image *img);
/* Compare and move on: when the generation is still gen, record a change (the
 * generation moves on) and return 0; else -ESTALE. One call is atomic against
 * every other change and claim, so of several callers that read the same gen
 * exactly one succeeds: a conditional writer claims before it writes. */
int qcow2_claim_generation(struct qcow2_image *img, uint64_t gen);
/* Storage the image file uses now (qcow2_info.file_allocated is the figure at
 * the open): a local file's blocks, else its size. 0 or -errno. Thread-safe. */
int qcow2_file_allocated(struct qcow2_image *img, uint64_t *out);

/* The backing image of img, or NULL (borrowed). */
struct qcow2_image *qcow2_backing(const struct qcow2_image *img);

/* ---- writing (images opened with read_write) ----
 * Writers are serialised per image and exclude readers while they run; every
 * call returns 0 or a negative errno with err_msg() set. Metadata reaches the
 * disk in an order that survives a crash at any point: data and refcounts
 * before the L2 entries that use them, L2 tables before the L1 entries, and
 * refcounts lowered only once no entry on disk points at the cluster. Writes
 * are durable once qcow2_flush (or qcow2_close) returns. */

/* Write len guest bytes at off (off+len within the size). */
int qcow2_pwrite(struct qcow2_image *img, const void *buf, size_t len, uint64_t off);
/* Make [off, off+len) read as zeroes; whole clusters become zero clusters (v3)
 * and free their space. */
int qcow2_pwrite_zeroes(struct qcow2_image *img, uint64_t off, uint64_t len);
/* Discard [off, off+len): whole clusters are freed; on v3 they read back as
 * zeroes (even over a backing file), on v2 they fall through to the backing file.
 * Partial clusters are left as they are (discard is a hint). */
int qcow2_discard(struct qcow2_image *img, uint64_t off, uint64_t len);
/* Write one whole cluster compressed (off cluster aligned, len == cluster size,
 * or the tail of the disk). Falls back to a plain write when it does not shrink. */
int qcow2_pwrite_compressed(struct qcow2_image *img, const void *buf, size_t len, uint64_t off);
/* Compress one cluster into out (cap bytes); returns the compressed size, or 0 when
 * it would not save space, or -errno. Thread-safe and lock-free: for parallel
 * compression before qcow2_write_compressed_raw. */
long qcow2_compress_cluster(const struct qcow2_image *img, const void *in, size_t len, void *out, size_t cap);
/* Store a cluster already compressed by qcow2_compress_cluster. */
int qcow2_write_compressed_raw(struct qcow2_image *img, uint64_t off, const void *cdata, size_t clen);
/* Write all cached metadata in order and make everything durable. */
int qcow2_flush(struct qcow2_image *img);

/* What check found (and fixed), with qemu-img check's meanings. */
struct qcow2_check_result {
    uint64_t corruptions, leaks, check_errors;
    uint64_t corruptions_fixed, leaks_fixed;
    uint64_t image_end_offset;
    uint64_t total_clusters, allocated_clusters, fragmented_clusters, compressed_clusters;
};
enum qcow2_repair { QCOW2_REPAIR_NONE = 0, QCOW2_REPAIR_LEAKS = 1, QCOW2_REPAIR_ALL = 2 };
/* Recount every reference (active L1, snapshots, bitmaps, metadata) and compare
 * with the refcounts and OFLAG_COPIED flags; with repair (image opened read-write
 * with allow_corrupt), fix leaks, or everything, and clear the corrupt bit. Each
 * finding is passed to report (may be NULL) as one line. Returns 0 when the check
 * ran (its findings are in *r), or -errno when it could not. */
int qcow2_check(struct qcow2_image *img, enum qcow2_repair repair, struct qcow2_check_result *r,
                void (*report)(void *ctx, const char *line), void *ctx);

/* Internal snapshots (image open read-write; names match an id first, then a
 * name). create fails with -EEXIST for a name in use; delete and revert with
 * -ENOENT for an unknown one. The caller's snapshot list (qcow2_get_info) is
 * refreshed. */
int qcow2_snapshot_create(struct qcow2_image *img, const char *name);
int qcow2_snapshot_delete(struct qcow2_image *img, const char *name);
int qcow2_snapshot_revert(struct qcow2_image *img, const char *name);
/* The snapshot list, safe while another thread creates, deletes or reverts
 * snapshots (qcow2_get_info's list is replaced then): *out is a read-only array
 * of *n entries shared with the image and other listings (nothing is copied),
 * released with qcow2_snapshot_list_free. Raw images have none (*out NULL). */
int qcow2_snapshot_list(struct qcow2_image *img, struct qcow2_snapshot_info **out, uint32_t *n);
void qcow2_snapshot_list_free(struct qcow2_snapshot_info *list, uint32_t n);

/* Options for qcow2_create, named as qemu-img's -o options. Zeroed means defaults:
 * 64 KiB clusters, version 3, 16-bit refcounts, zlib, no preallocation. */
struct qcow2_create_opts {
    uint64_t size;               /* virtual size in bytes */
    uint32_t cluster_size;       /* 512 B .. 2 MiB, power of two; 0: 65536 */
    int version;                 /* 2 or 3; 0: 3 */
    unsigned refcount_bits;      /* 1,2,4,..,64; 0: 16 */
    bool extended_l2;
    bool lazy_refcounts;
    bool compression_zstd;       /* compression_type=zstd */
    bool prealloc_metadata;      /* preallocation=metadata */
    const char *backing_file;    /* stored as given */
    const char *backing_format;  /* "qcow2" or "raw" (NULL: none stored) */
    const char *data_file;       /* external data file name, stored as given */
    bool data_file_raw;
    uint64_t max_meta_bytes;     /* refuse a size whose L1 table passes this open budget; 0: the default */
};
/* Create a new image at uri (refused with -EEXIST if it exists). The backing
 * file, when given, is opened to check it and to take its size when size is 0. */
int qcow2_create(const char *uri, const struct qcow2_create_opts *o);

/* Persistent dirty bitmaps (image open read-write unless said). name: 1..1023 bytes.
 * Changes reach the disk at once and crash-safely: new tables and directory are
 * written and flushed before the header switches to them; old clusters are freed
 * after. Enabled bitmaps are tracked in memory while the image is written and
 * stored at close. Serialised with writers (the image's write lock); the dirty
 * query runs alongside readers. Errors: -ENOENT unknown bitmap, -EEXIST name taken,
 * -EINVAL bad name/granularity, -EBUSY a bitmap left in use by a crash where the
 * operation needs it consistent (remove and clear work on it), -ENOTSUP v2 image or
 * a bitmap with extra data it does not know, -EROFS read-only, -EUCLEAN image marked
 * corrupt, -E2BIG past 65535 bitmaps or a 64 MiB directory. */
/* granularity 0: as qemu-img (the cluster size, within 4 KiB..64 KiB); else a power
 * of two from 512 B to 2 GiB. disabled: not marked by writes (no "auto" flag). */
int qcow2_bitmap_add(struct qcow2_image *img, const char *name, uint32_t granularity, bool disabled);
int qcow2_bitmap_remove(struct qcow2_image *img, const char *name);
int qcow2_bitmap_clear(struct qcow2_image *img, const char *name);
int qcow2_bitmap_enable(struct qcow2_image *img, const char *name);
int qcow2_bitmap_disable(struct qcow2_image *img, const char *name);
/* dst |= src; src may live in another image (src_img NULL: img itself), which is only
 * read and needs the same virtual size (granularities may differ). */
int qcow2_bitmap_merge(struct qcow2_image *img, const char *dst, struct qcow2_image *src_img, const char *src);
/* Dirty status at off (read-only is fine): *dirty and *pnum (bytes with that status,
 * whole granules, <= len). -ENOENT unknown bitmap, -EBUSY when the bitmap is
 * in_use from a crash (inconsistent: its bits cannot be trusted), -EUCLEAN a corrupt
 * bitmap table. Thread-safe. */
int qcow2_bitmap_dirty(struct qcow2_image *img, const char *name, uint64_t off, uint64_t len, bool *dirty,
                       uint64_t *pnum);
/* A copy of the bitmap list, safe while other threads change bitmaps (qcow2_get_info's
 * list is not): *out is a new array of *n entries to free with qcow2_bitmap_list_free.
 * Raw images have none. Thread-safe. */
int qcow2_bitmap_list(struct qcow2_image *img, struct qcow2_bitmap_info **out, uint32_t *n);
void qcow2_bitmap_list_free(struct qcow2_bitmap_info *list, uint32_t n);
/* ---- commit (qemu-img commit) ---- */

/* Progress of a long operation: called on the working thread with the bytes done
 * and the total; a non-zero return stops the operation, which then returns
 * -ECANCELED. The callback may block (that is how a job pauses). */
typedef int (*qcow2_progress_fn)(void *opaque, uint64_t done, uint64_t total);

/* qcow2_check with progress: progress (may be NULL) is called as the tables are
 * walked and the refcounts compared. Without repair a non-zero return stops the
 * check (-ECANCELED, nothing changed); with repair it is only honoured before the
 * first refcount is changed (after that the repair runs to its end: every fix is
 * sound on its own, but a half-repaired image helps nobody). It may block. */
int qcow2_check_progress(struct qcow2_image *img, enum qcow2_repair repair, struct qcow2_check_result *r,
                         void (*report)(void *ctx, const char *line), void *ctx, qcow2_progress_fn progress,
                         void *opaque);

struct qcow2_commit_opts {
    const char *base;   /* NULL: top's backing file. Else an image further down top's
                           chain, named as the backing_file field that points at it or
                           by its resolved URI/path. */
    bool keep_top;      /* qemu-img commit -d: leave top's data in place */
    qcow2_progress_fn progress; /* may be NULL */
    void *opaque;
};
/* Commit top (opened read-write) into base. On success top's guest view is
 * unchanged and base holds the data; on any failure, cancel or crash, top's
 * guest view is still exactly as before. Returns 0 or a negative errno with
 * err_msg() set (-EINVAL no backing / unknown base, -ECANCELED, -EROFS ...).
 * What is copied: every range some image above base allocates (data, or zeroes:
 * base then reads zeroes there); base grows to top's size when smaller. Top is
 * emptied (its clusters unallocated, so reads fall through to base) only when
 * base is top's own backing file and keep_top is false: with a base further
 * down, top and the images in between stay as they are (as qemu-img commit -b),
 * and the images in between no longer read as before. Readers of top may run
 * meanwhile; writers of top must wait for the commit (the caller keeps them off;
 * a write seen before emptying fails the commit with -EBUSY, top intact). Top's
 * handle on base is refreshed at the end (also after a failure). */
int qcow2_commit(struct qcow2_image *top, const struct qcow2_commit_opts *o);

#endif
