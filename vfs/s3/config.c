/* config.c: the s3 plugin's settings: from qcowd's options (.config), then the
 * environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
 * AWS_ENDPOINT_URL, QCOWD_S3_*), then a credentials file, then defaults. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "s3_int.h"
#include "s3_obj.h"

struct s3_conf s3_conf;

static pthread_mutex_t conf_lock = PTHREAD_MUTEX_INITIALIZER;
static int conf_done; /* s3_conf_ready succeeded (under conf_lock) */
static pthread_cond_t swept = PTHREAD_COND_INITIALIZER;
static int sweeping;      /* the start's sweep runs, on thread sweeper: others wait (under conf_lock) */
static pthread_t sweeper;

static int set_str(char **dst, const char *v)
{
    char *s = strdup(v);
    if (!s)
        return err_fail(ENOMEM, "s3 configuration: out of memory");
    free(*dst);
    *dst = s;
    return 0;
}

/* "8M", "256k", "1G" or bytes. */
static int parse_size(const char *key, const char *v, uint64_t min, uint64_t *out)
{
    char *end;
    unsigned long long n = strtoull(v, &end, 10);
    unsigned shift = 0;
    switch (*end) {
    case 'k': case 'K': shift = 10; end++; break;
    case 'm': case 'M': shift = 20; end++; break;
    case 'g': case 'G': shift = 30; end++; break;
    default: break;
    }
    if (end == v || *end || n > (UINT64_MAX >> shift) || (n << shift) < min)
        return err_fail(EINVAL, "s3 configuration: %s=%s is not a size of at least %llu bytes", key, v,
                        (unsigned long long)min);
    *out = (uint64_t)n << shift;
    return 0;
}

static int parse_uint(const char *key, const char *v, unsigned long min, unsigned long max, unsigned long *out)
{
    char *end;
    unsigned long n = strtoul(v, &end, 10);
    if (end == v || *end || n < min || n > max)
        return err_fail(EINVAL, "s3 configuration: %s=%s is not a number in %lu..%lu", key, v, min, max);
    *out = n;
    return 0;
}

/* A duration: "90", "30s", "15m", "24h", "2d" (seconds), or "off" (0). */
static int parse_seconds(const char *key, const char *v, uint64_t *out)
{
    if (!strcmp(v, "off")) {
        *out = 0;
        return 0;
    }
    char *end;
    unsigned long long n = strtoull(v, &end, 10);
    uint64_t unit = 1;
    switch (*end) {
    case 's': unit = 1; end++; break;
    case 'm': unit = 60; end++; break;
    case 'h': unit = 3600; end++; break;
    case 'd': unit = 86400; end++; break;
    default: break;
    }
    if (end == v || *end || *v == '-' || n == 0 || n > (365ull * 86400) / unit)
        return err_fail(EINVAL, "s3 configuration: %s=%.40s is not a duration of 1 s to 365 days (90, 30s, 15m, "
                                "24h, 2d) nor off", key, v);
    *out = n * unit;
    return 0;
}

/* Whether the authority of URL v (after the scheme) holds user information
 * ("user:password@host"): such an endpoint is refused without echoing it. */
static int has_userinfo(const char *v)
{
    const char *a = strstr(v, "://");
    a = a ? a + 3 : v;
    size_t n = strcspn(a, "/?#");
    return memchr(a, '@', n) != NULL;
}

static int set_locked(const char *key, const char *v)
{
    unsigned long n;
    int r;
    if (!strcmp(key, "endpoint")) {
        if (has_userinfo(v))
            return err_fail(EINVAL, "s3 configuration: the endpoint URL carries credentials (user:password@); "
                                    "give them in the environment or a credentials file instead");
        if (strncmp(v, "http://", 7) && strncmp(v, "https://", 8))
            return err_fail(EINVAL, "s3 configuration: endpoint %.200s is not an http:// or https:// URL", v);
        if ((r = set_str(&s3_conf.endpoint, v)) == 0) {
            size_t len = strlen(s3_conf.endpoint);
            while (len > 8 && s3_conf.endpoint[len - 1] == '/')
                s3_conf.endpoint[--len] = '\0';
        }
        return r;
    }
    if (!strcmp(key, "region"))
        return set_str(&s3_conf.region, v);
    if (!strcmp(key, "access-key"))
        return set_str(&s3_conf.access_key, v);
    if (!strcmp(key, "secret-key"))
        return set_str(&s3_conf.secret_key, v);
    if (!strcmp(key, "staging-dir"))
        return set_str(&s3_conf.staging_dir, v);
    if (!strcmp(key, "allow-http")) {
        if (strcmp(v, "yes") && strcmp(v, "no"))
            return err_fail(EINVAL, "s3 configuration: allow-http takes yes or no, not '%.20s'", v);
        s3_conf.allow_http = !strcmp(v, "yes");
        return 0;
    }
    if (!strcmp(key, "credentials-file")) {
        FILE *f = fopen(v, "re");
        if (!f)
            return err_fail(errno, "s3 configuration: credentials file %s: %s", v, strerror(errno));
        char line[512];
        r = 0;
        while (r == 0 && fgets(line, sizeof line, f)) {
            char *eq = strchr(line, '='), *k = line, *val;
            if (!eq || line[0] == '#' || line[0] == '[')
                continue;
            *eq = '\0';
            val = eq + 1;
            val[strcspn(val, "\r\n")] = '\0';
            while (*val == ' ')
                val++;
            k[strcspn(k, " \t")] = '\0';
            if (!strcmp(k, "aws_access_key_id"))
                r = set_str(&s3_conf.access_key, val);
            else if (!strcmp(k, "aws_secret_access_key"))
                r = set_str(&s3_conf.secret_key, val);
            else if (!strcmp(k, "region"))
                r = set_str(&s3_conf.region, val);
            else if (!strcmp(k, "endpoint_url"))
                r = set_locked("endpoint", val);
        }
        fclose(f);
        return r;
    }
    if (!strcmp(key, "block-size"))
        return parse_size(key, v, 4096, &s3_conf.block_size);
    if (!strcmp(key, "cache-size"))
        return parse_size(key, v, 0, &s3_conf.cache_bytes);
    if (!strcmp(key, "readahead"))
        return parse_size(key, v, 0, &s3_conf.readahead);
    if (!strcmp(key, "part-size"))
        return parse_size(key, v, 5u << 20, &s3_conf.part_size);
    if (!strcmp(key, "staging-max"))
        return parse_size(key, v, 1u << 20, &s3_conf.staging_max);
    if (!strcmp(key, "copy-max"))
        return parse_size(key, v, 5u << 20, &s3_conf.copy_max);
    if (!strcmp(key, "connections")) {
        if ((r = parse_uint(key, v, 1, 256, &n)) == 0)
            s3_conf.connections = (unsigned)n;
        return r;
    }
    if (!strcmp(key, "readahead-gets")) {
        if ((r = parse_uint(key, v, 0, 256, &n)) == 0) {
            s3_conf.readahead_gets = (unsigned)n;
            s3_conf.readahead_gets_set = 1;
        }
        return r;
    }
    if (!strcmp(key, "retries")) {
        if ((r = parse_uint(key, v, 0, 20, &n)) == 0)
            s3_conf.retries = (unsigned)n;
        return r;
    }
    if (!strcmp(key, "timeout")) {
        if ((r = parse_uint(key, v, 1, 3600, &n)) == 0)
            s3_conf.timeout_ms = (long)n * 1000;
        return r;
    }
    if (!strcmp(key, "stat-ttl")) {
        char *end;
        double sec = strtod(v, &end);
        if (end == v || *end || !(sec >= 0 && sec <= 3600))
            return err_fail(EINVAL, "s3 configuration: stat-ttl=%s is not a number of seconds in 0..3600", v);
        s3_conf.stat_ttl_ns = (uint64_t)(sec * 1e9);
        s3_conf.stat_ttl_set = 1;
        return 0;
    }
    if (!strcmp(key, "sweep-root")) {
        if (strncmp(v, "s3://", 5) || !v[5] || v[5] == '/')
            return err_fail(EINVAL, "s3 configuration: sweep-root=%.200s is not an s3://BUCKET/PREFIX", v);
        return set_str(&s3_conf.sweep_root, v + 3);
    }
    if (!strcmp(key, "stale-upload")) {
        if ((r = parse_seconds(key, v, &s3_conf.stale_upload_s)) == 0)
            s3_conf.stale_upload_set = 1;
        return r;
    }
    if (!strcmp(key, "connect-timeout")) {
        if ((r = parse_uint(key, v, 1, 3600, &n)) == 0)
            s3_conf.connect_timeout_ms = (long)n * 1000;
        return r;
    }
    return err_fail(EINVAL, "s3 configuration: unknown key \"%.64s\" (known: endpoint, region, access-key, "
                            "credentials-file, staging-dir, allow-http, block-size, cache-size, readahead, "
                            "readahead-gets, part-size, staging-max, copy-max, connections, retries, timeout, "
                            "connect-timeout, stat-ttl, stale-upload, sweep-root)",
                    key);
}

int s3_conf_set(const char *key, const char *value)
{
    /* what the host passes comes from its command line or settings file, which
     * others can read (/proc/PID/cmdline): no secrets there */
    if (!strcmp(key, "secret-key"))
        return err_fail(EINVAL, "s3 configuration: secret-key cannot be a setting (the command line is visible "
                                "to every user in /proc); use AWS_SECRET_ACCESS_KEY or credentials-file=FILE");
    pthread_mutex_lock(&conf_lock);
    int r = set_locked(key, value);
    pthread_mutex_unlock(&conf_lock);
    return r;
}

/* Environment variables that map to keys, applied when the key is still unset. */
static int from_env(void)
{
    static const struct {
        const char *env, *key;
    } map[] = {
        {"QCOWD_S3_CREDENTIALS_FILE", "credentials-file"},
        {"AWS_ENDPOINT_URL", "endpoint"},
        {"AWS_REGION", "region"},
        {"AWS_DEFAULT_REGION", "region"},
        {"AWS_ACCESS_KEY_ID", "access-key"},
        {"AWS_SECRET_ACCESS_KEY", "secret-key"},
        {"QCOWD_S3_STAGING_DIR", "staging-dir"},
        {"QCOWD_S3_BLOCK_SIZE", "block-size"},
        {"QCOWD_S3_CACHE_SIZE", "cache-size"},
        {"QCOWD_S3_READAHEAD", "readahead"},
        {"QCOWD_S3_READAHEAD_GETS", "readahead-gets"},
        {"QCOWD_S3_PART_SIZE", "part-size"},
        {"QCOWD_S3_STAGING_MAX", "staging-max"},
        {"QCOWD_S3_CONNECTIONS", "connections"},
        {"QCOWD_S3_RETRIES", "retries"},
        {"QCOWD_S3_TIMEOUT", "timeout"},
        {"QCOWD_S3_STALE_UPLOAD", "stale-upload"},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        const char *v = getenv(map[i].env);
        if (!v || !*v)
            continue;
        char **s = !strcmp(map[i].key, "endpoint")     ? &s3_conf.endpoint
                   : !strcmp(map[i].key, "region")     ? &s3_conf.region
                   : !strcmp(map[i].key, "access-key") ? &s3_conf.access_key
                   : !strcmp(map[i].key, "secret-key") ? &s3_conf.secret_key
                   : !strcmp(map[i].key, "staging-dir") ? &s3_conf.staging_dir
                                                        : NULL;
        if ((s && *s) || (!strcmp(map[i].key, "stale-upload") && s3_conf.stale_upload_set))
            continue; /* given on the command line: it wins */
        int r = set_locked(map[i].key, v);
        if (r < 0)
            return err_prefix(r, "environment %s", map[i].env);
    }
    return 0;
}

int s3_conf_ready(void)
{
    int r = 0;
    pthread_mutex_lock(&conf_lock);
    while (conf_done && sweeping && !pthread_equal(sweeper, pthread_self()))
        pthread_cond_wait(&swept, &conf_lock);
    if (conf_done)
        goto out;
    if ((r = from_env()) < 0)
        goto out;
    if (!s3_conf.endpoint) {
        r = err_fail(EINVAL, "s3: no endpoint configured (qcowd --s3-endpoint URL, or AWS_ENDPOINT_URL)");
        goto out;
    }
    if (!s3_conf.access_key || !s3_conf.secret_key) {
        r = err_fail(EACCES, "s3: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a "
                             "credentials file)");
        goto out;
    }
    if (!strncmp(s3_conf.endpoint, "http://", 7) && !s3_conf.allow_http) {
        r = err_fail(EINVAL, "s3: endpoint %.200s is plain HTTP, so credentials and data would cross the network "
                             "unencrypted; use https://, or --s3-opt allow-http=yes for a store on a trusted network",
                     s3_conf.endpoint);
        goto out;
    }
    if (!s3_conf.region && (r = set_str(&s3_conf.region, "us-east-1")) < 0)
        goto out;
    if (!s3_conf.staging_dir && (r = set_str(&s3_conf.staging_dir, "/var/tmp/qcowd-s3-staging")) < 0)
        goto out;
    if (!s3_conf.block_size)
        s3_conf.block_size = 64u << 10; /* a random 4 KiB read costs one GET of this */
    if (!s3_conf.cache_bytes)
        s3_conf.cache_bytes = 128u << 20; /* half of it read-ahead: 8 GETs of 8M in flight */
    if (!s3_conf.readahead)
        s3_conf.readahead = 64u << 20;
    if (!s3_conf.part_size)
        s3_conf.part_size = 8u << 20;
    if (!s3_conf.staging_max)
        s3_conf.staging_max = 1ull << 30;
    if (!s3_conf.connections)
        s3_conf.connections = 10; /* 8 read-ahead GETs and 2 for readers */
    if (!s3_conf.readahead_gets_set)
        s3_conf.readahead_gets = s3_conf.connections > 1 ? s3_conf.connections - 2 : 1;
    if (s3_conf.readahead_gets > s3_conf.connections)
        s3_conf.readahead_gets = s3_conf.connections;
    if (!s3_conf.copy_max || s3_conf.copy_max > (5ull << 30))
        s3_conf.copy_max = 5ull << 30;
    if (!s3_conf.retries && !getenv("QCOWD_S3_RETRIES"))
        s3_conf.retries = 4;
    if (!s3_conf.connect_timeout_ms)
        s3_conf.connect_timeout_ms = 5000;
    if (!s3_conf.timeout_ms)
        s3_conf.timeout_ms = 30000;
    if (!s3_conf.stat_ttl_set)
        s3_conf.stat_ttl_ns = 1000000000u;
    if (!s3_conf.stale_upload_set)
        s3_conf.stale_upload_s = 24 * 3600; /* no honest upload waits that long */
    conf_done = 1;
    /* the sweep of dead runs' uploads runs once, before any other caller goes
     * on: none of our own uploads exists yet */
    sweeping = 1;
    sweeper = pthread_self();
    pthread_mutex_unlock(&conf_lock);
    s3_sweep_at_start();
    pthread_mutex_lock(&conf_lock);
    sweeping = 0;
    pthread_cond_broadcast(&swept);
    pthread_mutex_unlock(&conf_lock);
    return 0;
out:
    pthread_mutex_unlock(&conf_lock);
    return r;
}
