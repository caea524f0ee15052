/* catalog.h: the daemon's image catalog: names -> qcow2 files in one folder of a
 * store, opened read-only through the engine and shared as refcounted handles. */
#ifndef QCOWD_CATALOG_H
#define QCOWD_CATALOG_H

#include <stddef.h>
#include <stdint.h>

struct qcow2_image;
struct catalog;       /* opaque: one catalog folder and its cache of open images */
struct catalog_image; /* opaque: one open image, shared; get/put */

#define CATALOG_SUFFIX       ".qcow2"
#define CATALOG_NAME_MAX     128 /* bytes in a name (without the suffix) */
#define CATALOG_DEFAULT_OPEN 64  /* open images kept cached when unused */

struct catalog_opts {
    size_t l2_cache_bytes;   /* per open image; 0: the engine's default */
    unsigned max_open;       /* unused open images kept cached; 0: CATALOG_DEFAULT_OPEN */
    uint64_t max_meta_bytes; /* refuse images whose tables need more; 0: no extra bound */
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
 * on failure nothing is returned and the return is a negative errno. Thread-safe. */
int catalog_list(struct catalog *c, char ***names, size_t *count);
void catalog_names_free(char **names, size_t count);

/* Get the open image called name: from the cache when its file has not changed
 * (size and mtime), else opened now (read-only, backing and data files contained
 * in the catalog). On success *out is a new reference the caller releases with
 * catalog_put. On failure *out is unchanged, err_msg() is set and the return is:
 * -EINVAL bad name, -ENOENT no such image, and for an image that cannot be used
 * -EUCLEAN (corrupt or not qcow2), -ENOTSUP (unsupported feature), -EPERM (its
 * chain leaves the catalog), -ELOOP (backing loop or too deep), -ENXIO (a backing
 * or data file is missing), or another storage errno. Failures are cached too, so
 * a broken image costs one stat per call until its file changes. Thread-safe. */
int catalog_get(struct catalog *c, const char *name, struct catalog_image **out);

/* Release a reference from catalog_get; the image is closed when the last one
 * goes and the cache no longer holds it. NULL is ignored. Thread-safe. */
void catalog_put(struct catalog_image *ci);

/* The engine handle (borrowed; valid until catalog_put) and the name. */
struct qcow2_image *catalog_image_qcow2(const struct catalog_image *ci);
const char *catalog_image_name(const struct catalog_image *ci);

/* Number of images open now (cached or in use). Thread-safe. */
unsigned catalog_open_count(struct catalog *c);

#endif
