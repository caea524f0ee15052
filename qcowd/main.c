/* main.c: the qcowd daemon: options, the catalog, the HTTP server, and a clean
 * stop on SIGTERM/SIGINT (stop accepting, drain, close images, exit 0). */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "catalog.h"
#include "err.h"
#include "events.h"
#include "jobs.h"

#define DEFAULT_LISTEN  "127.0.0.1:8080"
#define DEFAULT_CATALOG "./data"
#define DEFAULT_THREADS 8
#define DRAIN_MS        30000 /* how long in-flight requests get to finish on SIGTERM */
#define DEFAULT_JOB_WORKERS 2
#define JOBS_FILE       ".qcowd-jobs.json" /* job records, in the catalog folder */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: qcowd [--listen HOST:PORT] [--catalog DIR] [--threads N] [--quiet]\n"
            "  --listen HOST:PORT  address to serve on (default " DEFAULT_LISTEN "; port 0: any free port)\n"
            "  --catalog DIR       folder of the *.qcow2 images (default " DEFAULT_CATALOG ")\n"
            "  --threads N         HTTP worker threads (default %d)\n"
            "  --quiet             no per-request log lines\n"
            "  --job-workers N     threads running jobs (default %d)\n"
            "  --max-listeners N   GET /v1/events clients at once (default %d)\n"
            "  --version, --help\n",
            DEFAULT_THREADS, DEFAULT_JOB_WORKERS, EVENTS_DEFAULT_LISTENERS);
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"listen", required_argument, 0, 'l'},
        {"catalog", required_argument, 0, 'c'},
        {"threads", required_argument, 0, 't'},
        {"quiet", no_argument, 0, 'q'},
        {"job-workers", required_argument, 0, 'J'},
        {"max-listeners", required_argument, 0, 'L'},
        {"help", no_argument, 0, 'h'},
        {"version", no_argument, 0, 'V'},
        {0, 0, 0, 0},
    };
    struct api_config cfg = {.listen = DEFAULT_LISTEN, .threads = DEFAULT_THREADS, .log = 1};
    const char *root = DEFAULT_CATALOG;
    unsigned job_workers = DEFAULT_JOB_WORKERS, max_listeners = EVENTS_DEFAULT_LISTENERS;
    int c;
    while ((c = getopt_long(argc, argv, "l:c:t:qh", lo, NULL)) != -1) {
        switch (c) {
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
    if (optind != argc) {
        usage(stderr);
        return 2;
    }

    /* Every thread started from here on inherits the blocked signals; only
     * sigwait below receives them. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct catalog *cat;
    int ret = catalog_new(root, NULL, &cat);
    if (ret < 0) {
        fprintf(stderr, "qcowd: %s\n", err_msg(ret));
        return 1;
    }
    struct events *ev = NULL;
    struct jobs *jobs = NULL;
    char *jobs_file = catalog_path(cat, JOBS_FILE);
    ret = jobs_file ? events_new(max_listeners, &ev) : -ENOMEM;
    if (ret == 0) {
        catalog_set_notify(cat, events_image_event, ev);
        struct jobs_config jc = {
            .workers = job_workers, .state_uri = jobs_file, .event = events_job_event, .event_opaque = ev};
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
    struct api_server *srv;
    ret = api_server_start(&cfg, cat, &srv);
    if (ret < 0) {
        fprintf(stderr, "qcowd: %s\n", err_msg(ret));
        jobs_free(jobs);
        events_free(ev);
        catalog_free(cat);
        return 1;
    }
    fprintf(stderr, "qcowd: listening on http://%s/ (catalog %s, %u threads)\n", api_server_address(srv), root,
            cfg.threads);

    int sig = 0;
    sigwait(&stop, &sig);
    fprintf(stderr, "qcowd: %s: no new connections; finishing requests in flight\n", strsignal(sig));
    api_server_quiesce(srv);
    if (api_server_drain(srv, DRAIN_MS) < 0)
        fprintf(stderr, "qcowd: %s; closing them\n", err_msg(ETIMEDOUT));
    api_server_stop(srv);
    jobs_free(jobs); /* running jobs are cancelled and release their images */
    events_free(ev);
    catalog_free(cat);
    fprintf(stderr, "qcowd: stopped\n");
    return 0;
}
