#!/usr/bin/python3
"""bitmaps_http.py: persistent dirty bitmaps over HTTP against a live qcowd:
  crud         create (201, Location), list, get, enable, disable, clear, merge, delete
  writes       PUT data and PATCH zero/discard mark enabled bitmaps, not disabled ones;
               extents?context=dirty equals what the writes must have marked
  backup       an incremental backup: full copy, clear, a few writes, then only the
               dirty extents are read and patched into the copy, which equals the disk
  qemu         after qcowd stops, qemu-img info shows the same bitmaps, qemu-nbd the same
               dirty runs as the last extents answer, qemu-img check is clean
  stale        qcowd killed after writes: its enabled bitmaps are left in use; a new
               qcowd reports them (flags in-use, 409 for extents/enable/merge), clears
               one (usable again) and deletes another
  concurrent   writers and bitmap changes at once: no error, the final view is right
  bad input    unknown image/bitmap 404, bad name/granularity/JSON 400, duplicate 409,
               v2 image 422, wrong method 405; every JSON body validates against the
               OpenAPI document

Environment: QCOWD, QCOWIMG (required), OPENAPI, QEMU_IMG, QEMU_NBD, NBDINFO.
QCOWD_S3=1 runs the same cases with the catalog in a bucket of a local Swift + s3api
(daemon.py's s3_start): the images are built locally and uploaded, and the checks
with qemu tools first copy the bucket's objects into the local folder (sync_down);
exit 77 when Swift is not installed.
Usage: bitmaps_http.py [--seed N] [--keep]. Prints `ok NAME` / `FAIL NAME: reason`,
then `N passed, M failed`; exits 1 on a failure, 77 when a qemu tool is missing.
"""

import json
import os
import random
import signal
import sys
import threading
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "daemon"))
sys.path.insert(0, HERE)
import daemon as dm  # noqa: E402  (Daemon, validate, the OpenAPI document)
import bitmaps as bm  # noqa: E402  (nbd_map, expected_map, runs, check_clean)

KiB = 1024
MiB = 1024 * KiB
SIZE = 32 * MiB


class Suite(bm.Suite):
    def __init__(self, args, cat):
        super().__init__(args, cat)
        self.cat = cat
        import yaml
        with open(dm.OPENAPI) as f:
            self.doc = yaml.safe_load(f)
        self.d = None

    def call(self, method, path, body=None, headers=None, schema=None, want=None):
        c = self.d.conn()
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            headers = dict(headers or {})
            if data is not None and method in ("POST", "PATCH"):
                headers.setdefault("Content-Type", "application/json")
            c.request(method, path, body=data, headers=headers)
            r = c.getresponse()
            raw = r.read()
        finally:
            c.close()
        j = None
        if raw and r.getheader("content-type", "").startswith("application/json"):
            j = json.loads(raw)
            if r.status >= 400:
                dm.validate(self.doc, "Error", j)
                assert j["error"]["message"], "empty error message"
            elif schema:
                dm.validate(self.doc, schema, j)
        if want is not None and r.status != want:
            raise AssertionError("%s %s: status %d, want %d: %r" % (method, path, r.status, want, raw[:300]))
        return r.status, j, r

    def dirty(self, image, bitmap):
        _, j, _ = self.call("GET", "/v1/images/%s/extents?context=dirty&bitmap=%s" % (image, urllib.parse.quote(bitmap)),
                            schema="DirtyExtents", want=200)
        assert sum(e["length"] for e in j) == SIZE and j[0]["start"] == 0, j
        return bm.runs((e["start"], e["length"], e["dirty"]) for e in j)

    def put(self, image, off, data):
        self.call("PUT", "/v1/images/%s/data" % image, data,
                  {"Content-Range": "bytes %d-%d/*" % (off, off + len(data) - 1)}, want=204)

    def patch(self, image, op, off, n):
        self.call("PATCH", "/v1/images/%s/data" % image, {"op": op, "offset": off, "size": n}, want=204)

    def path(self, name):
        return os.path.join(self.cat, name + ".qcow2")


def main():
    args, top, cat = dm.qcowd.prologue("qcowd-bitmaps-http-", tools=(bm.QEMU_IMG, bm.QEMU_NBD, bm.NBDINFO),
                                        binaries={"QCOWD": dm.QCOWD, "QCOWIMG": bm.QCOWIMG})
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    s = Suite(args, cat)
    try:
        dm.s3_start(top)
        cases(s)
    finally:
        dm.finish(top, args.keep, [s.d])
    return s.summary()


def stop(s):
    s.d.proc.send_signal(signal.SIGTERM)
    assert s.d.proc.wait(60) == 0, "qcowd exit status %s" % s.d.proc.returncode


def cases(s):
    rng = s.rng
    for name in ("a", "b", "c", "other"):
        bm.run(bm.QEMU_IMG, "create", "-q", "-f", "qcow2", s.path(name), "32M")
    bm.run(bm.QEMU_IMG, "create", "-q", "-f", "qcow2", s.path("small"), "8M")
    bm.run(bm.QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", s.path("v2"), "1M")
    dm.sync_up(s.cat)
    s.d = dm.Daemon(s.cat)
    last = {}  # (image, bitmap) -> the last dirty runs qcowd showed

    def crud():
        st, j, r = s.call("POST", "/v1/images/a/bitmaps", {"name": "full"}, schema="Bitmap", want=201)
        assert j == {"name": "full", "flags": ["auto"], "granularity": 65536}, j
        assert r.getheader("Location") == "/v1/images/a/bitmaps/full", r.getheader("Location")
        _, j, _ = s.call("POST", "/v1/images/a/bitmaps", {"name": "fine x/y", "granularity": 4096, "disabled": True},
                         schema="Bitmap", want=201)
        assert j == {"name": "fine x/y", "flags": [], "granularity": 4096}, j
        _, j, _ = s.call("GET", "/v1/images/a/bitmaps", schema="BitmapList", want=200)
        assert [b["name"] for b in j["bitmaps"]] == ["full", "fine x/y"], j
        _, j, _ = s.call("GET", "/v1/images/a/bitmaps/fine%20x%2Fy", schema="Bitmap", want=200)
        assert j["granularity"] == 4096
        _, j, _ = s.call("POST", "/v1/images/a/bitmaps/fine%20x%2Fy/enable", schema="Bitmap", want=200)
        assert j["flags"] == ["auto"], j
        _, j, _ = s.call("POST", "/v1/images/a/bitmaps/fine%20x%2Fy/disable", schema="Bitmap", want=200)
        assert j["flags"] == [], j
        _, j, _ = s.call("GET", "/v1/images/a", schema="ImageInfo", want=200)
        assert [b["name"] for b in j["format-specific"]["data"]["bitmaps"]] == ["full", "fine x/y"]
        s.call("POST", "/v1/images/a/bitmaps", {"name": "gone"}, want=201)
        s.call("DELETE", "/v1/images/a/bitmaps/gone", want=204)
        s.call("GET", "/v1/images/a/bitmaps/gone", want=404)
    s.case("create_list_get_enable_disable_delete", crud)

    def writes():
        w = []
        for i in range(10):
            n = rng.randrange(1, 200 * KiB)
            off = rng.randrange(0, SIZE - n)
            if i % 3 == 0:
                s.patch("a", "zero", off, n)
            elif i % 3 == 1:
                s.patch("a", "discard", off, n)
            else:
                s.put("a", off, rng.randbytes(n))
            w.append((off, n))
        want = bm.expected_map(SIZE, 64 * KiB, w)
        assert s.dirty("a", "full") == want
        assert s.dirty("a", "fine x/y") == bm.all_clean(SIZE), "a disabled bitmap was marked"
        # merge: the disabled 4k bitmap takes full's 64k granules
        _, j, _ = s.call("POST", "/v1/images/a/bitmaps/fine%20x%2Fy/merge", {"source": "full"}, schema="Bitmap",
                         want=200)
        assert s.dirty("a", "fine x/y") == want
        last[("a", "full")] = last[("a", "fine x/y")] = want
    s.case("put_patch_mark_enabled_bitmaps_and_merge", writes)

    def backup():
        s.call("POST", "/v1/images/b/bitmaps", {"name": "inc", "granularity": 16384}, want=201)
        for _ in range(5):
            s.put("b", rng.randrange(0, SIZE - 100 * KiB), rng.randbytes(rng.randrange(1, 100 * KiB)))
        # the full backup, then the bitmap starts afresh
        c = s.d.conn()
        c.request("GET", "/v1/images/b/data")
        full = bytearray(c.getresponse().read())
        c.close()
        assert len(full) == SIZE
        s.call("POST", "/v1/images/b/bitmaps/inc/clear", want=200)
        assert s.dirty("b", "inc") == bm.all_clean(SIZE)
        w = []
        for i in range(6):
            n = rng.randrange(1, 150 * KiB)
            off = rng.randrange(0, SIZE - n)
            if i == 3:
                s.patch("b", "zero", off, n)
            else:
                s.put("b", off, rng.randbytes(n))
            w.append((off, n))
        runs = s.dirty("b", "inc")
        assert runs == bm.expected_map(SIZE, 16384, w), runs
        copied = 0
        for start, n, d in runs:
            if not d:
                continue
            c = s.d.conn()
            c.request("GET", "/v1/images/b/data", headers={"Range": "bytes=%d-%d" % (start, start + n - 1)})
            r = c.getresponse()
            assert r.status == 206, r.status
            full[start:start + n] = r.read()
            c.close()
            copied += n
        c = s.d.conn()
        c.request("GET", "/v1/images/b/data")
        now = c.getresponse().read()
        c.close()
        assert bytes(full) == now, "the incremental backup differs from the disk"
        assert copied < SIZE // 4, "copied %d bytes" % copied
        last[("b", "inc")] = runs
    s.case("incremental_backup_reads_only_dirty_extents", backup)

    def merge_other_image():
        s.call("POST", "/v1/images/c/bitmaps", {"name": "dst", "disabled": True}, want=201)
        s.call("POST", "/v1/images/other/bitmaps", {"name": "src", "granularity": 1048576}, want=201)
        s.put("other", 5 * MiB + 3, b"x" * 10)
        _, j, _ = s.call("POST", "/v1/images/c/bitmaps/dst/merge", {"source": "src", "source-image": "other"},
                         schema="Bitmap", want=200)
        want = bm.expected_map(SIZE, MiB, [(5 * MiB, 1)])
        assert s.dirty("c", "dst") == want
        last[("c", "dst")] = want
        s.call("POST", "/v1/images/small/bitmaps", {"name": "s"}, want=201)
        s.call("POST", "/v1/images/c/bitmaps/dst/merge", {"source": "s", "source-image": "small"}, want=400)
        s.call("POST", "/v1/images/c/bitmaps/dst/merge", {"source": "src", "source-image": "nope"}, want=404)
    s.case("merge_from_another_image", merge_other_image)

    def concurrent():
        s.call("POST", "/v1/images/c/bitmaps", {"name": "busy"}, want=201)
        errors = []
        written = []
        lock = threading.Lock()

        def writer(k):
            r = random.Random(k)
            try:
                for _ in range(15):
                    n = r.randrange(1, 64 * KiB)
                    off = r.randrange(0, SIZE - n)
                    s.put("c", off, r.randbytes(n))
                    with lock:
                        written.append((off, n))
            except Exception as e:
                errors.append(e)

        def changer():
            try:
                for i in range(10):
                    s.call("POST", "/v1/images/c/bitmaps", {"name": "t%d" % i}, want=201)
                    s.call("POST", "/v1/images/c/bitmaps/t%d/merge" % i, {"source": "busy"}, want=200)
                    s.dirty("c", "busy")
                    s.call("POST", "/v1/images/c/bitmaps/t%d/disable" % i, want=200)
                    s.call("DELETE", "/v1/images/c/bitmaps/t%d" % i, want=204)
            except Exception as e:
                errors.append(e)

        ts = [threading.Thread(target=writer, args=(k,)) for k in range(3)] + [threading.Thread(target=changer)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors[:3]
        want = bm.expected_map(SIZE, 64 * KiB, written)
        assert s.dirty("c", "busy") == want
        last[("c", "busy")] = want
    s.case("writers_and_bitmap_changes_at_once", concurrent)

    def bad_input():
        s.call("GET", "/v1/images/nope/bitmaps", want=404)
        s.call("POST", "/v1/images/nope/bitmaps", {"name": "x"}, want=404)
        s.call("GET", "/v1/images/a/bitmaps/nope", want=404)
        s.call("DELETE", "/v1/images/a/bitmaps/nope", want=404)
        for op in ("clear", "enable", "disable"):
            s.call("POST", "/v1/images/a/bitmaps/nope/" + op, want=404)
        s.call("POST", "/v1/images/a/bitmaps/full/merge", {"source": "nope"}, want=404)
        s.call("GET", "/v1/images/a/extents?context=dirty&bitmap=nope", want=404)
        s.call("GET", "/v1/images/a/extents?context=dirty", want=400)
        s.call("GET", "/v1/images/a/extents?context=nonsense", want=400)
        s.call("POST", "/v1/images/a/bitmaps", {"name": "full"}, want=409)
        s.call("POST", "/v1/images/a/bitmaps", {"name": ""}, want=400)
        s.call("POST", "/v1/images/a/bitmaps", {"name": "n" * 1024}, want=400)
        s.call("POST", "/v1/images/a/bitmaps", {"name": "g", "granularity": 256}, want=400)
        s.call("POST", "/v1/images/a/bitmaps", {"name": "g", "granularity": 3000}, want=400)
        s.call("POST", "/v1/images/a/bitmaps", {"name": "g", "granularity": -1}, want=400)
        s.call("POST", "/v1/images/a/bitmaps", {"name": "g", "extra": 1}, want=400)
        s.call("POST", "/v1/images/a/bitmaps", {"name": 5}, want=400)
        s.call("POST", "/v1/images/a/bitmaps", b'{"name": ', want=400)
        s.call("POST", "/v1/images/a/bitmaps", b'[]', want=400)
        s.call("POST", "/v1/images/a/bitmaps/full/merge", b'{"source"', want=400)
        s.call("POST", "/v1/images/a/bitmaps/full/merge", {"src": "x"}, want=400)
        _, j, _ = s.call("POST", "/v1/images/v2/bitmaps", {"name": "x"}, want=422)
        assert "v2" in j["error"]["message"], j
        s.call("PUT", "/v1/images/a/bitmaps", want=405)
        s.call("PATCH", "/v1/images/a/bitmaps/full", want=405)
        s.call("GET", "/v1/images/a/bitmaps/full/clear", want=405)
        assert s.d.alive()
        _, j, _ = s.call("GET", "/v1/images/a/bitmaps", schema="BitmapList", want=200)
        assert [b["name"] for b in j["bitmaps"]] == ["full", "fine x/y"], j
    s.case("bad_input_statuses", bad_input)

    def qemu_after_stop():
        lists = {}
        for img in ("a", "b", "c"):
            _, j, _ = s.call("GET", "/v1/images/%s/bitmaps" % img, want=200)
            lists[img] = j["bitmaps"]
        stop(s)
        s.d = None
        dm.sync_down(s.cat)
        for img, l in lists.items():
            bm.check_clean(s.path(img))
            assert bm.qemu_info_bitmaps(s.path(img)) == l, (img, bm.qemu_info_bitmaps(s.path(img)), l)
        for (img, name), want in last.items():
            got = bm.nbd_map(s.path(img), name)
            assert got == want, "%s/%s: qemu-nbd %s, qcowd said %s" % (img, name, got[:6], want[:6])
    s.case("qemu_sees_what_qcowd_showed_after_stop", qemu_after_stop)

    def stale():
        s.d = dm.Daemon(s.cat)
        for n in ("s1", "s2"):
            s.call("POST", "/v1/images/b/bitmaps", {"name": n}, want=201)
        s.put("b", 0, b"y" * 100)
        s.call("PATCH", "/v1/images/b/data", {"op": "flush"}, want=204)
        s.d.proc.kill()
        s.d.proc.wait()
        dm.sync_down(s.cat, "b.qcow2")
        flags = {b["name"]: b["flags"] for b in bm.qemu_info_bitmaps(s.path("b"))}
        assert flags == {"inc": ["in-use", "auto"], "s1": ["in-use", "auto"], "s2": ["in-use", "auto"]}, flags
        s.d = dm.Daemon(s.cat)
        _, j, _ = s.call("GET", "/v1/images/b/bitmaps", schema="BitmapList", want=200)
        assert all(b["flags"] == ["in-use", "auto"] for b in j["bitmaps"]), j
        _, j, _ = s.call("GET", "/v1/images/b/extents?context=dirty&bitmap=s1", want=409)
        assert "in use" in j["error"]["message"], j
        s.call("POST", "/v1/images/b/bitmaps/s1/enable", want=409)
        s.call("POST", "/v1/images/b/bitmaps/inc/merge", {"source": "s1"}, want=409)
        s.put("b", MiB, b"z")  # writes go on; stale bitmaps are not marked
        _, j, _ = s.call("POST", "/v1/images/b/bitmaps/s1/clear", schema="Bitmap", want=200)
        assert j["flags"] == ["auto"], j
        s.call("DELETE", "/v1/images/b/bitmaps/s2", want=204)
        s.put("b", 2 * MiB, b"z")
        assert s.dirty("b", "s1") == bm.expected_map(SIZE, 64 * KiB, [(2 * MiB, 1)])
        stop(s)
        s.d = None
        dm.sync_down(s.cat, "b.qcow2")
        bm.check_clean(s.path("b"))
        flags = {b["name"]: b["flags"] for b in bm.qemu_info_bitmaps(s.path("b"))}
        assert flags == {"inc": ["in-use", "auto"], "s1": ["auto"]}, flags
        assert bm.nbd_map(s.path("b"), "s1") == bm.expected_map(SIZE, 64 * KiB, [(2 * MiB, 1)])
    s.case("stale_bitmaps_after_a_kill_reported_cleared_deleted", stale)


if __name__ == "__main__":
    sys.exit(main())
