/* qcowctl.c: the REST client of qcowd: the table of commands (which prints --help
 * and the man page from the same text), global options, and shared helpers. */
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "ctl.h"

#define DEFAULT_URL "http://127.0.0.1:8080"

bool ctl_json;

static const struct command {
    const char *name; /* one or two words: "list", "snapshot create" */
    const char *args; /* the operands and options after the name */
    const char *help; /* one line */
    const char *more; /* further lines (options), or NULL */
    const char *ops;  /* the OpenAPI operationIds it calls, space-separated */
    int (*fn)(int argc, char **argv);
} commands[] = {
    {"list", "", "the catalog", NULL, "listImages", cmd_list},
    {"info", "NAME", "one image's info", NULL, "getImage", cmd_info},
    {"create", "NAME [SIZE] [OPTIONS]", "create an image; prints its info",
     "--cluster-size N  --backing NAME  --extended-l2  --lazy-refcounts\n"
     "--compression-type zlib|zstd  --refcount-bits N  --compat v2|v3\n"
     "--preallocation off|metadata  (SIZE may be left out with --backing)",
     "createImage", cmd_create},
    {"rm", "NAME", "delete an image", NULL, "deleteImage", cmd_rm},
    {"size", "NAME", "the virtual size in bytes", NULL, "getImage", cmd_size},
    {"read", "NAME [OFFSET [LENGTH]]", "guest bytes to stdout (no OFFSET: the whole disk)", NULL, "readImageData",
     cmd_read},
    {"write", "[--no-flush] NAME OFFSET", "guest bytes from stdin, written at OFFSET", NULL, "writeImageData",
     cmd_write},
    {"zero", "[--no-flush] NAME OFFSET LENGTH", "make a range read as zeroes", NULL, "patchImageData",
     cmd_zero_discard},
    {"discard", "[--no-flush] NAME OFFSET LENGTH", "free the whole clusters of a range", NULL, "patchImageData",
     cmd_zero_discard},
    {"flush", "NAME", "make every write durable", NULL, "patchImageData", cmd_flush},
    {"extents", "NAME [--bitmap B]", "the zero/hole map; with --bitmap the dirty/clean runs of bitmap B", NULL,
     "getImageExtents", cmd_extents},
    {"features", "NAME", "what the data endpoint can do", NULL, "imageDataOptions", cmd_features},
    {"upload", "NAME FILE", "upload a qcow2 file as a new image; prints its info", NULL, "uploadImageFile", cmd_upload},
    {"download", "NAME FILE", "the image's qcow2 file (FILE '-': stdout)", NULL, "downloadImageFile", cmd_download},
    {"snapshot list", "NAME", "the image's internal snapshots", NULL, "listSnapshots", cmd_snapshot_list},
    {"snapshot create", "NAME SNAP [--wait]", "take an internal snapshot (a job)", NULL, "createSnapshot",
     cmd_snapshot_job},
    {"snapshot delete", "NAME SNAP [--wait]", "delete a snapshot (a job)", NULL, "deleteSnapshot", cmd_snapshot_job},
    {"snapshot revert", "NAME SNAP [--wait]", "revert the disk to a snapshot (a job)", NULL, "revertSnapshot",
     cmd_snapshot_job},
    {"snapshot read", "NAME SNAP [OFFSET [LENGTH]]", "guest bytes of a snapshot to stdout", NULL, "getSnapshotData",
     cmd_snapshot_read},
    {"bitmap list", "NAME", "the image's persistent dirty bitmaps", NULL, "listBitmaps", cmd_bitmap_list},
    {"bitmap info", "NAME BITMAP", "one bitmap", NULL, "getBitmap", cmd_bitmap_info},
    {"bitmap add", "NAME BITMAP [--granularity N] [--disabled]", "create a bitmap (enabled unless --disabled)", NULL,
     "createBitmap", cmd_bitmap_add},
    {"bitmap remove", "NAME BITMAP", "delete a bitmap", NULL, "deleteBitmap", cmd_bitmap_remove},
    {"bitmap clear", "NAME BITMAP", "make a bitmap empty", NULL, "clearBitmap", cmd_bitmap_op},
    {"bitmap enable", "NAME BITMAP", "writes mark the bitmap from now on", NULL, "enableBitmap", cmd_bitmap_op},
    {"bitmap disable", "NAME BITMAP", "writes no longer mark the bitmap", NULL, "disableBitmap", cmd_bitmap_op},
    {"bitmap merge", "NAME BITMAP SOURCE [--source-image IMAGE]",
     "mark in BITMAP what SOURCE marks (a bitmap of NAME, or of IMAGE)", NULL, "mergeBitmap", cmd_bitmap_merge},
    {"commit", "NAME [--base B] [--force] [--wait]", "write the image's data into its backing file (a job)",
     "--force  commit into a base that other images share", "commitImage", cmd_commit},
    {"convert", "SRC TARGET [OPTIONS] [--wait]", "copy an image (or a snapshot) into a new image (a job)",
     "--snapshot SNAP  --compress  --compression-type zlib|zstd  --backing flatten|keep\n"
     "--cluster-size N  --extended-l2  --refcount-bits N",
     "convertImage", cmd_convert},
    {"check", "NAME [--repair leaks|all] [--wait]", "check (and repair) the image (a job); the report is its result",
     NULL, "checkImage", cmd_check},
    {"jobs", "[--image NAME] [--status STATUS]", "the jobs not yet dismissed", NULL, "listJobs", cmd_jobs},
    {"job", "ID", "one job", NULL, "getJob", cmd_job},
    {"job pause", "ID", "pause a queued or running job", NULL, "pauseJob", cmd_job_op},
    {"job resume", "ID", "resume a paused job", NULL, "resumeJob", cmd_job_op},
    {"job cancel", "ID", "cancel a job", NULL, "cancelJob", cmd_job_op},
    {"job dismiss", "ID", "forget a concluded job", NULL, "dismissJob", cmd_job_op},
    {"wait", "ID", "follow a job to its end (as --wait does)", NULL, "getJob", cmd_wait},
    {"events", "[--count N] [--last-event-id N]",
     "follow the server's events, one line each; reconnects where it left off", "--count N  stop after N events",
     "streamEvents", cmd_events},
    {"ticket list", "", "the live data tickets", NULL, "listTickets", cmd_ticket_list},
    {"ticket create", "IMAGE [--ops read,write] [--timeout SECONDS]",
     "a data ticket for one image (default: read, 3600 s); prints its token", NULL, "createTicket", cmd_ticket_create},
    {"ticket revoke", "ID", "revoke a ticket", NULL, "revokeTicket", cmd_ticket_revoke},
    {"health", "", "is the server up", NULL, "getHealth", cmd_health},
    {"whoami", "", "the caller's token name and role", NULL, "whoAmI", cmd_whoami},
    {"metrics", "", "the server's Prometheus metrics", NULL, "getMetrics", cmd_metrics},
};
#define NCOMMANDS (sizeof commands / sizeof commands[0])

static const char *const global_opts[][2] = {
    {"--url URL", "the qcowd server (default $QCOWD_URL, else " DEFAULT_URL ")"},
    {"--token TOKEN", "bearer token sent with every request (default $QCOWD_TOKEN; prefer the variable: "
                      "the command line is visible to other users)"},
    {"--cacert FILE", "CA certificate (PEM) that verifies an https:// server (default $QCOWD_CACERT, else the "
                      "system's)"},
    {"--if-match ETAG", "send If-Match: ETAG with the requests that change something: the server answers 412 "
                        "precondition-failed when the image changed since it gave that ETag"},
    {"--output json|text", "json: machine-readable output, one compact JSON document (one per line for events); "
                           "allowed anywhere on the line"},
    {"--help", "this text (after a command: that command's)"},
    {"--version", "the version"},
};

static const char notes[] =
    "Job-starting commands print the job and return at once; with --wait they follow it: a progress bar with "
    "rate and ETA on stderr when it is a terminal, then the result, and a failed or cancelled job makes the "
    "exit status 1 with its error; a check's findings make it 4 (corrupt) or 5 (leaks only).\n"
    "Sizes and offsets are bytes, or a number with a suffix k, M, G, T, P (powers of 1024).\n"
    "Errors print `qcowctl: CODE: message` on stderr (CODE and message from the server's JSON error).";

static const char *const exits[][2] = {
    {"0", "success"},
    {"1", "the server answered an error, the job failed or was cancelled, or a local file failed"},
    {"2", "usage: a wrong command line; nothing was sent"},
    {"3", "no answer: the server cannot be reached, TLS failed, or the connection broke"},
    {"4", "check --wait: the image is corrupt (corruptions or check errors left after any repair), as "
          "qemu-img check's 2"},
    {"5", "check --wait: leaked clusters only, as qemu-img check's 3 (harmless; --repair leaks reclaims them)"},
};

/* Prints the rows whose name starts with `only` (NULL: all). */
static void print_commands(FILE *f, const char *only)
{
    for (size_t i = 0; i < NCOMMANDS; i++) {
        const struct command *c = &commands[i];
        if (only && (strncmp(c->name, only, strlen(only)) || (c->name[strlen(only)] && c->name[strlen(only)] != ' ')))
            continue;
        char line[128];
        snprintf(line, sizeof line, "%s%s%s", c->name, *c->args ? " " : "", c->args);
        if (strlen(line) < 34)
            fprintf(f, "  %-34s%s\n", line, c->help);
        else
            fprintf(f, "  %s\n  %-34s%s\n", line, "", c->help);
        for (const char *m = c->more; m && *m;) {
            size_t n = strcspn(m, "\n");
            fprintf(f, "      %.*s\n", (int)n, m);
            m += n + (m[n] == '\n');
        }
    }
}

/* Prints text from column col, words wrapped before column 96 and continued at indent. */
static void wrap(FILE *f, const char *text, int col, int indent)
{
    for (const char *w = text; *w;) {
        size_t n = strcspn(w, " \n");
        if (col > indent && col + 1 + (int)n > 96) {
            fprintf(f, "\n%*s", indent, "");
            col = indent;
        } else if (col > indent) {
            fputc(' ', f);
            col++;
        }
        col += fprintf(f, "%.*s", (int)n, w);
        w += n;
        if (*w == '\n') {
            fprintf(f, "\n%*s", indent, "");
            col = indent;
        }
        w += *w != 0;
    }
    fputc('\n', f);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: qcowctl [OPTIONS] COMMAND [ARGS]\n");
    for (size_t i = 0; i < sizeof global_opts / sizeof global_opts[0]; i++) {
        fprintf(f, "  %-20s", global_opts[i][0]);
        wrap(f, global_opts[i][1], 22, 22);
    }
    fprintf(f, "\ncommands:\n");
    print_commands(f, NULL);
    fputc('\n', f);
    wrap(f, notes, 0, 0);
    fprintf(f, "exit status:\n");
    for (size_t i = 0; i < sizeof exits / sizeof exits[0]; i++) {
        fprintf(f, "  %-4s", exits[i][0]);
        wrap(f, exits[i][1], 6, 6);
    }
}

/* roff-escapes s: backslashes, hyphens (so they stay ASCII), a leading dot or quote. */
static void roff(FILE *f, const char *s)
{
    if (*s == '.' || *s == '\'')
        fputs("\\&", f);
    for (; *s; s++) {
        if (*s == '\\')
            fputs("\\e", f);
        else if (*s == '-')
            fputs("\\-", f);
        else if (*s == '\n')
            fputs("\n.br\n", f);
        else
            fputc(*s, f);
    }
}

/* The man page, from the same table and text as --help. */
static void man(FILE *f)
{
    fprintf(f,
            ".TH QCOWCTL 1 \"\" \"qcowd %s\" \"User Commands\"\n.SH NAME\nqcowctl \\- the command-line "
            "client of qcowd, the qcow2 image service\n.SH SYNOPSIS\n.B qcowctl\n[\\fIOPTIONS\\fR] "
            "\\fICOMMAND\\fR [\\fIARGS\\fR]\n.SH DESCRIPTION\nqcowctl calls the REST API of a qcowd "
            "server (openapi/openapi.yaml) over HTTP or HTTPS.\n.SH OPTIONS\n",
            QCOWD_VERSION);
    for (size_t i = 0; i < sizeof global_opts / sizeof global_opts[0]; i++) {
        fputs(".TP\n.B ", f);
        roff(f, global_opts[i][0]);
        fputc('\n', f);
        roff(f, global_opts[i][1]);
        fputc('\n', f);
    }
    fputs(".SH COMMANDS\n", f);
    for (size_t i = 0; i < NCOMMANDS; i++) {
        const struct command *c = &commands[i];
        fputs(".TP\n.B ", f);
        roff(f, c->name);
        if (*c->args) {
            fputs(" \\fR", f);
            roff(f, c->args);
        }
        fputc('\n', f);
        roff(f, c->help);
        fputc('\n', f);
        if (c->more) {
            fputs(".br\n", f);
            roff(f, c->more);
            fputc('\n', f);
        }
    }
    fputs(".SH NOTES\n", f);
    roff(f, notes);
    fputs("\n.SH EXIT STATUS\n", f);
    for (size_t i = 0; i < sizeof exits / sizeof exits[0]; i++) {
        fprintf(f, ".TP\n.B %s\n", exits[i][0]);
        roff(f, exits[i][1]);
        fputc('\n', f);
    }
    fputs(".SH ENVIRONMENT\n.TP\n.B QCOWD_URL\nthe server, as \\-\\-url\n.TP\n.B QCOWD_TOKEN\nthe bearer "
          "token, as \\-\\-token\n.TP\n.B QCOWD_CACERT\nthe CA certificate, as \\-\\-cacert\n"
          ".SH EXAMPLE\n.nf\nqcowctl create disk 10G\nqcowctl bitmap add disk backup\n"
          "qcowctl extents disk \\-\\-bitmap backup\nqcowctl convert disk copy \\-\\-wait\n.fi\n"
          ".SH SEE ALSO\n.BR qcowd (8),\n.BR qemu-img (1)\n",
          f);
}

static void say(const char *fmt, va_list ap)
{
    fputs("qcowctl: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    say(fmt, ap);
    va_end(ap);
    return EXIT_FAIL;
}

int usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    say(fmt, ap);
    va_end(ap);
    return EXIT_USAGE;
}

int parse_size(const char *s, const char *what, uint64_t *out)
{
    static const char expect[] = "expected a number of bytes, optionally with a suffix k, M, G, T";
    if (!s || !*s || *s < '0' || *s > '9')
        return usage_error("bad %s '%s': %s", what, s ? s : "", expect);
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno)
        return usage_error("bad %s '%s': too large", what, s);
    int shift = 0;
    if (*end) {
        const char *units = "kmgtpe";
        const char *u = strchr(units, end[0] | 0x20);
        if (!u || (end[1] && strcmp(end + 1, "B") && strcmp(end + 1, "iB")))
            return usage_error("bad %s '%s': %s", what, s, expect);
        shift = 10 * (int)(u - units + 1);
    }
    if ((shift && v > (UINT64_MAX >> shift)) || (v << shift) > INT64_MAX)
        return usage_error("bad %s '%s': too large", what, s);
    *out = v << shift;
    return 0;
}

char *item_path(const char *name, const char *sub, const char *item, const char *suffix)
{
    char *e = http_escape(name), *ei = item ? http_escape(item) : NULL, *p = NULL;
    if (e && (!item || ei) &&
        asprintf(&p, "/v1/images/%s%s%s%s%s%s", e, sub ? "/" : "", sub ? sub : "", item ? "/" : "", item ? ei : "",
                 suffix) < 0)
        p = NULL;
    if (!p)
        fail("out of memory");
    free(e);
    free(ei);
    return p;
}

char *image_path(const char *name, const char *suffix)
{
    return item_path(name, NULL, NULL, suffix);
}

json_t *parse_answer(const struct http_resp *resp)
{
    json_error_t je;
    json_t *j = json_loadb(resp->body ? resp->body : "", resp->len, JSON_DECODE_ANY, &je);
    if (!j)
        fail("the server's answer is not JSON: %s", je.text);
    return j;
}

int print_json(json_t *j)
{
    size_t flags = JSON_PRESERVE_ORDER | JSON_ENCODE_ANY | (ctl_json ? JSON_COMPACT : JSON_INDENT(2));
    int r = json_dumpf(j, stdout, flags);
    fputc('\n', stdout);
    if (r < 0 || fflush(stdout))
        return fail("writing the output: %s", strerror(errno));
    return EXIT_OK;
}

int call_json(const char *method, const char *path, json_t *body, json_t **answer)
{
    char *s = body ? json_dumps(body, JSON_COMPACT) : NULL;
    if (body && !s)
        return fail("out of memory");
    struct http_req req = {.method = method,
                           .path = path,
                           .mem = s,
                           .mem_len = s ? strlen(s) : 0,
                           .in_len = -1,
                           .content_type = s ? "application/json" : NULL};
    struct http_resp resp;
    int r = http_do(&req, &resp);
    if (answer)
        *answer = NULL;
    if (r == EXIT_OK && answer && resp.len && !(*answer = parse_answer(&resp)))
        r = EXIT_FAIL;
    free(resp.body);
    free(s);
    return r;
}

int call_print(const char *method, const char *path, json_t *body, const char *key)
{
    json_t *a;
    int r = call_json(method, path, body, &a);
    if (r == EXIT_OK && a) {
        json_t *show = !ctl_json && key && json_object_get(a, key) ? json_object_get(a, key) : a;
        r = print_json(show);
    }
    json_decref(a);
    return r;
}

int call_at(const char *method, char *path, json_t *body, bool print)
{
    int r = !path ? EXIT_FAIL : print ? call_print(method, path, body, NULL) : call_json(method, path, body, NULL);
    free(path);
    return r;
}

int ctl_getopt(int argc, char **argv, const struct option *opts)
{
    static char **scanning;
    if (argv != scanning) { /* a new scan: GNU getopt restarts at optind 0 */
        scanning = argv;
        optind = 0;
        opterr = 0;
    }
    int c = getopt_long(argc, argv, "", opts, NULL);
    if (c == '?' || c == ':') {
        usage_error("%s: bad option '%s' (see qcowctl %s --help)", argv[0], argv[optind - 1], argv[0]);
        return '?';
    }
    return c;
}

/* Takes --output FORMAT / --output=FORMAT out of argv wherever it is (before a
 * "--"); returns 0 or EXIT_USAGE. */
static int take_output(int *argc, char **argv)
{
    int w = 1;
    bool done = false;
    for (int i = 1; i < *argc; i++) {
        const char *a = argv[i], *v = NULL;
        if (!done && strcmp(a, "--") == 0)
            done = true;
        if (done || strncmp(a, "--output", 8) || (a[8] && a[8] != '=')) {
            argv[w++] = argv[i];
            continue;
        }
        v = a[8] == '=' ? a + 9 : (i + 1 < *argc ? argv[++i] : "");
        if (strcmp(v, "json") == 0)
            ctl_json = true;
        else if (strcmp(v, "text") == 0 || strcmp(v, "human") == 0)
            ctl_json = false;
        else
            return usage_error("bad --output '%s': json or text", v);
    }
    *argc = w;
    argv[w] = NULL;
    return 0;
}

/* The row for argv (two words first, then one), or NULL. */
static const struct command *find(int argc, char **argv, int *words)
{
    for (int n = 2; n >= 1; n--) {
        if (argc < n)
            continue;
        for (size_t i = 0; i < NCOMMANDS; i++) {
            const char *name = commands[i].name, *sp = strchr(name, ' ');
            if (n == 1 && !sp && strcmp(name, argv[0]) == 0) {
                *words = 1;
                return &commands[i];
            }
            if (n == 2 && sp && strncmp(name, argv[0], (size_t)(sp - name)) == 0 && !argv[0][sp - name] &&
                strcmp(sp + 1, argv[1]) == 0) {
                *words = 2;
                return &commands[i];
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"url", required_argument, 0, 'u'},
        {"token", required_argument, 0, 't'},
        {"cacert", required_argument, 0, 'c'},
        {"help", no_argument, 0, 'h'},
        {"version", no_argument, 0, 'V'},
        {"help-man", no_argument, 0, 'M'},
        {"list-operations", no_argument, 0, 'O'},
        {"if-match", required_argument, 0, 'i'},
        {0, 0, 0, 0},
    };
    const char *url = getenv("QCOWD_URL");
    const char *token = getenv("QCOWD_TOKEN"), *cacert = getenv("QCOWD_CACERT"), *etag = NULL;
    int c;
    if (!url || !*url)
        url = DEFAULT_URL;
    if (take_output(&argc, argv))
        return EXIT_USAGE;
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
        case 'i':
            etag = optarg;
            break;
        case 'h':
            usage(stdout);
            return EXIT_OK;
        case 'M':
            man(stdout);
            return EXIT_OK;
        case 'O': /* for the tests: which operations each command calls */
            for (size_t i = 0; i < NCOMMANDS; i++)
                printf("%s\t%s\n", commands[i].name, commands[i].ops);
            return EXIT_OK;
        case 'V':
            printf("qcowctl %s (libcurl %s)\n", QCOWD_VERSION, curl_version_info(CURLVERSION_NOW)->version);
            return EXIT_OK;
        default:
            usage(stderr);
            return EXIT_USAGE;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return EXIT_USAGE;
    }
    if (strcmp(argv[optind], "help") == 0) {
        if (optind + 1 < argc)
            print_commands(stdout, argv[optind + 1]);
        else
            usage(stdout);
        return EXIT_OK;
    }
    int words = 0;
    const struct command *cmd = find(argc - optind, argv + optind, &words);
    if (!cmd) {
        /* a group word with a wrong or missing second word: show the group */
        for (size_t i = 0; i < NCOMMANDS; i++)
            if (strncmp(commands[i].name, argv[optind], strlen(argv[optind])) == 0 &&
                commands[i].name[strlen(argv[optind])] == ' ') {
                bool help = optind + 1 < argc && strcmp(argv[optind + 1], "--help") == 0;
                if (!help)
                    fprintf(stderr, "qcowctl: %s: expected one of:\n", argv[optind]);
                print_commands(help ? stdout : stderr, argv[optind]);
                return help ? EXIT_OK : EXIT_USAGE;
            }
        return usage_error("unknown command '%s' (see qcowctl --help)", argv[optind]);
    }
    /* the command's argv: "create NAME ...", or "snapshot NAME ..." with the verb in argv[0] */
    int sub_argc = argc - optind - (words - 1);
    char **sub_argv = argv + optind + (words - 1);
    for (int k = 1; k < sub_argc; k++) {
        if (strcmp(sub_argv[k], "--") == 0)
            break;
        if (strcmp(sub_argv[k], "--help") == 0) {
            printf("usage: qcowctl [OPTIONS] ");
            print_commands(stdout, cmd->name);
            return EXIT_OK;
        }
    }
    int r = http_init(url, token, cacert);
    if (r == 0)
        r = http_if_match(etag);
    if (r == 0)
        r = cmd->fn(sub_argc, sub_argv);
    http_done();
    return r;
}
