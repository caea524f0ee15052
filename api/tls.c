/* tls.c: certificate, key and client CA from PEM files, kept as generations so a
 * reload never frees what a handshake in flight may still use. */
#include "tls.h"

#include <errno.h>
#include <fcntl.h>
#include <gnutls/x509.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"

#define MAX_CHAIN  16        /* certificates in the served chain */
#define PEM_MAX    (1u << 20) /* bytes of one PEM file */

/* One generation of credentials. Never changed once published; freed only with
 * the whole api_tls. */
struct creds {
    gnutls_pcert_st chain[MAX_CHAIN];
    unsigned nchain;
    gnutls_privkey_t key;
    gnutls_x509_trust_list_t clients; /* NULL: no client certificates asked for */
    struct creds *older;
};

struct api_tls {
    char *cert, *key, *client_ca; /* the file names */
    char *client_ca_pem;          /* as read at load, for MHD */
    pthread_mutex_t lock;         /* serialises reloads */
    struct creds *all;            /* newest first */
};

/* What the gnutls callback reads; one TLS server per process. */
static _Atomic(struct creds *) current;

static int read_pem(const char *what, const char *path, gnutls_datum_t *out)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        return err_fail(errno, "%s %s: %s", what, path, strerror(errno));
    struct stat st;
    int ret = 0;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size > PEM_MAX) {
        ret = err_fail(EINVAL, "%s %s: not a regular file of at most %u bytes", what, path, PEM_MAX);
        goto out;
    }
    out->data = gnutls_malloc((size_t)st.st_size + 1);
    if (!out->data) {
        ret = err_fail(ENOMEM, "out of memory");
        goto out;
    }
    size_t len = 0;
    while (len < (size_t)st.st_size) {
        ssize_t k = read(fd, out->data + len, (size_t)st.st_size - len);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            ret = err_fail(k < 0 ? errno : EIO, "%s %s: read failed", what, path);
            gnutls_free(out->data);
            out->data = NULL;
            goto out;
        }
        len += (size_t)k;
    }
    out->data[len] = '\0';
    out->size = (unsigned)len;
out:
    close(fd);
    return ret;
}

static void creds_free(struct creds *c)
{
    for (unsigned i = 0; i < c->nchain; i++)
        gnutls_pcert_deinit(&c->chain[i]);
    if (c->key)
        gnutls_privkey_deinit(c->key);
    if (c->clients)
        gnutls_x509_trust_list_deinit(c->clients, 1);
    free(c);
}

/* Whether key is the private half of the leaf certificate's public key. */
static int key_matches(struct creds *c, const char *cert_path, const char *key_path)
{
    gnutls_pubkey_t pub;
    gnutls_datum_t a = {0}, b = {0};
    int ok = 0;
    if (gnutls_pubkey_init(&pub) < 0)
        return err_fail(ENOMEM, "out of memory");
    if (gnutls_pubkey_import_privkey(pub, c->key, 0, 0) == 0 &&
        gnutls_pubkey_export2(pub, GNUTLS_X509_FMT_DER, &a) == 0 &&
        gnutls_pubkey_export2(c->chain[0].pubkey, GNUTLS_X509_FMT_DER, &b) == 0)
        ok = a.size == b.size && !memcmp(a.data, b.data, a.size);
    gnutls_free(a.data);
    gnutls_free(b.data);
    gnutls_pubkey_deinit(pub);
    return ok ? 0 : err_fail(EINVAL, "--tls-key %s does not belong to the certificate in --tls-cert %s", key_path,
                            cert_path);
}

/* A new generation from the files of t; *ca_pem gets the client CA's text when
 * wanted (NULL otherwise). */
static int creds_read(const struct api_tls *t, struct creds **out, char **ca_pem)
{
    struct creds *c = calloc(1, sizeof *c);
    gnutls_datum_t cert = {0}, key = {0}, ca = {0};
    int ret, g;
    if (!c)
        return err_fail(ENOMEM, "out of memory");
    if ((ret = read_pem("--tls-cert", t->cert, &cert)) < 0 || (ret = read_pem("--tls-key", t->key, &key)) < 0)
        goto fail;
    c->nchain = MAX_CHAIN;
    g = gnutls_pcert_list_import_x509_raw(c->chain, &c->nchain, &cert, GNUTLS_X509_FMT_PEM,
                                          GNUTLS_X509_CRT_LIST_FAIL_IF_UNSORTED);
    if (g < 0 || !c->nchain) {
        c->nchain = 0;
        ret = err_fail(EINVAL, "--tls-cert %s: no usable PEM certificate chain (leaf first, at most %d): %s", t->cert,
                       MAX_CHAIN, g < 0 ? gnutls_strerror(g) : "empty");
        goto fail;
    }
    if ((g = gnutls_privkey_init(&c->key)) < 0 ||
        (g = gnutls_privkey_import_x509_raw(c->key, &key, GNUTLS_X509_FMT_PEM, NULL, 0)) < 0) {
        ret = err_fail(EINVAL, "--tls-key %s: not an unencrypted PEM private key: %s", t->key, gnutls_strerror(g));
        goto fail;
    }
    if ((ret = key_matches(c, t->cert, t->key)) < 0)
        goto fail;
    if (t->client_ca) {
        if ((ret = read_pem("--tls-client-ca", t->client_ca, &ca)) < 0)
            goto fail;
        if (gnutls_x509_trust_list_init(&c->clients, 0) < 0) {
            ret = err_fail(ENOMEM, "out of memory");
            goto fail;
        }
        g = gnutls_x509_trust_list_add_trust_mem(c->clients, &ca, NULL, GNUTLS_X509_FMT_PEM, 0, 0);
        if (g <= 0) {
            ret = err_fail(EINVAL, "--tls-client-ca %s: no PEM CA certificate in it%s%s", t->client_ca,
                           g < 0 ? ": " : "", g < 0 ? gnutls_strerror(g) : "");
            goto fail;
        }
        if (ca_pem) {
            *ca_pem = strdup((const char *)ca.data);
            if (!*ca_pem) {
                ret = err_fail(ENOMEM, "out of memory");
                goto fail;
            }
        }
    }
    ret = 0;
    *out = c;
    c = NULL;
fail:
    if (key.data) {
        memset(key.data, 0, key.size);
        gnutls_free(key.data);
    }
    gnutls_free(cert.data);
    gnutls_free(ca.data);
    if (c)
        creds_free(c);
    return ret;
}

int api_tls_load(const char *cert, const char *key, const char *client_ca, struct api_tls **out)
{
    struct api_tls *t = calloc(1, sizeof *t);
    if (!t)
        return err_fail(ENOMEM, "out of memory");
    pthread_mutex_init(&t->lock, NULL);
    t->cert = strdup(cert);
    t->key = strdup(key);
    t->client_ca = client_ca ? strdup(client_ca) : NULL;
    int ret;
    if (!t->cert || !t->key || (client_ca && !t->client_ca)) {
        ret = err_fail(ENOMEM, "out of memory");
        goto fail;
    }
    if ((ret = creds_read(t, &t->all, &t->client_ca_pem)) < 0)
        goto fail;
    atomic_store_explicit(&current, t->all, memory_order_release);
    *out = t;
    return 0;
fail:
    api_tls_free(t);
    return ret;
}

int api_tls_reload(struct api_tls *t)
{
    struct creds *c;
    pthread_mutex_lock(&t->lock);
    int ret = creds_read(t, &c, NULL);
    if (ret == 0) {
        c->older = t->all;
        t->all = c;
        atomic_store_explicit(&current, c, memory_order_release);
    }
    pthread_mutex_unlock(&t->lock);
    return ret;
}

const char *api_tls_client_ca_pem(const struct api_tls *t)
{
    return t->client_ca_pem;
}

int api_tls_cert_callback(gnutls_session_t session, const gnutls_datum_t *req_ca_dn, int nreqs,
                          const gnutls_pk_algorithm_t *pk_algos, int pk_algos_length, gnutls_pcert_st **pcert,
                          unsigned int *pcert_length, gnutls_privkey_t *pkey)
{
    struct creds *c = atomic_load_explicit(&current, memory_order_acquire);
    if (!c)
        return -1;
    *pcert = c->chain;
    *pcert_length = c->nchain;
    *pkey = c->key;
    return 0;
}

int api_tls_verify_client(struct api_tls *t, gnutls_session_t session)
{
    struct creds *c = atomic_load_explicit(&current, memory_order_acquire);
    if (!t || !c || !c->clients)
        return 0;
    unsigned n = 0;
    const gnutls_datum_t *raw = session ? gnutls_certificate_get_peers(session, &n) : NULL;
    if (!raw || !n)
        return err_fail(EACCES, "this server requires a client certificate");
    if (n > MAX_CHAIN)
        n = MAX_CHAIN;
    gnutls_x509_crt_t crts[MAX_CHAIN];
    unsigned have = 0, status = 0;
    int ret = 0;
    for (; have < n; have++) {
        if (gnutls_x509_crt_init(&crts[have]) < 0)
            break;
        if (gnutls_x509_crt_import(crts[have], &raw[have], GNUTLS_X509_FMT_DER) < 0) {
            gnutls_x509_crt_deinit(crts[have]);
            break;
        }
    }
    if (have < n)
        ret = err_fail(EACCES, "the client certificate cannot be read");
    else if (gnutls_x509_trust_list_verify_crt(c->clients, crts, have, 0, &status, NULL) < 0 || status)
        ret = err_fail(EACCES, "the client certificate is not valid for this server (it does not chain to "
                               "--tls-client-ca, or it has expired)");
    for (unsigned i = 0; i < have; i++)
        gnutls_x509_crt_deinit(crts[i]);
    return ret;
}

void api_tls_free(struct api_tls *t)
{
    if (!t)
        return;
    struct creds *expected = t->all;
    atomic_compare_exchange_strong(&current, &expected, NULL);
    while (t->all) {
        struct creds *c = t->all;
        t->all = c->older;
        creds_free(c);
    }
    free(t->cert);
    free(t->key);
    free(t->client_ca);
    free(t->client_ca_pem);
    pthread_mutex_destroy(&t->lock);
    free(t);
}
