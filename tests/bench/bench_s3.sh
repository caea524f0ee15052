#!/usr/bin/env bash
# bench_s3.sh SIZE_MIB: qcowd with its catalog in an S3 bucket (a local Swift +
# s3api, started here) against the same daemon on a local folder, in one run.
#
# On a SIZE_MIB qcow2 of random data (64 KiB clusters), for each store:
#   import      PUT /v1/images/NAME/file of the whole container (staged locally,
#               published with a multipart upload): MiB/s
#   seq read    GET of the whole guest disk (read-ahead): MiB/s
#   rand read   256 ranged GETs of 4 KiB at random offsets: ms per read
# and for the bucket, what the store saw, per GiB of image: S3 requests by kind,
# bytes received, sent and copied server-side. Every read is checked against
# `qemu-img convert -O raw`.
# Environment: QCOWD (required), QEMU_IMG, PYTHON (default /usr/bin/python3),
# S3_ENDPOINT (use a running store instead of starting Swift).
# Exit: 0 when everything ran and checked out, 1 on a failure, 77 when Swift or
# qemu-img is missing.
set -euo pipefail
SIZE_MIB=${1:-1024}
[[ "$SIZE_MIB" =~ ^[0-9]+$ ]] && [ "$SIZE_MIB" -ge 8 ] || { echo "usage: $0 SIZE_MIB (>= 8)" >&2; exit 2; }
[ -n "${QCOWD:-}" ] && [ -x "$QCOWD" ] || { echo "bench_s3: QCOWD must name the qcowd binary" >&2; exit 1; }
HERE=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-/usr/bin/python3}" "$HERE/bench_s3.py" "$SIZE_MIB"
