/* jobs.c: qcowctl's job commands: starting one (commit, convert, check; the snapshot
 * ones in meta.c), following it with a progress bar, listing and steering jobs, and
 * following /v1/events with reconnects that resume at the last event seen. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ctl.h"

#define POLL_NS   200000000L /* between two looks at a job being waited for */
#define EVENT_MAX (1u << 20) /* one event's text stops growing here */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* "/v1/jobs/ID" + suffix, ID escaped; NULL after a message. */
static char *job_path(const char *id, const char *suffix)
{
    char *e = http_escape(id), *p = NULL;
    if (!e || asprintf(&p, "/v1/jobs/%s%s", e, suffix) < 0)
        p = NULL;
    free(e);
    if (!p)
        fail("out of memory");
    return p;
}

int start_job(const char *method, const char *path, json_t *body, bool wait)
{
    json_t *job = NULL;
    int r = call_json(method, path, body, &job);
    json_decref(body);
    const char *id = NULL;
    if (r == EXIT_OK && json_unpack(job, "{s:s}", "id", &id))
        r = fail("the server's answer has no job id");
    else if (r == EXIT_OK)
        r = wait ? wait_job(id) : print_json(job);
    json_decref(job);
    return r;
}

/* One line of progress, as qemu-img -p with a bar, rate and ETA, redrawn in place. */
static void draw(const char *type, double cur, double total, double t0, double c0)
{
    double frac = total > 0 ? cur / total : 0, dt = now() - t0;
    char bar[21], rate[32] = "", eta[32] = "";
    int fill = (int)(frac * 20);
    for (int i = 0; i < 20; i++)
        bar[i] = i < fill ? '#' : '.';
    bar[20] = 0;
    bool bytes = strcmp(type, "convert") == 0 || strcmp(type, "commit") == 0; /* progress counts bytes */
    if (dt > 0.5 && cur > c0) {
        double per_s = (cur - c0) / dt;
        if (bytes)
            snprintf(rate, sizeof rate, " %7.1f MiB/s", per_s / 1048576.0);
        long left = (long)((total - cur) / per_s + 0.5);
        snprintf(eta, sizeof eta, " ETA %ld:%02ld:%02ld", left / 3600, left / 60 % 60, left % 60);
    }
    fprintf(stderr, "\r    (%6.2f/100%%) [%s]%s%s   ", frac * 100, bar, rate, eta);
    fflush(stderr);
}

/* The exit status of a check's report, as qemu-img check's (2 corrupt, 3 leaks)
 * moved past qcowctl's own 2 and 3. Missing counts are 0 (qemu-img leaves
 * them out then). */
static int check_verdict(const json_t *result)
{
    json_int_t corrupt = 0, errors = 0, leaks = 0;
    json_unpack((json_t *)result, "{s?I, s?I, s?I}", "corruptions", &corrupt, "check-errors", &errors, "leaks", &leaks);
    return corrupt > 0 || errors > 0 ? EXIT_CORRUPT : leaks > 0 ? EXIT_LEAKS : EXIT_OK;
}

int wait_job(const char *id)
{
    char *p = job_path(id, "");
    if (!p)
        return EXIT_FAIL;
    bool tty = isatty(STDERR_FILENO), drawn = false;
    double t0 = 0, c0 = 0;
    json_t *job = NULL;
    int r;
    const char *status = "", *type = "";
    for (;;) {
        json_decref(job);
        if ((r = call_json("GET", p, NULL, &job)))
            break;
        json_int_t cur = 0, total = 0;
        if (json_unpack(job, "{s:s, s:s, s:I, s:I}", "status", &status, "type", &type, "current-progress", &cur,
                        "total-progress", &total)) {
            r = fail("the server's job has no status or progress");
            break;
        }
        if (strcmp(status, "running") == 0 && t0 == 0)
            t0 = now(), c0 = (double)cur; /* the rate counts from the first look at a running job */
        if (tty && (drawn || strcmp(status, "concluded"))) {
            draw(type, (double)cur, (double)total, t0 ? t0 : now(), c0);
            drawn = true;
        }
        if (strcmp(status, "concluded") == 0)
            break;
        nanosleep(&(struct timespec){0, POLL_NS}, NULL);
    }
    if (drawn)
        fputc('\n', stderr);
    if (r == EXIT_OK) {
        const char *err = json_string_value(json_object_get(job, "error")), *image = "";
        bool cancelled = json_is_true(json_object_get(job, "cancelled"));
        json_unpack(job, "{s?s}", "image", &image);
        json_t *result = json_object_get(job, "result");
        if (ctl_json)
            r = print_json(job);
        else if (!err && !cancelled)
            r = result && !json_is_null(result) ? print_json(result)
                                                : (printf("job %s (%s %s) done\n", id, type, image), EXIT_OK);
        if (r == EXIT_OK && !err && !cancelled && !strcmp(type, "check"))
            r = check_verdict(result);
        if (cancelled)
            r = fail("job %s (%s %s) was cancelled%s%s", id, type, image, err ? ": " : "", err ? err : "");
        else if (err)
            r = fail("job %s (%s %s) failed: %s", id, type, image, err);
    }
    json_decref(job);
    free(p);
    return r;
}

/* Parses [--wait] and the options of opts (each a string or, with has_arg 0, a
 * boolean; `--cluster-size`-like ones ending in -size or -bits a number) into
 * body; returns 0 or EXIT_USAGE. */
static int job_options(int argc, char **argv, const struct option *opts, json_t *body, bool *wait)
{
    int c;
    while ((c = ctl_getopt(argc, argv, opts)) != -1) {
        if (c == '?')
            return EXIT_USAGE;
        if (c == 'w') {
            *wait = true;
            continue;
        }
        const char *key = opts[c - 'A'].name;
        size_t kl = strlen(key);
        uint64_t v;
        if (!opts[c - 'A'].has_arg) {
            json_object_set_new(body, key, json_true());
        } else if ((kl > 5 && strcmp(key + kl - 5, "-size") == 0) || (kl > 5 && strcmp(key + kl - 5, "-bits") == 0)) {
            if (parse_size(optarg, key, &v))
                return EXIT_USAGE;
            json_object_set_new(body, key, json_integer((json_int_t)v));
        } else {
            json_object_set_new(body, key, json_string(optarg));
        }
    }
    return 0;
}

/* The shared shape of commit, convert and check: options into a body, N operands,
 * POST /v1/images/NAME/SUFFIX. The body gets operand 2 as `second` when set. */
static int image_job(int argc, char **argv, const struct option *opts, const char *suffix, const char *second,
                     const char *usage)
{
    json_t *body = json_object();
    bool wait = false;
    int want = second ? 2 : 1;
    if (!body)
        return fail("out of memory");
    if (job_options(argc, argv, opts, body, &wait) || argc - optind != want) {
        json_decref(body);
        return argc - optind != want ? usage_error("usage: qcowctl %s", usage) : EXIT_USAGE;
    }
    if (second)
        json_object_set_new(body, second, json_string(argv[optind + 1]));
    char *p = image_path(argv[optind], suffix);
    if (!p)
        return json_decref(body), EXIT_FAIL;
    /* an empty body stays away: the endpoints take none */
    int r = start_job("POST", p, json_object_size(body) ? body : (json_decref(body), NULL), wait);
    free(p);
    return r;
}

/* Option values are 'A' + their index, so job_options finds the JSON key. */
int cmd_commit(int argc, char **argv)
{
    static const struct option opts[] = {
        {"base", required_argument, 0, 'A'}, {"force", no_argument, 0, 'B'}, {"wait", no_argument, 0, 'w'}, {0}};
    return image_job(argc, argv, opts, "/commit", NULL, "commit NAME [--base B] [--force] [--wait]");
}

int cmd_convert(int argc, char **argv)
{
    static const struct option opts[] = {
        {"snapshot", required_argument, 0, 'A'},
        {"compress", no_argument, 0, 'B'},
        {"compression-type", required_argument, 0, 'C'},
        {"backing", required_argument, 0, 'D'},
        {"cluster-size", required_argument, 0, 'E'},
        {"extended-l2", no_argument, 0, 'F'},
        {"refcount-bits", required_argument, 0, 'G'},
        {"wait", no_argument, 0, 'w'},
        {0},
    };
    return image_job(argc, argv, opts, "/convert", "target", "convert SRC TARGET [OPTIONS] [--wait]");
}

int cmd_check(int argc, char **argv)
{
    static const struct option opts[] = {{"repair", required_argument, 0, 'A'}, {"wait", no_argument, 0, 'w'}, {0}};
    return image_job(argc, argv, opts, "/check", NULL, "check NAME [--repair leaks|all] [--wait]");
}

static void job_row(json_t *j)
{
    const char *id = "", *type = "", *image = "", *status = "", *err = NULL;
    json_int_t cur = 0, total = 0;
    json_unpack(j, "{s?s, s?s, s?s, s?s, s?I, s?I}", "id", &id, "type", &type, "image", &image, "status", &status,
                "current-progress", &cur, "total-progress", &total);
    err = json_string_value(json_object_get(j, "error"));
    printf("%-6s %-16s %-20s %-10s %6.2f%%  %s\n", id, type, image, status,
           total ? 100.0 * (double)cur / (double)total : 0.0, err ? err : "");
}

int cmd_jobs(int argc, char **argv)
{
    static const struct option opts[] = {
        {"image", required_argument, 0, 'i'}, {"status", required_argument, 0, 's'}, {0, 0, 0, 0}};
    const char *image = NULL, *status = NULL;
    int c;
    while ((c = ctl_getopt(argc, argv, opts)) != -1) {
        if (c == '?')
            return EXIT_USAGE;
        *(c == 'i' ? &image : &status) = optarg;
    }
    if (argc != optind)
        return usage_error("usage: qcowctl jobs [--image NAME] [--status STATUS]");
    char *ei = image ? http_escape(image) : NULL, *es = status ? http_escape(status) : NULL, *p = NULL;
    /* the filters go to the server, and apply here too for a server without them */
    if (asprintf(&p, "/v1/jobs%s%s%s%s%s%s", image || status ? "?" : "", ei ? "image=" : "", ei ? ei : "",
                 ei && es ? "&" : "", es ? "status=" : "", es ? es : "") < 0)
        p = NULL;
    free(ei);
    free(es);
    json_t *a = NULL;
    int r = p ? call_json("GET", p, NULL, &a) : fail("out of memory");
    free(p);
    json_t *list = json_object_get(a, "jobs"), *j;
    for (size_t i = json_array_size(list); i-- > 0;) {
        j = json_array_get(list, i);
        const char *ji = json_string_value(json_object_get(j, "image"));
        const char *js = json_string_value(json_object_get(j, "status"));
        if ((image && (!ji || strcmp(ji, image))) || (status && (!js || strcmp(js, status))))
            json_array_remove(list, i);
    }
    if (r == EXIT_OK && ctl_json) {
        r = print_json(a);
    } else if (r == EXIT_OK) {
        size_t i;
        if (json_array_size(list))
            printf("%-6s %-16s %-20s %-10s %7s  %s\n", "ID", "TYPE", "IMAGE", "STATUS", "DONE", "ERROR");
        json_array_foreach(list, i, j) job_row(j);
    }
    json_decref(a);
    return r;
}

int cmd_job(int argc, char **argv)
{
    if (argc != 2)
        return usage_error("usage: qcowctl job ID");
    return call_at("GET", job_path(argv[1], ""), NULL, true);
}

/* job pause|resume|cancel|dismiss ID */
int cmd_job_op(int argc, char **argv)
{
    if (argc != 2)
        return usage_error("usage: qcowctl job %s ID", argv[0]);
    bool dismiss = strcmp(argv[0], "dismiss") == 0;
    char suffix[16];
    snprintf(suffix, sizeof suffix, "/%s", argv[0]);
    return call_at(dismiss ? "DELETE" : "POST", job_path(argv[1], dismiss ? "" : suffix), NULL, !dismiss);
}

int cmd_wait(int argc, char **argv)
{
    if (argc != 2)
        return usage_error("usage: qcowctl wait ID");
    return wait_job(argv[1]);
}

/* ---- events ---- */

struct sse {
    char *line; /* the line being read */
    size_t len, cap;
    char type[64];    /* event: */
    char id[32];      /* id: of the event being read */
    char last_id[32]; /* id: of the last event printed: sent as Last-Event-ID on a reconnect */
    char *data;       /* data: lines joined by \n */
    size_t data_len;
    long count, max; /* events printed, and where to stop (0: never) */
    int out_error;
};

/* Prints one event: JSON {"event","id","data"} or a line for people. */
static int emit(struct sse *s)
{
    json_t *data = s->data ? json_loadb(s->data, s->data_len, JSON_DECODE_ANY, NULL) : NULL;
    if (!data)
        data = s->data ? json_stringn(s->data, s->data_len) : json_null();
    const char *type = *s->type ? s->type : "message";
    if (ctl_json) {
        json_t *ev =
            json_pack("{s:s, s:o, s:O}", "event", type, "id", *s->id ? json_string(s->id) : json_null(), "data", data);
        json_dumpf(ev, stdout, JSON_COMPACT | JSON_PRESERVE_ORDER);
        json_decref(ev);
    } else {
        const char *id = "", *jtype = "", *image = "", *status = "", *name = NULL;
        json_int_t cur = 0, total = 0, dropped = 0;
        if (json_unpack(data, "{s:s, s:s, s?s, s?s, s?I, s?I}", "id", &id, "type", &jtype, "image", &image, "status",
                        &status, "current-progress", &cur, "total-progress", &total) == 0) {
            const char *err = json_string_value(json_object_get(data, "error"));
            printf("%s%s%s job %s %s %s %s %.1f%%%s%s", *s->id ? s->id : "", *s->id ? " " : "", type, id, jtype, image,
                   status, total ? 100.0 * (double)cur / (double)total : 0.0, err ? " error: " : "", err ? err : "");
        } else if (json_unpack(data, "{s:s}", "name", &name) == 0) {
            printf("%s%s%s %s", *s->id ? s->id : "", *s->id ? " " : "", type, name);
        } else if (json_unpack(data, "{s:I}", "dropped", &dropped) == 0) {
            printf("%s%s%s %" PRId64 " events dropped", *s->id ? s->id : "", *s->id ? " " : "", type, (int64_t)dropped);
        } else {
            char *text = json_dumps(data, JSON_COMPACT | JSON_ENCODE_ANY);
            printf("%s%s%s %s", *s->id ? s->id : "", *s->id ? " " : "", type, text ? text : "");
            free(text);
        }
    }
    json_decref(data);
    putchar('\n');
    if (fflush(stdout))
        return s->out_error = errno ? errno : EIO, -1;
    if (*s->id)
        memcpy(s->last_id, s->id, sizeof s->id);
    return ++s->count == s->max ? -1 : 0;
}

/* One line of the stream (without its \n): a field, or the blank line ending an event. */
static int sse_line(struct sse *s, char *l, size_t n)
{
    if (n && l[n - 1] == '\r')
        l[--n] = 0;
    if (n == 0) {
        int r = s->data || *s->type ? emit(s) : 0;
        free(s->data);
        s->data = NULL;
        s->data_len = 0;
        s->type[0] = s->id[0] = 0;
        return r;
    }
    if (l[0] == ':')
        return 0; /* a comment: the keepalive */
    char *v = memchr(l, ':', n);
    size_t kl = v ? (size_t)(v - l) : n;
    v = v ? v + 1 + (v[1] == ' ') : l + n;
    size_t vl = n - (size_t)(v - l);
    if (kl == 5 && memcmp(l, "event", 5) == 0) {
        snprintf(s->type, sizeof s->type, "%.*s", (int)vl, v);
    } else if (kl == 2 && memcmp(l, "id", 2) == 0) {
        snprintf(s->id, sizeof s->id, "%.*s", (int)vl, v);
    } else if (kl == 4 && memcmp(l, "data", 4) == 0) {
        char *d = realloc(s->data, s->data_len + vl + 2);
        if (!d)
            return -1;
        if (s->data)
            d[s->data_len++] = '\n';
        memcpy(d + s->data_len, v, vl);
        s->data = d;
        s->data_len += vl;
        s->data[s->data_len] = 0;
    }
    return 0;
}

static int sse_sink(void *arg, const char *p, size_t n)
{
    struct sse *s = arg;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\n') {
            if (s->line)
                s->line[s->len] = 0;
            if (sse_line(s, s->line ? s->line : (char[]){0}, s->len))
                return -1;
            s->len = 0;
            continue;
        }
        if (s->len + 2 > s->cap) {
            if (s->cap >= EVENT_MAX)
                return -1;
            size_t cap = s->cap ? 2 * s->cap : 256;
            char *l = realloc(s->line, cap);
            if (!l)
                return -1;
            s->line = l;
            s->cap = cap;
        }
        s->line[s->len++] = p[i];
    }
    return 0;
}

int cmd_events(int argc, char **argv)
{
    static const struct option opts[] = {
        {"count", required_argument, 0, 'n'}, {"last-event-id", required_argument, 0, 'l'}, {0, 0, 0, 0}};
    struct sse s = {0};
    int c;
    char *end;
    while ((c = ctl_getopt(argc, argv, opts)) != -1) {
        if (c == '?')
            return EXIT_USAGE;
        errno = 0;
        if (c == 'n' && ((s.max = strtol(optarg, &end, 10)) <= 0 || *end || errno))
            return usage_error("bad --count '%s': a positive number", optarg);
        if (c == 'l')
            snprintf(s.last_id, sizeof s.last_id, "%s", optarg);
    }
    if (argc != optind)
        return usage_error("usage: qcowctl events [--count N] [--last-event-id N]");
    int r, tries = 0;
    for (;;) {
        char hdr[64];
        struct http_req req = {.method = "GET",
                               .path = "/v1/events",
                               .in_len = -1,
                               .headers = {"Accept: text/event-stream"},
                               .sink = sse_sink,
                               .sink_arg = &s,
                               .low_speed_time = 30};
        if (*s.last_id) {
            snprintf(hdr, sizeof hdr, "Last-Event-ID: %s", s.last_id);
            req.headers[1] = hdr;
        }
        struct http_resp resp;
        long before = s.count;
        r = http_do(&req, &resp);
        free(resp.body);
        s.len = 0; /* a half line of a broken stream is gone */
        free(s.data);
        s.data = NULL;
        s.data_len = 0;
        s.type[0] = s.id[0] = 0;
        if (s.out_error)
            r = fail("writing the output: %s", strerror(s.out_error));
        if (s.out_error || (s.max && s.count >= s.max) || (r != EXIT_OK && r != EXIT_CONN))
            break;
        /* the stream ended or broke: reconnect where it left off; give up after 5
         * failures in a row with nothing read */
        tries = resp.sent || s.count > before ? 0 : tries + 1;
        if (tries >= 5)
            break;
        fprintf(stderr, "qcowctl: events: reconnecting%s%s\n", *s.last_id ? " after event " : "", s.last_id);
        sleep(tries ? 2 : 1);
    }
    free(s.line);
    free(s.data);
    return s.max && s.count >= s.max && !s.out_error ? EXIT_OK : r;
}
