/* tickets.c: POST/GET /v1/tickets and DELETE /v1/tickets/{id}: scoped data
 * tickets over the in-memory store of ticket.c. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "api.h"
#include "api_int.h"
#include "catalog.h"
#include "err.h"
#include "ticket.h"

static struct tickets *store(struct req *r)
{
    return r->acc ? r->acc->tickets : NULL;
}

static void iso8601(time_t t, char *out, size_t cap)
{
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(out, cap, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* The listed form of a ticket: everything but the secret. */
static json_t *ticket_json(const struct ticket_info *ti)
{
    char created[32], expires[32];
    iso8601(ti->created, created, sizeof created);
    iso8601(ti->expires, expires, sizeof expires);
    json_t *ops = json_array();
    if (ops && (ti->ops & TICKET_OP_READ))
        json_array_append_new(ops, json_string("read"));
    if (ops && (ti->ops & TICKET_OP_WRITE))
        json_array_append_new(ops, json_string("write"));
    return json_pack("{s:s, s:o, s:o*, s:s, s:s, s:o}", "id", ti->id, "image", api_jstr(ti->image), "ops", ops,
                     "created", created, "expires", expires, "owner", api_jstr(ti->owner));
}

static enum MHD_Result create_end(struct req *r, const char *unused, json_t *body)
{
    const char *image;
    json_t *ops;
    json_int_t timeout = 0;
    json_error_t je;
    if (json_unpack_ex(body, &je, JSON_STRICT, "{s:s, s:o, s:I}", "image", &image, "ops", &ops, "timeout",
                       &timeout) < 0)
        return api_reply_errno(r, err_fail(EINVAL, "ticket: %s (expected {\"image\": NAME, \"ops\": [\"read\", "
                                                   "\"write\"], \"timeout\": SECONDS})",
                                           je.text));
    int ret = catalog_valid_name(image);
    if (ret < 0)
        return api_reply_errno(r, ret);
    if (!json_is_array(ops) || !json_array_size(ops) || json_array_size(ops) > 2)
        return api_reply_errno(r, err_fail(EINVAL, "ticket: ops is a list of \"read\" and \"write\""));
    unsigned bits = 0;
    size_t i;
    json_t *op;
    json_array_foreach(ops, i, op)
    {
        unsigned b = json_is_string(op) ? ticket_op_parse(json_string_value(op)) : 0;
        if (!b)
            return api_reply_errno(r, err_fail(EINVAL, "ticket: ops is a list of \"read\" and \"write\""));
        bits |= b;
    }
    if (timeout < 1 || timeout > TICKET_MAX_TIMEOUT)
        return api_reply_errno(r, err_fail(EINVAL, "ticket: timeout is 1 to %d seconds", TICKET_MAX_TIMEOUT));
    struct ticket_info ti;
    char token[AUTH_TOKEN_LEN + 1];
    ret = tickets_add(store(r), image, bits, (unsigned)timeout, strcmp(r->who, "-") ? r->who : "", &ti, token);
    if (ret < 0)
        return api_reply_errno(r, ret);
    json_t *j = ticket_json(&ti);
    if (j)
        json_object_set_new(j, "token", json_string(token));
    memset(token, 0, sizeof token);
    char loc[64];
    snprintf(loc, sizeof loc, "/v1/tickets/%s", ti.id);
    return api_reply_json_hdr(r, 201, j, MHD_HTTP_HEADER_LOCATION, loc);
}

enum MHD_Result api_ticket_create(struct req *r, char **args)
{
    if (!store(r))
        return api_reply_errno(r, err_fail(EAGAIN, "tickets are not available"));
    return api_json_body(r, NULL, create_end);
}

enum MHD_Result api_tickets_list(struct req *r, char **args)
{
    if (!store(r))
        return api_reply_errno(r, err_fail(EAGAIN, "tickets are not available"));
    struct ticket_info *v;
    size_t n;
    int ret = tickets_list(store(r), &v, &n);
    if (ret < 0)
        return api_reply_errno(r, ret);
    json_t *list = json_array();
    for (size_t i = 0; list && i < n; i++)
        if (json_array_append_new(list, ticket_json(&v[i])) < 0) {
            json_decref(list);
            list = NULL;
        }
    free(v);
    json_t *j = list ? json_pack("{s:o}", "tickets", list) : NULL;
    if (!j)
        return api_reply_errno(r, err_fail(ENOMEM, "out of memory"));
    return api_reply_json(r, 200, j);
}

enum MHD_Result api_ticket_delete(struct req *r, char **args)
{
    if (!store(r))
        return api_reply_errno(r, err_fail(EAGAIN, "tickets are not available"));
    int ret = tickets_remove(store(r), args[0]);
    if (ret < 0)
        return api_reply_errno(r, ret);
    return api_reply_empty(r, 204, NULL, NULL);
}
