/* vfs_int.h: what the files of the vfs library share and nobody else sees:
 * the built-in backends' ops tables and a few small helpers. */
#ifndef QCOWD_VFS_INT_H
#define QCOWD_VFS_INT_H

#include <stddef.h>
#include <string.h>

#include "vfs_plugin.h"

/* Size of struct vfs_ops as version 1 defined it: the last v1 field is .rename.
 * A backend whose struct_size is smaller lacks mandatory fields and is refused. */
#define VFS_OPS_V1_SIZE (offsetof(struct vfs_ops, rename) + sizeof(void *))

/* Size of struct vfs_ops as version 2 defined it: the last v2 field is .stats. */
#define VFS_OPS_V2_SIZE (offsetof(struct vfs_ops, stats) + sizeof(void *))

/* Longest scheme name we accept ("file", "mem", "s3", ...). */
#define VFS_SCHEME_MAX 32

/* strerror that is safe in threads: formats into buf (GNU strerror_r), returns
 * the text. Use as vfs__errstr(e, (char[64]){0}, 64), or through VFS_ESTR. */
static inline const char *vfs__errstr(int e, char *buf, size_t n)
{
    return strerror_r(e < 0 ? -e : e, buf, n);
}
#define VFS_ESTR(e) vfs__errstr((e), (char[80]){0}, 80)

/* ---- vfs.c ---- */

/* Length of the scheme at the start of uri ("mem" in "mem:x": 3) when uri starts
 * with [a-z][a-z0-9+.-]* followed by ':'; 0 when uri is a plain path. */
size_t vfs__scheme_len(const char *uri);

/* ---- file.c ---- */
extern const struct vfs_ops vfs__file_ops;  /* "file": POSIX files */

/* ---- mem.c ---- */
extern const struct vfs_ops vfs__mem_ops;   /* "mem": named objects in memory */

/* ---- fault.c ---- */
extern const struct vfs_ops vfs__fault_ops; /* "fault": failure-injecting filter */

#endif
