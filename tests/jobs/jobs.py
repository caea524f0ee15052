#!/usr/bin/python3
"""jobs.py: proves the job endpoints of a live qcowd against qemu-img: snapshots
made, deleted and reverted through the API are what `qemu-img info`/`convert -l`
see, check jobs report what `qemu-img check` reports, convert jobs give images
`qemu-img compare` finds equal, long jobs pause, resume and cancel, a SIGKILL in
the middle of a job leaves the image clean and the record concluded with an error
after the restart, many jobs run with data traffic, and the event stream shows
jobs and images to two listeners at once. Every JSON body seen is validated
against openapi/openapi.yaml.

Environment: QCOWD (required), OPENAPI, QEMU_IMG, QEMU_IO. Usage: jobs.py [--seed N] [--keep]
QCOWD_S3=1 runs the same cases with the catalog in a bucket of a local Swift + s3api
(daemon.py's s3_start): images are built locally and uploaded, and the checks with
qemu-img first copy an image and its backing chain from the bucket; exit 77 when
Swift is not installed.
Prints `ok NAME` / `FAIL NAME: reason`, then `N passed, M failed`; exits 1 on a
failure, 77 when qemu-img is missing.
"""

import json
import os
import random
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "daemon"))
import daemon as dm  # noqa: E402  (lint_openapi, validate, Checker)
import sse  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
QEMU_IMG = dm.QEMU_IMG
QEMU_IO = dm.QEMU_IO
run = dm.run
MANY_ROUNDS = 4  # snapshot + check of each image per round, and a convert
KILL_MIB = 48  # the image whose snapshot delete is killed
if os.environ.get("QCOWD_S3"):  # every job record and flush is a publish to Swift: fewer, smaller
    MANY_ROUNDS = 2
    KILL_MIB = 24


class Daemon(dm.Daemon):
    """qcowd with job options; same log pump as the daemon suite."""
    started = []  # every one, killed at the end if still running

    def __init__(self, catalog, *extra):
        super().__init__(catalog, 4, extra)
        Daemon.started.append(self)

    def call(self, method, path, body=None, headers=None):
        """exchange() with a dict or list body sent as JSON."""
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        return self.exchange(method, path, data, headers)


class T(dm.Checker):
    def start_job(self, d, method, path, body=None, want=202):
        st, h, b = d.call(method, path, body)
        if st != want:
            raise AssertionError("%s %s: status %d, want %d: %r" % (method, path, st, want, b[:300]))
        if want != 202:
            return self.json_of(st, h, b, "Error", path)
        j = self.json_of(st, h, b, "Job", path)
        assert h.get("location") == "/v1/jobs/" + j["id"], h.get("location")
        return j

    def job(self, d, jid):
        st, h, b = d.call("GET", "/v1/jobs/" + jid)
        assert st == 200, (st, b)
        return self.json_of(st, h, b, "Job", "job " + jid)

    def wait(self, d, jid, status=("concluded",), timeout=120):
        t = time.time() + timeout
        while time.time() < t:
            j = self.job(d, jid)
            if j["status"] in status:
                return j
            time.sleep(0.02)
        raise AssertionError("job %s not %s after %ds: %r" % (jid, status, timeout, j))

    def run_job(self, d, method, path, body=None, ok=True):
        j = self.wait(d, self.start_job(d, method, path, body)["id"])
        if ok:
            assert j["error"] is None and not j["cancelled"], j
        return j


CAT = None  # the catalog folder (with QCOWD_S3, the local copy of the bucket's catalog)


def auto_repairs(ck, d, images, known):
    """The check jobs (repair: leaks) a restart queued for images, each waited for
    and successful: {image: job}. known: ids of jobs that are not such repairs."""
    t = time.time() + 120
    found = {}
    while time.time() < t and set(found) != images:
        st, h, b = d.call("GET", "/v1/jobs")
        for x in json.loads(b)["jobs"]:
            if x["id"] not in known and x["type"] == "check" and x["image"] in images:
                assert x["params"].get("repair") == "leaks", x
                found[x["image"]] = x
        time.sleep(0.05)
    assert set(found) == images, "no repair job queued by the restart for %s: %r; qcowd said: %s" % (
        images - set(found), found, [ln for ln in d.lines if "cut off" in ln or "job" in ln][:8])
    out = {}
    for name, x in found.items():
        y = ck.wait(d, x["id"])
        assert y["error"] is None and not y["cancelled"], y
        out[name] = y
    return out


def img(cat, name):
    return os.path.join(cat, name + ".qcow2")


def etag(name):
    st, h, _ = dm.S3.request("HEAD", dm.S3_BUCKET, dm.S3_PREFIX + "/" + name)
    return {k.lower(): v for k, v in h.items()}.get("etag") if st == 200 else None


FETCHED = {}  # local path -> ETag of the bucket's object copied there


def upload(cat, *names):
    """Images built locally with qemu-img into the catalog: with QCOWD_S3, into the bucket."""
    if dm.S3:
        for n in names:
            dm.store_put(cat, img(cat, n), n + ".qcow2")
            FETCHED[img(cat, n)] = etag(n + ".qcow2")


def in_catalog(cat, name):
    return name + ".qcow2" in dm.store_names(cat)


def temp_files(cat):
    return [f for f in dm.store_names(cat) if f.startswith(".convert-")]


def fetch(path):
    """With QCOWD_S3, copy a catalog image and its backing chain from the bucket to the
    local folder, so that qemu-img sees what qcowd wrote (no-op otherwise)."""
    seen = set()
    while dm.S3 and path and os.path.dirname(path) == CAT and path not in seen:
        seen.add(path)
        tag = etag(os.path.basename(path))
        if not tag or tag != FETCHED.get(path) or not os.path.exists(path):
            dm.sync_down(CAT, os.path.basename(path))  # (a newer version than tag: fetched again next time)
            FETCHED[path] = tag
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            h = f.read(20)
            off, n = int.from_bytes(h[8:16], "big"), int.from_bytes(h[16:20], "big")
            f.seek(off)
            path = os.path.join(CAT, f.read(n).decode()) if off and n else None


def raw(path, snap=None):
    fetch(path)
    out = path + ".raw"
    args = [QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw"]
    if snap:
        args += ["-l", "snapshot.name=" + snap]
    run(*args, path, out)
    with open(out, "rb") as f:
        data = f.read()
    os.remove(out)
    return data


def qcheck(path):
    fetch(path)
    p = subprocess.run([QEMU_IMG, "check", "--output=json", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=300)
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None


def assert_clean(path):
    rc, j = qcheck(path)
    assert rc == 0 and j and not j.get("corruptions") and not j.get("leaks"), (path, rc, j)


def qinfo(path):
    fetch(path)
    return json.loads(run(QEMU_IMG, "info", "--output=json", "-U", path).stdout)


class Sse(sse.Sse):
    """sse.Sse with events as (type, data)."""

    def seen(self):
        return [(typ, data) for typ, _, data in super().seen()]


def main():
    args, top, cat = dm.qcowd.prologue("qcowd-jobs-")
    ck = T(args)
    rng = ck.rng
    global CAT
    CAT = cat
    d = None
    try:
        run(QEMU_IMG, "create", "-q", "-f", "qcow2", img(cat, "disk"), "8M")
        dm.qemu_io(img(cat, "disk"), "write -q -P 0x11 0 2M", "write -q -c -P 0x22 4M 64k", "write -q -P 0x33 7M 8k")
        run(QEMU_IMG, "create", "-q", "-f", "qcow2", img(cat, "base"), "4M")
        dm.qemu_io(img(cat, "base"), "write -q -P 0xb0 0 2M")
        run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", img(cat, "over"))
        dm.qemu_io(img(cat, "over"), "write -q -P 0xc0 1M 64k", "write -q -z 0 64k")
        run(QEMU_IMG, "create", "-q", "-f", "qcow2", img(cat, "corrupt"), "1M")
        with open(img(cat, "corrupt"), "r+b") as f:  # l1_table_offset, not cluster aligned
            f.seek(40)
            f.write((0x30008).to_bytes(8, "big"))
        run(QEMU_IMG, "create", "-q", "-f", "qcow2", img(cat, "l2hdr"), "8M")
        dm.qemu_io(img(cat, "l2hdr"), "write -q -P 0x11 0 2M")
        with open(img(cat, "l2hdr"), "r+b") as f:  # L1[0] names the header as its L2 table
            f.seek(40)
            f.seek(int.from_bytes(f.read(8), "big"))
            f.write((1 << 63).to_bytes(8, "big"))
        dm.s3_start(top)
        dm.sync_up(cat)
        d = Daemon(cat, "--job-workers", "2", "--max-listeners", "2")

        ck.case("openapi_lint", lambda: dm.lint_openapi(ck.doc))

        # two listeners from the start; looked at in events_two_listeners
        sse = [Sse(d.port), Sse(d.port)]
        time.sleep(0.2)

        def snapshots():
            p = img(cat, "disk")
            before = raw(p)
            ck.run_job(d, "POST", "/v1/images/disk/snapshots", {"name": "s1"})
            assert_clean(p)
            st, h, b = d.call("PUT", "/v1/images/disk/data", bytes([0x44]) * 65536,
                              {"Content-Range": "bytes 65536-131071/*"})
            assert st == 204, (st, b)
            after = raw(p)
            ck.run_job(d, "POST", "/v1/images/disk/snapshots", {"name": "s2"})
            assert_clean(p)
            st, h, b = d.call("GET", "/v1/images/disk/snapshots")
            mine = ck.json_of(st, h, b, "SnapshotList", "snapshots")["snapshots"]
            q = qinfo(p)["snapshots"]
            assert [(s["id"], s["name"]) for s in mine] == [(s["id"], s["name"]) for s in q], (mine, q)
            for a, b_ in zip(mine, q):
                for k in ("vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec"):
                    assert a[k] == b_[k], (k, a, b_)
            lst = run(QEMU_IMG, "snapshot", "-l", p).stdout.decode()
            assert re.search(r"\bs1\b", lst) and re.search(r"\bs2\b", lst), lst
            # the bytes of each snapshot, whole and by ranges
            for s, want in (("s1", before), ("s2", after)):
                assert raw(p, s) == want
                st, h, b = d.call("GET", "/v1/images/disk/snapshots/%s/data" % s)
                assert st == 200 and b == want, (s, st, len(b))
                for _ in range(10):
                    a = rng.randrange(len(want))
                    z = min(len(want) - 1, a + rng.randrange(300 * KiB))
                    st, h, b = d.call("GET", "/v1/images/disk/snapshots/%s/data" % s,
                                      headers={"Range": "bytes=%d-%d" % (a, z)})
                    assert st == 206 and b == want[a:z + 1], (s, a, z, st)
                    assert h["content-range"] == "bytes %d-%d/%d" % (a, z, len(want))
            # revert to s1: the disk is as before the write
            ck.run_job(d, "POST", "/v1/images/disk/snapshots/s1/revert")
            assert_clean(p)
            assert raw(p) == before
            st, h, b = d.call("GET", "/v1/images/disk/data")
            assert st == 200 and b == before, "GET data after revert differs"
            ck.run_job(d, "DELETE", "/v1/images/disk/snapshots/s1")
            assert_clean(p)
            assert [s["name"] for s in qinfo(p)["snapshots"]] == ["s2"]
            st, h, b = d.call("GET", "/v1/images/disk/snapshots")
            assert [s["name"] for s in json.loads(b)["snapshots"]] == ["s2"]
            assert raw(p, "s2") == after and raw(p) == before
        ck.case("snapshots_create_delete_revert_as_qemu_img_sees", snapshots)

        def checks():
            for name, body in (("disk", None), ("over", {}), ("base", {"repair": "leaks"}),
                               ("disk", {"repair": "all"}), ("l2hdr", {})):
                j = ck.run_job(d, "POST", "/v1/images/%s/check" % name, body)
                ck.seen.append(("CheckReport", j["result"], "check " + name))
                rc, q = qcheck(img(cat, name))
                mine = dict(j["result"])
                for k in ("filename",):
                    mine.pop(k)
                    q.pop(k)
                assert mine == q, (name, mine, q)
                if name == "l2hdr":  # an L2 table over the header: corruptions, not leaks only
                    assert rc == 2 and mine.get("corruptions", 0) > 0, mine
        ck.case("check_job_equals_qemu_img_check", checks)

        def check_pause_cancel():
            # 256 MiB in 512-byte clusters with metadata preallocated: 8192 L2
            # tables to walk, long enough to pause and cancel a check inside
            st, h, b = d.call("POST", "/v1/images", {"name": "manyl2", "size": 256 * MiB, "cluster-size": 512,
                                                     "preallocation": "metadata"})
            assert st == 201, (st, b)
            jid = ck.start_job(d, "POST", "/v1/images/manyl2/check", {})["id"]
            t = time.time() + 60
            while ck.job(d, jid)["current-progress"] == 0 and time.time() < t:
                time.sleep(0.005)
            st, h, b = d.call("POST", "/v1/jobs/%s/pause" % jid)
            assert st == 200, (st, b)
            time.sleep(0.3)
            j = ck.job(d, jid)
            assert j["status"] == "paused", j
            assert j["current-progress"] < j["total-progress"], "the check ended before the pause: %r" % j
            p1 = j["current-progress"]
            time.sleep(0.5)
            assert ck.job(d, jid)["current-progress"] == p1, "a paused check went on"
            st, h, b = d.call("POST", "/v1/jobs/%s/resume" % jid)
            assert st == 200, (st, b)
            st, h, b = d.call("POST", "/v1/jobs/%s/cancel" % jid)
            assert st == 200, (st, b)
            j = ck.wait(d, jid)
            if j["cancelled"]:
                assert j["error"] and "cancel" in j["error"] and j["result"] is None, j
                print("    check cancelled at %d of %d" % (j["current-progress"], j["total-progress"]))
            else:  # it may finish between resume and cancel on a fast machine
                assert j["error"] is None and j["result"].get("corruptions", 0) == 0, j  # 0: left out, as qemu-img does
            # the image is untouched: a full check agrees with qemu-img's
            j = ck.run_job(d, "POST", "/v1/images/manyl2/check", {})
            rc, q = qcheck(img(cat, "manyl2"))
            mine = dict(j["result"])
            mine.pop("filename")
            q.pop("filename")
            assert mine == q, (mine, q)
        ck.case("check_pause_resume_cancel", check_pause_cancel)

        def converts():
            cases = [
                ("c_zstd", "disk", {"compress": True, "compression-type": "zstd"}, {"compression-type": "zstd"}),
                ("c_zlib", "disk", {"compress": True}, {"compression-type": "zlib"}),
                ("c_flat", "over", {}, {}),
                ("c_small", "disk", {"cluster-size": 4096}, {}),
                ("c_extl2", "over", {"extended-l2": True, "cluster-size": 65536}, {"extended-l2": True}),
                ("c_keep", "over", {"backing": "keep"}, {}),
                ("c_snap", "disk", {"snapshot": "s2"}, {}),
            ]
            for target, src, opts, want in cases:
                body = dict(opts, target=target)
                ck.run_job(d, "POST", "/v1/images/%s/convert" % src, body)
                t = img(cat, target)
                assert_clean(t)
                if "snapshot" in opts:
                    assert raw(t) == raw(img(cat, src), opts["snapshot"])
                else:
                    run(QEMU_IMG, "compare", "-f", "qcow2", "-F", "qcow2", img(cat, src), t)
                info = qinfo(t)
                data = info["format-specific"]["data"]
                for k, v in want.items():
                    assert data.get(k) == v, (target, k, data)
                if "cluster-size" in opts:
                    assert info["cluster-size"] == opts["cluster-size"], info
                if opts.get("backing") == "keep":
                    assert info.get("backing-filename") == "base.qcow2", info
                    assert info["actual-size"] < qinfo(img(cat, "c_flat"))["actual-size"] + 1, info
                else:
                    assert "backing-filename" not in info, info
                if opts.get("compress"):
                    rc, q = qcheck(t)
                    assert q.get("compressed-clusters", 0) > 0, q
                st, h, b = d.call("GET", "/v1/images/" + target)
                assert st == 200, (target, st)
            assert not temp_files(cat), temp_files(cat)
        ck.case("convert_jobs_equal_qemu_img_compare", converts)

        def long_job():
            # 160 MiB of half-random clusters compressed with zlib: seconds of work
            src = os.path.join(top, "long.raw")
            dm.qcowd.slow_raw(src)
            run(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", src, img(cat, "long"))
            os.remove(src)
            upload(cat, "long")
            j = ck.start_job(d, "POST", "/v1/images/long/convert", {"target": "long2", "compress": True})
            jid = j["id"]
            j = ck.wait(d, jid, ("running",))
            t = time.time() + 60
            while ck.job(d, jid)["current-progress"] == 0 and time.time() < t:
                time.sleep(0.02)
            st, h, b = d.call("POST", "/v1/jobs/%s/pause" % jid)
            assert st == 200 and ck.json_of(st, h, b, "Job", "pause")["status"] == "paused", (st, b)
            time.sleep(0.4)
            p1 = ck.job(d, jid)["current-progress"]
            time.sleep(0.8)
            j = ck.job(d, jid)
            assert j["status"] == "paused" and j["current-progress"] == p1, (p1, j)
            st, h, b = d.call("POST", "/v1/jobs/%s/pause" % jid)
            ck.expect_error("pause paused", st, 409, h, b, "conflict")
            st, h, b = d.call("POST", "/v1/jobs/%s/resume" % jid)
            assert st == 200 and json.loads(b)["status"] == "running", (st, b)
            st, h, b = d.call("POST", "/v1/jobs/%s/resume" % jid)
            ck.expect_error("resume running", st, 409, h, b, "conflict")
            st, h, b = d.call("DELETE", "/v1/jobs/" + jid)
            ck.expect_error("dismiss running", st, 409, h, b, "conflict")
            t = time.time() + 30
            while ck.job(d, jid)["current-progress"] == p1 and time.time() < t:
                time.sleep(0.02)
            j = ck.job(d, jid)
            assert j["status"] == "running" and j["current-progress"] > p1, (p1, j)
            assert j["current-progress"] < j["total-progress"], "the job is too short to test cancel: %r" % j
            st, h, b = d.call("POST", "/v1/jobs/%s/cancel" % jid)
            assert st == 200 and json.loads(b)["status"] in ("aborting", "concluded"), (st, b)
            j = ck.wait(d, jid)
            assert j["cancelled"] and j["error"], j
            assert not in_catalog(cat, "long2")
            assert not temp_files(cat), temp_files(cat)
            st, h, b = d.call("POST", "/v1/jobs/%s/cancel" % jid)
            ck.expect_error("cancel concluded", st, 409, h, b, "conflict")
            st, h, b = d.call("DELETE", "/v1/jobs/" + jid)
            assert st == 204, (st, b)
            st, h, b = d.call("GET", "/v1/jobs/" + jid)
            ck.expect_error("dismissed", st, 404, h, b, "not-found")
            # a job queued behind another on the same image, paused, then
            # cancelled before it ever ran
            a = ck.start_job(d, "POST", "/v1/images/long/convert", {"target": "long4", "compress": True})
            ck.wait(d, a["id"], ("running",))
            b1 = ck.start_job(d, "POST", "/v1/images/long/convert", {"target": "long3"})
            st, h, b = d.call("POST", "/v1/jobs/%s/pause" % b1["id"])
            assert st == 200 and json.loads(b)["status"] == "paused", (st, b)
            st, h, b = d.call("POST", "/v1/jobs/%s/cancel" % a["id"])
            assert st == 200, (st, b)
            assert ck.wait(d, a["id"])["cancelled"]
            time.sleep(0.3)
            j = ck.job(d, b1["id"])
            assert j["status"] == "paused" and j["started"] is None, j
            st, h, b = d.call("POST", "/v1/jobs/%s/cancel" % b1["id"])
            assert st == 200 and json.loads(b)["status"] == "concluded", (st, b)
            assert not in_catalog(cat, "long3") and not in_catalog(cat, "long4")
            assert_clean(img(cat, "long"))
        ck.case("pause_resume_cancel_of_a_long_convert", long_job)

        def many():
            names = ["m%d" % i for i in range(3)]
            for n in names:
                run(QEMU_IMG, "create", "-q", "-f", "qcow2", img(cat, n), "4M")
            upload(cat, *names)
            model = {n: bytearray(4 * MiB) for n in names}
            stop = threading.Event()
            errors = []
            counts = {"put": 0, "busy": 0, "get": 0}

            def traffic(seed):
                # each thread its own MiB of every image: concurrent writes to one
                # range have no order a client could model
                r = random.Random(seed)
                while not stop.is_set():
                    n = r.choice(names)
                    off = r.randrange(seed * MiB, (seed + 1) * MiB - 64 * KiB, 4096)
                    data = bytes([r.randrange(1, 256)]) * r.choice([4096, 65536])
                    st, h, b = d.call("PUT", "/v1/images/%s/data" % n, data,
                                      {"Content-Range": "bytes %d-%d/*" % (off, off + len(data) - 1)})
                    if st == 204:
                        with lock:
                            model[n][off:off + len(data)] = data
                        counts["put"] += 1
                    elif st == 409:
                        counts["busy"] += 1
                    else:
                        errors.append(("PUT", st, b[:200]))
                    st, h, b = d.call("GET", "/v1/images/%s/data" % n, headers={"Range": "bytes=0-4095"})
                    if st not in (206, 409):
                        errors.append(("GET", st, b[:200]))
                    counts["get"] += 1

            lock = threading.Lock()
            ts = [threading.Thread(target=traffic, args=(i,)) for i in range(3)]
            for t in ts:
                t.start()
            jobs = []
            for i in range(MANY_ROUNDS):
                for n in names:
                    jobs.append(ck.start_job(d, "POST", "/v1/images/%s/snapshots" % n, {"name": "q%d" % i})["id"])
                    jobs.append(ck.start_job(d, "POST", "/v1/images/%s/check" % n)["id"])
                jobs.append(ck.start_job(d, "POST", "/v1/images/m%d/convert" % (i % 3), {"target": "mc%d" % i})["id"])
            st, h, b = d.call("GET", "/v1/jobs")
            listed = [j["id"] for j in ck.json_of(st, h, b, "JobList", "jobs")["jobs"]]
            assert set(jobs) <= set(listed), (jobs, listed)
            done = [ck.wait(d, j) for j in jobs]
            stop.set()
            for t in ts:
                t.join()
            assert not errors, errors[:3]
            bad = [j for j in done if j["error"]]
            assert not bad, bad[:2]
            assert counts["put"] > 10, counts
            for n in names:
                assert_clean(img(cat, n))
                assert raw(img(cat, n)) == bytes(model[n]), n
                assert [s["name"] for s in qinfo(img(cat, n))["snapshots"]] == ["q%d" % i for i in range(MANY_ROUNDS)]
            for i in range(MANY_ROUNDS):
                assert_clean(img(cat, "mc%d" % i))
            print("    many: %d jobs, %s" % (len(jobs), counts))
        ck.case("many_jobs_queued_with_data_traffic", many)

        def commits():
            # a three-image chain, and the same chain copied for qemu-img commit
            ref = os.path.join(top, "ref")
            os.mkdir(ref)
            for d_ in (cat, ref):
                run(QEMU_IMG, "create", "-q", "-f", "qcow2", img(d_, "cb"), "8M")
                dm.qemu_io(img(d_, "cb"), "write -q -P 0x01 0 6M")
                run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "cb.qcow2", "-F", "qcow2", img(d_, "cm"))
                dm.qemu_io(img(d_, "cm"), "write -q -P 0x02 1M 2M", "write -q -z 5M 256k")
                run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "cm.qcow2", "-F", "qcow2", img(d_, "ct"))
                dm.qemu_io(img(d_, "ct"), "write -q -P 0x03 2M 64k", "write -q -c -P 0x04 7M 64k",
                           "write -q -z 0 64k")
            upload(cat, "cb", "cm", "ct")
            want_top = raw(img(cat, "ct"))
            j = ck.run_job(d, "POST", "/v1/images/ct/commit")
            assert j["result"] == {"top": "ct", "base": "cm"}, j
            run(QEMU_IMG, "commit", "-q", "-f", "qcow2", img(ref, "ct"))
            for n in ("cb", "cm", "ct"):
                assert_clean(img(cat, n))
                assert raw(img(cat, n)) == raw(img(ref, n)), "%s differs from qemu-img commit's" % n
            assert raw(img(cat, "ct")) == want_top
            st, h, b = d.call("GET", "/v1/images/ct/data")
            assert st == 200 and b == want_top, "GET after commit differs"
            st, h, b = d.call("GET", "/v1/images/cm/data")
            assert st == 200 and b == raw(img(ref, "cm"))
            # into the image at the bottom (-b)
            j = ck.run_job(d, "POST", "/v1/images/ct/commit", {"base": "cb"})
            run(QEMU_IMG, "commit", "-q", "-f", "qcow2", "-b", "cb.qcow2", img(ref, "ct"))
            for n in ("cb", "cm", "ct"):
                assert_clean(img(cat, n))
                assert raw(img(cat, n)) == raw(img(ref, n)), "%s differs from qemu-img commit -b's" % n
            for body, want, code in (({"base": "disk"}, 400, "bad-request"), ({"base": "nosuch"}, 400, "bad-request"),
                                     (None, 404, "not-found")):
                path = "/v1/images/%s/commit" % ("nosuch" if want == 404 else "ct")
                st, h, b = d.call("POST", path, body)
                ck.expect_error("commit %r" % body, st, want, h, b, code)
            st, h, b = d.call("POST", "/v1/images/disk/commit")
            ck.expect_error("commit without backing", st, 400, h, b, "bad-request")
            # a backing file may get a snapshot, but not be reverted under its overlays
            ck.run_job(d, "POST", "/v1/images/cb/snapshots", {"name": "sb"})
            st, h, b = d.call("POST", "/v1/images/cb/snapshots/sb/revert")
            j = ck.expect_error("revert of a backing file", st, 409, h, b, "conflict")
            assert "backing chain" in j["error"]["message"], j
            ck.run_job(d, "DELETE", "/v1/images/cb/snapshots/sb")
            assert_clean(img(cat, "cb"))
            assert raw(img(cat, "ct")) == raw(img(ref, "ct"))
        ck.case("commit_job_equals_qemu_img_commit", commits)

        def commit_cancel():
            # many small clusters: a commit that takes a while
            run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img(cat, "lb"), "24M")
            run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "lb.qcow2", "-F", "qcow2",
                img(cat, "lt"))
            dm.qemu_io(img(cat, "lt"), "write -q -P 0x5a 0 24M")
            upload(cat, "lb", "lt")
            want = raw(img(cat, "lt"))
            base_before = raw(img(cat, "lb"))
            j = ck.start_job(d, "POST", "/v1/images/lt/commit")
            jid = j["id"]
            st, h, b = d.call("POST", "/v1/jobs/%s/pause" % jid)
            assert st == 200, (st, b)
            st, h, b = d.call("GET", "/v1/images/lb/data", headers={"Range": "bytes=0-1"})
            assert st in (206, 409), st  # base busy while a commit into it is under way
            time.sleep(0.3)
            st, h, b = d.call("POST", "/v1/jobs/%s/resume" % jid)
            assert st == 200, (st, b)
            t = time.time() + 60
            while ck.job(d, jid)["current-progress"] == 0 and time.time() < t:
                time.sleep(0.005)
            st, h, b = d.call("POST", "/v1/jobs/%s/cancel" % jid)
            j = ck.wait(d, jid)
            if st == 200 and j["cancelled"]:
                assert j["error"], j
            else:
                print("    (the commit finished before the cancel)")
            for n in ("lb", "lt"):
                rc, q = qcheck(img(cat, n))
                assert rc in (0, 3) and not q.get("corruptions"), (n, q)
            assert raw(img(cat, "lt")) == want, "top's view changed by a cancelled commit"
            st, h, b = d.call("GET", "/v1/images/lt/data")
            assert st == 200 and b == want
            if j["cancelled"]:
                print("    commit cancelled at %d of %d bytes" % (j["current-progress"], j["total-progress"]))
            del base_before
        ck.case("commit_pause_resume_cancel", commit_cancel)

        def corrupt():
            st, h, b = d.call("POST", "/v1/images/corrupt/snapshots", {"name": "x"})
            j = ck.expect_error("snapshot of corrupt", st, 422, h, b, "corrupt-image")
            assert "L1" in j["error"]["message"] or "corrupt" in j["error"]["message"], j
            j = ck.run_job(d, "POST", "/v1/images/corrupt/check", ok=False)
            assert j["error"] and j["result"] is None, j
            assert "L1" in j["error"] or "corrupt" in j["error"].lower(), j
            st, h, b = d.call("POST", "/v1/images/corrupt/convert", {"target": "fromcorrupt"})
            ck.expect_error("convert of corrupt", st, 422, h, b, "corrupt-image")
            assert d.alive()
        ck.case("job_on_a_corrupt_image_fails_clearly", corrupt)

        def backing_gone():
            # a job whose image lost its backing file after it was listed: the
            # job's error names the missing file (not "no image named"), without
            # the catalog's folder or bucket prefix, in the job object and its event
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img(cat, "bgbase"), "1M"], check=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "bgbase.qcow2", "-F", "qcow2",
                            img(cat, "bgtop"), "1M"], check=True)
            upload(cat, "bgbase", "bgtop")
            st, h, b = d.call("GET", "/v1/images/bgtop")
            assert st == 200, (st, b[:200])
            dm.store_remove(cat, "bgbase.qcow2")
            if dm.S3:
                os.remove(img(cat, "bgbase"))
            j = ck.run_job(d, "POST", "/v1/images/bgtop/convert", {"target": "bgout"}, ok=False)
            msg = j["error"] or ""
            root = "s3://%s/%s" % (dm.S3_BUCKET, dm.S3_PREFIX) if dm.S3 else cat
            assert "bgbase.qcow2" in msg and "no image named" not in msg, j
            assert root not in msg and top not in msg, j
            st, h, b = d.call("GET", "/v1/jobs/%s" % j["id"])
            assert st == 200 and root not in b.decode() and top not in b.decode(), b[:300]
            assert not in_catalog(cat, "bgout"), "a failed convert left its target"
            dm.store_remove(cat, "bgtop.qcow2")
        ck.case("job_error_names_no_server_path", backing_gone)

        def bad_input():
            cases = [
                ("GET", "/v1/jobs/99999", None, 404, "not-found"),
                ("GET", "/v1/jobs/abc", None, 404, "not-found"),
                ("POST", "/v1/jobs/99999/cancel", None, 404, "not-found"),
                ("POST", "/v1/jobs/99999/pause", None, 404, "not-found"),
                ("DELETE", "/v1/jobs/99999", None, 404, "not-found"),
                ("POST", "/v1/images/disk/convert", b"{", 400, "bad-request"),
                ("POST", "/v1/images/disk/convert", b"[1]", 400, "bad-request"),
                ("POST", "/v1/images/disk/convert", {"target": "x", "bogus": 1}, 400, "bad-request"),
                ("POST", "/v1/images/disk/convert", {}, 400, "bad-request"),
                ("POST", "/v1/images/disk/convert", {"target": "../x"}, 400, "bad-request"),
                ("POST", "/v1/images/disk/convert", {"target": "c_zstd"}, 409, "conflict"),
                ("POST", "/v1/images/disk/convert", {"target": "y", "cluster-size": 1000}, 400, "bad-request"),
                ("POST", "/v1/images/disk/convert", {"target": "y", "compression-type": "lz4"}, 400, "bad-request"),
                ("POST", "/v1/images/disk/convert", {"target": "y", "snapshot": "nosuch"}, 404, "not-found"),
                ("POST", "/v1/images/nosuch/convert", {"target": "y"}, 404, "not-found"),
                ("POST", "/v1/images/disk/check", {"repair": "some"}, 400, "bad-request"),
                ("POST", "/v1/images/disk/check", b"nojson", 400, "bad-request"),
                ("POST", "/v1/images/nosuch/check", None, 404, "not-found"),
                ("POST", "/v1/images/disk/snapshots", {}, 400, "bad-request"),
                ("POST", "/v1/images/disk/snapshots", {"name": 5}, 400, "bad-request"),
                ("POST", "/v1/images/nosuch/snapshots", {"name": "a"}, 404, "not-found"),
                ("DELETE", "/v1/images/disk/snapshots/nosuch", None, 404, "not-found"),
                ("POST", "/v1/images/disk/snapshots/nosuch/revert", None, 404, "not-found"),
                ("GET", "/v1/images/disk/snapshots/nosuch/data", None, 404, "not-found"),
                ("GET", "/v1/images/nosuch/snapshots", None, 404, "not-found"),
                ("POST", "/v1/images/disk/commit", {"base": 3}, 400, "bad-request"),
            ]
            for m, path, body, want, code in cases:
                st, h, b = d.call(m, path, body)
                ck.expect_error("%s %s %r" % (m, path, body), st, want, h, b, code)
            st, h, b = d.call("GET", "/v1/images/disk/snapshots/s2/data", headers={"Range": "bytes=99999999-"})
            ck.expect_error("snapshot range", st, 416, h, b, "range-not-satisfiable")
            for m, path in (("PUT", "/v1/jobs"), ("POST", "/v1/jobs/1"), ("GET", "/v1/jobs/1/cancel"),
                            ("POST", "/v1/events")):
                st, h, b = d.call(m, path)
                ck.expect_error("%s %s" % (m, path), st, 405, h, b, "method-not-allowed")
            assert d.alive()
        ck.case("job_api_bad_input", bad_input)

        def events():
            # more listeners than allowed: 503
            extra = Sse(d.port)
            t = time.time() + 10
            while not extra.head and time.time() < t:
                time.sleep(0.02)
            assert extra.head.startswith(b"HTTP/1.1 503"), extra.head[:100]
            extra.close()
            st, h, b = d.call("POST", "/v1/images", {"name": "evimg", "size": MiB})
            assert st == 201, (st, b)
            st, h, b = d.call("PUT", "/v1/images/evimg/data", b"x" * 512, {"Content-Range": "bytes 0-511/*"})
            assert st == 204
            st, h, b = d.call("DELETE", "/v1/images/evimg")
            assert st == 204
            time.sleep(0.5)
            for i, s in enumerate(sse):
                assert s.head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in s.head, s.head
                ev = s.seen()
                kinds = {e for e, _ in ev}
                for k in ("job-created", "job-status", "job-progress", "job-dismissed", "image-created",
                          "image-changed", "image-deleted"):
                    assert k in kinds, (i, k, sorted(kinds), [d_ for e, d_ in ev if e == "lost"])
                assert "lost" not in kinds, i
                st_seen = {data["status"] for e, data in ev if e == "job-status"}
                assert {"running", "paused", "aborting", "concluded"} <= st_seen, st_seen
                for e, data in ev:
                    if e.startswith("job-"):
                        ck.seen.append(("Job", data, "event " + e))
                imgs = [(e, data["name"]) for e, data in ev if e.startswith("image-") and data["name"] == "evimg"]
                assert imgs[0] == ("image-created", "evimg") and imgs[-1] == ("image-deleted", "evimg"), imgs
                # progress events of the long convert: several, not hundreds per second
                prog = [data for e, data in ev if e == "job-progress" and data["type"] == "convert"]
                assert len(prog) >= 2, len(prog)
            a, b_ = [[e for e, _ in s.seen()] for s in sse]
            assert a[:50] == b_[:50], "the two listeners saw different events"
        ck.case("events_two_listeners", events)

        def responses():
            for name, body, where in ck.seen:
                try:
                    dm.validate(ck.doc, name, body)
                except Exception as e:
                    raise AssertionError("%s: %s" % (where, getattr(e, "message", e)))
            assert len(ck.seen) > 50, len(ck.seen)
        ck.case("responses_match_openapi_schemas", responses)

        def restart_and_sigkill():
            for s in sse:
                s.close()
            d.stop_clean(60)
            # a snapshot delete with much to free; SIGKILL while it runs
            p = img(cat, "kill")
            run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "%dM" % KILL_MIB)
            dm.qemu_io(p, "write -q -P 0x61 0 %dM" % KILL_MIB)
            run(QEMU_IMG, "snapshot", "-c", "big", p)
            dm.qemu_io(p, "write -q -P 0x62 0 %dM" % KILL_MIB)
            upload(cat, "kill")
            want = raw(p)
            d2 = Daemon(cat, "--job-workers", "1")
            st, h, b = d2.call("GET", "/v1/jobs")
            old = {j["id"]: j for j in json.loads(b)["jobs"]}
            assert old and all(j["status"] == "concluded" for j in old.values()), old
            j = ck.start_job(d2, "DELETE", "/v1/images/kill/snapshots/big")
            while True:
                st, h, b = d2.call("GET", "/v1/jobs/" + j["id"])
                if json.loads(b)["status"] != "created":
                    break
            d2.proc.kill()
            d2.proc.wait()
            state = json.loads(b)["status"]
            rc, q = qcheck(p)
            assert rc in (0, 3) and not q.get("corruptions"), (rc, q)
            assert raw(p) == want, "data changed by a killed snapshot delete"
            snaps = [s["name"] for s in qinfo(p).get("snapshots", [])]
            if snaps:
                assert snaps == ["big"] and raw(p, "big") == bytes([0x61]) * KILL_MIB * MiB
            leaks = q.get("leaks", 0)
            d3 = Daemon(cat, "--job-workers", "1")
            jj = ck.job(d3, j["id"])
            assert jj["status"] == "concluded", jj
            if state == "running":
                assert jj["error"] and "cut off" in jj["error"] and "restart" in jj["error"], jj
                # the restart queues a check job that reclaims what the cut-off job leaked
                repair = auto_repairs(ck, d3, {"kill"}, set(old) | {j["id"]})
                assert repair["kill"]["result"].get("leaks-fixed", 0) == leaks, (leaks, repair)
            st, h, b = d3.call("GET", "/v1/jobs")
            new = {x["id"]: x for x in json.loads(b)["jobs"]}
            assert set(old) <= set(new), "records lost across the restart"
            for k, v in old.items():
                assert new[k] == v, (k, v, new[k])
            # clean with no repair asked for; the image still works: delete the
            # snapshot again if it survived, and check
            assert_clean(p)
            if snaps:
                ck.run_job(d3, "DELETE", "/v1/images/kill/snapshots/big")
            assert_clean(p)
            assert raw(p) == want
            print("    killed while %s; leaks repaired: %s; snapshot survived: %s" % (state, leaks, bool(snaps)))
            # SIGKILL in the middle of a commit: top reads as before, images check clean
            run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img(cat, "kb"), "16M")
            run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "kb.qcow2", "-F", "qcow2",
                img(cat, "kt"))
            dm.qemu_io(img(cat, "kt"), "write -q -P 0x6b 0 16M")
            upload(cat, "kb", "kt")
            want_kt = raw(img(cat, "kt"))
            j = ck.start_job(d3, "POST", "/v1/images/kt/commit")
            t = time.time() + 30
            while time.time() < t:
                jj = ck.job(d3, j["id"])
                if jj["current-progress"] > 0 or jj["status"] == "concluded":
                    break
            at = (jj["status"], jj["current-progress"], jj["total-progress"])
            d3.proc.kill()
            d3.proc.wait()
            for n in ("kb", "kt"):
                rc, q = qcheck(img(cat, n))
                assert rc in (0, 3) and not q.get("corruptions"), (n, q)
            assert raw(img(cat, "kt")) == want_kt, "top's view changed by a killed commit"
            d4 = Daemon(cat, "--job-workers", "1")
            jj = ck.job(d4, j["id"])
            assert jj["status"] == "concluded", jj
            if jj["error"]:
                assert "cut off" in jj["error"], jj
            print("    commit killed while %s at %d of %d bytes" % at)
            if at[0] == "running":  # top and base get a repair of their own
                st, h, b = d4.call("GET", "/v1/jobs")
                before = {x["id"] for x in json.loads(b)["jobs"] if x["type"] != "check" or x["image"] not in ("kb", "kt")}
                auto_repairs(ck, d4, {"kb", "kt"}, before)
            for n in ("kb", "kt"):  # clean with no repair asked for
                assert_clean(img(cat, n))
            assert raw(img(cat, "kt")) == want_kt
            assert d4.stop() == 0

        ck.case("sigkill_during_snapshot_delete_and_commit_then_restart", restart_and_sigkill)
    except Exception:
        ck.setup_failed()
    finally:
        dm.finish(top, args.keep, Daemon.started)
    return ck.summary()


if __name__ == "__main__":
    sys.exit(main())
