#!/bin/bash
# seed_corpus.sh DIR: writes a small seed corpus of qcow2 images made by qemu-img and
# qemu-io into DIR (small clusters and disks keep each seed a few KiB to ~100 KiB):
# v2, v3, extended L2, zlib and zstd compressed, internal snapshot, persistent bitmap,
# zero clusters, an overlay naming a backing file, an external data file image.
# Environment: QEMU_IMG, QEMU_IO (default qemu-img, qemu-io). Exits 77 without them.
set -euo pipefail

out=${1:?usage: seed_corpus.sh DIR}
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
command -v "$QEMU_IMG" >/dev/null && command -v "$QEMU_IO" >/dev/null || {
    echo "seed_corpus.sh: qemu-img/qemu-io not found" >&2
    exit 77
}

mkdir -p "$out"
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

for f in v2 v3 extl2 zlib zstd snap bitmap overlay self datafile; do
    cp "$f.qcow2" "$out/seed-$f.qcow2"
done
