/* auth.h: who may do what: the bearer-token file (NAME ROLE sha256:HEX a line),
 * roles, constant-time token lookup and new random tokens. HTTP-free, so the
 * parser is unit-tested and fuzzed on its own. */
#ifndef QCOWD_AUTH_H
#define QCOWD_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Roles, each including the ones before it. */
enum auth_role {
    AUTH_NONE = 0,     /* no valid token */
    AUTH_READER = 1,   /* list, info, data/file reads, extents, events, metrics */
    AUTH_OPERATOR = 2, /* + writes, zero/discard/flush, snapshots, bitmaps, jobs, tickets */
    AUTH_ADMIN = 3,    /* + create, upload, delete */
};

#define AUTH_NAME_MAX   64      /* bytes in a token's NAME */
#define AUTH_FILE_MAX   1048576 /* bytes in a token file */
#define AUTH_TOKENS_MAX 10000   /* lines with a token in one file */
#define AUTH_HASH_LEN   32      /* SHA-256 */
#define AUTH_TOKEN_LEN  43      /* characters of a token from auth_token_new (32 random bytes, base64url) */

struct auth_token {
    char name[AUTH_NAME_MAX + 1];   /* NUL-terminated; [A-Za-z0-9._@-]+ */
    enum auth_role role;
    uint8_t hash[AUTH_HASH_LEN];    /* SHA-256 of the bearer token */
};

struct auth_tokens {
    struct auth_token *v;
    size_t n;
};

/* The role of a word ("reader", "operator", "admin"), AUTH_NONE for another. */
enum auth_role auth_role_parse(const char *s, size_t len);
const char *auth_role_name(enum auth_role r);

/* Parse a token file's text (len bytes, need not be NUL-terminated). Lines:
 * "NAME ROLE sha256:HEX" separated by spaces or tabs; '#' starts a comment;
 * blank lines are skipped. what names the file in messages. On success *out is a
 * new table (auth_tokens_free). On failure *out is unchanged and the return is
 * -EINVAL with err_msg() naming the line and the problem (never the hash), or
 * -EFBIG past AUTH_FILE_MAX / AUTH_TOKENS_MAX, or -ENOMEM. A name given twice is
 * an error. */
int auth_tokens_parse(const char *text, size_t len, const char *what, struct auth_tokens **out);

/* Read and parse the file at path (at most AUTH_FILE_MAX bytes), as above; a
 * file others may write is refused (-EPERM). */
int auth_tokens_load(const char *path, struct auth_tokens **out);

void auth_tokens_free(struct auth_tokens *t);

/* The entry whose hash is SHA-256(bearer), or NULL. Every entry is compared in
 * full, so the time taken does not depend on where or whether it matches. */
const struct auth_token *auth_tokens_find(const struct auth_tokens *t, const char *bearer, size_t len);

/* SHA-256 of data into out. 0 or a negative errno. */
int auth_sha256(const void *data, size_t len, uint8_t out[AUTH_HASH_LEN]);

/* The value of a hex digit (either case), or -1: the one helper for the token
 * file's hashes and the %XX escapes of request paths. */
int auth_hexval(char c);

/* Constant-time equality of two n-byte buffers. */
bool auth_equal(const void *a, const void *b, size_t n);

/* A new random token (AUTH_TOKEN_LEN base64url characters and a NUL) from the
 * system's key-grade random source. 0 or a negative errno. */
int auth_token_new(char out[AUTH_TOKEN_LEN + 1]);

/* The file line for name, role and token: "NAME ROLE sha256:HEX" (no newline)
 * into out (cap >= AUTH_NAME_MAX + 90). 0, or -EINVAL for a bad name. */
int auth_token_line(const char *name, enum auth_role role, const char *token, char *out, size_t cap);

#endif
