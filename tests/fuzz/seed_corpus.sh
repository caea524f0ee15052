#!/bin/bash
# seed_corpus.sh DIR [KIND]: writes a small seed corpus into DIR for one fuzz target.
# images (default, fuzz_open_read): qcow2 images made by qemu-img and qemu-io (small
#   clusters and disks keep each seed a few KiB to ~100 KiB): v2, v3, extended L2, zlib
#   and zstd compressed, internal snapshot, persistent bitmap, zero clusters, an
#   overlay naming a backing file, an external data file image.
# ops (fuzz_engine_ops): images with several snapshots, bitmaps, extended L2,
#   compressed clusters, a dirty bit, an overlay packed with its backing file, each
#   followed by op scripts (the input format is in fuzz_engine_ops.c).
# tar (fuzz_tar): small tar archives of three formats and a cut one.
# http (fuzz_http_parse), s3xml (fuzz_s3_xml): text, no qemu needed. api (fuzz_api): requests, and small
#   images (of the ops kind) followed by requests on them.
# Environment: QEMU_IMG, QEMU_IO (default qemu-img, qemu-io). Exits 77 without them.
set -euo pipefail

out=${1:?usage: seed_corpus.sh DIR [images|ops|http|api|s3xml]}
kind=${2:-images}
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
case $kind in
http | s3xml)
    exec python3 "$here/seed_text.py" "$kind" "$out"
    ;;
tar) # fuzz_tar: archives made by tar (ustar, gnu with a long name, pax), no qemu needed
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    cd "$work"
    printf 'QFI\xfb-not-really-an-image' >a.qcow2
    head -c 3000 /dev/zero | tr '\0' 'x' >b.qcow2
    mkdir sub && echo inner >sub/c.qcow2
    touch empty.qcow2 "$(printf 'n%.0s' $(seq 1 120)).qcow2"
    tar --format=ustar -cf "$out/ustar.tar" a.qcow2 b.qcow2 sub empty.qcow2
    tar --format=gnu -cf "$out/gnu.tar" a.qcow2 n*.qcow2
    tar --format=pax -cf "$out/pax.tar" b.qcow2 a.qcow2
    head -c 700 "$out/ustar.tar" >"$out/cut.tar"
    exit 0
    ;;
api) # requests; with qemu-img also small images served as "h" with requests on them
    python3 "$here/seed_text.py" api "$out"
    command -v "$QEMU_IMG" >/dev/null && command -v "$QEMU_IO" >/dev/null || exit 0
    ;;
images | ops) ;;
*)
    echo "seed_corpus.sh: unknown kind $kind" >&2
    exit 2
    ;;
esac
command -v "$QEMU_IMG" >/dev/null && command -v "$QEMU_IO" >/dev/null || {
    echo "seed_corpus.sh: qemu-img/qemu-io not found" >&2
    exit 77
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

img() { "$QEMU_IMG" "$@" >/dev/null; }
io() { local f=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done; "$QEMU_IO" -f qcow2 "${a[@]}" "$f" >/dev/null; }

# v2, 512-byte clusters.
img create -f qcow2 -o compat=0.10,cluster_size=512 v2.qcow2 1M
io v2.qcow2 "write -P 0x11 0 1k" "write -P 0x22 300k 512"

# v3, 4 KiB clusters, data, a zero cluster, a discarded cluster, lazy refcounts.
img create -f qcow2 -o cluster_size=4k,lazy_refcounts=on v3.qcow2 4M
io v3.qcow2 "write -P 0x33 0 8k" "write -z 64k 4k" "write -P 0x44 1M 4k" "discard 1M 4k" "write -P 0x55 3M 6k"

# Extended L2 entries (16 KiB clusters at least): subcluster writes and zeroes.
img create -f qcow2 -o cluster_size=16k,extended_l2=on extl2.qcow2 2M
io extl2.qcow2 "write -P 0x66 512 512" "write -P 0x67 16k 2k" "write -z 40k 1k"

# Compressed clusters, zlib and zstd.
img create -f raw src.raw 256k
"$QEMU_IO" -f raw -c "write -P 0x77 0 64k" -c "write -P 0x78 100k 20k" src.raw >/dev/null
img convert -c -f raw -O qcow2 -o cluster_size=4k src.raw zlib.qcow2
img convert -c -f raw -O qcow2 -o cluster_size=4k,compression_type=zstd src.raw zstd.qcow2

# Internal snapshot, then the active layer diverges.
img create -f qcow2 -o cluster_size=4k snap.qcow2 1M
io snap.qcow2 "write -P 0x88 0 8k"
img snapshot -c s1 snap.qcow2
io snap.qcow2 "write -P 0x99 4k 8k"

# Persistent bitmap.
img create -f qcow2 -o cluster_size=4k bitmap.qcow2 1M
img bitmap --add bitmap.qcow2 b0
io bitmap.qcow2 "write -P 0xaa 0 4k"

# Overlay naming a backing file (and its format), and one naming itself.
img create -f qcow2 -o cluster_size=4k base.qcow2 1M
img create -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 overlay.qcow2 1M
io overlay.qcow2 "write -P 0xbb 4k 4k"
img create -f qcow2 -o cluster_size=4k -u -b fuzz.qcow2 -F qcow2 self.qcow2 1M

# External data file (only the qcow2 file is a seed).
img create -f qcow2 -o cluster_size=4k,data_file=data.raw datafile.qcow2 1M
io datafile.qcow2 "write -P 0xcc 0 4k"

if [ "$kind" = images ]; then
    for f in v2 v3 extl2 zlib zstd snap bitmap overlay self datafile; do
        cp "$f.qcow2" "$out/seed-$f.qcow2"
    done
    exit 0
fi

# ---- ops: richer images, each followed by op scripts ----

# Extended L2, compressed clusters, three snapshots, two bitmaps (one disabled).
img create -f qcow2 -o cluster_size=16k,extended_l2=on rich.qcow2 1M
io rich.qcow2 "write -P 0x11 0 20k" "write -c -P 0x12 64k 16k" "write -z 128k 16k"
img snapshot -c s1 rich.qcow2
io rich.qcow2 "write -P 0x13 8k 4k" "write -P 0x14 512k 32k"
img snapshot -c s2 rich.qcow2
img bitmap --add rich.qcow2 b0
img bitmap --add -g 512 --disable rich.qcow2 b1
io rich.qcow2 "write -P 0x15 16k 8k" "discard 512k 16k"
img snapshot -c s3 rich.qcow2

# 512-byte clusters, 2-bit refcounts, zstd, snapshots and a bitmap.
img create -f qcow2 -o cluster_size=512,refcount_bits=2,compression_type=zstd tiny.qcow2 256k
io tiny.qcow2 "write -P 0x21 0 3k" "write -c -P 0x22 4k 512"
img snapshot -c a tiny.qcow2
img bitmap --add -g 4k tiny.qcow2 dirty
io tiny.qcow2 "write -P 0x23 1k 2k"

# v2 with a snapshot; lazy refcounts left dirty by an abort (check repairs it).
img create -f qcow2 -o compat=0.10,cluster_size=4k v2s.qcow2 512k
io v2s.qcow2 "write -P 0x31 0 8k"
img snapshot -c old v2s.qcow2
io v2s.qcow2 "write -P 0x32 4k 4k"
img create -f qcow2 -o cluster_size=4k,lazy_refcounts=on dirty.qcow2 512k
("$QEMU_IO" -f qcow2 -c "write -P 0x41 0 12k" -c abort dirty.qcow2 >/dev/null 2>&1 || true) 2>/dev/null

# Small ones (512-byte clusters): the fuzzer mutates their metadata more often.
img create -f qcow2 -o cluster_size=512 small.qcow2 64k
io small.qcow2 "write -P 0x61 0 2k" "write -c -P 0x62 4k 512"
img snapshot -c s1 small.qcow2
img bitmap --add -g 512 small.qcow2 b0
io small.qcow2 "write -P 0x63 1k 1k" "write -z 8k 1k"
img snapshot -c s2 small.qcow2
img bitmap --add -g 4k --disable small.qcow2 b1
img create -f qcow2 -o cluster_size=512 sbase.qcow2 64k
io sbase.qcow2 "write -P 0x64 0 4k"
img create -f qcow2 -o cluster_size=512 -b sbase.qcow2 -F qcow2 stop.qcow2 64k
img rebase -u -b base.qcow2 -F qcow2 stop.qcow2
io stop.qcow2 "write -P 0x65 1k 1k"

# An overlay with a bitmap over a base with a snapshot (commit has something to do).
img create -f qcow2 -o cluster_size=4k ob.qcow2 512k
io ob.qcow2 "write -P 0x51 0 64k"
img snapshot -c bs ob.qcow2
img create -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 otop.qcow2 512k
cp ob.qcow2 base.qcow2
img rebase -u -b base.qcow2 -F qcow2 otop.qcow2
io otop.qcow2 "write -P 0x52 8k 8k" "write -z 32k 4k"
img bitmap --add otop.qcow2 ob0

if [ "$kind" = api ]; then
    exec python3 "$here/seed_text.py" api-images "$out" tiny.qcow2 v2.qcow2 self.qcow2
fi

# Each image (an overlay with its base after it) followed by op scripts.
exec python3 "$here/seed_text.py" ops "$out" rich.qcow2 tiny.qcow2 v2s.qcow2 dirty.qcow2 extl2.qcow2 zstd.qcow2 \
    otop.qcow2+base.qcow2 small.qcow2 stop.qcow2+sbase.qcow2
