/* access.h: who may send what: the Host and Origin rules that keep browsers from
 * being turned on the API (DNS rebinding, cross-site requests), the bearer header,
 * and the server-wide token table that SIGHUP swaps. HTTP-header level, no MHD. */
#ifndef QCOWD_ACCESS_H
#define QCOWD_ACCESS_H

#include <stdbool.h>
#include <stddef.h>

#include "auth.h"

#define ACCESS_MAX_NAMES 32 /* --public-name and --cors-origin values each */

struct access_names {
    char *v[ACCESS_MAX_NAMES];
    size_t n;
};

/* Whether a Host header value may reach the API: an IP literal (v4, or v6 in
 * brackets) with an optional port, "localhost", or one of names (compared
 * without the port, case-insensitively). NULL or empty (HTTP/1.0): allowed. A
 * host name that is none of these is how DNS rebinding reaches a loopback
 * service, so it is refused. */
bool access_host_allowed(const char *host, const struct access_names *names);

/* Whether an Origin header value may make this request: none (not a browser, or
 * same-origin GET), the server's own origin (http or https, then the request's Host,
 * as a browser sends it), or one of cors (exact "scheme://host[:port]"). */
bool access_origin_allowed(const char *origin, const char *host, bool tls, const struct access_names *cors);

/* The token of an "Authorization: Bearer TOKEN" value: 0 with *tok and *len set,
 * -ENOENT without the header, -EINVAL when it is not a well-formed bearer value. */
int access_bearer(const char *authz, const char **tok, size_t *len);

/* Add value to names (copied); -EINVAL when it holds spaces or control bytes or
 * names is full, -ENOMEM. */
int access_names_add(struct access_names *names, const char *value, const char *option);
void access_names_free(struct access_names *names);

/* ---- the token table ---- */

/* The current table (borrowed; valid until the process ends: a reload never
 * frees the tables it replaces), or NULL when qcowd runs without --tokens. */
const struct auth_tokens *access_tokens(void);

/* Load path (auth_tokens_load) and make it current; on failure the current
 * table stays. Thread-safe against readers. 0 or a negative errno. */
int access_tokens_load(const char *path);

/* Free every table loaded; no reader may run. */
void access_tokens_free_all(void);

#endif
