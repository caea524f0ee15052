/* fuzz_api.c: libFuzzer target for the whole HTTP API in process: each input is a
 * few requests served by the real server, catalog and job engine on mem: images.
 *
 * Input: requests separated by a line "===". When the input starts with the
 * qcow2 magic, the part before the first separator is not a request but an
 * image put in the catalog as "h" (hostile images for every endpoint; a bad one
 * is refused at open, never trusted). A request is its request line
 * without the version ("POST /v1/images/a/snapshots"), header lines, an empty
 * line and the body (up to the separator). The harness adds "HTTP/1.1", Host,
 * Content-Length (the body's length: a fuzzed one is dropped, as are
 * Transfer-Encoding and Connection) and "Connection: close", sends it over a
 * socketpair that the server takes (api_server_add_connection) and reads the
 * answer to its end. Every input starts from the same catalog (seed images made
 * at start-up, copied back in), a new server and a new job engine; the jobs are
 * waited for, then the engine freed, so no state and no thread outlives an input.
 * QCOWD_FUZZ_500=trap makes a 500 answer a crash (500 is only for bugs);
 * QCOWD_FUZZ_TRACE=1 prints each request line and its status. */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "api.h"
#include "catalog.h"
#include "err.h"
#include "fuzz_util.h"
#include "jobs.h"
#include "qcow2.h"
#include "vfs.h"

#define CAT_ROOT   "mem:fzcat"
#define MAX_REQS   12
#define SEP        "\n===\n"
#define ANSWER_MS  10000 /* no answer in this long is a stall: crash */
#define JOBS_MS    3000  /* jobs still running after this are cancelled */

/* The catalog every input starts from: file name and bytes. */
struct seed {
    char name[32];
    unsigned char *data;
    size_t size;
};
static struct seed seeds[8];
static unsigned nseeds;
static bool trap_500, trace;

/* ---- seed images, made once with the engine ---- */

static void must(int ret, const char *what)
{
    if (ret < 0) {
        fprintf(stderr, "fuzz_api: %s: %s\n", what, err_msg(ret));
        abort();
    }
}

static struct qcow2_image *make(const char *file, const struct qcow2_create_opts *o)
{
    char uri[128];
    snprintf(uri, sizeof uri, CAT_ROOT "/%s", file);
    must(qcow2_create(uri, o), uri);
    struct qcow2_open_opts oo = {.read_write = true, .contained = true};
    struct qcow2_image *img = NULL;
    must(qcow2_open(uri, &oo, &img), uri);
    return img;
}

static void fill(struct qcow2_image *img, int byte, uint64_t off, size_t len)
{
    static unsigned char buf[64 << 10];
    memset(buf, byte, len);
    must(qcow2_pwrite(img, buf, len, off), "write");
}

static void keep(const char *file)
{
    char uri[128];
    snprintf(uri, sizeof uri, CAT_ROOT "/%s", file);
    struct vfs_file *f = NULL;
    uint64_t size = 0;
    must(vfs_open(uri, VFS_O_RDONLY, &f), uri);
    must(vfs_size(f, &size), uri);
    struct seed *s = &seeds[nseeds++];
    snprintf(s->name, sizeof s->name, "%s", file);
    s->size = (size_t)size;
    s->data = malloc(s->size ? s->size : 1);
    CHECK(s->data != NULL);
    must(vfs_pread(f, s->data, s->size, 0), uri);
    vfs_close(f);
}

/* a: snapshots and bitmaps; base and top: a chain; x: extended L2 and zstd. */
static void make_seeds(void)
{
    struct qcow2_create_opts o = {.size = 1 << 20, .cluster_size = 4096};
    struct qcow2_image *img = make("a.qcow2", &o);
    fill(img, 0x11, 0, 16384);
    must(qcow2_snapshot_create(img, "s1"), "snapshot");
    fill(img, 0x12, 8192, 8192);
    must(qcow2_bitmap_add(img, "b0", 0, false), "bitmap");
    must(qcow2_bitmap_add(img, "b1", 65536, true), "bitmap");
    fill(img, 0x13, 512 << 10, 4096);
    must(qcow2_snapshot_create(img, "s2"), "snapshot");
    qcow2_close(img);

    o = (struct qcow2_create_opts){.size = 512 << 10, .cluster_size = 4096};
    img = make("base.qcow2", &o);
    fill(img, 0x21, 0, 65536);
    qcow2_close(img);
    o = (struct qcow2_create_opts){.size = 512 << 10, .cluster_size = 4096, .backing_file = "base.qcow2",
                                   .backing_format = "qcow2"};
    img = make("top.qcow2", &o);
    fill(img, 0x22, 4096, 8192);
    must(qcow2_bitmap_add(img, "t0", 0, false), "bitmap");
    qcow2_close(img);

    o = (struct qcow2_create_opts){
        .size = 256 << 10, .cluster_size = 16384, .extended_l2 = true, .compression_zstd = true};
    img = make("x.qcow2", &o);
    fill(img, 0x31, 1024, 2048);
    qcow2_close(img);

    keep("a.qcow2");
    keep("base.qcow2");
    keep("top.qcow2");
    keep("x.qcow2");
}

/* ---- the catalog back to its seeds ---- */

struct names {
    char *v[256];
    unsigned n;
};

static int collect(void *ctx, const char *name)
{
    struct names *ns = ctx;
    if (ns->n < sizeof ns->v / sizeof ns->v[0])
        ns->v[ns->n++] = strdup(name);
    return 0;
}

static void reset_catalog(void)
{
    struct names ns = {.n = 0};
    vfs_list(CAT_ROOT, collect, &ns);
    for (unsigned i = 0; i < ns.n; i++) {
        char uri[512];
        snprintf(uri, sizeof uri, CAT_ROOT "/%s", ns.v[i]);
        vfs_remove(uri);
        free(ns.v[i]);
    }
    for (unsigned i = 0; i < nseeds; i++) {
        char uri[128];
        snprintf(uri, sizeof uri, CAT_ROOT "/%s", seeds[i].name);
        fuzz_put_file(uri, seeds[i].data, seeds[i].size);
    }
}

/* ---- one request ---- */

struct out {
    char *p;
    size_t n, cap;
};

static void put(struct out *o, const void *s, size_t n)
{
    if (!n)
        return;
    if (o->n + n > o->cap) {
        o->cap = (o->n + n) * 2 + 256;
        o->p = realloc(o->p, o->cap);
        CHECK(o->p != NULL);
    }
    memcpy(o->p + o->n, s, n);
    o->n += n;
}

static void puts_(struct out *o, const char *s)
{
    put(o, s, strlen(s));
}

static bool dropped_header(const char *line, size_t n)
{
    static const char *const drop[] = {"content-length:", "transfer-encoding:", "connection:", "host:"};
    for (size_t i = 0; i < sizeof drop / sizeof drop[0]; i++) {
        size_t k = strlen(drop[i]);
        if (n >= k && !strncasecmp(line, drop[i], k))
            return true;
    }
    return false;
}

/* n bytes of one line, with CR as a space: a CR of the input must not end a
 * header line (and fold or end the harness's own headers). */
static void put_line(struct out *o, const char *p, size_t n)
{
    size_t at = o->n;
    put(o, p, n);
    for (size_t i = at; i < o->n; i++)
        if (o->p[i] == '\r')
            o->p[i] = ' ';
}

/* The raw HTTP request for one piece of the input: the harness's headers come
 * last, so no line of the input can fold into them. */
static void build(const char *p, size_t n, struct out *o)
{
    const char *end = p + n;
    const char *eol = memchr(p, '\n', n);
    const char *line_end = eol ? eol : end;
    put_line(o, p, (size_t)(line_end - p));
    puts_(o, " HTTP/1.1\r\n");
    p = eol ? eol + 1 : end;
    bool typed = false;
    while (p < end && *p != '\n') { /* header lines up to an empty one */
        eol = memchr(p, '\n', (size_t)(end - p));
        line_end = eol ? eol : end;
        if ((size_t)(line_end - p) >= 13 && !strncasecmp(p, "content-type:", 13))
            typed = true;
        if (!dropped_header(p, (size_t)(line_end - p))) {
            put_line(o, p, (size_t)(line_end - p));
            puts_(o, "\r\n");
        }
        p = eol ? eol + 1 : end;
    }
    if (p < end)
        p++; /* the empty line */
    char tail[160];
    /* a body without a Content-Type of its own is sent as JSON, so the JSON
     * endpoints' parsers get it (they answer 415 to other types) */
    snprintf(tail, sizeof tail, "Host: localhost\r\nConnection: close\r\n%sContent-Length: %zu\r\n\r\n",
             !typed && p < end ? "Content-Type: application/json\r\n" : "", (size_t)(end - p));
    puts_(o, tail);
    put(o, p, (size_t)(end - p));
}

static long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Send req, read the answer until the server closes; returns the status. */
static unsigned exchange(struct api_server *srv, const struct out *req)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
    if (api_server_add_connection(srv, sv[1]) < 0) {
        close(sv[0]);
        return 0;
    }
    char head[16] = "", buf[65536];
    size_t sent = 0, got = 0;
    long deadline = now_ms() + ANSWER_MS;
    for (;;) {
        struct pollfd pfd = {.fd = sv[0], .events = POLLIN | (sent < req->n ? POLLOUT : 0)};
        int left = (int)(deadline - now_ms());
        CHECK(left > 0); /* a stall: no answer in ANSWER_MS */
        if (poll(&pfd, 1, left) <= 0)
            continue;
        if (pfd.revents & POLLOUT) {
            ssize_t k = send(sv[0], req->p + sent, req->n - sent, MSG_NOSIGNAL);
            if (k > 0)
                sent += (size_t)k;
            else if (k < 0 && errno != EAGAIN)
                sent = req->n; /* the server closed early: read what it said */
        }
        if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t k = recv(sv[0], buf, sizeof buf, 0);
            if (k == 0 || (k < 0 && errno != EAGAIN))
                break;
            if (k > 0 && got < sizeof head - 1) {
                size_t c = (size_t)k < sizeof head - 1 - got ? (size_t)k : sizeof head - 1 - got;
                memcpy(head + got, buf, c);
                head[got + c] = '\0';
            }
            if (k > 0)
                got += (size_t)k;
        }
    }
    close(sv[0]);
    unsigned status = 0;
    if (!strncmp(head, "HTTP/1.", 7))
        status = (unsigned)atoi(head + 9);
    return status;
}

/* ---- jobs: wait for the ones that can finish ---- */

static void wait_jobs(struct jobs *js)
{
    long deadline = now_ms() + JOBS_MS;
    while (now_ms() < deadline) {
        struct job_info *all = NULL;
        size_t n = 0;
        if (jobs_list(js, NULL, -1, &all, &n) < 0)
            return;
        unsigned busy = 0, paused = 0, waiting = 0;
        for (size_t i = 0; i < n; i++) {
            enum job_status st = all[i].status;
            busy += st == JOB_RUNNING || st == JOB_ABORTING;
            paused += st == JOB_PAUSED;
            waiting += st == JOB_CREATED;
        }
        jobs_info_free(all, n);
        if (!busy && (!waiting || paused)) /* done, or stuck behind a paused job */
            return;
        usleep(200);
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    signal(SIGPIPE, SIG_IGN);
    fuzz_limit_mem();
    const char *t = getenv("QCOWD_FUZZ_500");
    trap_500 = t && !strcmp(t, "trap");
    trace = getenv("QCOWD_FUZZ_TRACE") != NULL;
    make_seeds();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    reset_catalog();
    struct catalog *cat = NULL;
    struct catalog_opts co = {.l2_cache_bytes = 256u << 10, .max_open = 8, .max_meta_bytes = 64u << 20};
    must(catalog_new(CAT_ROOT, &co, &cat), "catalog");
    struct jobs *js = NULL;
    struct jobs_config jc = {.workers = 1};
    must(jobs_new(&jc, &js), "jobs");
    struct api_config ac = {.threads = 1, .timeout_sec = 2, .quiet = 1, .jobs = js};
    struct api_server *srv = NULL;
    must(api_server_start(&ac, cat, &srv), "server");

    const char *p = (const char *)data, *end = p + size;
    if (size >= 4 && !memcmp(data, "QFI\xfb", 4)) {
        const char *sep = memmem(p, size, SEP, strlen(SEP));
        const char *stop = sep ? sep : end;
        fuzz_put_file(CAT_ROOT "/h.qcow2", data, (size_t)(stop - p));
        p = sep ? sep + strlen(SEP) : end;
    }
    for (unsigned n = 0; p < end && n < MAX_REQS; n++) {
        const char *sep = memmem(p, (size_t)(end - p), SEP, strlen(SEP));
        const char *stop = sep ? sep : end;
        struct out req = {0};
        build(p, (size_t)(stop - p), &req);
        unsigned status = exchange(srv, &req);
        if (trace)
            fprintf(stderr, "fuzz_api: %u %.*s\n", status, (int)strcspn(req.p, "\r\n"), req.p);
        free(req.p);
        CHECK(!(trap_500 && status == 500));
        p = sep ? sep + strlen(SEP) : end;
    }

    wait_jobs(js);
    api_server_stop(srv);
    jobs_free(js);
    catalog_free(cat);
    return 0;
}
