#!/bin/bash
# fuzz_regress.sh FUZZER DIR: runs every input kept in DIR (crashes, timeouts, leaks
# the fuzzers once found) through FUZZER once; any failure fails the test. Inputs
# too big to keep as files are made by make_regress.py at test time.
set -uo pipefail

fuzzer=${1:?usage: fuzz_regress.sh FUZZER DIR}
dir=${2:?}
name=$(basename "$fuzzer")
here=$(cd "$(dirname "$0")" && pwd)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
[ -d "$dir" ] && cp "$dir"/* "$tmp"/ 2>/dev/null
python3 "$here/make_regress.py" "$name" "$tmp" || { echo "make_regress.py failed"; exit 1; }
n=$(ls "$tmp" | wc -l)
[ "$n" -eq 0 ] && { echo "no regression inputs for $name"; exit 0; }
"$fuzzer" -timeout=10 -rss_limit_mb=2048 "$tmp"/* >"$tmp.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
    tail -n 60 "$tmp.log"
    echo "FAIL: $name fails on a regression input (above)"
    rm -f "$tmp.log"
    exit 1
fi
rm -f "$tmp.log"
echo "ok $name: $n regression inputs replayed: $(cd "$tmp" && ls | tr '\n' ' ')"
