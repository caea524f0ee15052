#!/usr/bin/env bash
# bench_http.sh SIZE_MIB: qcowd's HTTP data path against nginx, side by side in one run.
#
# On a SIZE_MIB qcow2 of random data (64 KiB clusters), served by qcowd, and the same
# bytes as a raw file served by nginx (a temporary config on a loopback port), wrk
# measures (random offsets, aligned to the request size, a Lua script per point):
#   GET 1 MiB ranges   at 1, 8, 64 connections: MiB/s, qcowd/nginx ratio (target >= 0.8)
#   GET 4 KiB ranges   at 1, 8, 64 connections: req/s, ratio (target >= 0.7)
#   how many of qcowd's answers went out with sendfile (ranges from 32 KiB up that
#                      are one run of the image file)
#   qcowd's peak RSS (VmHWM) after the 64-connection reads (target < 100 MiB)
#   PUT 1 MiB ranges   qcowd only: MiB/s with flush=n at 1 and 8 connections, flush=y at 1
#   TLS GET 1 MiB      a second qcowd with --tls-cert on the same catalog, against plain
#                      qcowd (ratio TLS/plain; wrk speaks TLS; skipped without openssl)
#   empty 1 TiB copy   a client asks /extents, reads only the data ranges into a sparse
#                      raw file; timed against `qemu-img convert -O raw` (target < 1 s)
# and checks what it measured: no non-2xx answer, the extents copy of the data image
# equals the raw bytes, the 1 TiB copy has the right size and no data.
#
# Environment: QCOWD (required), QEMU_IMG, NGINX, WRK, PYTHON (default /usr/bin/python3),
# BENCH_SECONDS (per point, default 5), QCOWD_THREADS (default: qcowd's own),
# BENCH_STRICT=1 (also fail when a target is missed).
# Exit: 0 when everything ran and checked out, 1 on a failure, 77 when nginx, wrk or
# qemu-img is missing.
set -euo pipefail

SIZE_MIB=${1:-1024}
SECS=${BENCH_SECONDS:-5}
QEMU_IMG=${QEMU_IMG:-qemu-img}
NGINX=${NGINX:-nginx}
WRK=${WRK:-wrk}
PYTHON=${PYTHON:-/usr/bin/python3}
HERE=$(cd "$(dirname "$0")" && pwd)
CLIENT_DIR=$HERE/../../clients/python

[[ "$SIZE_MIB" =~ ^[0-9]+$ ]] && [ "$SIZE_MIB" -ge 2 ] || { echo "usage: $0 SIZE_MIB (>= 2)" >&2; exit 2; }
[ -n "${QCOWD:-}" ] && [ -x "$QCOWD" ] || { echo "bench_http: QCOWD must name the qcowd binary" >&2; exit 1; }
for t in "$NGINX" "$WRK" "$QEMU_IMG"; do
    if ! command -v "$t" >/dev/null 2>&1; then
        echo "skip: $t is not installed (Debian packages nginx, wrk, qemu-utils)"
        exit 77
    fi
done

tmp=$(mktemp -d /tmp/bench-http.XXXXXX)
qpid= npid= tpid=
cleanup() {
    [ -n "$qpid" ] && kill "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null || true
    [ -n "$tpid" ] && kill "$tpid" 2>/dev/null && wait "$tpid" 2>/dev/null || true
    [ -n "$npid" ] && kill "$npid" 2>/dev/null && wait "$npid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
chmod 755 "$tmp" # nginx's workers may run as another user

# failures are lines in a file: fail may run in a $(...) subshell
fail() {
    echo "FAIL: $*" >&2
    echo "$*" >>"$tmp/failures"
}
now() { date +%s.%N; }
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ---- the data ----
mkdir -p "$tmp/catalog" "$tmp/www"
head -c $((SIZE_MIB << 20)) /dev/urandom >"$tmp/www/disk.raw"
chmod 644 "$tmp/www/disk.raw"
"$QEMU_IMG" convert -q -f raw -O qcow2 -o cluster_size=65536 "$tmp/www/disk.raw" "$tmp/catalog/disk.qcow2"
"$QEMU_IMG" create -q -f qcow2 "$tmp/catalog/empty.qcow2" 1T
size=$((SIZE_MIB << 20))

# ---- the servers ----
qargs=(--listen 127.0.0.1:0 --catalog "$tmp/catalog" --quiet)
[ -n "${QCOWD_THREADS:-}" ] && qargs+=(--threads "$QCOWD_THREADS")
# listen_port LOG PID: the port qcowd (pid PID) says it listens on in LOG, once it
# does (http or https); empty when it dies or does not say so within 10 s
listen_port() {
    local port=
    for _ in $(seq 1 200); do
        port=$(sed -n 's|.*listening on https\{0,1\}://127\.0\.0\.1:\([0-9]*\)/.*|\1|p' "$1" | head -1)
        [ -n "$port" ] && break
        kill -0 "$2" 2>/dev/null || break
        sleep 0.05
    done
    echo "$port"
}
"$QCOWD" "${qargs[@]}" 2>"$tmp/qcowd.log" &
qpid=$!
qport=$(listen_port "$tmp/qcowd.log" "$qpid")
[ -n "$qport" ] || { cat "$tmp/qcowd.log" >&2; echo "bench_http: qcowd did not start" >&2; exit 1; }

nport=$(free_port)
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes auto;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path $tmp/nginx/body;
    proxy_temp_path $tmp/nginx/proxy;
    fastcgi_temp_path $tmp/nginx/fastcgi;
    uwsgi_temp_path $tmp/nginx/uwsgi;
    scgi_temp_path $tmp/nginx/scgi;
    types { application/octet-stream raw; }
    server {
        listen 127.0.0.1:$nport;
        root $tmp/www;
    }
}
EOF
"$NGINX" -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" 2>"$tmp/nginx/stderr.log" &
npid=$!
for _ in $(seq 1 200); do
    curl -s -o /dev/null -r 0-0 "http://127.0.0.1:$nport/disk.raw" 2>/dev/null && break
    kill -0 "$npid" 2>/dev/null || break
    sleep 0.05
done
kill -0 "$npid" 2>/dev/null || { cat "$tmp/nginx/stderr.log" "$tmp/nginx/error.log" >&2 || true; echo "bench_http: nginx did not start" >&2; exit 1; }

QURL=http://127.0.0.1:$qport/v1/images/disk/data
NURL=http://127.0.0.1:$nport/disk.raw

# both serve the same bytes
for off in 0 $((size / 2 + 4096)) $((size - 4096)); do
    a=$(curl -s -r "$off-$((off + 4095))" "$QURL" | md5sum)
    b=$(curl -s -r "$off-$((off + 4095))" "$NURL" | md5sum)
    [ "$a" = "$b" ] || fail "qcowd and nginx differ at offset $off"
done

# ---- wrk ----
cat >"$tmp/get.lua" <<'EOF'
-- random aligned ranges of BS bytes in a disk of SIZE bytes (both from the env)
local size = tonumber(os.getenv("BENCH_SIZE"))
local bs = tonumber(os.getenv("BENCH_BS"))
local n = math.floor(size / bs)
local counter = 0
function setup(thread)
    counter = counter + 1
    thread:set("id", counter)
end
function init(args)
    math.randomseed(os.time() * 1000 + id * 7919)
end
function request()
    local off = math.random(0, n - 1) * bs
    return wrk.format("GET", nil, { ["Range"] = "bytes=" .. off .. "-" .. (off + bs - 1) })
end
EOF
cat >"$tmp/put.lua" <<'EOF'
-- PUT of BS bytes at random aligned offsets, with Content-Range
local size = tonumber(os.getenv("BENCH_SIZE"))
local bs = tonumber(os.getenv("BENCH_BS"))
local n = math.floor(size / bs)
local counter = 0
function setup(thread)
    counter = counter + 1
    thread:set("id", counter)
end
function init(args)
    math.randomseed(os.time() * 1000 + id * 7919)
    local t = {}
    for i = 1, 256 do t[i] = string.char(math.random(0, 255)) end
    body = string.rep(table.concat(t), bs / 256)
end
function request()
    local off = math.random(0, n - 1) * bs
    return wrk.format("PUT", nil, { ["Content-Range"] = "bytes " .. off .. "-" .. (off + bs - 1) .. "/*",
        ["Content-Type"] = "application/octet-stream" }, body)
end
EOF

# wrk_run SCRIPT BS CONNS URL -> prints "REQS_PER_SEC"; fails on errors or non-2xx
wrk_run() {
    local script=$1 bs=$2 conns=$3 url=$4 threads=2 out
    [ "$conns" -lt 2 ] && threads=1
    out=$(BENCH_SIZE=$size BENCH_BS=$bs "$WRK" -t "$threads" -c "$conns" -d "${SECS}s" --timeout 30s \
        -s "$tmp/$script" "$url" 2>&1) || { fail "wrk $script $bs c=$conns $url: $out"; echo 0; return; }
    if grep -q "Non-2xx" <<<"$out"; then
        fail "wrk $script $bs c=$conns $url: $(grep Non-2xx <<<"$out")"
    fi
    if grep -q "Socket errors" <<<"$out"; then
        fail "wrk $script $bs c=$conns $url: $(grep 'Socket errors' <<<"$out")"
    fi
    local rps
    rps=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' <<<"$out")
    echo "${rps:-0}"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
mibs() { awk -v r="$1" -v bs="$2" 'BEGIN { printf "%.0f", r * bs / 1048576 }'; }
meets() { awk -v r="$1" -v t="$2" 'BEGIN { exit !(r != "n/a" && r + 0 >= t) }'; }
verdict() { # verdict RATIO TARGET (runs in a subshell: misses are counted from the rows)
    if meets "$1" "$2"; then echo "ok"; else echo "below"; fi
}

rows=()
row() { rows+=("$(printf '%-28s %14s %14s %8s %8s %6s' "$@")"); }

echo "bench_http: ${SIZE_MIB} MiB image, ${SECS} s per point, qcowd :$qport, nginx :$nport, $(nproc) cores"
for bs in 1048576 4096; do
    for c in 1 8 64; do
        q=$(wrk_run get.lua $bs $c "$QURL")
        n=$(wrk_run get.lua $bs $c "$NURL")
        r=$(ratio "$q" "$n")
        if [ $bs = 1048576 ]; then
            row "GET 1 MiB, c=$c (MiB/s)" "$(mibs "$q" $bs)" "$(mibs "$n" $bs)" "$r" ">=0.8" "$(verdict "$r" 0.8)"
        else
            row "GET 4 KiB, c=$c (req/s)" "$(printf %.0f "$q")" "$(printf %.0f "$n")" "$r" ">=0.7" "$(verdict "$r" 0.7)"
        fi
        echo "  ${rows[-1]}"
    done
done
# how the 1 MiB answers went out: sendfile (one run of a file) or copied
sent=$(curl -s "http://127.0.0.1:$qport/metrics" | awk '$1 == "qcowd_http_sendfile_responses_total" { print $2 }')
row "GETs sent with sendfile (count)" "${sent:-?}" "-" "-" "-" "-"
echo "  ${rows[-1]}"
hwm_kib=$(awk '/^VmHWM:/ { print $2 }' "/proc/$qpid/status")
hwm=$((hwm_kib / 1024))
if [ "$hwm" -lt 100 ]; then v=ok; else v=below; fi
row "qcowd peak RSS, 64 clients" "${hwm} MiB" "-" "-" "<100MiB" "$v"
echo "  ${rows[-1]}"

# ---- the same 1 MiB GETs over TLS (a second qcowd on the catalog, --tls-cert) ----
if command -v openssl >/dev/null 2>&1; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench \
        -addext "subjectAltName=IP:127.0.0.1" -keyout "$tmp/tls.key" -out "$tmp/tls.pem" 2>/dev/null
    targs=(--listen 127.0.0.1:0 --catalog "$tmp/catalog" --quiet --tls-cert "$tmp/tls.pem" --tls-key "$tmp/tls.key")
    [ -n "${QCOWD_THREADS:-}" ] && targs+=(--threads "$QCOWD_THREADS")
    "$QCOWD" "${targs[@]}" 2>"$tmp/qcowd-tls.log" &
    tpid=$!
    tport=$(listen_port "$tmp/qcowd-tls.log" "$tpid")
    if [ -z "$tport" ]; then
        cat "$tmp/qcowd-tls.log" >&2
        fail "qcowd with TLS did not start"
    else
        TURL=https://127.0.0.1:$tport/v1/images/disk/data
        a=$(curl -s --cacert "$tmp/tls.pem" -r 4096-8191 "$TURL" | md5sum)
        b=$(curl -s -r 4096-8191 "$QURL" | md5sum)
        [ "$a" = "$b" ] || fail "qcowd over TLS serves other bytes"
        for c in 1 8 64; do
            t=$(wrk_run get.lua 1048576 $c "$TURL")
            q=$(wrk_run get.lua 1048576 $c "$QURL")
            row "TLS GET 1 MiB, c=$c (MiB/s)" "$(mibs "$t" 1048576)" "plain $(mibs "$q" 1048576)" "$(ratio "$t" "$q")" "-" "-"
            echo "  ${rows[-1]}"
        done
    fi
    kill "$tpid" 2>/dev/null && wait "$tpid" 2>/dev/null || true
    tpid=
fi

# ---- copy through /extents ----
cat >"$tmp/extcopy.py" <<'EOF'
# extcopy.py URL NAME OUT: copies an image to a sparse raw file, reading only the
# ranges /extents reports as data (zero runs stay holes).
import os, sys
sys.dont_write_bytecode = True
sys.path.insert(0, os.environ["CLIENT_DIR"])
from qcowd_client import Client
url, name, out = sys.argv[1:4]
c = Client(url)
exts = c.extents(name)
size = exts[-1]["start"] + exts[-1]["length"] if exts else 0
CH = 8 << 20
with open(out, "wb") as f:
    f.truncate(size)
    for e in exts:
        if e["zero"]:
            continue
        pos, end = e["start"], e["start"] + e["length"]
        while pos < end:
            n = min(CH, end - pos)
            data = c.read(name, pos, n)
            if len(data) != n:
                sys.exit("short read at %d" % pos)
            f.seek(pos)
            f.write(data)
            pos += n
print(sum(e["length"] for e in exts if not e["zero"]))
EOF
export CLIENT_DIR
# correctness of the copier on the data image first
t0=$(now)
"$PYTHON" "$tmp/extcopy.py" "http://127.0.0.1:$qport" disk "$tmp/disk.copy" >/dev/null || fail "extents copy of disk"
t1=$(now)
cmp -s "$tmp/disk.copy" "$tmp/www/disk.raw" || fail "the extents copy of disk differs from the raw bytes"
dcopy=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", '"$SIZE_MIB"' / (b - a) }')
rm -f "$tmp/disk.copy"
row "extents copy, ${SIZE_MIB} MiB data (MiB/s)" "$dcopy" "-" "-" "-" "-"
echo "  ${rows[-1]}"

t0=$(now)
dataout=$("$PYTHON" "$tmp/extcopy.py" "http://127.0.0.1:$qport" empty "$tmp/empty.copy") || fail "extents copy of empty"
t1=$(now)
"$QEMU_IMG" convert -f qcow2 -O raw "$tmp/catalog/empty.qcow2" "$tmp/empty.qemu.raw"
t2=$(now)
[ "$(stat -c %s "$tmp/empty.copy")" = $((1 << 40)) ] || fail "the 1 TiB copy has size $(stat -c %s "$tmp/empty.copy")"
[ "${dataout:-x}" = 0 ] || fail "the 1 TiB copy read $dataout data bytes"
[ "$(stat -c %b "$tmp/empty.copy")" -lt 1024 ] || fail "the 1 TiB copy is not sparse"
tcopy=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
tqemu=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.3f", b - a }')
rm -f "$tmp/empty.copy" "$tmp/empty.qemu.raw"
if awk -v t="$tcopy" 'BEGIN { exit !(t < 1) }'; then v=ok; else v=below; fi
row "empty 1 TiB copy (s)" "$tcopy" "qemu $tqemu" "$(ratio "$tcopy" "$tqemu")" "<1s" "$v"
echo "  ${rows[-1]}"

# PUTs last: they change the data image
for spec in "n 1" "n 8" "y 1"; do
    set -- $spec
    q=$(wrk_run put.lua 1048576 "$2" "$QURL?flush=$1")
    row "PUT 1 MiB, c=$2, flush=$1 (MiB/s)" "$(mibs "$q" 1048576)" "-" "-" "-" "-"
    echo "  ${rows[-1]}"
done

kill -0 "$qpid" 2>/dev/null || fail "qcowd died"
kill "$qpid"
wait "$qpid" || fail "qcowd exited $? on SIGTERM"
qpid=
"$QEMU_IMG" check -q "$tmp/catalog/disk.qcow2" || fail "qemu-img check after the PUTs"

echo
printf '%-28s %14s %14s %8s %8s %6s\n' "point" "qcowd" "nginx" "ratio" "target" "meets"
printf '%s\n' "${rows[@]}"
echo
missed=$(printf '%s\n' "${rows[@]}" | grep -c ' below$' || true)
failures=0
[ -f "$tmp/failures" ] && failures=$(wc -l <"$tmp/failures")
echo "bench_http: $failures failure(s), $missed target(s) missed"
[ "$failures" -eq 0 ] || exit 1
if [ "${BENCH_STRICT:-0}" = 1 ] && [ "$missed" -ne 0 ]; then exit 1; fi
exit 0
