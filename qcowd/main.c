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

#define DEFAULT_LISTEN  "127.0.0.1:8080"
#define DEFAULT_CATALOG "./data"
#define DEFAULT_THREADS 8
#define DRAIN_MS        30000 /* how long in-flight requests get to finish on SIGTERM */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: qcowd [--listen HOST:PORT] [--catalog DIR] [--threads N] [--quiet]\n"
            "  --listen HOST:PORT  address to serve on (default " DEFAULT_LISTEN "; port 0: any free port)\n"
            "  --catalog DIR       folder of the *.qcow2 images (default " DEFAULT_CATALOG ")\n"
            "  --threads N         HTTP worker threads (default %d)\n"
            "  --quiet             no per-request log lines\n"
            "  --version, --help\n",
            DEFAULT_THREADS);
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"listen", required_argument, 0, 'l'},
        {"catalog", required_argument, 0, 'c'},
        {"threads", required_argument, 0, 't'},
        {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},
        {"version", no_argument, 0, 'V'},
        {0, 0, 0, 0},
    };
    struct api_config cfg = {.listen = DEFAULT_LISTEN, .threads = DEFAULT_THREADS, .log = 1};
    const char *root = DEFAULT_CATALOG;
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
    struct api_server *srv;
    ret = api_server_start(&cfg, cat, &srv);
    if (ret < 0) {
        fprintf(stderr, "qcowd: %s\n", err_msg(ret));
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
    catalog_free(cat);
    fprintf(stderr, "qcowd: stopped\n");
    return 0;
}
