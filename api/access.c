/* access.c: the Host and Origin rules, the bearer header, and the token table
 * swapped whole on reload (readers take no lock). */
#include "access.h"

#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "err.h"

/* The host part of a Host value: "[v6]" keeps its brackets off, "h:port" its port. */
static bool host_part(const char *host, char *out, size_t cap)
{
    size_t n;
    if (host[0] == '[') {
        const char *close = strchr(host, ']');
        if (!close || (close[1] && close[1] != ':'))
            return false;
        n = (size_t)(close - host - 1);
        host++;
    } else {
        const char *colon = strchr(host, ':');
        n = colon ? (size_t)(colon - host) : strlen(host);
    }
    if (!n || n >= cap)
        return false;
    memcpy(out, host, n);
    out[n] = '\0';
    return true;
}

static bool valid_port_suffix(const char *host)
{
    const char *p = host[0] == '[' ? strchr(host, ']') : host;
    const char *colon = p ? strchr(p, ':') : NULL;
    if (!colon)
        return true;
    if (!colon[1] || strlen(colon + 1) > 5)
        return false;
    for (const char *d = colon + 1; *d; d++)
        if (*d < '0' || *d > '9')
            return false;
    return true;
}

bool access_host_allowed(const char *host, const struct access_names *names)
{
    if (!host || !*host)
        return true;
    char h[256];
    if (!valid_port_suffix(host) || !host_part(host, h, sizeof h))
        return false;
    unsigned char buf[16];
    if (inet_pton(AF_INET, h, buf) == 1 || inet_pton(AF_INET6, h, buf) == 1)
        return true;
    if (!strcasecmp(h, "localhost"))
        return true;
    for (size_t i = 0; names && i < names->n; i++) {
        char want[256];
        if (host_part(names->v[i], want, sizeof want) && !strcasecmp(h, want))
            return true;
    }
    return false;
}

bool access_origin_allowed(const char *origin, const char *host, bool tls, const struct access_names *cors)
{
    if (!origin || !*origin)
        return true;
    if (host && *host) {
        const char *scheme = tls ? "https://" : "http://";
        size_t sl = strlen(scheme);
        if (!strncasecmp(origin, scheme, sl) && !strcasecmp(origin + sl, host))
            return true;
    }
    for (size_t i = 0; cors && i < cors->n; i++)
        if (!strcasecmp(origin, cors->v[i]))
            return true;
    return false;
}

int access_bearer(const char *authz, const char **tok, size_t *len)
{
    if (!authz)
        return -ENOENT;
    if (strncasecmp(authz, "Bearer ", 7))
        return -EINVAL;
    const char *t = authz + 7;
    while (*t == ' ')
        t++;
    size_t n = strlen(t);
    while (n && t[n - 1] == ' ')
        n--;
    if (!n || n > 512)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)t[i] <= 0x20 || (unsigned char)t[i] >= 0x7f)
            return -EINVAL;
    *tok = t;
    *len = n;
    return 0;
}

int access_names_add(struct access_names *names, const char *value, const char *option)
{
    if (names->n == ACCESS_MAX_NAMES)
        return err_fail(EINVAL, "%s: at most %d values", option, ACCESS_MAX_NAMES);
    if (!*value || strlen(value) > 250)
        return err_fail(EINVAL, "%s: a value of 1 to 250 characters", option);
    for (const char *p = value; *p; p++)
        if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f)
            return err_fail(EINVAL, "%s %s: no spaces or control characters", option, value);
    char *s = strdup(value);
    if (!s)
        return err_fail(ENOMEM, "out of memory");
    size_t n = strlen(s);
    while (n > 1 && s[n - 1] == '/') /* "https://x/" is the origin "https://x" */
        s[--n] = '\0';
    names->v[names->n++] = s;
    return 0;
}

void access_names_free(struct access_names *names)
{
    for (size_t i = 0; i < names->n; i++)
        free(names->v[i]);
    names->n = 0;
}

/* ---- the token table ---- */

struct gen {
    struct auth_tokens *t;
    struct gen *older;
};

static _Atomic(struct auth_tokens *) tokens;
static pthread_mutex_t gens_lock = PTHREAD_MUTEX_INITIALIZER;
static struct gen *gens;

const struct auth_tokens *access_tokens(void)
{
    return atomic_load_explicit(&tokens, memory_order_acquire);
}

int access_tokens_load(const char *path)
{
    struct auth_tokens *t;
    int ret = auth_tokens_load(path, &t);
    if (ret < 0)
        return ret;
    struct gen *g = malloc(sizeof *g);
    if (!g) {
        auth_tokens_free(t);
        return err_fail(ENOMEM, "out of memory");
    }
    pthread_mutex_lock(&gens_lock);
    g->t = t;
    g->older = gens;
    gens = g;
    atomic_store_explicit(&tokens, t, memory_order_release);
    pthread_mutex_unlock(&gens_lock);
    return 0;
}

void access_tokens_free_all(void)
{
    pthread_mutex_lock(&gens_lock);
    atomic_store(&tokens, NULL);
    while (gens) {
        struct gen *g = gens;
        gens = g->older;
        auth_tokens_free(g->t);
        free(g);
    }
    pthread_mutex_unlock(&gens_lock);
}
