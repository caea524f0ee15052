/* metrics.c: GET /metrics in the Prometheus text format: requests by method and
 * status, body bytes in and out, a latency histogram, requests in flight, open
 * images. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_int.h"
#include "catalog.h"

static const char *const method_names[API_METHODS] = {"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS",
                                                       "other"};
static const double bucket_le[API_BUCKETS] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                              0.05,   0.1,   0.25,   0.5,   1,    5};

void api_metrics_record(struct api_metrics *m, const char *method, unsigned status, uint64_t in, uint64_t out,
                        double seconds)
{
    unsigned mi = API_METHODS - 1;
    for (unsigned i = 0; i + 1 < API_METHODS; i++)
        if (!strcmp(method, method_names[i]))
            mi = i;
    if (status >= 100 && status < 600)
        atomic_fetch_add(&m->requests[mi][status - 100], 1);
    atomic_fetch_add(&m->bytes_in, in);
    atomic_fetch_add(&m->bytes_out, out);
    unsigned b = 0;
    while (b < API_BUCKETS && seconds > bucket_le[b])
        b++;
    if (b < API_BUCKETS)
        atomic_fetch_add(&m->buckets[b], 1);
    atomic_fetch_add(&m->count, 1);
    atomic_fetch_add(&m->usec_sum, (unsigned long long)(seconds * 1e6));
}

/* One storage backend counter as qcowd_storage_NAME_total{scheme="..."}. */
static int storage_counter(void *ctx, const char *scheme, const char *name, uint64_t value)
{
    fprintf(ctx, "# TYPE qcowd_storage_%s_total counter\nqcowd_storage_%s_total{scheme=\"%s\"} %" PRIu64 "\n", name,
            name, scheme, value);
    return 0;
}

enum MHD_Result api_metrics(struct req *r, char **args)
{
    struct api_metrics *m = r->metrics;
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f)
        return MHD_NO;
    fprintf(f, "# HELP qcowd_http_requests_total HTTP requests completed, by method and status.\n"
               "# TYPE qcowd_http_requests_total counter\n");
    for (unsigned mi = 0; mi < API_METHODS; mi++)
        for (unsigned s = 0; s < 500; s++) {
            unsigned long long n = atomic_load(&m->requests[mi][s]);
            if (n)
                fprintf(f, "qcowd_http_requests_total{method=\"%s\",code=\"%u\"} %llu\n", method_names[mi], s + 100, n);
        }
    fprintf(f,
            "# HELP qcowd_http_request_body_bytes_total Request body bytes received (uploads, writes, JSON).\n"
            "# TYPE qcowd_http_request_body_bytes_total counter\n"
            "qcowd_http_request_body_bytes_total %llu\n"
            "# HELP qcowd_http_response_body_bytes_total Response body bytes sent (reads, downloads, JSON).\n"
            "# TYPE qcowd_http_response_body_bytes_total counter\n"
            "qcowd_http_response_body_bytes_total %llu\n"
            "# HELP qcowd_http_sendfile_responses_total Ranged reads the kernel sent straight from the image file.\n"
            "# TYPE qcowd_http_sendfile_responses_total counter\n"
            "qcowd_http_sendfile_responses_total %llu\n",
            (unsigned long long)atomic_load(&m->bytes_in), (unsigned long long)atomic_load(&m->bytes_out),
            (unsigned long long)atomic_load(&m->sendfile));
    fprintf(f, "# HELP qcowd_http_request_duration_seconds Time from the request line to the end of the answer.\n"
               "# TYPE qcowd_http_request_duration_seconds histogram\n");
    unsigned long long cum = 0;
    for (unsigned b = 0; b < API_BUCKETS; b++) {
        cum += atomic_load(&m->buckets[b]);
        fprintf(f, "qcowd_http_request_duration_seconds_bucket{le=\"%g\"} %llu\n", bucket_le[b], cum);
    }
    unsigned long long count = atomic_load(&m->count);
    fprintf(f,
            "qcowd_http_request_duration_seconds_bucket{le=\"+Inf\"} %llu\n"
            "qcowd_http_request_duration_seconds_sum %.6f\n"
            "qcowd_http_request_duration_seconds_count %llu\n",
            count, (double)atomic_load(&m->usec_sum) / 1e6, count);
    fprintf(f,
            "# HELP qcowd_http_requests_in_flight Requests being served now (this one included).\n"
            "# TYPE qcowd_http_requests_in_flight gauge\n"
            "qcowd_http_requests_in_flight %u\n"
            "# HELP qcowd_open_images Images open in the catalog (cached or in use).\n"
            "# TYPE qcowd_open_images gauge\n"
            "qcowd_open_images %u\n",
            atomic_load(&m->inflight), catalog_open_count(r->cat));
    uint64_t hits, misses;
    catalog_cache_stats(r->cat, &hits, &misses);
    fprintf(f,
            "# HELP qcowd_l2_cache_hits_total L2 table cache lookups answered from memory.\n"
            "# TYPE qcowd_l2_cache_hits_total counter\n"
            "qcowd_l2_cache_hits_total %" PRIu64 "\n"
            "# HELP qcowd_l2_cache_misses_total L2 table cache lookups that read the image file.\n"
            "# TYPE qcowd_l2_cache_misses_total counter\n"
            "qcowd_l2_cache_misses_total %" PRIu64 "\n",
            hits, misses);
    uint64_t cut_headers = 0, cut_slow = 0;
    unsigned conns = 0;
    if (r->guard)
        api_guard_counts(r->guard, &conns, &cut_headers, &cut_slow);
    fprintf(f,
            "# HELP qcowd_http_connections Client connections open now (this one included).\n"
            "# TYPE qcowd_http_connections gauge\n"
            "qcowd_http_connections %u\n",
            conns);
    fprintf(f,
            "# HELP qcowd_http_connections_cut_total Connections closed by a budget: headers past "
            "--header-timeout, a body or download below --min-rate.\n"
            "# TYPE qcowd_http_connections_cut_total counter\n"
            "qcowd_http_connections_cut_total{budget=\"header-timeout\"} %" PRIu64 "\n"
            "qcowd_http_connections_cut_total{budget=\"min-rate\"} %" PRIu64 "\n",
            cut_headers, cut_slow);
    catalog_storage_stats(storage_counter, f);
    if (fclose(f) != 0) {
        free(text);
        return MHD_NO;
    }
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
    if (!r->head)
        r->bytes = len;
    return api_queue(r, 200, resp);
}
