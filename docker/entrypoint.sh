#!/bin/sh
# entrypoint.sh: qcowd in the container, over TLS and with bearer tokens.
#
# Secrets live in $QCOWD_SECRETS (default /data/.qcowd, in the volume, mode 0700).
# On the first start, what is not given is made there:
#   tls.pem, tls.key   a self-signed certificate for $QCOWD_PUBLIC_NAME (default
#                      localhost) and 127.0.0.1; replace both files with your own and
#                      send SIGHUP (docker kill -s HUP) to reload them
#   tokens             the token file, with one admin token whose secret is written
#                      once to admin.token (read it with docker exec ... cat) and never
#                      logged
# QCOWD_TLS_CERT, QCOWD_TLS_KEY and QCOWD_TOKENS name files of your own instead.
# Arguments are passed on to qcowd (e.g. --cors-origin https://dash.example);
# QCOWD_LISTEN (default 0.0.0.0:8443) and QCOWD_CATALOG (default /data) set the rest.
set -eu

secrets=${QCOWD_SECRETS:-/data/.qcowd}
name=${QCOWD_PUBLIC_NAME:-localhost}
umask 077
mkdir -p "$secrets"
chmod 700 "$secrets"

cert=${QCOWD_TLS_CERT:-$secrets/tls.pem}
key=${QCOWD_TLS_KEY:-$secrets/tls.key}
if [ ! -s "$cert" ] || [ ! -s "$key" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
        -keyout "$key.tmp" -out "$cert.tmp" -subj "/CN=$name" \
        -addext "subjectAltName=DNS:$name,DNS:localhost,IP:127.0.0.1" 2>/dev/null
    mv "$key.tmp" "$key"
    mv "$cert.tmp" "$cert"
    echo "qcowd: made a self-signed TLS certificate for $name in $cert (replace it with your own)" >&2
fi

tokens=${QCOWD_TOKENS:-$secrets/tokens}
if [ ! -s "$tokens" ]; then
    out=$(qcowd token new admin admin)
    printf '%s\n' "$out" | sed -n 1p >"$secrets/admin.token"
    printf '# NAME ROLE sha256:HEX (qcowd token new NAME ROLE makes a line)\n%s\n' \
        "$(printf '%s\n' "$out" | sed -n 2p)" >"$tokens"
    echo "qcowd: made $tokens with one admin token; its secret is in $secrets/admin.token" >&2
fi

exec qcowd --listen "${QCOWD_LISTEN:-0.0.0.0:8443}" --catalog "${QCOWD_CATALOG:-/data}" \
    --tls-cert "$cert" --tls-key "$key" --tokens "$tokens" --public-name "$name" "$@"
