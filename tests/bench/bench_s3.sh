#!/usr/bin/env bash
# bench_s3.sh SIZE_MIB [WRITE_MIB]: qcowd with its catalog in an S3 bucket
# against boto3 on the same store (a local Swift + s3api, started here), in one run.
#
# On a SIZE_MIB qcow2 of random data (64 KiB clusters):
#   import      qcowd PUT /v1/images/NAME/file vs boto3's multipart upload of the
#               same file (TransferConfig: 8 MiB parts, 8 threads): MiB/s
#   read        qcowd GET of the whole guest disk vs boto3's 8-thread ranged
#               download (8 MiB ranges) of the object qcowd published: MiB/s
#   random      4 KiB reads at random offsets through qcowd vs one ranged GET of
#               4 KiB with boto3, alternating, on one object neither has read
#               (boto3's upload): median ms (BENCH_S3_READS of each, default 64)
#   small write a 4 KiB write + flush on a WRITE_MIB (default 1024) image put in
#               the bucket: seconds, requests, bytes sent and copied server-side
# It prints the ratios against issue 16's targets (printed, not gated) and what
# qcowd's /metrics counted per GiB: requests by kind, bytes sent, received and
# copied server-side. Every qcowd read is checked against the data.
# Environment: QCOWD (required), QEMU_IMG, PYTHON (default /usr/bin/python3),
# S3_ENDPOINT (use a running store instead of starting Swift).
# Exit: 0 when everything ran and checked out, 1 on a failure, 77 when Swift,
# qemu-img or boto3 (python3-boto3) is missing.
set -euo pipefail
SIZE_MIB=${1:-1024}
[[ "$SIZE_MIB" =~ ^[0-9]+$ ]] && [ "$SIZE_MIB" -ge 8 ] || { echo "usage: $0 SIZE_MIB (>= 8) [WRITE_MIB]" >&2; exit 2; }
[ -n "${QCOWD:-}" ] && [ -x "$QCOWD" ] || { echo "bench_s3: QCOWD must name the qcowd binary" >&2; exit 1; }
HERE=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-/usr/bin/python3}" "$HERE/bench_s3.py" "$SIZE_MIB" "${2:-1024}"
