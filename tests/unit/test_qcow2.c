/* test_qcow2.c: unit tests of the engine's read path on the mem backend.
 * Images are made by qemu-img/qemu-io (the oracle), copied into mem: objects,
 * and read through the engine; the expected bytes come from qemu-img's raw. */
#include <check.h>
#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../service/qcow2/cursor.h" /* private to the engine: tested here on its own */
#include "err.h"
#include "qcow2.h"
#include "vfs.h"

static char tmpdir[64];

static void sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void sh(const char *fmt, ...)
{
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char full[2300];
    snprintf(full, sizeof full, "cd %s && (%s) >/dev/null", tmpdir, cmd);
    ck_assert_msg(system(full) == 0, "command failed: %s", cmd);
}

static unsigned char *slurp(const char *name, size_t *len)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n ? (size_t)n : 1);
    ck_assert(fread(buf, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* Copy tmpdir/name into mem:t/name. */
static void to_mem(const char *name)
{
    size_t len;
    unsigned char *buf = slurp(name, &len);
    char uri[256];
    snprintf(uri, sizeof uri, "mem:t/%s", name);
    vfs_remove(uri);
    struct vfs_file *f;
    ck_assert_int_eq(vfs_open(uri, VFS_O_RDWR | VFS_O_CREATE, &f), 0);
    ck_assert_int_eq(vfs_pwrite(f, buf, len, 0), 0);
    vfs_close(f);
    free(buf);
}

/* qemu-img's view of the guest disk. */
static unsigned char *oracle(const char *name, size_t *len)
{
    sh("qemu-img convert -O raw %s %s.ref", name, name);
    char ref[256];
    snprintf(ref, sizeof ref, "%s.ref", name);
    return slurp(ref, len);
}

static void setup(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/qcow2-unit-XXXXXX");
    ck_assert(mkdtemp(tmpdir) != NULL);
}

static void teardown(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        perror("rm");
}

static void check_all(const char *name, const char *fmt)
{
    size_t rlen;
    unsigned char *ref = oracle(name, &rlen);
    to_mem(name);
    char uri[256];
    snprintf(uri, sizeof uri, "mem:t/%s", name);
    struct qcow2_open_opts o = {.format = fmt};
    struct qcow2_image *img;
    int ret = qcow2_open(uri, &o, &img);
    ck_assert_msg(ret == 0, "open %s: %s", uri, err_msg(ret));
    ck_assert_uint_eq(qcow2_size(img), rlen);
    unsigned char *buf = malloc(rlen ? rlen : 1);
    ret = qcow2_pread(img, buf, rlen, 0);
    ck_assert_msg(ret == 0, "read: %s", err_msg(ret));
    ck_assert(memcmp(buf, ref, rlen) == 0);
    /* odd-sized reads at odd offsets */
    for (size_t off = 1; off + 777 < rlen; off += 65536 + 4097) {
        ck_assert_int_eq(qcow2_pread(img, buf, 777, off), 0);
        ck_assert(memcmp(buf, ref + off, 777) == 0);
    }
    free(buf);
    free(ref);
    qcow2_close(img);
}

START_TEST(reads_plain_zero_and_compressed_clusters)
{
    sh("qemu-img create -f qcow2 a.qcow2 4M && qemu-io -c 'write -P 0xab 0 100k' -c 'write -z 128k 64k' "
       "-c 'write -c -P 0x11 1M 64k' -c 'write -P 0x22 3M 5k' a.qcow2");
    check_all("a.qcow2", NULL);
}
END_TEST

START_TEST(reads_zstd_and_extended_l2)
{
    sh("qemu-img create -f qcow2 -o compression_type=zstd,extended_l2=on,cluster_size=64k b.qcow2 2M && "
       "qemu-io -c 'write -c -P 0x33 0 64k' -c 'write -P 0x44 66k 3k' -c 'write -z 70k 2k' b.qcow2");
    check_all("b.qcow2", NULL);
}
END_TEST

/* One read over many compressed clusters: packed runs, clusters rewritten
 * elsewhere in the file (the run breaks and starts again), a plain and a zero
 * cluster in between, and L2 tables and slices crossed (4 KiB clusters). */
START_TEST(reads_runs_of_compressed_clusters_with_gaps)
{
    const char *kinds[] = {"zlib", "zstd"};
    for (int k = 0; k < 2; k++) {
        for (int cs = 4096; cs <= 65536; cs *= 16) {
            char name[64];
            snprintf(name, sizeof name, "run-%s-%d.qcow2", kinds[k], cs);
            /* a compressed write needs an unallocated cluster: discard first, and
             * qemu then puts the new bytes at the end of the file */
            sh("head -c 4700000 /dev/urandom | base64 | head -c 6M > run.raw && "
               "qemu-img convert -c -f raw -O qcow2 -o compression_type=%s,cluster_size=%d run.raw %s && "
               "qemu-io -c 'discard %d %d' -c 'write -c -P 0x77 %d %d' -c 'write -P 0x78 %d %d' "
               "-c 'write -z %d %d' -c 'discard %d %d' -c 'write -c -P 0x79 %d %d' %s",
               kinds[k], cs, name, 5 * cs, cs, 5 * cs, cs, 9 * cs, cs, 12 * cs, cs, (2 << 20) - cs, 2 * cs,
               (2 << 20) - cs, 2 * cs, name);
            check_all(name, NULL);
        }
    }
}
END_TEST

START_TEST(reads_through_a_backing_chain_in_mem)
{
    sh("qemu-img create -f raw base.raw 1M && qemu-io -f raw -c 'write -P 0x55 0 1M' base.raw && "
       "qemu-img create -f qcow2 -b base.raw -F raw mid.qcow2 2M && qemu-io -c 'write -P 0x66 64k 64k' mid.qcow2 && "
       "qemu-img create -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 && qemu-io -c 'write -z 0 4k' top.qcow2");
    to_mem("base.raw");
    to_mem("mid.qcow2");
    check_all("top.qcow2", NULL);
}
END_TEST

START_TEST(reads_a_snapshot_view)
{
    sh("qemu-img create -f qcow2 s.qcow2 1M && qemu-io -c 'write -P 1 0 64k' s.qcow2 && qemu-img snapshot -c one s.qcow2 "
       "&& qemu-io -c 'write -P 2 0 64k' s.qcow2 && qemu-img convert -l snapshot.name=one -O raw s.qcow2 s1.raw");
    to_mem("s.qcow2");
    size_t rlen;
    unsigned char *ref = slurp("s1.raw", &rlen);
    struct qcow2_open_opts o = {.snapshot = "one"};
    struct qcow2_image *img;
    ck_assert_int_eq(qcow2_open("mem:t/s.qcow2", &o, &img), 0);
    unsigned char *buf = malloc(rlen);
    ck_assert_int_eq(qcow2_pread(img, buf, rlen, 0), 0);
    ck_assert(memcmp(buf, ref, rlen) == 0);
    ck_assert_uint_eq(qcow2_get_info(img)->nb_snapshots, 1);
    ck_assert_str_eq(qcow2_get_info(img)->snapshots[0].name, "one");
    qcow2_close(img);
    o.snapshot = "nope";
    ck_assert_int_eq(qcow2_open("mem:t/s.qcow2", &o, &img), -ENOENT);
    ck_assert(strstr(err_msg(-ENOENT), "nope") != NULL);
    free(buf);
    free(ref);
}
END_TEST

START_TEST(refuses_a_file_without_magic_unless_raw)
{
    sh("head -c 65536 /dev/urandom > r.raw");
    to_mem("r.raw");
    struct qcow2_image *img;
    int ret = qcow2_open("mem:t/r.raw", NULL, &img);
    ck_assert_int_eq(ret, -EINVAL);
    ck_assert(strstr(err_msg(ret), "magic") != NULL);
    check_all("r.raw", "raw");
}
END_TEST

START_TEST(block_status_reports_zero_data_and_unallocated)
{
    sh("qemu-img create -f qcow2 m.qcow2 1M && qemu-io -c 'write -P 1 0 64k' -c 'write -z 128k 64k' m.qcow2");
    to_mem("m.qcow2");
    struct qcow2_image *img;
    ck_assert_int_eq(qcow2_open("mem:t/m.qcow2", NULL, &img), 0);
    struct qcow2_extent e;
    ck_assert_int_eq(qcow2_block_status(img, 0, 1 << 20, &e), 0);
    ck_assert(e.data && e.present && !e.zero && e.offset_valid && e.length == 65536);
    ck_assert_int_eq(qcow2_block_status(img, 65536, 1 << 20, &e), 0);
    ck_assert(!e.data && !e.present && e.zero && e.length == 65536);
    ck_assert_int_eq(qcow2_block_status(img, 131072, 1 << 20, &e), 0);
    ck_assert(!e.data && e.present && e.zero && !e.offset_valid);
    ck_assert_int_eq(qcow2_block_status(img, 1 << 20, 1, &e), -EINVAL);
    qcow2_close(img);
}
END_TEST

/* ---- many threads on one image, with a cache small enough to evict ---- */
struct reader {
    struct qcow2_image *img;
    const unsigned char *ref;
    size_t len;
    unsigned seed;
    int bad;
};

static void *read_random(void *arg)
{
    struct reader *r = arg;
    unsigned char *buf = malloc(300 * 1024);
    for (int i = 0; i < 400; i++) {
        size_t n = 1 + rand_r(&r->seed) % (300 * 1024);
        if (n > r->len)
            n = r->len;
        size_t off = (size_t)rand_r(&r->seed) % (r->len - n + 1);
        if (qcow2_pread(r->img, buf, n, off) != 0 || memcmp(buf, r->ref + off, n) != 0) {
            r->bad++;
            break;
        }
    }
    free(buf);
    return NULL;
}

START_TEST(parallel_readers_see_the_right_bytes)
{
    sh("qemu-img create -f qcow2 -o cluster_size=4k p.qcow2 16M && "
       "qemu-io -c 'write -P 7 0 3M' -c 'write -c -P 8 4M 1M' -c 'write -z 1M 100k' -c 'write -P 9 9M 5M' p.qcow2");
    size_t rlen;
    unsigned char *ref = oracle("p.qcow2", &rlen);
    to_mem("p.qcow2");
    struct qcow2_open_opts o = {.l2_cache_bytes = 4 * 4096};
    struct qcow2_image *img;
    ck_assert_int_eq(qcow2_open("mem:t/p.qcow2", &o, &img), 0);
    enum { N = 8 };
    pthread_t t[N];
    struct reader r[N];
    for (int i = 0; i < N; i++) {
        r[i] = (struct reader){.img = img, .ref = ref, .len = rlen, .seed = 1234u + (unsigned)i};
        ck_assert_int_eq(pthread_create(&t[i], NULL, read_random, &r[i]), 0);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(r[i].bad, 0);
    }
    qcow2_close(img);
    free(ref);
}
END_TEST

/* ---- one writer and many readers on one image ---- */
struct mixer {
    struct qcow2_image *img;
    unsigned char *ref; /* the writer's half: what it wrote last */
    size_t half;
    unsigned seed;
    int bad;
};

static void *write_random(void *arg)
{
    struct mixer *m = arg;
    unsigned char *buf = malloc(100 * 1024);
    for (int i = 0; i < 300; i++) {
        size_t n = 1 + rand_r(&m->seed) % (100 * 1024);
        size_t off = m->half + (size_t)rand_r(&m->seed) % (m->half - n);
        memset(buf, (int)(i & 0xff), n);
        if (i % 7 == 0) {
            if (qcow2_pwrite_zeroes(m->img, off, n) != 0) {
                m->bad++;
                break;
            }
            memset(m->ref + (off - m->half), 0, n);
        } else if (qcow2_pwrite(m->img, buf, n, off) != 0) {
            m->bad++;
            break;
        } else {
            memcpy(m->ref + (off - m->half), buf, n);
        }
        if (i % 50 == 0 && qcow2_flush(m->img) != 0)
            m->bad++;
    }
    free(buf);
    return NULL;
}

/* Snapshot create clears OFLAG_COPIED in every L2 table: with more tables than a
 * small L2 cache holds, the dirty slices must be written back on the way (a
 * cache full of dirty slices has no victim: this hung once). Then check is clean
 * and delete gives the flags back. */
START_TEST(snapshot_with_more_l2_tables_than_the_cache)
{
    const char *uri = "mem:t/many-l2.qcow2";
    vfs_remove(uri);
    /* 4 KiB clusters: an L2 table maps 2 MiB; 64 tables, a cache of 4 slices */
    struct qcow2_create_opts co = {.size = 128u << 20, .cluster_size = 4096};
    ck_assert_int_eq(qcow2_create(uri, &co), 0);
    struct qcow2_open_opts o = {.read_write = true, .l2_cache_bytes = 4 * 4096};
    struct qcow2_image *img;
    ck_assert_int_eq(qcow2_open(uri, &o, &img), 0);
    unsigned char buf[4096];
    for (unsigned i = 0; i < 64; i++) {
        memset(buf, (int)i + 1, sizeof buf);
        ck_assert_int_eq(qcow2_pwrite(img, buf, sizeof buf, (uint64_t)i << 21), 0);
    }
    ck_assert_int_eq(qcow2_snapshot_create(img, "s1"), 0);
    struct qcow2_check_result r;
    ck_assert_int_eq(qcow2_check(img, QCOW2_REPAIR_NONE, &r, NULL, NULL), 0);
    ck_assert_uint_eq(r.corruptions + r.leaks + r.check_errors, 0);
    ck_assert_int_eq(qcow2_snapshot_delete(img, "s1"), 0);
    ck_assert_int_eq(qcow2_check(img, QCOW2_REPAIR_NONE, &r, NULL, NULL), 0);
    ck_assert_uint_eq(r.corruptions + r.leaks + r.check_errors, 0);
    for (unsigned i = 0; i < 64; i++) {
        ck_assert_int_eq(qcow2_pread(img, buf, sizeof buf, (uint64_t)i << 21), 0);
        ck_assert_uint_eq(buf[0], i + 1);
        ck_assert_uint_eq(buf[4095], i + 1);
    }
    ck_assert_int_eq(qcow2_close(img), 0);
    vfs_remove(uri);
}
END_TEST

/* An image of 8 MiB (64 KiB clusters) in mem with guest bytes at 0 and 4 MiB,
 * then the 8 bytes at `at` (an offset named by the header field at `field`, plus
 * `plus`) replaced with f(old). */
static void damaged_image(const char *uri, unsigned field, uint64_t plus, uint64_t (*f)(uint64_t))
{
    vfs_remove(uri);
    struct qcow2_create_opts co = {.size = 8u << 20};
    ck_assert_int_eq(qcow2_create(uri, &co), 0);
    struct qcow2_open_opts o = {.read_write = true};
    struct qcow2_image *img;
    ck_assert_int_eq(qcow2_open(uri, &o, &img), 0);
    unsigned char buf[4096];
    memset(buf, 0x5a, sizeof buf);
    ck_assert_int_eq(qcow2_pwrite(img, buf, sizeof buf, 0), 0);
    ck_assert_int_eq(qcow2_pwrite(img, buf, sizeof buf, 4u << 20), 0);
    ck_assert_int_eq(qcow2_close(img), 0);
    struct vfs_file *fp;
    unsigned char b[8];
    ck_assert_int_eq(vfs_open(uri, VFS_O_RDWR, &fp), 0);
    ck_assert_int_eq(vfs_pread(fp, b, 8, field), 0);
    uint64_t at = 0, v = 0;
    for (unsigned i = 0; i < 8; i++)
        at = at << 8 | b[i];
    at += plus;
    ck_assert_int_eq(vfs_pread(fp, b, 8, at), 0);
    for (unsigned i = 0; i < 8; i++)
        v = v << 8 | b[i];
    v = f(v);
    for (unsigned i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (56 - 8 * i));
    ck_assert_int_eq(vfs_pwrite(fp, b, 8, at), 0);
    vfs_close(fp);
}

static struct qcow2_check_result check_uri(const char *uri, enum qcow2_repair repair, int want_ret)
{
    struct qcow2_open_opts o = {.read_write = repair != QCOW2_REPAIR_NONE, .allow_corrupt = true};
    struct qcow2_image *img;
    struct qcow2_check_result r;
    ck_assert_int_eq(qcow2_open(uri, &o, &img), 0);
    ck_assert_int_eq(qcow2_check(img, repair, &r, NULL, NULL), want_ret);
    ck_assert_int_eq(qcow2_close(img), 0);
    return r;
}

static void reads_back(const char *uri)
{
    struct qcow2_image *img;
    unsigned char buf[4096];
    ck_assert_int_eq(qcow2_open(uri, NULL, &img), 0);
    ck_assert_int_eq(qcow2_pread(img, buf, sizeof buf, 4u << 20), 0);
    ck_assert_uint_eq(buf[0], 0x5a);
    ck_assert_uint_eq(buf[4095], 0x5a);
    ck_assert_int_eq(qcow2_close(img), 0);
}

static uint64_t l2_over_header(uint64_t v)
{
    (void)v;
    return 1ull << 63; /* OFLAG_COPIED, offset 0 */
}

static uint64_t misaligned(uint64_t v)
{
    return v + 512;
}

/* An L2 table over the header is corruption (qemu-img: exit 2), not a leak. */
START_TEST(check_counts_an_l2_table_over_the_header_as_corruption)
{
    const char *uri = "mem:t/l2hdr.qcow2";
    damaged_image(uri, 40, 0, l2_over_header);
    struct qcow2_check_result r = check_uri(uri, QCOW2_REPAIR_NONE, 0);
    ck_assert_uint_gt(r.corruptions, 0);
    vfs_remove(uri);
}
END_TEST

/* A misaligned refcount block: corruption; -r leaks cannot help (it needs a
 * rebuild); -r all rebuilds the refcounts and the image is clean, its data intact. */
START_TEST(check_rebuilds_a_misaligned_refcount_block)
{
    const char *uri = "mem:t/rbmis.qcow2";
    damaged_image(uri, 48, 0, misaligned);
    struct qcow2_check_result r = check_uri(uri, QCOW2_REPAIR_NONE, 0);
    ck_assert_uint_eq(r.corruptions, 1);
    check_uri(uri, QCOW2_REPAIR_LEAKS, -EUCLEAN);
    r = check_uri(uri, QCOW2_REPAIR_ALL, 0);
    ck_assert_uint_ge(r.corruptions_fixed, 1);
    r = check_uri(uri, QCOW2_REPAIR_NONE, 0);
    ck_assert_uint_eq(r.corruptions + r.leaks + r.check_errors, 0);
    reads_back(uri);
    vfs_remove(uri);
}
END_TEST

/* A disk of 0 bytes: no L1 table, nothing leaked. */
START_TEST(check_finds_a_zero_byte_image_clean)
{
    const char *uri = "mem:t/zero.qcow2";
    vfs_remove(uri);
    struct qcow2_create_opts co = {.size = 0};
    ck_assert_int_eq(qcow2_create(uri, &co), 0);
    struct qcow2_check_result r = check_uri(uri, QCOW2_REPAIR_NONE, 0);
    ck_assert_uint_eq(r.corruptions + r.leaks + r.check_errors, 0);
    vfs_remove(uri);
}
END_TEST

START_TEST(a_writer_and_readers_share_an_image)
{
    sh("qemu-img create -f qcow2 -o cluster_size=4k w.qcow2 8M && qemu-io -c 'write -P 3 0 4M' -c 'write -c -P 5 5M 4k' w.qcow2");
    size_t rlen;
    unsigned char *ref = oracle("w.qcow2", &rlen);
    to_mem("w.qcow2");
    struct qcow2_open_opts o = {.read_write = true, .l2_cache_bytes = 8 * 4096};
    struct qcow2_image *img;
    int ret = qcow2_open("mem:t/w.qcow2", &o, &img);
    ck_assert_msg(ret == 0, "open: %s", err_msg(ret));
    size_t half = rlen / 2;
    struct mixer m = {.img = img, .ref = malloc(half), .half = half, .seed = 99};
    memcpy(m.ref, ref + half, half);
    enum { N = 4 };
    pthread_t w, t[N];
    struct reader r[N];
    ck_assert_int_eq(pthread_create(&w, NULL, write_random, &m), 0);
    for (int i = 0; i < N; i++) { /* readers stay in the half the writer leaves alone */
        r[i] = (struct reader){.img = img, .ref = ref, .len = half, .seed = 77u + (unsigned)i};
        ck_assert_int_eq(pthread_create(&t[i], NULL, read_random, &r[i]), 0);
    }
    pthread_join(w, NULL);
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(r[i].bad, 0);
    }
    ck_assert_int_eq(m.bad, 0);
    unsigned char *got = malloc(half);
    ck_assert_int_eq(qcow2_pread(img, got, half, half), 0);
    ck_assert(memcmp(got, m.ref, half) == 0);
    struct qcow2_check_result cr;
    ck_assert_int_eq(qcow2_flush(img), 0);
    ck_assert_int_eq(qcow2_check(img, QCOW2_REPAIR_NONE, &cr, NULL, NULL), 0);
    ck_assert_uint_eq(cr.corruptions, 0);
    ck_assert_uint_eq(cr.leaks, 0);
    qcow2_close(img);
    free(got);
    free(m.ref);
    free(ref);
}
END_TEST

/* Host offset of guest cluster off (standard clusters, allocated). */
static uint64_t host_of(struct qcow2_image *img, uint64_t off)
{
    struct qcow2_extent e;
    ck_assert_int_eq(qcow2_block_status(img, off, 65536, &e), 0);
    ck_assert(e.offset_valid);
    return e.offset;
}

START_TEST(pinned_runs_keep_their_bytes)
{
    char uri[128];
    snprintf(uri, sizeof uri, "%s/pin.qcow2", tmpdir);
    struct qcow2_create_opts co = {.size = 64u << 20};
    ck_assert_int_eq(qcow2_create(uri, &co), 0);
    struct qcow2_open_opts o = {.read_write = true};
    struct qcow2_image *img;
    ck_assert_int_eq(qcow2_open(uri, &o, &img), 0);
    enum { CS = 65536 };
    unsigned char *buf = malloc(4 * CS), *got = malloc(4 * CS);
    for (int i = 0; i < 4; i++)
        memset(buf + i * CS, 'a' + i, CS);
    ck_assert_int_eq(qcow2_pwrite(img, buf, 4 * CS, 0), 0);
    ck_assert_int_eq(qcow2_flush(img), 0);

    /* unallocated, or past the disk: no pin */
    int fd;
    uint64_t hoff;
    struct qcow2_pin pin, pin2;
    ck_assert_int_eq(qcow2_pin_run(img, 8 * CS, CS, &fd, &hoff, &pin), 0);
    ck_assert_int_eq(qcow2_pin_run(img, (64u << 20) - 4096, 8192, &fd, &hoff, &pin), 0);
    /* four contiguous clusters: one run */
    ck_assert_int_eq(qcow2_pin_run(img, 0, 4 * CS, &fd, &hoff, &pin), 1);
    ck_assert_uint_eq(hoff, host_of(img, 0));
    uint64_t h1 = host_of(img, CS), h2 = host_of(img, 2 * CS);

    /* a write over a sent cluster goes to a copy; the pinned bytes stay */
    memset(buf, 'X', CS);
    ck_assert_int_eq(qcow2_pwrite(img, buf, 4096, CS), 0);
    ck_assert_uint_ne(host_of(img, CS), h1);
    ck_assert_int_eq((int)pread(fd, got, 4 * CS, (off_t)hoff), 4 * CS);
    for (int i = 0; i < 4; i++)
        ck_assert_uint_eq(got[i * CS + 100], 'a' + i);
    ck_assert_int_eq(qcow2_pread(img, got, 2 * CS, CS), 0);
    ck_assert_uint_eq(got[0], 'X');
    ck_assert_uint_eq(got[4096], 'b');

    /* discarded and flushed while pinned: not reused, not punched */
    ck_assert_int_eq(qcow2_discard(img, 2 * CS, CS), 0);
    ck_assert_int_eq(qcow2_flush(img), 0);
    memset(buf, 'N', CS);
    ck_assert_int_eq(qcow2_pwrite(img, buf, CS, 20 * CS), 0);
    ck_assert_int_eq(qcow2_flush(img), 0);
    ck_assert_uint_ne(host_of(img, 20 * CS), h2);
    ck_assert_uint_ne(host_of(img, 20 * CS), h1);
    ck_assert_int_eq((int)pread(fd, got, CS, (off_t)h2), CS);
    ck_assert_uint_eq(got[0], 'c');
    ck_assert_uint_eq(got[CS - 1], 'c');

    /* a second reader pins in a later epoch, then cluster 0 is freed too:
     * letting go of the first pin frees what only it could read (h1, h2),
     * not what the second may still be sending (h0) */
    uint64_t h0 = host_of(img, 0);
    ck_assert_int_eq(qcow2_pin_run(img, 3 * CS, CS, &fd, &hoff, &pin2), 1);
    ck_assert_int_eq(qcow2_discard(img, 0, CS), 0);
    ck_assert_int_eq(qcow2_flush(img), 0);
    qcow2_unpin(&pin);
    uint64_t n[4];
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(qcow2_pwrite(img, buf, CS, (uint64_t)(21 + i) * CS), 0);
        ck_assert_int_eq(qcow2_flush(img), 0);
        n[i] = host_of(img, (uint64_t)(21 + i) * CS);
    }
    ck_assert((n[0] == h1 && n[1] == h2) || (n[0] == h2 && n[1] == h1));
    ck_assert_uint_ne(n[2], h0);
    qcow2_unpin(&pin2);
    ck_assert_int_eq(qcow2_pwrite(img, buf, CS, 24 * CS), 0);
    ck_assert_int_eq(qcow2_flush(img), 0);
    n[3] = host_of(img, 24 * CS);
    ck_assert_uint_eq(n[3], h0);

    struct qcow2_check_result r;
    ck_assert_int_eq(qcow2_check(img, QCOW2_REPAIR_NONE, &r, NULL, NULL), 0);
    ck_assert_uint_eq(r.corruptions + r.leaks + r.check_errors, 0);
    ck_assert_int_eq(qcow2_close(img), 0);
    free(buf);
    free(got);
}
END_TEST

/* ---- the cursor and the metadata budget ---- */

START_TEST(cursor_checks_every_step)
{
    static const unsigned char b[13] = {0, 1, 0, 0, 0, 2, 1, 2, 3, 4, 5, 6, 7};
    struct cursor c = cur_init(b, sizeof b);
    ck_assert_uint_eq(cur_be16(&c), 1);
    ck_assert_uint_eq(cur_be32(&c), 2);
    ck_assert(!c.failed);
    /* 7 left: 8 do not fit, and the position stays */
    ck_assert_ptr_null(cur_take(&c, 8));
    ck_assert(c.failed);
    ck_assert_uint_eq(cur_pos(&c), 6);
    ck_assert_uint_eq(cur_be64(&c), 0);
    ck_assert_uint_eq(cur_remaining(&c), 7);
    /* a sub-cursor sees only its bytes */
    struct cursor sub;
    ck_assert(cur_sub(&c, 3, &sub));
    ck_assert_uint_eq(cur_remaining(&sub), 3);
    ck_assert_uint_eq(cur_u8(&sub), 1);
    ck_assert_uint_eq(cur_be16(&sub), 0x0203);
    ck_assert_uint_eq(cur_u8(&sub), 0);
    ck_assert(sub.failed);
    ck_assert(!cur_sub(&c, 5, &sub));
    ck_assert_uint_eq(cur_remaining(&sub), 0);
    /* at 9: padding to 16 needs 7 bytes, 4 remain */
    ck_assert(!cur_align(&c, 8));
    ck_assert_uint_eq(cur_pos(&c), 9);
    ck_assert(cur_align_or_end(&c, 8));
    ck_assert_uint_eq(cur_remaining(&c), 0);
    ck_assert(!cur_skip(&c, 1));
    struct cursor d = cur_init(b, 8);
    ck_assert(cur_skip(&d, 3) && cur_align(&d, 8));
    ck_assert_uint_eq(cur_pos(&d), 8);
    ck_assert(cur_align(&d, 8)); /* aligned already: no step */
}
END_TEST

START_TEST(budget_refuses_tables_that_need_more)
{
    /* 1 TiB: an L1 of 2048 entries (16 KiB); 64 KiB of refcount table */
    sh("qemu-img create -f qcow2 big.qcow2 1T");
    to_mem("big.qcow2");
    struct qcow2_open_opts o = {.max_meta_bytes = 8192};
    struct qcow2_image *img;
    int ret = qcow2_open("mem:t/big.qcow2", &o, &img);
    ck_assert_int_eq(ret, -ENOTSUP);
    ck_assert_msg(strstr(err_msg(ret), "L1 table needs 16 KiB of memory, more than the metadata budget of 8 KiB"), "%s",
                  err_msg(ret));
    o.max_meta_bytes = 32768; /* the L1 fits, not the refcount table beside it */
    ret = qcow2_open("mem:t/big.qcow2", &o, &img);
    ck_assert_int_eq(ret, -ENOTSUP);
    ck_assert_msg(strstr(err_msg(ret), "refcount table needs 64 KiB") &&
                      strstr(err_msg(ret), "16 KiB this image holds"),
                  "%s", err_msg(ret));
    o.max_meta_bytes = 16384 + 65536;
    ck_assert_int_eq(qcow2_open("mem:t/big.qcow2", &o, &img), 0);
    qcow2_close(img);
    /* a create is refused the same way, before anything is written */
    struct qcow2_create_opts co = {.size = 1ull << 50, .max_meta_bytes = 1u << 20};
    ret = qcow2_create("mem:t/huge.qcow2", &co);
    ck_assert_int_eq(ret, -ENOTSUP);
    ck_assert_msg(strstr(err_msg(ret), "metadata budget of 1 MiB"), "%s", err_msg(ret));
    ck_assert_int_eq(qcow2_open("mem:t/huge.qcow2", NULL, &img), -ENOENT);
}
END_TEST

START_TEST(budget_counts_the_snapshot_table)
{
    sh("qemu-img create -f qcow2 sn.qcow2 1M && qemu-img snapshot -c first sn.qcow2 && "
       "qemu-img snapshot -c second sn.qcow2");
    to_mem("sn.qcow2");
    /* 1M: one L1 entry and 64 KiB of refcount table; the snapshots need a little more */
    struct qcow2_open_opts o = {.max_meta_bytes = 8 + 65536 + 16};
    struct qcow2_image *img;
    int ret = qcow2_open("mem:t/sn.qcow2", &o, &img);
    ck_assert_int_eq(ret, -ENOTSUP);
    ck_assert_msg(strstr(err_msg(ret), "snapshot table needs") && strstr(err_msg(ret), "metadata budget"), "%s",
                  err_msg(ret));
    o.max_meta_bytes = 1u << 20;
    ck_assert_int_eq(qcow2_open("mem:t/sn.qcow2", &o, &img), 0);
    /* listings share the image's list: nothing copied, and it outlives the image */
    struct qcow2_snapshot_info *a, *b;
    uint32_t na, nb;
    ck_assert_int_eq(qcow2_snapshot_list(img, &a, &na), 0);
    ck_assert_int_eq(qcow2_snapshot_list(img, &b, &nb), 0);
    ck_assert_uint_eq(na, 2);
    ck_assert_ptr_eq(a, b);
    ck_assert_ptr_eq(a, qcow2_get_info(img)->snapshots);
    qcow2_snapshot_list_free(b, nb);
    qcow2_close(img);
    ck_assert_str_eq(a[1].name, "second");
    qcow2_snapshot_list_free(a, na);
}
END_TEST

START_TEST(a_dirty_image_opens_read_only_without_rebuild)
{
    /* the dirty bit (incompatible bit 0, byte 79 of the header) by hand */
    sh("qemu-img create -f qcow2 -o lazy_refcounts=on d.qcow2 1M && qemu-io -c 'write -P 7 0 64k' d.qcow2 && "
       "printf '\\001' | dd of=d.qcow2 bs=1 seek=79 conv=notrunc 2>/dev/null");
    to_mem("d.qcow2");
    struct qcow2_open_opts o = {.read_write = true, .no_rebuild = true};
    struct qcow2_image *img;
    int ret = qcow2_open("mem:t/d.qcow2", &o, &img);
    ck_assert_int_eq(ret, -EROFS);
    ck_assert_msg(strstr(err_msg(ret), "not closed cleanly"), "%s", err_msg(ret));
    /* the check with repair makes it clean; then it opens for writing as it is */
    o = (struct qcow2_open_opts){.read_write = true, .allow_corrupt = true};
    ck_assert_int_eq(qcow2_open("mem:t/d.qcow2", &o, &img), 0);
    ck_assert(qcow2_get_info(img)->dirty);
    struct qcow2_check_result r;
    ck_assert_int_eq(qcow2_check(img, QCOW2_REPAIR_LEAKS, &r, NULL, NULL), 0);
    ck_assert(!qcow2_get_info(img)->dirty);
    ck_assert_int_eq(qcow2_close(img), 0);
    o = (struct qcow2_open_opts){.read_write = true, .no_rebuild = true};
    ck_assert_int_eq(qcow2_open("mem:t/d.qcow2", &o, &img), 0);
    ck_assert(!qcow2_get_info(img)->dirty);
    unsigned char buf[512];
    ck_assert_int_eq(qcow2_pread(img, buf, sizeof buf, 0), 0);
    ck_assert_uint_eq(buf[511], 7);
    qcow2_close(img);
}
END_TEST

/* The runs of bitmap b from 0: [start, end) pairs of dirty bytes, at most max. */
static unsigned dirty_runs(struct qcow2_image *img, uint64_t (*runs)[2], unsigned max)
{
    unsigned n = 0;
    uint64_t off = 0, size = qcow2_size(img);
    while (off < size) {
        bool d;
        uint64_t pnum;
        int ret = qcow2_bitmap_dirty(img, "b", off, size - off, &d, &pnum);
        ck_assert_msg(ret == 0, "dirty at %llu: %s", (unsigned long long)off, err_msg(ret));
        ck_assert(pnum > 0 && pnum <= size - off);
        if (d) {
            ck_assert(n < max);
            runs[n][0] = off;
            runs[n][1] = off + pnum;
            n++;
        }
        off += pnum;
    }
    return n;
}

START_TEST(dirty_query_reads_stored_bitmaps_a_piece_at_a_time)
{
    /* 512-byte clusters: a data cluster of the bitmap holds 4096 bits (2 MiB at
     * 512 bytes a bit), so an 8 MiB disk has a table of 4 entries */
    sh("qemu-img create -f qcow2 -o cluster_size=512 bm.qcow2 8M");
    to_mem("bm.qcow2");
    struct qcow2_open_opts o = {.read_write = true};
    struct qcow2_image *img;
    ck_assert_int_eq(qcow2_open("mem:t/bm.qcow2", &o, &img), 0);
    ck_assert_int_eq(qcow2_bitmap_add(img, "b", 512, false), 0);
    static unsigned char buf[1024];
    ck_assert_int_eq(qcow2_pwrite(img, buf, 1024, 4096), 0);
    ck_assert_int_eq(qcow2_pwrite(img, buf, 512, (3u << 20) + 512), 0);
    ck_assert_int_eq(qcow2_close(img), 0);
    /* read-only: the bits come from the file through the window */
    ck_assert_int_eq(qcow2_open("mem:t/bm.qcow2", NULL, &img), 0);
    uint64_t runs[8][2];
    ck_assert_uint_eq(dirty_runs(img, runs, 8), 2);
    ck_assert_uint_eq(runs[0][0], 4096);
    ck_assert_uint_eq(runs[0][1], 5120);
    ck_assert_uint_eq(runs[1][0], (3u << 20) + 512);
    ck_assert_uint_eq(runs[1][1], (3u << 20) + 1024);
    struct qcow2_bitmap_info *l;
    uint32_t n;
    ck_assert_int_eq(qcow2_bitmap_list(img, &l, &n), 0);
    ck_assert_uint_eq(n, 1);
    ck_assert_uint_eq(l[0].table_size, 4);
    uint64_t table = l[0].table_offset;
    qcow2_bitmap_list_free(l, n);
    qcow2_close(img);
    /* entry 2 (guest 4..6 MiB) all ones, without a data cluster; entry 3 past the file */
    struct vfs_file *f;
    ck_assert_int_eq(vfs_open("mem:t/bm.qcow2", VFS_O_RDWR, &f), 0);
    uint64_t ones = htobe64(1), far = htobe64(1ull << 40);
    ck_assert_int_eq(vfs_pwrite(f, &ones, 8, table + 16), 0);
    ck_assert_int_eq(qcow2_open("mem:t/bm.qcow2", NULL, &img), 0);
    ck_assert_uint_eq(dirty_runs(img, runs, 8), 3);
    ck_assert_uint_eq(runs[2][0], 4u << 20);
    ck_assert_uint_eq(runs[2][1], 6u << 20);
    qcow2_close(img);
    ck_assert_int_eq(vfs_pwrite(f, &far, 8, table + 24), 0);
    vfs_close(f);
    ck_assert_int_eq(qcow2_open("mem:t/bm.qcow2", NULL, &img), 0);
    bool d;
    uint64_t pnum;
    int ret = qcow2_bitmap_dirty(img, "b", 6u << 20, 1u << 20, &d, &pnum);
    ck_assert_int_eq(ret, -EUCLEAN);
    ck_assert_msg(strstr(err_msg(ret), "bitmap 'b': table entry 3"), "%s", err_msg(ret));
    qcow2_close(img);
}
END_TEST

START_TEST(snapshot_create_stops_at_the_budget_and_leaves_the_image_whole)
{
    /* 1 MiB: 8 bytes of L1 and 64 KiB of refcount table; room for a few snapshots */
    sh("qemu-img create -f qcow2 sb.qcow2 1M");
    to_mem("sb.qcow2");
    struct qcow2_open_opts o = {.read_write = true, .max_meta_bytes = 8 + 65536 + 2048};
    struct qcow2_image *img;
    ck_assert_int_eq(qcow2_open("mem:t/sb.qcow2", &o, &img), 0);
    char name[64];
    int ret = 0;
    unsigned made = 0;
    while (made < 100) {
        snprintf(name, sizeof name, "snapshot-with-a-longish-name-%u", made);
        if ((ret = qcow2_snapshot_create(img, name)) < 0)
            break;
        made++;
    }
    ck_assert_int_eq(ret, -ENOTSUP);
    ck_assert_msg(strstr(err_msg(ret), "snapshot table with one more snapshot") &&
                      strstr(err_msg(ret), "metadata budget of 66.0 KiB"),
                  "%s", err_msg(ret));
    ck_assert_uint_gt(made, 2);
    ck_assert_uint_eq(qcow2_get_info(img)->nb_snapshots, made);
    ck_assert_int_eq(qcow2_close(img), 0);
    /* what is on disk opens, all of it listed, and checks clean */
    o = (struct qcow2_open_opts){.read_write = true, .allow_corrupt = true};
    ck_assert_int_eq(qcow2_open("mem:t/sb.qcow2", &o, &img), 0);
    ck_assert_uint_eq(qcow2_get_info(img)->nb_snapshots, made);
    struct qcow2_check_result r;
    ck_assert_int_eq(qcow2_check(img, QCOW2_REPAIR_NONE, &r, NULL, NULL), 0);
    ck_assert_uint_eq(r.corruptions, 0);
    ck_assert_uint_eq(r.leaks, 0);
    qcow2_close(img);
}
END_TEST

/* One of several threads claiming one generation at once. */
struct claimer {
    struct qcow2_image *img;
    uint64_t gen;
    pthread_barrier_t *go;
    int ret;
};

static void *claim_one(void *p)
{
    struct claimer *c = p;
    pthread_barrier_wait(c->go);
    c->ret = qcow2_claim_generation(c->img, c->gen);
    return NULL;
}

/* The change record (HTTP validators): 0 at the open, moved by every kind of
 * change and by nothing else, and a claim of one generation succeeds once
 * however many threads try it at the same moment. */
START_TEST(generation_moves_with_every_change_and_is_claimed_once)
{
    const char *uri = "mem:t/gen.qcow2";
    vfs_remove(uri);
    struct qcow2_create_opts co = {.size = 4u << 20};
    ck_assert_int_eq(qcow2_create(uri, &co), 0);
    struct qcow2_open_opts o = {.read_write = true};
    struct qcow2_image *img;
    ck_assert_int_eq(qcow2_open(uri, &o, &img), 0);
    struct qcow2_changes ch;
    qcow2_get_changes(img, &ch);
    ck_assert_uint_eq(ch.generation, 0);
    ck_assert_int_eq(ch.changed, 0);
    static char buf[4096];
    memset(buf, 7, sizeof buf);
    uint64_t g = 0, sg = 0;
    for (int step = 0; step < 6; step++) {
        int ret;
        switch (step) {
        case 0:
            ret = qcow2_pwrite(img, buf, sizeof buf, 0);
            break;
        case 1:
            ret = qcow2_pwrite_zeroes(img, 0, 4096);
            break;
        case 2:
            ret = qcow2_discard(img, 0, 65536);
            break;
        case 3:
            ret = qcow2_bitmap_add(img, "b", 0, false);
            break;
        case 4:
            ret = qcow2_snapshot_create(img, "s");
            break;
        default:
            ret = qcow2_snapshot_delete(img, "s");
            break;
        }
        ck_assert_msg(ret == 0, "step %d: %s", step, err_msg(ret));
        qcow2_get_changes(img, &ch);
        ck_assert_msg(ch.generation > g, "step %d left the generation at %llu", step, (unsigned long long)g);
        ck_assert(ch.changed > 0 && ch.changed >= ch.before);
        ck_assert(step >= 4 ? ch.snap_generation > sg : ch.snap_generation == sg);
        g = ch.generation;
        sg = ch.snap_generation;
    }
    /* reads and flushes change nothing */
    ck_assert_int_eq(qcow2_pread(img, buf, sizeof buf, 0), 0);
    ck_assert_int_eq(qcow2_flush(img), 0);
    ck_assert_uint_eq(qcow2_generation(img), g);
    ck_assert_int_eq(qcow2_claim_generation(img, g - 1), -ESTALE);
    ck_assert_uint_eq(qcow2_generation(img), g);
    enum { N = 8 };
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, N);
    pthread_t t[N];
    struct claimer c[N];
    for (int i = 0; i < N; i++) {
        c[i] = (struct claimer){.img = img, .gen = g, .go = &go};
        ck_assert_int_eq(pthread_create(&t[i], NULL, claim_one, &c[i]), 0);
    }
    int won = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        ck_assert(c[i].ret == 0 || c[i].ret == -ESTALE);
        won += c[i].ret == 0;
    }
    pthread_barrier_destroy(&go);
    ck_assert_int_eq(won, 1);
    ck_assert_uint_eq(qcow2_generation(img), g + 1);
    qcow2_close(img);
    vfs_remove(uri);
}
END_TEST

/* ---- qcow2_meta_ranges ---- */

/* A "watch:" backend over one buffer that counts reads outside the ranges
 * the test allows: what qcow2_open reads of an image, checked against what
 * qcow2_meta_ranges said it would. */
static struct {
    const unsigned char *buf;
    size_t len;
    const struct qcow2_range *allow;
    int nallow; /* -1: every read allowed */
    unsigned outside;
    uint64_t first_off, first_len; /* the first read outside */
} watch;

static int watch_open(const char *path, unsigned flags, void **h)
{
    (void)path;
    (void)flags;
    *h = &watch;
    return 0;
}

static void watch_close(void *h)
{
    (void)h;
}

static int watch_pread(void *h, void *buf, size_t len, uint64_t off)
{
    (void)h;
    bool in = watch.nallow < 0;
    for (int i = 0; i < watch.nallow && !in; i++)
        in = off >= watch.allow[i].off && off + len <= watch.allow[i].off + watch.allow[i].len;
    if (!in && !watch.outside++) {
        watch.first_off = off;
        watch.first_len = len;
    }
    memset(buf, 0, len);
    if (off < watch.len)
        memcpy(buf, watch.buf + off, off + len <= watch.len ? len : watch.len - (size_t)off);
    return 0;
}

static int watch_size(void *h, uint64_t *size)
{
    (void)h;
    *size = watch.len;
    return 0;
}

static const struct vfs_ops watch_ops = {
    .version = VFS_OPS_VERSION,
    .struct_size = sizeof(struct vfs_ops),
    .name = "watch",
    .thread_model = VFS_THREAD_SERIALIZE,
    .open = watch_open,
    .close = watch_close,
    .pread = watch_pread,
    .size = watch_size,
};

/* The ranges of tmpdir/name, computed from its first cluster only (an upload
 * that has just begun) and from the whole file, must agree; then a read-only
 * open of the whole file reads nothing outside them. Returns the count. */
static int ranges_cover_the_open(const char *name, struct qcow2_range r[QCOW2_META_RANGES_MAX])
{
    static bool registered;
    if (!registered) {
        ck_assert_int_eq(vfs_register(&watch_ops), 0);
        registered = true;
    }
    size_t len;
    unsigned char *buf = slurp(name, &len);
    uint32_t cbits = be32toh(*(uint32_t *)(buf + 20));
    size_t head = (size_t)1 << cbits;
    ck_assert_uint_ge(len, head);
    struct qcow2_range part[QCOW2_META_RANGES_MAX];
    struct vfs_file *f;
    watch = (typeof(watch)){.buf = buf, .len = head, .nallow = -1};
    ck_assert_int_eq(vfs_open("watch:x", VFS_O_RDONLY, &f), 0);
    int np = qcow2_meta_ranges(f, 0, part);
    ck_assert_msg(np > 0, "%s: %s", name, err_msg(np));
    vfs_close(f);
    watch.len = len;
    ck_assert_int_eq(vfs_open("watch:x", VFS_O_RDONLY, &f), 0);
    int n = qcow2_meta_ranges(f, 0, r);
    vfs_close(f);
    ck_assert_int_eq(n, np);
    ck_assert(memcmp(r, part, (size_t)n * sizeof *r) == 0);
    ck_assert_uint_eq(r[0].off, 0);
    ck_assert_uint_ge(r[0].len, head);
    for (int i = 1; i < n; i++) /* sorted, apart */
        ck_assert_uint_gt(r[i].off, r[i - 1].off + r[i - 1].len);

    watch.allow = r;
    watch.nallow = n;
    struct qcow2_image *img;
    struct qcow2_open_opts o = {.no_backing = true};
    int ret = qcow2_open("watch:x", &o, &img);
    ck_assert_msg(ret == 0, "open %s: %s", name, err_msg(ret));
    qcow2_close(img);
    ck_assert_msg(watch.outside == 0, "%s: %u reads outside the ranges, the first %llu+%llu", name, watch.outside,
                  (unsigned long long)watch.first_off, (unsigned long long)watch.first_len);
    free(buf);
    return n;
}

START_TEST(meta_ranges_cover_every_read_of_the_open)
{
    struct qcow2_range r[QCOW2_META_RANGES_MAX];
    sh("qemu-img create -f qcow2 plain.qcow2 64M && qemu-io -c 'write -P 1 0 8M' -c 'write -P 2 40M 1M' plain.qcow2");
    /* the header with the refcount table after it, then (past the refcount block) the L1 table */
    ck_assert_int_eq(ranges_cover_the_open("plain.qcow2", r), 2);

    /* snapshots, a bitmap and a backing name; the tables moved apart by data */
    sh("qemu-img create -f qcow2 -o cluster_size=4k base.qcow2 16M && "
       "qemu-img create -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 all.qcow2 16M && "
       "qemu-io -c 'write -P 3 0 2M' all.qcow2 && qemu-img snapshot -c one all.qcow2 && "
       "qemu-io -c 'write -P 4 2M 2M' all.qcow2 && qemu-img snapshot -c two all.qcow2 && "
       "qemu-img bitmap --add all.qcow2 bm0 && qemu-io -c 'write -P 5 8M 1M' all.qcow2");
    int n = ranges_cover_the_open("all.qcow2", r);
    ck_assert_int_ge(n, 2);

    /* LUKS: the encryption header is read at the open */
    /* qemu times its key derivation, and a short measure on a busy machine can
     * fail ("Unable to get accurate CPU usage"): tried again, then with its
     * default time */
    sh("L='qemu-img create -q --object secret,id=s0,data=abc -f qcow2 -o "
       "encrypt.format=luks,encrypt.key-secret=s0'; $L,encrypt.iter-time=50 luks.qcow2 4M 2>/dev/null || "
       "$L,encrypt.iter-time=50 luks.qcow2 4M 2>/dev/null || $L luks.qcow2 4M");
    n = ranges_cover_the_open("luks.qcow2", r);
    bool luks = false;
    for (int i = 0; i < n; i++)
        luks |= r[i].len >= 592 && r[i].off > 0;
    ck_assert_msg(luks || r[0].len > 65536, "no range holds the LUKS header");

    /* extended L2 and zstd: other header fields, same reads */
    sh("qemu-img create -f qcow2 -o extended_l2=on,compression_type=zstd x.qcow2 8M");
    ranges_cover_the_open("x.qcow2", r);
}
END_TEST

/* A header in mem:t/h.qcow2 (first cluster of 64 KiB, fields patched). */
static int ranges_of_header(void (*patch)(unsigned char *h), struct qcow2_range r[QCOW2_META_RANGES_MAX])
{
    sh("qemu-img create -f qcow2 -o cluster_size=64k h.qcow2 1G");
    size_t len;
    unsigned char *buf = slurp("h.qcow2", &len);
    patch(buf);
    vfs_remove("mem:t/h.qcow2");
    struct vfs_file *f;
    ck_assert_int_eq(vfs_open("mem:t/h.qcow2", VFS_O_RDWR | VFS_O_CREATE, &f), 0);
    ck_assert_int_eq(vfs_pwrite(f, buf, 65536, 0), 0); /* only the header cluster has come */
    free(buf);
    int n = qcow2_meta_ranges(f, 0, r);
    vfs_close(f);
    for (int i = 0; i < n; i++) {
        ck_assert_uint_le(r[i].off, UINT64_MAX - r[i].len);
        ck_assert_uint_gt(r[i].len, 0);
    }
    ck_assert_int_le(n, QCOW2_META_RANGES_MAX);
    return n;
}

static void put64(unsigned char *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, 8);
}

static void put32(unsigned char *p, uint32_t v)
{
    v = htobe32(v);
    memcpy(p, &v, 4);
}

static void bad_magic(unsigned char *h)
{
    h[0] = 'X';
}
static void huge_clusters(unsigned char *h)
{
    put32(h + 20, 31);
}
static void l1_unaligned(unsigned char *h)
{
    put64(h + 40, 0x30008);
}
static void l1_wraps(unsigned char *h)
{
    put32(h + 36, 0x100000u); /* 8 MiB of L1, within its limit, from 64 KiB below the end of the offsets */
    put64(h + 40, 0xffffffffffff0000ull);
}
static void l1_too_big(unsigned char *h)
{
    put32(h + 36, 0x10000000u);
}
static void reftable_too_big(unsigned char *h)
{
    put32(h + 56, 0x10000000u);
}
static void tables_far_away(unsigned char *h)
{
    put64(h + 40, 1ull << 50); /* past what came: kept all the same */
    put64(h + 48, (1ull << 50) + (1ull << 20));
}
static void many_snapshots(unsigned char *h)
{
    put32(h + 60, 65536);
    put64(h + 64, 1ull << 40);
}
static void too_many_snapshots(unsigned char *h)
{
    put32(h + 60, 65537);
}

START_TEST(meta_ranges_refuse_hostile_headers)
{
    struct qcow2_range r[QCOW2_META_RANGES_MAX];
    ck_assert_int_eq(ranges_of_header(bad_magic, r), -EINVAL);
    ck_assert_int_eq(ranges_of_header(huge_clusters, r), -EINVAL);
    ck_assert_int_eq(ranges_of_header(l1_unaligned, r), -EINVAL);
    ck_assert_int_eq(ranges_of_header(l1_wraps, r), -EINVAL);
    ck_assert_int_eq(ranges_of_header(l1_too_big, r), -ENOTSUP);
    ck_assert_int_eq(ranges_of_header(reftable_too_big, r), -ENOTSUP);
    ck_assert_int_eq(ranges_of_header(too_many_snapshots, r), -EINVAL);
    ck_assert_int_eq(ranges_of_header(tables_far_away, r), 3);
    ck_assert_uint_eq(r[1].off, 1ull << 50);
    ck_assert_uint_eq(r[2].off, (1ull << 50) + (1ull << 20));
    /* the snapshot table's range is capped as the open caps its walk */
    int n = ranges_of_header(many_snapshots, r);
    ck_assert_int_eq(n, 3); /* header and refcount table, L1, snapshots */
    ck_assert_uint_eq(r[2].off, 1ull << 40);
    ck_assert_uint_eq(r[2].len, 64u << 20);
}
END_TEST

/* ---- release_data: a new image written once ---- */

/* A "rel:" backend whose deferred handles keep their bytes in mem:rel/PATH and
 * record what the host releases; a released byte then fails every read and
 * write with -EIO, as a part the s3 plugin has dropped does. Plain opens reach
 * the same mem object without that check (to look at the result). */
#define REL_MAX 4096
#define MiB     (1ull << 20)
static struct {
    pthread_mutex_t lock;
    struct qcow2_range r[REL_MAX];
    unsigned n;
} rel = {.lock = PTHREAD_MUTEX_INITIALIZER};

struct rel_handle {
    struct vfs_file *f;
    bool deferred;
};

static int rel_open_as(const char *path, unsigned flags, bool deferred, void **h)
{
    char uri[256];
    snprintf(uri, sizeof uri, "mem:rel/%s", path);
    struct rel_handle *r = calloc(1, sizeof *r);
    ck_assert(r != NULL);
    int ret = vfs_open(uri, flags, &r->f);
    if (ret < 0) {
        free(r);
        return ret;
    }
    r->deferred = deferred;
    *h = r;
    return 0;
}

static int rel_open(const char *path, unsigned flags, void **h)
{
    return rel_open_as(path, flags, false, h);
}

static int rel_open_deferred(const char *path, void **h)
{
    return rel_open_as(path, VFS_O_RDWR | VFS_O_CREATE | VFS_O_EXCL, true, h);
}

static int rel_commit(void *h, unsigned flags)
{
    (void)h;
    (void)flags;
    return 0; /* the bytes are in mem:rel/PATH already */
}

static void rel_close(void *h)
{
    struct rel_handle *r = h;
    vfs_close(r->f);
    free(r);
}

static int rel_gone(struct rel_handle *r, const char *op, uint64_t off, uint64_t len)
{
    if (!r->deferred)
        return 0;
    pthread_mutex_lock(&rel.lock);
    int ret = 0;
    for (unsigned i = 0; i < rel.n && !ret; i++)
        if (off < rel.r[i].off + rel.r[i].len && rel.r[i].off < off + len)
            ret = err_fail(EIO, "%s of %llu+%llu meets released %llu+%llu", op, (unsigned long long)off,
                           (unsigned long long)len, (unsigned long long)rel.r[i].off, (unsigned long long)rel.r[i].len);
    pthread_mutex_unlock(&rel.lock);
    return ret;
}

static int rel_pread(void *h, void *buf, size_t len, uint64_t off)
{
    struct rel_handle *r = h;
    int ret = rel_gone(r, "read", off, len);
    return ret ? ret : vfs_pread(r->f, buf, len, off);
}

static int rel_pwrite(void *h, const void *buf, size_t len, uint64_t off)
{
    struct rel_handle *r = h;
    int ret = rel_gone(r, "write", off, len);
    return ret ? ret : vfs_pwrite(r->f, buf, len, off);
}

static int rel_flush(void *h)
{
    return vfs_flush(((struct rel_handle *)h)->f);
}

static int rel_size(void *h, uint64_t *size)
{
    return vfs_size(((struct rel_handle *)h)->f, size);
}

static int rel_truncate(void *h, uint64_t size)
{
    return vfs_truncate(((struct rel_handle *)h)->f, size);
}

static int rel_release(void *h, uint64_t off, uint64_t len)
{
    ck_assert(((struct rel_handle *)h)->deferred);
    pthread_mutex_lock(&rel.lock);
    ck_assert_uint_lt(rel.n, REL_MAX);
    rel.r[rel.n++] = (struct qcow2_range){off, len};
    pthread_mutex_unlock(&rel.lock);
    return 0;
}

static const struct vfs_ops rel_ops = {
    .version = VFS_OPS_VERSION,
    .struct_size = sizeof(struct vfs_ops),
    .name = "rel",
    .thread_model = VFS_THREAD_PARALLEL,
    .open = rel_open,
    .close = rel_close,
    .pread = rel_pread,
    .pwrite = rel_pwrite,
    .flush = rel_flush,
    .size = rel_size,
    .truncate = rel_truncate,
    .open_deferred = rel_open_deferred,
    .commit = rel_commit,
    .release = rel_release,
};

static void fill_random(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(random() >> 7);
}

static void fill_packable(unsigned char *p, size_t n) /* four letters at random: packs to about a quarter */
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)"ACGT"[(random() >> 9) & 3];
}

/* Fill ref[off, off+len) at random and write it to img. */
static void put(struct qcow2_image *img, unsigned char *ref, uint64_t off, uint64_t len)
{
    fill_random(ref + off, (size_t)len);
    int ret = qcow2_pwrite(img, ref + off, (size_t)len, off);
    ck_assert_msg(ret == 0, "write %llu+%llu: %s", (unsigned long long)off, (unsigned long long)len, err_msg(ret));
}

/* What each host cluster of a qcow2 image file holds, from its tables. */
enum { HC_FREE, HC_META, HC_RB, HC_L2, HC_DATA, HC_PACKED };

static unsigned char *host_map(struct vfs_file *f, uint64_t *nclusters, unsigned *cbits, uint64_t *guest_host,
                               uint64_t nguest)
{
    unsigned char h[80];
    ck_assert_int_eq(vfs_pread(f, h, sizeof h, 0), 0);
    unsigned words = be64toh(*(uint64_t *)(h + 72)) & (1u << 4) ? 2 : 1; /* extended L2 entries */
    *cbits = be32toh(*(uint32_t *)(h + 20));
    uint64_t cs = 1ull << *cbits, fsize;
    uint32_t l1_size = be32toh(*(uint32_t *)(h + 36)), rt_clusters = be32toh(*(uint32_t *)(h + 56));
    uint64_t l1_off = be64toh(*(uint64_t *)(h + 40)), rt_off = be64toh(*(uint64_t *)(h + 48));
    ck_assert_int_eq(vfs_size(f, &fsize), 0);
    uint64_t n = (fsize + cs - 1) / cs;
    unsigned char *map = calloc(n, 1);
    ck_assert(map != NULL);
    map[0] = HC_META;
    for (uint64_t o = l1_off; o < l1_off + (uint64_t)l1_size * 8; o += cs)
        map[o / cs] = HC_META;
    uint64_t *t = malloc(cs);
    ck_assert(t != NULL);
    for (uint32_t k = 0; k < rt_clusters; k++) {
        map[rt_off / cs + k] = HC_META;
        ck_assert_int_eq(vfs_pread(f, t, cs, rt_off + k * cs), 0);
        for (uint64_t i = 0; i < cs / 8; i++)
            if (be64toh(t[i]))
                map[be64toh(t[i]) / cs] = HC_RB;
    }
    uint64_t *l1 = malloc((size_t)l1_size * 8);
    ck_assert(l1 != NULL);
    ck_assert_int_eq(vfs_pread(f, l1, (size_t)l1_size * 8, l1_off), 0);
    unsigned x = 62 - (*cbits - 8); /* compressed entries: offset bits below x, sectors above */
    for (uint32_t j = 0; j < l1_size; j++) {
        uint64_t l2 = be64toh(l1[j]) & 0x00fffffffffffe00ull;
        if (!l2)
            continue;
        map[l2 / cs] = HC_L2;
        ck_assert_int_eq(vfs_pread(f, t, cs, l2), 0);
        for (uint64_t i = 0; i < cs / 8 / words; i++) {
            uint64_t e = be64toh(t[i * words]), g = j * (cs / 8 / words) + i;
            if (e & (1ull << 62)) {
                uint64_t coff = e & ((1ull << x) - 1), nsec = ((e >> x) & ((1ull << (*cbits - 8)) - 1)) + 1;
                uint64_t end = (coff & ~511ull) + nsec * 512;
                for (uint64_t c = coff / cs; c * cs < end && c < n; c++)
                    map[c] = HC_PACKED;
            } else if (e & 0x00fffffffffffe00ull) {
                map[(e & 0x00fffffffffffe00ull) / cs] = HC_DATA;
                if (g < nguest)
                    guest_host[g] = e & 0x00fffffffffffe00ull;
            }
        }
    }
    free(l1);
    free(t);
    *nclusters = n;
    return map;
}

/* Run 0 with standard L2 entries, run 1 with extended ones. */
START_TEST(release_data_hands_over_only_data_written_once)
{
    bool ext = _i == 1;
    static bool registered;
    if (!registered) {
        ck_assert_int_eq(vfs_register(&rel_ops), 0);
        registered = true;
    }
    rel.n = 0;
    srandom(16);
    /* 4 KiB clusters: an L2 table maps 2 MiB and a refcount block 8 MiB, so
     * both are allocated between data clusters as the writes go on (extended
     * L2 entries need 16 KiB clusters) */
    const uint64_t cs = ext ? 16384 : 4096, size = 16 * MiB - 1024;
    unsigned char *ref = calloc(1, size);
    ck_assert(ref != NULL);
    /* a backing file under the first 2 MiB: partial writes there copy on write */
    struct vfs_file *f;
    struct qcow2_image *img;
    const uint64_t bsize = 2 * MiB;
    struct qcow2_create_opts bo = {.size = bsize, .cluster_size = 65536};
    vfs_remove("mem:rel/c/base.qcow2");
    ck_assert_int_eq(qcow2_create("mem:rel/c/base.qcow2", &bo), 0);
    struct qcow2_open_opts rw = {.read_write = true};
    ck_assert_int_eq(qcow2_open("mem:rel/c/base.qcow2", &rw, &img), 0);
    memset(ref, 0x5a, bsize);
    ck_assert_int_eq(qcow2_pwrite(img, ref, bsize, 0), 0);
    ck_assert_int_eq(qcow2_close(img), 0);
    struct vfs_pending *p;
    ck_assert_int_eq(vfs_pending_begin("rel:c/t.qcow2", NULL, &p), 0);
    ck_assert(vfs_pending_deferred(p));
    const char *uri = vfs_pending_uri(p);
    struct qcow2_create_opts co = {
        .size = size, .cluster_size = cs, .extended_l2 = ext, .backing_file = "base.qcow2", .backing_format = "qcow2"};
    ck_assert_int_eq(qcow2_create(uri, &co), 0);
    struct qcow2_open_opts oo = {.read_write = true, .release_data = true};
    ck_assert_int_eq(qcow2_open(uri, &oo, &img), 0);

    put(img, ref, 0, MiB);      /* a run of new clusters at once */
    put(img, ref, MiB, cs);     /* one whole cluster */
    uint64_t pc = MiB + 2 * cs; /* one cluster in two pieces: a copy on write (of the backing
                                   file; with extended L2 of whole subclusters), then in place */
    put(img, ref, pc + 100, cs - 100);
    put(img, ref, pc, 100);
    /* compressed clusters packed three or so to a host cluster, between random ones */
    uint64_t zc = 4 * MiB;
    for (uint64_t i = 0; i < 64; i++) {
        uint64_t o = zc + i * cs;
        if (i % 2)
            fill_packable(ref + o, cs);
        else
            fill_random(ref + o, cs);
        int ret = qcow2_pwrite_compressed(img, ref + o, cs, o);
        ck_assert_msg(ret == 0, "compressed write at %llu: %s", (unsigned long long)o, err_msg(ret));
    }
    uint64_t zz = 5 * MiB; /* zeroes: a whole cluster, then part of one */
    memset(ref + zz, 0, cs);
    ck_assert_int_eq(qcow2_pwrite_zeroes(img, zz, cs), 0);
    memset(ref + zz + cs + 10, 0, 100);
    ck_assert_int_eq(qcow2_pwrite_zeroes(img, zz + cs + 10, 100), 0);
    put(img, ref, 6 * MiB - 64 * 1024, MiB + 64 * 1024); /* across an L2 table's reach */
    for (uint64_t o = 7 * MiB; o < 15 * MiB; o += MiB)   /* past a refcount block's reach */
        put(img, ref, o, MiB);
    put(img, ref, 15 * MiB, size - 15 * MiB); /* a short last cluster */
    int ret = qcow2_flush(img);
    ck_assert_msg(ret == 0, "flush: %s", err_msg(ret));
    ret = qcow2_close(img);
    ck_assert_msg(ret == 0, "close: %s", err_msg(ret));

    /* the engine itself read and wrote nothing it had released (those fail);
     * a reader of the staged object now would */
    ck_assert_int_eq(qcow2_open(uri, NULL, &img), 0);
    unsigned char *buf = malloc(size);
    ck_assert(buf != NULL);
    ck_assert_int_eq(qcow2_pread(img, buf, cs, 0), -EIO);
    ck_assert_int_eq(qcow2_pread(img, buf, cs, pc), 0);
    ck_assert(memcmp(buf, ref + pc, cs) == 0);
    qcow2_close(img);
    ck_assert_int_eq(vfs_pending_commit(p, 0), 0);
    vfs_pending_end(p);

    /* every released byte is in a data cluster, never in metadata */
    ck_assert_int_eq(vfs_open("mem:rel/c/t.qcow2", VFS_O_RDONLY, &f), 0);
    uint64_t nguest = (size + cs - 1) / cs, n;
    uint64_t *gh = calloc(nguest, 8);
    ck_assert(gh != NULL);
    unsigned cbits;
    unsigned char *map = host_map(f, &n, &cbits, gh, nguest);
    ck_assert_uint_eq(1u << cbits, cs);
    vfs_close(f);
    uint64_t released = 0, packed = 0;
    unsigned char *hit = calloc(n, 1);
    ck_assert(hit != NULL);
    for (unsigned i = 0; i < rel.n; i++) {
        ck_assert_uint_eq(rel.r[i].off % cs, 0);
        ck_assert_uint_eq(rel.r[i].len % cs, 0);
        for (uint64_t c = rel.r[i].off / cs; c < (rel.r[i].off + rel.r[i].len) / cs; c++) {
            ck_assert_msg(c < n && (map[c] == HC_DATA || map[c] == HC_PACKED), "released host cluster %llu holds %s",
                          (unsigned long long)c, c >= n || map[c] == HC_FREE ? "nothing" : "metadata");
            ck_assert_msg(!hit[c], "host cluster %llu released twice", (unsigned long long)c);
            hit[c] = 1;
            released += cs;
            packed += map[c] == HC_PACKED;
        }
    }
    /* the L2 tables were made side by side, not between the data */
    uint64_t first = n, last = 0, tables = 0, reach = cs * (cs / (ext ? 16 : 8));
    for (uint64_t c = 0; c < n; c++)
        if (map[c] == HC_L2) {
            first = c < first ? c : first;
            last = c;
            tables++;
        }
    ck_assert_uint_eq(tables, (size + reach - 1) / reach);
    ck_assert_uint_eq(last - first + 1, tables);
    /* so were the refcount blocks after the one qcow2_create made (with 4 KiB
     * clusters a block counts 8 MiB: the file needs a second one) */
    uint64_t blocks = 0;
    first = n;
    for (uint64_t c = 0; c < n; c++)
        if (map[c] == HC_RB && blocks++ == 1)
            first = c;
        else if (map[c] == HC_RB && blocks > 1)
            ck_assert_msg(c == first + blocks - 2, "refcount block %llu apart", (unsigned long long)c);
    if (!ext)
        ck_assert_uint_gt(blocks, 2);
    /* what was written whole is released: runs, single and compressed clusters */
    ck_assert(hit[gh[0] / cs] && hit[gh[MiB / cs] / cs] && hit[gh[8 * MiB / cs] / cs]);
    ck_assert_uint_gt(packed, 4);
    ck_assert_uint_ge(released, 6 * MiB);
    /* partial writes are not: they were completed in place, or a tail */
    ck_assert(gh[pc / cs] && !hit[gh[pc / cs] / cs]);
    ck_assert(gh[(size - 1) / cs] && !hit[gh[(size - 1) / cs] / cs]);
    free(hit);
    free(map);
    free(gh);

    /* qemu-img agrees the image is consistent */
    for (int i = 0; i < 2; i++) {
        const char *names[] = {"base.qcow2", "t.qcow2"};
        char u[64], path[256];
        snprintf(u, sizeof u, "mem:rel/c/%s", names[i]);
        snprintf(path, sizeof path, "%s/%s", tmpdir, names[i]);
        uint64_t fs;
        ck_assert_int_eq(vfs_open(u, VFS_O_RDONLY, &f), 0);
        ck_assert_int_eq(vfs_size(f, &fs), 0);
        unsigned char *b = malloc(fs);
        ck_assert(b != NULL);
        ck_assert_int_eq(vfs_pread(f, b, fs, 0), 0);
        vfs_close(f);
        FILE *out = fopen(path, "wb");
        ck_assert(out != NULL && fwrite(b, 1, fs, out) == fs);
        fclose(out);
        free(b);
    }
    sh("qemu-img check -q t.qcow2");
    /* and the image is whole: check finds nothing, it reads what was written */
    ck_assert_int_eq(qcow2_open("mem:rel/c/t.qcow2", NULL, &img), 0);
    struct qcow2_check_result cr;
    ck_assert_int_eq(qcow2_check(img, QCOW2_REPAIR_NONE, &cr, NULL, NULL), 0);
    ck_assert_uint_eq(cr.corruptions, 0);
    ck_assert_uint_eq(cr.leaks, 0);
    ck_assert_uint_gt(cr.compressed_clusters, 16);
    ck_assert_int_eq(qcow2_pread(img, buf, size, 0), 0);
    ck_assert(memcmp(buf, ref, size) == 0);
    qcow2_close(img);
    vfs_remove("mem:rel/c/t.qcow2");
    vfs_remove("mem:rel/c/base.qcow2");
    free(buf);
    free(ref);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("qcow2");
    TCase *tc = tcase_create("read");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, reads_plain_zero_and_compressed_clusters);
    tcase_add_test(tc, reads_zstd_and_extended_l2);
    tcase_add_test(tc, reads_runs_of_compressed_clusters_with_gaps);
    tcase_add_test(tc, reads_through_a_backing_chain_in_mem);
    tcase_add_test(tc, reads_a_snapshot_view);
    tcase_add_test(tc, refuses_a_file_without_magic_unless_raw);
    tcase_add_test(tc, block_status_reports_zero_data_and_unallocated);
    tcase_add_test(tc, parallel_readers_see_the_right_bytes);
    tcase_add_test(tc, a_writer_and_readers_share_an_image);
    tcase_add_test(tc, snapshot_with_more_l2_tables_than_the_cache);
    tcase_add_test(tc, check_counts_an_l2_table_over_the_header_as_corruption);
    tcase_add_test(tc, check_rebuilds_a_misaligned_refcount_block);
    tcase_add_test(tc, check_finds_a_zero_byte_image_clean);
    tcase_add_test(tc, pinned_runs_keep_their_bytes);
    tcase_add_test(tc, cursor_checks_every_step);
    tcase_add_test(tc, budget_refuses_tables_that_need_more);
    tcase_add_test(tc, budget_counts_the_snapshot_table);
    tcase_add_test(tc, a_dirty_image_opens_read_only_without_rebuild);
    tcase_add_test(tc, dirty_query_reads_stored_bitmaps_a_piece_at_a_time);
    tcase_add_test(tc, snapshot_create_stops_at_the_budget_and_leaves_the_image_whole);
    tcase_add_test(tc, generation_moves_with_every_change_and_is_claimed_once);
    tcase_add_test(tc, meta_ranges_cover_every_read_of_the_open);
    tcase_add_test(tc, meta_ranges_refuse_hostile_headers);
    tcase_add_loop_test(tc, release_data_hands_over_only_data_written_once, 0, 2);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
