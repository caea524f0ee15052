/* route.c: the route table and the routing decision: a method and a raw path give
 * a handler and its captured segments, or a 400/404/405 verdict; no MHD calls. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_int.h"
#include "err.h"

#define M_GET     0x01u /* GET, and HEAD with the same headers and no body */
#define M_PUT     0x02u
#define M_POST    0x04u
#define M_PATCH   0x08u
#define M_DELETE  0x10u
#define M_OPTIONS 0x20u

struct route {
    const char *seg[API_ROUTE_SEGS]; /* path segments; "*" captures one (decoded) */
    unsigned methods;
    api_handler fn;
    enum auth_role role; /* the least role that may call it (AUTH_NONE: anyone) */
    unsigned flags;      /* ROUTE_* */
};

/* Matched in order; the sentinel (no segments) answers everything else with 404.
 * Roles: reader reads (list, info, data, file, extents, events, metrics, jobs);
 * operator changes an image's contents and state (writes, snapshots, bitmaps,
 * jobs, check, commit, tickets); admin changes the catalog (create, upload,
 * delete, convert into a new image). A data ticket stands in for a token on the
 * routes marked ROUTE_TICKET_*, for its image only. */
static const struct route routes[] = {
    {{"v1", "health"}, M_GET, api_health, AUTH_NONE, 0},
    {{"v1", "images"}, M_GET, api_images_list, AUTH_READER, 0},
    {{"v1", "images"}, M_POST, api_image_create, AUTH_ADMIN, ROUTE_JSON},
    {{"v1", "images", "*"}, M_GET, api_image_info, AUTH_READER, 0},
    {{"v1", "images", "*"}, M_DELETE, api_image_delete, AUTH_ADMIN, 0},
    {{"v1", "images", "*", "data"}, M_GET, api_image_data, AUTH_READER, ROUTE_TICKET_READ},
    {{"v1", "images", "*", "data"}, M_PUT, api_data_put, AUTH_OPERATOR, ROUTE_TICKET_WRITE},
    {{"v1", "images", "*", "data"}, M_PATCH, api_data_patch, AUTH_OPERATOR, ROUTE_JSON | ROUTE_TICKET_WRITE},
    {{"v1", "images", "*", "data"}, M_OPTIONS, api_data_options, AUTH_READER, ROUTE_TICKET_READ},
    {{"v1", "images", "*", "extents"}, M_GET, api_image_extents, AUTH_READER, ROUTE_TICKET_READ},
    {{"v1", "images", "*", "file"}, M_GET, api_file_get, AUTH_READER, ROUTE_TICKET_READ},
    {{"v1", "images", "*", "file"}, M_PUT, api_file_put, AUTH_ADMIN, ROUTE_TICKET_WRITE},
    {{"v1", "images", "*", "bitmaps"}, M_GET, api_bitmaps_list, AUTH_READER, 0},
    {{"v1", "images", "*", "bitmaps"}, M_POST, api_bitmap_create, AUTH_OPERATOR, ROUTE_JSON},
    {{"v1", "images", "*", "bitmaps", "*"}, M_GET, api_bitmap_get, AUTH_READER, 0},
    {{"v1", "images", "*", "bitmaps", "*"}, M_DELETE, api_bitmap_delete, AUTH_OPERATOR, 0},
    {{"v1", "images", "*", "bitmaps", "*", "clear"}, M_POST, api_bitmap_clear, AUTH_OPERATOR, ROUTE_JSON},
    {{"v1", "images", "*", "bitmaps", "*", "enable"}, M_POST, api_bitmap_enable, AUTH_OPERATOR, ROUTE_JSON},
    {{"v1", "images", "*", "bitmaps", "*", "disable"}, M_POST, api_bitmap_disable, AUTH_OPERATOR, ROUTE_JSON},
    {{"v1", "images", "*", "bitmaps", "*", "merge"}, M_POST, api_bitmap_merge, AUTH_OPERATOR, ROUTE_JSON},
    {{"metrics"}, M_GET, api_metrics, AUTH_READER, 0},
    {{"v1", "jobs"}, M_GET, api_jobs_list, AUTH_READER, 0},
    {{"v1", "jobs", "*"}, M_GET, api_job_get, AUTH_READER, 0},
    {{"v1", "jobs", "*"}, M_DELETE, api_job_dismiss, AUTH_OPERATOR, 0},
    {{"v1", "jobs", "*", "cancel"}, M_POST, api_job_cancel, AUTH_OPERATOR, ROUTE_JSON},
    {{"v1", "jobs", "*", "pause"}, M_POST, api_job_pause, AUTH_OPERATOR, ROUTE_JSON},
    {{"v1", "jobs", "*", "resume"}, M_POST, api_job_resume, AUTH_OPERATOR, ROUTE_JSON},
    {{"v1", "images", "*", "snapshots"}, M_GET, api_snapshots_list, AUTH_READER, 0},
    {{"v1", "images", "*", "snapshots"}, M_POST, api_snapshot_create, AUTH_OPERATOR, ROUTE_JSON},
    {{"v1", "images", "*", "snapshots", "*"}, M_DELETE, api_snapshot_delete, AUTH_OPERATOR, 0},
    {{"v1", "images", "*", "snapshots", "*", "revert"}, M_POST, api_snapshot_revert, AUTH_OPERATOR, ROUTE_JSON},
    {{"v1", "images", "*", "snapshots", "*", "data"}, M_GET, api_snapshot_data, AUTH_READER, 0},
    {{"v1", "images", "*", "convert"}, M_POST, api_image_convert, AUTH_ADMIN, ROUTE_JSON},
    {{"v1", "images", "*", "check"}, M_POST, api_image_check, AUTH_OPERATOR, ROUTE_JSON},
    {{"v1", "images", "*", "commit"}, M_POST, api_image_commit, AUTH_OPERATOR, ROUTE_JSON},
    {{"v1", "events"}, M_GET, api_events, AUTH_READER, 0},
    {{"v1", "tickets"}, M_GET, api_tickets_list, AUTH_OPERATOR, 0},
    {{"v1", "tickets"}, M_POST, api_ticket_create, AUTH_OPERATOR, ROUTE_JSON},
    {{"v1", "tickets", "*"}, M_DELETE, api_ticket_delete, AUTH_OPERATOR, 0},
    {{"v1", "whoami"}, M_GET, api_whoami, AUTH_READER, 0},
    {{""}, M_GET, api_web_index, AUTH_NONE, 0}, /* the dashboard: its fixed, public files */
    {{"ui", "*"}, M_GET, api_web_file, AUTH_NONE, 0},
    {{NULL}, 0, NULL, AUTH_NONE, 0},
};

static const struct {
    const char *name;
    unsigned bit;
} methods[] = {
    {"GET", M_GET},     {"HEAD", M_GET},       {"PUT", M_PUT},         {"POST", M_POST},
    {"PATCH", M_PATCH}, {"DELETE", M_DELETE}, {"OPTIONS", M_OPTIONS},
};

static unsigned method_bit(const char *m)
{
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
        if (!strcmp(m, methods[i].name))
            return methods[i].bit;
    return 0;
}

/* "GET, HEAD, PUT" for the bits set, in the table's order. */
static void allow_header(unsigned bits, char *out, size_t cap)
{
    size_t o = 0;
    out[0] = '\0';
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
        if (bits & methods[i].bit)
            o += (size_t)snprintf(out + o, o < cap ? cap - o : 0, "%s%s", o ? ", " : "", methods[i].name);
}

static int verdict(struct api_routing *rt, unsigned status, const char *code, const char *msg)
{
    rt->status = status;
    rt->code = code;
    snprintf(rt->msg, sizeof rt->msg, "%s", msg);
    return -1;
}

/* Split the raw path into decoded segments. Returns 0, or -1 with a verdict. */
static int split_path(struct api_routing *rt, const char *url)
{
    if (url[0] != '/')
        return verdict(rt, 400, "bad-request", "the request path must start with '/'");
    const char *p = url + 1;
    for (;;) {
        size_t n = strcspn(p, "/");
        if ((n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
            return verdict(rt, 400, "bad-request", "the request path has a '.' or '..' segment");
        if (rt->nsegs == API_ROUTE_SEGS) /* longer than any route: unknown */
            return verdict(rt, 404, "not-found", "no such endpoint");
        char *s = api_decode(p, n);
        if (!s)
            return verdict(rt, api_errno_status(-EINVAL), api_errno_code(-EINVAL), err_msg(EINVAL));
        rt->segs[rt->nsegs++] = s;
        p += n;
        if (*p != '/')
            break;
        p++;
    }
    return 0;
}

/* Every index stays below API_ROUTE_SEGS whatever nsegs is: a path longer than
 * the route simply does not match. */
static bool match(const struct route *rt, char **segs, unsigned nsegs, char **args)
{
    if (nsegs > API_ROUTE_SEGS)
        return false;
    unsigned i = 0, a = 0;
    for (; i < nsegs && rt->seg[i]; i++) {
        if (!strcmp(rt->seg[i], "*")) {
            if (a == API_MAX_ARGS)
                return false;
            args[a++] = segs[i];
        } else if (strcmp(rt->seg[i], segs[i])) {
            return false;
        }
    }
    return i == nsegs && (i == API_ROUTE_SEGS || !rt->seg[i]);
}

int api_route(const char *method, const char *url, struct api_routing *out)
{
    memset(out, 0, sizeof *out);
    if (split_path(out, url) < 0)
        return -1;
    unsigned want = method_bit(method), allowed = 0;
    const struct route *rt;
    for (rt = routes; rt->seg[0]; rt++) {
        char *args[API_MAX_ARGS] = {NULL};
        if (!match(rt, out->segs, out->nsegs, args))
            continue;
        if (rt->methods & want) {
            out->fn = rt->fn;
            out->role = rt->role;
            out->flags = rt->flags;
            memcpy(out->args, args, sizeof args);
            return 0;
        }
        allowed |= rt->methods;
    }
    if (!allowed)
        return verdict(out, 404, "not-found", "no such endpoint");
    allow_header(allowed, out->allow, sizeof out->allow);
    verdict(out, 405, "method-not-allowed", "");
    snprintf(out->msg, sizeof out->msg, "method %s is not allowed here; allowed: %s", method, out->allow);
    return -1;
}

void api_routing_free(struct api_routing *rt)
{
    for (unsigned i = 0; i < rt->nsegs; i++)
        free(rt->segs[i]);
    rt->nsegs = 0;
}
