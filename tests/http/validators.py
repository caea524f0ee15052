#!/usr/bin/python3
"""validators.py: proves the HTTP validators of a live qcowd: a strong ETag and a
Last-Modified on info, data, file and snapshot data answers that stay while
nothing changes and move with every write, zero, snapshot, bitmap change,
replacement of the image, a job writing through its own handle (commit), a
change behind the daemon's back and restart, and
never label two different bodies of one URL; If-Range (a resumed download of a
changed image gets the whole new body, never a piece to join to the old one),
If-None-Match (304), If-Match on reads and writes (412, the data unchanged),
of two writers holding one ETag exactly one wins, If-None-Match: * on create
and upload; actual-size follows writes without a restart.

Environment: QCOWD (required), OPENAPI, QEMU_IMG, QEMU_IO.
Usage: validators.py [--seed N] [--keep]. Prints `ok NAME` / `FAIL NAME: reason`,
then `N passed, M failed`; exits 1 on a failure, 77 when qemu-img is missing.
"""

import email.utils
import hashlib
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "daemon"))
import daemon as dm  # noqa: E402  (Daemon, Checker, qemu_io, run)

KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB
URLS = ("/v1/images/%s", "/v1/images/%s/data", "/v1/images/%s/file")


def img(cat, name):
    return os.path.join(cat, name + ".qcow2")


class V(dm.Checker):
    def __init__(self, args, cat):
        super().__init__(args)
        self.cat = cat
        self.d = None
        self.bodies = {}  # (url, etag) -> sha256 of the full body: a tag never labels two

    def start(self):
        self.d = dm.Daemon(self.cat, 4)

    def req(self, method, path, body=None, headers=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        for _ in range(100):
            st, h, b = self.d.exchange(method, path, body, headers)
            # a GET .../file this suite read to its end holds writers off until the
            # daemon's completion callback ran, which may come after the client has
            # its last byte: a change right after one may meet it for a moment
            if not (st == 409 and b"being downloaded" in b):
                break
            time.sleep(0.02)
        return st, h, b

    def get(self, path, headers=None, want=200):
        """GET path: (etag, last-modified, body, headers); every full body is
        recorded under its tag, and a tag seen before must label the same bytes."""
        st, h, b = self.req("GET", path, headers=headers)
        assert st == want, "%s: %d %s" % (path, st, b[:300])
        tag = h.get("etag")
        if st == 200 and tag:
            digest = hashlib.sha256(b).hexdigest()
            if path.endswith("/data") or path.endswith("/file"):
                old = self.bodies.setdefault((path, tag), digest)
                assert old == digest, "%s: ETag %s labels two different bodies" % (path, tag)
        return tag, h.get("last-modified"), b, h

    def tags(self, name):
        return [self.get(u % name)[0] for u in URLS]

    def job(self, method, path, body=None, headers=None):
        st, h, b = self.req(method, path, body, headers)
        assert st == 202, "%s %s: %d %s" % (method, path, st, b[:300])
        jid = json.loads(b)["id"]
        t = time.time() + 60
        while time.time() < t:
            st, h, b = self.req("GET", "/v1/jobs/%s" % jid)
            j = json.loads(b)
            if j["status"] == "concluded":
                assert j["error"] is None, j
                return j
            time.sleep(0.02)
        raise AssertionError("job %s did not conclude" % jid)

    def put(self, name, off, data, headers=None, want=204):
        h = {"Content-Range": "bytes %d-%d/*" % (off, off + len(data) - 1)}
        h.update(headers or {})
        st, rh, b = self.req("PUT", "/v1/images/%s/data" % name, data, h)
        assert st == want, "PUT: %d %s" % (st, b[:300])
        return st, rh, b


def strong(tag):
    return tag and tag.startswith('"') and tag.endswith('"') and len(tag) > 2


def date_of(lm):
    t = email.utils.parsedate_to_datetime(lm)
    return t.timestamp()


def new_image(v, name, pattern=0x11):
    dm.run(dm.QEMU_IMG, "create", "-q", "-f", "qcow2", img(v.cat, name), str(SIZE))
    dm.qemu_io(img(v.cat, name), "write -q -P 0x%02x 0 1M" % pattern)


def held_put(port, name, off, total, first, headers):
    """A PUT of total bytes at off of which only first are sent: the handler has
    run (headers checked) and the request stays open. Returns the socket."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = "PUT /v1/images/%s/data HTTP/1.1\r\nHost: localhost\r\nContent-Range: bytes %d-%d/*\r\n" \
        "Content-Length: %d\r\n" % (name, off, off + total - 1, total)
    for k, val in headers.items():
        head += "%s: %s\r\n" % (k, val)
    s.sendall(head.encode() + b"\r\n" + first)
    return s


def finish(s, rest):
    s.sendall(rest)
    data = b""
    while b"\r\n\r\n" not in data:
        k = s.recv(4096)
        if not k:
            break
        data += k
    s.close()
    return int(data.split(b" ", 2)[1]) if data else 0


def main():
    args, top, cat = dm.qcowd.prologue("qcowd-validators-")
    v = V(args, cat)
    try:
        for n in ("a", "b", "c", "d", "e", "f", "g", "h", "cb"):
            new_image(v, n)
        dm.run(dm.QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "cb.qcow2", "-F", "qcow2", img(cat, "co"))
        dm.qemu_io(img(cat, "co"), "write -q -P 0x66 0 64k")
        v.start()
    except Exception:
        v.setup_failed()
        return v.summary()

    def present_and_strong():
        dm.run(dm.QEMU_IMG, "snapshot", "-c", "s0", img(cat, "h"))  # before the daemon opens it
        for u in URLS + ("/v1/images/%s/snapshots/s0/data",):
            for method in ("GET", "HEAD"):
                if u.endswith("/file") and method == "HEAD":
                    continue
                st, h, _ = v.req(method, u % "h")
                assert st == 200, (u, method, st)
                assert strong(h.get("etag")), "%s %s: ETag %r is not a strong tag" % (method, u, h.get("etag"))
                assert h.get("last-modified") and date_of(h["last-modified"]) <= time.time() + 1, (u, h)
        st, h, _ = v.req("GET", "/v1/images/h/data", headers={"Range": "bytes=0-99"})
        assert st == 206 and strong(h.get("etag")), (st, h)

    def unchanged_when_nothing_changed():
        first = v.tags("a")
        assert all(strong(t) for t in first), first
        time.sleep(0.05)
        assert v.tags("a") == first, "ETags moved with nothing changed"
        for u in URLS:
            st, h, _ = v.req("HEAD" if not u.endswith("file") else "GET", u % "a")
            assert h.get("etag") == v.get(u % "a")[0]

    def changes_with(what, change, name, urls=URLS):
        before = [v.get(u % name)[0] for u in urls]
        change()
        after = [v.get(u % name)[0] for u in urls]
        for u, x, y in zip(urls, before, after):
            assert x != y, "%s: ETag %s unchanged after %s" % (u % name, x, what)

    def after_write():
        changes_with("a PUT", lambda: v.put("b", 4096, b"\x5a" * 4096), "b")

    def after_zero():
        changes_with("a zero", lambda: v.req("PATCH", "/v1/images/b/data", {"op": "zero", "offset": 0, "size": 65536}),
                     "b")

    def after_snapshot():
        changes_with("a snapshot", lambda: v.job("POST", "/v1/images/c/snapshots", {"name": "s1"}), "c")
        s1 = v.get("/v1/images/c/snapshots/s1/data")[0]
        v.put("c", 0, b"\x77" * 4096)  # the active image moves on, the snapshot does not
        assert v.get("/v1/images/c/snapshots/s1/data")[0] == s1
        v.job("DELETE", "/v1/images/c/snapshots/s1")
        v.job("POST", "/v1/images/c/snapshots", {"name": "s1"})  # same name, other bytes
        assert v.get("/v1/images/c/snapshots/s1/data")[0] != s1

    def after_bitmap():
        def add():
            st, h, b = v.req("POST", "/v1/images/d/bitmaps", {"name": "bm"})
            assert st == 201, (st, b)
        changes_with("a bitmap add", add, "d", URLS[:1] + URLS[2:])

    def replaced_same_size():
        before = v.tags("e")
        st, _, _ = v.req("DELETE", "/v1/images/e")
        assert st == 204
        st, _, b = v.req("POST", "/v1/images", {"name": "e", "size": SIZE})
        assert st == 201, b
        v.put("e", 0, b"\x11" * MiB)  # same virtual size, the same bytes written again
        after = v.tags("e")
        for u, x, y in zip(URLS, before, after):
            assert x != y, "%s: ETag %s survived a delete and re-create" % (u % "e", x)

    def after_commit_job():
        # the job writes the base through a handle of its own, not the catalog's
        base = [v.get(u % "cb")[0] for u in URLS]
        top = v.get("/v1/images/co/data")[0]
        v.job("POST", "/v1/images/co/commit", {})
        assert v.get("/v1/images/co/data")[0] != top, "overlay: ETag unchanged after a commit job"
        for u, x in zip(URLS, base):
            y = v.get(u % "cb")[0]
            assert x != y, "%s: ETag %s unchanged after a commit job wrote it" % (u % "cb", x)

    def behind_the_back():
        before = v.tags("f")
        time.sleep(0.02)
        dm.qemu_io(img(cat, "f"), "write -q -P 0x99 0 4k")
        after = v.tags("f")
        for u, x, y in zip(URLS, before, after):
            assert x != y, "%s: ETag %s unchanged after a change behind the daemon's back" % (u % "f", x)

    def last_modified_advances():
        _, lm0, _, _ = v.get("/v1/images/g/data")
        time.sleep(1.1)
        v.put("g", 0, b"\x01" * 512)
        _, lm1, _, _ = v.get("/v1/images/g/data")
        _, lm2, _, _ = v.get("/v1/images/g")
        assert date_of(lm1) > date_of(lm0), (lm0, lm1)
        assert abs(date_of(lm1) - time.time()) < 5 and lm2 == lm1, (lm1, lm2)

    def resume_changed_image():
        for u in ("/v1/images/a/data", "/v1/images/a/file"):
            tag, lm, whole, _ = v.get(u)
            n = len(whole) // 2
            st, h, part = v.req("GET", u, headers={"Range": "bytes=0-%d" % (n - 1)})
            assert st == 206 and h["etag"] == tag
            # nothing changed: the rest joins
            st, h, rest = v.req("GET", u, headers={"Range": "bytes=%d-" % n, "If-Range": tag})
            assert st == 206 and part + rest == whole, (u, st)
            v.put("a", 0, os.urandom(64 * KiB))  # the image changes between the pieces
            st, h, body = v.req("GET", u, headers={"Range": "bytes=%d-" % n, "If-Range": tag})
            assert st == 200, "%s: If-Range with a stale ETag answered %d, not the whole new body" % (u, st)
            assert "content-range" not in h and h["etag"] != tag
            new_tag, _, new_whole, _ = v.get(u)
            assert body == new_whole and new_tag == h["etag"], u
            st, h, rest = v.req("GET", u, headers={"Range": "bytes=%d-" % n, "If-Range": new_tag})
            assert st == 206 and rest == new_whole[n:], (u, st)
            st, h, _ = v.req("GET", u, headers={"Range": "bytes=%d-" % n, "If-Range": "W/" + new_tag})
            assert st == 200, "a weak tag in If-Range must not match"

    def resume_by_date():
        time.sleep(1.1)
        v.put("g", 512, b"\x02" * 512)
        time.sleep(1.1)
        tag, lm, whole, _ = v.get("/v1/images/g/data")
        st, h, rest = v.req("GET", "/v1/images/g/data", headers={"Range": "bytes=100-199", "If-Range": lm})
        assert st == 206 and rest == whole[100:200], "If-Range with the current (strong) date: %d" % st
        time.sleep(1.1)
        v.put("g", 0, b"\x03" * 512)
        st, h, _ = v.req("GET", "/v1/images/g/data", headers={"Range": "bytes=100-199", "If-Range": lm})
        assert st == 200, "If-Range with an old date: %d" % st

    def if_none_match_304():
        for u in URLS + ("/v1/images/%s/snapshots/s0/data",):
            tag, lm, _, _ = v.get(u % "h")
            for method in ("GET", "HEAD"):
                if u.endswith("/file") and method == "HEAD":
                    continue
                for value in (tag, '"x", ' + tag, "W/" + tag, "*"):
                    st, h, b = v.req(method, u % "h", headers={"If-None-Match": value})
                    assert st == 304 and h.get("etag") == tag and not b, (u, method, value, st)
            st, h, _ = v.req("GET", u % "h", headers={"If-None-Match": '"not-it"'})
            assert st == 200, (u, st)

    def if_match_reads():
        for u in URLS:
            tag = v.get(u % "h")[0]
            st, h, b = v.req("GET", u % "h", headers={"If-Match": tag})
            assert st == 200, (u, st)
            st, h, b = v.req("GET", u % "h", headers={"If-Match": '"stale"'})
            assert st == 412 and json.loads(b)["error"]["code"] == "precondition-failed", (u, st, b)
            assert h.get("etag") == tag and tag in json.loads(b)["error"]["message"]
        st, h, b = v.req("GET", "/v1/images/h/data", headers={"If-Match": "garbage"})
        assert st == 400, (st, b)

    def if_match_stale_put():
        tag, _, before, _ = v.get("/v1/images/b/data")
        v.put("b", 0, b"\x42" * 512)  # someone else
        _, _, mid, _ = v.get("/v1/images/b/data")
        st, h, b = v.put("b", 0, b"\x43" * 512, {"If-Match": tag}, want=412)
        err = json.loads(b)["error"]
        cur = v.get("/v1/images/b/data")[0]
        assert err["code"] == "precondition-failed" and cur in err["message"], err
        assert v.get("/v1/images/b/data")[2] == mid, "a 412 PUT changed the data"
        v.put("b", 0, b"\x44" * 512, {"If-Match": cur})
        assert v.get("/v1/images/b/data")[2][:512] == b"\x44" * 512
        # zero, bitmap and snapshot with a stale tag: 412, nothing done
        st, _, b = v.req("PATCH", "/v1/images/b/data", {"op": "zero", "offset": 0, "size": 512}, {"If-Match": cur})
        assert st == 412, (st, b)
        st, _, b = v.req("POST", "/v1/images/b/bitmaps", {"name": "x"}, {"If-Match": cur})
        assert st == 412, (st, b)
        st, _, b = v.req("POST", "/v1/images/b/snapshots", {"name": "x"}, {"If-Match": cur})
        assert st == 412, (st, b)
        assert v.get("/v1/images/b/data")[2][:512] == b"\x44" * 512
        st, _, b = v.req("GET", "/v1/images/b/bitmaps")
        assert json.loads(b)["bitmaps"] == [], b

    def concurrent_if_match():
        tag = v.get("/v1/images/d/data")[0] or '"none"'  # (a daemon without tags ignores If-Match)
        # one writer is inside its body (its headers checked) when the other comes
        s = held_put(v.d.port, "d", 0, 8192, b"\xaa" * 100, {"If-Match": tag})
        t = time.time() + 20  # its claim moves the tag on: then it is inside
        while time.time() < t and v.req("HEAD", "/v1/images/d/data")[1].get("etag") == tag:
            time.sleep(0.02)
        st, h, b = v.req("PUT", "/v1/images/d/data", b"\xbb" * 8192, {"Content-Range": "bytes 0-8191/*", "If-Match": tag})
        first = finish(s, b"\xaa" * (8192 - 100))
        assert sorted([st, first]) == [204, 412], "two writers with one If-Match: %d and %d" % (first, st)
        assert v.get("/v1/images/d/data")[2][:8192] == b"\xaa" * 8192
        # many at once: exactly one wins
        tag = v.get("/v1/images/d/data")[0] or '"none"'
        results = []
        go = threading.Barrier(6)

        def writer(i):
            go.wait()
            st, _, _ = v.req("PUT", "/v1/images/d/data", bytes([i]) * 4096,
                             {"Content-Range": "bytes 0-4095/*", "If-Match": tag})
            results.append((st, i))

        ts = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wins = [i for st, i in results if st == 204]
        assert len(wins) == 1 and all(st in (204, 412) for st, _ in results), results
        assert v.get("/v1/images/d/data")[2][:4096] == bytes([wins[0]]) * 4096

    def if_none_match_star_create():
        st, _, b = v.req("POST", "/v1/images", {"name": "a", "size": MiB}, {"If-None-Match": "*"})
        assert st == 412 and json.loads(b)["error"]["code"] == "precondition-failed", (st, b)
        st, _, b = v.req("POST", "/v1/images", {"name": "new0", "size": MiB}, {"If-None-Match": "*"})
        assert st == 201, (st, b)
        with open(img(cat, "h"), "rb") as f:
            data = f.read()
        # refused on the headers: a short body, so the client is not cut off sending
        st, _, b = v.req("PUT", "/v1/images/a/file", data[:512], {"If-None-Match": "*"})
        assert st == 412, (st, b)
        st, _, b = v.req("PUT", "/v1/images/new2/file", data[:512], {"If-Match": '"x"'})
        assert st == 412, (st, b)
        st, _, b = v.req("PUT", "/v1/images/new2/file", data, {"If-None-Match": "*"})
        assert st == 201, (st, b)

    def delete_if_match():
        st, _, b = v.req("POST", "/v1/images", {"name": "new1", "size": MiB})
        assert st == 201, (st, b)
        tag = v.get("/v1/images/new1")[0]  # the info's tag: DELETE has the same URL
        st, _, b = v.req("DELETE", "/v1/images/new1", headers={"If-Match": '"other"'})
        assert st == 412, (st, b)
        assert v.req("GET", "/v1/images/new1")[0] == 200
        st, _, b = v.req("DELETE", "/v1/images/new1", headers={"If-Match": tag})
        assert st == 204, (st, b)

    def actual_size_grows():
        st, _, b = v.req("POST", "/v1/images", {"name": "grow", "size": SIZE})
        assert st == 201, (st, b)
        info = json.loads(v.get("/v1/images/grow")[2])
        size0 = info["actual-size"]
        for i in range(4):
            v.put("grow", i * MiB, os.urandom(MiB))
        info = json.loads(v.get("/v1/images/grow")[2])
        assert info["actual-size"] >= size0 + 3 * MiB, (size0, info["actual-size"])

    def after_restart():
        v.put("a", 0, b"\x31" * 4096)
        before = v.tags("a")
        v.d.stop_clean()
        v.start()
        after = v.tags("a")
        for u, x, y in zip(URLS, before, after):
            assert x != y, "%s: ETag %s repeated after a restart" % (u % "a", x)

    v.case("present_and_strong", present_and_strong)
    v.case("unchanged_when_nothing_changed", unchanged_when_nothing_changed)
    v.case("changes_after_write", after_write)
    v.case("changes_after_zero", after_zero)
    v.case("changes_after_snapshot", after_snapshot)
    v.case("changes_after_bitmap_add", after_bitmap)
    v.case("changes_after_delete_recreate", replaced_same_size)
    v.case("changes_after_commit_job", after_commit_job)
    v.case("changes_behind_the_back", behind_the_back)
    v.case("last_modified_advances", last_modified_advances)
    v.case("resume_changed_image_if_range", resume_changed_image)
    v.case("resume_if_range_date", resume_by_date)
    v.case("if_none_match_304", if_none_match_304)
    v.case("if_match_reads", if_match_reads)
    v.case("if_match_stale_writes_412", if_match_stale_put)
    v.case("concurrent_if_match_one_wins", concurrent_if_match)
    v.case("if_none_match_star_create", if_none_match_star_create)
    v.case("delete_if_match", delete_if_match)
    v.case("actual_size_grows", actual_size_grows)
    v.case("changes_after_restart", after_restart)
    try:
        v.d.stop_clean()
    except Exception:
        v.setup_failed()
    rc = v.summary()
    dm.qcowd.remove_temp(top, args.keep or rc != 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
