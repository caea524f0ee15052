#!/usr/bin/env bash
# install-deps.sh: install the Debian 12 packages qcowd needs to build and run
# (--run, the default) or also to test (--test). Idempotent: does nothing when
# everything is already installed; runs apt-get update only when something is missing.
set -euo pipefail

usage() {
    echo "usage: $0 [--run|--test]" >&2
    exit 2
}

mode=run
case "${1:-}" in
"" | --run) mode="run" ;;
--test) mode="test" ;;
-h | --help) usage ;;
*) usage ;;
esac
[ $# -le 1 ] || usage

# Build and run: compiler, CMake, the libraries the tree links, and qemu-img
# (make run creates its sample image with it; the interop tests compare against it).
run_pkgs=(
    cmake make gcc pkg-config
    zlib1g-dev libzstd-dev libgnutls28-dev libjansson-dev libmicrohttpd-dev libcurl4-gnutls-dev
    qemu-utils
)
# Tests: clang with its sanitizer and libFuzzer runtime, Check, Debian's python3
# (script tests use /usr/bin/python3), /usr/bin/time, bc (benchmarks) and nbdinfo
# (libnbd-bin: reads dirty bitmaps through qemu-nbd)
test_pkgs=(clang libclang-rt-14-dev check python3 python3-yaml python3-jsonschema time bc libnbd-bin nginx wrk
    openssl curl)
# The clients' tests: pip installs clients/python offline (setuptools its build backend,
# wheel for setuptools' bdist_wheel); groff renders the qcowctl man page.
test_pkgs+=(python3-pip python3-setuptools python3-wheel groff-base)
# The S3 tests: OpenStack Swift with s3api as a local, strict S3 server (tests/s3);
# boto3 is what bench_s3.sh compares qcowd with.
test_pkgs+=(swift swift-proxy swift-account swift-container swift-object python3-swift memcached python3-boto3)
# The web dashboard tests (tests/web): Debian's Chromium driven by playwright-core from
# npm. Node and npm come from Debian unless a node with npm is already there (an
# upstream nodejs package bundles npm and conflicts with Debian's).
test_pkgs+=(chromium fonts-dejavu-core)
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    test_pkgs+=(nodejs npm)
fi

want=("${run_pkgs[@]}")
[ "$mode" = test ] && want+=("${test_pkgs[@]}")

installed() {
    dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

# The npm packages of the web dashboard tests, from their lockfile (npm ci), once per
# lockfile: a copy of it in node_modules marks an install that is complete.
npm_deps() {
    [ "$mode" = test ] || return 0
    local dir
    dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/web"
    if cmp -s "$dir/package-lock.json" "$dir/node_modules/.qcowd-lock.json"; then
        echo "install-deps: the npm packages of tests/web are installed"
        return 0
    fi
    echo "install-deps: npm ci in tests/web"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$dir/package-lock.json" "$dir/node_modules/.qcowd-lock.json"
}

missing=()
for p in "${want[@]}"; do
    installed "$p" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all ${#want[@]} packages for --$mode are installed"
    npm_deps
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "install-deps: missing packages (${missing[*]}), not root and no sudo: install them and re-run" >&2
    exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"

still=()
for p in "${missing[@]}"; do
    installed "$p" || still+=("$p")
done
if [ ${#still[@]} -ne 0 ]; then
    echo "install-deps: still missing after apt-get install: ${still[*]}" >&2
    exit 1
fi
npm_deps
echo "install-deps: done"
