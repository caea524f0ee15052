/* temp.c: temporary names in the catalog folder (never listed), the host id
 * they record, and the removal of those a dead process left behind. */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "catalog_int.h"
#include "err.h"
#include "qcow2.h"
#include "vfs.h"

/* A new temporary URI in the catalog folder: ".KIND-NAME@HOST-PID-SEQ.tmp",
 * which is never an image name (it starts with '.' and lacks the suffix), HOST
 * being cat_host_id()'s. */
char *cat_temp_uri(struct catalog *c, const char *kind, const char *name)
{
    pthread_mutex_lock(&c->lock);
    unsigned long seq = ++c->seq;
    pthread_mutex_unlock(&c->lock);
    char *uri;
    const char *sep = c->root[strlen(c->root) - 1] == '/' ? "" : "/";
    if (asprintf(&uri, "%s%s.%s-%s@%s-%ld-%lu.tmp", c->root, sep, kind, name, c->host, (long)getpid(), seq) < 0)
        return NULL;
    return uri;
}

/* Where kill(pid, 0) means something: this boot of this kernel, in this pid
 * namespace. Several daemons on one bucket (other machines, other containers)
 * write temporary names too, and a pid of theirs says nothing here. So HOST is
 * 16 hex digits of the kernel's random boot id, '.', and the pid namespace's
 * inode in hex; without /proc, 'r' and random digits (no name is ever judged
 * by its pid then, only by its age). */
void cat_host_id(char *out, size_t cap)
{
    char boot[64] = "", hex[17] = "";
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f) {
        if (!fgets(boot, sizeof boot, f))
            boot[0] = '\0';
        fclose(f);
    }
    size_t n = 0;
    for (const char *p = boot; *p && n < 16; p++)
        if ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))
            hex[n++] = *p;
    hex[n] = '\0';
    struct stat ns;
    if (n == 16 && stat("/proc/self/ns/pid", &ns) == 0) {
        snprintf(out, cap, "%s.%llx", hex, (unsigned long long)ns.st_ino);
        return;
    }
    unsigned long long r = 0;
    f = fopen("/dev/urandom", "r");
    if (!f || fread(&r, sizeof r, 1, f) != 1)
        r = (unsigned long long)time(NULL) ^ ((unsigned long long)getpid() << 32);
    if (f)
        fclose(f);
    snprintf(out, cap, "r%016llx", r);
}

/* Temporary names older than this (by their mtime) are stale whoever made them. */
#define TEMP_MAX_AGE (24 * 3600)

static int64_t temp_max_age(void)
{
    const char *v = getenv("QCOWD_TEST_TEMP_AGE"); /* the tests' seam: objects cannot be aged */
    return v && *v ? strtoll(v, NULL, 10) : TEMP_MAX_AGE;
}

/* Whether file is a temporary name of temp_uri left behind: ".create-",
 * ".upload-" or ".convert-", NAME, then "@HOST-PID-SEQ.tmp" (names from before
 * hosts were recorded lack "@HOST"). Stale when HOST is this one and its
 * process is gone, or when it has not changed for TEMP_MAX_AGE (any host: a
 * machine gone for good, or this one before a reboot). why gets the reason. */
/* The length of the ".KIND-" prefix when file starts as a temporary name of a
 * create, an upload or a convert, else 0. */
static size_t temp_prefix(const char *file)
{
    static const char *const kinds[] = {".create-", ".upload-", ".convert-"};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (!strncmp(file, kinds[i], strlen(kinds[i])))
            return strlen(kinds[i]);
    return 0;
}

static bool is_temp_name(const char *file)
{
    return temp_prefix(file) > 0;
}

static bool stale_temp(struct catalog *c, const char *file, char *why, size_t cap)
{
    size_t pre = temp_prefix(file);
    if (!pre)
        return false;
    size_t n = strlen(file);
    if (n < pre + 4 || strcmp(file + n - 4, ".tmp"))
        return false;
    /* PID and SEQ are the last two '-' fields (names may hold '-' too; '@' never) */
    const char *end = file + n - 4, *p = end;
    int dashes = 0;
    while (p > file + pre && dashes < 2)
        if (*--p == '-')
            dashes++;
    if (dashes < 2)
        return false;
    char *after;
    long pid = strtol(p + 1, &after, 10);
    if (*after != '-' || pid <= 0)
        return false;
    const char *at = strrchr(file, '@');
    char host[64] = "";
    if (at && at < p && (size_t)(p - at - 1) < sizeof host)
        snprintf(host, sizeof host, "%.*s", (int)(p - at - 1), at + 1);
    if (!strcmp(host, c->host) && pid != (long)getpid() && kill((pid_t)pid, 0) < 0 && errno == ESRCH) {
        snprintf(why, cap, "its process %ld on this host is gone", pid);
        return true;
    }
    char *uri = catalog_path(c, file);
    struct vfs_stat st;
    int r = uri ? vfs_stat(uri, &st) : -ENOMEM;
    free(uri);
    err_clear();
    int64_t age = r == 0 && st.mtime > 0 ? (int64_t)time(NULL) - st.mtime : -1;
    if (age < 0 || age <= temp_max_age())
        return false;
    snprintf(why, cap, "not changed for %lld hours; made by process %ld on %s", (long long)(age / 3600), pid,
             !host[0] ? "a host not recorded" : !strcmp(host, c->host) ? "this host" : "another host");
    return true;
}

/* Temporary names of the folder (candidates, judged after the listing). */
static int collect_temp(void *ctx, const char *file)
{
    struct name_list *l = ctx;
    if (!is_temp_name(file))
        return 0;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        char **v = realloc(l->v, cap * sizeof *v);
        if (!v)
            return -ENOMEM;
        l->v = v;
        l->cap = cap;
    }
    if (!(l->v[l->n] = strdup(file)))
        return -ENOMEM;
    l->n++;
    return 0;
}

int catalog_clean_temp(struct catalog *c, void (*note)(void *ctx, const char *file, const char *why, int err),
                       void *ctx)
{
    struct name_list l = {0};
    int ret = vfs_list(c->root, collect_temp, &l);
    if (ret < 0) {
        catalog_names_free(l.v, l.n);
        return ret == -ENOMEM ? err_fail(ENOMEM, "out of memory") : err_prefix(ret, "listing the catalog");
    }
    int removed = 0;
    for (size_t i = 0; i < l.n; i++) {
        char why[160];
        if (!stale_temp(c, l.v[i], why, sizeof why))
            continue;
        char *uri = catalog_path(c, l.v[i]);
        if (!uri) {
            ret = err_fail(ENOMEM, "out of memory");
            break;
        }
        int r = vfs_remove(uri);
        free(uri);
        if (r == 0)
            removed++;
        if (note)
            note(ctx, l.v[i], why, r);
    }
    catalog_names_free(l.v, l.n);
    return ret < 0 ? ret : removed;
}
