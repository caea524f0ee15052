/* main.c: the qcowd daemon: options, the catalog, the HTTP server, and a clean
 * stop on SIGTERM/SIGINT (stop accepting, drain, close images, exit 0). */
#include <ctype.h>
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access.h"
#include "api.h"
#include "auth.h"
#include "catalog.h"
#include "config.h"
#include "err.h"
#include "vfs.h"
#include "events.h"
#include "jobops.h"
#include "jobs.h"
#include "qcow2.h"
#include "ticket.h"
#include "tls.h"

#define DEFAULT_LISTEN  "127.0.0.1:8080"
#define DEFAULT_CATALOG "./data"
#define DEFAULT_THREADS 8
#define DRAIN_MS        30000 /* how long in-flight requests get to finish on SIGTERM */
#define DEFAULT_JOB_WORKERS 2
#define JOBS_FILE       ".qcowd-jobs.json" /* job records, in the catalog folder */
#define DEFAULT_MAX_IMAGE_META (16ull << 20) /* metadata memory per open image: a 256 TiB disk's L1 is 4 MiB */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: qcowd [--config FILE] [--listen HOST:PORT] [--catalog DIR] [--threads N] [--quiet]\n"
            "  --config FILE       read settings from FILE first: one \"key = value\" a line, the key\n"
            "                      being any long option below without its dashes (\"threads = 16\",\n"
            "                      \"quiet = true\"); '#' starts a comment; options given on the\n"
            "                      command line win over the file; an unknown key is an error\n"
            "  --listen HOST:PORT  address to serve on (default " DEFAULT_LISTEN "; port 0: any free port)\n"
            "  --catalog DIR       folder of the *.qcow2 images (default " DEFAULT_CATALOG ")\n"
            "  --threads N         HTTP worker threads: the size of the server's thread pool (default %d)\n"
            "  --quiet             no per-request log lines\n"
            "  --plugin-dir DIR    load storage plugins (*.so) from DIR (default: the build's or installed plugins)\n"
            "  --s3-endpoint URL   S3 endpoint for s3://BUCKET/PREFIX catalogs (path-style; credentials from\n"
            "                      AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION or --s3-opt credentials-file=F)\n"
            "  --s3-opt KEY=VALUE  another s3 plugin setting (region, staging-dir, cache-size, part-size, ...)\n"
            "  --job-workers N     threads running jobs (default %d)\n"
            "  --max-listeners N   GET /v1/events clients at once (default %d)\n"
            "  --job-retention S   concluded jobs are dismissed S seconds after they end (default %u; 0: kept\n"
            "                      until DELETE /v1/jobs/ID)\n"
            "  --event-history N   events kept for clients that reconnect with Last-Event-ID (default %u)\n"
            "  --event-history-bytes SIZE  and their bytes at most (default %uM)\n"
            "budgets (refusals name the option; SIZE takes K, M, G, T or P):\n"
            "  --max-connections N connections at once in total (default %u, kept below the open-file\n"
            "                      limit, whose soft value qcowd raises to the hard one)\n"
            "  --max-connections-per-client N  connections at once from one address (default %u)\n"
            "  --header-timeout S  a request's headers must arrive within S seconds (default %u)\n"
            "  --min-rate B        bytes/s a request body or a container download must keep up over\n"
            "                      each --header-timeout period, or the connection is closed (default %u; 0: off)\n"
            "  --max-listeners-per-client N  GET /v1/events streams from one address (default %u)\n"
            "  --max-upload SIZE   bytes of one PUT .../file (default %s; 413 over it)\n"
            "  --upload-resume-time S  an upload sent in pieces (Content-Range) that stopped short is kept\n"
            "                      S seconds for its client to resume (default %u; at most %u kept)\n"
            "  --max-catalog SIZE  bytes of all the image files together (default 0: only the store's free\n"
            "                      space; 507 when an upload would pass it, or a create or convert finds it passed)\n"
            "  --max-virtual-size SIZE  disk size of a created or uploaded image (default %s)\n"
            "  --max-queued-jobs N jobs waiting to run (default %u; 503 with Retry-After over it)\n"
            "  --max-paused-jobs N running jobs paused at once, each keeping a thread but not a worker\n"
            "                      slot (default %u; 409 over it)\n"
            "  --max-job-records N concluded jobs kept (default %u; the oldest are dismissed)\n"
            "  --max-open-images N unused open images kept cached (default %u)\n"
            "  --max-image-meta SIZE  metadata one open image (with its backing chain) may hold in memory:\n"
            "                      L1 and refcount tables, snapshot table, bitmap directory, tracked bitmaps;\n"
            "                      an image needing more is refused with 422 (default 16M; suffixes K, M, G)\n"
            "access (without --tokens qcowd serves only loopback addresses):\n"
            "  --tokens FILE       bearer tokens, one \"NAME ROLE sha256:HEX\" a line (ROLE: reader, operator,\n"
            "                      admin); every endpoint but /v1/health then needs one; reloaded on SIGHUP.\n"
            "                      `qcowd token new NAME ROLE` makes a token and its line\n"
            "  --tls-cert FILE, --tls-key FILE  serve HTTPS (TLS 1.2+) with this PEM chain and key; reloaded\n"
            "                      on SIGHUP without dropping connections\n"
            "  --tls-client-ca FILE  also require a client certificate issued by this CA (PEM)\n"
            "  --insecure-no-auth  serve a non-loopback --listen without --tokens (lab use only)\n"
            "  --public-name NAME  a host name clients use for this server (Host header), besides IP\n"
            "                      addresses and localhost; repeatable\n"
            "  --cors-origin ORIGIN  a web origin (https://host[:port]) allowed to call the API from a\n"
            "                      browser, besides the server's own; repeatable\n"
            "  --max-tickets N     data tickets alive at once (default %u)\n"
            "  --sendfile yes|no   send ranged reads of plain data straight from the image file (default yes);\n"
            "                      a cluster once sent is copied on its next write, so workloads that read and\n"
            "                      then rewrite the same clusters in large pieces may prefer no\n"
            "  --version, --help\n",
            DEFAULT_THREADS, DEFAULT_JOB_WORKERS, EVENTS_DEFAULT_LISTENERS, JOBS_DEFAULT_RETENTION_MS / 1000,
            EVENTS_DEFAULT_HISTORY, EVENTS_DEFAULT_HISTORY_BYTES >> 20, API_DEFAULT_CONNECTIONS,
            API_DEFAULT_PER_CLIENT, API_DEFAULT_HEADER_TIMEOUT, API_DEFAULT_MIN_RATE, API_DEFAULT_LISTENERS_PER_CLIENT,
            CATALOG_DEFAULT_UPLOAD_TEXT, CATALOG_DEFAULT_UPLOAD_KEEP, CATALOG_MAX_SUSPENDED, CATALOG_DEFAULT_VIRTUAL_TEXT,
            JOBS_DEFAULT_QUEUED, JOBS_DEFAULT_PAUSED, JOBS_DEFAULT_RECORDS,
            CATALOG_DEFAULT_OPEN,
            (unsigned)TICKET_DEFAULT_MAX);
}

/* `qcowd token new NAME ROLE`: a fresh token on the first line of stdout and the
 * line for the --tokens file on the second. Returns the exit status. */
static int token_command(int argc, char **argv)
{
    if (argc != 5 || strcmp(argv[2], "new")) {
        fprintf(stderr, "usage: qcowd token new NAME ROLE   (ROLE: reader, operator or admin)\n"
                        "  prints a new random token, then the line that grants it ROLE in a --tokens file\n");
        return 2;
    }
    enum auth_role role = auth_role_parse(argv[4], strlen(argv[4]));
    char token[AUTH_TOKEN_LEN + 1], line[AUTH_NAME_MAX + 128];
    int ret = role == AUTH_NONE ? err_fail(EINVAL, "the role must be reader, operator or admin") : auth_token_new(token);
    if (ret == 0)
        ret = auth_token_line(argv[3], role, token, line, sizeof line);
    if (ret < 0) {
        fprintf(stderr, "qcowd token new: %s\n", err_msg(ret));
        return 2;
    }
    printf("%s\n%s\n", token, line);
    memset(token, 0, sizeof token);
    return fflush(stdout) == 0 ? 0 : 1;
}

/* Whether the host of a --listen value is a loopback address (127.0.0.0/8, ::1,
 * localhost): reachable from this machine only. */
static bool loopback_listen(const char *listen)
{
    const char *colon = strrchr(listen, ':');
    size_t n = colon ? (size_t)(colon - listen) : strlen(listen);
    char host[256];
    if (n >= sizeof host)
        return false;
    memcpy(host, listen, n);
    host[n] = '\0';
    if (!strcmp(host, "localhost") || !strcmp(host, "[::1]"))
        return true;
    struct in_addr a;
    return inet_pton(AF_INET, host, &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

/* The settings of the --config file, if any: its arguments come first in the
 * argument list getopt sees, so the command line wins; static, since the
 * settings point into it until exit. */
static struct config_args file;
static bool parsing; /* getopt is still going through the arguments */
static int cur_arg;  /* index of the argument being handled */

/* A bad value in the file is reported by the option's own check, which returns
 * from main; this adds where it was set. */
static void note_setting_origin(void)
{
    if (parsing && cur_arg > 0 && cur_arg < file.argc)
        fprintf(stderr, "qcowd: (set in %s, line %u)\n", file.path, file.line[cur_arg]);
}

/* The FILE of --config FILE on the command line (the last one), or NULL. */
static const char *config_path(int argc, char **argv, const struct option *lo, const char *shortopts)
{
    const char *path = NULL;
    int c, saved = opterr;
    opterr = 0; /* errors are reported by the real pass */
    while ((c = getopt_long(argc, argv, shortopts, lo, NULL)) != -1)
        if (c == 'C')
            path = optarg;
    opterr = saved;
    optind = 0; /* a full restart of getopt */
    return path;
}

/* argv with the file's arguments inserted after argv[0] (a new array of borrowed
 * strings, never freed: it lives as long as the settings). NULL on ENOMEM. */
static char **with_file(int argc, char **argv, int *out_argc)
{
    char **v = calloc((size_t)(argc + file.argc + 1), sizeof *v);
    if (!v)
        return NULL;
    int n = 0;
    v[n++] = argv[0];
    for (int i = 1; i < file.argc; i++)
        v[n++] = file.argv[i];
    for (int i = 1; i < argc; i++)
        v[n++] = argv[i];
    *out_argc = n;
    return v;
}

static void note_stale(void *ctx, const char *tmp, const char *why, int err)
{
    if (err < 0)
        fprintf(stderr, "qcowd: cannot remove the stale temporary file %s (%s): %s\n", tmp, why, err_msg(err));
    else
        fprintf(stderr, "qcowd: removed the stale temporary file %s (left by an interrupted %s: %s)\n", tmp,
                !strncmp(tmp, ".convert-", 9) ? "convert" : "create or upload", why);
    (void)ctx;
}

/* Whether dir may hold code qcowd loads: a folder (not a link) owned by root or
 * by qcowd's user, that nobody else may write to. */
static int trusted_dir(const char *dir, const char *what)
{
    struct stat st;
    if (lstat(dir, &st) < 0)
        return err_fail(errno, "%s %s: %s", what, dir, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return err_fail(ENOTDIR, "%s %s: not a folder", what, dir);
    if (st.st_mode & S_IWOTH)
        return err_fail(EPERM, "%s %s: anyone may write into it, so anyone could make qcowd run their code "
                               "(chmod o-w)", what, dir);
    if (st.st_uid != 0 && st.st_uid != geteuid())
        return err_fail(EPERM, "%s %s: owned by uid %u, neither root nor qcowd's user", what, dir,
                        (unsigned)st.st_uid);
    return 0;
}

/* Whether this binary runs from the build tree (then it loads the build's
 * plugins; an installed binary never does). */
static bool running_from_build_tree(void)
{
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0)
        return false;
    exe[n] = '\0';
    const char *slash = strrchr(QCOWD_BUILD_PLUGIN_DIR, '/');
    size_t root = slash ? (size_t)(slash - QCOWD_BUILD_PLUGIN_DIR) : 0;
    return root && !strncmp(exe, QCOWD_BUILD_PLUGIN_DIR, root) && exe[root] == '/';
}

/* Storage plugins: from --plugin-dir, else the build tree's folder for a binary
 * of the build tree, else the installed one. Only an explicit folder must exist;
 * any folder must be trusted (trusted_dir). */
static int load_plugins(const char *dir)
{
    struct stat st;
    const char *what = "--plugin-dir";
    if (!dir) {
        dir = running_from_build_tree() ? QCOWD_BUILD_PLUGIN_DIR : QCOWD_INSTALL_PLUGIN_DIR;
        what = "plugin folder";
        if (stat(dir, &st) < 0)
            return 0;
    }
    int ret = trusted_dir(dir, what);
    if (ret < 0)
        return ret;
    int n = vfs_load_plugins(dir);
    return n < 0 ? n : 0;
}

/* After a restart: a job cut off while it wrote metadata (snapshot create, delete
 * or revert; commit, into top and base) may have left clusters with a refcount
 * and no user (leaks: never corruption, by the write order). Queue a check job
 * that reclaims them, and say so. */
struct cut_off_ctx {
    struct jobs *jobs;
    struct catalog *cat;
};

static void repair_leaks(struct cut_off_ctx *x, const char *cut_id, const char *image)
{
    json_t *job = NULL;
    int ret = svc_check_job(x->jobs, x->cat, image, "leaks", &job);
    if (ret < 0)
        fprintf(stderr, "qcowd: job %s was cut off by the restart; no repair of '%s' queued: %s\n", cut_id, image,
                err_msg(ret));
    else
        fprintf(stderr, "qcowd: job %s was cut off by the restart; check job %s reclaims what it leaked in '%s'\n",
                cut_id, json_string_value(json_object_get(job, "id")), image);
    json_decref(job);
}

static void after_cut_off(void *ctx, const char *id, const char *type, const char *image, json_t *params)
{
    struct cut_off_ctx *x = ctx;
    bool commit = !strcmp(type, "commit");
    if (!commit && strncmp(type, "snapshot-", 9))
        return; /* convert builds a temporary image (removed at start); check repairs itself */
    repair_leaks(x, id, image);
    if (!commit)
        return;
    /* the base: as asked, else top's backing file when it is a catalog image */
    const char *base = json_string_value(json_object_get(params, "base"));
    char name[CATALOG_NAME_MAX + 1] = "";
    struct catalog_image *ci;
    if (!base && catalog_get(x->cat, image, &ci) == 0) {
        const char *b = qcow2_get_info(catalog_image_qcow2(ci))->backing_file;
        size_t n = b ? strlen(b) : 0, sl = strlen(CATALOG_SUFFIX);
        if (n > sl && n - sl <= CATALOG_NAME_MAX && !strcmp(b + n - sl, CATALOG_SUFFIX)) {
            memcpy(name, b, n - sl);
            name[n - sl] = '\0';
        }
        catalog_put(ci);
        base = name[0] && catalog_valid_name(name) == 0 ? name : NULL;
    }
    if (base)
        repair_leaks(x, id, base);
}

/* Long options without a short letter. */
enum {
    OPT_MAX_CONN = 256,
    OPT_PER_CLIENT,
    OPT_HEADER_TIMEOUT,
    OPT_MIN_RATE,
    OPT_LISTENERS_PER_CLIENT,
    OPT_MAX_UPLOAD,
    OPT_MAX_CATALOG,
    OPT_MAX_VIRTUAL,
    OPT_MAX_QUEUED,
    OPT_MAX_OPEN,
    OPT_TOKENS,
    OPT_TLS_CERT,
    OPT_TLS_KEY,
    OPT_TLS_CLIENT_CA,
    OPT_INSECURE,
    OPT_PUBLIC_NAME,
    OPT_CORS_ORIGIN,
    OPT_MAX_TICKETS,
    OPT_MAX_PAUSED,
    OPT_MAX_JOB_RECORDS,
    OPT_JOB_RETENTION,
    OPT_UPLOAD_KEEP,
    OPT_EVENT_HISTORY,
    OPT_EVENT_HISTORY_BYTES,
};

static const char *option_name(const struct option *lo, int val)
{
    for (; lo->name; lo++)
        if (lo->val == val)
            return lo->name;
    return "?";
}

/* A decimal count in [min, max]; 0 or -1. */
static int parse_count(const char *s, uint64_t min, uint64_t max, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || *s == '-' || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

/* A byte count with an optional binary suffix (K M G T P); 0 or -1. */
static int parse_bytes(const char *s, uint64_t *out)
{
    static const char units[] = "KMGTP";
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *s == '-')
        return -1;
    const char *u = *end ? strchr(units, toupper((unsigned char)*end)) : NULL;
    if (*end && (!u || end[1]))
        return -1;
    unsigned shift = u ? 10u * (unsigned)(u - units + 1) : 0;
    if (v > (UINT64_MAX >> shift))
        return -1;
    *out = (uint64_t)v << shift;
    return 0;
}

/* Idle sockets cost a descriptor each: take every one the hard limit allows
 * (the connection budget is sized below it, api_server_start). */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return;
    rlim_t want = rl.rlim_max == RLIM_INFINITY ? (rlim_t)1 << 20 : rl.rlim_max; /* Linux's nr_open default */
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < want) {
        rlim_t was = rl.rlim_cur;
        rl.rlim_cur = want;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
            fprintf(stderr, "qcowd: cannot raise the open-file limit from %llu: %s\n", (unsigned long long)was,
                    strerror(errno));
    }
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"config", required_argument, 0, 'C'},
        {"listen", required_argument, 0, 'l'},
        {"catalog", required_argument, 0, 'c'},
        {"threads", required_argument, 0, 't'},
        {"quiet", no_argument, 0, 'q'},
        {"plugin-dir", required_argument, 0, 'P'},
        {"s3-endpoint", required_argument, 0, 'E'},
        {"s3-opt", required_argument, 0, 'O'},
        {"job-workers", required_argument, 0, 'J'},
        {"max-listeners", required_argument, 0, 'L'},
        {"sendfile", required_argument, 0, 'S'},
        {"max-connections", required_argument, 0, OPT_MAX_CONN},
        {"max-connections-per-client", required_argument, 0, OPT_PER_CLIENT},
        {"header-timeout", required_argument, 0, OPT_HEADER_TIMEOUT},
        {"min-rate", required_argument, 0, OPT_MIN_RATE},
        {"max-listeners-per-client", required_argument, 0, OPT_LISTENERS_PER_CLIENT},
        {"max-upload", required_argument, 0, OPT_MAX_UPLOAD},
        {"max-catalog", required_argument, 0, OPT_MAX_CATALOG},
        {"max-virtual-size", required_argument, 0, OPT_MAX_VIRTUAL},
        {"max-queued-jobs", required_argument, 0, OPT_MAX_QUEUED},
        {"max-paused-jobs", required_argument, 0, OPT_MAX_PAUSED},
        {"max-job-records", required_argument, 0, OPT_MAX_JOB_RECORDS},
        {"job-retention", required_argument, 0, OPT_JOB_RETENTION},
        {"upload-resume-time", required_argument, 0, OPT_UPLOAD_KEEP},
        {"event-history", required_argument, 0, OPT_EVENT_HISTORY},
        {"event-history-bytes", required_argument, 0, OPT_EVENT_HISTORY_BYTES},
        {"max-open-images", required_argument, 0, OPT_MAX_OPEN},
        {"max-image-meta", required_argument, 0, 'M'},
        {"tokens", required_argument, 0, OPT_TOKENS},
        {"tls-cert", required_argument, 0, OPT_TLS_CERT},
        {"tls-key", required_argument, 0, OPT_TLS_KEY},
        {"tls-client-ca", required_argument, 0, OPT_TLS_CLIENT_CA},
        {"insecure-no-auth", no_argument, 0, OPT_INSECURE},
        {"public-name", required_argument, 0, OPT_PUBLIC_NAME},
        {"cors-origin", required_argument, 0, OPT_CORS_ORIGIN},
        {"max-tickets", required_argument, 0, OPT_MAX_TICKETS},
        {"help", no_argument, 0, 'h'},
        {"version", no_argument, 0, 'V'},
        {0, 0, 0, 0},
    };
    if (argc >= 2 && !strcmp(argv[1], "token"))
        return token_command(argc, argv);
    struct api_config cfg = {.listen = DEFAULT_LISTEN, .threads = DEFAULT_THREADS, .log = 1};
    const char *tokens_file = NULL, *tls_cert = NULL, *tls_key = NULL, *tls_client_ca = NULL;
    bool insecure = false;
    static struct access_names public_names, cors_origins;
    unsigned long max_tickets = TICKET_DEFAULT_MAX;
    struct catalog_opts copts = {.max_meta_bytes = DEFAULT_MAX_IMAGE_META};
    unsigned max_queued = 0;
    const char *root = DEFAULT_CATALOG;
    static const char shortopts[] = "l:c:t:qh";
    static const char *const not_in_file[] = {"config", "help", "version", NULL};
    const char *conf = config_path(argc, argv, lo, shortopts);
    if (conf) {
        if (config_read(conf, argv[0], lo, not_in_file, &file) < 0)
            return 2;
        static char **all;
        if (!(all = with_file(argc, argv, &argc))) {
            fprintf(stderr, "qcowd: out of memory\n");
            return 1;
        }
        argv = all;
    }
    parsing = true;
    atexit(note_setting_origin);
    const char *plugin_dir = NULL, *s3_endpoint = NULL;
    char *s3_opts[32];
    unsigned n_s3_opts = 0;
    unsigned job_workers = DEFAULT_JOB_WORKERS, max_listeners = EVENTS_DEFAULT_LISTENERS;
    struct jobs_config jc = {0};
    struct events_config ec = {0};
    int c;
    while ((c = getopt_long(argc, argv, shortopts, lo, NULL)) != -1) {
        cur_arg = optind - 1; /* file settings are single "--key=value" arguments */
        switch (c) {
        case 'C':
            break; /* read above */
        case 'l':
            cfg.listen = optarg;
            break;
        case 'c':
            root = optarg;
            break;
        case 't': {
            char *end;
            long n = strtol(optarg, &end, 10);
            if (*end || n < 1 || n > 1024) {
                fprintf(stderr, "qcowd: --threads must be 1..1024\n");
                return 2;
            }
            cfg.threads = (unsigned)n;
            break;
        }
        case 'q':
            cfg.log = 0;
            break;
        case 'P':
            plugin_dir = optarg;
            break;
        case 'E':
            s3_endpoint = optarg;
            break;
        case 'O':
            if (n_s3_opts == sizeof s3_opts / sizeof s3_opts[0] || !strchr(optarg, '=')) {
                fprintf(stderr, "qcowd: --s3-opt wants KEY=VALUE (at most 32 of them)\n");
                return 2;
            }
            s3_opts[n_s3_opts++] = optarg;
            break;
        case 'J':
        case 'L': {
            char *end;
            long n = strtol(optarg, &end, 10);
            if (*end || n < 1 || n > 1024) {
                fprintf(stderr, "qcowd: --%s must be 1..1024\n", c == 'J' ? "job-workers" : "max-listeners");
                return 2;
            }
            if (c == 'J')
                job_workers = (unsigned)n;
            else
                max_listeners = (unsigned)n;
            break;
        }
        case OPT_MAX_CONN:
        case OPT_PER_CLIENT:
        case OPT_HEADER_TIMEOUT:
        case OPT_LISTENERS_PER_CLIENT:
        case OPT_MAX_QUEUED:
        case OPT_MAX_OPEN:
        case OPT_MAX_PAUSED:
        case OPT_MAX_JOB_RECORDS:
        case OPT_JOB_RETENTION:
        case OPT_UPLOAD_KEEP:
        case OPT_EVENT_HISTORY:
        case OPT_MIN_RATE: {
            uint64_t v, min = c == OPT_MIN_RATE || c == OPT_JOB_RETENTION ? 0 : 1,
                        max = c == OPT_MIN_RATE        ? UINT32_MAX - 1
                              : c == OPT_MAX_PAUSED    ? 1024
                              : c == OPT_JOB_RETENTION ? 10 * 366 * 86400ull
                              : c == OPT_UPLOAD_KEEP   ? 7 * 86400
                                                       : 1u << 20;
            if (parse_count(optarg, min, max, &v) < 0) {
                fprintf(stderr, "qcowd: --%s wants a number from %llu to %llu, not '%s'\n", option_name(lo, c),
                        (unsigned long long)min, (unsigned long long)max, optarg);
                return 2;
            }
            if (c == OPT_MAX_CONN)
                cfg.max_connections = (unsigned)v;
            else if (c == OPT_PER_CLIENT)
                cfg.max_per_client = (unsigned)v;
            else if (c == OPT_HEADER_TIMEOUT)
                cfg.header_timeout_sec = (unsigned)v;
            else if (c == OPT_LISTENERS_PER_CLIENT)
                cfg.listeners_per_client = (unsigned)v;
            else if (c == OPT_MAX_QUEUED)
                max_queued = (unsigned)v;
            else if (c == OPT_MAX_OPEN)
                copts.max_open = (unsigned)v;
            else if (c == OPT_MAX_PAUSED)
                jc.max_paused = (unsigned)v;
            else if (c == OPT_MAX_JOB_RECORDS)
                jc.max_records = (unsigned)v;
            else if (c == OPT_JOB_RETENTION)
                jc.retention_ms = v ? (int64_t)v * 1000 : -1; /* 0: kept until dismissed */
            else if (c == OPT_UPLOAD_KEEP)
                copts.upload_keep_sec = (unsigned)v;
            else if (c == OPT_EVENT_HISTORY)
                ec.history = (unsigned)v;
            else
                cfg.min_rate = v ? (unsigned)v : API_RATE_OFF;
            break;
        }
        case OPT_EVENT_HISTORY_BYTES: {
            uint64_t v;
            if (parse_bytes(optarg, &v) < 0 || v < 4096 || v > (1ull << 32)) {
                fprintf(stderr, "qcowd: --event-history-bytes wants a size from 4K to 4G, not '%s'\n", optarg);
                return 2;
            }
            ec.history_bytes = (size_t)v;
            break;
        }
        case OPT_MAX_UPLOAD:
        case OPT_MAX_CATALOG:
        case OPT_MAX_VIRTUAL: {
            uint64_t v;
            if (parse_bytes(optarg, &v) < 0 || (v == 0 && c != OPT_MAX_CATALOG)) {
                fprintf(stderr, "qcowd: --%s wants a size (bytes, or with K, M, G, T, P)%s, not '%s'\n",
                        option_name(lo, c), c == OPT_MAX_CATALOG ? "" : " above 0", optarg);
                return 2;
            }
            if (c == OPT_MAX_UPLOAD)
                copts.max_upload = v;
            else if (c == OPT_MAX_CATALOG)
                copts.max_catalog = v ? v : CATALOG_UNLIMITED;
            else
                copts.max_virtual_size = v;
            break;
        }
        case 'S':
            if (!strcmp(optarg, "yes") || !strcmp(optarg, "no")) {
                cfg.no_sendfile = !strcmp(optarg, "no");
                break;
            }
            fprintf(stderr, "qcowd: --sendfile wants yes or no, not '%s'\n", optarg);
            return 2;
        case 'M': {
            char *end;
            unsigned long long n = strtoull(optarg, &end, 10);
            unsigned shift = !strcmp(end, "K") ? 10 : !strcmp(end, "M") ? 20 : !strcmp(end, "G") ? 30 : 0;
            if (optarg[0] < '0' || optarg[0] > '9' || (*end && !shift) || n == 0 || n > (1ull << 40) >> shift) {
                fprintf(stderr, "qcowd: --max-image-meta wants a size from 1 byte to 1T (e.g. 64M), not '%s'\n",
                        optarg);
                return 2;
            }
            copts.max_meta_bytes = (uint64_t)n << shift;
            break;
        }
        case OPT_TOKENS:
            tokens_file = optarg;
            break;
        case OPT_TLS_CERT:
            tls_cert = optarg;
            break;
        case OPT_TLS_KEY:
            tls_key = optarg;
            break;
        case OPT_TLS_CLIENT_CA:
            tls_client_ca = optarg;
            break;
        case OPT_INSECURE:
            insecure = true;
            break;
        case OPT_PUBLIC_NAME:
        case OPT_CORS_ORIGIN: {
            int r = access_names_add(c == OPT_PUBLIC_NAME ? &public_names : &cors_origins, optarg,
                                     c == OPT_PUBLIC_NAME ? "--public-name" : "--cors-origin");
            if (r < 0) {
                fprintf(stderr, "qcowd: %s\n", err_msg(r));
                return 2;
            }
            if (c == OPT_CORS_ORIGIN && strncmp(optarg, "https://", 8) && strncmp(optarg, "http://", 7)) {
                fprintf(stderr, "qcowd: --cors-origin %s: an origin is http:// or https://, a host and a port\n",
                        optarg);
                return 2;
            }
            break;
        }
        case OPT_MAX_TICKETS: {
            char *end;
            max_tickets = strtoul(optarg, &end, 10);
            if (!*optarg || *end || max_tickets < 1 || max_tickets > 1000000) {
                fprintf(stderr, "qcowd: --max-tickets %s: a number from 1 to 1000000\n", optarg);
                return 2;
            }
            break;
        }
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("qcowd %s\n", QCOWD_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    parsing = false;
    if (optind != argc) {
        usage(stderr);
        return 2;
    }
    if (!tls_cert != !tls_key) {
        fprintf(stderr, "qcowd: --tls-cert and --tls-key go together\n");
        return 2;
    }
    if (tls_client_ca && !tls_cert) {
        fprintf(stderr, "qcowd: --tls-client-ca needs --tls-cert and --tls-key\n");
        return 2;
    }
    if (!tokens_file && !loopback_listen(cfg.listen)) {
        if (!insecure) {
            fprintf(stderr,
                    "qcowd: --listen %s reaches beyond this machine, and without --tokens anyone there could read, "
                    "change and delete every image: give --tokens FILE (qcowd token new NAME ROLE makes one), "
                    "listen on 127.0.0.1, or say --insecure-no-auth for a lab\n",
                    cfg.listen);
            return 2;
        }
        fprintf(stderr, "qcowd: WARNING: --insecure-no-auth: anyone who reaches %s may read, change and delete "
                        "every image\n",
                cfg.listen);
    }
    static struct api_tls *tls; /* static: reachable until exit on every path */
    if (tokens_file) { /* the table is reachable from access.c until exit */
        int r = access_tokens_load(tokens_file);
        if (r < 0) {
            fprintf(stderr, "qcowd: %s\n", err_msg(r));
            return 2;
        }
    }
    if (tls_cert) { /* read now, so a bad file stops qcowd before it touches the catalog */
        int r = api_tls_load(tls_cert, tls_key, tls_client_ca, &tls);
        if (r < 0) {
            fprintf(stderr, "qcowd: %s\n", err_msg(r));
            return 2;
        }
    }

    /* Every thread started from here on inherits the blocked signals; only
     * sigwait below receives them. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);

    /* catalog files: no symbolic links followed, regular files only, new ones 0640 */
    int ret = vfs_config("file", "confine", "yes");
    if (ret == 0)
        ret = load_plugins(plugin_dir);
    if (ret == 0 && s3_endpoint)
        ret = vfs_config("s3", "endpoint", s3_endpoint);
    /* the s3 plugin aborts stale multipart uploads under the catalog, never
     * elsewhere; without the plugin, the catalog's open says what is wrong */
    if (ret == 0 && !strncmp(root, "s3://", 5) && vfs_config("s3", "sweep-root", root) < 0)
        err_clear();
    for (unsigned i = 0; ret == 0 && i < n_s3_opts; i++) {
        char *eq = strchr(s3_opts[i], '=');
        *eq = '\0';
        ret = vfs_config("s3", s3_opts[i], eq + 1);
    }
    if (ret < 0) {
        fprintf(stderr, "qcowd: %s\n", err_msg(ret));
        return 1;
    }

    struct catalog *cat;
    raise_fd_limit();
    ret = catalog_new(root, &copts, &cat);
    if (ret < 0) {
        fprintf(stderr, "qcowd: %s\n", err_msg(ret));
        return 1;
    }
    ret = catalog_clean_temp(cat, note_stale, NULL);
    if (ret < 0)
        fprintf(stderr, "qcowd: looking for stale temporary files: %s\n", err_msg(ret));
    struct events *ev = NULL;
    struct jobs *jobs = NULL;
    char *jobs_file = catalog_path(cat, JOBS_FILE);
    ec.max_listeners = max_listeners;
    ret = jobs_file ? events_new(&ec, &ev) : -ENOMEM;
    if (ret == 0) {
        catalog_set_notify(cat, events_image_event, ev);
        jc.workers = job_workers;
        jc.max_queued = max_queued;
        jc.state_uri = jobs_file;
        jc.event = events_job_event;
        jc.event_opaque = ev;
        ret = jobs_new(&jc, &jobs);
    }
    free(jobs_file);
    if (ret < 0) {
        fprintf(stderr, "qcowd: %s\n", err_msg(ret));
        events_free(ev);
        catalog_free(cat);
        return 1;
    }
    cfg.jobs = jobs;
    cfg.events = ev;
    struct cut_off_ctx cut = {.jobs = jobs, .cat = cat};
    jobs_foreach_cut_off(jobs, after_cut_off, &cut);
    struct api_server *srv;
    struct tickets *tickets = tickets_new(max_tickets);
    cfg.access = (struct api_access_cfg){.auth = tokens_file != NULL, .tls = tls, .tickets = tickets,
                                         .public_names = &public_names, .cors = &cors_origins};
    ret = tickets ? api_server_start(&cfg, cat, &srv) : err_fail(ENOMEM, "out of memory");
    if (ret < 0) {
        fprintf(stderr, "qcowd: %s\n", err_msg(ret));
        tickets_free(tickets);
        jobs_free(jobs);
        events_free(ev);
        catalog_free(cat);
        return 1;
    }
    fprintf(stderr, "qcowd: listening on %s://%s/ (catalog %s, %u threads%s)\n", tls ? "https" : "http",
            api_server_address(srv), root, cfg.threads, tokens_file ? ", tokens required" : "");

    int sig = 0;
    for (;;) {
        sigwait(&stop, &sig);
        if (sig != SIGHUP)
            break;
        /* reload what may change under a running server; a failure keeps the old */
        if (tokens_file) {
            ret = access_tokens_load(tokens_file);
            if (ret < 0)
                fprintf(stderr, "qcowd: SIGHUP: tokens not reloaded, the old ones stay: %s\n", err_msg(ret));
            else
                fprintf(stderr, "qcowd: SIGHUP: reloaded %zu tokens from %s\n", access_tokens()->n, tokens_file);
        }
        if (tls) {
            ret = api_tls_reload(tls);
            if (ret < 0)
                fprintf(stderr, "qcowd: SIGHUP: TLS credentials not reloaded, the old ones stay: %s\n", err_msg(ret));
            else
                fprintf(stderr, "qcowd: SIGHUP: reloaded the TLS certificate and key%s\n",
                        tls_client_ca ? " and the client CA" : "");
        }
    }
    fprintf(stderr, "qcowd: %s: no new connections; finishing requests in flight\n", strsignal(sig));
    api_server_quiesce(srv);
    if (api_server_drain(srv, DRAIN_MS) < 0)
        fprintf(stderr, "qcowd: %s; closing them\n", err_msg(ETIMEDOUT));
    api_server_stop(srv);
    jobs_free(jobs); /* running jobs are cancelled and release their images */
    events_free(ev);
    catalog_free(cat);
    tickets_free(tickets);
    api_tls_free(tls);
    access_tokens_free_all();
    access_names_free(&public_names);
    access_names_free(&cors_origins);
    fprintf(stderr, "qcowd: stopped\n");
    return 0;
}
