/* catalog.c: the catalog itself: new and free, image names and their files,
 * the listing, and the notifications of image changes. */
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

void cat_notify(struct catalog *c, const char *what, const char *name)
{
    if (c->notify)
        c->notify(c->notify_opaque, what, name);
}


static bool is_uri(const char *s)
{
    size_t n = strcspn(s, ":/");
    return n > 0 && s[n] == ':';
}

int catalog_new(const char *root, const struct catalog_opts *opts, struct catalog **out)
{
    struct catalog *c = calloc(1, sizeof *c);
    if (!c)
        return err_fail(ENOMEM, "out of memory");
    if (opts)
        c->opts = *opts;
    if (!c->opts.max_open)
        c->opts.max_open = CATALOG_DEFAULT_OPEN;
    if (!c->opts.max_upload)
        c->opts.max_upload = CATALOG_DEFAULT_UPLOAD;
    if (!c->opts.max_catalog)
        c->opts.max_catalog = CATALOG_UNLIMITED;
    if (!c->opts.max_virtual_size)
        c->opts.max_virtual_size = CATALOG_DEFAULT_VIRTUAL;
    int ret;
    if (is_uri(root)) {
        c->root = strdup(root);
        if (!c->root) {
            ret = err_fail(ENOMEM, "out of memory");
            goto fail;
        }
    } else {
        /* canonical, so the chain check below compares like with like */
        c->root = realpath(root, NULL);
        if (!c->root) {
            ret = err_fail(errno, "catalog folder %s: %s", root, strerror(errno));
            goto fail;
        }
    }
    size_t len = strlen(c->root);
    while (len > 1 && c->root[len - 1] == '/')
        c->root[--len] = '\0';
    struct vfs_stat st;
    ret = vfs_stat(c->root, &st);
    if (ret == -ENOENT && is_uri(c->root)) {
        /* an object store's folder exists once something is under it; asked as
         * "root/", a backend may take an empty prefix of a bucket as a folder */
        char *slashed;
        if (asprintf(&slashed, "%s/", c->root) >= 0) {
            ret = vfs_stat(slashed, &st);
            free(slashed);
        }
    }
    if (ret < 0) {
        ret = err_prefix(ret, "catalog folder %s", root);
        goto fail;
    }
    if (!st.is_dir) {
        ret = err_fail(ENOTDIR, "catalog folder %s is not a folder", root);
        goto fail;
    }
    cat_host_id(c->host, sizeof c->host);
    pthread_mutex_init(&c->lock, NULL);
    pthread_mutex_init(&c->admit_lock, NULL);
    pthread_mutex_init(&c->uploads_lock, NULL);
    pthread_mutex_init(&c->space_lock, NULL);
    pthread_cond_init(&c->closed, NULL);
    *out = c;
    return 0;
fail:
    free(c->root);
    free(c);
    return ret;
}

void catalog_free(struct catalog *c)
{
    if (!c)
        return;
    struct catalog_image *e = c->list;
    while (e) {
        struct catalog_image *next = e->next;
        if (--e->refs == 0)
            cat_entry_free(e);
        else
            fprintf(stderr, "catalog: image %s still in use at shutdown\n", e->name);
        e = next;
    }
    cat_uploads_free(c); /* they hold name reservations */
    cat_admit_free(c);
    cat_users_free(c);
    pthread_cond_destroy(&c->closed);
    pthread_mutex_destroy(&c->space_lock);
    pthread_mutex_destroy(&c->uploads_lock);
    pthread_mutex_destroy(&c->admit_lock);
    pthread_mutex_destroy(&c->lock);
    free(c->root);
    free(c);
}

int catalog_valid_name(const char *name)
{
    size_t n = strlen(name);
    if (n == 0)
        return err_fail(EINVAL, "image name is empty");
    if (n > CATALOG_NAME_MAX)
        return err_fail(EINVAL, "image name is %zu bytes long, more than %d", n, CATALOG_NAME_MAX);
    if (strstr(name, ".."))
        return err_fail(EINVAL, "image name contains \"..\"");
    if (strchr(name, '/'))
        return err_fail(EINVAL, "image name contains '/'");
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)name[i];
        bool alnum = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9');
        if (!alnum && (i == 0 || (ch != '.' && ch != '_' && ch != '-')))
            return err_fail(EINVAL, "image name has a character not allowed %s (0x%02x at byte %zu)",
                            i == 0 ? "first" : "in names", ch, i);
    }
    return 0;
}

char *cat_image_uri(const struct catalog *c, const char *name)
{
    char *uri;
    const char *sep = c->root[strlen(c->root) - 1] == '/' ? "" : "/";
    if (asprintf(&uri, "%s%s%s%s", c->root, sep, name, CATALOG_SUFFIX) < 0)
        return NULL;
    return uri;
}

/* ---- listing ---- */

static int collect(void *ctx, const char *file)
{
    struct name_list *l = ctx;
    size_t n = strlen(file), sl = strlen(CATALOG_SUFFIX);
    if (n <= sl || strcmp(file + n - sl, CATALOG_SUFFIX))
        return 0;
    char *name = strndup(file, n - sl);
    if (!name)
        return -ENOMEM;
    if (catalog_valid_name(name) < 0) {
        free(name); /* a file no URL can name: not part of the catalog */
        err_clear();
        return 0;
    }
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        char **v = realloc(l->v, cap * sizeof *v);
        if (!v) {
            free(name);
            return -ENOMEM;
        }
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = name;
    return 0;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int catalog_list(struct catalog *c, char ***names, size_t *count)
{
    struct name_list l = {0};
    int ret = vfs_list(c->root, collect, &l);
    if (ret < 0) {
        catalog_names_free(l.v, l.n);
        if (ret == -ENOMEM)
            return err_fail(ENOMEM, "out of memory");
        return err_prefix(ret, "listing the catalog");
    }
    if (l.n)
        qsort(l.v, l.n, sizeof *l.v, cmp_names);
    cat_users_listed(c, l.v, l.n);
    *names = l.v;
    *count = l.n;
    return 0;
}

void catalog_names_free(char **names, size_t count)
{
    for (size_t i = 0; i < count; i++)
        free(names[i]);
    free(names);
}

uint64_t catalog_max_meta(const struct catalog *c)
{
    return c->opts.max_meta_bytes;
}

char *catalog_uri(struct catalog *c, const char *name)
{
    return cat_image_uri(c, name);
}

void catalog_set_notify(struct catalog *c, catalog_notify_fn fn, void *opaque)
{
    c->notify = fn;
    c->notify_opaque = opaque;
}

char *catalog_path(struct catalog *c, const char *file)
{
    char *uri;
    const char *sep = c->root[strlen(c->root) - 1] == '/' ? "" : "/";
    if (asprintf(&uri, "%s%s%s", c->root, sep, file) < 0)
        return NULL;
    return uri;
}

void catalog_changed(struct catalog *c, const char *name)
{
    cat_notify(c, "image-changed", name);
}
