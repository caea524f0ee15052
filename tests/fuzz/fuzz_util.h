/* fuzz_util.h: what the fuzz targets share: CHECK for a broken promise of an API,
 * and putting an input's bytes into a mem: object. */
#ifndef QCOWD_FUZZ_UTIL_H
#define QCOWD_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "vfs.h"

/* A broken promise of the API: crash so libFuzzer keeps the input. */
#define CHECK(cond)           \
    do {                      \
        if (!(cond))          \
            __builtin_trap(); \
    } while (0)

/* Make the object uri hold exactly data[0, size); aborts when the store fails
 * (the harness is broken then, not the code under test). */
static inline void fuzz_put_file(const char *uri, const uint8_t *data, size_t size)
{
    struct vfs_file *f = NULL;
    if (vfs_open(uri, VFS_O_RDWR | VFS_O_CREATE, &f) < 0)
        abort();
    if (vfs_truncate(f, 0) < 0 || (size && vfs_pwrite(f, data, size, 0) < 0))
        abort();
    vfs_close(f);
}

/* Objects of the mem: store grow to 64 MiB at most: an image that names a
 * cluster far past its end grows a sparse file on disk, but a buffer in memory
 * here, and the fuzzer's memory limit is for the code under test. */
#define FUZZ_MEM_MAX_OBJECT "67108864"

static inline void fuzz_limit_mem(void)
{
    if (vfs_config("mem", "max-object", FUZZ_MEM_MAX_OBJECT) < 0)
        abort();
}

#endif
