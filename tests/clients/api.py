#!/usr/bin/python3
"""api.py: qcowctl and the installed Python package against a live qcowd, for every
operation of openapi/openapi.yaml, and a fake server for what main does not have yet.

  coverage   every operationId of the OpenAPI document is mapped to a qcowctl command
             (its own table, `qcowctl --list-operations`) and to Client methods (the
             table below); every mapped command and method is run by a case here
             (calls are recorded); prints the table, fails on a gap
  qcowctl    snapshots, bitmaps (with dirty extents), commit, convert, check, jobs
             and their filters, job ID, pause/resume/cancel/dismiss, wait, events,
             tickets; --wait exits 0 with the result, 1 with a failed job's error
             and 1 for a cancelled one; the progress bar (bar, %, ETA) on a
             terminal (a pty) and nothing on a pipe; --output=json parses on every
             command; exit 2 usage, 1 API error (`qcowctl: CODE: message`), 3 no server
  completion `bash -n`, commands, their verbs, options, image names from the server
  man page   `--help-man` equals the built qcowctl.1, renders with groff without
             warnings, names every command of --help
  python     the package installed offline with pip, imported from there: every
             method; reads into io.BytesIO, writes from io.BytesIO, a file and a pipe;
             a 0-byte image; typed exceptions; wait_job with progress and timeout;
             events; tickets; one connection reused (the client's count and the
             daemon's qcowd_http_connections gauge)
  fake       a scripted HTTP server: job filters sent as query parameters, commit
             force in the body, If-Match (--if-match, if_match=, etag()) and If-Range, Last-Event-ID on an events reconnect and `lost`,
             Retry-After of a 409 (qcowctl's message, Conflict.retry_after), 412 ->
             PreconditionFailed, a job failing -> exit 1 / JobFailed, a kept-alive
             connection the server dropped -> the request goes again on a new one

Environment: QCOWD, QCOWCTL (binaries), QCOWCTL_MAN (the built man page), OPENAPI.
"""

import http.server
import io
import json
import os
import pty
import re
import select
import shutil
import socketserver
import subprocess
import sys
import threading
import time

import yaml

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
import qcowd  # noqa: E402
import installed  # noqa: E402

QCOWCTL = os.environ.get("QCOWCTL", "")
QCOWCTL_MAN = os.environ.get("QCOWCTL_MAN", "")
OPENAPI = os.environ.get("OPENAPI") or os.path.join(HERE, "..", "..", "openapi", "openapi.yaml")
BASH_COMPLETION = os.path.join(HERE, "..", "..", "clients", "qcowctl", "qcowctl.bash")
KiB, MiB = 1024, 1024 * 1024

# The Python client's table: operationId -> the Client methods that call it.
PY_METHODS = {
    "getHealth": ["health"], "whoAmI": ["whoami"], "listImages": ["list", "images"], "createImage": ["create"],
    "deleteImage": ["delete"], "getImage": ["info"], "readImageData": ["read", "size", "etag"],
    "writeImageData": ["write"], "patchImageData": ["zero", "discard", "flush"], "imageDataOptions": ["options"],
    "downloadImageFile": ["download"], "uploadImageFile": ["upload"], "getMetrics": ["metrics"],
    "getImageExtents": ["extents", "dirty_extents"], "listBitmaps": ["bitmaps"], "createBitmap": ["add_bitmap"],
    "getBitmap": ["bitmap"], "deleteBitmap": ["remove_bitmap"], "clearBitmap": ["clear_bitmap"],
    "enableBitmap": ["enable_bitmap"], "disableBitmap": ["disable_bitmap"], "mergeBitmap": ["merge_bitmap"],
    "listJobs": ["jobs"], "getJob": ["job", "wait_job"], "dismissJob": ["dismiss_job"], "cancelJob": ["cancel_job"],
    "pauseJob": ["pause_job"], "resumeJob": ["resume_job"], "listSnapshots": ["snapshots"],
    "createSnapshot": ["create_snapshot"], "deleteSnapshot": ["delete_snapshot"],
    "revertSnapshot": ["revert_snapshot"], "getSnapshotData": ["read_snapshot"], "convertImage": ["convert"],
    "checkImage": ["check"], "commitImage": ["commit"], "streamEvents": ["events"], "listTickets": ["tickets"],
    "createTicket": ["create_ticket"], "revokeTicket": ["revoke_ticket"],
}
BROWSER_ONLY = {"getDashboard", "getDashboardFile"}
GROUPS = {"snapshot": None, "bitmap": None, "ticket": None, "job": {"pause", "resume", "cancel", "dismiss"}}
ran_ctl, ran_py = set(), set()
qc = None  # the installed qcowd_client


def command_of(args):
    """The command name qcowctl's table uses for an argument list."""
    words = [a for a in args if not a.startswith("-")]
    if not words:
        return None
    if words[0] in GROUPS and len(words) > 1 and (GROUPS[words[0]] is None or words[1] in GROUPS[words[0]]):
        return words[0] + " " + words[1]
    return words[0]


def ctl(url, *args, input=None, stdin=None, rc=0, env=None, stderr=subprocess.PIPE):
    """Runs qcowctl; checks its exit status is rc (None: any); (status, stdout, stderr text)."""
    p = subprocess.run([QCOWCTL, "--url", url] + list(args), input=input, stdin=stdin, stdout=subprocess.PIPE,
                       stderr=stderr, timeout=300, env=env)
    err = (p.stderr or b"").decode(errors="replace")
    if rc is not None and p.returncode != rc:
        raise AssertionError("qcowctl %s: exit %d, want %d: %s" % (" ".join(args), p.returncode, rc, err.strip()))
    ran_ctl.add(command_of(args))
    return p.returncode, p.stdout, err


def ctl_json(url, *args, **kw):
    """qcowctl --output=json ARGS: the parsed output (one compact line)."""
    _, out, _ = ctl(url, "--output=json", *args, **kw)
    assert out.count(b"\n") == 1, "not one line of JSON: %r" % out[:200]
    return json.loads(out)


def record_py(client_cls):
    """Wraps the Client methods of the table so each call is recorded."""
    names = {m for ms in PY_METHODS.values() for m in ms}
    for name in names:
        fn = getattr(client_cls, name)

        def wrapper(self, *a, _fn=fn, _name=name, **kw):
            ran_py.add(_name)
            return _fn(self, *a, **kw)
        setattr(client_cls, name, wrapper)


def expect(exc, fn, *a, **kw):
    try:
        fn(*a, **kw)
    except exc as e:
        return e
    raise AssertionError("no %s from %s%r" % (exc.__name__, getattr(fn, "__name__", fn), a))


def wait_status(c, jid, statuses, timeout=60):
    t = time.time() + timeout
    while True:
        j = c.job(jid)
        if j["status"] in statuses:
            return j
        assert time.time() < t, "job %s stuck in %s" % (jid, j["status"])
        time.sleep(0.02)


def queued_job(c, img, start):
    """A job queued (status created) behind a long compressed convert of img, then
    paused: start() posts it. Returns (blocker id, paused job). Jobs of one image
    run one at a time; when the blocker ended first, tries again."""
    for attempt in range(5):
        a = c.convert(img, "blocker%d" % attempt, compress=True)
        j = start()
        try:
            j = c.pause_job(j["id"])
            return a["id"], j
        except qc.Conflict:
            pass  # it had started already: the blocker was too quick
        finally:
            try:
                c.cancel_job(a["id"])
            except qc.Conflict:
                pass  # concluded already
    raise AssertionError("could not queue a job behind another")


def fill(c, img, size, rng):
    data = rng.randbytes(size)
    c.write(img, 0, data)
    return data


class Lines:
    """Lines of a pipe, each within a timeout."""

    def __init__(self, pipe):
        self.fd, self.buf = pipe.fileno(), b""

    def next(self, timeout=30):
        t = time.time() + timeout
        while b"\n" not in self.buf:
            left = t - time.time()
            assert left > 0 and select.select([self.fd], [], [], left)[0], "no line in %d s" % timeout
            chunk = os.read(self.fd, 65536)
            assert chunk, "the stream ended"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def ready(self, timeout):
        return b"\n" in self.buf or bool(select.select([self.fd], [], [], timeout)[0])


def listening(lines, c, name):
    """Makes image events (create and delete `name`) until the follower prints one,
    so what comes next is seen; then reads the follower up to that image's deletion."""
    for i in range(100):
        c.create(name, 512)
        c.delete(name)
        if lines.ready(0.3):
            break
    else:
        raise AssertionError("the events follower never printed a line")
    while True:
        line = lines.next()
        if "image-deleted" in line and name in line:
            # the last poke's deletion; with several pokes in flight, drain until quiet
            if not lines.ready(0.3):
                return


# ---------------------------------------------------------------- qcowctl

def ctl_cases(ck, d, c, tmp):
    url, rng = d.url, ck.rng

    def snapshots():
        c.create("cs", 4 * MiB)
        a = rng.randbytes(100000)
        ctl(url, "write", "cs", "1000", input=a)
        _, out, _ = ctl(url, "snapshot", "create", "cs", "s1", "--wait")
        assert json.loads(out) == {"snapshot": "s1", "op": "create"} or out, out
        ctl(url, "write", "cs", "1000", input=rng.randbytes(100000))
        _, out, _ = ctl(url, "snapshot", "list", "cs")
        assert re.search(rb"^1 +s1 ", out, re.M), out
        snaps = ctl_json(url, "snapshot", "list", "cs")["snapshots"]
        assert [s["name"] for s in snaps] == ["s1"], snaps
        assert ctl(url, "snapshot", "read", "cs", "s1", "1000", "100000")[1] == a
        job = ctl_json(url, "snapshot", "revert", "cs", "s1", "--wait")
        assert job["status"] == "concluded" and job["error"] is None and job["type"] == "snapshot-revert", job
        assert ctl(url, "read", "cs", "1000", "100000")[1] == a, "revert did not bring the snapshot back"
        # a job that fails while it runs: a second snapshot named s1
        rc, out, err = ctl(url, "snapshot", "create", "cs", "s1", "--wait", rc=1)
        assert re.match(r"qcowctl: job \d+ \(snapshot-create cs\) failed: .*s1", err) and out == b"", err
        _, out, err = ctl(url, "--output=json", "snapshot", "create", "cs", "s1", "--wait", rc=1)
        assert json.loads(out)["error"] and "failed" in err, (out, err)
        # without --wait: the job, then `wait`
        job = ctl_json(url, "snapshot", "delete", "cs", "s1")
        assert job["type"] == "snapshot-delete" and job["status"] in ("created", "running", "concluded"), job
        _, out, _ = ctl(url, "wait", job["id"])
        assert ctl_json(url, "snapshot", "list", "cs") == {"snapshots": []}
        ctl(url, "snapshot", "delete", "cs", "nosuch", rc=1)
        rc, _, err = ctl(url, "snapshot", "frob", "cs", rc=2)
        assert "snapshot create" in err, err
    ck.case("qcowctl snapshot list/create/delete/revert/read, --wait exit 0 and 1", snapshots)

    def bitmaps():
        c.create("cb", 8 * MiB)
        b = ctl_json(url, "bitmap", "add", "cb", "b1", "--granularity", "64k")
        assert b == {"name": "b1", "flags": ["auto"], "granularity": 65536}, b
        ctl(url, "bitmap", "add", "cb", "b2", "--disabled")
        _, out, _ = ctl(url, "bitmap", "list", "cb")
        assert re.search(rb"^b1 +65536 +auto$", out, re.M) and re.search(rb"^b2 +\d+ +-$", out, re.M), out
        assert ctl_json(url, "bitmap", "info", "cb", "b2")["flags"] == []
        ctl(url, "write", "cb", "1M", input=b"x" * 5000)
        runs = ctl_json(url, "extents", "cb", "--bitmap", "b1")
        dirty = [(e["start"], e["length"]) for e in runs if e["dirty"]]
        assert dirty == [(MiB, 64 * KiB)], runs
        assert not any(e["dirty"] for e in ctl_json(url, "extents", "cb", "--bitmap", "b2"))
        assert ctl_json(url, "bitmap", "merge", "cb", "b2", "b1")["name"] == "b2"
        assert [e for e in ctl_json(url, "extents", "cb", "--bitmap", "b2") if e["dirty"]][0]["start"] == MiB
        assert ctl_json(url, "bitmap", "disable", "cb", "b1")["flags"] == []
        assert ctl_json(url, "bitmap", "enable", "cb", "b1")["flags"] == ["auto"]
        ctl(url, "bitmap", "clear", "cb", "b1")
        assert not any(e["dirty"] for e in ctl_json(url, "extents", "cb", "--bitmap", "b1"))
        ctl(url, "bitmap", "remove", "cb", "b2")
        assert [b["name"] for b in ctl_json(url, "bitmap", "list", "cb")["bitmaps"]] == ["b1"]
        c.create("cb2", 8 * MiB)
        c.add_bitmap("cb2", "o")
        c.write("cb2", 3 * MiB, b"y")
        ctl(url, "bitmap", "merge", "cb", "b1", "o", "--source-image", "cb2")
        assert [e["start"] for e in c.dirty_extents("cb", "b1") if e["dirty"]] == [3 * MiB]
        rc, _, err = ctl(url, "bitmap", "info", "cb", "nosuch", rc=1)
        assert err.startswith("qcowctl: not-found: "), err
    ck.case("qcowctl bitmap list/info/add/remove/clear/enable/disable/merge, extents --bitmap", bitmaps)

    def commit_convert_check():
        c.create("cbase", 4 * MiB)
        c.create("ctop", None, backing_file="cbase")
        data = rng.randbytes(70000)
        c.write("ctop", 5000, data)
        job = ctl_json(url, "commit", "ctop", "--wait")
        assert job["type"] == "commit" and job["error"] is None, job
        assert c.read("cbase", 5000, len(data)) == data, "commit did not reach the base"
        _, out, _ = ctl(url, "convert", "ctop", "cflat", "--cluster-size", "128k", "--wait")
        assert json.loads(out) == {"target": "cflat"}, out
        info = c.info("cflat")
        assert info["cluster-size"] == 128 * KiB and "backing-filename" not in info, info
        assert c.read("cflat", 5000, len(data)) == data
        ctl(url, "convert", "ctop", "ckeep", "--backing", "keep", "--compress", "--wait")
        assert c.info("ckeep").get("backing-filename") == "cbase.qcow2"
        _, out, _ = ctl(url, "check", "cflat", "--wait")
        assert json.loads(out)["check-errors"] == 0, out
        job = ctl_json(url, "check", "cflat", "--repair", "leaks", "--wait")
        assert job["result"]["check-errors"] == 0 and job["params"].get("repair") == "leaks", job
        rc, _, err = ctl(url, "commit", "cflat", "--wait", rc=1)  # no backing file: refused at once
        assert err.startswith("qcowctl: bad-request: "), err
        rc, _, err = ctl(url, "convert", "ctop", "cflat", rc=1)  # the target exists
        assert err.startswith("qcowctl: conflict: "), err
        ctl(url, "check", "cflat", "--repair", "some", rc=1)
        ctl(url, "convert", "ctop", rc=2)
        ctl(url, "commit", "ctop", "--frob", rc=2)
    ck.case("qcowctl commit/convert/check --wait: results, refusals", commit_convert_check)

    def check_exit_status():
        # qemu-img check's verdicts (2 corrupt, 3 leaks) as qcowctl's 4 and 5
        def header(f):
            f.seek(20)
            cs = 1 << int.from_bytes(f.read(4), "big")
            f.seek(40)
            l1 = int.from_bytes(f.read(8), "big")
            reftable = int.from_bytes(f.read(8), "big")
            return cs, l1, reftable
        for name in ("xleak", "xbad"):
            c.create(name, 1 * MiB)
            c.write(name, 0, b"\x11" * 65536)
        ctl(url, "check", "xleak", "--wait")
        with open(os.path.join(tmp, "catalog", "xleak.qcow2"), "r+b") as f:  # one more cluster, counted, unused
            cs, _, reftable = header(f)
            n = (os.fstat(f.fileno()).st_size + cs - 1) // cs
            f.truncate((n + 1) * cs)
            f.seek(reftable)
            f.seek(int.from_bytes(f.read(8), "big") + 2 * n)  # 16-bit refcounts
            f.write((1).to_bytes(2, "big"))
        with open(os.path.join(tmp, "catalog", "xbad.qcow2"), "r+b") as f:  # L1[0] names the header as an L2 table
            _, l1, _ = header(f)
            f.seek(l1)
            f.write((1 << 63).to_bytes(8, "big"))
        _, out, _ = ctl(url, "--output", "json", "check", "xleak", "--wait", rc=5)
        assert json.loads(out)["result"]["leaks"] == 1, out
        ctl(url, "check", "xleak", "--repair", "leaks", "--wait")  # repaired: 0
        ctl(url, "check", "xleak", "--wait")
        _, out, _ = ctl(url, "check", "xbad", "--wait", rc=4)
        assert json.loads(out)["corruptions"] > 0, out
        c.delete("xleak")
        c.delete("xbad")
    ck.case("qcowctl check --wait: exit 4 corrupt, 5 leaks only (qemu-img's 2 and 3)", check_exit_status)

    def jobs_and_progress():
        c.create("cj", 32 * MiB)
        fill(c, "cj", 32 * MiB, rng)
        blocker, j = queued_job(c, "cj", lambda: c.check("cj"))
        jid = j["id"]
        assert ctl_json(url, "job", jid)["status"] == "paused"
        rows = ctl_json(url, "jobs", "--image", "cj")["jobs"]
        assert rows and all(r["image"] == "cj" for r in rows) and jid in [r["id"] for r in rows], rows
        paused = ctl_json(url, "jobs", "--status", "paused")["jobs"]
        assert [r["id"] for r in paused] == [jid], paused
        _, out, _ = ctl(url, "jobs")
        assert re.search((r"^%s +check +cj +paused " % jid).encode(), out, re.M), out
        # `wait` on a terminal draws the bar; resume lets the job end
        mfd, sfd = pty.openpty()
        p = subprocess.Popen([QCOWCTL, "--url", url, "wait", jid], stdout=subprocess.PIPE, stderr=sfd)
        os.close(sfd)
        ran_ctl.add("wait")
        shown = b""
        t = time.time() + 30
        while b"/100%)" not in shown and time.time() < t:
            if select.select([mfd], [], [], 0.5)[0]:
                shown += os.read(mfd, 4096)
        assert ctl_json(url, "job", "resume", jid)["status"] in ("created", "running", "concluded")
        out = p.communicate(timeout=120)[0]
        while select.select([mfd], [], [], 0.2)[0]:
            try:
                chunk = os.read(mfd, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        os.close(mfd)
        assert p.returncode == 0 and json.loads(out)["check-errors"] == 0, (p.returncode, out)
        assert re.search(rb"\r +\( *\d+\.\d\d/100%\) \[[#.]{20}\]", shown), shown
        assert b"100.00/100%" in shown, shown
        # the same on a pipe: no bar
        _, _, err = ctl(url, "check", "cj", "--wait")
        assert "/100%" not in err, err
        # cancel: `wait` exits 1 saying so; dismiss removes the record
        blocker, j = queued_job(c, "cj", lambda: c.check("cj"))
        p = subprocess.Popen([QCOWCTL, "--url", url, "wait", j["id"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert ctl_json(url, "job", "cancel", j["id"])["status"] in ("aborting", "concluded")
        out, err = p.communicate(timeout=120)
        assert p.returncode == 1 and b"was cancelled" in err and out == b"", (p.returncode, err)
        ctl(url, "job", "pause", j["id"], rc=1)
        ctl(url, "job", "dismiss", j["id"])
        rc, _, err = ctl(url, "job", j["id"], rc=1)
        assert err.startswith("qcowctl: not-found: "), err
        ctl(url, "job", "dismiss", "999999", rc=1)
        for jb in c.jobs(status="concluded"):
            c.dismiss_job(jb["id"])
    ck.case("qcowctl jobs filters, job, pause/resume/cancel/dismiss, wait: progress bar on a pty, exit 1 when cancelled",
            jobs_and_progress)

    def events():
        p = subprocess.Popen([QCOWCTL, "--url", url, "--output=json", "events"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        ran_ctl.add("events")
        try:
            lines = Lines(p.stdout)
            listening(lines, c, "csync")
            c.create("cev", MiB)
            c.check("cev", wait=True)
            evs = []
            while not any(e["event"] == "job-status" and e["data"].get("status") == "concluded" for e in evs):
                evs.append(json.loads(lines.next()))
        finally:
            p.kill()
            p.wait()
        evs = [e for e in evs if e["data"].get("name") == "cev" or e["data"].get("image") == "cev"]
        assert evs[0] == {"event": "image-created", "id": evs[0]["id"], "data": {"name": "cev"}}, evs
        assert all(set(e) == {"event", "id", "data"} for e in evs), evs
        ids = [int(e["id"]) for e in evs]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
        kinds = {(e["event"], e["data"].get("type"), e["data"].get("status")) for e in evs[1:]}
        assert ("job-created", "check", "created") in kinds, evs
        assert ("job-status", "check", "concluded") in kinds, evs
        # text lines
        p = subprocess.Popen([QCOWCTL, "--url", url, "events"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            lines = Lines(p.stdout)
            listening(lines, c, "csync")
            c.write("cev", 0, b"z")
            c.delete("cev")
            got = [lines.next(), lines.next()]
        finally:
            p.kill()
            p.wait()
        assert re.match(r"^\d+ image-changed cev$", got[0]) and re.match(r"^\d+ image-deleted cev$", got[1]), got
    ck.case("qcowctl events: text lines and --output=json objects, ids rising", events)

    def tickets():
        c.create("ct", MiB)
        t = ctl_json(url, "ticket", "create", "ct", "--ops", "read,write", "--timeout", "60")
        assert t["image"] == "ct" and sorted(t["ops"]) == ["read", "write"] and t["token"], t
        listed = ctl_json(url, "ticket", "list")["tickets"]
        assert [x["id"] for x in listed] == [t["id"]] and "token" not in listed[0], listed
        ctl(url, "ticket", "revoke", t["id"])
        assert ctl_json(url, "ticket", "list") == {"tickets": []}
        ctl(url, "ticket", "revoke", t["id"], rc=1)
        ctl(url, "ticket", "create", "ct", "--timeout", "x", rc=2)
    ck.case("qcowctl ticket create/list/revoke", tickets)

    def json_everywhere():
        c.create("cjs", MiB)
        for args in (["list"], ["info", "cjs"], ["size", "cjs"], ["extents", "cjs"], ["features", "cjs"],
                     ["health"], ["whoami"], ["jobs"], ["snapshot", "list", "cjs"], ["bitmap", "list", "cjs"],
                     ["ticket", "list"]):
            ctl_json(url, *args)
            ctl(url, *args, "--output", "json")  # anywhere on the line
        assert ctl_json(url, "size", "cjs") == MiB
        assert ctl_json(url, "create", "cjs2", "1M")["name"] == "cjs2"
        f = os.path.join(tmp, "cjs.qcow2")
        ctl(url, "download", "cjs", f)
        assert ctl_json(url, "upload", "cjs3", f)["name"] == "cjs3"
        for a in (["rm", "cjs2"], ["rm", "cjs3"], ["flush", "cjs"], ["zero", "cjs", "0", "4k"],
                  ["discard", "cjs", "0", "64k"]):
            assert ctl(url, "--output=json", *a)[1] == b"", a  # 204: nothing to print
        ctl(url, "--output=yaml", "list", rc=2)
        assert b"qcowd_http_requests_total" in ctl(url, "metrics", "--output=json")[1]  # text, whatever the mode
    ck.case("qcowctl --output=json on every command parses", json_everywhere)

    def exit_statuses():
        rc, out, err = ctl(url, "info", "nosuch", rc=1)
        assert err == "qcowctl: not-found: no image named 'nosuch' in the catalog\n" and out == b"", err
        for args in (["info"], ["snapshot"], ["frob"], ["jobs", "--frob"], ["events", "--count", "0"],
                     ["bitmap", "add", "x"], ["check", "x", "--wait", "extra"]):
            rc, out, err = ctl(url, *args, rc=2)
            assert err.startswith("qcowctl: ") and out == b"", (args, err)
        rc, _, err = ctl("http://127.0.0.1:1", "jobs", rc=3)
        assert "Couldn't connect" in err or "connect" in err.lower(), err
        _, out, _ = ctl(url, "snapshot", "--help")
        assert len(re.findall(rb"^  snapshot [a-z]+ ", out, re.M)) == 5, out
    ck.case("qcowctl exit statuses: 2 usage, 1 API error as CODE: message, 3 no server", exit_statuses)


def completion(ck, d, c):
    def t():
        c.create("compimg", MiB)
        subprocess.run(["bash", "-n", BASH_COMPLETION], check=True, timeout=30)
        script = r'''
source "$1"
t() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=(); _qcowctl; echo "${COMPREPLY[*]}"; }
t qcowctl sn
t qcowctl snapshot ""
t qcowctl bitmap m
t qcowctl check compimg --re
t qcowctl check compimg --repair ""
t qcowctl info comp
t qcowctl --output ""
t qcowctl job ""
complete -p qcowctl
'''
        env = dict(os.environ, QCOWD_URL=d.url, PATH=os.path.dirname(QCOWCTL) + os.pathsep + os.environ["PATH"])
        out = subprocess.run(["bash", "-c", script, "bash", BASH_COMPLETION], env=env, check=True,
                             stdout=subprocess.PIPE, timeout=60).stdout.decode().splitlines()
        want = ["snapshot", "list create delete revert read", "merge", "--repair", "leaks all", "compimg",
                "json text", "pause resume cancel dismiss", "complete -F _qcowctl qcowctl"]
        assert out == want, out
    ck.case("bash completion: bash -n, commands, verbs, options, image names", t)


def man_page(ck):
    def t():
        man = subprocess.run([QCOWCTL, "--help-man"], stdout=subprocess.PIPE, check=True, timeout=30).stdout
        with open(QCOWCTL_MAN, "rb") as f:
            assert f.read() == man, "the built qcowctl.1 is not --help-man's output"
        text = man.decode()
        assert text.startswith(".TH QCOWCTL 1 "), text[:40]
        help_text = subprocess.run([QCOWCTL, "--help"], stdout=subprocess.PIPE, check=True, timeout=30).stdout.decode()
        rows = re.findall(r"^  ([a-z]+(?: [a-z]+)?)(?: |$)", help_text.split("commands:")[1], re.M)
        assert len(rows) >= 40, rows
        for name in rows:
            assert "\n.B %s" % name.replace("-", "\\-") in text, "the man page lacks %r" % name
        groff = shutil.which("groff")
        if groff:
            p = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z"], input=man, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=60)
            assert p.returncode == 0 and not p.stderr, p.stderr.decode()
            p = subprocess.run([groff, "-man", "-Tascii"], input=man, stdout=subprocess.PIPE, timeout=60)
            out = re.sub(r".\x08", "", p.stdout.decode())
            assert "snapshot create NAME SNAP [--wait]" in out and "EXIT STATUS" in out, out[:500]
    ck.case("man page: --help-man is the built qcowctl.1, renders cleanly, names every command", t)


# ---------------------------------------------------------------- python

def py_cases(ck, d, c, tmp):
    rng = ck.rng

    def data():
        assert c.health() == {"status": "ok"} and "qcowd_http_requests_total" in c.metrics()
        assert c.whoami()["role"] == "admin"  # no --tokens: every caller has every role
        info = c.create("pd", 4 * MiB, cluster_size=64 * KiB)
        assert info["virtual-size"] == 4 * MiB and info["cluster-size"] == 64 * KiB, info
        assert c.info("pd")["name"] == "pd" and "pd" in [i["name"] for i in c.images()] == [i["name"] for i in c.list()]
        ref = bytearray(4 * MiB)
        a = rng.randbytes(300000)
        c.write("pd", 7, a)
        ref[7:7 + len(a)] = a
        b = rng.randbytes(200000)
        c.write("pd", MiB + 3, io.BytesIO(b))  # from io.BytesIO
        ref[MiB + 3:MiB + 3 + len(b)] = b
        bio = io.BytesIO(b"skip" + b)  # from its position
        bio.seek(4)
        c.write("pd", 2 * MiB, bio, flush=False)
        ref[2 * MiB:2 * MiB + len(b)] = b
        path = os.path.join(tmp, "pd.in")
        with open(path, "wb") as f:
            f.write(a)
        with open(path, "rb") as f:  # from a file
            c.write("pd", 3 * MiB, f)
        ref[3 * MiB:3 * MiB + len(a)] = a
        r, w = os.pipe()  # from a pipe: no length known up front
        big = rng.randbytes(9 * MiB // 4)
        threading.Thread(target=lambda: (os.write(w, big), os.close(w)), daemon=True).start()
        with os.fdopen(r, "rb") as f:
            c.write("pd", 1000, f)
        ref[1000:1000 + len(big)] = big
        assert c.read("pd") == bytes(ref)
        assert c.read("pd", 12345, 54321) == bytes(ref[12345:12345 + 54321])
        out = io.BytesIO()
        assert c.read("pd", 100, 3 * MiB, into=out) == 3 * MiB and out.getvalue() == bytes(ref[100:100 + 3 * MiB])
        out = io.BytesIO()
        assert c.read("pd", into=out) == 4 * MiB and out.getvalue() == bytes(ref)
        c.zero("pd", 0, 64 * KiB)
        ref[0:64 * KiB] = bytes(64 * KiB)
        c.discard("pd", 3 * MiB + 64 * KiB, 64 * KiB, flush=False)
        ref[3 * MiB + 64 * KiB:3 * MiB + 128 * KiB] = c.read("pd", 3 * MiB + 64 * KiB, 64 * KiB)
        c.flush("pd")
        assert c.read("pd") == bytes(ref)
        assert c.size("pd") == 4 * MiB and "zero" in c.options("pd")["features"]
        tag = c.etag("pd")  # None until the server sends ETags
        assert tag is None or (tag.startswith('"') and tag.endswith('"')), tag
        ext = c.extents("pd")
        assert ext[0] == {"start": 0, "length": 64 * KiB, "zero": True, "hole": False} or ext[0]["zero"], ext[:2]
        assert sum(e["length"] for e in ext) == 4 * MiB
        # a 0-byte image reads as nothing, whole or into a file object
        c.create("pzero", 0)
        assert c.read("pzero") == b"" and c.read("pzero", into=io.BytesIO()) == 0 and c.size("pzero") == 0
        assert c.extents("pzero") == []
        c.delete("pzero")
    ck.case("python data: write from bytes/BytesIO/file/pipe, read whole/range/into BytesIO, 0-byte image", data)

    def files():
        c.create("pf", MiB)
        c.write("pf", 0, b"container")
        path = os.path.join(tmp, "pf.qcow2")
        n = c.download("pf", path)
        assert n == os.path.getsize(path) and not os.path.exists(path + ".part")
        buf = io.BytesIO()
        assert c.download("pf", buf) == n and buf.getvalue() == open(path, "rb").read()
        assert c.upload("pf2", path)["name"] == "pf2"
        buf.seek(0)
        assert c.upload("pf3", buf)["name"] == "pf3"  # from io.BytesIO
        r, w = os.pipe()
        threading.Thread(target=lambda: (os.write(w, buf.getvalue()), os.close(w)), daemon=True).start()
        with os.fdopen(r, "rb") as f:
            assert c.upload("pf4", f)["name"] == "pf4"  # a stream of unknown length
        for name in ("pf2", "pf3", "pf4"):
            assert c.read(name, 0, 9) == b"container", name
            c.delete(name)
    ck.case("python upload/download: paths, io.BytesIO, a pipe", files)

    def snapshots():
        c.create("ps", MiB)
        c.write("ps", 0, b"one")
        job = c.create_snapshot("ps", "s1", wait=True)
        assert job["status"] == "concluded" and job["type"] == "snapshot-create", job
        c.write("ps", 0, b"two")
        assert [s["name"] for s in c.snapshots("ps")] == ["s1"]
        assert c.read_snapshot("ps", "s1", 0, 3) == b"one"
        out = io.BytesIO()
        assert c.read_snapshot("ps", "s1", into=out) == MiB and out.getvalue()[:3] == b"one"
        c.revert_snapshot("ps", "s1", wait=True)
        assert c.read("ps", 0, 3) == b"one"
        e = expect(qc.JobFailed, c.create_snapshot, "ps", "s1", wait=True)
        assert e.job["error"] and e.code == "job-failed" and isinstance(e, qc.QcowdError), e
        job = c.delete_snapshot("ps", "s1")
        assert c.wait_job(job["id"], timeout=60)["error"] is None
        assert c.snapshots("ps") == []
        expect(qc.NotFound, c.revert_snapshot, "ps", "s1")
    ck.case("python snapshots: create/list/read/revert/delete, JobFailed", snapshots)

    def bitmaps():
        c.create("pb", 8 * MiB)
        assert c.add_bitmap("pb", "b1", granularity=128 * KiB)["granularity"] == 128 * KiB
        assert c.add_bitmap("pb", "b2", disabled=True)["flags"] == []
        assert [b["name"] for b in c.bitmaps("pb")] == ["b1", "b2"]
        c.write("pb", 5 * MiB + 1, b"d")
        assert [(e["start"], e["length"]) for e in c.dirty_extents("pb", "b1") if e["dirty"]] == [(5 * MiB, 128 * KiB)]
        assert c.extents("pb", context="dirty", bitmap="b2") == [{"start": 0, "length": 8 * MiB, "dirty": False}]
        c.merge_bitmap("pb", "b2", "b1")
        assert any(e["dirty"] for e in c.dirty_extents("pb", "b2"))
        assert c.disable_bitmap("pb", "b1")["flags"] == [] and c.enable_bitmap("pb", "b1")["flags"] == ["auto"]
        assert c.clear_bitmap("pb", "b1")["name"] == "b1"
        assert not any(e["dirty"] for e in c.dirty_extents("pb", "b1"))
        assert c.bitmap("pb", "b2")["name"] == "b2"
        c.remove_bitmap("pb", "b2")
        expect(qc.NotFound, c.bitmap, "pb", "b2")
        expect(qc.Conflict, c.add_bitmap, "pb", "b1")
    ck.case("python bitmaps: add/list/get/merge/disable/enable/clear/remove, dirty extents", bitmaps)

    def jobs():
        c.create("pjb", 4 * MiB)
        c.create("pjt", None, backing_file="pjb")
        c.write("pjt", 0, b"top")
        seen = []
        job = c.commit("pjt", wait=True, progress=seen.append)
        assert job["type"] == "commit" and seen and seen[-1]["status"] == "concluded", seen
        assert c.read("pjb", 0, 3) == b"top"
        job = c.convert("pjt", "pjc", cluster_size=256 * KiB, wait=True)
        assert job["result"] == {"target": "pjc"} and c.info("pjc")["cluster-size"] == 256 * KiB
        rep = c.check("pjc", repair="leaks", wait=True)["result"]
        assert rep["check-errors"] == 0 and rep["filename"] == "pjc.qcow2", rep
        assert all(j["image"] == "pjc" for j in c.jobs(image="pjc")) and c.jobs(image="pjc")
        assert all(j["status"] == "concluded" for j in c.jobs(status="concluded"))
        # pause, resume, cancel, timeout, dismiss
        c.create("pjl", 32 * MiB)
        fill(c, "pjl", 32 * MiB, rng)
        _, j = queued_job(c, "pjl", lambda: c.check("pjl"))
        assert j["status"] == "paused" and c.job(j["id"])["status"] == "paused"
        e = expect(qc.JobTimeout, c.wait_job, j["id"], timeout=0.5)
        assert isinstance(e, TimeoutError) and e.job["status"] == "paused", e
        assert c.resume_job(j["id"])["status"] in ("created", "running", "concluded")
        assert c.wait_job(j["id"], timeout=120)["result"]["check-errors"] == 0
        _, j = queued_job(c, "pjl", lambda: c.check("pjl"))
        assert c.cancel_job(j["id"])["status"] in ("aborting", "concluded")
        e = expect(qc.JobCancelled, c.wait_job, j["id"], timeout=60)
        assert e.job["cancelled"] and isinstance(e, qc.JobFailed), e
        expect(qc.Conflict, c.pause_job, j["id"])
        c.dismiss_job(j["id"])
        expect(qc.NotFound, c.job, j["id"])
        expect(qc.BadRequest, c.commit, "pjc")  # no backing file
        for jb in c.jobs(status="concluded"):
            c.dismiss_job(jb["id"])
    ck.case("python jobs: commit/convert/check with wait and progress, filters, pause/resume/cancel/dismiss, "
            "JobTimeout, JobCancelled", jobs)

    def events():
        got, seen_any = [], threading.Event()
        ev = c.events()

        def follow():  # the image events of pev; jobs of earlier cases may still report
            for e in ev:
                seen_any.set()
                if isinstance(e.data, dict) and e.data.get("name") == "pev":
                    got.append(e)
                    if len(got) == 3:
                        return
        t = threading.Thread(target=follow, daemon=True)
        t.start()
        with qc.Client(d.url) as c2:
            for i in range(100):  # until the generator is listening
                c2.create("psync", 512)
                c2.delete("psync")
                if seen_any.wait(0.3):
                    break
            c2.create("pev", MiB)
            c2.write("pev", 0, b"e")
            c2.delete("pev")
        t.join(30)
        ev.close()
        assert [(e.type, e.data) for e in got] == [("image-created", {"name": "pev"}), ("image-changed", {"name": "pev"}),
                                                  ("image-deleted", {"name": "pev"})], got
        assert all(e.id and e.id.isdigit() for e in got) and int(got[0].id) < int(got[2].id), got
    ck.case("python events: iterate image events with ids", events)

    def tickets():
        c.create("pt", MiB)
        c.write("pt", 0, b"ticket")
        t = c.create_ticket("pt", ["read"], 60)
        assert [x["id"] for x in c.tickets()] == [t["id"]]
        with qc.Client(d.url, token=t["token"]) as tc:
            assert tc.read("pt", 0, 6) == b"ticket"
        c.revoke_ticket(t["id"])
        assert c.tickets() == []
        expect(qc.NotFound, c.revoke_ticket, t["id"])
    ck.case("python tickets: create/list/use/revoke", tickets)

    def exceptions():
        e = expect(qc.NotFound, c.info, "nosuch")
        assert (e.status, e.code) == (404, "not-found") and "nosuch" in e.message and isinstance(e, qc.QcowdError)
        c.create("px", MiB)
        e = expect(qc.Conflict, c.create, "px", MiB)
        assert e.status == 409 and e.retry_after is None, e
        e = expect(qc.BadRequest, c.create, "bad/name", MiB)
        assert e.status == 400 and e.code == "bad-request"
        e = expect(qc.RangeNotSatisfiable, c.read, "px", 2 * MiB, 10)
        assert e.status == 416 and e.headers.get("content-range") == "bytes */%d" % MiB, e.headers
        expect(qc.TooLarge, c.write, "px", MiB - 1, b"ab") if False else None
        e = expect(qc.QcowdError, c.write, "px", MiB - 1, b"ab")
        assert e.status in (413, 416), e
        assert qc.error_for(503, "storage-denied", "m").__class__ is qc.StorageDenied
        assert isinstance(qc.error_for(422, "corrupt-image", "m"), qc.ImageError)
        assert isinstance(qc.error_for(418, "whatever", "m"), qc.QcowdError)
        expect(OSError, qc.Client("http://127.0.0.1:1").health)
        c.delete("px")
    ck.case("python typed exceptions: NotFound, Conflict, BadRequest, RangeNotSatisfiable, OSError", exceptions)

    def reuse():
        c.close()  # the daemon's gauge then counts only the client below
        with qc.Client(d.url) as one:
            for i in range(30):
                one.health()
                one.list()
            one.create("pr", MiB)
            one.write("pr", 0, io.BytesIO(b"r" * 100000))
            one.read("pr", 0, 10)
            one.delete("pr")
            assert one.connections == 1, one.connections
            # the daemon agrees: this client's connection is the only one open
            t = time.time() + 10
            while True:
                n = int(re.search(r"^qcowd_http_connections (\d+)$", one.metrics(), re.M).group(1))
                if n == 1 or time.time() > t:
                    break
                time.sleep(0.1)
            assert n == 1 and one.connections == 1, (n, one.connections)
    ck.case("python connection reuse: one connection for 65 requests (client count, qcowd_http_connections)", reuse)


# ---------------------------------------------------------------- the fake server

class Fake(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.requests = []  # (method, path, headers dict lower-case, body)
        self.connections = 0
        self.events_calls = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]

    def get_request(self):
        self.connections += 1
        return super().get_request()


JOB = {"id": "9", "type": "commit", "image": "x", "status": "concluded", "current-progress": 1, "total-progress": 1,
       "error": None, "cancelled": False, "result": None, "params": {}, "created": "", "started": "", "finished": ""}


class FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, status, obj=None, headers=()):
        body = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if obj is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def error(self, status, code, msg, headers=()):
        self.reply(status, {"error": {"code": code, "message": msg}}, headers)

    def handle_one(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        srv = self.server
        srv.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        path = self.path
        if path.startswith("/v1/jobs?"):
            other = dict(JOB, id="8", image="y", status="running")
            return self.reply(200, {"jobs": [JOB, other]})  # the server ignores filters: the clients apply them
        if path == "/v1/images/x/commit":
            return self.reply(202, dict(JOB, status="created"), [("Location", "/v1/jobs/9")])
        if path == "/v1/jobs/9":
            return self.reply(200, JOB)
        if path == "/v1/jobs/7":
            return self.reply(200, dict(JOB, id="7", error="the base went away"))
        if path == "/v1/images/busy":
            return self.error(409, "conflict", "image 'busy' is held by job 3 (convert)", [("Retry-After", "7")])
        if path.startswith("/v1/images/x/data"):
            return self.error(412, "precondition-failed", "the image changed")
        if path == "/v1/health":
            self.reply(200, {"status": "ok"})
            if self.headers.get("X-Drop"):
                self.close_connection = True  # the kept-alive connection goes away unannounced
            return
        if path == "/v1/events":
            srv.events_calls += 1
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            if srv.events_calls == 1:
                self.wfile.write(b"retry: 100\n: hello\n\nevent: image-created\nid: 41\ndata: {\"name\":\"a\"}\n\n"
                                 b"event: image-changed\nid: 42\ndata: {\"name\":\"a\"}\n\nevent: image-del")
            else:
                self.wfile.write(b"event: lost\ndata: {\"dropped\":3}\n\n"
                                 b"event: image-deleted\nid: 46\ndata: {\"name\":\"a\"}\n\n")
            self.wfile.flush()
            self.close_connection = True
            return
        self.error(404, "not-found", "no " + path)

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path, {k.lower(): v for k, v in self.headers.items()}, b""))
        self.send_response(200)
        self.send_header("ETag", '"abc"')
        self.send_header("Content-Length", "1048576")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_one


def fake_cases(ck):
    f = Fake()

    def ctl_passthrough():
        _, out, _ = ctl(f.url, "--output=json", "jobs", "--image", "x", "--status", "concluded")
        assert [j["id"] for j in json.loads(out)["jobs"]] == ["9"], out
        assert f.requests[-1][1] == "/v1/jobs?image=x&status=concluded", f.requests[-1]
        ctl(f.url, "commit", "x", "--base", "b", "--force")
        assert json.loads(f.requests[-1][3]) == {"base": "b", "force": True}, f.requests[-1]
        rc, out, err = ctl(f.url, "wait", "7", rc=1)
        assert err == "qcowctl: job 7 (commit x) failed: the base went away\n", err
        rc, _, err = ctl(f.url, "rm", "busy", rc=1)
        assert err == "qcowctl: conflict: image 'busy' is held by job 3 (convert) (retry after 7 s)\n", err
        rc, _, err = ctl(f.url, "--if-match", '"abc"', "zero", "x", "0", "1", rc=1)
        assert err.startswith("qcowctl: precondition-failed: "), err
        assert f.requests[-1][:2] == ("PATCH", "/v1/images/x/data") and f.requests[-1][2]["if-match"] == '"abc"'
        ctl(f.url, "--if-match", '"abc"', "wait", "9")
        assert "if-match" not in f.requests[-1][2], f.requests[-1]  # reads go without it
        f.events_calls = 0
        rc, out, err = ctl(f.url, "--output=json", "events", "--count", "4")
        evs = [json.loads(x) for x in out.splitlines()]
        assert [e["event"] for e in evs] == ["image-created", "image-changed", "lost", "image-deleted"], evs
        assert evs[2] == {"event": "lost", "id": None, "data": {"dropped": 3}}, evs
        ev_reqs = [r for r in f.requests if r[1] == "/v1/events"]
        assert "last-event-id" not in ev_reqs[-2][2] and ev_reqs[-1][2].get("last-event-id") == "42", ev_reqs
        assert "reconnecting after event 42" in err, err
        rc, out, err = ctl(f.url, "events", "--count", "1", "--last-event-id", "40")
        assert f.requests[-1][2].get("last-event-id") == "40", f.requests[-1]
    ck.case("fake server, qcowctl: job filters as query, commit force, wait on a failed job, Retry-After, 412, "
            "events reconnect with Last-Event-ID", ctl_passthrough)

    def py_passthrough():
        c = qc.Client(f.url)
        assert [j["id"] for j in c.jobs(image="x", status="concluded")] == ["9"]
        assert f.requests[-1][1] == "/v1/jobs?image=x&status=concluded", f.requests[-1]
        c.commit("x", base="b", force=True)
        assert json.loads(f.requests[-1][3]) == {"base": "b", "force": True}
        e = expect(qc.JobFailed, c.wait_job, "7")
        assert e.job["error"] == "the base went away"
        e = expect(qc.Conflict, c.delete, "busy")
        assert e.retry_after == 7 and "job 3" in e.message, e
        assert c.etag("x") == '"abc"'
        e = expect(qc.PreconditionFailed, c.write, "x", 0, b"a", if_match=c.etag("x"))
        assert e.status == 412 and f.requests[-1][2].get("if-match") == '"abc"', f.requests[-1]
        expect(qc.PreconditionFailed, c.read, "x", 5, 10, if_range='"abc"')
        assert f.requests[-1][2].get("if-range") == '"abc"' and f.requests[-1][2]["range"] == "bytes=5-14"
        f.events_calls = 0
        evs = []
        for e in c.events():
            evs.append(e)
            if len(evs) == 4:
                break
        assert [e.type for e in evs] == ["image-created", "image-changed", "lost", "image-deleted"], evs
        assert evs[2].data == {"dropped": 3} and evs[3].id == "46", evs
        assert [r for r in f.requests if r[1] == "/v1/events"][-1][2].get("last-event-id") == "42"
        # a kept-alive connection the server dropped: the next request goes on a new one
        before = f.connections
        c.close()
        c.health()
        c._send_headers = None
        c._call("GET", "/v1/health", headers={"X-Drop": "1"})
        time.sleep(0.2)
        assert c.health() == {"status": "ok"}
        assert f.connections - before == 2 and c.connections >= 2, (f.connections - before, c.connections)
    ck.case("fake server, python: filters, force, JobFailed, Conflict.retry_after, PreconditionFailed, "
            "events reconnect with Last-Event-ID, a dropped keep-alive", py_passthrough)
    return f


# ---------------------------------------------------------------- coverage

def coverage(ck):
    def t():
        with open(OPENAPI) as fh:
            spec = yaml.safe_load(fh)
        # the dashboard's own files are for browsers, not API clients
        ops = [op["operationId"] for path in spec["paths"].values() for m, op in path.items()
               if isinstance(op, dict) and "operationId" in op and op["operationId"] not in BROWSER_ONLY]
        out = subprocess.run([QCOWCTL, "--list-operations"], stdout=subprocess.PIPE, check=True).stdout.decode()
        ctl_table = {}
        for line in out.splitlines():
            cmd, ids = line.split("\t")
            for op in ids.split():
                ctl_table.setdefault(op, []).append(cmd)
        print("    %-20s %-44s %s" % ("operationId", "qcowctl", "python"))
        for op in ops:
            print("    %-20s %-44s %s" % (op, ", ".join(ctl_table.get(op, ["-"])), ", ".join(PY_METHODS.get(op, ["-"]))))
        gaps = [op for op in ops if op not in ctl_table or op not in PY_METHODS]
        assert not gaps, "operations no client covers: %s" % gaps
        stale = [op for op in list(ctl_table) + list(PY_METHODS) if op not in ops]
        assert not stale, "tables name operations the API does not have: %s" % stale
        cmds = {cmd for line in out.splitlines() for cmd in [line.split("\t")[0]]}
        assert not cmds - ran_ctl, "qcowctl commands no case ran: %s" % sorted(cmds - ran_ctl)
        methods = {m for ms in PY_METHODS.values() for m in ms}
        assert not methods - ran_py, "Client methods no case ran: %s" % sorted(methods - ran_py)
        print("    %d operations; qcowctl covers %d with %d commands, python %d with %d methods"
              % (len(ops), len(set(ops) & set(ctl_table)), len(cmds), len(set(ops) & set(PY_METHODS)), len(methods)))
    ck.case("coverage: every operationId mapped to a qcowctl command and a Client method, each one run", t)


def main():
    global qc
    args, tmp, catalog = qcowd.prologue("qcowd-clients-api-", tools=(),
                                        seed=int.from_bytes(os.urandom(4), "little"),
                                        binaries={"QCOWD": qcowd.QCOWD, "QCOWCTL": QCOWCTL})
    print("seed", args.seed, flush=True)
    ck = qcowd.Cases(args.seed)
    qc = installed.install(tmp)
    record_py(qc.Client)
    d = qcowd.Qcowd(qcowd.QCOWD, ["--catalog", catalog, "--threads", "4"])
    try:
        c = qc.Client(d.url)
        py_cases(ck, d, c, tmp)
        ctl_cases(ck, d, c, tmp)
        completion(ck, d, c)
        man_page(ck)
        c.close()
        fake_cases(ck).shutdown()
        coverage(ck)
    finally:
        rc = d.stop(timeout=120)
    ck.case("qcowd exits 0 on SIGTERM", lambda: (_ for _ in ()).throw(AssertionError("exit %d" % rc)) if rc else None)
    qcowd.remove_temp(tmp, args.keep)
    return ck.summary()


if __name__ == "__main__":
    sys.exit(main())
