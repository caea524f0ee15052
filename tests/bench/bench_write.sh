#!/usr/bin/env bash
# bench_write.sh: the write-side benchmarks, qcowd's engine against QEMU in one run:
#   import   `qcowimg convert -f raw -O qcow2` vs `qemu-img convert -f raw -O qcow2` (random data)
#   import-c the same with -c -o compression_type=zstd (compressible data)
#   randw    random 4 KiB writes into a fresh image of 4 x SIZE_MIB: bench_randwrite vs qemu-io
# Prints seconds (best of 3) and ratio = qcowd / QEMU; targets: import <= 1.0,
# import-c < 1.0, randw reported. Exits non-zero only when a command fails or the
# results differ (the images are compared with qemu-img compare). 77: qemu missing.
#
# usage: bench_write.sh SIZE_MIB   (env: QCOWIMG, BENCH_RANDWRITE, QEMU_IMG, QEMU_IO, TMPDIR)
set -euo pipefail
size_mib=${1:?usage: bench_write.sh SIZE_MIB}
qcowimg=${QCOWIMG:?set QCOWIMG}
randw=${BENCH_RANDWRITE:?set BENCH_RANDWRITE}
qemu_img=${QEMU_IMG:-qemu-img}
qemu_io=${QEMU_IO:-qemu-io}
command -v "$qemu_img" >/dev/null && command -v "$qemu_io" >/dev/null || { echo "bench_write: qemu tools missing: skipped"; exit 77; }
work=$(mktemp -d "${TMPDIR:-/tmp}/bench_write.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

best() { # best of 3: prints the smallest wall time of "$@"
    local b=""
    for _ in 1 2 3; do
        local s e t
        sync # no dirty pages left by the previous run (see bench_convert.sh)
        s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N)
        t=$(echo "$e - $s" | bc -l)
        if [ -z "$b" ] || [ "$(echo "$t < $b" | bc -l)" = 1 ]; then b=$t; fi
    done
    printf '%.3f' "$b"
}
ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }
verdict() { if [ "$(echo "$1 $2" | bc -l)" = 1 ]; then echo "target met"; else echo "target missed"; fi; }

head -c $((size_mib << 20)) /dev/urandom > rand.raw
/usr/bin/python3 - "$size_mib" <<'PY'
import random, sys
random.seed(7)
words = [b'alpha', b'beta', b'gamma', b'delta', b'qcow2', b'cluster', b'refcount', b'snapshot', b'bitmap']
with open('text.raw', 'wb') as f:
    for _ in range(int(sys.argv[1]) * 16):
        f.write(b' '.join(random.choice(words) for _ in range(9000))[:65536].ljust(65536, b'.'))
PY

imp_q=$(best "$qemu_img" convert -f raw -O qcow2 rand.raw q.qcow2)
imp_c=$(best "$qcowimg" convert -f raw -O qcow2 rand.raw c.qcow2)
"$qemu_img" compare -q q.qcow2 c.qcow2
"$qemu_img" check -q c.qcow2

cz_q=$(best "$qemu_img" convert -c -f raw -O qcow2 -o compression_type=zstd text.raw qz.qcow2)
cz_c=$(best "$qcowimg" convert -c -f raw -O qcow2 -o compression_type=zstd text.raw cz.qcow2)
"$qemu_img" compare -q qz.qcow2 cz.qcow2
"$qemu_img" check -q cz.qcow2

disk=$((size_mib * 4))M
count=$((size_mib * 64))
"$randw" --script $((size_mib * 4 << 20)) "$count" 42 > cmds.txt
fresh() { rm -f "$1"; "$qemu_img" create -q -f qcow2 "$1" "$disk"; }
rw_q_run() { fresh rq.qcow2; "$qemu_io" -t writeback rq.qcow2 < cmds.txt; }
rw_c_run() { fresh rc.qcow2; "$randw" rc.qcow2 "$count" 42; }
rw_q=$(best rw_q_run)
rw_c=$(best rw_c_run)
"$qemu_img" compare -q rq.qcow2 rc.qcow2
"$qemu_img" check -q rc.qcow2

printf '%-10s %12s %12s %8s  %s\n' case "QEMU s" "qcowd s" ratio target
printf '%-10s %12s %12s %8s  %s\n' import "$imp_q" "$imp_c" "$(ratio "$imp_c" "$imp_q")" "<= 1.0: $(verdict "$imp_c" "<= $imp_q")"
printf '%-10s %12s %12s %8s  %s\n' import-c "$cz_q" "$cz_c" "$(ratio "$cz_c" "$cz_q")" "< 1.0: $(verdict "$cz_c" "< $cz_q")"
printf '%-10s %12s %12s %8s  %s\n' randw "$rw_q" "$rw_c" "$(ratio "$rw_c" "$rw_q")" "($count writes of 4 KiB into $disk; reported)"
