#!/usr/bin/env bash
# bench_snapshot.sh: `qcowimg snapshot -c/-d` against `qemu-img snapshot -c/-d` in
# one run. One image of SIZE_GIB virtual size with ALLOC_MIB of data spread over it
# in 1 MiB pieces is made once (qemu-io); each tool works on its own copy. A round
# creates a snapshot and then deletes it, each timed (a sync before each); both
# tools in turn, best of 3 rounds. Snapshot create raises the refcount of every
# allocated cluster and copies the L1 table; delete lowers them again, so the cost
# grows with what is allocated. After each tool's rounds the image must pass
# `qemu-img check` (no leaks, no corruptions); after a final create by qcowimg,
# qemu-img must list the snapshot and read it equal to the active disk.
# Prints seconds and ratio = qcowd / QEMU; target <= 1.0. Exits non-zero only when
# a command fails or a check does; 77 without qemu-img.
#
# usage: bench_snapshot.sh SIZE_GIB ALLOC_MIB   (env: QCOWIMG, QEMU_IMG, QEMU_IO, TMPDIR)
#   full size (issue 5): bench_snapshot.sh 64 4096
set -euo pipefail
# shellcheck source=timing.sh
source "$(dirname "${BASH_SOURCE[0]}")/timing.sh"
size_gib=${1:?usage: bench_snapshot.sh SIZE_GIB ALLOC_MIB}
alloc_mib=${2:?usage: bench_snapshot.sh SIZE_GIB ALLOC_MIB}
qcowimg=${QCOWIMG:?set QCOWIMG}
qemu_img=${QEMU_IMG:-qemu-img}
qemu_io=${QEMU_IO:-qemu-io}
for t in "$qemu_img" "$qemu_io"; do
    command -v "$t" >/dev/null || { echo "bench_snapshot: $t missing: skipped"; exit 77; }
done
[[ "$size_gib" =~ ^[1-9][0-9]*$ && "$alloc_mib" =~ ^[1-9][0-9]*$ ]] ||
    { echo "bench_snapshot: SIZE_GIB and ALLOC_MIB are positive integers" >&2; exit 2; }
[ "$alloc_mib" -le $((size_gib * 1024)) ] || { echo "bench_snapshot: ALLOC_MIB > the disk" >&2; exit 2; }
work=$(mktemp -d "${TMPDIR:-/tmp}/bench_snapshot.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

# ALLOC_MIB pieces of 1 MiB at an even stride over the disk, each with its own
# pattern byte, written by one qemu-io process.
"$qemu_img" create -q -f qcow2 pristine.qcow2 "${size_gib}G"
stride=$((size_gib * 1024 / alloc_mib))
cmds=()
for ((i = 0; i < alloc_mib; i++)); do
    cmds+=(-c "write -q -P $((i % 251 + 1)) $((i * stride))M 1M")
done
"$qemu_io" -f qcow2 "${cmds[@]}" pristine.qcow2
cp pristine.qcow2 q.qcow2
cp pristine.qcow2 c.qcow2
sync

check_clean() { # the image passes qemu-img check with no leaks
    if ! "$qemu_img" check -q "$1"; then
        echo "bench_snapshot: $2: qemu-img check is not clean:" >&2
        "$qemu_img" check "$1" >&2 || true
        exit 1
    fi
}

qc="" qd="" cc="" cd=""
for round in 1 2 3; do
    sync; t=$(timed "$qemu_img" snapshot -c s1 q.qcow2); qc=$(min "$qc" "$t")
    sync; t=$(timed "$qemu_img" snapshot -d s1 q.qcow2); qd=$(min "$qd" "$t")
    sync; t=$(timed "$qcowimg" snapshot -c s1 c.qcow2); cc=$(min "$cc" "$t")
    sync; t=$(timed "$qcowimg" snapshot -d s1 c.qcow2); cd=$(min "$cd" "$t")
done
check_clean q.qcow2 "qemu-img's image after ${round} rounds"
check_clean c.qcow2 "qcowimg's image after ${round} rounds"

# qcowimg's snapshot as qemu sees it: listed, and its view equal to the disk
"$qcowimg" snapshot -c final c.qcow2
check_clean c.qcow2 "qcowimg's image with a snapshot"
"$qemu_img" snapshot -l c.qcow2 | grep -q ' final ' ||
    { echo "bench_snapshot: qemu-img does not list qcowimg's snapshot" >&2; exit 1; }
"$qemu_img" compare -q pristine.qcow2 c.qcow2 ||
    { echo "bench_snapshot: the image differs from the original" >&2; exit 1; }
"$qemu_img" convert -l snapshot.name=final -O raw c.qcow2 snap.raw
"$qemu_img" convert -O raw pristine.qcow2 orig.raw
cmp -s snap.raw orig.raw || { echo "bench_snapshot: the snapshot reads differently from the disk" >&2; exit 1; }
rm -f snap.raw orig.raw

echo "bench_snapshot: ${size_gib} GiB disk, ${alloc_mib} MiB allocated (1 MiB pieces), best of 3"
printf "%-18s %10s %10s %8s  %s\n" case "QEMU s" "qcowd s" ratio target
for row in "create $qc $cc" "delete $qd $cd"; do
    set -- $row
    r=$(echo "$3 / $2" | bc -l)
    verdict=$(echo "$r <= 1.0" | bc -l)
    printf "%-18s %10.3f %10.3f %8.2f  <= 1.0: %s\n" "snapshot $1" "$2" "$3" "$r" \
        "$([ "$verdict" = 1 ] && echo "target met" || echo "target missed")"
done
