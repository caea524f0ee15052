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
    bool read_write;           /* false: read-only (the only mode for now) */
    bool no_backing;           /* do not open the backing chain (unallocated reads as zero) */
    bool contained;            /* backing/data file names must stay inside the image's store */
    size_t l2_cache_bytes;     /* 0: QCOW2_DEFAULT_L2_CACHE */
    unsigned max_chain_depth;  /* 0: QCOW2_DEFAULT_CHAIN_DEPTH */
    uint64_t max_meta_bytes;   /* 0: no extra bound; else refuse images whose tables need more */
};

#define QCOW2_DEFAULT_L2_CACHE (4u << 20)
#define QCOW2_DEFAULT_CHAIN_DEPTH 64

/* Open uri with opts (NULL for defaults). On success *out is a new image the caller
 * closes; on failure *out is unchanged, the return is a negative errno and
 * err_msg() names the problem ("L1 table at 0x30008 is not cluster aligned").
 * -EINVAL/-EUCLEAN-like format errors use -EINVAL, unsupported features -ENOTSUP,
 * storage errors the backend's errno. */
int qcow2_open(const char *uri, const struct qcow2_open_opts *opts, struct qcow2_image **out);
void qcow2_close(struct qcow2_image *img);

/* Guest size in bytes (of the snapshot when opened on one). */
uint64_t qcow2_size(const struct qcow2_image *img);

/* Read len guest bytes at off into buf; off+len must be within the size.
 * Thread-safe: many threads may read one image at once. Returns 0 or -errno
 * (a corrupt mapping fails only the read that meets it). */
int qcow2_pread(struct qcow2_image *img, void *buf, size_t len, uint64_t off);

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
    bool in_use, auto_, consistent;
    uint8_t type;
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

/* The backing image of img, or NULL (borrowed). */
struct qcow2_image *qcow2_backing(const struct qcow2_image *img);

#endif
