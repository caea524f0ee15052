/* tls.h: the server's TLS credentials for libmicrohttpd: a certificate chain and
 * key from PEM files (and optionally a CA that client certificates must chain
 * to), handed to gnutls through a callback so that a reload (SIGHUP) takes effect
 * for new handshakes without touching open connections. */
#ifndef QCOWD_TLS_H
#define QCOWD_TLS_H

#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>

/* TLS 1.2 and 1.3 only, gnutls's default ciphers otherwise. */
#define API_TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

struct api_tls;

/* Read cert (PEM chain, leaf first), key (PEM, unencrypted) and, when client_ca
 * is not NULL, the CA bundle client certificates are verified against. The key
 * must belong to the leaf certificate. On success *out is new (api_tls_free) and
 * becomes the process's current credentials (one TLS server per process). On
 * failure *out is unchanged and the return is a negative errno with err_msg()
 * naming the file and the problem. */
int api_tls_load(const char *cert, const char *key, const char *client_ca, struct api_tls **out);

/* Read the same files again; on success new handshakes use them, on failure the
 * old ones stay and the return says why. Thread-safe against handshakes. */
int api_tls_reload(struct api_tls *t);

/* The client CA bundle as read at load (PEM, NUL-terminated) for
 * MHD_OPTION_HTTPS_MEM_TRUST, which makes libmicrohttpd ask for client
 * certificates; NULL without one. Borrowed. */
const char *api_tls_client_ca_pem(const struct api_tls *t);

/* For MHD_OPTION_HTTPS_CERT_CALLBACK: the current chain and key. */
int api_tls_cert_callback(gnutls_session_t session, const gnutls_datum_t *req_ca_dn, int nreqs,
                          const gnutls_pk_algorithm_t *pk_algos, int pk_algos_length, gnutls_pcert_st **pcert,
                          unsigned int *pcert_length, gnutls_privkey_t *pkey);

/* Whether the peer of session presented a certificate that chains to the
 * current client CA and is valid now: 0, or -EACCES with a message. 0 when no
 * client CA is configured. */
int api_tls_verify_client(struct api_tls *t, gnutls_session_t session);

/* Free every generation of credentials; no handshake may be running. */
void api_tls_free(struct api_tls *t);

#endif
