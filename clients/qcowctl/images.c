/* images.c: qcowctl's commands on the catalog, guest data and the qcow2 container,
 * plus tickets, health and metrics: each one HTTP call of openapi/openapi.yaml (or a few). */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ctl.h"

/* `write` from a pipe (length unknown) sends one PUT per chunk of this size */
#define WRITE_CHUNK (8u << 20)

/* Requests of one image: GET of its path + suffix, printed. */
static int get_image(int argc, char **argv, const char *suffix, const char *key)
{
    if (argc != 2)
        return usage_error("usage: qcowctl %s NAME", argv[0]);
    char *p = image_path(argv[1], suffix);
    int r = p ? call_print("GET", p, NULL, key) : EXIT_FAIL;
    free(p);
    return r;
}

int cmd_list(int argc, char **argv)
{
    if (argc != 1)
        return usage_error("usage: qcowctl list");
    return call_print("GET", "/v1/images", NULL, "images");
}

int cmd_info(int argc, char **argv)
{
    return get_image(argc, argv, "", NULL);
}

int cmd_extents(int argc, char **argv)
{
    static const struct option opts[] = {{"bitmap", required_argument, 0, 'b'}, {0, 0, 0, 0}};
    const char *bitmap = NULL;
    int c;
    while ((c = ctl_getopt(argc, argv, opts)) != -1) {
        if (c == '?')
            return EXIT_USAGE;
        bitmap = optarg;
    }
    if (argc - optind != 1)
        return usage_error("usage: qcowctl extents NAME [--bitmap B]");
    char *eb = bitmap ? http_escape(bitmap) : NULL, *q = NULL;
    if (asprintf(&q, "/extents?context=%s%s", bitmap ? "dirty&bitmap=" : "zero", eb ? eb : "") < 0)
        q = NULL;
    char *p = q ? image_path(argv[optind], q) : NULL;
    int r = p ? call_print("GET", p, NULL, NULL) : fail("out of memory");
    free(p);
    free(q);
    free(eb);
    return r;
}

int cmd_health(int argc, char **argv)
{
    if (argc != 1)
        return usage_error("usage: qcowctl health");
    return call_print("GET", "/v1/health", NULL, NULL);
}

int cmd_whoami(int argc, char **argv)
{
    if (argc != 1)
        return usage_error("usage: qcowctl whoami");
    return call_print("GET", "/v1/whoami", NULL, NULL);
}

int cmd_metrics(int argc, char **argv)
{
    if (argc != 1)
        return usage_error("usage: qcowctl metrics");
    struct http_req req = {.method = "GET", .path = "/metrics", .in_len = -1, .out = stdout};
    struct http_resp resp;
    int r = http_do(&req, &resp);
    free(resp.body);
    return r;
}

int cmd_features(int argc, char **argv)
{
    if (argc != 2)
        return usage_error("usage: qcowctl features NAME");
    return call_at("OPTIONS", image_path(argv[1], "/data"), NULL, true);
}

int cmd_size(int argc, char **argv)
{
    if (argc != 2)
        return usage_error("usage: qcowctl size NAME");
    char *p = image_path(argv[1], "");
    if (!p)
        return EXIT_FAIL;
    /* the info's virtual-size: the same number as HEAD .../data's Content-Length */
    json_t *j;
    int r = call_json("GET", p, NULL, &j);
    json_int_t size;
    if (r == EXIT_OK && json_unpack(j, "{s:I}", "virtual-size", &size) != 0)
        r = fail("the server's info has no virtual-size");
    else if (r == EXIT_OK && ctl_json)
        r = print_json(json_object_get(j, "virtual-size"));
    else if (r == EXIT_OK)
        printf("%" PRId64 "\n", (int64_t)size);
    json_decref(j);
    free(p);
    return r;
}

int cmd_create(int argc, char **argv)
{
    static const struct option opts[] = {
        {"cluster-size", required_argument, 0, 'c'},
        {"backing", required_argument, 0, 'b'},
        {"extended-l2", no_argument, 0, 'x'},
        {"lazy-refcounts", no_argument, 0, 'l'},
        {"compression-type", required_argument, 0, 'z'},
        {"refcount-bits", required_argument, 0, 'r'},
        {"compat", required_argument, 0, 'v'},
        {"preallocation", required_argument, 0, 'p'},
        {0, 0, 0, 0},
    };
    json_t *body = json_object();
    int r = EXIT_USAGE, c;
    uint64_t v;
    if (!body)
        return fail("out of memory");
    while ((c = ctl_getopt(argc, argv, opts)) != -1) {
        switch (c) {
        case 'c':
            if (parse_size(optarg, "cluster size", &v))
                goto out;
            json_object_set_new(body, "cluster-size", json_integer((json_int_t)v));
            break;
        case 'b':
            json_object_set_new(body, "backing-file", json_string(optarg));
            json_object_set_new(body, "backing-fmt", json_string("qcow2"));
            break;
        case 'x':
            json_object_set_new(body, "extended-l2", json_true());
            break;
        case 'l':
            json_object_set_new(body, "lazy-refcounts", json_true());
            break;
        case 'z':
            json_object_set_new(body, "compression-type", json_string(optarg));
            break;
        case 'r':
            if (parse_size(optarg, "refcount bits", &v))
                goto out;
            json_object_set_new(body, "refcount-bits", json_integer((json_int_t)v));
            break;
        case 'v':
            json_object_set_new(body, "version", json_string(optarg));
            break;
        case 'p':
            json_object_set_new(body, "preallocation", json_string(optarg));
            break;
        default:
            goto out;
        }
    }
    int left = argc - optind;
    if (left < 1 || left > 2 || (left == 1 && !json_object_get(body, "backing-file"))) {
        usage_error("usage: qcowctl create NAME SIZE [OPTIONS] (SIZE may be left out with --backing)");
        goto out;
    }
    json_object_set_new(body, "name", json_string(argv[optind]));
    if (left == 2) {
        if (parse_size(argv[optind + 1], "size", &v))
            goto out;
        json_object_set_new(body, "size", json_integer((json_int_t)v));
    }
    r = call_print("POST", "/v1/images", body, NULL);
out:
    json_decref(body);
    return r;
}

int cmd_rm(int argc, char **argv)
{
    if (argc != 2)
        return usage_error("usage: qcowctl rm NAME");
    return call_at("DELETE", image_path(argv[1], ""), NULL, false);
}

int read_range(const char *path, int argc, char **argv)
{
    uint64_t off = 0, len = 0;
    if (argc >= 1 && parse_size(argv[0], "offset", &off))
        return EXIT_USAGE;
    if (argc == 2 && parse_size(argv[1], "length", &len))
        return EXIT_USAGE;
    if (argc == 2 && len == 0)
        return EXIT_OK;
    if (argc == 2 && off + len < off)
        return usage_error("bad range: offset plus length overflows");
    char range[80];
    struct http_req req = {.method = "GET", .path = path, .in_len = -1, .out = stdout};
    if (argc == 1) {
        snprintf(range, sizeof range, "Range: bytes=%" PRIu64 "-", off);
        req.headers[0] = range;
    } else if (argc == 2) {
        snprintf(range, sizeof range, "Range: bytes=%" PRIu64 "-%" PRIu64, off, off + len - 1);
        req.headers[0] = range;
    }
    struct http_resp resp;
    int r = http_do(&req, &resp);
    if (r == EXIT_OK && fflush(stdout))
        r = fail("writing the output: %s", strerror(errno));
    free(resp.body);
    return r;
}

int cmd_read(int argc, char **argv)
{
    if (argc < 2 || argc > 4)
        return usage_error("usage: qcowctl read NAME [OFFSET [LENGTH]]");
    char *p = image_path(argv[1], "/data");
    int r = p ? read_range(p, argc - 2, argv + 2) : EXIT_FAIL;
    free(p);
    return r;
}

/* One PUT of len bytes at off, from mem or from in. */
static int put_range(const char *name, uint64_t off, const void *mem, FILE *in, uint64_t len, bool flush)
{
    char *p = image_path(name, flush ? "/data?flush=y" : "/data?flush=n");
    if (!p)
        return EXIT_FAIL;
    char cr[96];
    snprintf(cr, sizeof cr, "Content-Range: bytes %" PRIu64 "-%" PRIu64 "/*", off, off + len - 1);
    struct http_req req = {.method = "PUT", .path = p, .headers = {cr}, .content_type = "application/octet-stream"};
    if (mem) {
        req.mem = mem;
        req.mem_len = len;
        req.in_len = -1;
    } else {
        req.in = in;
        req.in_len = (int64_t)len;
    }
    struct http_resp resp;
    int r = http_do(&req, &resp);
    free(resp.body);
    free(p);
    return r;
}

/* PATCH .../data with body (taken). */
static int patch(const char *name, json_t *body)
{
    char *p = image_path(name, "/data");
    int r = p && body ? call_json("PATCH", p, body, NULL) : EXIT_FAIL;
    free(p);
    json_decref(body);
    return r;
}

int cmd_write(int argc, char **argv)
{
    bool flush = true;
    int i = 1;
    if (i < argc && strcmp(argv[i], "--no-flush") == 0)
        flush = false, i++;
    if (argc - i != 2)
        return usage_error("usage: qcowctl write [--no-flush] NAME OFFSET < DATA");
    const char *name = argv[i];
    uint64_t off;
    if (parse_size(argv[i + 1], "offset", &off))
        return EXIT_USAGE;
    struct stat st;
    if (fstat(STDIN_FILENO, &st) == 0 && S_ISREG(st.st_mode)) {
        /* a file: one request, streamed, its length known up front */
        off_t pos = lseek(STDIN_FILENO, 0, SEEK_CUR);
        uint64_t len = (uint64_t)(st.st_size - (pos > 0 ? pos : 0));
        if (!len)
            return EXIT_OK;
        if (off + len < off)
            return usage_error("bad range: offset plus length overflows");
        return put_range(name, off, NULL, stdin, len, flush);
    }
    /* a pipe: chunks, each its own PUT, then one flush */
    char *buf = malloc(WRITE_CHUNK);
    if (!buf)
        return fail("out of memory");
    int r = EXIT_OK;
    for (;;) {
        size_t n = fread(buf, 1, WRITE_CHUNK, stdin);
        if (n && off + n < off) {
            r = usage_error("bad range: offset plus length overflows");
            break;
        }
        if (n && (r = put_range(name, off, buf, NULL, n, false)))
            break;
        off += n;
        if (n < WRITE_CHUNK) {
            if (ferror(stdin))
                r = fail("reading the input: %s", strerror(errno));
            break;
        }
    }
    free(buf);
    if (r == EXIT_OK && flush)
        r = patch(name, json_pack("{s:s}", "op", "flush"));
    return r;
}

int cmd_zero_discard(int argc, char **argv)
{
    const char *op = argv[0];
    bool flush = true;
    int i = 1;
    if (i < argc && strcmp(argv[i], "--no-flush") == 0)
        flush = false, i++;
    if (argc - i != 3)
        return usage_error("usage: qcowctl %s [--no-flush] NAME OFFSET LENGTH", op);
    uint64_t off, len;
    if (parse_size(argv[i + 1], "offset", &off) || parse_size(argv[i + 2], "length", &len))
        return EXIT_USAGE;
    return patch(argv[i], json_pack("{s:s, s:I, s:I, s:b}", "op", op, "offset", (json_int_t)off, "size",
                                    (json_int_t)len, "flush", flush));
}

int cmd_flush(int argc, char **argv)
{
    if (argc != 2)
        return usage_error("usage: qcowctl flush NAME");
    return patch(argv[1], json_pack("{s:s}", "op", "flush"));
}

int cmd_upload(int argc, char **argv)
{
    if (argc != 3)
        return usage_error("usage: qcowctl upload NAME FILE");
    FILE *in = fopen(argv[2], "rb");
    if (!in)
        return fail("%s: %s", argv[2], strerror(errno));
    struct stat st;
    if (fstat(fileno(in), &st) || !S_ISREG(st.st_mode)) {
        fclose(in);
        return fail("%s: not a regular file", argv[2]);
    }
    char *p = image_path(argv[1], "/file");
    int r = EXIT_FAIL;
    if (p) {
        struct http_req req = {
            .method = "PUT", .path = p, .in = in, .in_len = st.st_size, .content_type = "application/octet-stream"};
        struct http_resp resp;
        json_t *j = NULL;
        r = http_do(&req, &resp);
        if (r == EXIT_OK)
            r = (j = parse_answer(&resp)) ? print_json(j) : EXIT_FAIL;
        json_decref(j);
        free(resp.body);
    }
    free(p);
    fclose(in);
    return r;
}

int cmd_download(int argc, char **argv)
{
    if (argc != 3)
        return usage_error("usage: qcowctl download NAME FILE");
    bool to_stdout = strcmp(argv[2], "-") == 0;
    char *p = image_path(argv[1], "/file");
    if (!p)
        return EXIT_FAIL;
    /* into FILE.part, renamed when complete: a failed download leaves no FILE */
    char *part = NULL;
    FILE *out = stdout;
    if (!to_stdout) {
        if (asprintf(&part, "%s.part", argv[2]) < 0)
            return free(p), fail("out of memory");
        out = fopen(part, "wb");
        if (!out) {
            int e = errno;
            free(p);
            free(part);
            return fail("%s: %s", argv[2], strerror(e));
        }
    }
    struct http_req req = {.method = "GET", .path = p, .in_len = -1, .out = out};
    struct http_resp resp;
    int r = http_do(&req, &resp);
    if (to_stdout) {
        if (r == EXIT_OK && fflush(stdout))
            r = fail("writing the output: %s", strerror(errno));
    } else {
        if (fclose(out) && r == EXIT_OK)
            r = fail("%s: %s", argv[2], strerror(errno));
        if (r == EXIT_OK && rename(part, argv[2]))
            r = fail("%s: %s", argv[2], strerror(errno));
        if (r)
            unlink(part);
    }
    free(resp.body);
    free(part);
    free(p);
    return r;
}

int cmd_ticket_list(int argc, char **argv)
{
    if (argc != 1)
        return usage_error("usage: qcowctl ticket list");
    return call_print("GET", "/v1/tickets", NULL, "tickets");
}

int cmd_ticket_create(int argc, char **argv)
{
    static const struct option opts[] = {
        {"ops", required_argument, 0, 'o'}, {"timeout", required_argument, 0, 't'}, {0, 0, 0, 0}};
    const char *ops = "read";
    long timeout = 3600;
    char *end;
    int c;
    while ((c = ctl_getopt(argc, argv, opts)) != -1) {
        if (c == '?')
            return EXIT_USAGE;
        if (c == 'o')
            ops = optarg;
        errno = 0;
        if (c == 't' && ((timeout = strtol(optarg, &end, 10)) <= 0 || *end || errno))
            return usage_error("bad --timeout '%s': a number of seconds", optarg);
    }
    if (argc - optind != 1)
        return usage_error("usage: qcowctl ticket create IMAGE [--ops read,write] [--timeout SECONDS]");
    json_t *list = json_array();
    for (const char *s = ops; list && *s;) {
        size_t n = strcspn(s, ",");
        json_array_append_new(list, json_stringn(s, n));
        s += n + (s[n] == ',');
    }
    json_t *body = json_pack("{s:s, s:o, s:I}", "image", argv[optind], "ops", list, "timeout", (json_int_t)timeout);
    int r = body ? call_print("POST", "/v1/tickets", body, NULL) : fail("out of memory");
    json_decref(body);
    return r;
}

int cmd_ticket_revoke(int argc, char **argv)
{
    if (argc != 2)
        return usage_error("usage: qcowctl ticket revoke ID");
    char *e = http_escape(argv[1]), *p = NULL;
    if (!e || asprintf(&p, "/v1/tickets/%s", e) < 0)
        p = NULL;
    int r = p ? call_json("DELETE", p, NULL, NULL) : fail("out of memory");
    free(p);
    free(e);
    return r;
}
