/* config.c: the configuration file reader: each "key = value" line becomes a
 * "--key=value" argument, checked against getopt_long's table of long options. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1]))
        s[--n] = '\0';
    return s;
}

/* 1 true, 0 false, -1 neither. */
static int boolean(const char *v)
{
    static const char *const yes[] = {"true", "yes", "on", "1"}, *const no[] = {"false", "no", "off", "0"};
    for (size_t i = 0; i < 4; i++) {
        if (!strcasecmp(v, yes[i]))
            return 1;
        if (!strcasecmp(v, no[i]))
            return 0;
    }
    return -1;
}

static const struct option *lookup(const struct option *lo, const char *const *skip, const char *key)
{
    for (size_t i = 0; skip && skip[i]; i++)
        if (!strcmp(skip[i], key))
            return NULL;
    for (; lo->name; lo++)
        if (!strcmp(lo->name, key))
            return lo;
    return NULL;
}

/* Append arg (taken) with its line; -1 with a message when out of memory. */
static int push(struct config_args *a, size_t *cap, char *arg, unsigned line)
{
    if (!arg) {
        fprintf(stderr, "qcowd: %s: out of memory\n", a->path);
        return -1;
    }
    if ((size_t)a->argc + 2 > *cap) {
        size_t n = *cap ? *cap * 2 : 16;
        char **v = realloc(a->argv, n * sizeof *v);
        if (!v) {
            free(arg);
            fprintf(stderr, "qcowd: %s: out of memory\n", a->path);
            return -1;
        }
        a->argv = v;
        unsigned *l = realloc(a->line, n * sizeof *l);
        if (!l) {
            free(arg);
            fprintf(stderr, "qcowd: %s: out of memory\n", a->path);
            return -1;
        }
        a->line = l;
        *cap = n;
    }
    a->line[a->argc] = line;
    a->argv[a->argc++] = arg;
    a->argv[a->argc] = NULL;
    return 0;
}

static char *arg_of(const char *key, const char *value)
{
    size_t n = strlen(key) + (value ? strlen(value) + 1 : 0) + 3;
    char *s = malloc(n);
    if (s)
        snprintf(s, n, "--%s%s%s", key, value ? "=" : "", value ? value : "");
    return s;
}

int config_read(const char *path, const char *prog, const struct option *lo, const char *const *skip,
                struct config_args *out)
{
    struct config_args a = {.path = path};
    size_t cap = 0;
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "qcowd: --config %s: %s\n", path, strerror(errno));
        return -1;
    }
    char *buf = NULL;
    size_t bcap = 0;
    unsigned line = 0;
    int ret = push(&a, &cap, strdup(prog), 0);
    ssize_t got;
    while (ret == 0 && (got = getline(&buf, &bcap, f)) != -1) {
        line++;
        if (strlen(buf) != (size_t)got) {
            fprintf(stderr, "qcowd: %s:%u: NUL byte in the line\n", path, line);
            ret = -1;
            break;
        }
        char *s = trim(buf);
        if (!*s || *s == '#')
            continue;
        size_t kl = strcspn(s, "= \t");
        char *rest = s + kl;
        bool has_eq = false;
        rest += strspn(rest, " \t");
        if (*rest == '=') {
            has_eq = true;
            rest++;
        }
        s[kl] = '\0';
        char *value = trim(rest);
        const struct option *o = kl ? lookup(lo, skip, s) : NULL;
        if (!o) {
            fprintf(stderr, "qcowd: %s:%u: unknown key '%.64s'%s\n", path, line, kl ? s : "",
                    kl ? "" : " (expected \"key = value\")");
            ret = -1;
            break;
        }
        if (o->has_arg == no_argument) {
            int b = *value ? boolean(value) : has_eq ? -1 : 1;
            if (b < 0) {
                fprintf(stderr, "qcowd: %s:%u: %s takes true or false, not '%.64s'\n", path, line, o->name, value);
                ret = -1;
            } else if (b) {
                ret = push(&a, &cap, arg_of(o->name, NULL), line);
            }
        } else if (!*value && o->has_arg == required_argument) {
            fprintf(stderr, "qcowd: %s:%u: %s needs a value\n", path, line, o->name);
            ret = -1;
        } else {
            ret = push(&a, &cap, arg_of(o->name, *value ? value : NULL), line);
        }
    }
    if (ret == 0 && ferror(f)) {
        fprintf(stderr, "qcowd: --config %s: read error\n", path);
        ret = -1;
    }
    free(buf);
    fclose(f);
    if (ret < 0) {
        config_args_free(&a);
        return -1;
    }
    *out = a;
    return 0;
}

void config_args_free(struct config_args *a)
{
    for (int i = 0; a->argv && i < a->argc; i++)
        free(a->argv[i]);
    free(a->argv);
    free(a->line);
    a->argv = NULL;
    a->line = NULL;
    a->argc = 0;
}
