/* admit.c: what every request passes before its handler runs: the Host rule
 * (DNS rebinding), the Origin rule and CORS preflights, the client certificate,
 * the bearer token or data ticket against the route's role, and the JSON
 * Content-Type of JSON endpoints. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "access.h"
#include "api.h"
#include "api_int.h"
#include "err.h"
#include "ticket.h"
#include "tls.h"

#define CORS_METHODS "GET, HEAD, PUT, POST, PATCH, DELETE, OPTIONS"
#define CORS_HEADERS                                                                                            \
    "Authorization, Content-Type, Range, Content-Range, If-Match, If-None-Match, If-Range, If-Modified-Since, " \
    "If-Unmodified-Since, Last-Event-ID"
#define CORS_EXPOSE "Content-Range, Content-Length, Location, ETag, Last-Modified, Retry-After, Accept-Ranges"

static const char *header(const struct req *r, const char *name)
{
    return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, name);
}

static enum MHD_Result refuse(struct req *r, unsigned status, const char *code, const char *msg)
{
    if (status == 401)
        return api_reply_status(r, 401, code, msg, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"qcowd\"");
    return api_reply_status(r, status, code, msg, NULL, NULL);
}

/* A CORS preflight (OPTIONS with Origin and Access-Control-Request-Method) from
 * an allowed origin: 204 with what cross-origin requests may use. */
static enum MHD_Result preflight(struct req *r)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, "Access-Control-Allow-Methods", CORS_METHODS);
    MHD_add_response_header(resp, "Access-Control-Allow-Headers", CORS_HEADERS);
    MHD_add_response_header(resp, "Access-Control-Max-Age", "600");
    return api_queue(r, 204, resp);
}

/* Whether the request carries a body: a Content-Length above 0, or chunked. */
static bool has_body(const struct req *r)
{
    const char *cl = header(r, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl && strspn(cl, "0") != strlen(cl))
        return true;
    return header(r, MHD_HTTP_HEADER_TRANSFER_ENCODING) != NULL;
}

static bool is_json(const char *ct)
{
    static const char want[] = "application/json";
    if (!ct || strncasecmp(ct, want, sizeof want - 1))
        return false;
    char next = ct[sizeof want - 1];
    return next == '\0' || next == ';' || next == ' ';
}

/* The credentials of the request against rt's role: 0 (admitted; r->who set),
 * or -1 with the refusal queued in *res. */
static int authorize(struct req *r, const struct api_routing *rt, enum MHD_Result *res)
{
    const struct api_access_cfg *acc = r->acc;
    if (rt->role == AUTH_NONE)
        return 0;
    if (!acc->auth) {
        snprintf(r->who, sizeof r->who, "-");
        return 0;
    }
    const char *tok;
    size_t len;
    int b = access_bearer(header(r, MHD_HTTP_HEADER_AUTHORIZATION), &tok, &len);
    if (b == -ENOENT) {
        *res = refuse(r, 401, "unauthorized", "this endpoint needs a bearer token (Authorization: Bearer TOKEN)");
        return -1;
    }
    if (b < 0) {
        *res = refuse(r, 401, "unauthorized", "the Authorization header is not a well-formed bearer token");
        return -1;
    }
    const struct auth_token *t = auth_tokens_find(access_tokens(), tok, len);
    if (t) {
        if (t->role < rt->role) {
            char msg[200];
            snprintf(msg, sizeof msg, "the token '%s' has the role %s; this needs %s", t->name, auth_role_name(t->role),
                     auth_role_name(rt->role));
            *res = refuse(r, 403, "forbidden", msg);
            return -1;
        }
        snprintf(r->who, sizeof r->who, "%s", t->name);
        return 0;
    }
    struct ticket_info ti;
    if (acc->tickets && tickets_find(acc->tickets, tok, len, &ti) == 0) {
        unsigned op = (rt->flags & ROUTE_TICKET_WRITE) ? TICKET_OP_WRITE : TICKET_OP_READ;
        bool scoped = rt->flags & (ROUTE_TICKET_READ | ROUTE_TICKET_WRITE);
        if (!scoped || !rt->args[0] || strcmp(rt->args[0], ti.image) || !(ti.ops & op)) {
            char msg[300];
            snprintf(msg, sizeof msg, "ticket %s grants %s%s%s on the data of image '%s' only", ti.id,
                     (ti.ops & TICKET_OP_READ) ? "read" : "", ti.ops == (TICKET_OP_READ | TICKET_OP_WRITE) ? " and " : "",
                     (ti.ops & TICKET_OP_WRITE) ? "write" : "", ti.image);
            *res = refuse(r, 403, "forbidden", msg);
            return -1;
        }
        snprintf(r->who, sizeof r->who, "ticket:%s", ti.id);
        return 0;
    }
    *res = refuse(r, 401, "unauthorized", "the bearer token is not valid (unknown, expired or revoked)");
    return -1;
}

bool api_admit(struct req *r, const char *url, const struct api_routing *rt, bool routed, enum MHD_Result *res)
{
    const struct api_access_cfg *acc = r->acc;
    if (!acc)
        return true;
    const char *host = header(r, MHD_HTTP_HEADER_HOST);
    if (!access_host_allowed(host, acc->public_names)) {
        *res = refuse(r, 421, "misdirected-request",
                      "the Host header names neither this server's address, localhost, nor a --public-name");
        return false;
    }
    const char *origin = header(r, "Origin");
    if (!access_origin_allowed(origin, host, acc->tls != NULL, acc->cors)) {
        *res = refuse(r, 403, "origin-not-allowed",
                      "requests from this Origin are not allowed (qcowd --cors-origin allows an origin)");
        return false;
    }
    if (origin && *origin)
        snprintf(r->cors_origin, sizeof r->cors_origin, "%s", origin);
    if (!strcmp(r->method, "OPTIONS") && origin && header(r, "Access-Control-Request-Method")) {
        *res = preflight(r);
        return false;
    }
    if (!routed)
        return true; /* the router's 400/404/405 */
    if (acc->tls && rt->role != AUTH_NONE) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_GNUTLS_SESSION);
        int ret = api_tls_verify_client(acc->tls, ci ? (gnutls_session_t)ci->tls_session : NULL);
        if (ret < 0) {
            *res = refuse(r, 403, "client-certificate", err_msg(ret));
            return false;
        }
    }
    if (authorize(r, rt, res) < 0)
        return false;
    if ((rt->flags & ROUTE_JSON) && has_body(r) && !is_json(header(r, MHD_HTTP_HEADER_CONTENT_TYPE))) {
        *res = refuse(r, 415, "unsupported-media-type", "the request body must be JSON (Content-Type: application/json)");
        return false;
    }
    (void)url;
    return true;
}

void api_cors_headers(const struct req *r, struct MHD_Response *resp)
{
    if (!r->cors_origin[0])
        return;
    MHD_add_response_header(resp, "Access-Control-Allow-Origin", r->cors_origin);
    MHD_add_response_header(resp, "Access-Control-Expose-Headers", CORS_EXPOSE);
    MHD_add_response_header(resp, "Vary", "Origin");
}
