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

#define CHUNK (2u << 20)
#define MAX_THREADS 16

struct chunk {
    uint64_t off, len;
};

struct job {
    struct qcow2_image *img;
    struct vfs_file *out;
    struct chunk *chunks;
    size_t nchunks;
    atomic_size_t next;
    atomic_uint_fast64_t done_bytes;
    uint64_t total_bytes;
    atomic_int failed;
    pthread_mutex_t err_lock;
    char err[ERR_MSG_MAX];
    int err_code;
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
        snprintf(j->err, sizeof j->err, "%s%s", what, err_msg(ret));
        j->err_code = ret;
        atomic_store(&j->failed, 1);
    }
    pthread_mutex_unlock(&j->err_lock);
}

static void *worker(void *arg)
{
    struct job *j = arg;
    unsigned char *buf = malloc(CHUNK);
    if (!buf) {
        record_error(j, err_fail(ENOMEM, "out of memory"), "");
        return NULL;
    }
    for (;;) {
        size_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->nchunks || atomic_load(&j->failed))
            break;
        struct chunk *c = &j->chunks[i];
        int ret = qcow2_pread(j->img, buf, c->len, c->off);
        if (ret < 0) {
            record_error(j, ret, "");
            break;
        }
        /* keep the output sparse: skip 4 KiB blocks of zeroes, as qemu-img does */
        for (uint64_t p = 0; p < c->len;) {
            uint64_t n = c->len - p < 4096 ? c->len - p : 4096;
            if (all_zero(buf + p, n)) {
                p += n;
                continue;
            }
            uint64_t q = p + n;
            while (q < c->len) {
                uint64_t m = c->len - q < 4096 ? c->len - q : 4096;
                if (all_zero(buf + q, m))
                    break;
                q += m;
            }
            ret = vfs_pwrite(j->out, buf + p, q - p, c->off + p);
            if (ret < 0) {
                record_error(j, ret, "writing the output: ");
                goto out;
            }
            p = q;
        }
        atomic_fetch_add(&j->done_bytes, c->len);
    }
out:
    free(buf);
    return NULL;
}

/* The ranges that may hold non-zero data, cut into chunks of at most CHUNK bytes. */
static int plan_chunks(struct qcow2_image *img, struct chunk **out, size_t *n, uint64_t *total)
{
    size_t cap = 1024, cnt = 0;
    struct chunk *v = malloc(cap * sizeof *v);
    uint64_t size = qcow2_size(img), off = 0;
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
            uint64_t s = e.start, end = e.start + e.length;
            while (s < end) {
                /* extend the previous chunk when contiguous and not full */
                if (cnt && v[cnt - 1].off + v[cnt - 1].len == s && v[cnt - 1].len < CHUNK) {
                    uint64_t add = end - s < CHUNK - v[cnt - 1].len ? end - s : CHUNK - v[cnt - 1].len;
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
                uint64_t len = end - s < CHUNK ? end - s : CHUNK;
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
    bool progress = false, sync = false;
    long threads = 0;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "f:O:l:s:pm:t:T:hUW", lo, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'O': ofmt = optarg; break;
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
            printf("usage: qcowimg convert [-f qcow2|raw] -O raw [-l snapshot.name=S] [-p] [-m THREADS] [-t CACHE] SRC DST\n"
                   "  -t CACHE  unsafe (default: no flush, as qemu-img), or writeback/none/writethrough/directsync:\n"
                   "            flush the output before exiting\n");
            return 0;
        default: return 1;
        }
    }
    if (optind != argc - 2)
        return fail("convert", "expected SRC and DST (see --help)");
    if (strcmp(ofmt, "raw"))
        return fail("convert", "output format '%s' is not supported yet (raw only)", ofmt);
    if (threads < 0 || threads > MAX_THREADS)
        return fail("convert", "-m takes 1 to %d threads", MAX_THREADS);
    const char *src = argv[optind], *dst = argv[optind + 1];
    struct qcow2_image *img;
    if (open_image(src, fmt, snap, &img))
        return 1;
    int rc = 1;
    struct job j = {.img = img};
    pthread_mutex_init(&j.err_lock, NULL);
    int ret = plan_chunks(img, &j.chunks, &j.nchunks, &j.total_bytes);
    if (ret < 0) {
        fail_err(src, ret);
        goto out;
    }
    ret = vfs_open(dst, VFS_O_RDWR | VFS_O_CREATE, &j.out);
    if (ret == 0)
        ret = vfs_truncate(j.out, 0);
    if (ret == 0)
        ret = vfs_truncate(j.out, qcow2_size(img));
    if (ret < 0) {
        fail_err(dst, ret);
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
        fail(src, "%s", j.err);
        goto out;
    }
    ret = sync ? vfs_flush(j.out) : 0;
    if (ret < 0) {
        fail_err(dst, ret);
        goto out;
    }
    rc = 0;
out:
    if (j.out)
        vfs_close(j.out);
    free(j.chunks);
    pthread_mutex_destroy(&j.err_lock);
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
