/* qcowctl.c: the REST client of qcowd. One function per subcommand; each turns
 * its arguments into one HTTP call (or a few) of openapi/openapi.yaml. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "http.h"

#define DEFAULT_URL "http://127.0.0.1:8080"
/* `write` from a pipe (length unknown) sends one PUT per chunk of this size */
#define WRITE_CHUNK (8u << 20)

static void usage(FILE *f)
{
    fprintf(f,
            "usage: qcowctl [--url URL] [--token TOKEN] [--cacert FILE] COMMAND [ARGS]\n"
            "  --url URL       the qcowd server (default $QCOWD_URL, else " DEFAULT_URL ")\n"
            "  --token TOKEN   bearer token sent with every request (default $QCOWD_TOKEN; prefer the\n"
            "                  variable: the command line is visible to other users)\n"
            "  --cacert FILE   CA certificate (PEM) that verifies an https:// server (default\n"
            "                  $QCOWD_CACERT, else the system's)\n"
            "\n"
            "commands:\n"
            "  list                          the catalog, as JSON\n"
            "  info NAME                     one image's info, as JSON\n"
            "  create NAME [SIZE] [OPTIONS]  create an image; prints its info\n"
            "      --cluster-size N   --backing NAME   --extended-l2   --lazy-refcounts\n"
            "      --compression-type zlib|zstd   --refcount-bits N   --compat v2|v3\n"
            "      --preallocation off|metadata   (SIZE may be left out with --backing)\n"
            "  rm NAME                       delete an image\n"
            "  read NAME [OFFSET [LENGTH]]   guest bytes to stdout (no OFFSET: the whole disk)\n"
            "  write [--no-flush] NAME OFFSET   guest bytes from stdin, written at OFFSET\n"
            "  zero [--no-flush] NAME OFFSET LENGTH      make a range read as zeroes\n"
            "  discard [--no-flush] NAME OFFSET LENGTH   free the whole clusters of a range\n"
            "  flush NAME                    make every write durable\n"
            "  extents NAME                  the zero/hole map, as JSON\n"
            "  size NAME                     the virtual size in bytes\n"
            "  features NAME                 what the data endpoint can do, as JSON\n"
            "  upload NAME FILE              upload a qcow2 file as a new image; prints its info\n"
            "  download NAME FILE            the image's qcow2 file (FILE '-': stdout)\n"
            "  health                        is the server up\n"
            "  metrics                       the server's Prometheus metrics\n"
            "\n"
            "Sizes and offsets are bytes, or a number with a suffix k, M, G, T, P (powers of 1024).\n"
            "Errors: exit status 1 and `qcowctl: reason` on stderr.\n");
}

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("qcowctl: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

/* Parses a byte count: digits with an optional k/M/G/T/P/E suffix (binary). */
static int parse_size(const char *s, const char *what, uint64_t *out)
{
    if (!s || !*s || *s < '0' || *s > '9')
        return fail("bad %s '%s': expected a number of bytes, optionally with a suffix k, M, G, T", what,
                    s ? s : "");
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno)
        return fail("bad %s '%s': too large", what, s);
    int shift = 0;
    if (*end) {
        const char *units = "kmgtpe";
        const char *u = strchr(units, end[0] | 0x20);
        if (!u || (end[1] && strcmp(end + 1, "B") && strcmp(end + 1, "iB")))
            return fail("bad %s '%s': expected a number of bytes, optionally with a suffix k, M, G, T", what, s);
        shift = 10 * (int)(u - units + 1);
    }
    if (shift && v > (UINT64_MAX >> shift))
        return fail("bad %s '%s': too large", what, s);
    v <<= shift;
    if (v > INT64_MAX)
        return fail("bad %s '%s': too large", what, s);
    *out = v;
    return 0;
}

/* "/v1/images/NAME" + suffix, NAME escaped; NULL after printing an error. */
static char *image_path(const char *name, const char *suffix)
{
    char *e = http_escape(name);
    if (!e) {
        fail("out of memory");
        return NULL;
    }
    size_t n = strlen(e) + strlen(suffix) + 16;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "/v1/images/%s%s", e, suffix);
    else
        fail("out of memory");
    free(e);
    return p;
}

/* Prints a JSON body pretty (2-space indent), or the body as is if it is not JSON. */
static int print_json(const char *body, size_t len, const char *key)
{
    json_error_t je;
    json_t *j = json_loadb(body ? body : "", len, JSON_DECODE_ANY, &je);
    if (!j)
        return fail("the server's answer is not JSON: %s", je.text);
    json_t *show = key ? json_object_get(j, key) : j;
    if (!show)
        show = j;
    int r = json_dumpf(show, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY);
    fputc('\n', stdout);
    json_decref(j);
    if (r < 0 || fflush(stdout))
        return fail("writing the output: %s", strerror(errno));
    return 0;
}

/* GET of a JSON document, printed pretty. */
static int get_json(const char *path, const char *key)
{
    struct http_req req = {.method = "GET", .path = path, .in_len = -1};
    struct http_resp resp;
    int r = http_do(&req, &resp) ? 1 : print_json(resp.body, resp.len, key);
    free(resp.body);
    return r;
}

static int send_json(const char *method, const char *path, json_t *body, bool print)
{
    char *s = json_dumps(body, JSON_COMPACT);
    if (!s)
        return fail("out of memory");
    struct http_req req = {.method = method, .path = path, .mem = s, .mem_len = strlen(s), .in_len = -1,
                           .content_type = "application/json"};
    struct http_resp resp;
    int r = http_do(&req, &resp) ? 1 : print ? print_json(resp.body, resp.len, NULL) : 0;
    free(resp.body);
    free(s);
    return r;
}

/* ---- subcommands ---- */

static int cmd_list(int argc, char **argv)
{
    if (argc != 1)
        return fail("usage: qcowctl list");
    return get_json("/v1/images", "images");
}

static int cmd_info(int argc, char **argv)
{
    if (argc != 2)
        return fail("usage: qcowctl info NAME");
    char *p = image_path(argv[1], "");
    int r = p ? get_json(p, NULL) : 1;
    free(p);
    return r;
}

static int cmd_extents(int argc, char **argv)
{
    if (argc != 2)
        return fail("usage: qcowctl extents NAME");
    char *p = image_path(argv[1], "/extents?context=zero");
    int r = p ? get_json(p, NULL) : 1;
    free(p);
    return r;
}

static int cmd_health(int argc, char **argv)
{
    if (argc != 1)
        return fail("usage: qcowctl health");
    return get_json("/v1/health", NULL);
}

static int cmd_metrics(int argc, char **argv)
{
    if (argc != 1)
        return fail("usage: qcowctl metrics");
    struct http_req req = {.method = "GET", .path = "/metrics", .in_len = -1, .out = stdout};
    struct http_resp resp;
    int r = http_do(&req, &resp) ? 1 : 0;
    free(resp.body);
    return r;
}

static int cmd_features(int argc, char **argv)
{
    if (argc != 2)
        return fail("usage: qcowctl features NAME");
    char *p = image_path(argv[1], "/data");
    if (!p)
        return 1;
    struct http_req req = {.method = "OPTIONS", .path = p, .in_len = -1};
    struct http_resp resp;
    int r = http_do(&req, &resp) ? 1 : print_json(resp.body, resp.len, NULL);
    free(resp.body);
    free(p);
    return r;
}

static int cmd_size(int argc, char **argv)
{
    if (argc != 2)
        return fail("usage: qcowctl size NAME");
    char *p = image_path(argv[1], "");
    if (!p)
        return 1;
    /* the info's virtual-size: the same number as HEAD .../data's Content-Length */
    struct http_req req = {.method = "GET", .path = p, .in_len = -1};
    struct http_resp resp;
    int r = 1;
    if (http_do(&req, &resp) == 0) {
        json_t *j = json_loadb(resp.body ? resp.body : "", resp.len, 0, NULL);
        json_int_t size;
        if (j && json_unpack(j, "{s:I}", "virtual-size", &size) == 0) {
            printf("%" PRId64 "\n", (int64_t)size);
            r = 0;
        } else {
            fail("the server's info has no virtual-size");
        }
        json_decref(j);
    }
    free(resp.body);
    free(p);
    return r;
}

static int cmd_create(int argc, char **argv)
{
    static const struct option opts[] = {
        {"cluster-size", required_argument, 0, 'c'},  {"backing", required_argument, 0, 'b'},
        {"extended-l2", no_argument, 0, 'x'},         {"lazy-refcounts", no_argument, 0, 'l'},
        {"compression-type", required_argument, 0, 'z'}, {"refcount-bits", required_argument, 0, 'r'},
        {"compat", required_argument, 0, 'v'},        {"preallocation", required_argument, 0, 'p'},
        {0, 0, 0, 0},
    };
    json_t *body = json_object();
    int r = 1, c;
    uint64_t v;
    if (!body)
        return fail("out of memory");
    optind = 0; /* GNU: rescan from scratch, options may follow NAME and SIZE */
    opterr = 0;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
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
            fail("create: bad option '%s' (see qcowctl --help)", argv[optind - 1]);
            goto out;
        }
    }
    int left = argc - optind;
    if (left < 1 || left > 2 || (left == 1 && !json_object_get(body, "backing-file"))) {
        fail("usage: qcowctl create NAME SIZE [OPTIONS] (SIZE may be left out with --backing)");
        goto out;
    }
    json_object_set_new(body, "name", json_string(argv[optind]));
    if (left == 2) {
        if (parse_size(argv[optind + 1], "size", &v))
            goto out;
        json_object_set_new(body, "size", json_integer((json_int_t)v));
    }
    r = send_json("POST", "/v1/images", body, true);
out:
    json_decref(body);
    return r;
}

static int cmd_rm(int argc, char **argv)
{
    if (argc != 2)
        return fail("usage: qcowctl rm NAME");
    char *p = image_path(argv[1], "");
    if (!p)
        return 1;
    struct http_req req = {.method = "DELETE", .path = p, .in_len = -1};
    struct http_resp resp;
    int r = http_do(&req, &resp) ? 1 : 0;
    free(resp.body);
    free(p);
    return r;
}

static int cmd_read(int argc, char **argv)
{
    uint64_t off = 0, len = 0;
    if (argc < 2 || argc > 4)
        return fail("usage: qcowctl read NAME [OFFSET [LENGTH]]");
    if (argc >= 3 && parse_size(argv[2], "offset", &off))
        return 1;
    if (argc == 4 && parse_size(argv[3], "length", &len))
        return 1;
    if (argc == 4 && len == 0)
        return 0;
    char *p = image_path(argv[1], "/data");
    if (!p)
        return 1;
    char range[80];
    struct http_req req = {.method = "GET", .path = p, .in_len = -1, .out = stdout};
    if (argc == 3) {
        snprintf(range, sizeof range, "Range: bytes=%" PRIu64 "-", off);
        req.headers[0] = range;
    } else if (argc == 4) {
        if (off + len < off)
            return free(p), fail("bad range: offset plus length overflows");
        snprintf(range, sizeof range, "Range: bytes=%" PRIu64 "-%" PRIu64, off, off + len - 1);
        req.headers[0] = range;
    }
    struct http_resp resp;
    int r = http_do(&req, &resp) ? 1 : 0;
    if (r == 0 && fflush(stdout))
        r = fail("writing the output: %s", strerror(errno));
    free(resp.body);
    free(p);
    return r;
}

/* One PUT of len bytes at off, from mem or from in. */
static int put_range(const char *name, uint64_t off, const void *mem, FILE *in, uint64_t len, bool flush)
{
    char *p = image_path(name, flush ? "/data?flush=y" : "/data?flush=n");
    if (!p)
        return 1;
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
    int r = http_do(&req, &resp) ? 1 : 0;
    free(resp.body);
    free(p);
    return r;
}

static int patch(const char *name, json_t *body)
{
    char *p = image_path(name, "/data");
    int r = p ? send_json("PATCH", p, body, false) : 1;
    free(p);
    json_decref(body);
    return r;
}

static int cmd_write(int argc, char **argv)
{
    bool flush = true;
    int i = 1;
    if (i < argc && strcmp(argv[i], "--no-flush") == 0)
        flush = false, i++;
    if (argc - i != 2)
        return fail("usage: qcowctl write [--no-flush] NAME OFFSET < DATA");
    const char *name = argv[i];
    uint64_t off;
    if (parse_size(argv[i + 1], "offset", &off))
        return 1;
    struct stat st;
    if (fstat(STDIN_FILENO, &st) == 0 && S_ISREG(st.st_mode)) {
        /* a file: one request, streamed, its length known up front */
        off_t pos = lseek(STDIN_FILENO, 0, SEEK_CUR);
        uint64_t len = (uint64_t)(st.st_size - (pos > 0 ? pos : 0));
        if (!len)
            return 0;
        if (off + len < off)
            return fail("bad range: offset plus length overflows");
        return put_range(name, off, NULL, stdin, len, flush);
    }
    /* a pipe: chunks, each its own PUT, then one flush */
    char *buf = malloc(WRITE_CHUNK);
    if (!buf)
        return fail("out of memory");
    int r = 0;
    for (;;) {
        size_t n = fread(buf, 1, WRITE_CHUNK, stdin);
        if (n && (off + n < off || (r = put_range(name, off, buf, NULL, n, false))))
            break;
        off += n;
        if (n < WRITE_CHUNK) {
            if (ferror(stdin))
                r = fail("reading the input: %s", strerror(errno));
            break;
        }
    }
    free(buf);
    if (r == 0 && flush)
        r = patch(name, json_pack("{s:s}", "op", "flush"));
    return r;
}

static int cmd_zero_discard(int argc, char **argv)
{
    const char *op = argv[0];
    bool flush = true;
    int i = 1;
    if (i < argc && strcmp(argv[i], "--no-flush") == 0)
        flush = false, i++;
    if (argc - i != 3)
        return fail("usage: qcowctl %s [--no-flush] NAME OFFSET LENGTH", op);
    uint64_t off, len;
    if (parse_size(argv[i + 1], "offset", &off) || parse_size(argv[i + 2], "length", &len))
        return 1;
    return patch(argv[i], json_pack("{s:s, s:I, s:I, s:b}", "op", op, "offset", (json_int_t)off, "size",
                                    (json_int_t)len, "flush", flush));
}

static int cmd_flush(int argc, char **argv)
{
    if (argc != 2)
        return fail("usage: qcowctl flush NAME");
    return patch(argv[1], json_pack("{s:s}", "op", "flush"));
}

static int cmd_upload(int argc, char **argv)
{
    if (argc != 3)
        return fail("usage: qcowctl upload NAME FILE");
    FILE *in = fopen(argv[2], "rb");
    if (!in)
        return fail("%s: %s", argv[2], strerror(errno));
    struct stat st;
    if (fstat(fileno(in), &st) || !S_ISREG(st.st_mode)) {
        fclose(in);
        return fail("%s: not a regular file", argv[2]);
    }
    char *p = image_path(argv[1], "/file");
    int r = 1;
    if (p) {
        struct http_req req = {.method = "PUT", .path = p, .in = in, .in_len = st.st_size,
                               .content_type = "application/octet-stream"};
        struct http_resp resp;
        r = http_do(&req, &resp) ? 1 : print_json(resp.body, resp.len, NULL);
        free(resp.body);
    }
    free(p);
    fclose(in);
    return r;
}

static int cmd_download(int argc, char **argv)
{
    if (argc != 3)
        return fail("usage: qcowctl download NAME FILE");
    bool to_stdout = strcmp(argv[2], "-") == 0;
    char *p = image_path(argv[1], "/file");
    if (!p)
        return 1;
    /* into FILE.part, renamed when complete: a failed download leaves no FILE */
    char *part = NULL;
    FILE *out = stdout;
    if (!to_stdout) {
        size_t n = strlen(argv[2]) + 6;
        part = malloc(n);
        if (!part)
            return free(p), fail("out of memory");
        snprintf(part, n, "%s.part", argv[2]);
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
    int r = http_do(&req, &resp) ? 1 : 0;
    if (to_stdout) {
        if (r == 0 && fflush(stdout))
            r = fail("writing the output: %s", strerror(errno));
    } else {
        if (fclose(out) && r == 0)
            r = fail("%s: %s", argv[2], strerror(errno));
        if (r == 0 && rename(part, argv[2]))
            r = fail("%s: %s", argv[2], strerror(errno));
        if (r)
            unlink(part);
    }
    free(resp.body);
    free(part);
    free(p);
    return r;
}

static const struct command {
    const char *name;
    int (*fn)(int argc, char **argv);
} commands[] = {
    {"list", cmd_list},         {"info", cmd_info},       {"create", cmd_create},   {"rm", cmd_rm},
    {"read", cmd_read},         {"write", cmd_write},     {"zero", cmd_zero_discard}, {"discard", cmd_zero_discard},
    {"flush", cmd_flush},       {"extents", cmd_extents}, {"size", cmd_size},       {"features", cmd_features},
    {"upload", cmd_upload},     {"download", cmd_download}, {"health", cmd_health}, {"metrics", cmd_metrics},
};

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"url", required_argument, 0, 'u'},
        {"token", required_argument, 0, 't'},
        {"cacert", required_argument, 0, 'c'},
        {"help", no_argument, 0, 'h'},
        {"version", no_argument, 0, 'V'},
        {0, 0, 0, 0},
    };
    const char *url = getenv("QCOWD_URL");
    const char *token = getenv("QCOWD_TOKEN"), *cacert = getenv("QCOWD_CACERT");
    int c;
    if (!url || !*url)
        url = DEFAULT_URL;
    while ((c = getopt_long(argc, argv, "+hu:", opts, NULL)) != -1) {
        switch (c) {
        case 'u':
            url = optarg;
            break;
        case 't':
            token = optarg;
            break;
        case 'c':
            cacert = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("qcowctl %s (libcurl %s)\n", QCOWD_VERSION, curl_version_info(CURLVERSION_NOW)->version);
            return 0;
        default:
            usage(stderr);
            return 1;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return 1;
    }
    const char *name = argv[optind];
    if (strcmp(name, "help") == 0) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(commands[i].name, name) != 0)
            continue;
        int sub_argc = argc - optind;
        char **sub_argv = argv + optind;
        for (int k = 1; k < sub_argc; k++)
            if (strcmp(sub_argv[k], "--help") == 0) {
                usage(stdout);
                return 0;
            }
        if (http_init(url, token, cacert))
            return 1;
        int r = commands[i].fn(sub_argc, sub_argv);
        http_done();
        return r ? 1 : 0;
    }
    return fail("unknown command '%s' (see qcowctl --help)", name);
}
