/* api_int.h: what the files of the HTTP layer share: per-request state, replies,
 * the errno -> HTTP table, Range parsing and the route handlers. */
#ifndef QCOWD_API_INT_H
#define QCOWD_API_INT_H

#include <jansson.h>
#include <microhttpd.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

struct catalog;

/* One request, kept in MHD's con_cls from the first call to the completion callback. */
struct req {
    struct api_server *srv;
    struct catalog *cat;
    struct MHD_Connection *conn;
    char method[16];
    char *path;      /* the raw path as received (for the log) */
    bool head;       /* a HEAD request: headers only */
    bool answered;   /* a response was queued */
    unsigned status; /* the status queued */
    uint64_t bytes;  /* body bytes produced (streams add as they go) */
    struct timespec t0;
};

#define API_MAX_ARGS 2 /* path segments a route captures */

typedef enum MHD_Result (*api_handler)(struct req *r, char **args);

/* ---- respond.c ---- */

/* Status and error code for a negative errno (one table for the whole API). */
unsigned api_errno_status(int err);
const char *api_errno_code(int err);

/* A new JSON string of s; bytes that are not UTF-8 become '?'. NULL on ENOMEM. */
json_t *api_jstr(const char *s);
/* Queue body (reference stolen) as JSON with status. */
enum MHD_Result api_reply_json(struct req *r, unsigned status, json_t *body);
/* Queue {"error":{"code","message"}} for err (negative errno) with message msg. */
enum MHD_Result api_reply_error(struct req *r, int err, const char *msg);
/* The same with err_msg(err) as the message. */
enum MHD_Result api_reply_errno(struct req *r, int err);
/* Queue an error with an explicit status and code (405, 404 for routes). */
enum MHD_Result api_reply_status(struct req *r, unsigned status, const char *code, const char *msg, const char *hdr,
                                 const char *hdr_value);
/* Queue resp with status; takes care of the bookkeeping; destroys resp. */
enum MHD_Result api_queue(struct req *r, unsigned status, struct MHD_Response *resp);

/* ---- range.c ---- */

/* Parse a Range header value for a body of size bytes into [*start, *start+*len).
 * Returns 0, -EINVAL for a malformed header, -ERANGE for a range that cannot be
 * served (past the end, an empty suffix, or more than one range); err_msg() says
 * which. */
int api_parse_range(const char *value, uint64_t size, uint64_t *start, uint64_t *len);

/* Decode %XX escapes of s (len bytes) into a new string; NULL with err_msg() set
 * for a bad escape or an encoded NUL. */
char *api_decode(const char *s, size_t len);

/* ---- images.c ---- */

enum MHD_Result api_health(struct req *r, char **args);
enum MHD_Result api_images_list(struct req *r, char **args);
enum MHD_Result api_image_info(struct req *r, char **args);
enum MHD_Result api_image_data(struct req *r, char **args);
enum MHD_Result api_image_extents(struct req *r, char **args);

#endif
