#!/usr/bin/env python3
"""seed_text.py KIND DIR [IMAGE|TOP+BASE ...]: seeds for the fuzz targets whose input
is not a bare image: http (fuzz_http_parse), api (fuzz_api), and ops
(fuzz_engine_ops: each image given, an overlay packed with its base, followed by
op scripts). The input formats are described at the top of each target's .c."""
import os
import struct
import sys

# ---- fuzz_http_parse: a selector byte, then the text ----
ROUTE, RANGE, CRANGE, QUERY, VALID = 0, 1, 2, 3, 6
HTTP = [
    (ROUTE, b"GET /v1/images"),
    (ROUTE, b"POST /v1/images"),
    (ROUTE, b"GET /v1/images/a/snapshots/s1/data"),
    (ROUTE, b"POST /v1/images/a/bitmaps/b0/merge"),
    (ROUTE, b"DELETE /v1/images/x/bitmaps/b/clear/y"),
    (ROUTE, b"PATCH /v1/jobs/7/cancel"),
    (ROUTE, b"OPTIONS /v1/images/a%2Fb/data"),
    (ROUTE, b"GET /v1/images/../data"),
    (ROUTE, b"HEAD /metrics"),
    (ROUTE, b"GET //v1///images/%zz"),
    (RANGE, b"\x14\x00bytes=0-99"),
    (RANGE, b"\x14\x01bytes=-500"),
    (RANGE, b"\x0a\x00bytes=100-"),
    (RANGE, b"\x20\x07 BYTES = 5-9, 20-30"),
    (RANGE, b"\x3f\xffbytes=18446744073709551615-"),
    (CRANGE, b"bytes 0-4095/*"),
    (CRANGE, b"bytes 512-1023/1048576"),
    (CRANGE, b"  bytes 9999999999999999999-1/2 "),
    (QUERY, b"%41b"),
    (QUERY, b"18446744073709551616"),
    (QUERY, b"yes"),
    (QUERY, b"%00"),
    (VALID, b'"7bc5d3b5adf110f4-b-0", W/"a"'),
    (VALID, b'*'),
    (VALID, b' , ,"a" ,'),
    (VALID, b'"unterminated'),
    (VALID, b"Sun, 06 Nov 1994 08:49:37 GMT"),
    (VALID, b"Sunday, 06-Nov-94 08:49:37 GMT"),
    (VALID, b"Sun Nov  6 08:49:37 1994"),
    (VALID, b"Fri, 31 Dec 9999 23:59:60 GMT"),
]

# ---- fuzz_api: requests separated by a line "===" ----
SEP = b"\n===\n"
API = [
    [b"GET /v1/images", b"GET /v1/images/a", b"GET /v1/health", b"GET /metrics"],
    [b'POST /v1/images\nContent-Type: application/json\n\n{"name":"n","size":1048576,"cluster-size":4096}',
     b"GET /v1/images/n"],
    [b'POST /v1/images\n\n{"name":"o","backing-file":"base","backing-fmt":"qcow2","extended-l2":true,'
     b'"compression-type":"zstd","refcount-bits":1,"lazy-refcounts":true,"version":"v3","preallocation":"metadata"}'],
    [b'POST /v1/images/a/snapshots\n\n{"name":"s9"}', b"GET /v1/images/a/snapshots",
     b"POST /v1/images/a/snapshots/s1/revert", b"DELETE /v1/images/a/snapshots/s2"],
    [b'POST /v1/images/a/bitmaps\n\n{"name":"b9","granularity":65536,"disabled":true}',
     b'POST /v1/images/a/bitmaps/b9/merge\n\n{"source":"b0"}',
     b'POST /v1/images/top/bitmaps/t0/merge\n\n{"source":"b0","source-image":"a"}',
     b"POST /v1/images/a/bitmaps/b1/enable", b"POST /v1/images/a/bitmaps/b0/clear",
     b"GET /v1/images/a/bitmaps/b0", b"GET /v1/images/a/extents?context=dirty&bitmap=b0",
     b"DELETE /v1/images/a/bitmaps/b1"],
    [b'PATCH /v1/images/a/data\n\n{"op":"zero","offset":4096,"size":8192,"flush":true}',
     b'PATCH /v1/images/a/data\n\n{"op":"discard","offset":0,"size":65536}',
     b'PATCH /v1/images/a/data\n\n{"op":"flush"}', b"OPTIONS /v1/images/a/data"],
    [b'GET /v1/images/a/data\nRange: bytes=0-9\nIf-Range: "x"', b"GET /v1/images/a\nIf-None-Match: *",
     b"GET /v1/images/a/file\nRange: bytes=5-\nIf-Range: Sun, 06 Nov 1994 08:49:37 GMT",
     b'PUT /v1/images/a/data\nContent-Range: bytes 0-1/*\nIf-Match: "x", W/"y"\n\nab',
     b"DELETE /v1/images/a\nIf-Match: *", b"GET /v1/images/a/data\nIf-Modified-Since: Sun Nov  6 08:49:37 1994"],
    [b"PUT /v1/images/x/data\nContent-Range: bytes 100-109/*\n\n0123456789",
     b"PUT /v1/images/x/data?offset=5&flush=n\n\nhello",
     b"GET /v1/images/x/data\nRange: bytes=90-120", b"GET /v1/images/x/extents?context=zero"],
    [b'POST /v1/images/top/commit\n\n{}', b"GET /v1/jobs", b"GET /v1/jobs/1",
     b"POST /v1/jobs/1/pause", b"POST /v1/jobs/1/resume", b"POST /v1/jobs/1/cancel", b"DELETE /v1/jobs/1"],
    [b'POST /v1/images/a/convert\n\n{"target":"c","cluster-size":65536,"compress":true}',
     b'POST /v1/images/a/check\n\n{"repair":"all"}', b'POST /v1/images/top/check\n\n{"repair":"leaks"}'],
    [b"GET /v1/images/a/file\nRange: bytes=0-511", b"HEAD /v1/images/a/data",
     b"GET /v1/images/a/snapshots/s1/data\nRange: bytes=-4096"],
    [b"PUT /v1/images/up/file\n\nQFI\xfb\x00\x00\x00\x03" + b"\x00" * 96,
     b"DELETE /v1/images/x", b"DELETE /v1/images/base"],
    [b"GET /v1/images/a/snapshots/b/data/c", b"DELETE /v1/images/x/bitmaps/b/clear/y",
     b"BREW /v1/images", b'POST /v1/images\n\n{"name":"a","size":-1}', b"POST /v1/images\n\n[1,2"],
]

# requests on the image "h" that an input starting with the qcow2 magic carries
API_ON_H = [
    b"GET /v1/images/h", b"GET /v1/images/h/extents?context=zero", b"GET /v1/images/h/data\nRange: bytes=0-4095",
    b"GET /v1/images/h/bitmaps", b"GET /v1/images/h/extents?context=dirty&bitmap=dirty",
    b"PUT /v1/images/h/data\nContent-Range: bytes 0-3/*\n\nabcd", b'PATCH /v1/images/h/data\n\n{"op":"zero","offset":0,"size":4096}',
    b'POST /v1/images/h/snapshots\n\n{"name":"n"}', b'POST /v1/images/h/check\n\n{"repair":"all"}',
    b"GET /v1/images/h/snapshots/a/data\nRange: bytes=0-511", b"GET /v1/images/h/file\nRange: bytes=0-1023",
]

# ---- fuzz_engine_ops: IMAGE [QCOWDFZ: BASE] OPS N ----
(OP_WRITE, OP_ZERO, OP_DISCARD, OP_WRITE_COMPRESSED, OP_READ, OP_SNAP_CREATE, OP_SNAP_DELETE,
 OP_SNAP_REVERT, OP_BITMAP_ADD, OP_BITMAP_REMOVE, OP_BITMAP_MERGE, OP_BITMAP_TOGGLE, OP_BITMAP_DIRTY,
 OP_CHECK, OP_FLUSH, OP_REOPEN, OP_COMMIT, OP_MAP) = range(18)
SCRIPTS = [
    # every op once
    [(op, 0x10 * op & 0xff, op, 0x81) for op in range(18)],
    # write, snapshot, write, revert, delete, reopen, repair, dirty
    [(OP_WRITE, 0, 0, 0x88), (OP_SNAP_CREATE, 2, 0, 0), (OP_WRITE, 8, 3, 0x90), (OP_SNAP_REVERT, 0x82, 0, 0),
     (OP_SNAP_DELETE, 0, 0, 0), (OP_REOPEN, 0, 0, 0), (OP_CHECK, 2, 0, 0), (OP_BITMAP_DIRTY, 0, 0, 0)],
    # bitmaps: add, write, merge, dirty, toggle, remove, reopen
    [(OP_BITMAP_ADD, 5, 3, 0), (OP_WRITE, 0x40, 0, 0x83), (OP_BITMAP_MERGE, 0x85, 0, 0),
     (OP_BITMAP_DIRTY, 0x85, 0, 0), (OP_BITMAP_TOGGLE, 0, 2, 0), (OP_BITMAP_REMOVE, 0, 0, 0),
     (OP_REOPEN, 0, 0, 0), (OP_BITMAP_DIRTY, 0, 0, 0)],
    # repair first, zero and discard everything, commit, check
    [(OP_CHECK, 2, 0, 0), (OP_ZERO, 0, 0x10, 0xff), (OP_DISCARD, 0, 0x10, 0), (OP_COMMIT, 0, 0, 0),
     (OP_CHECK, 0, 0, 0), (OP_MAP, 0, 0, 0)],
]


# fuzz_s3_xml: a prefix selector byte, then ListMultipartUploads answers as
# Swift's s3api and AWS give them (Swift leaves the next markers empty).
def _upload(key, uid, when="2026-12-03T18:27:29.000Z"):
    return ("<Upload><Key>%s</Key><UploadId>%s</UploadId><Initiator><ID>test:tester</ID></Initiator>"
            "<StorageClass>STANDARD</StorageClass><Initiated>%s</Initiated></Upload>" % (key, uid, when))


def _page(inner, truncated="false", nk="", ni=""):
    return ("<?xml version='1.0' encoding='UTF-8'?>\n<ListMultipartUploadsResult xmlns=\"http://s3.amazonaws.com/"
            "doc/2006-03-01/\"><Bucket>b</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>"
            "<NextKeyMarker>%s</NextKeyMarker><NextUploadIdMarker>%s</NextUploadIdMarker><Prefix>p/</Prefix>"
            "<MaxUploads>1000</MaxUploads><IsTruncated>%s</IsTruncated>%s</ListMultipartUploadsResult>"
            % (nk, ni, truncated, inner))


S3XML = [
    (1, _page(_upload("p/a.qcow2", "NmM0ZWFm") + _upload("p/b&amp;c.qcow2", "ODVhNTRl"))),
    (1, _page(_upload("p/a.qcow2", "MWNk") + _upload("p2/y", "OTcz"), "true")),
    (0, _page(_upload("q/x", "ODUy", "2026-12-03T18:27:29Z"), "true", "q/x", "ODUy")),
    (2, _page(_upload("case1/&#x41;&lt;", "SUQ", "1970-01-01T00:00:00+00:00"))),
    (0, "<Error><Code>AccessDenied</Code><Message>no</Message></Error>"),
    (1, _page("<Upload><Key>p/k</Key></Upload><Upload><UploadId>x</UploadId></Upload>", "true")),
]


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def main():
    kind, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    if kind == "http":
        for i, (sel, text) in enumerate(HTTP):
            write(os.path.join(out, "http-%02d" % i), bytes([sel]) + text)
    elif kind == "s3xml":
        for i, (sel, text) in enumerate(S3XML):
            write(os.path.join(out, "s3xml-%02d" % i), bytes([sel]) + text.encode())
    elif kind == "api":
        for i, reqs in enumerate(API):
            write(os.path.join(out, "api-%02d" % i), SEP.join(reqs))
    elif kind == "api-images":
        for path in sys.argv[3:]:
            name = os.path.splitext(os.path.basename(path))[0]
            image = open(path, "rb").read()
            write(os.path.join(out, "api-h-" + name), SEP.join([image] + API_ON_H))
            # the same image uploaded (validated as it arrives), then used
            up = [b"PUT /v1/images/up/file\n\n" + image] + [r.replace(b"/images/h", b"/images/up") for r in API_ON_H]
            write(os.path.join(out, "api-up-" + name), SEP.join(up[:12]))
    elif kind == "ops":
        for spec in sys.argv[3:]:
            files = spec.split("+")
            body = open(files[0], "rb").read()
            if len(files) > 1:
                body += b"QCOWDFZ:" + open(files[1], "rb").read()
            name = os.path.splitext(os.path.basename(files[0]))[0]
            for i, script in enumerate(SCRIPTS):
                ops = b"".join(struct.pack("4B", *op) for op in script)
                write(os.path.join(out, "ops-%s-%d" % (name, i)), body + ops + bytes([len(ops)]))
    else:
        sys.exit("seed_text.py: unknown kind " + kind)


if __name__ == "__main__":
    main()
