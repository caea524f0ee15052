/* fault.c: the "fault" filter: "fault:INNER-URI" forwards every call to INNER-URI,
 * counts opens, reads, writes, flushes and truncates across all fault handles, and
 * fails the armed one once, or every one from it on (vfs.h's test seam; QCOWD_FAULT
 * arms it from outside, also for one file only). */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "vfs.h"
#include "vfs_int.h"

#define NKINDS     (VFS_FAULT_OPEN + 1)
#define FAULT_KILL 100000 /* not an errno: "KILL" ends the process instead of failing the call */

/* The one armed fault and the counters, all under fault_lock. Counting goes on
 * whether or not a fault is armed; arming restarts it from zero. Only the five
 * kinds are counted (discard, size, block status, caps are not), and "any"
 * counts each of them but opens. With a match armed, only calls on files whose
 * URI contains it are counted (and can fail). */
static pthread_mutex_t fault_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t env_once = PTHREAD_ONCE_INIT;
static int armed, fired, armed_errnum, armed_sticky;
static enum vfs_fault_op armed_op;
static unsigned long armed_nth;
static char armed_match[256];
static unsigned long counts[NKINDS];

static const char *const kind_names[NKINDS] = {"read", "write", "flush", "truncate", "any", "open"};

/* Arm op's nth call (nth 0 never fires: a way to just count), and every later one
 * when sticky; errnum 0 means EIO; match "" for every file. */
static void arm(enum vfs_fault_op op, unsigned long nth, int errnum, int sticky, const char *match)
{
    pthread_mutex_lock(&fault_lock);
    armed = op >= 0 && op < NKINDS;
    armed_op = op;
    armed_nth = nth;
    armed_errnum = errnum ? abs(errnum) : EIO;
    armed_sticky = sticky;
    snprintf(armed_match, sizeof armed_match, "%s", match);
    fired = 0;
    memset(counts, 0, sizeof counts);
    pthread_mutex_unlock(&fault_lock);
}

/* QCOWD_FAULT="op:n[+]:errno[:match]", e.g. "write:3:ENOSPC", or
 * "open:1+:EACCES:locked.qcow2" (every open of that file fails). A malformed value
 * is reported on stderr and ignored, so a typo cannot pass for a run without
 * faults silently. */
static void parse_env(void)
{
    static const struct {
        const char *name;
        int value;
    } errnos[] = {{"EIO", EIO},       {"ENOSPC", ENOSPC}, {"EROFS", EROFS},
                  {"EACCES", EACCES}, {"EDQUOT", EDQUOT}, {"KILL", FAULT_KILL}};
    const char *env = getenv("QCOWD_FAULT");
    char opname[16], errname[32], *end;
    int op = -1, errnum = 0, sticky = 0;
    unsigned long nth;

    if (!env || !*env)
        return;
    const char *c1 = strchr(env, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    const char *c3 = c2 ? strchr(c2 + 1, ':') : NULL, *match = c3 ? c3 + 1 : "";
    size_t elen = c3 ? (size_t)(c3 - c2 - 1) : (c2 ? strlen(c2 + 1) : 0);
    if (!c2 || (size_t)(c1 - env) >= sizeof opname || elen >= sizeof errname || strlen(match) >= sizeof armed_match)
        goto bad;
    memcpy(opname, env, (size_t)(c1 - env));
    opname[c1 - env] = 0;
    memcpy(errname, c2 + 1, elen);
    errname[elen] = 0;
    for (int i = 0; i < NKINDS; i++)
        if (strcmp(opname, kind_names[i]) == 0)
            op = i;
    nth = strtoul(c1 + 1, &end, 10);
    if (*end == '+') {
        sticky = 1;
        end++;
    }
    if (op < 0 || end != c2 || c1[1] == '-' || nth < 1)
        goto bad;
    for (size_t i = 0; i < sizeof errnos / sizeof errnos[0]; i++)
        if (strcmp(errname, errnos[i].name) == 0)
            errnum = errnos[i].value;
    if (!errnum) {
        long v = strtol(errname, &end, 10);
        if (*end || end == errname || v < 1 || v > 4095)
            goto bad;
        errnum = (int)v;
    }
    arm((enum vfs_fault_op)op, nth, errnum, sticky, match);
    return;
bad:
    fprintf(stderr,
            "qcowd: ignoring QCOWD_FAULT=\"%s\": want OP:N[+]:ERRNO[:MATCH] with OP "
            "read|write|flush|truncate|any|open, N >= 1, ERRNO EIO|ENOSPC|EROFS|EACCES|EDQUOT|KILL or a number\n",
            env);
}

static void init(void)
{
    pthread_once(&env_once, parse_env);
}

void vfs_fault_arm(enum vfs_fault_op op, unsigned long nth, int errnum)
{
    init(); /* the environment must not override an arm made before first use */
    arm(op, nth, errnum, 0, "");
}

void vfs_fault_disarm(void)
{
    init();
    pthread_mutex_lock(&fault_lock);
    armed = 0;
    pthread_mutex_unlock(&fault_lock);
}

unsigned long vfs_fault_count(enum vfs_fault_op op)
{
    unsigned long n = 0;
    init();
    pthread_mutex_lock(&fault_lock);
    if (op >= 0 && op < NKINDS)
        n = counts[op];
    pthread_mutex_unlock(&fault_lock);
    return n;
}

int vfs_fault_fired(void)
{
    init();
    pthread_mutex_lock(&fault_lock);
    int f = fired;
    pthread_mutex_unlock(&fault_lock);
    return f;
}

/* Count one call of kind k on the file uri; if it is the armed one, fail it. */
static int tick(enum vfs_fault_op k, const char *uri)
{
    int e = 0;
    unsigned long n;
    pthread_mutex_lock(&fault_lock);
    if (armed_match[0] && !strstr(uri, armed_match)) {
        pthread_mutex_unlock(&fault_lock);
        return 0;
    }
    n = ++counts[k];
    if (k != VFS_FAULT_OPEN)
        ++counts[VFS_FAULT_ANY];
    if (armed && (!fired || armed_sticky) && (armed_op == k || (armed_op == VFS_FAULT_ANY && k != VFS_FAULT_OPEN)) &&
        (armed_sticky ? counts[armed_op] >= armed_nth : counts[armed_op] == armed_nth)) {
        fired = 1;
        e = armed_errnum;
    }
    pthread_mutex_unlock(&fault_lock);
    if (e == FAULT_KILL)
        raise(SIGKILL); /* a crash just before the call: the files hold exactly the calls before it */
    if (e)
        return err_fail(e, "%s %s: injected fault at %s #%lu: %s", kind_names[k], uri, kind_names[k], n, VFS_ESTR(e));
    return 0;
}

/* The handle is the inner vfs_file itself. */
#define IN(h) ((struct vfs_file *)(h))

static int fault_open(const char *path, unsigned flags, void **handle)
{
    struct vfs_file *inner;
    init();
    int r = tick(VFS_FAULT_OPEN, path);
    if (r == 0)
        r = vfs_open(path, flags, &inner);
    if (r < 0)
        return r;
    *handle = inner;
    return 0;
}

static void fault_close(void *h)
{
    vfs_close(IN(h));
}

static int fault_pread(void *h, void *buf, size_t len, uint64_t off)
{
    int r = tick(VFS_FAULT_READ, vfs_file_uri(IN(h)));
    return r < 0 ? r : vfs_pread(IN(h), buf, len, off);
}

static int fault_pwrite(void *h, const void *buf, size_t len, uint64_t off)
{
    int r = tick(VFS_FAULT_WRITE, vfs_file_uri(IN(h)));
    return r < 0 ? r : vfs_pwrite(IN(h), buf, len, off);
}

static int fault_flush(void *h)
{
    int r = tick(VFS_FAULT_FLUSH, vfs_file_uri(IN(h)));
    return r < 0 ? r : vfs_flush(IN(h));
}

static int fault_size(void *h, uint64_t *size)
{
    return vfs_size(IN(h), size);
}

static int fault_truncate(void *h, uint64_t size)
{
    int r = tick(VFS_FAULT_TRUNCATE, vfs_file_uri(IN(h)));
    return r < 0 ? r : vfs_truncate(IN(h), size);
}

static int fault_discard(void *h, uint64_t off, uint64_t len)
{
    return vfs_discard(IN(h), off, len);
}

static unsigned fault_caps(void *h)
{
    return vfs_caps(IN(h));
}

static int fault_block_status(void *h, uint64_t off, uint64_t len, uint64_t *pnum)
{
    return vfs_block_status(IN(h), off, len, pnum);
}

static int fault_list(const char *dir, int (*cb)(void *ctx, const char *name), void *ctx)
{
    return vfs_list(dir, cb, ctx);
}

static int fault_stat(const char *path, struct vfs_stat *st)
{
    return vfs_stat(path, st);
}

static int fault_remove(const char *path)
{
    return vfs_remove(path);
}

static int fault_rename(const char *from, const char *to)
{
    return vfs_rename(from, to);
}

const struct vfs_ops vfs__fault_ops = {
    .version = VFS_OPS_VERSION,
    .struct_size = sizeof(struct vfs_ops),
    .name = "fault",
    .thread_model = VFS_THREAD_PARALLEL,
    .open = fault_open,
    .close = fault_close,
    .pread = fault_pread,
    .pwrite = fault_pwrite,
    .flush = fault_flush,
    .size = fault_size,
    .truncate = fault_truncate,
    .discard = fault_discard,
    .caps = fault_caps,
    .block_status = fault_block_status,
    .list = fault_list,
    .stat = fault_stat,
    .remove = fault_remove,
    .rename = fault_rename,
};
