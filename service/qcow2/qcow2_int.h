/* qcow2_int.h: the engine's private structures, on-disk constants and index
 * helpers, shared by the files of service/qcow2/. Byte order is converted only
 * where tables are loaded; everything in memory is CPU order. */
#ifndef QCOWD_QCOW2_INT_H
#define QCOWD_QCOW2_INT_H

#include <endian.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "err.h"
#include "qcow2.h"
#include "vfs.h"

/* ---- header ---- */
#define QCOW2_MAGIC 0x514649fbu /* "QFI\xfb" */
#define QCOW2_V2_HEADER_LEN 72u
#define QCOW2_V3_HEADER_LEN 104u
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MAX_BACKING_NAME 1023u
#define QCOW2_MAX_L1_BYTES (32u << 20)       /* as QEMU */
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)  /* as QEMU */
#define QCOW2_MAX_SNAPSHOTS 65536u
#define QCOW2_MAX_SNAPSHOT_TABLE (64u << 20)
#define QCOW2_MAX_SNAPSHOT_EXTRA 1024u
#define SNAP_FIXED               40u /* a snapshot entry's fixed part */
#define SNAP_MAX_ENTRY           (SNAP_FIXED + QCOW2_MAX_SNAPSHOT_EXTRA + 2 * 65535u + 7) /* its largest size */
#define SNAP_WINDOW              (256u << 10) /* the snapshot table is read through a window of this */
#define QCOW2_MAX_BITMAPS 65535u
#define QCOW2_MAX_BITMAP_DIR (64u << 20)
#define QCOW2_MAX_BITMAP_NAME 1023u
#define QCOW2_MAX_NAME_EXT 4096u              /* our bound on extension strings */
#define QCOW2_MAX_VIRTUAL_SIZE (1ull << 62)

/* bitmap directory entries */
#define BME_FIXED 24u                  /* bytes before the extra data and the name */
#define BME_FLAG_IN_USE (1u << 0)      /* being changed, or left so by a crash: not to be trusted */
#define BME_FLAG_AUTO (1u << 1)        /* enabled: writes mark it */
#define BME_FLAG_EXTRA_COMPAT (1u << 2) /* extra data that may be ignored */
#define BME_RESERVED_FLAGS 0xfffffff8u
#define BME_TYPE_DIRTY 1
#define BME_MIN_GRAN_BITS 9
#define BME_MAX_GRAN_BITS 31
#define BME_MAX_TABLE_SIZE 0x8000000u   /* entries of a bitmap table, as QEMU */
#define BME_MAX_PHYS_SIZE 0x20000000u   /* bytes of one bitmap's data, as QEMU */
#define BME_TABLE_ALL_ONES 1ull         /* a table entry without a cluster that reads as all ones */
#define BME_TABLE_RESERVED 0xff000000000001feull /* bits a bitmap table entry leaves clear */
#define BME_TABLE_OFFSET_MASK 0x00fffffffffffe00ull

/* incompatible feature bits */
#define QCOW2_INCOMPAT_DIRTY       (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT     (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE   (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2       (1ull << 4)
#define QCOW2_INCOMPAT_KNOWN       0x1full
/* compatible feature bits */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
/* autoclear feature bits */
#define QCOW2_AUTOCLEAR_BITMAPS       (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ull << 1)

/* header extension types */
#define QCOW2_EXT_END           0x00000000u
#define QCOW2_EXT_BACKING_FMT   0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE 0x6803f857u
#define QCOW2_EXT_CRYPTO        0x0537be77u
#define QCOW2_EXT_BITMAPS       0x23852875u
#define QCOW2_EXT_DATA_FILE     0x44415441u

#define QCOW2_CRYPT_NONE 0
#define QCOW2_CRYPT_AES  1
#define QCOW2_CRYPT_LUKS 2
#define QCOW2_LUKS_HEADER_LEN 592 /* LUKS version 1: 208 bytes, then 8 key slots of 48 */

#define QCOW2_COMPRESS_ZLIB 0
#define QCOW2_COMPRESS_ZSTD 1

/* ---- L1 / L2 entries ---- */
#define QCOW2_OFLAG_COPIED     (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define QCOW2_OFLAG_ZERO       (1ull << 0)
#define QCOW2_L1E_OFFSET_MASK  0x00fffffffffffe00ull
#define QCOW2_L2E_OFFSET_MASK  0x00fffffffffffe00ull
#define QCOW2_REFT_OFFSET_MASK 0xfffffffffffffe00ull
#define QCOW2_SUBCLUSTERS      32u
#define QCOW2_COMPRESSED_SECTOR 512u

/* On-disk header, big-endian, as laid out in the file (v3 incl. compression byte). */
struct qcow2_disk_header {
    uint32_t magic;
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    /* version 3 */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type;
    uint8_t padding[7];
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_disk_header) == 112, "qcow2 header layout");

/* What a guest range maps to in one layer. */
enum sc_type {
    SC_UNALLOC,    /* not here: read the backing file (or zeroes) */
    SC_ZERO,       /* reads as zeroes; host_off may be a preallocation */
    SC_NORMAL,     /* data at host_off in the data file */
    SC_COMPRESSED, /* a compressed cluster */
};

struct mapping {
    enum sc_type type;
    uint64_t host_off;   /* SC_NORMAL/SC_ZERO: host offset of the first byte (0 if none) */
    bool host_valid;     /* host_off meaningful (incl. ZERO with preallocation, UNALLOC in an allocated cluster) */
    uint64_t coff;       /* SC_COMPRESSED: host offset of the compressed bytes */
    uint32_t csize;      /* SC_COMPRESSED: bytes to read (may pass EOF; zero-filled) */
    uint64_t bytes;      /* length of the run from the queried offset */
};

/* One cached slice of an L2 table. Borrowed with l2_cache_get, returned with l2_cache_put. */
struct l2_slice {
    uint64_t key;        /* host offset of the slice (L2 table offset + slice index * slice bytes) */
    uint64_t *entries;   /* CPU order, slice_bytes/8 words */
    unsigned refs;       /* borrowers; evictable at 0 */
    uint64_t lru;        /* last-use tick */
    bool valid;
    bool dirty;          /* changed in memory, not yet written (writer only) */
};

struct l2_cache {
    pthread_mutex_t lock;
    pthread_cond_t loaded;    /* signalled when a slice finishes loading */
    struct l2_slice *slots;
    unsigned nslots;
    uint32_t slice_bytes;
    uint64_t tick;
    uint64_t hits, misses;
    bool *loading;            /* per slot: being read from disk */
    int *next;                /* per slot: next slot in its hash chain, -1 ends */
    int *bucket;              /* hash of key -> first slot, -1 if none */
    unsigned nbuckets;        /* power of two */
    unsigned ndirty;          /* slices with dirty set */
};

/* A persistent bitmap being tracked while the image is written. */
struct bm_track {
    uint64_t entry_off;  /* host offset of its directory entry */
    unsigned char *bits; /* bit i: guest bytes [i*gran, (i+1)*gran) written */
    uint64_t nbits;
    uint32_t gran_bits;
    bool tracking;       /* enabled (auto) and consistent: writes mark it */
    bool loaded;         /* bits hold the bitmap (always when tracking; else a read cache) */
};

/* A window on one stored bitmap, for dirty queries that read it from disk a
 * piece at a time: memory per query is bounded whatever the bitmap's size.
 * Under bm_lock; reset whenever the directory or a stored table changes. */
#define BM_WINDOW_ENTRIES 4096u /* table entries read at once (32 KiB) */
struct bm_window {
    int bitmap;          /* index in bitmaps[] the window holds, -1: none */
    uint64_t *table;     /* BM_WINDOW_ENTRIES entries of its table, CPU order */
    uint32_t first, n;   /* table entries [first, first+n) are in table */
    unsigned char *data; /* one data cluster */
    uint32_t data_idx;   /* the table index of the cluster in data, UINT32_MAX: none */
};

/* One cached refcount block, in its on-disk form. Writer only. */
struct rb_entry {
    uint64_t off;        /* host offset of the block */
    unsigned char *buf;  /* cluster_size bytes */
    uint64_t lru;
    bool valid, dirty;
};

#define RB_CACHE_ENTRIES 32
#define RB_AHEAD         16 /* release_data: refcount blocks made at once, at most */

/* A range whose refcounts drop once the entries that dropped it are on disk. */
struct pending_free {
    uint64_t off, len;   /* host bytes; every cluster touched loses one reference */
};

struct qcow2_image {
    enum qcow2_format fmt;
    struct vfs_file *file;       /* the image file */
    struct vfs_file *data;       /* external data file, or == file */
    struct qcow2_image *backing; /* owned, or NULL */
    char *uri;
    char *given_name;            /* the name the caller passed (for info's filename) */
    uint64_t size;               /* guest size seen by reads (a snapshot's in a view) */
    uint64_t file_size;
    int depth;                   /* 0 for the top image */
    bool checking;               /* opened for check (allow_corrupt): snapshots with bad L1 tables are kept */

    /* qcow2 */
    struct qcow2_disk_header h;  /* CPU order */
    unsigned cluster_bits;
    uint32_t cluster_size;
    uint32_t l2_entry_words;     /* 1 standard, 2 extended */
    uint32_t l2_entries;         /* entries per L2 table */
    unsigned l2_bits;            /* log2(l2_entries) */
    bool ext_l2;
    uint32_t sc_size;            /* subcluster size (== cluster size without ext L2) */
    unsigned sc_bits;
    unsigned csize_shift;
    uint64_t csize_mask, coffset_mask;
    uint64_t *l1;                /* active (or snapshot) L1, CPU order */
    uint32_t l1_size;
    uint64_t *reftable;          /* CPU order */
    uint32_t reftable_size;      /* entries */
    unsigned refcount_bits;
    struct l2_cache cache;
    bool meta_prealloc;          /* QEMU's heuristic: host holes in data clusters report as zero */
    bool meta_prealloc_known;
    pthread_mutex_t prealloc_lock;

    char *backing_name, *backing_fmt, *data_name;
    char *backing_uri, *data_uri;
    char *feature_table;         /* raw feature name table (48-byte entries) */
    uint32_t feature_table_len;
    uint64_t crypto_off, crypto_len;
    struct qcow2_luks_info luks; /* valid when has_luks */
    bool has_luks;
    uint32_t nb_bitmaps;
    uint64_t bitmap_dir_off, bitmap_dir_size;
    struct qcow2_snapshot_info *snaps;
    uint32_t nb_snaps;
    uint64_t snap_table_len;     /* bytes of the snapshot table */
    struct qcow2_bitmap_info *bitmaps;
    uint64_t bitmaps_held;       /* bytes of bitmaps[] and its names charged to the budget */
    struct qcow2_info info;

    uint64_t meta_max;           /* budget: bytes of metadata the chain may hold in memory */
    _Atomic uint64_t meta_used;  /* charged so far (L1, refcount table, snapshots, bitmaps) */
    struct qcow2_image *acct;    /* a backing layer: the top, whose budget it charges; else NULL */

    uint64_t id;                 /* unique among the images opened by this process */
    _Atomic uint64_t write_gen;  /* bumped by every change (qcow2_note_change): readers' cached host
                                    bytes expire, and it is the generation of qcow2_get_changes */
    pthread_mutex_t change_lock; /* the change record below, and write_gen's bumps */
    uint64_t snap_gen;           /* changes of the snapshot table (and repairs) */
    int64_t opened_sec;          /* CLOCK_REALTIME second of the open */
    int64_t changed_sec;         /* of the last change, 0 before the first */
    int64_t before_sec;          /* of the change before the last (or the open) */

    /* writing (img->rw only; all under rwlock held for writing) */
    bool rw;
    pthread_rwlock_t rwlock;     /* readers shared; writers and flushes exclusive */
    struct rb_entry rbc[RB_CACHE_ENTRIES];
    uint64_t rb_tick;
    uint64_t free_hint;          /* first cluster index that may be free */
    uint32_t l1_dirty_lo, l1_dirty_hi; /* entries [lo, hi) changed in memory */
    struct pending_free *pending;
    size_t npending, cap_pending;
    uint64_t cfree_off, cfree_end; /* room left in the last compressed-data cluster */
    bool release_data;             /* opened with release_data: data written once is vfs_release'd */
    uint64_t crun_off, crun_end;   /* release_data: host clusters of the compressed data being packed */
    bool write_started;          /* first-write header duties done (autoclear, dirty bit) */
    bool set_dirty_bit;          /* we set the dirty bit (lazy refcounts): clear on close */
    bool broken;                 /* an inconsistency was found: writes refused */
    bool no_sync;                /* cache=unsafe: order writes, but never wait for the disk */
    bool unsynced;               /* something was written since the last completed flush */
    struct bm_track *bm;         /* per bitmap, parallel to bitmaps[] */
    bool bm_loaded;              /* tracking set up by the first write */
    pthread_mutex_t bm_lock;     /* readers filling the read cache of bm[] (under the read lock) */
    struct bm_window bmw;        /* dirty queries of stored bitmaps (under bm_lock) */
    const uint32_t *repair_expected; /* during repair: true refcounts, so new blocks avoid used clusters */
    uint64_t repair_n;
    bool keep_freed;             /* freed clusters are not discarded (a truncate follows) */
    bool defer_frees;            /* pending frees wait (a commit: other handles may still read them) */

    /* pinned runs (pin.c): readers that send host bytes after dropping the lock */
    _Atomic unsigned pins[2];    /* outstanding pins, by the parity of their epoch */
    uint64_t pin_epoch;          /* changes only under the write lock */
    struct quarantined *quar;    /* freed while pins were out: not reused or discarded yet */
    size_t nquar, cap_quar;
    uint64_t quar_floor;         /* while nquar or quar_lost: allocations start at this cluster or above */
    bool quar_lost;              /* a freed cluster could not be recorded (out of memory) */
    _Atomic bool pins_off;       /* a freed cluster could not be punched: no more pins */
    uint64_t *sent;              /* bit per host cluster: handed to the kernel since it was allocated */
    uint64_t sent_words;         /* pinning readers change both under sent_lock; writers read them */
    pthread_mutex_t sent_lock;   /* (writers exclude pinning readers: the image lock) */
};

/* ---- index helpers ---- */
static inline uint64_t offset_into_cluster(const struct qcow2_image *img, uint64_t off)
{
    return off & (img->cluster_size - 1);
}
/* A bitmap table entry QEMU refuses to load: reserved bits set, a misaligned
 * cluster, or the all-ones flag beside a cluster. */
static inline bool bme_table_entry_bad(const struct qcow2_image *img, uint64_t e)
{
    uint64_t off = e & BME_TABLE_OFFSET_MASK;
    return (e & BME_TABLE_RESERVED) || offset_into_cluster(img, off) || ((e & BME_TABLE_ALL_ONES) && off);
}
static inline uint64_t offset_to_l1_index(const struct qcow2_image *img, uint64_t off)
{
    return off >> (img->cluster_bits + img->l2_bits);
}
static inline uint32_t offset_to_l2_index(const struct qcow2_image *img, uint64_t off)
{
    return (uint32_t)((off >> img->cluster_bits) & (img->l2_entries - 1));
}
static inline unsigned offset_to_sc_index(const struct qcow2_image *img, uint64_t off)
{
    return (unsigned)(offset_into_cluster(img, off) >> img->sc_bits);
}
/* Clusters one refcount block describes. */
static inline uint64_t rc_reach(const struct qcow2_image *img)
{
    return ((uint64_t)img->cluster_size * 8) >> img->h.refcount_order;
}
static inline uint64_t size_to_clusters(const struct qcow2_image *img, uint64_t size)
{
    return (size >> img->cluster_bits) + ((size & (img->cluster_size - 1)) != 0);
}
static inline uint64_t be64_at(const void *p)
{
    uint64_t v;
    __builtin_memcpy(&v, p, 8);
    return be64toh(v);
}
static inline uint32_t be32_at(const void *p)
{
    uint32_t v;
    __builtin_memcpy(&v, p, 4);
    return be32toh(v);
}
static inline uint16_t be16_at(const void *p)
{
    uint16_t v;
    __builtin_memcpy(&v, p, 2);
    return be16toh(v);
}

/* Entry i of a refcount block in its on-disk form (big-endian; sub-byte widths
 * from the least significant bit). */
static inline uint64_t qcow2_refcount_entry(const unsigned char *b, uint64_t i, unsigned bits)
{
    if (bits < 8)
        return (b[i * bits / 8] >> (i * bits % 8)) & ((1u << bits) - 1);
    uint64_t v = 0;
    for (unsigned k = 0; k < bits / 8; k++)
        v = (v << 8) | b[i * (bits / 8) + k];
    return v;
}

/* Sets entry i of a refcount block in its on-disk form to v. */
static inline void qcow2_refcount_entry_set(unsigned char *b, uint64_t i, unsigned bits, uint64_t v)
{
    if (bits < 8) {
        unsigned shift = (unsigned)(i * bits % 8), mask = ((1u << bits) - 1) << shift;
        b[i * bits / 8] = (unsigned char)((b[i * bits / 8] & ~mask) | ((v << shift) & mask));
        return;
    }
    for (unsigned k = bits / 8; k-- > 0;) {
        b[i * (bits / 8) + k] = (unsigned char)v;
        v >>= 8;
    }
}

/* ---- header.c ---- */
/* Read and validate the header and its extensions into img (img->file open). */
int qcow2_read_header(struct qcow2_image *img);
/* Name of incompatible bit `bit` from the feature name table, or NULL. */
const char *qcow2_feature_name(const struct qcow2_image *img, int type, int bit, char *buf, size_t len);

/* ---- table.c ---- */
/* Check a table of `entries` entries of `esize` bytes at `off`: aligned to the cluster,
 * no overflow, inside the file, and under max_bytes. `what` names it in errors. */
int qcow2_check_table(const struct qcow2_image *img, uint64_t off, uint64_t entries, uint32_t esize,
                      uint64_t max_bytes, const char *what);
/* "512 MiB", "1.5 GiB", "300 KiB", "12 bytes": a size for messages. */
const char *qcow2_human(uint64_t bytes, char *buf, size_t len);
/* The metadata budget (img->meta_max). meta_charge counts bytes of `what` held
 * from now on, or fails with -ENOTSUP and a message naming the budget and its
 * value; meta_fits only checks (transient buffers); meta_release gives back.
 * Thread-safe. */
int meta_charge(struct qcow2_image *img, uint64_t bytes, const char *what);
int meta_fits(struct qcow2_image *img, uint64_t bytes, const char *what);
void meta_release(struct qcow2_image *img, uint64_t bytes);
/* Charge without a check (tables already checked through another handle). */
void meta_force(struct qcow2_image *img, uint64_t bytes);
uint64_t meta_headroom(struct qcow2_image *img);
/* Load a table of big-endian u64 into a new CPU-order array (free()). */
int qcow2_load_u64_table(struct qcow2_image *img, uint64_t off, uint32_t entries, uint64_t **out);

/* ---- cache.c ---- */
int l2_cache_init(struct l2_cache *c, size_t bytes, uint32_t slice_bytes);
void l2_cache_destroy(struct l2_cache *c);
/* Borrow the slice at host offset key (slice_bytes long), loading it from img's file.
 * On success *out is borrowed until l2_cache_put. Thread-safe. */
int l2_cache_get(struct qcow2_image *img, uint64_t key, struct l2_slice **out);
void l2_cache_put(struct qcow2_image *img, struct l2_slice *s);

/* ---- cluster.c ---- */
/* Map guest offset off (at most `bytes` ahead) through l1 of img. Thread-safe. */
int qcow2_get_mapping(struct qcow2_image *img, uint64_t off, uint64_t bytes, struct mapping *m);
/* m is the SC_COMPRESSED mapping of guest offset off: the host offset where the
 * compressed bytes of the clusters that follow it in [off, off+bytes) stop
 * lying one after the other, so one read of [m->coff, end) serves them all.
 * The run stays within one L2 slice and cap bytes; at least m->coff + m->csize.
 * Errors only shorten the run. Thread-safe. */
uint64_t qcow2_compressed_run_end(struct qcow2_image *img, uint64_t off, uint64_t bytes, const struct mapping *m,
                                  uint64_t cap);

/* ---- compress.c ---- */
/* Decompress src (len bytes) into exactly dst_len bytes of dst. */
int qcow2_decompress(int type, const void *src, size_t len, void *dst, size_t dst_len);

/* ---- refcount.c ---- */
/* Refcount of host cluster index `cluster`. */
int qcow2_get_refcount(struct qcow2_image *img, uint64_t cluster, uint64_t *refcount);
/* QEMU's metadata-preallocation heuristic, computed once. */
bool qcow2_meta_prealloc(struct qcow2_image *img);

/* ---- rcache.c: refcounts for writers (under the write lock) ---- */
int rc_get(struct qcow2_image *img, uint64_t cluster, uint64_t *val);
/* The refcount block at host offset off as the cache has it (borrowed: valid
 * until the next rc_ call); -EUCLEAN-like error for a block outside the file. */
int rc_block(struct qcow2_image *img, uint64_t off, const unsigned char **buf);
/* Make sure a refcount block covers cluster (the new block may take a free cluster). */
int rc_cover(struct qcow2_image *img, uint64_t cluster);
/* Set the refcount of cluster; allocates refcount blocks (and grows the table) as needed. */
int rc_set(struct qcow2_image *img, uint64_t cluster, uint64_t val);
/* Add delta (+1/-1) to every cluster touched by host bytes [off, off+len). */
int rc_update_range(struct qcow2_image *img, uint64_t off, uint64_t len, int delta);
/* Write dirty refcount blocks (no flush). */
int rc_writeback(struct qcow2_image *img);
void rc_cache_drop(struct qcow2_image *img);
uint64_t rc_max(const struct qcow2_image *img);

/* ---- alloc.c ---- */
/* Allocate n contiguous free clusters with refcount 1; *off is the first. */
int alloc_clusters(struct qcow2_image *img, uint64_t n, uint64_t *off);
/* Allocate bytes for compressed data (may share a cluster with earlier data). */
int alloc_compressed(struct qcow2_image *img, uint64_t bytes, uint64_t *off);
/* Queue host bytes [off, off+len) to lose one reference after the next metadata write. */
int free_later(struct qcow2_image *img, uint64_t off, uint64_t len);
/* Under release_data: host bytes [off, off+len) of the image file hold guest data
 * just written whole into clusters allocated for it, which nothing will read or
 * write again: vfs_release them. 0 without release_data. */
int release_written(struct qcow2_image *img, uint64_t off, uint64_t len);

/* ---- pin.c (under the write lock) ---- */
/* Cluster c's refcount just dropped to 0: give it back to the allocator and the
 * host now, or later when pins may still send its bytes. */
void pin_freed(struct qcow2_image *img, uint64_t c);
/* Release what quarantine no pin can still read; all of it when all is true
 * (closing: no pins are out). */
void pin_drain(struct qcow2_image *img, bool all);
/* Whether host cluster c was pinned since it was allocated: the kernel may still
 * hold its page cache pages for a socket, so new data must not be written over
 * it in place (the write copies the cluster instead). */
bool pin_was_sent(const struct qcow2_image *img, uint64_t c);
/* Refuse a write of metadata or data over the header, tables or snapshot/bitmap
 * metadata; marks the image corrupt when it would. */
int overlap_check(struct qcow2_image *img, uint64_t off, uint64_t len, const char *what);

/* ---- flush.c ---- */
/* vfs_flush, unless the image was opened with cache_unsafe. Writes are still
 * ordered in the page cache, so a killed process leaves a consistent image;
 * only a power loss can tear it. */
static inline int qcow2_sync(struct qcow2_image *img, struct vfs_file *f)
{
    /* A store whose flush publishes everything atomically (VFS_CAP_ATOMIC_FLUSH)
     * needs no flush to order writes: every version it can show is a prefix of
     * the writes. qcow2_durable makes the writes durable where that is asked. */
    if (img->no_sync || (vfs_caps(f) & VFS_CAP_ATOMIC_FLUSH))
        return 0;
    return vfs_flush(f);
}
/* The flush that qcow2_sync left out on VFS_CAP_ATOMIC_FLUSH stores, at the end
 * of qcow2_flush and of a clean close; nothing on other stores. */
int qcow2_durable(struct qcow2_image *img);
/* Write everything cached in order (see qcow2.h); with sync, end with a flush. */
int meta_flush(struct qcow2_image *img);
/* Write a header field (big-endian, size 4 or 8) at byte offset off and flush. */
int header_write(struct qcow2_image *img, uint64_t off, uint64_t value, unsigned size);
/* Set the corrupt bit (best effort) and refuse further writes; returns -EUCLEAN. */
int mark_corrupt(struct qcow2_image *img, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Header duties before the first write: clear unknown autoclear bits, set the
 * dirty bit for lazy refcounts. */
int begin_write(struct qcow2_image *img);
/* Clean close: flush, clear the dirty bit we set. */
int finish_write(struct qcow2_image *img);

/* ---- cache.c (writer side) ---- */
void l2_cache_mark_dirty(struct qcow2_image *img, struct l2_slice *s);
/* Write dirty slices (no flush). */
int l2_cache_writeback(struct qcow2_image *img);
/* Forget cached slices of the L2 table at off (after it is freed); off 0: every slice. */
void l2_cache_forget(struct qcow2_image *img, uint64_t table_off);

/* ---- read.c ---- */
/* Read guest bytes without taking the image lock (writers use it for copy-on-write). */
int qcow2_read_unlocked(struct qcow2_image *img, void *buf, uint64_t len, uint64_t off);

/* ---- write.c ---- */
/* Borrow the L2 slice for guest offset off, ready to change (allocating or
 * copying the L2 table as needed); *idx is the entry within the slice. */
int qcow2_l2_for_write(struct qcow2_image *img, uint64_t off, struct l2_slice **sp, uint32_t *idx);
/* Queue the references an L2 entry holds (data cluster or compressed bytes) to drop
 * after the next metadata write (free_later). */
int release_entry(struct qcow2_image *img, uint64_t l2e);
/* Note L1 entry i as changed in memory (written by the next metadata flush). */
void l1_mark(struct qcow2_image *img, uint32_t i);

/* ---- create.c ---- */
/* Give every guest cluster of a new image an L2 entry and a host cluster. */
int qcow2_preallocate(const char *uri);

/* ---- check.c ---- */
/* Recount every reference and rewrite refcounts that differ (dirty images). */
int qcow2_repair_refcounts(struct qcow2_image *img);

/* ---- bitmap.c (writer side) ---- */
/* First write: load enabled bitmaps and mark them in_use on disk. */
int bitmaps_begin(struct qcow2_image *img);
/* Record a guest write/zero/discard of [off, off+len) in the tracked bitmaps. */
void bitmaps_mark(struct qcow2_image *img, uint64_t off, uint64_t len);
/* Store tracked bitmaps and clear their in_use flag (close). */
int bitmaps_store(struct qcow2_image *img);

/* ---- snapshot.c ---- */
/* Parse the snapshot table into img (charged to the budget). */
int qcow2_read_snapshots(struct qcow2_image *img);
/* Where each of the n entries of the table in buf[0, len) starts; starts[n] is
 * the table's end. -EINVAL when it does not parse. */
int snap_table_starts(const unsigned char *buf, uint64_t len, uint32_t n, uint64_t *starts);
void qcow2_free_snapshots(struct qcow2_image *img);
/* ---- snapmod.c ---- */
/* Check -r all (the image lock held, refcounts right): write the snapshot table anew
 * from the parsed entries, each with the extra data version 3 wants, as qemu-img's
 * repair does; the old table's clusters are freed where they have a refcount. */
int qcow2_snapshot_table_rewrite(struct qcow2_image *img);
/* Switch img to the read-only view of snapshot `name` (matched by id, then name). */
int qcow2_use_snapshot(struct qcow2_image *img, const char *name);

/* ---- image.c (commit) ---- */
/* Re-read what a writer through another handle changed in layer img (header,
 * L1 and refcount tables, sizes) and drop its cached L2 slices. The caller keeps
 * every reader of img out. On failure img is unchanged. */
int qcow2_refresh_layer(struct qcow2_image *img);

/* ---- changes.c ---- */
void qcow2_changes_init(struct qcow2_image *img);
/* Record a change about to be made through img (under its write lock, or
 * before the write of a raw image): the generation moves on; snapshots: the
 * snapshot table changes too. */
void qcow2_note_change(struct qcow2_image *img, bool snapshots);

/* ---- bitmap.c ---- */
int qcow2_read_bitmaps(struct qcow2_image *img);
void qcow2_free_bitmaps(struct qcow2_image *img);
/* The bits of bitmap b from disk into a new buffer of table_size clusters (tail bits clear). */
int bitmap_load_bits(struct qcow2_image *img, const struct qcow2_bitmap_info *b, unsigned char **out);
/* Make img->bm exist (one zeroed track per bitmap). */
int bitmap_tracks(struct qcow2_image *img);
/* Check that bitmaps in memory plus `extra` bytes for bitmap b fit the budget. */
int bitmap_bits_fit(struct qcow2_image *img, const char *name, uint64_t extra);
/* Forget the window of stored bitmaps (a table or the directory changed). */
void bitmap_window_reset(struct qcow2_image *img);
/* Index of the bitmap called name, or -1. */
int bitmap_find(const struct qcow2_image *img, const char *name);
/* Bit k of a bitmap buffer. */
static inline bool bm_bit(const unsigned char *bits, uint64_t k)
{
    return bits[k / 8] >> (k % 8) & 1;
}

#endif
