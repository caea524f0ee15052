#!/usr/bin/env bash
# bench_convert.sh: time `qcowimg convert -O raw` against `qemu-img convert -O raw`
# on (a) a fully allocated qcow2 of random data and (b) a zstd-compressed qcow2 of
# compressible data, check both produce the same bytes, and print a table.
#
# usage: bench_convert.sh SIZE_MIB [QCOWIMG]
#   QCOWIMG   the qcowimg binary (argument or environment; required)
#   QEMU_IMG  the qemu-img binary (environment; default: qemu-img on PATH)
#   TMPDIR    where the images go; needs about 4 x SIZE_MIB of free space
#
# Each command runs once untimed (to warm the page cache equally), then three
# timed runs alternating between the two tools; the best of three counts.
# The targets (a: ratio <= 1.0, b: ratio <= 0.5, ratio = qcowimg / qemu-img) are
# reported, not enforced: the exit status is 0 unless a command fails or the
# outputs differ. Exit 77 (skip) when qemu-img is missing.
set -euo pipefail

die() {
    echo "bench_convert: $*" >&2
    exit 1
}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    die "usage: bench_convert.sh SIZE_MIB [QCOWIMG]"
fi
size_mib=$1
[[ "$size_mib" =~ ^[1-9][0-9]*$ ]] || die "SIZE_MIB must be a positive integer, not '$size_mib'"
qcowimg=${2:-${QCOWIMG:-}}
[ -n "$qcowimg" ] || die "set QCOWIMG or pass the qcowimg binary as the second argument"
[ -x "$qcowimg" ] || die "$qcowimg is not an executable"
qemu_img=${QEMU_IMG:-qemu-img}
if ! command -v "$qemu_img" >/dev/null 2>&1; then
    echo "bench_convert: $qemu_img not found: skipped" >&2
    exit 77
fi

size=$((size_mib * 1024 * 1024))
runs=3

work=$(mktemp -d "${TMPDIR:-/tmp}/bench_convert.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Free space check: the source raw, the qcow2 and two outputs at most at once.
need_kib=$((size * 4 / 1024 + 65536))
avail_kib=$(df -Pk "$work" | awk 'NR == 2 { print $4 }')
[ "$avail_kib" -ge "$need_kib" ] ||
    die "$work has ${avail_kib} KiB free, the benchmark needs about ${need_kib} KiB"

now_ns() {
    date +%s%N
}

# run_timed CMD...: run CMD and set elapsed_ns to its wall time. Its output is
# shown only when it fails.
elapsed_ns=0
run_timed() {
    local t0 t1 log="$work/cmd.log"
    # Start every run with no dirty pages: otherwise the run that follows the other
    # tool's 1 GiB of output pays for its writeback (dirty throttling), and the
    # order, not the tool, decides the ratio.
    sync
    t0=$(now_ns)
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        die "command failed: $*"
    fi
    t1=$(now_ns)
    elapsed_ns=$((t1 - t0))
}

# The compressible data: text records with a counter and a short random token,
# so zstd gets roughly 2-3x but not the runaway ratio of repeated blocks.
make_text() {
    local file=$1 bytes=$2
    local line_len=56 # "record %010.0f name=qcowd status=ok " (39) + 16 base64 + "\n"
    local lines=$((bytes / line_len + 1))
    paste -d '' \
        <(seq -f 'record %010.0f name=qcowd status=ok ' 1 "$lines") \
        <(head -c $((lines * 12)) /dev/urandom | base64 -w 16) >"$file"
    local got
    got=$(stat -c %s "$file")
    [ "$got" -ge "$bytes" ] || die "generated $got bytes of text, wanted $bytes"
    truncate -s "$bytes" "$file"
}

declare -a rows=()
status=0

# bench_case NAME TARGET: convert $work/src.qcow2 with both tools and compare
# against $work/src.raw.
bench_case() {
    local name=$1 target=$2
    local src="$work/src.qcow2" ref="$work/src.raw"
    local out_q="$work/out.qemu.raw" out_c="$work/out.qcowimg.raw"
    local qemu_cmd=("$qemu_img" convert -f qcow2 -O raw "$src" "$out_q")
    local qcow_cmd=("$qcowimg" convert -f qcow2 -O raw "$src" "$out_c")
    local best_q="" best_c="" i

    # Every run starts with no output file on disk: a run that writes while the
    # other tool's 1 GiB output is still cached was measured 3-4 times slower here
    # (whichever tool went second), which would time the page cache, not the tools.
    # The outputs are checked after the timed rounds, by one more run of each.
    run_timed "${qemu_cmd[@]}" # warm-up, untimed
    rm -f "$out_q"
    run_timed "${qcow_cmd[@]}"
    rm -f "$out_c"
    for ((i = 0; i < runs; i++)); do
        rm -f "$out_q" "$out_c"
        run_timed "${qemu_cmd[@]}"
        if [ -z "$best_q" ] || [ "$elapsed_ns" -lt "$best_q" ]; then best_q=$elapsed_ns; fi
        rm -f "$out_q"
        run_timed "${qcow_cmd[@]}"
        if [ -z "$best_c" ] || [ "$elapsed_ns" -lt "$best_c" ]; then best_c=$elapsed_ns; fi
        rm -f "$out_c"
    done
    run_timed "${qemu_cmd[@]}"
    run_timed "${qcow_cmd[@]}"

    local same=yes
    if ! cmp -s "$out_q" "$out_c"; then
        echo "bench_convert: case $name: qcowimg's output differs from qemu-img's:" >&2
        cmp "$out_q" "$out_c" >&2 || true
        same=no
        status=1
    elif ! cmp -s "$ref" "$out_c"; then
        echo "bench_convert: case $name: the converted disk differs from the source data:" >&2
        cmp "$ref" "$out_c" >&2 || true
        same=no
        status=1
    fi

    local img_kib
    img_kib=$(($(stat -c %s "$src") / 1024))
    rows+=("$(awk -v n="$name" -v q="$best_q" -v c="$best_c" -v tgt="$target" -v same="$same" -v kib="$img_kib" 'BEGIN {
        qs = q / 1e9; cs = c / 1e9; r = (qs > 0) ? cs / qs : 0
        verdict = (same != "yes") ? "OUTPUT DIFFERS" : (r <= tgt ? "target met" : "target missed")
        printf "%-24s %10d %11.3f %11.3f %7.2f   <= %-4.2f  %s\n", n, kib, qs, cs, r, tgt, verdict
    }')")
    rm -f "$src" "$ref" "$out_q" "$out_c"
}

echo "bench_convert: ${size_mib} MiB, best of ${runs} after one warm-up run each"
echo "  qemu-img: $(command -v "$qemu_img") ($("$qemu_img" --version | head -n 1))"
echo "  qcowimg:  $qcowimg"

# (a) fully allocated, incompressible
head -c "$size" /dev/urandom >"$work/src.raw"
"$qemu_img" convert -f raw -O qcow2 "$work/src.raw" "$work/src.qcow2"
bench_case "a: random, allocated" 1.0

# (b) zstd-compressed, compressible
make_text "$work/src.raw" "$size"
"$qemu_img" convert -c -f raw -O qcow2 -o compression_type=zstd "$work/src.raw" "$work/src.qcow2"
bench_case "b: text, zstd" 0.5

echo
printf '%-24s %10s %11s %11s %7s   %-7s  %s\n' case "qcow2 KiB" "qemu-img s" "qcowimg s" ratio target result
for r in "${rows[@]}"; do
    printf '%s\n' "$r"
done
echo "(ratio = qcowimg seconds / qemu-img seconds; lower is better)"

if [ "$status" -ne 0 ]; then
    echo "bench_convert: FAILED: outputs differ" >&2
fi
exit "$status"
