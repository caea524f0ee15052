/* crash_writer.c: the writer that crash.py kills, and the oracle that judges
 * what survived. Every op is a pure function of (seed, op number, disk size,
 * cluster size), so the expected guest bytes can be regenerated at any time.
 *
 *   crash_writer run IMG SEED FIRST COUNT FLUSH_EVERY JOURNAL PROGRESS
 *       Open IMG read-write and run ops FIRST, FIRST+1, ... (COUNT of them, or
 *       forever when COUNT is 0: then it dies with its parent, and after two
 *       minutes by SIGALRM at the latest). Before op i starts, "i\n" is appended to
 *       PROGRESS (write(2) only: a SIGKILL keeps the page cache, so the line
 *       survives the kill; it is no durability claim). After every FLUSH_EVERY
 *       ops, and at the end, qcow2_flush runs; once it returns, "i\n" is
 *       appended to JOURNAL and the journal is fsynced. Exit 0 after a clean
 *       close, 1 on any engine error (printed).
 *   crash_writer expect SEED SIZE CLUSTER BASE.raw OUT.raw FIRST LAST
 *       Write OUT.raw: BASE.raw with ops FIRST..LAST applied.
 *   crash_writer verify SEED SIZE CLUSTER BASE.raw ACTUAL.raw N K
 *       Judge ACTUAL.raw (the guest disk after the kill, as qemu-img reads it)
 *       against BASE.raw (the disk before the run) with ops 1..N journaled and
 *       ops N+1..K started (see verify() for the rule). Exit 0 and print
 *       "ok ..." when it holds; else exit 1 and name the first bad byte.
 *
 * Deterministic crash points (the sweeps of crash.py): with CRASH_DIE_AT=N in the
 * environment, run opens the image through a "die:" backend registered here that
 * ends the process with _exit(75) just before the Nth call that changes storage
 * (pwrite, flush, truncate, discard): the files then hold exactly the calls before
 * it, the state a SIGKILL at that instant leaves. With CRASH_FAIL_AT=N the Nth such
 * call fails with EIO instead (the writer reports the failed op and closes), and
 * with CRASH_DIE_AFTER=M as well, the process dies just before the Mth changing
 * call after that: a storage error, the engine's reaction, then a crash.
 * CRASH_COUNT_FILE=PATH: on a clean exit, write the number of changing calls there.
 *
 * Ops: 80% writes of 1 byte .. 300 KiB at random offsets (half of them in the
 * first eighth of the disk, so later ops overwrite earlier ones and clusters
 * get rewritten, copied and freed), 10% zero writes of an arbitrary range, 10%
 * discards of whole clusters (their result is defined: zeroes on a v3 image,
 * which every crash case uses). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "qcow2.h"
#include "vfs.h"

#define MAX_WRITE (300u * 1024)

enum op_kind { OP_WRITE, OP_ZERO, OP_DISCARD };

struct op {
    enum op_kind kind;
    uint64_t off, len;
    uint64_t data_seed; /* OP_WRITE: the byte stream's seed */
};

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [lo, hi] (hi >= lo). */
static uint64_t uniform(uint64_t *s, uint64_t lo, uint64_t hi)
{
    return lo + splitmix(s) % (hi - lo + 1);
}

/* Op number i of the run seeded with seed, on a disk of size bytes (a multiple
 * of cs). */
static struct op gen_op(uint64_t seed, uint64_t i, uint64_t size, uint64_t cs)
{
    uint64_t s = seed * 0x2545f4914f6cdd1dull ^ (i * 0x9e3779b97f4a7c15ull);
    struct op op = {0};
    splitmix(&s);
    unsigned pick = (unsigned)uniform(&s, 0, 99);
    uint64_t span = uniform(&s, 0, 1) ? size : (size / 8 > cs ? size / 8 : size);
    if (pick < 80) {
        unsigned cls = (unsigned)uniform(&s, 0, 3);
        uint64_t maxlen = cls == 0 ? 512 : cls == 1 ? 2 * cs : MAX_WRITE;
        if (maxlen > MAX_WRITE)
            maxlen = MAX_WRITE;
        if (maxlen > span)
            maxlen = span;
        op.kind = OP_WRITE;
        op.len = uniform(&s, 1, maxlen);
        op.off = uniform(&s, 0, span - op.len);
        if (uniform(&s, 0, 3) == 0) /* some start on a cluster boundary */
            op.off -= op.off % cs;
        op.data_seed = splitmix(&s);
    } else if (pick < 90) {
        uint64_t maxlen = 4 * cs < (1u << 20) ? 4 * cs : (1u << 20);
        if (maxlen > span)
            maxlen = span;
        op.kind = OP_ZERO;
        op.len = uniform(&s, 1, maxlen);
        op.off = uniform(&s, 0, span - op.len);
    } else {
        uint64_t nclusters = span / cs, n = uniform(&s, 1, nclusters < 16 ? nclusters : 16);
        op.kind = OP_DISCARD;
        op.off = uniform(&s, 0, nclusters - n) * cs;
        op.len = n * cs;
    }
    return op;
}

/* The bytes a write op puts down (buf holds op->len bytes). */
static void op_data(const struct op *op, unsigned char *buf)
{
    uint64_t s = op->data_seed;
    for (uint64_t k = 0; k < op->len; k += 8) {
        uint64_t v = splitmix(&s);
        size_t n = op->len - k < 8 ? (size_t)(op->len - k) : 8;
        memcpy(buf + k, &v, n);
    }
}

/* Apply op to a raw guest image in memory. */
static void apply(const struct op *op, unsigned char *disk, unsigned char *tmp)
{
    if (op->kind == OP_WRITE) {
        op_data(op, tmp);
        memcpy(disk + op->off, tmp, op->len);
    } else {
        memset(disk + op->off, 0, op->len); /* zero; or discard of whole clusters on v3 */
    }
}

static const char *kind_name(enum op_kind k)
{
    return k == OP_WRITE ? "write" : k == OP_ZERO ? "zero" : "discard";
}

static int parse_u64(const char *s, uint64_t *v)
{
    char *end;
    errno = 0;
    unsigned long long x = strtoull(s, &end, 0);
    if (errno || end == s || *end || *s == '-')
        return fprintf(stderr, "crash_writer: bad number '%s'\n", s), -1;
    *v = x;
    return 0;
}

/* ---- the "die:" backend: forwards to the inner URI, counts changing calls ---- */

#define DIE_EXIT 75

static unsigned long die_at, fail_at, die_after, changing_calls;

/* Count one changing call; die or fail when it is the chosen one. */
static int changing_call(void)
{
    unsigned long n = ++changing_calls;
    if (die_at && n == die_at)
        _exit(DIE_EXIT);
    if (fail_at && n == fail_at)
        return err_fail(EIO, "crash_writer: injected EIO at changing call #%lu", n);
    if (fail_at && die_after && n == fail_at + die_after)
        _exit(DIE_EXIT);
    return 0;
}

static int die_open(const char *path, unsigned flags, void **handle)
{
    struct vfs_file *f;
    int ret = vfs_open(path, flags, &f);
    if (ret == 0)
        *handle = f;
    return ret;
}

static void die_close(void *h)
{
    vfs_close(h);
}

static int die_pread(void *h, void *buf, size_t len, uint64_t off)
{
    return vfs_pread(h, buf, len, off);
}

static int die_pwrite(void *h, const void *buf, size_t len, uint64_t off)
{
    int ret = changing_call();
    return ret < 0 ? ret : vfs_pwrite(h, buf, len, off);
}

static int die_flush(void *h)
{
    int ret = changing_call();
    return ret < 0 ? ret : vfs_flush(h);
}

static int die_size(void *h, uint64_t *size)
{
    return vfs_size(h, size);
}

static int die_truncate(void *h, uint64_t size)
{
    int ret = changing_call();
    return ret < 0 ? ret : vfs_truncate(h, size);
}

static int die_discard(void *h, uint64_t off, uint64_t len)
{
    int ret = changing_call();
    return ret < 0 ? ret : vfs_discard(h, off, len);
}

static unsigned die_caps(void *h)
{
    return vfs_caps(h);
}

static int die_block_status(void *h, uint64_t off, uint64_t len, uint64_t *pnum)
{
    return vfs_block_status(h, off, len, pnum);
}

static int die_stat(const char *path, struct vfs_stat *st)
{
    return vfs_stat(path, st);
}

static const struct vfs_ops die_ops = {
    .version = VFS_OPS_VERSION,
    .struct_size = sizeof(struct vfs_ops),
    .name = "die",
    .thread_model = VFS_THREAD_SERIALIZE,
    .open = die_open,
    .close = die_close,
    .pread = die_pread,
    .pwrite = die_pwrite,
    .flush = die_flush,
    .size = die_size,
    .truncate = die_truncate,
    .discard = die_discard,
    .caps = die_caps,
    .block_status = die_block_status,
    .stat = die_stat,
};

static unsigned long env_ulong(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? strtoul(v, NULL, 10) : 0;
}

static int append_line(int fd, uint64_t i, bool sync)
{
    char line[32];
    int n = snprintf(line, sizeof line, "%" PRIu64 "\n", i);
    if (write(fd, line, (size_t)n) != n || (sync && fsync(fd) < 0)) {
        perror("crash_writer: journal");
        return -1;
    }
    return 0;
}

static int do_flush(struct qcow2_image *img, int journal, uint64_t i)
{
    int ret = qcow2_flush(img);
    if (ret < 0) {
        fprintf(stderr, "crash_writer: flush after op %" PRIu64 ": %s\n", i, err_msg(ret));
        return -1;
    }
    return append_line(journal, i, true);
}

static int cmd_run(char **argv)
{
    const char *path = argv[0], *jpath = argv[5], *ppath = argv[6];
    uint64_t seed, first, count, every;
    if (parse_u64(argv[1], &seed) || parse_u64(argv[2], &first) || parse_u64(argv[3], &count) ||
        parse_u64(argv[4], &every) || every == 0)
        return 2;
    if (count == 0) {
        /* run until killed: never outlive the harness that is to kill us */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        alarm(120);
    }
    int journal = open(jpath, O_WRONLY | O_CREAT | O_APPEND, 0644);
    int progress = open(ppath, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (journal < 0 || progress < 0) {
        perror("crash_writer: opening the journal");
        return 1;
    }
    die_at = env_ulong("CRASH_DIE_AT");
    fail_at = env_ulong("CRASH_FAIL_AT");
    die_after = env_ulong("CRASH_DIE_AFTER");
    const char *count_file = getenv("CRASH_COUNT_FILE");
    char uri[4096];
    if (die_at || fail_at || count_file) {
        int r = vfs_register(&die_ops);
        if (r < 0) {
            fprintf(stderr, "crash_writer: registering die: %s\n", err_msg(r));
            return 1;
        }
        snprintf(uri, sizeof uri, "die:%s", path);
        path = uri;
    }
    struct qcow2_open_opts o = {.read_write = true};
    struct qcow2_image *img;
    int ret = qcow2_open(path, &o, &img);
    if (ret < 0) {
        fprintf(stderr, "crash_writer: %s: %s\n", path, err_msg(ret));
        return 1;
    }
    uint64_t size = qcow2_size(img), cs = qcow2_get_info(img)->cluster_size;
    unsigned char *buf = malloc(MAX_WRITE);
    int rc = buf ? 0 : 1;
    uint64_t i = first, last_flushed = first - 1;
    for (; rc == 0 && (count == 0 || i < first + count); i++) {
        struct op op = gen_op(seed, i, size, cs);
        if (append_line(progress, i, false) < 0) {
            rc = 1;
            break;
        }
        if (op.kind == OP_WRITE) {
            op_data(&op, buf);
            ret = qcow2_pwrite(img, buf, op.len, op.off);
        } else if (op.kind == OP_ZERO) {
            ret = qcow2_pwrite_zeroes(img, op.off, op.len);
        } else {
            ret = qcow2_discard(img, op.off, op.len);
        }
        if (ret < 0) {
            fprintf(stderr, "crash_writer: op %" PRIu64 " (%s %" PRIu64 "+%" PRIu64 "): %s\n", i, kind_name(op.kind),
                    op.off, op.len, err_msg(ret));
            rc = 1;
            break;
        }
        if (i % every == 0) {
            if (do_flush(img, journal, i) < 0)
                rc = 1;
            last_flushed = i;
        }
    }
    if (rc == 0 && last_flushed != i - 1 && do_flush(img, journal, i - 1) < 0)
        rc = 1;
    qcow2_close(img);
    free(buf);
    close(journal);
    close(progress);
    if (count_file && rc == 0) {
        FILE *f = fopen(count_file, "w");
        if (!f || fprintf(f, "%lu\n", changing_calls) < 0 || fclose(f) != 0) {
            perror("crash_writer: count file");
            rc = 1;
        }
    }
    return rc;
}

/* Read a whole raw file of exactly size bytes (shorter files are zero-padded). */
static unsigned char *load_raw(const char *path, uint64_t size)
{
    unsigned char *d = calloc(1, size ? size : 1);
    int fd = open(path, O_RDONLY);
    if (!d || fd < 0) {
        fprintf(stderr, "crash_writer: %s: %s\n", path, strerror(errno));
        free(d);
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    uint64_t got = 0;
    while (got < size) {
        ssize_t n = pread(fd, d + got, size - got > (1u << 24) ? (1u << 24) : size - got, (off_t)got);
        if (n < 0) {
            fprintf(stderr, "crash_writer: %s: %s\n", path, strerror(errno));
            free(d);
            close(fd);
            return NULL;
        }
        if (n == 0)
            break;
        got += (uint64_t)n;
    }
    close(fd);
    return d;
}

static int parse_geometry(char **argv, uint64_t *seed, uint64_t *size, uint64_t *cs)
{
    if (parse_u64(argv[0], seed) || parse_u64(argv[1], size) || parse_u64(argv[2], cs))
        return -1;
    if (*cs < 512 || (*cs & (*cs - 1)) || *size == 0 || *size % *cs)
        return fprintf(stderr, "crash_writer: size must be a non-zero multiple of a power-of-two cluster size\n"), -1;
    return 0;
}

static int cmd_expect(char **argv)
{
    uint64_t seed, size, cs, first, last;
    if (parse_geometry(argv, &seed, &size, &cs) || parse_u64(argv[5], &first) || parse_u64(argv[6], &last))
        return 2;
    unsigned char *disk = load_raw(argv[3], size), *tmp = malloc(MAX_WRITE);
    if (!disk || !tmp)
        return 1;
    for (uint64_t i = first; i <= last; i++) {
        struct op op = gen_op(seed, i, size, cs);
        apply(&op, disk, tmp);
    }
    FILE *f = fopen(argv[4], "wb");
    if (!f || fwrite(disk, 1, size, f) != size || fclose(f) != 0) {
        fprintf(stderr, "crash_writer: %s: %s\n", argv[4], strerror(errno));
        return 1;
    }
    free(disk);
    free(tmp);
    return 0;
}

/* The rule. A SIGKILL keeps every write(2) that returned (they sit in the page
 * cache), so the image file holds some prefix of the engine's system calls.
 * Ops 1..N had returned and a qcow2_flush after op N had returned (the journal
 * says so): whatever they wrote must read back, except where a later op may
 * have changed it. Ops N+1..K had started (K: the last line of the progress
 * file): each may be wholly, partly or not at all visible, since its data may
 * sit in a cluster whose L2 entry was still only in the cache. So a byte no op
 * after N touches must equal the state after op N exactly, and a byte that ops
 * after N touch must equal either that state or the value one of those ops
 * gave it. Nothing else is acceptable: in particular not bytes of another
 * guest offset or of an older state (a cluster freed and reused too early, an
 * L2 entry lost after its flush). */
static int cmd_verify(char **argv)
{
    uint64_t seed, size, cs, n, k;
    if (parse_geometry(argv, &seed, &size, &cs) || parse_u64(argv[5], &n) || parse_u64(argv[6], &k))
        return 2;
    unsigned char *ref = load_raw(argv[3], size), *act = load_raw(argv[4], size), *tmp = malloc(MAX_WRITE);
    unsigned char *ok = calloc(1, size);
    if (!ref || !act || !tmp || !ok)
        return 1;
    for (uint64_t i = 1; i <= n; i++) {
        struct op op = gen_op(seed, i, size, cs);
        apply(&op, ref, tmp);
    }
    for (uint64_t b = 0; b < size; b++)
        ok[b] = act[b] == ref[b];
    for (uint64_t i = n + 1; i <= k; i++) {
        struct op op = gen_op(seed, i, size, cs);
        if (op.kind == OP_WRITE)
            op_data(&op, tmp);
        for (uint64_t b = 0; b < op.len; b++)
            ok[op.off + b] |= act[op.off + b] == (op.kind == OP_WRITE ? tmp[b] : 0);
    }
    uint64_t bad = 0, first_bad = 0;
    for (uint64_t b = 0; b < size; b++)
        if (!ok[b] && bad++ == 0)
            first_bad = b;
    int rc = 0;
    if (bad) {
        printf("FAIL: %" PRIu64 " bytes hold neither the state after op %" PRIu64 " nor a value of ops %" PRIu64
               "..%" PRIu64 "; first at guest offset %" PRIu64 " (cluster %#" PRIx64 "): got %02x, after op %" PRIu64
               " %02x\n",
               bad, n, n + 1, k, first_bad, first_bad - first_bad % cs, act[first_bad], n, ref[first_bad]);
        for (uint64_t i = 1; i <= k; i++) {
            struct op op = gen_op(seed, i, size, cs);
            if (first_bad >= op.off && first_bad < op.off + op.len)
                printf("  op %" PRIu64 " %s %" PRIu64 "+%" PRIu64 " touches it\n", i, kind_name(op.kind), op.off,
                       op.len);
        }
        rc = 1;
    } else {
        printf("ok: matches ops 1..%" PRIu64 " with ops %" PRIu64 "..%" PRIu64 " in flight\n", n, n + 1, k);
    }
    free(ref);
    free(act);
    free(tmp);
    free(ok);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc == 9 && !strcmp(argv[1], "run"))
        return cmd_run(argv + 2);
    if (argc == 9 && !strcmp(argv[1], "expect"))
        return cmd_expect(argv + 2);
    if (argc == 9 && !strcmp(argv[1], "verify"))
        return cmd_verify(argv + 2);
    fprintf(stderr, "usage: crash_writer run IMG SEED FIRST COUNT FLUSH_EVERY JOURNAL PROGRESS\n"
                    "       crash_writer expect SEED SIZE CLUSTER BASE.raw OUT.raw FIRST LAST\n"
                    "       crash_writer verify SEED SIZE CLUSTER BASE.raw ACTUAL.raw N K\n");
    return 2;
}
