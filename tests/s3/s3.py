#!/usr/bin/python3
"""s3.py: qcowd with its catalog in a bucket of a real, strict S3 server (Swift +
s3api on loopback, started here): reads checked against qemu-img, the bytes a
4 KiB read fetches, writes published and seen after a restart, a multipart
publish that copies unchanged parts server-side, a crash between the parts and
CompleteMultipartUpload that leaves the old image whole, a CompleteMultipartUpload
whose answer is lost (published all the same) or that really failed (an error),
a catalog of more keys than one ListObjectsV2 page holds, backing chains across
objects, every storage failure (wrong secret, missing bucket, unreachable
endpoint, throttling, 5xx, timeouts) answered with a clear error while the
daemon and the other images go on, and what stat-ttl saves, counted through
/metrics (no HEAD for reads of an open image nor for listings within the TTL),
with an object replaced behind qcowd's back noticed after the TTL (at once
with stat-ttl=0) and qcowd's own changes seen at once; what a flush after small
writes to a large object costs (a few large UploadPartCopy ranges, a 5 MiB
part per write), read-ahead GETs in flight at once (counted by qcowd and by a
latency-injecting proxy), read-ahead never mixing two versions of an object
(replaced outside, or published by us), and one GET per random 4 KiB read.
Images are made under their final names (a deferred publish): an upload is
invisible until complete (no temporary object, no copy, no DELETE), its parts
stream to the store while the body arrives, and a crash or kill -9 before the
Complete leaves no image and an upload the next start aborts. An upload's
staging is bounded (parts sent are punched out, only the qcow2 metadata is
kept, the writer waits at staging-max), tables anywhere in the file included;
an upload held back by a slow store sleeps suspended, not on a server thread.

Environment: QCOWD (the binary, required); S3_ENDPOINT to use a running store
instead of starting Swift. Exit 77 (skip) when Swift is not installed.
"""
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import faultproxy  # noqa: E402
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
import qcowd  # noqa: E402  (the daemon's start-up and log pump)
import s3fixture  # noqa: E402

QCOWD = os.environ.get("QCOWD", "")
BUCKET = "qcowd-s3-%d-%d" % (os.getpid(), int(time.time()) % 100000)
MiB = 1 << 20
LISTED = 1100  # keys in the listing case: past S3's 1000 per ListObjectsV2 answer


def run(*cmd):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)


class Qcowd(qcowd.Qcowd):
    """qcowd on a free port with an s3 catalog; stderr kept in .lines."""

    def __init__(self, s3, prefix, staging, endpoint=None, env_extra=None, secret=None, opts=(), expect_fail=False,
                 args_extra=()):
        args = ["--threads", "4", "--catalog", "s3://%s/%s" % (BUCKET, prefix),
                "--s3-endpoint", endpoint or s3.endpoint, "--s3-opt", "staging-dir=" + staging,
                "--s3-opt", "allow-http=yes"] + list(args_extra)
        for o in opts:
            args += ["--s3-opt", o]
        env = s3.env(secret)
        env.update(env_extra or {})
        super().__init__(QCOWD, args, env=env, expect_fail=expect_fail)

    def request(self, method, path, body=None, headers=None):
        """exchange() without the answer's headers: (status, body)."""
        st, _, b = self.exchange(method, path, body, headers)
        return st, b

    def json(self, method, path, doc=None):
        body = json.dumps(doc).encode() if doc is not None else None
        st, b = self.request(method, path, body, {"Content-Type": "application/json"} if body else None)
        return st, (json.loads(b) if b else None)

    def read(self, name, off, n):
        st, b = self.request("GET", "/v1/images/%s/data" % name, headers={"Range": "bytes=%d-%d" % (off, off + n - 1)})
        if st != 206:
            raise AssertionError("read %s %d+%d: %d %s" % (name, off, n, st, b[:300]))
        return b

    def write(self, name, off, data, flush="y"):
        st, b = self.request("PUT", "/v1/images/%s/data?flush=%s" % (name, flush), data,
                             {"Content-Range": "bytes %d-%d/*" % (off, off + len(data) - 1)})
        if st // 100 != 2:
            raise AssertionError("write %s: %d %s" % (name, st, b[:300]))

    def metric(self, name):
        st, b = self.request("GET", "/metrics")
        m = re.search(r"^qcowd_storage_%s_total\{scheme=\"s3\"\} (\d+)$" % name, b.decode(), re.M)
        return int(m.group(1)) if m else 0

    def wait_exit(self, timeout=60):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        """SIGTERM, SIGKILL after 60 s; AssertionError unless it exited 0 (or was killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(60) is None:
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode not in (0, -9):
            raise AssertionError("qcowd exited with %s:\n%s" % (self.proc.returncode, "\n".join(self.lines[-20:])))


class Ctx:
    def __init__(self, s3, tmp):
        self.s3, self.tmp = s3, tmp
        self.staging = os.path.join(tmp, "staging")
        self.n = 0

    def image(self, name, size, *qemu_io_cmds, opts=None):
        path = os.path.join(self.tmp, name + ".qcow2")
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) + [path, str(size)]
        run(*cmd)
        if qemu_io_cmds:
            args = ["qemu-io", "-f", "qcow2"]
            for c in qemu_io_cmds:
                args += ["-c", c]
            run(*(args + [path]))
        return path

    def raw(self, path):
        out = path + ".raw"
        run("qemu-img", "convert", "-O", "raw", path, out)
        with open(out, "rb") as f:
            data = f.read()
        os.unlink(out)
        return data

    def prefix(self):
        """A fresh catalog prefix in the bucket, one per case."""
        self.n += 1
        return "case%d" % self.n

    def upload(self, prefix, path, name=None):
        name = name or os.path.basename(path)
        self.s3.put_file(BUCKET, "%s/%s" % (prefix, name), path)

    def qcowd(self, prefix, **kw):
        return Qcowd(self.s3, prefix, self.staging, **kw)

    def download_checked(self, prefix, name):
        """The object prefix/name.qcow2 downloaded, after qemu-img check passed on it: its path."""
        out = os.path.join(self.tmp, name + "-dl.qcow2")
        with open(out, "wb") as f:
            f.write(self.s3.get(BUCKET, "%s/%s.qcow2" % (prefix, name)))
        run("qemu-img", "check", out)
        return out


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


# ---- cases ----

def reads_match_qemu(c):
    """Ranged reads and extents of an image in the bucket equal qemu-img's view."""
    p = c.prefix()
    img = c.image("a", 64 * MiB, "write -P 0xa1 0 1M", "write -P 0x5c 5M 192k", "write -z 12M 1M",
                  "write -c -P 0x11 20M 64k", "write -P 0x77 63M 64k")
    c.upload(p, img)
    raw = c.raw(img)
    d = c.qcowd(p)
    try:
        st, doc = d.json("GET", "/v1/images")
        check(st == 200 and [i["name"] for i in doc["images"]] == ["a"], "list: %s %s" % (st, doc))
        for off, n in ((0, 4096), (1 * MiB - 100, 200), (5 * MiB, 192 * 1024), (20 * MiB, 65536),
                       (63 * MiB + 4000, 70000 - 4000), (30 * MiB, MiB)):
            check(d.read("a", off, n) == raw[off:off + n], "range %d+%d differs from qemu-img" % (off, n))
        st, b = d.request("GET", "/v1/images/a/data")
        check(st == 200 and b == raw, "whole-disk read differs (%d, %d bytes)" % (st, len(b)))
        st, ext = d.json("GET", "/v1/images/a/extents?context=zero")
        check(st == 200 and sum(e["length"] for e in ext) == 64 * MiB, "extents: %s" % st)
        data_at = [e for e in ext if not e["zero"]]
        check(any(e["start"] == 0 for e in data_at), "extents: no data at 0: %s" % ext)
    finally:
        d.stop()


def small_read_fetches_few_blocks(c):
    """A 4 KiB read of a 64 MiB image fetches a few cache blocks, not the object."""
    p = c.prefix()
    img = c.image("big", 64 * MiB, "write -P 0x3c 0 64M")
    c.upload(p, img)
    d = c.qcowd(p, opts=("block-size=256k",))
    try:
        before = d.metric("bytes_received")
        gets0 = d.metric("requests_get")
        check(d.read("big", 40 * MiB + 123, 4096) == b"\x3c" * 4096, "4 KiB read: wrong bytes")
        got = d.metric("bytes_received") - before
        gets = d.metric("requests_get") - gets0
        print("    4 KiB read of a %d MiB object: %d bytes fetched in %d GETs" %
              (os.path.getsize(img) // MiB, got, gets))
        check(0 < got <= 4 * 256 * 1024, "a 4 KiB read fetched %d bytes" % got)
        again = d.metric("bytes_received")
        d.read("big", 40 * MiB + 123, 4096)
        check(d.metric("bytes_received") == again, "a repeated read was not served from the cache")
    finally:
        d.stop()


def writes_survive_restart(c):
    """Writes flushed through the API are in the bucket: a new qcowd reads them,
    and qemu-img agrees with a download of the object."""
    p = c.prefix()
    c.upload(p, c.image("w", 16 * MiB, "write -P 0x01 0 16M"))
    d = c.qcowd(p)
    data = os.urandom(300000)
    try:
        d.write("w", 3 * MiB + 17, data)
        check(d.read("w", 3 * MiB + 17, len(data)) == data, "read after write differs")
    finally:
        d.stop()
    d = c.qcowd(p)
    try:
        check(d.read("w", 3 * MiB + 17, len(data)) == data, "write lost across a restart")
        check(d.read("w", 0, 4096) == b"\x01" * 4096, "unwritten data changed")
    finally:
        d.stop()
    raw = c.raw(c.download_checked(p, "w"))
    check(raw[3 * MiB + 17:3 * MiB + 17 + len(data)] == data, "qemu-img reads other bytes from the object")


def publish_copies_unchanged_parts(c):
    """A small write to a large image publishes with UploadPartCopy for the
    untouched stretches: few bytes sent, many copied server-side, in a few
    large copies (not one per part-size)."""
    p = c.prefix()
    c.upload(p, c.image("m", 64 * MiB, "write -P 0x42 0 40M"))
    d = c.qcowd(p, opts=("part-size=5M",))
    try:
        sent0, copied0, copies0 = d.metric("bytes_sent"), d.metric("bytes_copied"), d.metric("requests_copy")
        d.write("m", 30 * MiB, b"\x99" * 65536)
        sent, copied = d.metric("bytes_sent") - sent0, d.metric("bytes_copied") - copied0
        print("    64 KiB write to a 40 MiB object: %d bytes sent, %d copied server-side" % (sent, copied))
        check(copied >= 25 * MiB, "only %d bytes copied server-side" % copied)
        check(sent <= 3 * 5 * MiB + MiB, "%d bytes uploaded for a 64 KiB write" % sent)
        copies = d.metric("requests_copy") - copies0
        print("    %d UploadPartCopy, %d UploadPart, %d retries" % (copies, d.metric("requests_upload_part"), d.metric("retries")))
        check(1 <= copies <= 2, "%d UploadPartCopy requests" % copies)
    finally:
        d.stop()
    d = c.qcowd(p)
    try:
        check(d.read("m", 30 * MiB, 65536) == b"\x99" * 65536, "written part lost")
        check(d.read("m", 10 * MiB, 65536) == b"\x42" * 65536, "copied part differs")
        check(d.read("m", 39 * MiB, 65536) == b"\x42" * 65536, "copied part differs at the end")
    finally:
        d.stop()


def flush_cost_of_small_writes(c):
    """4 KiB writes at the start, the middle and the end of a 160 MiB object,
    then a flush: the unchanged stretches are copied server-side in a few large
    UploadPartCopy ranges and only a minimum part (5 MiB) around each write is
    uploaded, counted through /metrics (the fixed grid of 8 MiB parts made 20
    requests); with copy-max=16M the copies come in parts of at most 16 MiB.
    The bytes are right after a restart, and qemu-img checks the object."""
    p = c.prefix()
    size = 160 * MiB
    img = c.image("fc", size, opts="preallocation=falloc")
    c.upload(p, img)
    offs = (4096, 77 * MiB + 4096, size - 4096)
    for copy_max, want_copies in (("5G", (2, 2)), ("16M", (8, 12))):
        d = c.qcowd(p, opts=("copy-max=" + copy_max,))
        try:
            d.read("fc", 0, 4096)
            names = ("requests_copy", "requests_upload_part", "requests_put", "bytes_sent", "bytes_copied")
            m0 = {n: d.metric(n) for n in names}
            for i, off in enumerate(offs):
                d.write("fc", off, bytes([0x70 + i]) * 4096, flush="n")
            st, b = d.json("PATCH", "/v1/images/fc/data", {"op": "flush"})
            check(st // 100 == 2, "flush: %s %s" % (st, b))
            m = {n: d.metric(n) - m0[n] for n in names}
            print("    copy-max=%s: 3 writes of 4 KiB + flush on a %d MiB object: %d UploadPartCopy, %d UploadPart, "
                  "%.1f MiB sent, %.1f MiB copied" % (copy_max, os.path.getsize(img) // MiB, m["requests_copy"],
                                                      m["requests_upload_part"], m["bytes_sent"] / MiB,
                                                      m["bytes_copied"] / MiB))
            check(want_copies[0] <= m["requests_copy"] <= want_copies[1], "copies: %s" % m)
            check(m["requests_upload_part"] == 3 and m["requests_put"] == 0, "uploads: %s" % m)
            check(m["bytes_sent"] <= 3 * 5 * MiB + MiB, "sent: %s" % m)
            check(m["bytes_copied"] >= os.path.getsize(img) - 16 * MiB, "copied: %s" % m)
        finally:
            d.stop()
        d = c.qcowd(p)
        try:
            for i, off in enumerate(offs):
                check(d.read("fc", off, 4096) == bytes([0x70 + i]) * 4096, "write at %d lost" % off)
                check(d.read("fc", off - 4096, 4096) == b"\0" * 4096, "bytes before %d changed" % off)
        finally:
            d.stop()
    os.unlink(c.download_checked(p, "fc"))


def parallel_readahead(c):
    """A whole-disk read through a proxy that delays every GET by 50 ms: the
    data is right, read-ahead GETs ran on the workers and several GETs were in
    flight at once, as qcowd counts them (gets_in_flight_peak) and as the proxy
    saw them (requests it held at once); with readahead-gets=0 (read-ahead
    inside the reader's own GET, the old way) the peak is 1."""
    p = c.prefix()
    img = c.image("pr", 48 * MiB, "write -P 0x5e 0 48M")
    c.upload(p, img)
    raw = c.raw(img)
    px = faultproxy.FaultProxy(c.s3.endpoint)
    try:
        px.fault("delay", match="/pr.qcow2", arg=0.05, method="GET")
        for opts in ((), ("readahead-gets=0",)):
            d = c.qcowd(p, endpoint=px.endpoint, opts=opts)
            try:
                names = ("requests_get", "readahead_gets", "gets_in_flight_peak", "readahead_waits")
                m0 = {n: d.metric(n) for n in names}
                px.peak = 0
                t = time.time()
                st, b = d.request("GET", "/v1/images/pr/data")
                secs = time.time() - t
                m = {n: d.metric(n) - m0[n] for n in names}
                m["gets_in_flight_peak"] = d.metric("gets_in_flight_peak")
                print("    %s: whole-disk read of 48 MiB in %.2f s: %s, the proxy held %d at once" %
                      (opts or "default", secs, m, px.peak))
                check(st == 200 and b == raw, "whole-disk read differs")
                if opts:
                    check(m["gets_in_flight_peak"] == 1 and m["readahead_gets"] == 0 and px.peak == 1,
                          "inline: %s, proxy %d" % (m, px.peak))
                else:
                    check(m["gets_in_flight_peak"] >= 3 and px.peak >= 3, "GETs in flight at most %d (proxy: %d)" %
                          (m["gets_in_flight_peak"], px.peak))
                    check(m["readahead_gets"] >= 4, "read-ahead GETs: %s" % m)
            finally:
                d.stop()
    finally:
        px.stop()


def readahead_never_mixes_versions(c):
    """Read-ahead GETs in flight (slowed by a proxy) when the object is
    replaced behind qcowd's back: every read that succeeds gives the old
    image's bytes, none the new one's nor a mix, and the answers of the new
    version are dropped (counted); a flush of our own write while read-ahead
    runs leaves the written bytes, not what read-ahead fetched before. (Once
    a read or a read-ahead GET met the new ETag, the catalog's next check
    reopens the image: whole reads of the new bytes are fine then, but never
    old bytes again.)"""
    p = c.prefix()
    old = c.image("rv", 24 * MiB, "write -P 0xa1 0 24M")
    new = c.image("rv-new", 24 * MiB, "write -P 0xb2 0 24M")
    c.upload(p, old, "rv.qcow2")
    px = faultproxy.FaultProxy(c.s3.endpoint)
    d = c.qcowd(p, endpoint=px.endpoint, opts=("stat-ttl=600",))
    try:
        px.fault("delay", match="/rv.qcow2", arg=0.3, method="GET")
        for off in range(0, 3 * MiB, 256 * 1024):  # sequential: read-ahead starts
            check(d.read("rv", off, 256 * 1024) == b"\xa1" * 262144, "read before the replacement")
        dropped0 = d.metric("readahead_dropped")
        c.upload(p, new, "rv.qcow2")  # while read-ahead GETs wait in the proxy
        seen_ok = errors = seen_new = 0
        for off in range(3 * MiB, 24 * MiB, 256 * 1024):
            st, b = d.request("GET", "/v1/images/rv/data", headers={"Range": "bytes=%d-%d" % (off, off + 262143)})
            if st == 206 and b == b"\xb2" * 262144:  # reopened: a read-ahead GET or a read met the new ETag
                seen_new += 1
            elif st == 206:
                check(b == b"\xa1" * 262144 and not seen_new, "read at %d after the replacement: %r..." % (off, b[:8]))
                seen_ok += 1
            else:
                check(st == 503 and b"replaced" in b, "read at %d: %d %s" % (off, st, b[:200]))
                errors += 1
        dropped = d.metric("readahead_dropped") - dropped0
        print("    after the replacement: %d reads of old bytes, %d refused, %d of the new image (reopened); "
              "%d read-ahead answers dropped" % (seen_ok, errors, seen_new, dropped))
        check(errors + seen_new > 0, "the replacement was never noticed")
        check(dropped > 0, "no read-ahead answer was dropped")
    finally:
        d.stop()
        px.stop()
    # our own publish while read-ahead GETs are in flight
    c.upload(p, old, "rw.qcow2")
    px = faultproxy.FaultProxy(c.s3.endpoint)
    d = c.qcowd(p, endpoint=px.endpoint, opts=("part-size=5M",))
    try:
        px.fault("delay", match="/rw.qcow2", arg=0.2, method="GET")
        for off in range(0, 2 * MiB, 256 * 1024):
            d.read("rw", off, 256 * 1024)
        d.write("rw", 2 * MiB + 4096, b"\xcd" * 65536)  # where read-ahead is fetching
        check(d.read("rw", 2 * MiB, 4096 + 65536 + 4096) == b"\xa1" * 4096 + b"\xcd" * 65536 + b"\xa1" * 4096,
              "a read after our own publish gives other bytes")
        st, b = d.request("GET", "/v1/images/rw/data")
        want = bytearray(c.raw(old))
        want[2 * MiB + 4096:2 * MiB + 4096 + 65536] = b"\xcd" * 65536
        check(st == 200 and b == bytes(want), "whole read after our own publish differs")
    finally:
        d.stop()
        px.stop()


def random_reads_one_get_each(c):
    """4 KiB reads at random offsets of a 64 MiB image (each in a MiB of its
    own) cost one GET each of one cache block (64 KiB by default), no HEAD
    and no read-ahead."""
    p = c.prefix()
    img = c.image("rr", 64 * MiB, "write -P 0x3d 0 64M")
    c.upload(p, img)
    d = c.qcowd(p, opts=("stat-ttl=60",))  # within the TTL: no HEAD at all
    try:
        d.read("rr", 0, 4096)  # opened, L2 table cached
        names = ("requests_get", "requests_head", "bytes_received", "readahead_gets")
        m0 = {n: d.metric(n) for n in names}
        rng = random.Random(3)
        slots = rng.sample(range(1, 64), 24)
        for s in slots:
            off = s * MiB + rng.randrange(256) * 4096
            check(d.read("rr", off, 4096) == b"\x3d" * 4096, "read at %d" % off)
        m = {n: d.metric(n) - m0[n] for n in names}
        print("    %d random 4 KiB reads: %s" % (len(slots), m))
        check(m["requests_get"] == len(slots), "GETs: %s" % m)
        check(m["requests_head"] == 0 and m["readahead_gets"] == 0, "HEADs or read-ahead: %s" % m)
        check(m["bytes_received"] <= len(slots) * 64 * 1024, "bytes: %s" % m)
    finally:
        d.stop()


def crash_before_complete_keeps_old_image(c):
    """qcowd killed after uploading the parts, before CompleteMultipartUpload:
    the bucket still holds the old image, and the next run discards the staging
    cache with a log line (and aborts the upload)."""
    p = c.prefix()
    c.upload(p, c.image("k", 32 * MiB, "write -P 0x10 0 20M"))
    old = c.s3.get(BUCKET, p + "/k.qcow2")
    d = c.qcowd(p, opts=("part-size=5M",), env_extra={"QCOWD_S3_TEST_CRASH": "before-complete"})
    try:
        d.write("k", MiB, b"\xee" * 65536)
    except (AssertionError, OSError, http.client.HTTPException):
        pass
    rc = d.wait_exit(60)
    check(rc == -signal.SIGKILL, "qcowd did not die at the crash point (exit %s)" % rc)
    check(any("QCOWD_S3_TEST_CRASH" in l for l in d.lines), "no crash line")
    check(c.s3.get(BUCKET, p + "/k.qcow2") == old, "the object changed although the publish never completed")
    d = c.qcowd(p)
    try:
        check(d.read("k", MiB, 65536) == b"\x10" * 65536, "the old data is not what qcowd reads")
        d.json("GET", "/v1/images/k")
        d.write("k", 2 * MiB, b"\x22" * 4096)  # opens it read-write: the leftover is seen
        check(any("discarded the staging cache" in l for l in d.lines),
              "no log line about the leftover staging cache:\n" + "\n".join(d.lines))
        check(any("unfinished multipart upload is aborted" in l for l in d.lines), "upload not aborted")
    finally:
        d.stop()
    out = os.path.join(c.tmp, "k-dl.qcow2")
    with open(out, "wb") as f:
        f.write(c.s3.get(BUCKET, p + "/k.qcow2"))
    run("qemu-img", "check", out)


def create_upload_delete_chain(c):
    """create, upload (PUT .../file), a backing chain across objects, delete;
    images are published under their final names: no copy, no rename, no
    temporary object, no DELETE before the deletes asked for."""
    p = c.prefix()
    d = c.qcowd(p, opts=("copy-max=5M", "part-size=5M"))
    try:
        st, doc = d.json("POST", "/v1/images", {"name": "base", "size": 8 * MiB})
        check(st == 201, "create base: %s %s" % (st, doc))
        d.write("base", 0, b"\xb0" * 65536)
        st, doc = d.json("POST", "/v1/images", {"name": "top", "size": 8 * MiB, "backing-file": "base"})
        check(st == 201, "create top: %s %s" % (st, doc))
        check(doc.get("backing-filename") == "base.qcow2", "backing name: %s" % doc)
        d.write("top", 4096, b"\x70" * 4096)
        got = d.read("top", 0, 3 * 4096)
        check(got == b"\xb0" * 4096 + b"\x70" * 4096 + b"\xb0" * 4096, "chain read wrong")
        up = c.image("up", 16 * MiB, "write -P 0x0f 0 12M")
        with open(up, "rb") as f:
            st, b = d.request("PUT", "/v1/images/up/file", f.read())
        check(st == 201, "upload: %s %s" % (st, b[:200]))
        check(d.read("up", 0, 4096) == b"\x0f" * 4096, "uploaded image reads wrong")
        check(d.read("up", 12 * MiB - 4096, 4096) == b"\x0f" * 4096, "uploaded image reads wrong at the end")
        for m in ("requests_copy", "bytes_copied", "requests_delete"):
            check(d.metric(m) == 0, "publishing the images cost %s %d" % (m, d.metric(m)))
        check(d.metric("requests_upload_part") >= 2, "the 12 MiB upload was not one multipart upload of 5 MiB parts")
        st, doc = d.json("GET", "/v1/images")
        check(sorted(i["name"] for i in doc["images"]) == ["base", "top", "up"], "list: %s" % doc)
        st, doc = d.json("DELETE", "/v1/images/base")
        check(st == 409, "deleting a backing image: %s %s" % (st, doc))
        for n in ("top", "base", "up"):
            st, doc = d.json("DELETE", "/v1/images/" + n)
            check(st == 204, "delete %s: %s %s" % (n, st, doc))
        # the job records (.qcowd-jobs.json) live in the catalog too, images do not
        keys = [k for k in c.s3.keys(BUCKET, p + "/") if not k.endswith("/.qcowd-jobs.json")]
        check(keys == [], "objects left behind: %s" % keys)
        check(c.s3.uploads(BUCKET) == [], "multipart uploads left behind")
    finally:
        d.stop()


def upload_invisible_until_complete(c):
    """A resumable upload waiting between its pieces, into a bucket: neither the
    image nor any temporary object is in the bucket, nor in qcowd's listing;
    the last piece publishes it under its name with no copy, no rename and no
    DELETE. An upload that fails validation leaves nothing behind."""
    p = c.prefix()
    d = c.qcowd(p, opts=("part-size=5M",))
    try:
        src = c.image("r", 16 * MiB, "write -P 0x3c 0 12M")
        with open(src, "rb") as f:
            data = f.read()
        half = len(data) // 2
        st, b = d.request("PUT", "/v1/images/r/file", data[:half],
                          {"Content-Range": "bytes 0-%d/%d" % (half - 1, len(data))})
        check(st == 202, "first piece: %s %s" % (st, b[:200]))
        keys = [k for k in c.s3.keys(BUCKET, p + "/") if not k.endswith("/.qcowd-jobs.json")]
        check(keys == [], "objects visible while the upload waits: %s" % keys)
        st, doc = d.json("GET", "/v1/images")
        check([i["name"] for i in doc["images"]] == [], "listed while uploading: %s" % doc)
        st, b = d.request("PUT", "/v1/images/r/file", data[half:],
                          {"Content-Range": "bytes %d-%d/%d" % (half, len(data) - 1, len(data))})
        check(st == 201, "last piece: %s %s" % (st, b[:200]))
        check(c.s3.keys(BUCKET, p + "/r") == [p + "/r.qcow2"], "keys: %s" % c.s3.keys(BUCKET, p + "/"))
        check(c.s3.get(BUCKET, p + "/r.qcow2") == data, "the object is not the uploaded file")
        check(d.read("r", 12 * MiB - 4096, 4096) == b"\x3c" * 4096, "the upload reads wrong")
        for m in ("requests_copy", "bytes_copied", "requests_delete"):
            check(d.metric(m) == 0, "the upload cost %s %d" % (m, d.metric(m)))
        bad = bytearray(data)
        bad[len(bad) - 4096:] = b"\xff" * 4096
        bad[0x30:0x38] = b"\xff" * 8  # l1_table_offset far past the end: not a valid image
        st, b = d.request("PUT", "/v1/images/bad/file", bytes(bad))
        check(st // 100 == 4, "an invalid upload was taken: %s %s" % (st, b[:200]))
        keys = [k for k in c.s3.keys(BUCKET, p + "/") if not k.endswith("/.qcowd-jobs.json")]
        check(keys == [p + "/r.qcow2"], "objects after a refused upload: %s" % keys)
        check(c.s3.uploads(BUCKET) == [], "multipart uploads left behind")
    finally:
        d.stop()


def upload_streams_parts(c, extra=()):
    """An upload's parts go to the store while its body is still arriving: with
    the first 30 MiB of a resumable upload received (and staging-max far below
    it), four 5 MiB parts are already uploaded to a multipart upload on the
    final key, nothing is visible yet, and at the end every part has been sent
    exactly once (no second copy of what was streamed, no server-side copy).
    extra: more --s3-opt settings."""
    p = c.prefix()
    d = c.qcowd(p, opts=("part-size=5M", "staging-max=8M") + tuple(extra))
    try:
        src = c.image("s", 48 * MiB, "write -P 0x77 0 40M")
        with open(src, "rb") as f:
            data = f.read()
        first = 30 * MiB
        st, b = d.request("PUT", "/v1/images/s/file", data[:first],
                          {"Content-Range": "bytes 0-%d/%d" % (first - 1, len(data))})
        check(st == 202, "first piece: %s %s" % (st, b[:200]))
        deadline = time.time() + 20
        while d.metric("requests_upload_part") < 4 and time.time() < deadline:
            time.sleep(0.1)
        check(d.metric("requests_upload_part") == 4, "parts uploaded while the body arrives: %d (4 expected)"
              % d.metric("requests_upload_part"))
        check(len(c.s3.uploads(BUCKET)) == 1, "no multipart upload in progress: %s" % c.s3.uploads(BUCKET))
        keys = [k for k in c.s3.keys(BUCKET, p + "/") if not k.endswith("/.qcowd-jobs.json")]
        check(keys == [], "objects visible while the upload waits: %s" % keys)
        st, b = d.request("PUT", "/v1/images/s/file", data[first:],
                          {"Content-Range": "bytes %d-%d/%d" % (first, len(data) - 1, len(data))})
        check(st == 201, "last piece: %s %s" % (st, b[:200]))
        check(c.s3.get(BUCKET, p + "/s.qcow2") == data, "the object is not the uploaded file")
        parts = (len(data) + 5 * MiB - 1) // (5 * MiB)
        check(d.metric("requests_upload_part") == parts, "%d parts sent for %d parts"
              % (d.metric("requests_upload_part"), parts))
        for m in ("requests_copy", "bytes_copied", "requests_delete"):
            check(d.metric(m) == 0, "the upload cost %s %d" % (m, d.metric(m)))
        check(d.read("s", 40 * MiB - 4096, 4096) == b"\x77" * 4096, "the upload reads wrong")
        check(c.s3.uploads(BUCKET) == [], "multipart uploads left behind")
    finally:
        d.stop()


def restart_aborts_dead_upload(c, p, what, then=None):
    """After qcowd died (what: "the kill") with an upload to catalog p unfinished:
    no object in p, one multipart upload pending; a new start lists no image,
    logs that it dropped the dead run's publish and aborts its upload; then(d)
    runs on that new qcowd, if given."""
    keys = [k for k in c.s3.keys(BUCKET, p + "/") if not k.endswith("/.qcowd-jobs.json")]
    check(keys == [], "objects after %s: %s" % (what, keys))
    check(len(c.s3.uploads(BUCKET)) == 1, "the dead run's upload is not pending: %s" % c.s3.uploads(BUCKET))
    d = c.qcowd(p)
    try:
        st, doc = d.json("GET", "/v1/images")
        check(st == 200 and doc["images"] == [], "list after %s: %s %s" % (what, st, doc))
        check(any("dropped the unfinished publish" in l for l in d.lines),
              "no log line about the dead run's publish:\n" + "\n".join(d.lines))
        check(c.s3.uploads(BUCKET) == [], "the dead run's multipart upload was not aborted")
        if then:
            then(d)
    finally:
        d.stop()


def first_piece_streamed(c, d, name):
    """A resumable upload of a 32 MiB image name to d, its first 20 MiB sent
    and two parts of them streamed to the store: (the file, the piece's size)."""
    src = c.image(name, 32 * MiB, "write -P 0x6d 0 24M")
    with open(src, "rb") as f:
        data = f.read()
    first = 20 * MiB
    st, b = d.request("PUT", "/v1/images/%s/file" % name, data[:first],
                      {"Content-Range": "bytes 0-%d/%d" % (first - 1, len(data))})
    check(st == 202, "first piece: %s %s" % (st, b[:200]))
    deadline = time.time() + 20
    while d.metric("requests_upload_part") < 2 and time.time() < deadline:
        time.sleep(0.1)
    check(d.metric("requests_upload_part") >= 2, "no part streamed after the first piece")
    return data, first


def kill_mid_stream(c):
    """kill -9 of qcowd while an upload waits for its last piece with parts
    already streamed: no object of that name, and the next start aborts the
    dead run's multipart upload; the name can then be uploaded afresh."""
    p = c.prefix()
    d = c.qcowd(p, opts=("part-size=5M",))
    try:
        data, _ = first_piece_streamed(c, d, "m")
    finally:
        d.proc.kill()
        d.wait_exit(60)

    def upload_afresh(d):
        st, b = d.request("PUT", "/v1/images/m/file", data)
        check(st == 201, "upload after the kill: %s %s" % (st, b[:200]))
        check(c.s3.get(BUCKET, p + "/m.qcow2") == data, "the object is not the uploaded file")
    restart_aborts_dead_upload(c, p, "the kill", upload_afresh)


def upload_until_crash(c, p, name, point):
    """Upload a 16 MiB image name to a qcowd on p killed at QCOWD_S3_TEST_CRASH=point."""
    d = c.qcowd(p, opts=("part-size=5M",), env_extra={"QCOWD_S3_TEST_CRASH": point})
    src = c.image(name, 16 * MiB, "write -P 0x5a 0 12M")
    with open(src, "rb") as f:
        data = f.read()
    try:
        d.request("PUT", "/v1/images/%s/file" % name, data)
    except (AssertionError, OSError, http.client.HTTPException):
        pass
    rc = d.wait_exit(60)
    if rc is None:
        d.proc.kill()
        d.wait_exit(60)
    check(rc == -signal.SIGKILL, "qcowd did not die at the crash point %s (exit %s)" % (point, rc))


def crash_before_upload_completes(c):
    """qcowd killed with an upload's parts sent, before CompleteMultipartUpload:
    no image of that name appears (nor any temporary object), and the next
    start aborts the unfinished multipart upload the dead run left."""
    p = c.prefix()
    upload_until_crash(c, p, "z", "before-complete")
    restart_aborts_dead_upload(c, p, "the crash")


def wrong_secret(c):
    """A wrong secret: qcowd refuses to start and names the cause."""
    p = c.prefix()
    d = c.qcowd(p, secret="not-the-secret", expect_fail=True)
    rc = d.wait_exit(60)
    text = "\n".join(d.lines)
    check(rc == 1, "qcowd with a wrong secret exited %s" % rc)
    check("SignatureDoesNotMatch" in text and "secret" in text, "message: " + text)


def credentials_file(c):
    """Credentials from an AWS-style credentials file (--s3-opt credentials-file=F),
    without the AWS_* variables; a file with a wrong secret names the cause."""
    p = c.prefix()
    c.upload(p, c.image("cf", MiB, "write -P 0x0c 0 64k"))
    for secret, ok in ((c.s3.secret, True), ("wrong", False)):
        path = os.path.join(c.tmp, "credentials")
        with open(path, "w") as f:
            f.write("[default]\naws_access_key_id = %s\naws_secret_access_key = %s\nregion = us-east-1\n" %
                    (c.s3.access, secret))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        args = [QCOWD, "--listen", "127.0.0.1:0", "--catalog", "s3://%s/%s" % (BUCKET, p), "--s3-endpoint",
                c.s3.endpoint, "--s3-opt", "credentials-file=" + path, "--s3-opt", "staging-dir=" + c.staging,
                "--s3-opt", "allow-http=yes"]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = proc.stderr.readline().decode()
        if ok:
            check("listening on" in line, "did not start with a credentials file: " + line)
            proc.send_signal(signal.SIGTERM)
            check(proc.wait(60) == 0, "exit status")
        else:
            err = line + proc.stderr.read().decode()
            check(proc.wait(60) == 1 and "SignatureDoesNotMatch" in err, "wrong secret in a file: " + err)
        proc.stderr.close()


def missing_bucket_and_unreachable(c):
    """A missing bucket and an unreachable endpoint are named at start-up."""
    args = [QCOWD, "--listen", "127.0.0.1:0", "--catalog", "s3://no-such-bucket-here/x", "--s3-endpoint",
            c.s3.endpoint, "--s3-opt", "allow-http=yes"]
    r = subprocess.run(args, env=c.s3.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    err = r.stderr.decode()
    check(r.returncode == 1 and "bucket 'no-such-bucket-here' does not exist" in err, "missing bucket: " + err)
    args = [QCOWD, "--listen", "127.0.0.1:0", "--catalog", "s3://%s/x" % BUCKET, "--s3-endpoint",
            "http://127.0.0.1:9", "--s3-opt", "retries=1", "--s3-opt", "allow-http=yes"]
    r = subprocess.run(args, env=c.s3.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    err = r.stderr.decode()
    check(r.returncode == 1 and "unreachable" in err, "unreachable endpoint: " + err)


def secrets_and_plain_http_refused(c):
    """The secret key is refused on the command line (others read it in /proc), a
    plain http:// endpoint needs allow-http=yes, and an endpoint carrying
    user:password@ is refused without the URL being echoed."""
    base = [QCOWD, "--listen", "127.0.0.1:0", "--catalog", "s3://%s/x" % BUCKET]
    for extra, want in (
            (["--s3-endpoint", c.s3.endpoint, "--s3-opt", "allow-http=yes", "--s3-opt", "secret-key=hunter2"],
             "secret-key cannot be a setting"),
            (["--s3-endpoint", c.s3.endpoint], "plain HTTP"),
            (["--s3-endpoint", c.s3.endpoint.replace("http://", "http://me:hunter2@"), "--s3-opt", "allow-http=yes"],
             "carries credentials")):
        r = subprocess.run(base + extra, env=c.s3.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        err = r.stderr.decode()
        check(r.returncode != 0 and want in err, "%s: exit %d: %s" % (extra, r.returncode, err))
        check("hunter2" not in err, "the secret was echoed: " + err)


def faults_at_run_time(c):
    """Through a fault-injecting proxy: throttling and a connection dropped under
    a PUT (whose body is then sent again) are retried; persistent 503, 500, 403
    and timeouts give a 503 JSON error naming the cause; the daemon stays up and
    other images keep working."""
    p = c.prefix()
    for n in ("f1", "f2"):
        c.upload(p, c.image(n, 8 * MiB, "write -P 0x61 0 8M"))
    px = faultproxy.FaultProxy(c.s3.endpoint)
    # stat-ttl=0: every request asks the store, so a fault is met even where the
    # blocks are cached (the publish below reads all of f1 into the cache)
    d = c.qcowd(p, endpoint=px.endpoint, opts=("retries=3", "timeout=2", "block-size=64k", "stat-ttl=0"))
    try:
        check(d.read("f1", 0, 4096) == b"\x61" * 4096, "read through the proxy")
        check(d.read("f2", 0, 4096) == b"\x61" * 4096, "read through the proxy")
        r0, h0 = d.metric("retries"), px.hits
        px.fault("slowdown", count=2, match="/f1.qcow2")
        check(d.read("f1", 2 * MiB, 4096) == b"\x61" * 4096, "throttled read did not succeed on retry")
        check(d.metric("retries") - r0 >= 2, "no retries counted")
        # a connection dropped under a PUT: its body is sent again on a new one
        px.fault("drop", count=1, match="/f1.qcow2?partNumber=1&", method="PUT")
        d.write("f1", 1 * MiB, b"\x62" * 4096)
        check(px.hits - h0 == 3, "the dropped PUT was not met")
        check(d.read("f1", 1 * MiB, 8192) == b"\x62" * 4096 + b"\x61" * 4096, "the write after a drop differs")
        cases = (("slowdown", "throttling (503", 3 * MiB, "unavailable"),
                 ("500", "failed (500", 4 * MiB, "unavailable"),
                 ("403", "SignatureDoesNotMatch", 5 * MiB, "storage-denied"),
                 ("delay", "timed out", 6 * MiB, "unavailable"))
        for kind, words, off, code in cases:
            px.clear()
            px.fault(kind, match="/f1.qcow2", arg=6 if kind == "delay" else None)
            t = time.time()
            st, b = d.request("GET", "/v1/images/f1/data", headers={"Range": "bytes=%d-%d" % (off, off + 4095)})
            doc = json.loads(b)
            check(st == 503 and doc["error"]["code"] == code and words in doc["error"]["message"],
                  "%s: %d %s" % (kind, st, b[:400]))
            print("    %-8s -> 503 in %.1f s: %s" % (kind, time.time() - t, doc["error"]["message"][:150]))
            check(d.read("f2", off, 4096) == b"\x61" * 4096, "the other image stopped working")
        px.clear()
        check(d.read("f1", 7 * MiB, 4096) == b"\x61" * 4096, "the image did not recover after the faults")
        check(d.proc.poll() is None, "qcowd died")
    finally:
        d.stop()
        px.stop()


def parallel_readers_and_a_writer(c):
    """6 clients read random ranges of two images while a writer writes and
    flushes one of them (publishes running under the readers): every byte read
    is the old or the new version of its block, never anything else. Under TSan
    this is the plugin's threads test (handle pool, cache, shared objects)."""
    p = c.prefix()
    c.upload(p, c.image("pa", 12 * MiB, "write -P 0x50 0 12M"))
    c.upload(p, c.image("pb", 12 * MiB, "write -P 0x60 0 12M"))
    d = c.qcowd(p, opts=("block-size=64k", "cache-size=2M", "part-size=5M", "connections=4"))
    errors = []
    blk = 256 * 1024
    stop = threading.Event()

    def reader(seed):
        import random
        r = random.Random(seed)
        while not stop.is_set() and not errors:
            name = r.choice(("pa", "pb"))
            off = r.randrange(12 * MiB // blk) * blk
            try:
                got = d.read(name, off, blk)
            except Exception as e:
                errors.append(repr(e))
                return
            ok = (b"\x60",) if name == "pb" else (b"\x50", b"\x51", b"\x52")
            if not any(got == o * blk for o in ok):
                errors.append("%s at %d: a mix or wrong bytes (%r...)" % (name, off, got[:8]))

    ts = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    try:
        for rnd, byte in enumerate((b"\x51", b"\x52")):
            for k in range(rnd, 12 * MiB // blk, 8):
                d.write("pa", k * blk, byte * blk, flush="y" if k % 24 == rnd else "n")
            d.json("PATCH", "/v1/images/pa/data", {"op": "flush"})
        check(d.metric("publishes") >= 4, "the writer published %d times" % d.metric("publishes"))
    finally:
        stop.set()
        for t in ts:
            t.join(120)
        d.stop()
    check(not errors, "; ".join(errors[:3]))


def lost_complete_answer(c):
    """CompleteMultipartUpload done by the store but its answer lost (on every
    attempt; or once, the retry then answered NoSuchUpload as AWS does for a
    completed upload): the flush succeeds and the data is right. A Complete that
    really failed (500s, or connections dropped before the store saw it) is
    still an error, leaves the old object, and a later flush publishes."""
    p = c.prefix()
    c.upload(p, c.image("lc", 16 * MiB, "write -P 0x31 0 12M"))
    key = p + "/lc.qcow2"
    px = faultproxy.FaultProxy(c.s3.endpoint)
    d = c.qcowd(p, endpoint=px.endpoint, opts=("part-size=5M", "retries=2"))
    complete = dict(match="/lc.qcow2?uploadId=", method="POST")
    writes = []
    try:
        for i, rules in enumerate(([("lose", None)], [("lose", 1), ("nosuchupload", 1)])):
            px.clear()
            for kind, n in rules:
                px.fault(kind, count=n, **complete)
            hits = px.hits
            data = bytes([0xa1 + i]) * 65536
            t = time.time()
            d.write("lc", (1 + i) * MiB, data)
            writes.append(((1 + i) * MiB, data))
            met = px.hits - hits
            print("    Complete's answer lost (%s): published in %.1f s, %d Complete requests" %
                  (", ".join("%s %s" % (k, "x%d" % n if n else "always") for k, n in rules), time.time() - t, met))
            check(met >= 3 if rules[0][1] is None else met == 2, "the faults met %d times (%s)" % (met, rules))
            end = time.time() + 10  # the log line is read from qcowd's stderr by another thread
            while sum("CompleteMultipartUpload did take effect" in ln for ln in d.lines) < i + 1 and time.time() < end:
                time.sleep(0.05)
            check(sum("CompleteMultipartUpload did take effect" in ln for ln in d.lines) == i + 1,
                  "no log line about the recovered Complete:\n" + "\n".join(d.lines[-5:]))
            etag = c.s3.request("HEAD", BUCKET, key)[1].get("ETag", "")
            check(re.fullmatch(r'"[0-9a-f]{32}-[0-9]+"', etag), "not a multipart upload's ETag: %r" % etag)
            check(d.read("lc", (1 + i) * MiB, 65536) == data, "read after a recovered publish differs")
        for i, kind in enumerate(("500", "drop")):
            px.clear()
            px.fault(kind, **complete)
            before, uploads = c.s3.get(BUCKET, key), set(c.s3.uploads(BUCKET))
            data = bytes([0xb1 + i]) * 65536
            st, b = d.request("PUT", "/v1/images/lc/data?flush=y", data,
                              {"Content-Range": "bytes %d-%d/*" % (5 * MiB + i * MiB, 5 * MiB + i * MiB + 65535)})
            check(st == 503 and b"complete multipart upload" in b and b"is not the upload's" in b,
                  "a failed Complete (%s): %d %s" % (kind, st, b[:400]))
            print("    Complete failed (%s): %s" % (kind, json.loads(b)["error"]["message"][:160]))
            writes.append((5 * MiB + i * MiB, data))
            check(c.s3.get(BUCKET, key) == before, "the object changed although Complete failed (%s)" % kind)
            check(set(c.s3.uploads(BUCKET)) <= uploads, "the failed upload was not aborted")
        px.clear()
        st, doc = d.json("PATCH", "/v1/images/lc/data", {"op": "flush"})
        check(st == 204, "flush after the faults: %s %s" % (st, doc))
    finally:
        d.stop()
        px.stop()
    d = c.qcowd(p)
    try:
        for off, data in writes:
            check(d.read("lc", off, len(data)) == data, "write at %d lost" % off)
        check(d.read("lc", 0, 65536) == b"\x31" * 65536, "unwritten data changed")
    finally:
        d.stop()
    out = os.path.join(c.tmp, "lc-dl.qcow2")
    with open(out, "wb") as f:
        f.write(c.s3.get(BUCKET, key))
    run("qemu-img", "check", out)


def listing_past_one_page(c):
    """A catalog prefix holding more keys than one ListObjectsV2 answer gives (S3:
    1000 at most): GET /v1/images reads every page (continuation tokens, counted
    as LIST requests) and lists every image once, those on both sides of the page
    boundary too. Most keys are other files of the catalog (not listed), so the
    listing does not open a thousand images."""
    p = c.prefix()
    tiny = os.path.join(c.tmp, "tiny.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", tiny, "1M")
    with open(tiny, "rb") as f:
        data = f.read()
    images = set(range(0, LISTED, 25)) | {998, 999, 1000, 1001, LISTED - 1}
    keys = ["k%04d.%s" % (i, "qcow2" if i in images else "raw") for i in range(LISTED)]
    errors = []

    def put(chunk):
        try:
            for k in chunk:
                c.s3.put(BUCKET, "%s/%s" % (p, k), data if k.endswith(".qcow2") else b"x")
        except Exception as e:
            errors.append(repr(e))

    t = time.time()
    ts = [threading.Thread(target=put, args=(keys[k::8],)) for k in range(8)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    check(not errors, "uploads: %s" % errors[:3])
    put_s = time.time() - t
    want = sorted("k%04d" % i for i in images)
    d = c.qcowd(p)
    try:
        lists = d.metric("requests_list")
        t = time.time()
        st, doc = d.json("GET", "/v1/images")
        got = [i["name"] for i in doc["images"]] if st == 200 else []
        pages = d.metric("requests_list") - lists
        print("    %d keys put in %.1f s; GET /v1/images: %d images in %.1f s, %d LIST requests" %
              (LISTED, put_s, len(got), time.time() - t, pages))
        check(st == 200, "list: %s %s" % (st, doc))
        check(len(got) == len(set(got)), "listed twice: %s" % sorted(n for n in set(got) if got.count(n) > 1)[:5])
        check(sorted(got) == want, "missing: %s; not images: %s" % (sorted(set(want) - set(got))[:5],
                                                                    sorted(set(got) - set(want))[:5]))
        bad = [i for i in doc["images"] if "error" in i]
        check(not bad, "images with errors: %s" % bad[:3])
        check(pages >= 2, "%d LIST request(s) for %d keys: only one page read" % (pages, LISTED))
    finally:
        d.stop()


def reads_within_ttl_make_no_head(c):
    """Counted through /metrics: the first read of an image put into the bucket
    after start-up (so not in the start-up listing) makes one HEAD (the catalog's
    stat; the plugin's open and the engine's size lookup use its answer), then
    with stat-ttl=60 20 more reads make none (the catalog's identity check is
    answered from what the plugin knows); with stat-ttl=0 each read asks the
    store (a HEAD at least each). A bad stat-ttl is refused."""
    p = c.prefix()
    img = c.image("t", 8 * MiB, "write -P 0x21 0 8M")
    for ttl, reads in (("60", 20), ("0", 5)):
        c.s3.delete(BUCKET, p + "/t.qcow2")
        d = c.qcowd(p, opts=("stat-ttl=" + ttl,))
        try:
            c.upload(p, img)
            h0 = d.metric("requests_head")
            check(d.read("t", 0, 4096) == b"\x21" * 4096, "first read")
            first = d.metric("requests_head") - h0
            h0 = d.metric("requests_head")
            for i in range(reads):
                check(d.read("t", (i + 1) * 65536, 4096) == b"\x21" * 4096, "read %d" % i)
            heads = d.metric("requests_head") - h0
            print("    stat-ttl=%s: first read %d HEAD(s), %d more reads %d HEAD(s)" % (ttl, first, reads, heads))
            check(first == 1 if ttl != "0" else first >= 1, "the first read made %d HEADs" % first)
            check(heads == 0 if ttl != "0" else heads >= reads, "stat-ttl=%s: %d HEADs for %d reads" %
                  (ttl, heads, reads))
        finally:
            d.stop()
    d = c.qcowd(p, opts=("stat-ttl=soon",), expect_fail=True)
    check(d.wait_exit(60) not in (0, None) and any("stat-ttl=soon" in l for l in d.lines),
          "a bad stat-ttl: %s" % d.lines[-3:])


def listing_validates_from_entries(c):
    """GET /v1/images of 6 images: the first listing opens them without a HEAD
    (the ListObjectsV2 entries answer the catalog's stat, the plugin's open and
    the engine's size lookup), a second one makes no HEAD either, nor does one
    after stat-ttl ran out (the listing itself renews what is known). With the
    short TTL the first listing is not counted: opening 6 images may take
    longer than 2 s under a sanitizer."""
    p = c.prefix()
    names = ["l%d" % i for i in range(6)]
    img = c.image("l", MiB, "write -P 0x6c 0 64k")
    for n in names:
        c.upload(p, img, n + ".qcow2")
    for ttl, pause in (("30", 0), ("2", 2.5)):
        d = c.qcowd(p, opts=("stat-ttl=" + ttl,))
        try:
            counts = []
            for i in range(2):
                if i:
                    time.sleep(pause)
                h0, l0 = d.metric("requests_head"), d.metric("requests_list")
                st, doc = d.json("GET", "/v1/images")
                check(st == 200 and [x["name"] for x in doc["images"]] == names, "list: %s %s" % (st, doc))
                check(not [x for x in doc["images"] if "error" in x], "errors: %s" % doc)
                counts.append((d.metric("requests_head") - h0, d.metric("requests_list") - l0))
            print("    stat-ttl=%s: listings of %d images (HEADs, LISTs): %s" % (ttl, len(names), counts))
            for heads, lists in counts[0 if ttl == "30" else 1:]:
                check(heads == 0 and lists == 1, "stat-ttl=%s: listings made (HEADs, LISTs) %s" % (ttl, counts))
        finally:
            d.stop()


def outside_change_noticed_after_ttl(c):
    """An object replaced behind qcowd's back (a plain S3 PUT by the test) is
    noticed once stat-ttl has passed: until then reads of cached blocks give the
    old image, after it the new one; with stat-ttl=0 it is noticed at once."""
    p = c.prefix()
    key = p + "/o.qcow2"
    imgs = {b: c.image("o%02x" % b[0], 4 * MiB, "write -P 0x%02x 0 4M" % b[0]) for b in (b"\x0a", b"\x0b", b"\x0c")}
    c.s3.put_file(BUCKET, key, imgs[b"\x0a"])
    ttl = 4
    d = c.qcowd(p, opts=("stat-ttl=%d" % ttl,))
    try:
        check(d.read("o", 0, 4096) == b"\x0a" * 4096, "first read")
        t = time.time()
        c.s3.put_file(BUCKET, key, imgs[b"\x0b"])
        got = d.read("o", 0, 4096)
        if time.time() - t < ttl - 1:  # the machine did not stall past the TTL meanwhile
            check(got == b"\x0a" * 4096, "within stat-ttl the replaced object was already seen")
        time.sleep(max(0, t + ttl + 0.3 - time.time()))
        check(d.read("o", 0, 4096) == b"\x0b" * 4096, "the replaced object was not noticed after stat-ttl")
    finally:
        d.stop()
    d = c.qcowd(p, opts=("stat-ttl=0",))
    try:
        check(d.read("o", 0, 4096) == b"\x0b" * 4096, "read")
        c.s3.put_file(BUCKET, key, imgs[b"\x0c"])
        check(d.read("o", 0, 4096) == b"\x0c" * 4096, "with stat-ttl=0 the replaced object was not noticed at once")
    finally:
        d.stop()


def own_changes_seen_at_once(c):
    """With a long stat-ttl (60 s), qcowd's own changes are seen at once: a name
    looked up while missing is created and read, written, removed (404 at once,
    gone from the listing) and created again; an upload reads right after."""
    p = c.prefix()
    d = c.qcowd(p, opts=("stat-ttl=60",))
    try:
        st, _ = d.json("GET", "/v1/images/n")
        check(st == 404, "missing image: %s" % st)
        for rnd in range(2):
            st, doc = d.json("POST", "/v1/images", {"name": "n", "size": 4 * MiB})
            check(st == 201, "create (round %d): %s %s" % (rnd, st, doc))
            check(d.read("n", 0, 4096) == b"\0" * 4096, "a new image reads zeroes")
            d.write("n", 8192, bytes([0x40 + rnd]) * 4096)
            check(d.read("n", 8192, 4096) == bytes([0x40 + rnd]) * 4096, "own write not seen")
            st, doc = d.json("GET", "/v1/images")
            check([x["name"] for x in doc["images"]] == ["n"], "list after create: %s" % doc)
            st, _ = d.json("DELETE", "/v1/images/n")
            check(st == 204, "delete: %s" % st)
            st, _ = d.json("GET", "/v1/images/n")
            check(st == 404, "a removed image answers %s" % st)
            st, doc = d.json("GET", "/v1/images")
            check(doc["images"] == [], "list after delete: %s" % doc)
        up = c.image("u", 2 * MiB, "write -P 0x55 0 1M")
        with open(up, "rb") as f:
            st, b = d.request("PUT", "/v1/images/u/file", f.read())
        check(st == 201, "upload: %s %s" % (st, b[:200]))
        check(d.read("u", 0, 4096) == b"\x55" * 4096, "an upload does not read right after")
    finally:
        d.stop()

def upload_streams_without_readahead(c):
    """The streamed parts have workers of their own (sized by connections):
    with readahead-gets=0 (no read-ahead workers) an upload's parts still go
    to the store while its body arrives, as in upload_streams_parts."""
    upload_streams_parts(c, ("readahead-gets=0",))


def uploads_counted_in_budget(c):
    """Images being made count against --max-catalog although a bucket does not
    list them before their publish: with a resumable upload waiting between
    its pieces, a second upload that fits alone but not beside it is refused
    at once with 507 naming --max-catalog (by the total its first piece
    declares: a small piece, read whole before the answer); the first one
    completes, and a second one that fits beside it is taken."""
    p = c.prefix()
    a = c.image("ba", 16 * MiB, "write -P 0x0a 0 10M")
    b = c.image("bb", 16 * MiB, "write -P 0x0b 0 10M")
    small = c.image("bs", 4 * MiB, "write -P 0x05 0 1M")
    da, db, ds = (open(x, "rb").read() for x in (a, b, small))
    budget = len(da) + len(db) - MiB
    d = c.qcowd(p, args_extra=("--max-catalog", str(budget)))

    def begin_bb():
        return d.request("PUT", "/v1/images/bb/file", db[:65536],
                         {"Content-Range": "bytes 0-65535/%d" % len(db)})
    try:
        half = len(da) // 2
        st, b_ = d.request("PUT", "/v1/images/ba/file", da[:half],
                           {"Content-Range": "bytes 0-%d/%d" % (half - 1, len(da))})
        check(st == 202, "first piece: %s %s" % (st, b_[:200]))
        st, b_ = begin_bb()
        check(st == 507 and b"--max-catalog" in b_,
              "an upload past the budget beside a waiting one: %s %s" % (st, b_[:300]))
        st, b_ = d.request("PUT", "/v1/images/ba/file", da[half:],
                           {"Content-Range": "bytes %d-%d/%d" % (half, len(da) - 1, len(da))})
        check(st == 201, "last piece: %s %s" % (st, b_[:200]))
        st, b_ = begin_bb()
        check(st == 507, "an upload past the budget: %s %s" % (st, b_[:300]))
        st, b_ = d.request("PUT", "/v1/images/bs/file", ds)
        check(st == 201, "an upload within the budget: %s %s" % (st, b_[:300]))
        keys = sorted(k for k in c.s3.keys(BUCKET, p + "/") if not k.endswith("/.qcowd-jobs.json"))
        check(keys == [p + "/ba.qcow2", p + "/bs.qcow2"], "objects: %s" % keys)
        check(c.s3.uploads(BUCKET) == [], "multipart uploads left behind")
    finally:
        d.stop()


def copied_multipart(c, p, path, name):
    """The object p/name made from the file at path as the old import did: a
    multipart upload of two parts under another key, then a CopyObject of it
    to its name (s3_rename still copies), and the first key removed."""
    s3, tmp_key, key = c.s3, "%s/%s.part" % (p, name), "%s/%s" % (p, name)
    data = open(path, "rb").read()
    r = s3.ok("create upload", s3.request("POST", BUCKET, tmp_key, params={"uploads": ""}))
    uid = re.search(r"<UploadId>([^<]*)<", r[2].decode()).group(1)
    parts = []
    for i, (a, b) in enumerate(((0, 5 * MiB), (5 * MiB, len(data)))):
        r = s3.ok("upload part", s3.request("PUT", BUCKET, tmp_key, params={"partNumber": str(i + 1), "uploadId": uid},
                                            body=data[a:b]))
        parts.append("<Part><PartNumber>%d</PartNumber><ETag>%s</ETag></Part>" % (i + 1, r[1].get("ETag")))
    body = ("<CompleteMultipartUpload>%s</CompleteMultipartUpload>" % "".join(parts)).encode()
    s3.ok("complete", s3.request("POST", BUCKET, tmp_key, params={"uploadId": uid}, body=body))
    s3.ok("copy", s3.request("PUT", BUCKET, key, headers={"x-amz-copy-source": "/%s/%s" % (BUCKET, tmp_key)}))
    s3.delete(BUCKET, tmp_key)


def listing_etag_of_multipart_copy(c):
    """An image whose object is a copy of a multipart upload: the store lists it
    with another ETag than GET and HEAD give (Swift: a plain MD5 against the
    multipart "...-2"). After a start, a listing (which opens it from its
    entry) and then reads of it answer with its data, never 'the object was
    replaced'; the image's info and a second listing are fine too."""
    p = c.prefix()
    src = c.image("mc", 16 * MiB, "write -P 0x4d 0 12M")
    copied_multipart(c, p, src, "mc.qcow2")
    _, h, _ = c.s3.request("HEAD", BUCKET, p + "/mc.qcow2")
    body = c.s3.ok("list", c.s3.request("GET", BUCKET, params={"list-type": "2", "prefix": p + "/"}))[2].decode()
    listed = re.findall(r"<ETag>([^<]*)<", body)
    print("    ETag by HEAD %s, by the listing %s" % (h.get("ETag"), listed))
    check(listed != [h.get("ETag")], "the store lists the copy with the ETag HEAD gives: nothing tested")
    d = c.qcowd(p)
    try:
        st, doc = d.json("GET", "/v1/images")
        check(st == 200 and [x["name"] for x in doc["images"]] == ["mc"], "list: %s %s" % (st, doc))
        check(not [x for x in doc["images"] if "error" in x], "errors: %s" % doc)
        st, b = d.request("GET", "/v1/images/mc/data", headers={"Range": "bytes=0-%d" % (13 * MiB - 1)})
        check(st == 206, "read after the listing: %s %s" % (st, b[:300]))
        check(b == b"\x4d" * (12 * MiB) + b"\0" * MiB, "the data read is wrong")
        st, doc = d.json("GET", "/v1/images/mc")
        check(st == 200, "info: %s %s" % (st, doc))
        st, doc = d.json("GET", "/v1/images")
        check(st == 200 and not [x for x in doc["images"] if "error" in x], "second list: %s %s" % (st, doc))
        check(d.read("mc", 11 * MiB, 4096) == b"\x4d" * 4096, "a second read is wrong")
    finally:
        d.stop()


def invalid_upload_names_no_pending(c):
    """An upload to a bucket that fails validation is refused with a message
    that names the image or no object at all, never the private pending: URI
    of the object being made."""
    p = c.prefix()
    d = c.qcowd(p, opts=("part-size=5M",))
    try:
        src = c.image("iv", 8 * MiB, "write -P 0x11 0 2M")
        data = bytearray(open(src, "rb").read())
        bads = []
        b1 = bytearray(data)
        b1[0x30:0x38] = b"\xff" * 8  # l1_table_offset far past the end
        bads.append(b1)
        b2 = bytearray(data)
        b2[0x08:0x10] = (len(data) + 65536).to_bytes(8, "big")  # backing file offset past the end
        b2[0x10:0x14] = (16).to_bytes(4, "big")
        bads.append(b2)
        bads.append(data[:3 * 65536])  # cut short: the L1 table lies past the end
        for i, bad in enumerate(bads):
            st, b = d.request("PUT", "/v1/images/iv%d/file" % i, bytes(bad))
            print("    invalid upload %d: %d %s" % (i, st, b[:200]))
            check(st // 100 == 4, "an invalid upload was taken: %s %s" % (st, b[:200]))
            check(b"pending:" not in b, "the message names the pending object: %s" % b[:300])
        check(not any("pending:" in l for l in d.lines if "iv" in l), "a log line names the pending object")
    finally:
        d.stop()


def start_upload(c, key):
    """A multipart upload started outside qcowd (as another tool or a dead host would): its id."""
    r = c.s3.ok("start " + key, c.s3.request("POST", BUCKET, key, params={"uploads": ""}))
    return re.search(r"<UploadId>([^<]*)</UploadId>", r[2].decode()).group(1)


def uploads_under(c, prefix):
    """{upload id: key} of the bucket's unfinished multipart uploads under prefix."""
    body = c.s3.ok("list uploads", c.s3.request("GET", BUCKET, params={"uploads": "", "prefix": prefix}))[2].decode()
    return {i: k for k, i in re.findall(r"<Upload><Key>([^<]*)</Key><UploadId>([^<]*)</UploadId>", body)}


def abort_uploads(c, ids):
    for i, k in ids.items():
        c.s3.request("DELETE", BUCKET, k, params={"uploadId": i})


def stale_uploads_aborted_at_start(c):
    """Unfinished multipart uploads under the catalog older than stale-upload
    (made by no qcowd at all: a lost staging folder, another host) are aborted
    at start, one a line in the log; one under a key outside the catalog's
    folder (sharing its name as a string prefix) and one younger than the
    limit are not, until the periodic sweep finds the young one stale."""
    p = c.prefix()
    old = start_upload(c, p + "/old.qcow2")
    outside = start_upload(c, p + "x/old.qcow2")
    time.sleep(7)
    young = start_upload(c, p + "/young.qcow2")
    d = c.qcowd(p, env_extra={"QCOWD_S3_STALE_UPLOAD": "5s"})  # the environment's name of --s3-opt stale-upload
    try:
        st, doc = d.json("GET", "/v1/images")
        check(st == 200, "list: %s %s" % (st, doc))
        left = uploads_under(c, p)
        check(old not in left, "the stale upload under the catalog was not aborted at start: %s" % left)
        check(outside in left, "an upload outside the catalog's folder was aborted")
        check(young in left, "an upload younger than stale-upload was aborted at start")
        check(d.metric("uploads_aborted") == 1, "uploads_aborted %d, not 1" % d.metric("uploads_aborted"))
        check(any("old.qcow2: aborted an unfinished multipart upload" in l and "stale-upload 5 s" in l
                  for l in d.lines), "no log line of the aborted upload:\n" + "\n".join(d.lines))
        deadline = time.time() + 30
        while young in uploads_under(c, p + "/") and time.time() < deadline:
            time.sleep(0.5)
        check(young not in uploads_under(c, p + "/"), "the periodic sweep did not abort the upload once stale")
        check(outside in uploads_under(c, p), "the periodic sweep aborted an upload outside the catalog")
    finally:
        d.stop()
        abort_uploads(c, uploads_under(c, p))


def crash_after_upload_start(c):
    """qcowd killed between CreateMultipartUpload and the staging meta's record
    of its id: the upload only the store knows of is aborted by the next start
    at once (the meta said a start was under way), with no wait for
    stale-upload (24 h by default)."""
    p = c.prefix()
    upload_until_crash(c, p, "s", "after-mpu-start")
    left = uploads_under(c, p + "/")
    check(list(left.values()) == [p + "/s.qcow2"], "not one upload left by the crash: %s" % left)
    d = c.qcowd(p)
    try:
        st, doc = d.json("GET", "/v1/images")
        check(st == 200 and doc["images"] == [], "list after the crash: %s %s" % (st, doc))
        check(uploads_under(c, p + "/") == {}, "the upload started before the crash was not aborted")
        check(d.metric("uploads_aborted") == 1, "uploads_aborted %d, not 1" % d.metric("uploads_aborted"))
        check(any("it was starting a multipart upload" in l for l in d.lines),
              "no log line about the dead run's start:\n" + "\n".join(d.lines))
    finally:
        d.stop()
        abort_uploads(c, uploads_under(c, p + "/"))


def two_daemons_share_a_prefix(c):
    """Two qcowd on one bucket and catalog prefix (and one staging folder): the
    second's start leaves the first's live streamed upload alone (it is neither
    a dead run's nor stale), and the first then completes it."""
    p = c.prefix()
    a = c.qcowd(p, opts=("part-size=5M",))
    b = None
    try:
        data, first = first_piece_streamed(c, a, "t")
        check(len(uploads_under(c, p + "/")) == 1, "no upload in progress: %s" % uploads_under(c, p + "/"))
        b = c.qcowd(p)
        st, doc = b.json("GET", "/v1/images")
        check(st == 200, "second daemon: %s %s" % (st, doc))
        check(len(uploads_under(c, p + "/")) == 1, "the second daemon's start aborted the first's upload")
        check(b.metric("uploads_aborted") == 0, "the second daemon aborted %d uploads" % b.metric("uploads_aborted"))
        last_piece_completes(c, a, p, "t", data, first)
        check(uploads_under(c, p + "/") == {}, "uploads left: %s" % uploads_under(c, p + "/"))
    finally:
        if b:
            b.stop()
        a.stop()
        abort_uploads(c, uploads_under(c, p + "/"))


def last_piece_completes(c, d, p, name, data, first):
    """The rest of first_piece_streamed's upload: the image is published whole."""
    st, body = d.request("PUT", "/v1/images/%s/file" % name, data[first:],
                         {"Content-Range": "bytes %d-%d/%d" % (first, len(data) - 1, len(data))})
    check(st == 201, "last piece: %s %s" % (st, body[:200]))
    check(c.s3.get(BUCKET, "%s/%s.qcow2" % (p, name)) == data, "the object is not the uploaded file")


def own_upload_outlives_stale_upload(c):
    """A daemon's own upload waiting between its pieces longer than its
    stale-upload (2 s, swept every 2 s) is not aborted by its own sweeps (it
    owns it); the last piece then completes it."""
    p = c.prefix()
    d = c.qcowd(p, opts=("part-size=5M", "stale-upload=2s"))
    try:
        data, first = first_piece_streamed(c, d, "o")
        time.sleep(6)
        check(len(uploads_under(c, p + "/")) == 1, "the daemon's own waiting upload was aborted")
        check(d.metric("uploads_aborted") == 0, "uploads_aborted %d, not 0" % d.metric("uploads_aborted"))
        last_piece_completes(c, d, p, "o", data, first)
    finally:
        d.stop()
        abort_uploads(c, uploads_under(c, p + "/"))


# ---- bounded staging of uploads ----

def staged_bytes(c):
    """Disk bytes the staging folder's deferred objects hold (allocated blocks)."""
    total = 0
    for root, _, files in os.walk(c.staging):
        for f in files:
            if f.endswith(".new.data"):
                try:
                    total += os.stat(os.path.join(root, f)).st_blocks * 512
                except FileNotFoundError:
                    pass
    return total


def random_image(c, name, size, data_bytes):
    """A qcow2 of virtual size size whose first data_bytes are random: (path, raw bytes)."""
    raw = os.path.join(c.tmp, name + ".img")
    data = os.urandom(data_bytes)
    with open(raw, "wb") as f:
        f.write(data)
        f.truncate(size)
    path = os.path.join(c.tmp, name + ".qcow2")
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path)
    os.unlink(raw)
    return path


def send_slowly(d, c, name, data, chunk, total=None, start=0, peak=None):
    """PUT data to /v1/images/NAME/file in chunks, the staging folder measured
    after each (the largest in peak[0]); a piece of a resumable upload of total
    bytes when total is given. (status, body)."""
    conn = d.conn()
    try:
        conn.putrequest("PUT", "/v1/images/%s/file" % name)
        conn.putheader("Content-Length", str(len(data)))
        if total is not None:
            conn.putheader("Content-Range", "bytes %d-%d/%d" % (start, start + len(data) - 1, total))
        conn.endheaders()
        for i in range(0, len(data), chunk):
            conn.send(data[i:i + chunk])
            time.sleep(0.01)
            if peak is not None:
                peak[0] = max(peak[0], staged_bytes(c))
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def upload_staging_bounded(c):
    """A 96 MiB upload into a bucket with staging-max=16M and 5 MiB parts: the
    parts sent are punched out of the staging file (the host releases all but
    the qcow2 metadata), and the writer waits for parts to go out when the
    unsent bytes pass staging-max, so the deferred object's staging file never
    holds more than staging-max + part 0 + a part in flight + a chunk, however
    large the image. It still validates, and the object is the file sent. A
    resumable piece sent again from an offset already sent (and dropped) is
    refused with a clear answer, and the upload then completes."""
    p = c.prefix()
    d = c.qcowd(p, opts=("part-size=5M", "staging-max=16M"))
    try:
        src = random_image(c, "big", 128 * MiB, 96 * MiB)
        with open(src, "rb") as f:
            data = f.read()
        check(len(data) > 96 * MiB, "the image is %d bytes" % len(data))
        bound = 16 * MiB + 5 * MiB + 5 * MiB + 2 * MiB
        peak = [0]
        st, b = send_slowly(d, c, "big", data, MiB, peak=peak)
        check(st == 201, "upload: %s %s" % (st, b[:300]))
        check(peak[0] <= bound, "staging held %.1f MiB of a %.1f MiB upload (bound %.1f MiB)"
              % (peak[0] / MiB, len(data) / MiB, bound / MiB))
        print("     staging held at most %.1f MiB of the %.1f MiB upload" % (peak[0] / MiB, len(data) / MiB))
        check(peak[0] > 0, "the staging folder was never seen holding the upload")
        check(c.s3.get(BUCKET, p + "/big.qcow2") == data, "the object is not the uploaded file")
        dl = c.download_checked(p, "big")
        run("qemu-img", "compare", "-q", src, dl)
        check(d.read("big", 90 * MiB, 4096) == c.raw(src)[90 * MiB:90 * MiB + 4096], "the upload reads wrong")
        for m in ("requests_copy", "bytes_copied"):
            check(d.metric(m) == 0, "the upload cost %s %d" % (m, d.metric(m)))

        # a resumable upload: 40 MiB sent (parts dropped), then a piece from 10 MiB again
        first = 40 * MiB
        st, b = send_slowly(d, c, "again", data[:first], MiB, total=len(data))
        check(st == 202, "first piece: %s %s" % (st, b[:300]))
        piece = 64 << 10  # refused before its body is read: small enough for the socket buffers
        st, b = d.request("PUT", "/v1/images/again/file", data[10 * MiB:10 * MiB + piece],
                          {"Content-Range": "bytes %d-%d/%d" % (10 * MiB, 10 * MiB + piece - 1, len(data))})
        check(st // 100 == 4 and b"continue it at %d" % first in b, "a piece sent again: %s %s" % (st, b[:300]))
        st, b = send_slowly(d, c, "again", data[first:], MiB, total=len(data), start=first)
        check(st == 201, "last piece: %s %s" % (st, b[:300]))
        check(c.s3.get(BUCKET, p + "/again.qcow2") == data, "the resumed object is not the uploaded file")
        check(staged_bytes(c) == 0, "staging files left: %d bytes" % staged_bytes(c))
        check(c.s3.uploads(BUCKET) == [], "multipart uploads left behind")
    finally:
        d.stop()


def move_tables_to_end(path):
    """Move the image's L1 table, then its refcount table, to new clusters at
    the end of the file and patch the header (qemu-img check -r all fixes the
    refcounts after the first move; the second sets them itself, as a rebuild
    would move the table back). Returns (l1_offset, reftable_offset)."""
    import struct

    def header(f):
        f.seek(0)
        h = f.read(104)
        cs = 1 << struct.unpack(">I", h[20:24])[0]
        l1_size, l1_off, rt_off, rt_clusters = struct.unpack(">IQQI", h[36:60])
        f.seek(0, 2)
        return cs, l1_size, l1_off, rt_off, rt_clusters, (f.tell() + cs - 1) // cs * cs

    with open(path, "r+b") as f:
        cs, l1_size, l1_off, _, _, end = header(f)
        f.seek(l1_off)
        l1 = f.read(l1_size * 8)
        f.seek(end)
        f.write(l1)
        f.truncate((end + len(l1) + cs - 1) // cs * cs)
        f.seek(40)
        f.write(struct.pack(">Q", end))
    subprocess.run(["qemu-img", "check", "-q", "-r", "all", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   timeout=300)
    with open(path, "r+b") as f:
        cs, _, _, rt_off, rt_clusters, end = header(f)
        f.seek(96)
        check(struct.unpack(">I", f.read(4))[0] == 4, "the image's refcounts are not 16 bits")
        f.seek(rt_off)
        rt = f.read(rt_clusters * cs)
        f.seek(end)
        f.write(rt)
        f.truncate(end + rt_clusters * cs)
        block = struct.unpack(">Q", rt[:8])[0]
        check(block and (end + len(rt)) // cs <= cs // 2, "one refcount block does not cover the image")
        for k in range(rt_clusters):  # the old clusters are free, the new ones used
            f.seek(block + (rt_off // cs + k) * 2)
            f.write(struct.pack(">H", 0))
            f.seek(block + (end // cs + k) * 2)
            f.write(struct.pack(">H", 1))
        f.seek(48)
        f.write(struct.pack(">Q", end))
    run("qemu-img", "check", "-q", path)
    with open(path, "rb") as f:
        _, _, l1_off, rt_off, _, _ = header(f)
    return l1_off, rt_off


def upload_tables_at_end(c):
    """An image whose L1 and refcount tables lie at the end of the file (after
    the data, past the parts already sent and dropped) uploads under bounded
    staging and validates: the header names them, so they stay staged."""
    p = c.prefix()
    d = c.qcowd(p, opts=("part-size=5M", "staging-max=16M"))
    try:
        src = random_image(c, "tail", 64 * MiB, 40 * MiB)
        orig = src + ".orig"
        shutil.copy(src, orig)
        l1, rt = move_tables_to_end(src)
        # data written after them: the tables sit in parts that are sent and
        # would be dropped were they not kept (the last parts never are before the end)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5e 40M 20M", src)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5e 40M 20M", orig)
        size = os.path.getsize(src)
        check(40 * MiB < l1 < size - 15 * MiB and 40 * MiB < rt < size - 15 * MiB,
              "the tables are not after the first data: L1 %#x, refcounts %#x of %#x" % (l1, rt, size))
        run("qemu-img", "check", "-q", src)
        run("qemu-img", "compare", "-q", orig, src)
        with open(src, "rb") as f:
            data = f.read()
        peak = [0]
        st, b = send_slowly(d, c, "tail", data, MiB, peak=peak)
        check(st == 201, "upload: %s %s" % (st, b[:300]))
        check(peak[0] <= 28 * MiB, "staging held %.1f MiB" % (peak[0] / MiB))
        check(c.s3.get(BUCKET, p + "/tail.qcow2") == data, "the object is not the uploaded file")
        run("qemu-img", "compare", "-q", orig, c.download_checked(p, "tail"))
        st, doc = d.json("GET", "/v1/images/tail")
        check(st == 200 and doc["virtual-size"] == 64 * MiB, "image info: %s %s" % (st, doc))
    finally:
        d.stop()


def upload_waits_for_a_slow_store(c):
    """Backpressure: through a proxy that holds every UploadPart for 1 s, with
    4 connections (2 part workers), the client sends faster than the parts go out; the writer
    then waits at staging-max=16M for parts to be sent (and dropped), so the
    staging never holds much more than staging-max + part 0, where without the
    wait it would hold most of the 64 MiB image; the object is the file sent."""
    p = c.prefix()
    px = faultproxy.FaultProxy(c.s3.endpoint)
    try:
        px.fault("delay", match="partNumber=", arg=1.0, method="PUT")
        d = c.qcowd(p, endpoint=px.endpoint, opts=("part-size=5M", "staging-max=16M", "connections=4"))
        try:
            src = random_image(c, "slow", 64 * MiB, 64 * MiB)
            with open(src, "rb") as f:
                data = f.read()
            peak = [0]
            t = time.time()
            st, b = send_slowly(d, c, "slow", data, MiB, peak=peak)
            secs = time.time() - t
            check(st == 201, "upload: %s %s" % (st, b[:300]))
            check(peak[0] <= 26 * MiB, "staging held %.1f MiB of a %.1f MiB upload (staging-max 16 MiB)"
                  % (peak[0] / MiB, len(data) / MiB))
            print("     staging held at most %.1f MiB; the upload took %.1f s" % (peak[0] / MiB, secs))
            check(c.s3.get(BUCKET, p + "/slow.qcow2") == data, "the object is not the uploaded file")
            check(staged_bytes(c) == 0, "staging files left: %d bytes" % staged_bytes(c))
        finally:
            d.stop()
    finally:
        px.stop()


def upload_complete_fails_after_parts_dropped(c):
    """Every CompleteMultipartUpload failing (500 through a proxy) after an
    upload's parts were sent and dropped from staging: the upload is answered
    with an error naming the failure (no fallback publish from bytes no longer
    staged), no object appears, the multipart upload is aborted and the
    staging files are gone; the same name then uploads once the store is well."""
    p = c.prefix()
    px = faultproxy.FaultProxy(c.s3.endpoint)
    try:
        d = c.qcowd(p, endpoint=px.endpoint, opts=("part-size=5M", "staging-max=16M", "retries=1"))
        try:
            src = random_image(c, "cf", 48 * MiB, 40 * MiB)
            with open(src, "rb") as f:
                data = f.read()
            px.fault("500", match="uploadId=", method="POST")
            peak = [0]
            st, b = send_slowly(d, c, "cf", data, MiB, peak=peak)
            check(st == 503 and b"complete multipart upload" in b and b"500 InternalError" in b,
                  "upload: %s %s" % (st, b[:300]))
            check(peak[0] <= 28 * MiB, "staging held %.1f MiB" % (peak[0] / MiB))
            px.clear()
            keys = [k for k in c.s3.keys(BUCKET, p + "/") if not k.endswith("/.qcowd-jobs.json")]
            check(keys == [], "objects after the failed upload: %s" % keys)
            check(c.s3.uploads(BUCKET) == [], "multipart uploads left behind: %s" % c.s3.uploads(BUCKET))
            check(staged_bytes(c) == 0, "staging files left: %d bytes" % staged_bytes(c))
            st, b = d.request("PUT", "/v1/images/cf/file", data)
            check(st == 201, "upload after the store recovered: %s %s" % (st, b[:300]))
            check(c.s3.get(BUCKET, p + "/cf.qcow2") == data, "the object is not the uploaded file")
        finally:
            d.stop()
    finally:
        px.stop()


class Pusher(threading.Thread):
    """PUT data to /v1/images/NAME/file on a socket of its own, as fast as the
    daemon takes it (a piece of a resumable upload of total bytes from first
    when total is given); sent counts the bytes gone; cut() breaks the
    connection off (the client going away); status/body: the answer, if one came."""

    def __init__(self, d, name, data, first=0, total=None, chunked=False):
        super().__init__(daemon=True)
        self.data, self.sent, self.status, self.body, self.error = data, 0, None, b"", None
        self.chunked = chunked
        self.sock = socket.create_connection(("127.0.0.1", d.port), timeout=120)
        cr = "Content-Range: bytes %d-%d/%d\r\n" % (first, first + len(data) - 1, total) if total else ""
        length = "Transfer-Encoding: chunked" if chunked else "Content-Length: %d" % len(data)
        self.sock.sendall(("PUT /v1/images/%s/file HTTP/1.1\r\nHost: localhost\r\n%s\r\n%s\r\n"
                           % (name, length, cr)).encode())

    def run(self):
        try:
            for i in range(0, len(self.data), 256 << 10):
                piece = self.data[i:i + (256 << 10)]
                self.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if self.chunked else piece)
                self.sent = i + len(piece)
            if self.chunked:
                self.sock.sendall(b"0\r\n\r\n")
        except OSError as e:  # refused or cut: the answer may be there all the same
            self.error = e
        answer = b""
        try:
            while True:
                more = self.sock.recv(65536)
                if not more:
                    break
                answer += more
                head, sep, rest = answer.partition(b"\r\n\r\n")
                m = re.search(rb"content-length: *(\d+)", head, re.I)
                if sep and m and len(rest) >= int(m.group(1)):
                    break
        except OSError as e:
            self.error = self.error or e
        m = re.match(rb"HTTP/1\.1 (\d+)", answer)
        self.status = int(m.group(1)) if m else None
        self.body = answer

    def cut(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def held_back(c, push, at_least):
    """Waits (20 s at most) until push sent at_least bytes and the staging holds
    some: the upload is then held back by the slow store."""
    t = time.time()
    while time.time() - t < 20 and (push.sent < at_least or staged_bytes(c) == 0):
        check(push.is_alive() or push.status, "the upload ended early: %s %s" % (push.status, push.body[:300]))
        time.sleep(0.05)
    check(push.sent >= at_least, "the upload did not get going (%d bytes sent)" % push.sent)


def timed(d, conn, method, path, headers=None):
    """One request on conn: (seconds, status, body)."""
    t = time.time()
    st, _, b = d.exchange(method, path, headers=headers, conn=conn)
    return time.time() - t, st, b


def upload_backpressure_frees_the_thread(c):
    """An upload held back by a slow store (every UploadPart held 1 s by a
    proxy, staging-max=8M) sleeps with its connection suspended instead of
    on the server's one thread (--threads 1): meanwhile GET /v1/health and a
    4 KiB read of another image answer fast (each under 150 ms), where a
    writer waiting in the store for room (0.5 s per write) would hold them
    back; the staging stays bounded and the object is the file sent (also
    sent chunked). A client that goes away while its upload sleeps leaves no
    object, no multipart upload and no staging, and the daemon serves on; a
    resumable piece cut off while asleep is kept and the next piece completes
    it; a SIGTERM while an upload sleeps ends the daemon at once (the upload
    answered 503 and dropped); and a store stalled past --header-timeout cuts
    the sleeping upload as a slow client (408), the daemon serving on."""
    p = c.prefix()
    px = faultproxy.FaultProxy(c.s3.endpoint)
    opts = ("part-size=5M", "staging-max=8M", "connections=4")
    try:
        d = c.qcowd(p, endpoint=px.endpoint, opts=opts, args_extra=("--threads", "1"))
        try:
            other = c.image("other", 16 * MiB, "write -P 0x5a 1M 64k")
            st, b = d.request("PUT", "/v1/images/other/file", open(other, "rb").read())
            check(st == 201, "upload of other: %s %s" % (st, b[:300]))
            check(d.read("other", MiB, 4096) == b"\x5a" * 4096, "other reads wrong")  # opened and cached
            px.fault("delay", match="partNumber=", arg=1.0, method="PUT")
            src = random_image(c, "held", 64 * MiB, 64 * MiB)
            with open(src, "rb") as f:
                data = f.read()
            push = Pusher(d, "held", data)
            t0 = time.time()
            push.start()
            held_back(c, push, 12 * MiB)
            conn = d.conn()
            lat, peak = [], 0
            try:
                while push.is_alive() and len(lat) < 400:
                    s1, st1, _ = timed(d, conn, "GET", "/v1/health")
                    s2, st2, b2 = timed(d, conn, "GET", "/v1/images/other/data", {"Range": "bytes=1048576-1052671"})
                    check(st1 == 200 and st2 == 206 and b2 == b"\x5a" * 4096, "health %s, read %s" % (st1, st2))
                    lat += [s1, s2]
                    peak = max(peak, staged_bytes(c))
                    time.sleep(0.02)
            finally:
                conn.close()
            push.join(120)
            secs = time.time() - t0
            check(push.status == 201, "upload: %s %s" % (push.status, push.body[:300]))
            lat.sort()
            print("     %d requests while the upload was held back (%.1f s): median %.1f ms, slowest %s ms; "
                  "staging at most %.1f MiB" % (len(lat), secs, 1e3 * lat[len(lat) // 2],
                                                 " ".join("%.1f" % (1e3 * x) for x in lat[-3:]), peak / MiB))
            check(len(lat) >= 20, "only %d requests went while the upload ran" % len(lat))
            check(lat[-1] < 0.15 and lat[len(lat) // 2] < 0.05,
                  "requests waited behind the held upload: median %.1f ms, max %.1f ms"
                  % (1e3 * lat[len(lat) // 2], 1e3 * lat[-1]))
            check(peak <= 8 * MiB + 5 * MiB + 5 * MiB + 2 * MiB, "staging held %.1f MiB" % (peak / MiB))
            check(c.s3.get(BUCKET, p + "/held.qcow2") == data, "the object is not the uploaded file")

            # chunked: the bytes kept while asleep sit inside a chunk
            push = Pusher(d, "chunked", data, chunked=True)
            push.start()
            held_back(c, push, 16 * MiB)
            push.join(120)
            check(push.status == 201, "chunked upload: %s %s" % (push.status, push.body[:300]))
            check(c.s3.get(BUCKET, p + "/chunked.qcow2") == data, "the chunked object is not the uploaded file")

            # the client goes away while its upload sleeps
            push = Pusher(d, "gone", data)
            push.start()
            held_back(c, push, 16 * MiB)
            push.cut()
            t = time.time()
            while time.time() - t < 30 and (c.s3.uploads(BUCKET) or staged_bytes(c)):
                time.sleep(0.2)
            check(c.s3.uploads(BUCKET) == [], "multipart uploads left: %s" % c.s3.uploads(BUCKET))
            check(staged_bytes(c) == 0, "staging files left: %d bytes" % staged_bytes(c))
            check(d.request("GET", "/v1/images/gone")[0] == 404, "the upload cut off left an image")
            check(c.s3.keys(BUCKET, p + "/gone") == [], "the upload cut off left an object")
            check(d.request("GET", "/v1/health")[0] == 200, "the daemon does not serve on")

            # a resumable piece cut off while it sleeps is kept; the next piece (a new
            # connection, a new wait on the same upload) completes it
            push = Pusher(d, "piece", data[:40 * MiB], total=len(data))
            push.start()
            held_back(c, push, 16 * MiB)
            push.cut()
            t = time.time()
            while True:  # 409 until the sleeping connection wakes and finds its client gone
                st, b = d.request("PUT", "/v1/images/piece/file", b"", {"Content-Range": "bytes */%d" % len(data)})
                check(st == 200, "where the piece stands: %s %s" % (st, b[:300]))
                got = json.loads(b)["received"]
                push = Pusher(d, "piece", data[got:], first=got, total=len(data))
                push.start()
                push.join(120)
                if push.status != 409 or time.time() - t > 30:
                    break
                time.sleep(0.2)
            print("     a piece cut off while asleep: resumed at %.1f MiB after %.1f s" % (got / MiB, time.time() - t))
            check(push.status == 201, "the last piece: %s %s" % (push.status, push.body[:300]))
            check(c.s3.get(BUCKET, p + "/piece.qcow2") == data, "the resumed object is not the uploaded file")
        finally:
            d.stop()
        # SIGTERM while an upload sleeps: the daemon ends at once
        d = c.qcowd(p, endpoint=px.endpoint, opts=opts, args_extra=("--threads", "1"))
        push = Pusher(d, "term", data)
        push.start()
        held_back(c, push, 16 * MiB)
        t = time.time()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.wait_exit(60)
        secs = time.time() - t
        print("     SIGTERM with an upload held back: exit %s after %.1f s" % (rc, secs))
        check(rc == 0 and secs < 10, "qcowd exit %s after %.1f s" % (rc, secs))
        push.join(10)
        check(push.status in (503, None), "the upload held back at the stop: %s %s" % (push.status, push.body[:300]))
        d.stop()

        # a store stalled past --header-timeout: the sleeping upload is cut as a slow client
        px.clear()
        px.fault("delay", match="partNumber=", arg=8.0, method="PUT")
        d = c.qcowd(p, endpoint=px.endpoint, opts=opts, args_extra=("--threads", "1", "--header-timeout", "2"))
        try:
            push = Pusher(d, "stalled", data)
            t = time.time()
            push.start()
            push.join(60)
            secs = time.time() - t
            print("     a stalled store: the upload answered %s after %.1f s" % (push.status, secs))
            check(push.status == 408 and b"too-slow" in push.body or push.error is not None,
                  "upload into a stalled store: %s %s %s" % (push.status, push.error, push.body[:300]))
            check(secs < 30, "the sleeping upload was cut only after %.1f s" % secs)
            check(d.request("GET", "/v1/health")[0] == 200, "the daemon does not serve on")
        finally:
            d.stop()
        t = time.time()
        while time.time() - t < 30 and c.s3.uploads(BUCKET):
            time.sleep(0.2)
        check(c.s3.uploads(BUCKET) == [], "multipart uploads left: %s" % c.s3.uploads(BUCKET))
    finally:
        px.stop()

# ---- bounded staging of converts ----

def low_entropy(n):
    """n bytes of four letters at random: zlib packs a cluster of them into a quarter of one."""
    return os.urandom(n).translate(bytes(b"ACGT"[i & 3] for i in range(256)))


def convert_watched(c, d, name, body, peak):
    """POST a convert of name and wait for it, the staging folder measured every
    20 ms (the largest in peak[0]): the concluded job."""
    st, doc = d.json("POST", "/v1/images/%s/convert" % name, body)
    check(st == 202, "convert %s %s: %s %s" % (name, body, st, doc))
    deadline = time.time() + 600
    while time.time() < deadline:
        peak[0] = max(peak[0], staged_bytes(c))
        st, j = d.json("GET", "/v1/jobs/" + doc["id"])
        if j["status"] == "concluded":
            return j
        time.sleep(0.02)
    raise AssertionError("convert %s not done after 600 s" % body)


def convert_staging_bounded(c):
    """Converts into a bucket with staging-max=16M and 5 MiB parts release the
    data clusters they write once (the engine's release_data): the parts sent
    are punched out of the staging file, so it never holds more than
    staging-max + part 0 + a part in flight + a window, where without the
    release it would hold the whole target (96 MiB). Plain, compressed (random
    clusters beside packed compressed ones), a keep-backing convert with
    extended L2 and partial clusters from a backing chain, and one to 4 KiB
    clusters (metadata every few MiB: a part more): each target reads
    back as its source (qemu-img compare) and passes qemu-img check. A convert
    paused with parts streamed, then cancelled, leaves no object, no multipart
    upload and no staging file."""
    p = c.prefix()
    d = c.qcowd(p, opts=("part-size=5M", "staging-max=16M"))
    try:
        bound = 16 * MiB + 5 * MiB + 5 * MiB + 2 * MiB
        src = random_image(c, "big", 128 * MiB, 96 * MiB)
        mixed = os.path.join(c.tmp, "mixed.img")
        with open(mixed, "wb") as f:  # 64 KiB clusters: random, then low entropy, in turn
            for _ in range(96 * MiB // (128 << 10)):
                f.write(os.urandom(64 << 10) + low_entropy(64 << 10))
        msrc = os.path.join(c.tmp, "mixed.qcow2")
        run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", mixed, msrc)
        os.unlink(mixed)
        base = c.image("base", 64 * MiB, "write -P 0x11 0 64M")
        top = c.image("top", 64 * MiB, "write -P 0x22 8M 40M", "write -P 0x33 50M 4k", "write -z 52M 12k",
                      "write -P 0x44 60M 100k", opts="backing_file=base.qcow2,backing_fmt=qcow2")
        for path in (src, msrc, base, top):
            c.upload(p, path)
        for name, source, body in (("plain", src, {"target": "plain"}),
                                   ("packed", msrc, {"target": "packed", "compress": True}),
                                   ("kept", top, {"target": "kept", "backing": "keep", "extended-l2": True}),
                                   ("small", src, {"target": "small", "cluster-size": 4096})):
            peak = [0]
            j = convert_watched(c, d, os.path.basename(source)[:-6], body, peak)
            check(j["error"] is None and not j["cancelled"], "convert to %s: %s" % (name, j))
            print("     staging held at most %.1f MiB converting to %s (%.1f MiB)"
                  % (peak[0] / MiB, name, len(c.s3.get(BUCKET, "%s/%s.qcow2" % (p, name))) / MiB))
            # 4 KiB clusters: an L2 table per 2 MiB, a refcount block per 8 MiB;
            # made side by side, they keep a part more staged (made one at a
            # time between the data, every part held one: 96 MiB, and with the
            # tables alone batched, 66 MiB)
            limit = bound + 5 * MiB if name == "small" else bound
            check(peak[0] <= limit, "staging held %.1f MiB converting to %s (bound %.1f MiB)"
                  % (peak[0] / MiB, name, limit / MiB))
            check(peak[0] > 0, "the staging folder was never seen holding the target")
            run("qemu-img", "compare", "-q", source, c.download_checked(p, name))
        check(staged_bytes(c) == 0, "staging files left: %d bytes" % staged_bytes(c))
        check(d.metric("requests_copy") == 0, "the converts cost %d copies" % d.metric("requests_copy"))

        # paused with parts streamed, then cancelled: nothing is left
        parts = d.metric("requests_upload_part")
        st, doc = d.json("POST", "/v1/images/big/convert", {"target": "gone", "compress": True})
        check(st == 202, "convert: %s %s" % (st, doc))
        jid = doc["id"]
        deadline = time.time() + 120
        while d.metric("requests_upload_part") < parts + 3 and time.time() < deadline:
            time.sleep(0.01)
        st, j = d.json("POST", "/v1/jobs/%s/pause" % jid)
        check(st == 200 and j["status"] == "paused", "pause: %s %s" % (st, j))
        check(j["current-progress"] < j["total-progress"], "the convert ended before the pause: %s" % j)
        check(len(uploads_under(c, p + "/gone")) == 1, "no multipart upload while paused")
        st, j = d.json("POST", "/v1/jobs/%s/cancel" % jid)
        check(st == 200, "cancel: %s %s" % (st, j))
        deadline = time.time() + 60
        while j["status"] != "concluded" and time.time() < deadline:
            time.sleep(0.02)
            st, j = d.json("GET", "/v1/jobs/" + jid)
        check(j["cancelled"] and j["error"], "the cancelled convert: %s" % j)
        keys = [k for k in c.s3.keys(BUCKET, p + "/") if "gone" in k]
        check(keys == [], "objects after the cancelled convert: %s" % keys)
        check(uploads_under(c, p + "/") == {}, "multipart uploads left behind: %s" % uploads_under(c, p + "/"))
        check(staged_bytes(c) == 0, "staging files left: %d bytes" % staged_bytes(c))
        d.stop()
        bad = [ln for ln in d.lines if any(m in ln for m in qcowd.SANITIZER_MARKS)]
        check(not bad, "sanitizer reports: %s" % bad[:5])
    finally:
        d.stop()


CASES = [reads_match_qemu, small_read_fetches_few_blocks, writes_survive_restart, publish_copies_unchanged_parts,
         crash_before_complete_keeps_old_image, create_upload_delete_chain, wrong_secret, credentials_file,
         missing_bucket_and_unreachable, secrets_and_plain_http_refused, faults_at_run_time, lost_complete_answer, listing_past_one_page, parallel_readers_and_a_writer,
         reads_within_ttl_make_no_head, listing_validates_from_entries, outside_change_noticed_after_ttl,
         own_changes_seen_at_once, flush_cost_of_small_writes, parallel_readahead, readahead_never_mixes_versions,
         random_reads_one_get_each, upload_invisible_until_complete, crash_before_upload_completes, upload_streams_parts,
         kill_mid_stream, upload_streams_without_readahead, uploads_counted_in_budget, listing_etag_of_multipart_copy,
         invalid_upload_names_no_pending, stale_uploads_aborted_at_start, crash_after_upload_start,
         two_daemons_share_a_prefix, own_upload_outlives_stale_upload, upload_staging_bounded,
         upload_tables_at_end, upload_waits_for_a_slow_store, upload_complete_fails_after_parts_dropped,
         upload_backpressure_frees_the_thread, convert_staging_bounded]


def main():
    if not QCOWD or not os.access(QCOWD, os.X_OK):
        print("s3.py: set QCOWD to the qcowd binary", file=sys.stderr)
        return 2
    if not os.environ.get("S3_ENDPOINT") and not s3fixture.have_swift():
        print("s3.py: Swift is not installed (scripts/install-deps.sh --test): skipped")
        return 77
    want = sys.argv[1:]
    tmp = tempfile.mkdtemp(prefix="qcowd-s3test-")
    failed = 0
    t0 = time.time()
    try:
        with s3fixture.Swift(os.path.join(tmp, "swift")) as s3:
            print("s3.py: Swift S3 on %s (%.1f s)" % (s3.endpoint, time.time() - t0))
            s3.create_bucket(BUCKET)
            c = Ctx(s3, tmp)
            ran = 0
            for case in CASES:
                if want and case.__name__ not in want:
                    continue
                ran += 1
                t = time.time()
                try:
                    case(c)
                    print("ok   %s (%.1f s)" % (case.__name__, time.time() - t))
                except Exception:
                    failed += 1
                    print("FAIL %s\n%s" % (case.__name__, traceback.format_exc()))
            print("s3.py: %d cases, %d failed, %.1f s" % (ran, failed, time.time() - t0))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
