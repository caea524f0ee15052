#!/bin/bash
# fuzz_smoke.sh FUZZER SEED_SCRIPT ARTIFACT_DIR [SECONDS [KIND [FUZZER ARGS...]]]: makes a
# seed corpus of KIND (seed_corpus.sh) in a temporary folder and fuzzes for a bounded
# time. Any crash, leak, timeout or out-of-memory fails the test; the input that caused
# it is kept in ARTIFACT_DIR. The last line gives the executions and their rate.
set -uo pipefail

fuzzer=${1:?usage: fuzz_smoke.sh FUZZER SEED_SCRIPT ARTIFACT_DIR [SECONDS [KIND [ARGS...]]]}
seeds=${2:?}
artifacts=${3:?}
secs=${4:-60}
kind=${5:-images}
shift $(($# < 5 ? $# : 5))
name=$(basename "$fuzzer")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/seeds" "$tmp/corpus" "$artifacts"

bash "$seeds" "$tmp/seeds" "$kind"
rc=$?
[ $rc -eq 77 ] && { echo "skipped: no qemu-img"; exit 77; }
[ $rc -ne 0 ] && { echo "seed_corpus.sh failed ($rc)"; exit 1; }
echo "seeds: $(ls "$tmp/seeds" | wc -l) files, $(du -sk "$tmp/seeds" | cut -f1) KiB"

# New inputs go to the first folder (thrown away); seeds are read from the second.
"$fuzzer" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "$@" "$tmp/corpus" "$tmp/seeds" >"$tmp/log" 2>&1
rc=$?
if [ "$rc" -ne 0 ]; then
    tail -n 100 "$tmp/log"
    echo "FAIL: fuzzer exited $rc; reproduce with: $fuzzer $artifacts/<crash-|leak-|timeout-|oom-file>"
    echo "then keep the input as a regression test in tests/fuzz/regress/$name/"
    ls -l "$artifacts" >&2
    exit 1
fi
grep -E "INITED|DONE|stat::" "$tmp/log"
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$tmp/log")
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$tmp/log")
echo "ok $name: no crash in ${secs}s, $runs executions ($rate exec/s)"
