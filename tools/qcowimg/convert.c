/* convert.c: `qcowimg convert -O raw` and `qcowimg read`. Convert walks the
 * allocation map once, then worker threads read and write chunks in parallel
 * (compressed clusters decompress on every core); zero ranges stay holes. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "err.h"
#include "qcowimg.h"
#include "vfs.h"

/* The unit of work: 1 MiB, or one output cluster if that is larger. Writing a
 * new raw file in 2 MiB pieces took 2-3x the kernel time of 1 MiB pieces on the
 * 2-core test VM (for 1 GiB of output, 0.8-2.2 s of system time against
 * 0.32-0.41 s; 256 and 512 KiB were no better than 1 MiB). */
#define CHUNK (1u << 20)
#define MAX_THREADS 16

struct chunk {
    uint64_t off, len;
};

struct job {
    struct qcow2_image *img;
    struct vfs_file *out;        /* raw output, or NULL */
    struct qcow2_image *dst;     /* qcow2 output, or NULL */
    bool compress;
    uint32_t grid;               /* output cluster size (1 for raw) */
    uint64_t chunk;              /* bytes per chunk: CHUNK, or grid when larger */
    struct chunk *chunks;
    size_t nchunks;
    atomic_size_t next;
    atomic_uint_fast64_t done_bytes;
    uint64_t total_bytes;
    atomic_int failed;
    pthread_mutex_t err_lock;
    pthread_mutex_t out_lock;    /* one raw write at a time (see emit) */
    struct err_saved err;        /* the first failure (under err_lock) */
};

static bool all_zero(const unsigned char *p, size_t n)
{
    /* word at a time; the buffer is malloc-aligned and n a multiple of 512 mostly */
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        if (w)
            return false;
    }
    for (; i < n; i++)
        if (p[i])
            return false;
    return true;
}

static void record_error(struct job *j, int ret, const char *what)
{
    pthread_mutex_lock(&j->err_lock);
    if (!j->failed) {
        err_save(&j->err, what ? err_prefix(ret, "%s", what) : ret);
        atomic_store(&j->failed, 1);
    }
    pthread_mutex_unlock(&j->err_lock);
}

/* Write one chunk of guest bytes to the output, leaving zero blocks out. For
 * raw, 4 KiB blocks of zeroes stay holes, as qemu-img does; for qcow2, clusters
 * of zeroes stay unallocated and the others are written (compressed with -c). */
static int emit(struct job *j, unsigned char *buf, uint64_t len, uint64_t off)
{
    uint64_t blk = j->dst ? j->grid : 4096;
    unsigned char *cbuf = NULL;
    int ret = 0;
    for (uint64_t p = 0; p < len && ret == 0;) {
        uint64_t n = len - p < blk ? len - p : blk;
        if (all_zero(buf + p, n)) {
            p += n;
            continue;
        }
        if (j->compress) {
            size_t cap = j->grid - 512;
            if (!cbuf && !(cbuf = malloc(cap))) {
                ret = err_fail(ENOMEM, "out of memory");
                break;
            }
            long cl = -1;
            if (n == j->grid) /* compress here, in this thread; only the store takes the lock */
                cl = qcow2_compress_cluster(j->dst, buf + p, n, cbuf, cap);
            if (cl > 0)
                ret = qcow2_write_compressed_raw(j->dst, off + p, cbuf, (size_t)cl);
            else if (cl == 0)
                ret = qcow2_pwrite(j->dst, buf + p, n, off + p);
            else
                ret = qcow2_pwrite_compressed(j->dst, buf + p, n, off + p); /* the short tail */
            if (ret < 0)
                record_error(j, ret, "writing the output");
            p += n;
            continue;
        }
        uint64_t q = p + n;
        while (q < len) {
            uint64_t m = len - q < blk ? len - q : blk;
            if (all_zero(buf + q, m))
                break;
            q += m;
        }
        if (j->dst) {
            ret = qcow2_pwrite(j->dst, buf + p, q - p, off + p);
        } else {
            /* Writers to one file serialise on its inode lock in the kernel, where
             * a waiter spins and burns the CPU another worker would use to read or
             * decompress: queue them here instead, where waiting sleeps. */
            pthread_mutex_lock(&j->out_lock);
            ret = vfs_pwrite(j->out, buf + p, q - p, off + p);
            pthread_mutex_unlock(&j->out_lock);
        }
        if (ret < 0)
            record_error(j, ret, "writing the output");
        p = q;
    }
    free(cbuf);
    return ret;
}

static void *worker(void *arg)
{
    struct job *j = arg;
    unsigned char *buf = malloc(j->chunk);
    if (!buf) {
        record_error(j, err_fail(ENOMEM, "out of memory"), NULL);
        return NULL;
    }
    for (;;) {
        size_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->nchunks || atomic_load(&j->failed))
            break;
        struct chunk *c = &j->chunks[i];
        int ret = qcow2_pread(j->img, buf, c->len, c->off);
        if (ret < 0) {
            record_error(j, ret, NULL);
            break;
        }
        if ((ret = emit(j, buf, c->len, c->off)) < 0)
            goto out;
        atomic_fetch_add(&j->done_bytes, c->len);
    }
out:
    free(buf);
    return NULL;
}

/* The ranges that may hold non-zero data, cut into chunks of at most `chunk` bytes
 * (a multiple of grid). */
static int plan_chunks(struct qcow2_image *img, uint64_t size, uint64_t grid, uint64_t chunk, struct chunk **out, size_t *n,
                       uint64_t *total)
{
    size_t cap = 1024, cnt = 0;
    struct chunk *v = malloc(cap * sizeof *v);
    uint64_t off = 0;
    *total = 0;
    if (!v)
        return err_fail(ENOMEM, "out of memory");
    while (off < size) {
        struct qcow2_extent e;
        int ret = qcow2_block_status(img, off, size - off, &e);
        if (ret < 0) {
            free(v);
            return ret;
        }
        if (!e.zero) {
            /* on the output's cluster grid, so compressed clusters are whole */
            uint64_t s = e.start / grid * grid, end = (e.start + e.length + grid - 1) / grid * grid;
            if (end > size)
                end = size;
            if (cnt && s < v[cnt - 1].off + v[cnt - 1].len)
                s = v[cnt - 1].off + v[cnt - 1].len;
            while (s < end) {
                /* extend the previous chunk when contiguous and not full */
                if (cnt && v[cnt - 1].off + v[cnt - 1].len == s && v[cnt - 1].len < chunk) {
                    uint64_t add = end - s < chunk - v[cnt - 1].len ? end - s : chunk - v[cnt - 1].len;
                    v[cnt - 1].len += add;
                    s += add;
                    continue;
                }
                if (cnt == cap) {
                    cap *= 2;
                    struct chunk *nv = realloc(v, cap * sizeof *v);
                    if (!nv) {
                        free(v);
                        return err_fail(ENOMEM, "out of memory");
                    }
                    v = nv;
                }
                uint64_t len = end - s < chunk ? end - s : chunk;
                v[cnt++] = (struct chunk){s, len};
                s += len;
            }
            *total += e.length;
        }
        off += e.length;
    }
    *out = v;
    *n = cnt;
    return 0;
}

static const char *snapshot_arg(const char *a)
{
    if (!strncmp(a, "snapshot.name=", 14))
        return a + 14;
    if (!strncmp(a, "snapshot.id=", 12))
        return a + 12;
    return a;
}

int cmd_convert(int argc, char **argv)
{
    static const struct option lo[] = {{"help", no_argument, 0, 'h'}, {"force-share", no_argument, 0, 'U'}, {0, 0, 0, 0}};
    const char *fmt = NULL, *ofmt = "raw", *snap = NULL;
    bool progress = false, sync = false, compress = false;
    long threads = 0;
    char *optstr[16];
    int nopt = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "f:O:l:s:pm:t:T:o:chUW", lo, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'O': ofmt = optarg; break;
        case 'c': compress = true; break;
        case 'o':
            if (nopt == 16)
                return fail("convert", "too many -o options");
            optstr[nopt++] = optarg;
            break;
        case 'l':
        case 's': snap = snapshot_arg(optarg); break;
        case 'p': progress = true; break;
        case 'm': threads = strtol(optarg, NULL, 10); break;
        case 't': /* as qemu-img: the default (unsafe) never flushes; the others flush at the end */
            if (strcmp(optarg, "unsafe") && strcmp(optarg, "writeback") && strcmp(optarg, "none") &&
                strcmp(optarg, "writethrough") && strcmp(optarg, "directsync"))
                return fail("convert", "unknown cache mode '%s'", optarg);
            sync = strcmp(optarg, "unsafe") != 0;
            break;
        case 'T': break; /* source cache mode: reads need none */
        case 'U':
        case 'W': break;
        case 'h':
            printf("usage: qcowimg convert [-f qcow2|raw] -O raw|qcow2 [-c] [-o OPTIONS] [-l snapshot.name=S] [-p]\n"
                   "                       [-m THREADS] [-t CACHE] SRC DST\n"
                   "  -O qcow2  a new qcow2 image (create options with -o, as qemu-img's); -c compresses\n"
                   "            its clusters, on every thread\n"
                   "  -t CACHE  unsafe (default: no flush, as qemu-img), or writeback/none/writethrough/directsync:\n"
                   "            flush the output before exiting\n");
            return 0;
        default: return 1;
        }
    }
    if (optind != argc - 2)
        return fail("convert", "expected SRC and DST (see --help)");
    bool to_qcow2 = !strcmp(ofmt, "qcow2");
    if (!to_qcow2 && strcmp(ofmt, "raw"))
        return fail("convert", "output format must be raw or qcow2, not '%s'", ofmt);
    if (!to_qcow2 && (compress || nopt))
        return fail("convert", "-c and -o need -O qcow2");
    struct qcow2_create_opts co = {0};
    for (int i = 0; i < nopt; i++)
        if (parse_create_opts(argv[argc - 1], optstr[i], &co))
            return 1;
    if (threads < 0 || threads > MAX_THREADS)
        return fail("convert", "-m takes 1 to %d threads", MAX_THREADS);
    const char *src = argv[optind], *dst = argv[optind + 1];
    struct qcow2_image *img;
    if (open_image(src, fmt, snap, &img))
        return 1;
    int rc = 1;
    uint64_t out_size = snap ? qcow2_get_info(img)->virtual_size : qcow2_size(img);
    struct job j = {.img = img, .compress = compress, .grid = 1};
    pthread_mutex_init(&j.err_lock, NULL);
    pthread_mutex_init(&j.out_lock, NULL);
    int ret;
    if (to_qcow2) {
        co.size = out_size;
        struct qcow2_open_opts oo = {.read_write = true, .cache_unsafe = !sync};
        vfs_remove(dst); /* like qemu-img: the target is made anew */
        ret = qcow2_create(dst, &co);
        if (ret == 0)
            ret = qcow2_open(dst, &oo, &j.dst);
        if (ret < 0) {
            fail_err(dst, ret);
            goto out;
        }
        j.grid = qcow2_get_info(j.dst)->cluster_size;
    } else {
        /* Cut an existing target to nothing first (its old bytes must not show
         * through our holes), but leave a new empty file alone: on ext4 a
         * truncate to 0 marks the file for writeback at close (auto_da_alloc),
         * which costs a whole flush of the output. */
        uint64_t old_size = 0;
        ret = vfs_open(dst, VFS_O_RDWR | VFS_O_CREATE, &j.out);
        if (ret == 0)
            ret = vfs_size(j.out, &old_size);
        if (ret == 0 && old_size > 0)
            ret = vfs_truncate(j.out, 0);
        if (ret == 0)
            ret = vfs_truncate(j.out, out_size);
        if (ret < 0) {
            fail_err(dst, ret);
            goto out;
        }
    }
    /* as qemu-img: a snapshot is copied at the image's current size (cut, or
     * padded with zeroes), whatever size it had when taken */
    uint64_t in_size = qcow2_size(img) < out_size ? qcow2_size(img) : out_size;
    j.chunk = j.grid > CHUNK ? j.grid : CHUNK;
    ret = plan_chunks(img, in_size, j.grid, j.chunk, &j.chunks, &j.nchunks, &j.total_bytes);
    if (ret < 0) {
        fail_err(src, ret);
        goto out;
    }
    if (!threads) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        threads = n < 1 ? 1 : n > 8 ? 8 : n;
    }
    pthread_t tid[MAX_THREADS];
    int started = 0;
    for (long t = 0; t < threads; t++)
        if (pthread_create(&tid[started], NULL, worker, &j) == 0)
            started++;
    if (!started)
        worker(&j);
    if (progress) {
        while (atomic_load(&j.next) < j.nchunks && !atomic_load(&j.failed)) {
            double pct = j.total_bytes ? 100.0 * (double)atomic_load(&j.done_bytes) / (double)j.total_bytes : 100.0;
            fprintf(stderr, "    (%.2f/100%%)\r", pct);
            usleep(100000);
        }
    }
    for (int t = 0; t < started; t++)
        pthread_join(tid[t], NULL);
    if (progress)
        fprintf(stderr, "    (100.00/100%%)\n");
    if (j.failed) {
        fail(src, "%s", j.err.msg);
        goto out;
    }
    /* a qcow2 target always gets its metadata written (and flushed) before close */
    ret = j.dst ? qcow2_flush(j.dst) : sync ? vfs_flush(j.out) : 0;
    if (ret < 0) {
        fail_err(dst, ret);
        goto out;
    }
    rc = 0;
out:
    if (j.out)
        vfs_close(j.out);
    if (j.dst) {
        int cret = qcow2_close(j.dst);
        if (cret < 0 && rc == 0)
            rc = fail_err(dst, cret);
    }
    free(j.chunks);
    pthread_mutex_destroy(&j.err_lock);
    pthread_mutex_destroy(&j.out_lock);
    qcow2_close(img);
    return rc;
}

int cmd_read(int argc, char **argv)
{
    static const struct option lo[] = {{"help", no_argument, 0, 'h'}, {"force-share", no_argument, 0, 'U'}, {0, 0, 0, 0}};
    const char *fmt = NULL, *snap = NULL;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "f:l:hU", lo, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'l': snap = snapshot_arg(optarg); break;
        case 'U': break;
        case 'h':
            printf("usage: qcowimg read [-f qcow2|raw] [-l snapshot.name=S] IMG OFFSET LENGTH\n");
            return 0;
        default: return 1;
        }
    }
    if (optind != argc - 3)
        return fail("read", "expected IMG OFFSET LENGTH (see --help)");
    const char *file = argv[optind];
    int64_t off = parse_size(argv[optind + 1]), len = parse_size(argv[optind + 2]);
    if (off < 0)
        return fail(file, "bad offset '%s'", argv[optind + 1]);
    if (len < 0)
        return fail(file, "bad length '%s'", argv[optind + 2]);
    struct qcow2_image *img;
    if (open_image(file, fmt, snap, &img))
        return 1;
    int rc = 0;
    uint64_t size = qcow2_size(img);
    if ((uint64_t)off > size || (uint64_t)len > size - (uint64_t)off) {
        rc = fail(file, "range %" PRId64 "+%" PRId64 " is past the end of the disk (%" PRIu64 " bytes)", off, len, size);
        goto out;
    }
    size_t bufsz = 1u << 20;
    unsigned char *buf = malloc(bufsz);
    if (!buf) {
        rc = fail(file, "out of memory");
        goto out;
    }
    for (uint64_t done = 0; done < (uint64_t)len;) {
        size_t n = (uint64_t)len - done < bufsz ? (size_t)((uint64_t)len - done) : bufsz;
        int ret = qcow2_pread(img, buf, n, (uint64_t)off + done);
        if (ret < 0) {
            rc = fail_err(file, ret);
            break;
        }
        if (fwrite(buf, 1, n, stdout) != n) {
            rc = fail(file, "writing to standard output: %s", strerror(errno));
            break;
        }
        done += n;
    }
    free(buf);
    if (fflush(stdout) != 0 && rc == 0)
        rc = fail(file, "writing to standard output: %s", strerror(errno));
out:
    qcow2_close(img);
    return rc;
}
