#!/usr/bin/python3
"""admission.py: the catalog's admission races of issue 12 over a live qcowd,
each made deterministic by holding one side open (a stalled download, a PUT
whose body stops half way, a paused or queued job):
- a download running while a snapshot job is submitted: the container read is
  one that `qemu-img check` passes (the job waits for the download, or 409);
- create and upload under the target name of a running convert: 409, nothing
  made, and the convert succeeds;
- DELETE of an image with a queued job: 409, and the job runs on that image;
- DELETE during an in-flight PUT .../data: one of them wins, the other 409;
- a commit into a base another image also uses: 409 naming it (no
  Retry-After), and with "force" it runs and the other image reads the data;
- a write to one image of a catalog of 600 takes as long as with none (no
  listing and opening of the catalog per write), and a base still refuses
  writes naming its user.

Environment: QCOWD (required), QEMU_IMG, QEMU_IO. Usage: admission.py [--seed N] [--keep]
Prints `ok NAME` / `FAIL NAME: reason`, then `N passed, M failed`; exit 1 on a
failure, 77 when qemu-img is missing."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import races  # noqa: E402

KiB, MiB = races.KiB, races.MiB


def download_vs_snapshot(r):
    # 48 MiB of data in 1 MiB runs: L2 tables and refcounts far into the file
    # 4 KiB clusters: L2 tables and refcount blocks all along the file, so most
    # of them are read after the snapshot would have changed them
    r.make("dl", 64 * MiB, *["write -P %d %dM 1M" % (i % 250 + 1, i) for i in range(0, 64, 2)], cluster=4096)
    h = races.Held(r.d.port, "GET", "/v1/images/dl/file")
    h.read_some(64 * KiB)  # the answer started: the container is open
    st, hd, b = r.call("POST", "/v1/images/dl/snapshots", {"name": "s1"}, {"Content-Type": "application/json"})
    jid = None
    if st == 202:
        jid = json.loads(b)["id"]
        time.sleep(1.5)  # time for a job that does not wait to run to its end
    else:
        r.busy("snapshot during a download", st, hd, b)
    status, hdrs, body = h.finish()
    assert status == 200, (status, body[:200])
    out = os.path.join(r.top, "dl-download.qcow2")
    with open(out, "wb") as f:
        f.write(body)
    r.check_file(out)
    if jid:
        j = r.wait(jid)
        assert j["error"] is None, j
    r.check_file(r.path("dl"))


def create_under_convert_target(r):
    jid = r.start_long("long", "tgt")
    st, hd, b = r.call("POST", "/v1/jobs/%s/pause" % jid)
    assert st == 200, (st, b)
    try:
        st, hd, b = r.call("POST", "/v1/images", {"name": "tgt", "size": MiB}, {"Content-Type": "application/json"})
        assert not os.path.exists(r.path("tgt")), "the create made an image (answer %d)" % st
        r.busy("create under a convert's target", st, hd, b, "convert")
        small = os.path.join(r.top, "small.qcow2")
        rc, out = races.run(races.QEMU_IMG, "create", "-q", "-f", "qcow2", small, "1M")
        assert rc == 0, out
        with open(small, "rb") as f:
            data = f.read()
        st, hd, b = r.call("PUT", "/v1/images/tgt/file", data, {"Content-Type": "application/octet-stream"})
        assert not os.path.exists(r.path("tgt")), "the upload made an image (answer %d)" % st
        r.busy("upload under a convert's target", st, hd, b, "convert")
    finally:
        r.call("POST", "/v1/jobs/%s/resume" % jid)
    j = r.wait(jid)
    assert j["error"] is None, j
    rc, out = races.run(races.QEMU_IMG, "compare", r.path("long"), r.path("tgt"))
    assert rc == 0, out


def delete_with_queued_job(r):
    r.make("victim", 8 * MiB, "write -P 0x5a 0 1M")
    blocker = r.start_long("long", "tgt2")  # the only worker is busy
    st, hd, b = r.call("POST", "/v1/images/victim/snapshots", {"name": "keep"}, {"Content-Type": "application/json"})
    assert st == 202, (st, b)
    jid = json.loads(b)["id"]
    st, hd, b = r.call("POST", "/v1/jobs/%s/pause" % jid)  # queued, and stays so
    assert st == 200, (st, b)
    try:
        st, hd, b = r.call("DELETE", "/v1/images/victim")
        r.busy("DELETE with a queued job", st, hd, b, "snapshot-create")
        # had it been deleted, a new image of that name would get the job
        st, hd, b = r.call("POST", "/v1/images", {"name": "victim", "size": MiB}, {"Content-Type": "application/json"})
        assert st == 409, ("created over an image with a queued job", st, b[:200])
    finally:
        r.call("POST", "/v1/jobs/%s/cancel" % blocker)
        r.call("POST", "/v1/jobs/%s/resume" % jid)
    j = r.wait(jid)
    assert j["error"] is None, j
    st, hd, snaps = r.json("GET", "/v1/images/victim/snapshots", want=200)
    snaps = snaps.get("snapshots", snaps) if isinstance(snaps, dict) else snaps
    assert [s["name"] for s in snaps] == ["keep"], snaps
    rc, out = races.run(races.QEMU_IO, "-f", "qcow2", "-c", "read -P 0x5a 0 1M", r.path("victim"))
    assert rc == 0 and "Pattern verification failed" not in out, out
    r.wait(blocker)


def delete_during_put(r):
    r.make("pv", 8 * MiB)
    n = 2 * MiB
    body = bytes([0x33]) * n
    h = races.Held(r.d.port, "PUT", "/v1/images/pv/data",
                   [("Content-Range", "bytes 0-%d/*" % (n - 1)), ("Content-Length", str(n)),
                    ("Content-Type", "application/octet-stream")], body[:256 * KiB])
    time.sleep(0.5)  # the head and the first bytes are in: the write is in flight
    st, hd, b = r.call("DELETE", "/v1/images/pv")
    h.send(body[256 * KiB:])
    pst, phd, pb = h.finish()
    put_ok = pst in (200, 204)
    if st == 204:
        assert not put_ok, "DELETE answered 204 and so did the PUT in flight (%d)" % pst
        assert not os.path.exists(r.path("pv"))
    else:
        r.busy("DELETE during a PUT", st, hd, b, "write")
        assert put_ok, (pst, pb[:300])
        rc, out = races.run(races.QEMU_IO, "-f", "qcow2", "-c", "read -P 0x33 0 2M", r.path("pv"))
        assert rc == 0 and "Pattern verification failed" not in out, out


def commit_into_shared_base(r):
    r.make("cb", 8 * MiB, "write -P 0x11 0 4M")
    r.make("vm1", 8 * MiB, "write -P 0x71 0 1M", backing="cb")
    r.make("vm2", 8 * MiB, "write -P 0x72 4M 1M", backing="cb")
    r.make("vm1kid", 8 * MiB, backing="vm1")  # reads cb through vm1: not another user
    st, hd, b = r.call("POST", "/v1/images/vm1/commit", {}, {"Content-Type": "application/json"})
    assert st == 409, ("a commit into a base vm2 also uses", st, b[:300])
    msg = json.loads(b)["error"]["message"]
    assert "'vm2'" in msg and "vm1kid" not in msg and "force" in msg, msg
    assert "retry-after" not in hd, "time does not cure a shared base: %r" % hd
    rc, out = races.run(races.QEMU_IO, "-f", "qcow2", "-c", "read -P 0x11 0 1M", r.path("vm2"))
    assert rc == 0 and "Pattern verification failed" not in out, "vm2 changed: " + out
    st, hd, j = r.json("POST", "/v1/images/vm1/commit", {"force": True}, want=202)
    j = r.wait(j["id"])
    assert j["error"] is None, j
    # vm2 now reads the committed data, as with qemu-img commit
    rc, out = races.run(races.QEMU_IO, "-f", "qcow2", "-c", "read -P 0x71 0 1M", r.path("vm2"))
    assert rc == 0 and "Pattern verification failed" not in out, "vm2 does not see the commit: " + out
    for name in ("cb", "vm1", "vm2", "vm1kid"):
        r.check_file(r.path(name))


def write_time(r, name, n=30):
    """The median time of n 4 KiB PUT .../data to name, on one connection."""
    conn = r.d.conn()
    times = []
    try:
        for i in range(n):
            t = time.monotonic()
            conn.request("PUT", "/v1/images/%s/data" % name, body=bytes([i + 1]) * 4096,
                         headers={"Host": "localhost", "Content-Range": "bytes %d-%d/*" % (i * 4096, i * 4096 + 4095),
                                  "Content-Type": "application/octet-stream"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status in (200, 204), resp.status
            times.append(time.monotonic() - t)
    finally:
        conn.close()
    return sorted(times)[n // 2]


def write_does_not_scan_catalog(r):
    import shutil
    r.make("w1", 8 * MiB)
    alone = write_time(r, "w1")
    r.make("filler", 1 * MiB, "write -P 1 0 64k")
    for i in range(600):  # images the old per-write scan listed and opened
        shutil.copyfile(r.path("filler"), r.path("filler%03d" % i))
    crowded = write_time(r, "w1")
    print("    write median: %.2f ms alone, %.2f ms among 600 images" % (alone * 1000, crowded * 1000))
    assert crowded < alone * 3 + 0.010, "a write takes %.1f ms among 600 images, %.1f ms alone" % (
        crowded * 1000, alone * 1000)
    # and the base of one of them still refuses writes, naming its user
    r.make("over", 1 * MiB, backing="filler007")
    r.call("GET", "/v1/images")  # an image put in behind qcowd's back is known once listed (or opened)
    st, hd, b = r.call("PUT", "/v1/images/filler007/data", b"x" * 512, {"Content-Range": "bytes 0-511/*"})
    assert st == 409 and "'over'" in json.loads(b)["error"]["message"], (st, b[:300])


def write_right_after_download(r):
    """A client that has the last byte of a download writes at once: the
    download's hold on the image is gone by then (it was let go when the last
    byte was read, not when libmicrohttpd calls back after sending it)."""
    r.make("dl", 4 * MiB, "write -P 0x44 0 3M")
    want = open(r.path("dl"), "rb").read()
    get, put = r.d.conn(), r.d.conn()
    refused = 0
    try:
        for i in range(60):
            get.request("GET", "/v1/images/dl/file", headers={"Host": "localhost"})
            resp = get.getresponse()
            body = resp.read()
            assert resp.status == 200 and len(body) == len(want), (resp.status, len(body))
            put.request("PUT", "/v1/images/dl/data", body=bytes([i + 1]) * 512,
                        headers={"Host": "localhost", "Content-Range": "bytes %d-%d/*" % (i * 512, i * 512 + 511),
                                 "Content-Type": "application/octet-stream"})
            resp = put.getresponse()
            b = resp.read()
            if resp.status == 409:
                refused += 1
            else:
                assert resp.status in (200, 204), (resp.status, b[:300])
    finally:
        get.close()
        put.close()
    assert refused == 0, "%d of 60 writes sent after a whole download were refused (409)" % refused


def setup(r):
    r.make_long("long")


CASES = [
    ("setup", setup),
    ("download_vs_snapshot_job", download_vs_snapshot),
    ("create_and_upload_under_convert_target", create_under_convert_target),
    ("delete_with_queued_job", delete_with_queued_job),
    ("delete_during_put", delete_during_put),
    ("commit_into_shared_base", commit_into_shared_base),
    ("write_does_not_scan_the_catalog", write_does_not_scan_catalog),
    ("write_right_after_download", write_right_after_download),
]

if __name__ == "__main__":
    sys.exit(races.main(CASES))
