#!/usr/bin/env bash
# bench_commit.sh: `qcowimg commit` against `qemu-img commit` in one run. A base of
# SIZE_MIB (all data) and an overlay of the same size with every cluster written
# (other random data) are made once; each timed run commits a fresh copy of both
# (the copy is not timed; a sync before each run), both tools in turn, best of 3.
# Both flush at the end (qemu-img's default cache mode, writeback). The results are
# compared (qemu-img compare of base and top) and checked (qemu-img check).
# Prints seconds and ratio = qcowd / QEMU; target <= 1.0. Exits non-zero only when
# a command fails or the results differ; 77 without qemu-img.
#
# usage: bench_commit.sh SIZE_MIB   (env: QCOWIMG, QEMU_IMG, TMPDIR)
set -euo pipefail
# shellcheck source=timing.sh
source "$(dirname "${BASH_SOURCE[0]}")/timing.sh"
size_mib=${1:?usage: bench_commit.sh SIZE_MIB}
qcowimg=${QCOWIMG:?set QCOWIMG}
qemu_img=${QEMU_IMG:-qemu-img}
command -v "$qemu_img" >/dev/null || { echo "bench_commit: qemu-img missing: skipped"; exit 77; }
work=$(mktemp -d "${TMPDIR:-/tmp}/bench_commit.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

head -c $((size_mib << 20)) /dev/urandom > a.raw
"$qemu_img" convert -q -f raw -O qcow2 a.raw base.qcow2
head -c $((size_mib << 20)) /dev/urandom > a.raw
# -B: only what differs from the backing file is written, here every cluster
"$qemu_img" convert -q -f raw -O qcow2 -B base.qcow2 -F qcow2 a.raw top.qcow2
rm a.raw
mkdir -p q c pristine
mv base.qcow2 top.qcow2 pristine/

fresh() { # fresh copy of the chain in $1
    cp pristine/base.qcow2 pristine/top.qcow2 "$1"/
    sync
}

best_q="" best_c=""
for _ in 1 2 3; do
    fresh q
    best_q=$(min "$best_q" "$(cd q && timed "$qemu_img" commit top.qcow2)")
    fresh c
    best_c=$(min "$best_c" "$(cd c && timed "$qcowimg" commit top.qcow2)")
done
"$qemu_img" compare -q q/base.qcow2 c/base.qcow2
"$qemu_img" compare -q q/top.qcow2 c/top.qcow2
"$qemu_img" check -q c/base.qcow2
"$qemu_img" check -q c/top.qcow2

ratio=$(printf '%.2f' "$(echo "$best_c / $best_q" | bc -l)")
verdict=$([ "$(echo "$best_c <= $best_q" | bc -l)" = 1 ] && echo "target met" || echo "target missed")
printf '%-10s %12s %12s %8s  %s\n' case "QEMU s" "qcowd s" ratio target
printf '%-10s %12.3f %12.3f %8s  %s\n' commit "$best_q" "$best_c" "$ratio" "<= 1.0: $verdict ($size_mib MiB overlay, all written)"
