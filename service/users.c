/* users.c: the backing-user index: for each catalog image, the catalog image its
 * backing file names, so "whose backing file is this?" is a lookup, not a scan. */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "catalog_int.h"
#include "err.h"
#include "vfs.h"

/* One image and the catalog name of its backing file. */
struct backing_link {
    char *name;
    char *backing; /* NULL: none, or a file that is not a catalog image */
    struct backing_link *next;
};

/* The catalog name a stored backing file name stands for ("vm1.qcow2" or
 * "./vm1.qcow2" -> "vm1"), or NULL when it is none (another folder, another
 * suffix: the catalog refuses such chains when it opens them anyway). A new
 * string; *oom set when memory ran out. */
static char *backing_name(const char *stored, bool *oom)
{
    if (!stored)
        return NULL;
    while (!strncmp(stored, "./", 2))
        stored += 2;
    size_t n = strlen(stored), sl = strlen(CATALOG_SUFFIX);
    if (n <= sl || strcmp(stored + n - sl, CATALOG_SUFFIX) || memchr(stored, '/', n))
        return NULL;
    char *name = strndup(stored, n - sl);
    if (!name) {
        *oom = true;
        return NULL;
    }
    if (catalog_valid_name(name) < 0) {
        err_clear();
        free(name);
        return NULL;
    }
    return name;
}

static uint64_t be(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* The backing file name stored in the header of uri (*stored NULL: none). Reads
 * only the two header fields that locate it (backing_file_offset at byte 8,
 * backing_file_size at byte 16) and the name: no engine open of a chain. */
static int read_backing(const char *uri, char **stored)
{
    struct vfs_file *f;
    int ret = vfs_open(uri, VFS_O_RDONLY, &f);
    if (ret < 0)
        return ret;
    unsigned char h[20];
    *stored = NULL;
    ret = vfs_pread(f, h, sizeof h, 0);
    if (ret == 0 && memcmp(h, "QFI\xfb", 4))
        ret = -EINVAL;
    uint64_t off = ret == 0 ? be(h + 8, 8) : 0;
    uint64_t len = ret == 0 ? be(h + 16, 4) : 0;
    if (ret == 0 && off && len && len <= 1023) {
        char *s = calloc(1, (size_t)len + 1);
        ret = s ? vfs_pread(f, s, (size_t)len, off) : -ENOMEM;
        if (ret == 0 && strlen(s) == len)
            *stored = s;
        else
            free(s);
    }
    vfs_close(f);
    return ret;
}

/* With admit_lock held: the link of name, or NULL. */
static struct backing_link *link_of(struct catalog *c, const char *name)
{
    for (struct backing_link *l = c->links; l; l = l->next)
        if (!strcmp(l->name, name))
            return l;
    return NULL;
}

/* With admit_lock held: record name -> backing (taken; NULL: none). */
static int set_link(struct catalog *c, const char *name, char *backing)
{
    struct backing_link *l = link_of(c, name);
    if (!l) {
        l = calloc(1, sizeof *l);
        if (!l || !(l->name = strdup(name))) {
            free(l);
            free(backing);
            return -ENOMEM;
        }
        l->next = c->links;
        c->links = l;
    } else {
        free(l->backing);
    }
    l->backing = backing;
    return 0;
}

static void drop_link(struct catalog *c, const char *name)
{
    for (struct backing_link **p = &c->links; *p; p = &(*p)->next)
        if (!strcmp((*p)->name, name)) {
            struct backing_link *l = *p;
            *p = l->next;
            free(l->name);
            free(l->backing);
            free(l);
            return;
        }
}

/* Fill the index once: one listing and one header read per image, outside any
 * lock. A link recorded meanwhile (an install, an open) wins over what the scan
 * read; a removal meanwhile (c->links_gen moves) makes the scan start again,
 * since it may have read the image before it went. */
static int fill(struct catalog *c)
{
    for (;;) {
        pthread_mutex_lock(&c->admit_lock);
        bool ready = c->links_ready;
        uint64_t gen = c->links_gen;
        pthread_mutex_unlock(&c->admit_lock);
        if (ready)
            return 0;
        char **names;
        size_t n;
        int ret = catalog_list(c, &names, &n);
        if (ret < 0)
            return ret;
        char **backs = calloc(n ? n : 1, sizeof *backs);
        bool oom = !backs;
        for (size_t i = 0; i < n && !oom; i++) {
            char *uri = cat_image_uri(c, names[i]), *stored = NULL;
            if (!uri || (read_backing(uri, &stored) == 0 && stored && !(backs[i] = backing_name(stored, &oom)) && oom))
                oom = true;
            free(stored);
            free(uri);
        }
        err_clear();
        pthread_mutex_lock(&c->admit_lock);
        bool again = c->links_gen != gen;
        for (size_t i = 0; i < n && !oom && !again && !c->links_ready; i++) {
            if (link_of(c, names[i]))
                continue; /* recorded meanwhile: newer than what the scan read */
            if (set_link(c, names[i], backs[i]) < 0)
                oom = true;
            backs[i] = NULL; /* taken, or freed by set_link */
        }
        if (!oom && !again)
            c->links_ready = true;
        pthread_mutex_unlock(&c->admit_lock);
        for (size_t i = 0; backs && i < n; i++)
            free(backs[i]);
        free(backs);
        catalog_names_free(names, n);
        if (oom)
            return err_fail(ENOMEM, "out of memory");
    }
}

void cat_users_set(struct catalog *c, const char *name, const char *stored)
{
    bool oom = false;
    char *b = backing_name(stored, &oom);
    pthread_mutex_lock(&c->admit_lock);
    if (oom || set_link(c, name, b) < 0)
        c->links_ready = false; /* a link is missing: filled again at the next need */
    pthread_mutex_unlock(&c->admit_lock);
}

void cat_users_reread(struct catalog *c, const char *name)
{
    char *uri = cat_image_uri(c, name), *stored = NULL;
    int ret = uri ? read_backing(uri, &stored) : -ENOMEM;
    free(uri);
    if (ret == 0) {
        cat_users_set(c, name, stored);
    } else {
        pthread_mutex_lock(&c->admit_lock);
        c->links_gen++;
        drop_link(c, name);
        if (ret != -ENOENT)
            c->links_ready = false;
        pthread_mutex_unlock(&c->admit_lock);
    }
    free(stored);
    err_clear();
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

void cat_users_listed(struct catalog *c, char *const *names, size_t n)
{
    pthread_mutex_lock(&c->admit_lock);
    bool ready = c->links_ready;
    pthread_mutex_unlock(&c->admit_lock);
    if (!ready)
        return; /* the first need fills it all */
    for (size_t i = 0; i < n; i++) {
        pthread_mutex_lock(&c->admit_lock);
        bool known = link_of(c, names[i]) != NULL;
        pthread_mutex_unlock(&c->admit_lock);
        if (!known) /* put in the folder behind qcowd's back */
            cat_users_reread(c, names[i]);
    }
    /* and those gone behind its back (names is sorted) */
    pthread_mutex_lock(&c->admit_lock);
    for (struct backing_link **p = &c->links; *p;) {
        struct backing_link *l = *p;
        const char *key = l->name;
        if (n && bsearch(&key, names, n, sizeof *names, cmp_name)) {
            p = &l->next;
            continue;
        }
        *p = l->next;
        free(l->name);
        free(l->backing);
        free(l);
        c->links_gen++;
    }
    pthread_mutex_unlock(&c->admit_lock);
}

void cat_users_drop(struct catalog *c, const char *name)
{
    pthread_mutex_lock(&c->admit_lock);
    c->links_gen++;
    drop_link(c, name);
    pthread_mutex_unlock(&c->admit_lock);
}

int cat_users_refuse(struct catalog *c, const char *name)
{
    int ret = fill(c);
    if (ret < 0)
        return ret;
    char users[256] = "";
    size_t n = 0;
    pthread_mutex_lock(&c->admit_lock);
    for (const struct backing_link *l = c->links; l; l = l->next)
        if (l->backing && !strcmp(l->backing, name) && strcmp(l->name, name)) {
            size_t len = strlen(users);
            if (len + strlen(l->name) + 8 < sizeof users)
                snprintf(users + len, sizeof users - len, "%s'%s'", n ? ", " : "", l->name);
            n++;
        }
    pthread_mutex_unlock(&c->admit_lock);
    if (!n)
        return 0;
    return err_fail(ETXTBSY, "image '%s' is in the backing chain of image%s %s%s", name, n > 1 ? "s" : "", users,
                    n > 1 && strlen(users) + 40 > sizeof users ? " and more" : "");
}

int catalog_backing_users(struct catalog *c, const char *name, int (*fn)(void *ctx, const char *user), void *ctx)
{
    int ret = fill(c);
    /* a job changes what its users read: one listing first, so images put in
     * the folder behind qcowd's back are known too (only their headers read) */
    char **names;
    size_t n;
    if (ret == 0 && (ret = catalog_list(c, &names, &n)) == 0)
        catalog_names_free(names, n);
    if (ret < 0)
        return ret;
    /* the users, then their users...: collected under the lock, called without */
    struct name_list l = {0};
    pthread_mutex_lock(&c->admit_lock);
    const char *base = name;
    for (size_t next = 0; ret == 0;) {
        for (const struct backing_link *k = c->links; k && ret == 0; k = k->next) {
            if (!k->backing || strcmp(k->backing, base) || !strcmp(k->name, name))
                continue;
            bool seen = false;
            for (size_t i = 0; i < l.n && !seen; i++)
                seen = !strcmp(l.v[i], k->name);
            if (seen) /* a loop: the engine refuses such chains */
                continue;
            if (l.n == l.cap) {
                size_t cap = l.cap ? l.cap * 2 : 8;
                char **v = realloc(l.v, cap * sizeof *v);
                if (!v) {
                    ret = -ENOMEM;
                    break;
                }
                l.v = v;
                l.cap = cap;
            }
            if (!(l.v[l.n] = strdup(k->name)))
                ret = -ENOMEM;
            else
                l.n++;
        }
        if (next == l.n)
            break;
        base = l.v[next++]; /* then the users of each user */
    }
    pthread_mutex_unlock(&c->admit_lock);
    if (ret < 0) {
        catalog_names_free(l.v, l.n);
        return err_fail(ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < l.n && ret == 0; i++)
        ret = fn(ctx, l.v[i]);
    catalog_names_free(l.v, l.n);
    return ret;
}

void cat_users_free(struct catalog *c)
{
    while (c->links) {
        struct backing_link *l = c->links;
        c->links = l->next;
        free(l->name);
        free(l->backing);
        free(l);
    }
}
