#!/usr/bin/python3
"""daemon_write.py: proves the write side of a live qcowd: what is written over HTTP
is what qemu sees once qcowd stops, bad writes change nothing, and whole-image
calls (create, delete, upload, download) keep the catalog safe.

It builds a catalog with qemu-img (64 KiB, 512 B and extended-L2 clusters, lazy
refcounts, an overlay on a base), mirrors every write into a raw reference and checks:
  writes      PUTs at random (unaligned) offsets and lengths, by Content-Range and
              by ?offset, flush=y|n, read back over HTTP after each batch
  patch       zero, discard, flush; bad JSON, unknown op or key, ranges past the end
  bad puts    Content-Length or range past the disk (413/416 before writing), bad
              headers, no length, unknown image, writing a backing image (409)
  disconnect  a client that sends half a body and closes: bytes past what it sent
              are untouched, the daemon stays up
  create      options as QMP names them (checked with qemu-img info), name taken,
              bad JSON, unknown keys, wrong types, hostile names, unknown backing
  delete      204, 404, 409 while an overlay uses the image
  upload      a good container (201, data served), hostile ones (backing file
              /etc/passwd, ../x, json:{...}, not qcow2, external data file): 422
              with nothing left behind; an upload cut short leaves nothing
  download    GET .../file equals the file (Range too)
  options     features, max_readers, max_writers; /metrics counts what was done
  parallel    8 writers on 8 images and 8 readers, every byte of every read is a
              version some writer wrote
  sigterm     exit 0; then qemu-img check is clean, qemu-img compare equal to the
              raw references, dirty flags clear
Environment and output as daemon.py (QCOWD, OPENAPI, QEMU_IMG, QEMU_IO; QCOWD_S3=1
for the catalog in a bucket: the checks on files first copy the bucket's objects
into the local folder with base.sync_down).
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import daemon as base  # noqa: E402  (shares the daemon harness and the OpenAPI checks)

KiB = base.KiB
MiB = base.MiB
run = base.run

WRITERS = 8
PAR_BLOCK = 64 * KiB  # one PUT per block: one engine write, so readers see old or new
PAR_BLOCKS = 48
PAR_ROUNDS = 60
WRITE_BATCHES = 3
if os.environ.get("QCOWD_S3"):  # in a bucket every flush uploads a new object version: fewer rounds
    PAR_ROUNDS = 8
    WRITE_BATCHES = 1


def qemu_img(*a):
    return run(base.QEMU_IMG, *a)


def raw_bytes(cat, name, top):
    out = os.path.join(top, name + ".ref")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", os.path.join(cat, name + ".qcow2"), out)
    with open(out, "rb") as f:
        return bytearray(f.read())


def raw_request(port, head, body=b"", read=True):
    """Send head (+ body) on a fresh socket and return (status, headers, body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        s.sendall(head + body)
        if not read:
            return None
        data = b""
        while True:
            try:
                k = s.recv(65536)
            except ConnectionResetError:
                break
            if not k:
                break
            data += k
            if b"\r\n\r\n" in data:
                hdr, _, rest = data.partition(b"\r\n\r\n")
                m = re.search(rb"(?i)content-length: *(\d+)", hdr)
                if m and len(rest) >= int(m.group(1)):
                    break
    finally:
        s.close()
    hdr, _, rest = data.partition(b"\r\n\r\n")
    lines = hdr.decode(errors="replace").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


class W:
    """The test state: catalog, daemon, references."""

    def __init__(self, ck, top, cat):
        self.ck = ck
        self.top = top
        self.cat = cat
        self.refs = {}
        self.cluster = {}
        self.d = None

    def p(self, name):
        return os.path.join(self.cat, name + ".qcow2")

    def build(self):
        qemu_img("create", "-q", "-f", "qcow2", self.p("w64k"), "16M")
        base.qemu_io(self.p("w64k"), "write -q -P 0xa1 0 1M", "write -q -P 0x5c 3M 12345", "write -q -c -P 0x77 6M 64k")
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", self.p("w512"), "4M")
        base.qemu_io(self.p("w512"), "write -q -P 0x12 1000 70000")
        qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", self.p("wext"), "8M")
        base.qemu_io(self.p("wext"), "write -q -P 0x34 4k 4k", "write -q -P 0x35 300k 100k")
        qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", self.p("wlazy"), "8M")
        qemu_img("create", "-q", "-f", "qcow2", self.p("base"), "8M")
        base.qemu_io(self.p("base"), "write -q -P 0xb0 0 4M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", self.p("overlay"))
        base.qemu_io(self.p("overlay"), "write -q -P 0xc0 1M 64k")
        # the granularity at which discard frees: clusters, or subclusters with extended L2
        for n, cs in [("w64k", 65536), ("w512", 512), ("wext", 2048), ("wlazy", 65536), ("overlay", 65536)]:
            self.refs[n] = raw_bytes(self.cat, n, self.top)
            self.cluster[n] = cs
        self.base_raw = raw_bytes(self.cat, "base", self.top)

    # -- helpers over HTTP --
    def put(self, name, off, data, how="range", flush=True, conn=None):
        q = "" if flush else "?flush=n"
        if how == "range":
            hdr = {"Content-Range": "bytes %d-%d/*" % (off, off + len(data) - 1)}
            path = "/v1/images/%s/data%s" % (name, q)
        else:
            hdr = {}
            path = "/v1/images/%s/data?offset=%d%s" % (name, off, "" if flush else "&flush=n")
        return self.body_request("PUT", path, data, hdr, conn)

    def body_request(self, method, path, body, headers=None, conn=None):
        return self.d.exchange(method, path, body, headers, conn)

    def patch(self, name, obj):
        body = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
        return self.body_request("PATCH", "/v1/images/%s/data" % name, body, {"Content-Type": "application/json"})

    def read(self, name, a, n, conn=None):
        st, h, b = self.d.request("GET", "/v1/images/%s/data" % name, {"Range": "bytes=%d-%d" % (a, a + n - 1)},
                                  conn=conn)
        assert st == 206, (name, a, n, st, b[:200])
        return b

    def check_image(self, name, samples=20, rng=None):
        ref = self.refs[name]
        rng = rng or self.ck.rng
        c = self.d.conn()
        for _ in range(samples):
            a = rng.randrange(len(ref))
            n = min(len(ref) - a, rng.randrange(1, 300 * KiB))
            got = self.read(name, a, n, conn=c)
            if got != ref[a:a + n]:
                i = next(i for i in range(n) if got[i] != ref[a + i])
                raise AssertionError("%s: bytes %d+%d differ at %d (got %#x want %#x)" %
                                     (name, a, n, a + i, got[i], ref[a + i]))
        c.close()

    def whole(self, name):
        st, h, b = self.d.request("GET", "/v1/images/%s/data" % name)
        assert st == 200, st
        return b


def discard_model(ref, off, size, cs):
    """What a discard leaves: whole clusters inside the range read as zeroes (v3)."""
    a = (off + cs - 1) // cs * cs
    b = (off + size) // cs * cs
    if a < b:
        ref[a:b] = bytes(b - a)


def main():
    args, top, cat = base.qcowd.prologue("qcowd-write-", seed=20261125)
    ck = base.Checker(args)
    rng = ck.rng
    w = W(ck, top, cat)
    try:
        w.build()
        base.s3_start(top)
        base.sync_up(w.cat)
        w.d = d = base.Daemon(w.cat)

        ck.case("openapi_lint", lambda: base.lint_openapi(ck.doc))

        def random_writes():
            nput = 0
            for batch in range(WRITE_BATCHES):
                for name in ("w64k", "w512", "wext", "wlazy", "overlay"):
                    ref = w.refs[name]
                    c = d.conn()
                    for i in range(15):
                        n = rng.choice([1, 511, 512, 513, 4096, 65535, 65536, 65537, rng.randrange(1, 700 * KiB)])
                        a = rng.randrange(len(ref) - n + 1)
                        if rng.random() < 0.3:
                            a = a // 512 * 512
                        data = rng.randbytes(n)
                        how = rng.choice(["range", "offset"])
                        st, h, b = w.put(name, a, data, how=how, flush=rng.random() < 0.5, conn=c)
                        assert st == 204, (name, a, n, how, st, b[:300])
                        assert b == b"", b[:100]
                        ref[a:a + n] = data
                        nput += 1
                    c.close()
                    w.check_image(name, samples=10)
            assert nput == WRITE_BATCHES * 5 * 15
            # a write of the whole disk of one image, then the last byte alone
            ref = w.refs["w512"]
            data = rng.randbytes(len(ref))
            st, h, b = w.put("w512", 0, data, how="offset")
            assert st == 204, (st, b[:200])
            ref[:] = data
            st, h, b = w.put("w512", len(ref) - 1, b"\x5a")
            assert st == 204, st
            ref[-1] = 0x5a
            assert w.whole("w512") == ref, "whole-disk write differs"
            # an empty body is a no-op
            st, h, b = w.body_request("PUT", "/v1/images/w64k/data?offset=100", b"")
            assert st == 204, st
        ck.case("random_writes_read_back", random_writes)

        def patches():
            for name in ("w64k", "wext", "w512", "overlay"):
                ref, cs = w.refs[name], w.cluster[name]
                for i in range(8):
                    n = rng.choice([1, 4096, cs, 3 * cs + 17, rng.randrange(1, 2 * MiB)])
                    a = rng.randrange(len(ref) - n + 1)
                    if rng.random() < 0.5:
                        st, h, b = w.patch(name, {"op": "zero", "offset": a, "size": n, "flush": rng.random() < 0.5})
                        assert st == 204, (name, st, b)
                        ref[a:a + n] = bytes(n)
                    else:
                        st, h, b = w.patch(name, {"op": "discard", "offset": a, "size": n})
                        assert st == 204, (name, st, b)
                        discard_model(ref, a, n, cs)
                st, h, b = w.patch(name, {"op": "flush"})
                assert st == 204, (st, b)
                assert w.whole(name) == ref, "%s: content after zero/discard differs" % name
        ck.case("patch_zero_discard_flush", patches)

        def bad_patches():
            size = len(w.refs["w64k"])
            cases = [
                (b"{", 400, "bad-request"), (b"", 400, "bad-request"), (b"[1,2]", 400, "bad-request"),
                (b'"zero"', 400, "bad-request"), ({"op": "erase"}, 400, "bad-request"),
                ({"op": 5}, 400, "bad-request"), ({}, 400, "bad-request"),
                ({"op": "zero", "offset": 0}, 400, "bad-request"),
                ({"op": "zero", "offset": 0, "size": 1, "extra": 1}, 400, "bad-request"),
                ({"op": "flush", "offset": 0}, 400, "bad-request"),
                ({"op": "zero", "offset": "0", "size": 1}, 400, "bad-request"),
                ({"op": "zero", "offset": -1, "size": 1}, 400, "bad-request"),
                ({"op": "discard", "offset": size, "size": 1}, 416, "range-not-satisfiable"),
                ({"op": "zero", "offset": size - 1, "size": 2}, 416, "range-not-satisfiable"),
                ({"op": "zero", "offset": 2 ** 62, "size": 2 ** 62}, 416, "range-not-satisfiable"),
                (b'{"op":"flush","op":"zero"}', 400, "bad-request"),
                (b"x" * (70 * KiB), 413, "too-large"),
            ]
            for body, want, code in cases:
                st, h, b = w.patch("w64k", body)
                ck.expect_error("PATCH %r" % (body[:40] if isinstance(body, bytes) else body), st, want, h, b, code)
            st, h, b = w.patch("nosuch", {"op": "flush"})
            ck.expect_error("PATCH unknown image", st, 404, h, b, "not-found")
            st, h, b = w.patch("base", {"op": "zero", "offset": 0, "size": 512})
            ck.expect_error("PATCH backing image", st, 409, h, b, "conflict")
            assert w.whole("w64k") == w.refs["w64k"], "a refused PATCH changed the image"
        ck.case("bad_patches_change_nothing", bad_patches)

        def bad_puts():
            size = len(w.refs["w64k"])
            data = b"\x99" * 1000
            cases = [
                ({"Content-Range": "bytes %d-%d/*" % (size - 10, size + 989)}, "/v1/images/w64k/data", 416),
                ({"Content-Range": "bytes 0-999/%d" % (size + 1)}, "/v1/images/w64k/data", 416),
                ({"Content-Range": "bytes 0-999"}, "/v1/images/w64k/data", 400),
                ({"Content-Range": "bytes=0-999/*"}, "/v1/images/w64k/data", 400),
                ({"Content-Range": "bytes 5-1/*"}, "/v1/images/w64k/data", 400),
                ({"Content-Range": "bytes -5-999/*"}, "/v1/images/w64k/data", 400),
                ({"Content-Range": "bytes 0-99/*"}, "/v1/images/w64k/data", 400),  # length mismatch
                ({"Content-Range": "bytes 0-999/*"}, "/v1/images/w64k/data?offset=0", 400),
                ({}, "/v1/images/w64k/data?offset=%d" % (size - 999), 413),
                ({}, "/v1/images/w64k/data?offset=%d" % (size + 1), 413),
                ({}, "/v1/images/w64k/data?offset=abc", 400),
                ({}, "/v1/images/w64k/data?offset=-1", 400),
                ({}, "/v1/images/w64k/data?flush=maybe", 400),
                ({}, "/v1/images/nosuch/data", 404),
                ({}, "/v1/images/..%2Fx/data", 400),
                ({}, "/v1/images/base/data", 409),
            ]
            for hdr, path, want in cases:
                st, h, b = w.body_request("PUT", path, data, hdr)
                j = ck.expect_error("PUT %s %s" % (path, hdr), st, want, h, b)
                if want == 416:
                    assert h.get("content-range") == "bytes */%d" % size, h
            # a huge Content-Length answered before the body is sent
            st, h, b = raw_request(d.port, b"PUT /v1/images/w64k/data?offset=0 HTTP/1.1\r\nHost: localhost\r\n"
                                            b"Content-Length: 99999999999\r\nExpect: 100-continue\r\n\r\n")
            ck.expect_error("PUT huge Content-Length", st, 413, h, b, "too-large")
            # chunked without a Content-Range: no way to check the length first
            st, h, b = raw_request(d.port, b"PUT /v1/images/w64k/data HTTP/1.1\r\nHost: localhost\r\n"
                                            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                                            b"4\r\nabcd\r\n0\r\n\r\n")
            ck.expect_error("PUT chunked without range", st, 411, h, b, "length-required")
            # chunked with a range, body longer than the range
            st, h, b = raw_request(d.port, b"PUT /v1/images/w64k/data HTTP/1.1\r\nHost: localhost\r\n"
                                            b"Transfer-Encoding: chunked\r\nContent-Range: bytes 0-3/*\r\n"
                                            b"Connection: close\r\n\r\n8\r\nabcdefgh\r\n0\r\n\r\n")
            ck.expect_error("PUT chunked body longer than range", st, 400, h, b, "bad-request")
            # chunked with a range that matches: accepted
            st, h, b = raw_request(d.port, b"PUT /v1/images/w64k/data HTTP/1.1\r\nHost: localhost\r\n"
                                            b"Transfer-Encoding: chunked\r\nContent-Range: bytes 8-15/*\r\n"
                                            b"Connection: close\r\n\r\n3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n")
            assert st == 204, (st, b)
            w.refs["w64k"][8:16] = b"abcdefgh"
            assert w.whole("w64k") == w.refs["w64k"], "a refused PUT changed the image"
            assert d.alive()
        ck.case("bad_puts_change_nothing", bad_puts)

        def disconnect():
            ref = w.refs["w64k"]
            for off, total, sent in [(5 * MiB + 123, 1 * MiB, 300 * KiB + 7), (0, 2 * MiB, 1),
                                     (9 * MiB, 600 * KiB, 599 * KiB)]:
                before = bytes(ref[off:off + total])
                data = rng.randbytes(total)
                head = ("PUT /v1/images/w64k/data?offset=%d HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" %
                        (off, total)).encode()
                raw_request(d.port, head, data[:sent], read=False)
                time.sleep(0.3)
                got = w.read("w64k", off, total)
                assert got[sent:] == before[sent:], "bytes past what the client sent were changed"
                for i in range(0, sent):
                    if got[i] != before[i] and got[i] != data[i]:
                        raise AssertionError("byte %d is neither old nor new" % (off + i))
                ref[off:off + total] = got  # whatever arrived is the image now
            st, h, b = d.request("GET", "/v1/health")
            assert st == 200 and d.alive()
            assert any("PUT /v1/images/w64k/data" in ln and "(aborted)" in ln for ln in d.lines), d.lines[-5:]
        ck.case("client_disconnect_mid_upload", disconnect)

        def create_delete():
            cases = [
                ({"name": "c1", "size": 4 * MiB}, {}),
                ({"name": "c2", "size": 3 * MiB + 512, "cluster-size": 4096, "refcount-bits": 8,
                  "compression-type": "zstd", "lazy-refcounts": True}, {}),
                ({"name": "c3", "size": MiB, "extended-l2": True, "version": "v3", "preallocation": "metadata"}, {}),
                ({"name": "c4", "size": MiB, "version": "v2"}, {}),
                ({"name": "c5", "backing-file": "w64k", "backing-fmt": "qcow2"}, {}),
            ]
            for req, _ in cases:
                st, h, b = w.body_request("POST", "/v1/images", json.dumps(req))
                assert st == 201, (req, st, b)
                j = ck.json_of(st, h, b, "ImageInfo", "create " + req["name"])
                assert h.get("location") == "/v1/images/" + req["name"], h
                base.sync_down(w.cat, req["name"] + ".qcow2")
                q = json.loads(qemu_img("info", "--output=json", w.p(req["name"])).stdout)
                qd = q["format-specific"]["data"]
                assert j["virtual-size"] == q["virtual-size"], (j, q)
                if "size" in req:
                    assert q["virtual-size"] == req["size"], q
                if "cluster-size" in req:
                    assert q["cluster-size"] == req["cluster-size"]
                if "refcount-bits" in req:
                    assert qd["refcount-bits"] == req["refcount-bits"]
                if "compression-type" in req:
                    assert qd["compression-type"] == req["compression-type"]
                if "lazy-refcounts" in req:
                    assert qd["lazy-refcounts"] is True
                if "extended-l2" in req:
                    assert qd["extended-l2"] is True
                if req.get("version") == "v2":
                    assert qd["compat"] == "0.10", qd
                if "backing-file" in req:
                    assert q["backing-filename"] == "w64k.qcow2" and q["virtual-size"] == 16 * MiB, q
                    assert w.whole("c5") == w.refs["w64k"], "overlay does not read its backing data"
                qemu_img("check", w.p(req["name"]))
            bad = [
                ({"name": "c1", "size": MiB}, 409, "conflict"),
                ({"name": "w64k", "size": MiB}, 409, "conflict"),
                (b"{", 400, None), (b"[]", 400, None), (b"", 400, None),
                ({"name": "x", "size": MiB, "color": "red"}, 400, None),
                ({"name": "x", "size": "1M"}, 400, None),
                ({"name": "x", "size": -1}, 400, None),
                ({"name": "x"}, 400, None),
                ({"size": MiB}, 400, None),
                ({"name": "x", "size": MiB, "cluster-size": 1000}, 400, None),
                ({"name": "x", "size": MiB, "refcount-bits": 3}, 400, None),
                ({"name": "x", "size": MiB, "version": "3"}, 400, None),
                ({"name": "x", "size": MiB, "compression-type": "lz4"}, 400, None),
                ({"name": "x", "size": MiB, "preallocation": "full"}, 400, None),
                ({"name": "x", "size": MiB, "backing-file": "nosuch"}, 400, None),
                ({"name": "x", "size": MiB, "backing-file": "../etc/passwd"}, 400, None),
                ({"name": "x", "size": MiB, "backing-file": "/etc/passwd"}, 400, None),
                ({"name": "x", "backing-file": "w64k", "backing-fmt": "raw"}, 400, None),
                ({"name": "x", "size": MiB, "backing-fmt": "qcow2"}, 400, None),
                ({"name": "../x", "size": MiB}, 400, None),
                ({"name": "a/b", "size": MiB}, 400, None),
                ({"name": ".hidden", "size": MiB}, 400, None),
                ({"name": "", "size": MiB}, 400, None),
                ({"name": "x" * 129, "size": MiB}, 400, None),
                ({"name": "json:{}", "size": MiB}, 400, None),
                ({"name": "x", "size": 2 ** 62}, 400, "bad-request"),  # over --max-virtual-size
            ]
            base.sync_down(w.cat)
            before = sorted(os.listdir(w.cat))
            for req, want, code in bad:
                body = req if isinstance(req, bytes) else json.dumps(req)
                st, h, b = w.body_request("POST", "/v1/images", body)
                ck.expect_error("POST %s" % body[:60], st, want, h, b, code)
            base.sync_down(w.cat)
            assert sorted(os.listdir(w.cat)) == before, "a refused create left files: %s" % (
                set(os.listdir(w.cat)) ^ set(before))
            # delete
            st, h, b = d.request("DELETE", "/v1/images/w64k")
            ck.expect_error("DELETE image in use as backing", st, 409, h, b, "conflict")
            st, h, b = d.request("DELETE", "/v1/images/base")
            ck.expect_error("DELETE base of overlay", st, 409, h, b, "conflict")
            st, h, b = d.request("DELETE", "/v1/images/nosuch")
            ck.expect_error("DELETE unknown", st, 404, h, b, "not-found")
            st, h, b = d.request("DELETE", "/v1/images/..%2Fcatalog")
            ck.expect_error("DELETE hostile", st, 400, h, b, "bad-request")
            st, h, b = w.put("w64k", 0, b"x")
            ck.expect_error("PUT backing in use", st, 409, h, b, "conflict")
            for n in ("c5", "c1", "c2", "c3", "c4"):
                st, h, b = d.request("DELETE", "/v1/images/" + n)
                assert st == 204 and b == b"", (n, st, b)
                base.sync_down(w.cat, n + ".qcow2")
                assert not os.path.exists(w.p(n))
            st, h, b = d.request("GET", "/v1/images/c1")
            ck.expect_error("GET deleted", st, 404, h, b, "not-found")
            # the name is free again, and the new image is not the old one
            st, h, b = w.body_request("POST", "/v1/images", json.dumps({"name": "c1", "size": 2 * MiB}))
            assert st == 201, (st, b)
            assert w.whole("c1") == bytes(2 * MiB)
            st, h, b = d.request("DELETE", "/v1/images/c1")
            assert st == 204
            # a chain of three: the middle and the bottom are both in use
            for req in ({"name": "k1", "size": MiB}, {"name": "k2", "backing-file": "k1"},
                        {"name": "k3", "backing-file": "k2"}):
                st, h, b = w.body_request("POST", "/v1/images", json.dumps(req))
                assert st == 201, (req, st, b)
            for n, want in (("k1", 409), ("k2", 409), ("k3", 204), ("k2", 204), ("k1", 204)):
                st, h, b = d.request("DELETE", "/v1/images/" + n)
                assert st == want, (n, st, b)
        ck.case("create_and_delete", create_delete)

        def uploads():
            up = os.path.join(top, "up")
            os.mkdir(up)

            def mk(name, *a):
                qemu_img("create", "-q", "-f", "qcow2", *a, os.path.join(up, name), "1M")
                return os.path.join(up, name)

            good = mk("good.qcow2")
            base.qemu_io(good, "write -q -P 0x42 4096 100000")
            ov = mk("ov.qcow2", "-u", "-b", "overlay.qcow2", "-F", "qcow2")
            hostile = {
                "h_passwd": mk("h1.qcow2", "-u", "-b", "/etc/passwd", "-F", "raw"),
                "h_dotdot": mk("h2.qcow2", "-u", "-b", "../x.qcow2", "-F", "qcow2"),
                "h_json": mk("h3.qcow2", "-u", "-b", 'json:{"file":{"driver":"file","filename":"/etc/passwd"}}',
                             "-F", "raw"),
                "h_sub": mk("h4.qcow2", "-u", "-b", "sub/x.qcow2", "-F", "qcow2"),
                "h_missing": mk("h5.qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2"),
                "h_datafile": mk("h6.qcow2", "-o", "data_file=" + os.path.join(up, "h6.raw")),
                "h_self": mk("h7.qcow2", "-u", "-b", "h_self.qcow2", "-F", "qcow2"),
            }
            with open(os.path.join(up, "junk"), "wb") as f:
                f.write(rng.randbytes(200 * KiB))
            hostile["h_junk"] = os.path.join(up, "junk")
            with open(good, "rb") as f:
                bad_hdr = bytearray(f.read())
            bad_hdr[40:48] = (0x30008).to_bytes(8, "big")
            with open(os.path.join(up, "badhdr"), "wb") as f:
                f.write(bad_hdr)
            hostile["h_badhdr"] = os.path.join(up, "badhdr")
            base.sync_down(w.cat)
            before = sorted(os.listdir(w.cat))
            for name, path in hostile.items():
                with open(path, "rb") as f:
                    st, h, b = w.body_request("PUT", "/v1/images/%s/file" % name, f.read())
                ck.expect_error("upload " + name, st, 422, h, b)
            base.sync_down(w.cat)
            assert sorted(os.listdir(w.cat)) == before, "a refused upload left files: %s" % (
                set(os.listdir(w.cat)) ^ set(before))
            with open(good, "rb") as f:
                blob = f.read()
            st, h, b = w.body_request("PUT", "/v1/images/up1/file", blob)
            assert st == 201, (st, b)
            ck.json_of(st, h, b, "ImageInfo", "upload up1")
            assert h.get("location") == "/v1/images/up1"
            want = bytearray(MiB)
            want[4096:4096 + 100000] = b"\x42" * 100000
            assert w.whole("up1") == want, "uploaded image reads wrong"
            st, h, b = w.body_request("PUT", "/v1/images/up1/file", blob)
            ck.expect_error("upload over an existing name", st, 409, h, b, "conflict")
            with open(ov, "rb") as f:
                st, h, b = w.body_request("PUT", "/v1/images/up2/file", f.read())
            assert st == 201, (st, b)
            assert w.whole("up2") == w.refs["overlay"][:MiB], "uploaded overlay reads wrong"
            st, h, b = w.body_request("PUT", "/v1/images/..%2Fevil/file", blob)
            ck.expect_error("upload hostile name", st, 400, h, b, "bad-request")
            # cut short: the temporary file goes away
            base.sync_down(w.cat)
            names = sorted(os.listdir(w.cat))
            head = b"PUT /v1/images/up3/file HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(blob)
            raw_request(d.port, head, blob[:len(blob) // 2], read=False)
            time.sleep(0.5)
            base.sync_down(w.cat)
            assert sorted(os.listdir(w.cat)) == names, "an upload cut short left files: %s" % (
                set(os.listdir(w.cat)) ^ set(names))
            # download: the container's bytes
            st, h, b = d.request("GET", "/v1/images/up1/file")
            base.sync_down(w.cat, "up1.qcow2")
            assert st == 200 and b == open(w.p("up1"), "rb").read(), (st, len(b))
            st, h, b = d.request("GET", "/v1/images/up1/file", {"Range": "bytes=0-3"})
            assert st == 206 and b == b"QFI\xfb" and h["content-range"].startswith("bytes 0-3/"), (st, b, h)
            st, h, b = d.request("HEAD", "/v1/images/up1/file")
            assert st == 200 and int(h["content-length"]) == os.path.getsize(w.p("up1"))
            st, h, b = d.request("GET", "/v1/images/up1/file", {"Range": "bytes=99999999-"})
            ck.expect_error("file range past end", st, 416, h, b, "range-not-satisfiable")
            st, h, b = d.request("GET", "/v1/images/nosuch/file")
            ck.expect_error("file of unknown image", st, 404, h, b, "not-found")
            for n in ("up2", "up1"):
                assert d.request("DELETE", "/v1/images/" + n)[0] == 204
        ck.case("upload_good_and_hostile_and_download", uploads)

        def options():
            st, h, b = d.request("OPTIONS", "/v1/images/w64k/data")
            assert st == 200, (st, b)
            j = ck.json_of(st, h, b, "DataOptions", "options")
            assert j["features"] == ["extents", "zero", "flush", "discard"] and j["max_writers"] == 1, j
            assert j["max_readers"] >= 1
            st, h, b = d.request("OPTIONS", "/v1/images/nosuch/data")
            ck.expect_error("OPTIONS unknown", st, 404, h, b, "not-found")
        ck.case("options_features", options)

        def parallel():
            names = ["par%d" % i for i in range(WRITERS)]
            for n in names:
                st, h, b = w.body_request("POST", "/v1/images",
                                          json.dumps({"name": n, "size": PAR_BLOCK * PAR_BLOCKS,
                                                      "cluster-size": rng.choice([4096, 65536])}))
                assert st == 201, (st, b)
            versions = {n: [[bytes(PAR_BLOCK)] for _ in range(PAR_BLOCKS)] for n in names}
            lock = threading.Lock()
            errors = []
            done = threading.Event()

            def writer(n, seed):
                r = random.Random(seed)
                c = d.conn()
                try:
                    for _ in range(PAR_ROUNDS):
                        blk = r.randrange(PAR_BLOCKS)
                        data = r.randbytes(PAR_BLOCK)
                        with lock:
                            versions[n][blk].append(data)
                        st, h, b = w.put(n, blk * PAR_BLOCK, data, flush=r.random() < 0.2, conn=c)
                        if st != 204:
                            errors.append("%s: PUT status %d %r" % (n, st, b[:100]))
                            return
                except Exception as e:
                    errors.append("writer %s: %r" % (n, e))
                finally:
                    c.close()

            def reader(seed):
                r = random.Random(seed)
                c = d.conn()
                reads = 0
                try:
                    while not done.is_set() or reads < 10:
                        n = r.choice(names)
                        blk = r.randrange(PAR_BLOCKS)
                        got = w.read(n, blk * PAR_BLOCK, PAR_BLOCK, conn=c)
                        reads += 1
                        with lock:
                            known = list(versions[n][blk])
                        if got not in known:
                            errors.append("%s block %d: read a version nobody wrote" % (n, blk))
                            return
                except Exception as e:
                    errors.append("reader: %r" % e)
                finally:
                    c.close()

            ws = [threading.Thread(target=writer, args=(n, rng.random())) for n in names]
            rs = [threading.Thread(target=reader, args=(rng.random(),)) for _ in range(8)]
            for t in ws + rs:
                t.start()
            for t in ws:
                t.join()
            done.set()
            for t in rs:
                t.join()
            assert not errors, errors[:3]
            for n in names:
                want = b"".join(v[-1] for v in versions[n])
                w.refs[n] = bytearray(want)
                got = w.whole(n)
                assert got == want, "%s: final content differs" % n
        ck.case("parallel_writers_and_readers_every_byte", parallel)

        def metrics():
            st, h, b = d.request("GET", "/metrics")
            assert st == 200 and h["content-type"].startswith("text/plain"), (st, h)
            text = b.decode()
            vals = {}
            for ln in text.splitlines():
                if ln.startswith("#") or not ln:
                    continue
                k, v = ln.rsplit(" ", 1)
                vals[k] = float(v)
            assert vals.get('qcowd_http_requests_total{method="PUT",code="204"}', 0) >= 200 * WRITE_BATCHES // 3, text[:500]
            assert vals.get('qcowd_http_requests_total{method="PATCH",code="400"}', 0) >= 10
            assert vals["qcowd_http_request_body_bytes_total"] > 10 * MiB
            assert vals["qcowd_http_response_body_bytes_total"] > 10 * MiB
            assert vals['qcowd_http_request_duration_seconds_bucket{le="+Inf"}'] == \
                vals["qcowd_http_request_duration_seconds_count"] > 300
            assert vals["qcowd_open_images"] >= 5
            assert vals["qcowd_http_requests_in_flight"] >= 1
        ck.case("metrics_prometheus_text", metrics)

        def schemas():
            for name, body, where in ck.seen:
                try:
                    base.validate(ck.doc, name, body)
                except base.jsonschema.ValidationError as e:
                    raise AssertionError("%s: %s" % (where, e.message))
            assert len(ck.seen) > 50, len(ck.seen)
        ck.case("responses_match_openapi_schemas", schemas)

        def sigterm_then_qemu():
            # an upload stalled in the middle when SIGTERM comes: it is cut, the rest stops cleanly
            s = socket.create_connection(("127.0.0.1", d.port), timeout=30)
            s.sendall(b"PUT /v1/images/wext/data?offset=0 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n" +
                      bytes(w.refs["wext"][:1000]))
            time.sleep(0.3)
            d.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            s.close()
            d.check_clean_exit(90)
            base.sync_down(w.cat)
            for n in sorted(w.refs):
                r = subprocess.run([base.QEMU_IMG, "check", "-f", "qcow2", w.p(n)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
                assert r.returncode == 0, "%s: qemu-img check: %s" % (n, r.stdout.decode()[-500:])
                q = json.loads(qemu_img("info", "--output=json", w.p(n)).stdout)
                assert not q.get("dirty-flag"), "%s: dirty flag left set" % n
                refpath = os.path.join(top, n + ".final.raw")
                with open(refpath, "wb") as f:
                    f.write(w.refs[n])
                r = subprocess.run([base.QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", refpath, w.p(n)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                assert r.returncode == 0, "%s: qemu-img compare: %s" % (n, r.stdout.decode()[-300:])
            assert raw_bytes(w.cat, "base", top) == w.base_raw, "the backing image changed"
            leftovers = [f for f in os.listdir(w.cat) if f.endswith(".tmp")]
            assert not leftovers, leftovers
        ck.case("sigterm_then_qemu_img_check_and_compare", sigterm_then_qemu)
    except Exception:
        ck.setup_failed()
    finally:
        base.finish(top, args.keep, [w.d])
    return ck.report()


if __name__ == "__main__":
    sys.exit(main())
