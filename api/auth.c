/* auth.c: the bearer-token file, roles, constant-time lookup and new tokens
 * (SHA-256 and the random source are gnutls's). */
#include "auth.h"

#include <errno.h>
#include <fcntl.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"

static const char *const role_names[] = {"none", "reader", "operator", "admin"};

enum auth_role auth_role_parse(const char *s, size_t len)
{
    for (int r = AUTH_READER; r <= AUTH_ADMIN; r++)
        if (strlen(role_names[r]) == len && !memcmp(s, role_names[r], len))
            return (enum auth_role)r;
    return AUTH_NONE;
}

const char *auth_role_name(enum auth_role r)
{
    return r >= AUTH_NONE && r <= AUTH_ADMIN ? role_names[r] : "none";
}

static bool name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == '-' || c == '@';
}

int auth_hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The next field of [*p, end) separated by blanks: its start and length (0 at the end). */
static size_t field(const char **p, const char *end, const char **start)
{
    const char *s = *p;
    while (s < end && (*s == ' ' || *s == '\t'))
        s++;
    const char *e = s;
    while (e < end && *e != ' ' && *e != '\t')
        e++;
    *start = s;
    *p = e;
    return (size_t)(e - s);
}

/* One line (no newline, comment cut off) into tok; 1 when it holds a token, 0
 * when blank, or -EINVAL with the message. */
static int parse_line(const char *s, const char *end, const char *what, unsigned line, struct auth_token *tok)
{
    const char *name, *role, *hash, *extra;
    size_t nl = field(&s, end, &name);
    if (!nl)
        return 0;
    size_t rl = field(&s, end, &role);
    size_t hl = field(&s, end, &hash);
    if (!rl || !hl)
        return err_fail(EINVAL, "%s:%u: expected \"NAME ROLE sha256:HEX\"", what, line);
    if (field(&s, end, &extra))
        return err_fail(EINVAL, "%s:%u: more than three fields (expected \"NAME ROLE sha256:HEX\")", what, line);
    if (nl > AUTH_NAME_MAX)
        return err_fail(EINVAL, "%s:%u: the name is longer than %d bytes", what, line, AUTH_NAME_MAX);
    for (size_t i = 0; i < nl; i++)
        if (!name_char(name[i]))
            return err_fail(EINVAL, "%s:%u: the name may hold only letters, digits and . _ - @", what, line);
    tok->role = auth_role_parse(role, rl);
    if (tok->role == AUTH_NONE)
        return err_fail(EINVAL, "%s:%u: the role must be reader, operator or admin", what, line);
    static const char prefix[] = "sha256:";
    if (hl != sizeof prefix - 1 + 2 * AUTH_HASH_LEN || memcmp(hash, prefix, sizeof prefix - 1))
        return err_fail(EINVAL, "%s:%u: the hash must be sha256: and 64 hex digits", what, line);
    hash += sizeof prefix - 1;
    for (size_t i = 0; i < AUTH_HASH_LEN; i++) {
        int hi = auth_hexval(hash[2 * i]), lo = auth_hexval(hash[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return err_fail(EINVAL, "%s:%u: the hash must be sha256: and 64 hex digits", what, line);
        tok->hash[i] = (uint8_t)(hi << 4 | lo);
    }
    memcpy(tok->name, name, nl);
    tok->name[nl] = '\0';
    return 1;
}

int auth_tokens_parse(const char *text, size_t len, const char *what, struct auth_tokens **out)
{
    if (len > AUTH_FILE_MAX)
        return err_fail(EFBIG, "%s: more than %d bytes", what, AUTH_FILE_MAX);
    struct auth_tokens *t = calloc(1, sizeof *t);
    if (!t)
        return err_fail(ENOMEM, "out of memory");
    size_t cap = 0;
    int ret = 0;
    const char *p = text, *end = text + len;
    for (unsigned line = 1; p < end; line++) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        const char *hash = memchr(p, '#', (size_t)(le - p));
        const char *ce = hash ? hash : le;
        if (memchr(p, '\0', (size_t)(le - p))) {
            ret = err_fail(EINVAL, "%s:%u: NUL byte in the line", what, line);
            goto fail;
        }
        if (ce > p && ce[-1] == '\r')
            ce--;
        struct auth_token tok;
        ret = parse_line(p, ce, what, line, &tok);
        if (ret < 0)
            goto fail;
        if (ret == 1) {
            for (size_t i = 0; i < t->n; i++)
                if (!strcmp(t->v[i].name, tok.name)) {
                    ret = err_fail(EINVAL, "%s:%u: the name %s is given twice", what, line, tok.name);
                    goto fail;
                }
            if (t->n == AUTH_TOKENS_MAX) {
                ret = err_fail(EFBIG, "%s: more than %d tokens", what, AUTH_TOKENS_MAX);
                goto fail;
            }
            if (t->n == cap) {
                size_t ncap = cap ? cap * 2 : 8;
                struct auth_token *v = realloc(t->v, ncap * sizeof *v);
                if (!v) {
                    ret = err_fail(ENOMEM, "out of memory");
                    goto fail;
                }
                t->v = v;
                cap = ncap;
            }
            t->v[t->n++] = tok;
        }
        p = nl ? nl + 1 : end;
    }
    *out = t;
    return 0;
fail:
    auth_tokens_free(t);
    return ret;
}

int auth_tokens_load(const char *path, struct auth_tokens **out)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        return err_fail(errno, "--tokens %s: %s", path, strerror(errno));
    struct stat st;
    int ret = 0;
    char *buf = NULL;
    if (fstat(fd, &st) < 0) {
        ret = err_fail(errno, "--tokens %s: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        ret = err_fail(EINVAL, "--tokens %s: not a regular file", path);
        goto out;
    }
    if (st.st_mode & S_IWOTH) {
        ret = err_fail(EPERM, "--tokens %s: anyone may write it (chmod o-w)", path);
        goto out;
    }
    if (st.st_size > AUTH_FILE_MAX) {
        ret = err_fail(EFBIG, "--tokens %s: more than %d bytes", path, AUTH_FILE_MAX);
        goto out;
    }
    size_t len = 0, cap = (size_t)st.st_size + 1;
    buf = malloc(cap);
    if (!buf) {
        ret = err_fail(ENOMEM, "out of memory");
        goto out;
    }
    for (;;) { /* the file may change under us: read to the end, within the bound */
        ssize_t k = read(fd, buf + len, cap - len);
        if (k < 0) {
            ret = err_fail(errno, "--tokens %s: %s", path, strerror(errno));
            goto out;
        }
        if (k == 0)
            break;
        len += (size_t)k;
        if (len == cap) {
            if (cap > AUTH_FILE_MAX) {
                ret = err_fail(EFBIG, "--tokens %s: more than %d bytes", path, AUTH_FILE_MAX);
                goto out;
            }
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                ret = err_fail(ENOMEM, "out of memory");
                goto out;
            }
            buf = nb;
            cap *= 2;
        }
    }
    char what[300];
    snprintf(what, sizeof what, "--tokens %s", path);
    ret = auth_tokens_parse(buf, len, what, out);
out:
    free(buf);
    close(fd);
    return ret;
}

void auth_tokens_free(struct auth_tokens *t)
{
    if (!t)
        return;
    if (t->v)
        memset(t->v, 0, t->n * sizeof *t->v);
    free(t->v);
    free(t);
}

int auth_sha256(const void *data, size_t len, uint8_t out[AUTH_HASH_LEN])
{
    if (gnutls_hash_fast(GNUTLS_DIG_SHA256, data, len, out) < 0)
        return err_fail(EIO, "SHA-256 failed");
    return 0;
}

bool auth_equal(const void *a, const void *b, size_t n)
{
    const volatile uint8_t *x = a, *y = b;
    uint8_t d = 0;
    for (size_t i = 0; i < n; i++)
        d |= x[i] ^ y[i];
    return d == 0;
}

const struct auth_token *auth_tokens_find(const struct auth_tokens *t, const char *bearer, size_t len)
{
    uint8_t h[AUTH_HASH_LEN];
    if (!t || auth_sha256(bearer, len, h) < 0)
        return NULL;
    const struct auth_token *found = NULL;
    for (size_t i = 0; i < t->n; i++) {
        bool eq = auth_equal(h, t->v[i].hash, AUTH_HASH_LEN);
        if (eq && !found)
            found = &t->v[i];
    }
    return found;
}

int auth_token_new(char out[AUTH_TOKEN_LEN + 1])
{
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    uint8_t r[33]; /* 32 random bytes, padded to a multiple of 3 */
    memset(r, 0, sizeof r);
    if (gnutls_rnd(GNUTLS_RND_KEY, r, 32) < 0)
        return err_fail(EIO, "the random source failed");
    size_t o = 0;
    for (size_t i = 0; i < sizeof r; i += 3) {
        uint32_t v = (uint32_t)r[i] << 16 | (uint32_t)r[i + 1] << 8 | r[i + 2];
        for (int k = 3; k >= 0 && o < AUTH_TOKEN_LEN; k--)
            out[o++] = b64[(v >> (6 * k)) & 63];
    }
    out[AUTH_TOKEN_LEN] = '\0';
    memset(r, 0, sizeof r);
    return 0;
}

int auth_token_line(const char *name, enum auth_role role, const char *token, char *out, size_t cap)
{
    size_t nl = strlen(name);
    if (!nl || nl > AUTH_NAME_MAX)
        return err_fail(EINVAL, "a token name has 1 to %d characters", AUTH_NAME_MAX);
    for (size_t i = 0; i < nl; i++)
        if (!name_char(name[i]))
            return err_fail(EINVAL, "a token name may hold only letters, digits and . _ - @");
    if (role == AUTH_NONE)
        return err_fail(EINVAL, "the role must be reader, operator or admin");
    uint8_t h[AUTH_HASH_LEN];
    int ret = auth_sha256(token, strlen(token), h);
    if (ret < 0)
        return ret;
    char hex[2 * AUTH_HASH_LEN + 1];
    for (size_t i = 0; i < AUTH_HASH_LEN; i++)
        snprintf(hex + 2 * i, 3, "%02x", h[i]);
    if ((size_t)snprintf(out, cap, "%s %s sha256:%s", name, auth_role_name(role), hex) >= cap)
        return err_fail(ERANGE, "the line does not fit");
    return 0;
}
