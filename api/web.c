/* web.c: the web dashboard: GET / and GET /ui/NAME answer the embedded files of
 * clients/web (a fixed table, so no path reaches the disk), and GET /v1/whoami. */
#include <stdio.h>
#include <string.h>

#include "access.h"
#include "api.h"
#include "api_int.h"
#include "web.h"

/* Scripts and styles only from this server, none inline; no frames, no forms
 * posted elsewhere, fetch() only to this origin. */
#define WEB_CSP                                                                                               \
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; " \
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

static const struct web_file *find(const char *name)
{
    for (unsigned i = 0; i < web_files_n; i++)
        if (!strcmp(web_files[i].name, name))
            return &web_files[i];
    return NULL;
}

/* Answer f: 304 when the client's copy is current, else 200 with the bytes.
 * no-cache: the browser revalidates each time, so a new qcowd is seen at once. */
static enum MHD_Result send_file(struct req *r, const struct web_file *f)
{
    const char *inm = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_IF_NONE_MATCH);
    bool fresh = inm && strstr(inm, f->etag);
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(fresh ? 0 : f->len, fresh ? NULL : (void *)f->data, MHD_RESPMEM_PERSISTENT);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, f->type);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, f->etag);
    MHD_add_response_header(resp, "Content-Security-Policy", WEB_CSP);
    MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(resp, "X-Frame-Options", "DENY");
    MHD_add_response_header(resp, "Referrer-Policy", "no-referrer");
    if (!r->head && !fresh)
        r->bytes = f->len;
    return api_queue(r, fresh ? 304 : 200, resp);
}

enum MHD_Result api_web_index(struct req *r, char **args)
{
    (void)args;
    const struct web_file *f = find("index.html");
    if (!f)
        return api_reply_status(r, 404, "not-found", "this build has no dashboard", NULL, NULL);
    return send_file(r, f);
}

enum MHD_Result api_web_file(struct req *r, char **args)
{
    const struct web_file *f = find(args[0]);
    if (!f)
        return api_reply_status(r, 404, "not-found", "no such dashboard file", NULL, NULL);
    return send_file(r, f);
}

enum MHD_Result api_whoami(struct req *r, char **args)
{
    (void)args;
    const struct auth_tokens *tokens = access_tokens();
    enum auth_role role = AUTH_ADMIN; /* without tokens every caller has every role */
    const char *name = "-";
    bool auth = r->acc && r->acc->auth && tokens;
    if (auth) {
        const char *authz = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
        const char *tok;
        size_t len;
        const struct auth_token *t = NULL;
        if (access_bearer(authz, &tok, &len) == 0)
            t = auth_tokens_find(tokens, tok, len);
        if (!t) /* admitted by a data ticket: it calls no endpoint but its image's data */
            return api_reply_status(r, 403, "forbidden", "a data ticket has no role", NULL, NULL);
        role = t->role;
        name = t->name;
    }
    json_t *o = json_pack("{s:o, s:s, s:b}", "name", api_jstr(name), "role", auth_role_name(role), "auth", auth);
    return api_reply_json(r, 200, o);
}
