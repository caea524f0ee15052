#!/usr/bin/python3
"""races.py: the job engine and the event stream under concurrency, over a live
qcowd (issue 12): each job's events in order over many concurrent jobs (created
first, nothing after concluded but dismissed, ids strictly increasing),
Last-Event-ID replay after a disconnect (the missed events, none twice), `lost`
when the history overflowed or the id is of an earlier run, a paused job not
holding the only worker, a pause answering only once the job stopped, the
/v1/jobs filters, auto-dismiss after --job-retention, bounded records, and
records files of another version or garbage set aside while the daemon starts.
Each case runs its own qcowd; every job object and event seen is validated
against openapi/openapi.yaml.

Environment: QCOWD (required), OPENAPI, QEMU_IMG. Usage: races.py [-k NAME] [-j N] [--keep]
Prints `ok NAME` / `FAIL NAME: reason`, then `N passed, M failed`.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "daemon"))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
import daemon as dm  # noqa: E402
from sse import Sse  # noqa: E402
import suite  # noqa: E402
import yaml  # noqa: E402

MiB = 1 << 20
JOBS_FILE = ".qcowd-jobs.json"
with open(dm.OPENAPI) as _f:
    DOC = yaml.safe_load(_f)


def valid(schema, obj, where):
    if schema not in DOC["components"]["schemas"]:  # an older document (a run against an older qcowd)
        return obj
    try:
        dm.validate(DOC, schema, obj)
    except Exception as e:
        raise AssertionError("%s: not a valid %s: %s: %r" % (where, schema, str(e).splitlines()[0], obj))
    return obj


class Case:
    """One case: a folder, a catalog, qcowd started with extra args."""

    def __init__(self, root, name):
        self.folder = os.path.join(root, name)
        self.cat = os.path.join(self.folder, "catalog")
        os.makedirs(self.cat)
        self.d = None
        self.streams = []

    def start(self, *extra):
        self.d = dm.Daemon(self.cat, 4, ("--quiet",) + extra)
        return self.d

    def call(self, method, path, body=None, headers=None):
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        return self.d.exchange(method, path, data, dict(headers or {}, Host="localhost"))

    def ok(self, method, path, body=None, want=(200,)):
        st, h, b = self.call(method, path, body)
        assert st in want, "%s %s: %d %r" % (method, path, st, b[:300])
        return json.loads(b) if b else None

    def job(self, jid):
        return valid("Job", self.ok("GET", "/v1/jobs/" + jid), "job " + jid)

    def start_job(self, path, body=None):
        j = valid("Job", self.ok("POST", path, body or {}, (202,)), path)
        return j["id"]

    def wait(self, jid, status=("concluded",), timeout=120):
        t = time.time() + timeout
        j = None
        while time.time() < t:
            j = self.job(jid)
            if j["status"] in status:
                return j
            time.sleep(0.02)
        raise AssertionError("job %s not %s after %ds: %r" % (jid, status, timeout, j))

    def image(self, name, mib=4, data=True):
        path = os.path.join(self.cat, name + ".qcow2")
        dm.run(dm.QEMU_IMG, "create", "-q", "-f", "qcow2", path, "%dM" % mib)
        if data:
            dm.qemu_io(path, "write -P 0x5a 0 1M")
        return name

    def long_image(self, name, mib=96):
        """Half-random clusters: a compressed convert of it is seconds of work with
        a progress report every few clusters."""
        src = os.path.join(self.folder, name + ".raw")
        r = random.Random(7)
        blob = r.randbytes(4 * MiB)
        with open(src, "wb") as f:
            for i in range(mib * 16):
                k = i * 977 * 64 % (4 * MiB - 32 * 1024)
                f.write(blob[k:k + 24 * 1024] + bytes(40 * 1024))
        dm.run(dm.QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", src, os.path.join(self.cat, name + ".qcow2"))
        os.remove(src)
        return name

    def stream(self, last=None, query=False):
        s = Sse(self.d.port, last, query)
        self.streams.append(s)
        return s

    def running_with_progress(self, jid):
        """Wait until jid runs and reported progress."""
        t = time.time() + 120
        while time.time() < t:
            j = self.job(jid)
            if j["status"] == "running" and j["current-progress"] > 0:
                return j
            assert j["status"] in ("created", "running"), j
            time.sleep(0.01)
        raise AssertionError("job %s made no progress" % jid)

    def close(self):
        for s in self.streams:
            s.close()
        if self.d:
            self.d.stop_clean()


def job_events(events):
    """The job events of a stream, checked: each data a valid Job object."""
    out = []
    for typ, eid, data in events:
        if typ.startswith("job-"):
            valid("Job", data, "event %s %s" % (typ, eid))
            out.append((typ, eid, data))
        elif typ.startswith("image-"):
            valid("ImageEvent", data, "event %s" % typ)
        elif typ == "lost":
            valid("LostEvent", data, "event lost")
    return out


def check_order(events):
    """Every job's events: job-created first, nothing but job-dismissed after its
    concluded status, one dismissed at most; ids strictly increasing. Returns the
    jobs seen."""
    ids = [eid for _, eid, _ in events if eid is not None]
    for a, b in zip(ids, ids[1:]):
        assert b > a, "event ids not increasing: %d then %d" % (a, b)
    state = {}
    for typ, eid, data in job_events(events):
        jid = data["id"]
        st = state.get(jid)
        if typ == "job-created":
            assert st is None, "job %s: job-created again (id %s)" % (jid, eid)
            state[jid] = "open"
        elif typ == "job-dismissed":
            assert st == "concluded", "job %s: dismissed while %s (id %s)" % (jid, st, eid)
            state[jid] = "dismissed"
        else:
            assert st is not None, "job %s: %s %s before job-created (id %s)" % (jid, typ, data["status"], eid)
            assert st == "open", "job %s: %s %s after it concluded (id %s)" % (jid, typ, data["status"], eid)
            if typ == "job-status" and data["status"] == "concluded":
                state[jid] = "concluded"
    return state


# ---- the cases ----

def events_in_order(c):
    """Many short jobs on 4 workers from 4 submitting threads while 2 threads
    pause, resume and cancel them; then every one dismissed."""
    c.start("--job-workers", "4")
    names = [c.image("o%d" % i) for i in range(8)]
    s = c.stream()
    time.sleep(0.2)
    ids, lock = [], threading.Lock()

    def submitter(k):
        for i in range(15):
            jid = c.start_job("/v1/images/%s/check" % names[(k * 15 + i) % len(names)])
            with lock:
                ids.append(jid)

    def chatter(seed):
        r = random.Random(seed)
        for _ in range(120):
            with lock:
                if not ids:
                    continue
                jid = r.choice(ids)
            verb = r.choice(("pause", "resume", "resume", "cancel"))
            c.call("POST", "/v1/jobs/%s/%s" % (jid, verb))
    th = [threading.Thread(target=submitter, args=(k,)) for k in range(4)]
    th += [threading.Thread(target=chatter, args=(k,)) for k in range(2)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    for jid in ids:
        c.call("POST", "/v1/jobs/%s/resume" % jid)
    for jid in ids:
        c.wait(jid)
        st, h, b = c.call("DELETE", "/v1/jobs/" + jid)
        assert st == 204, (jid, st, b)
    ev = s.wait(lambda e: sum(1 for x in e if x[0] == "job-dismissed") >= len(ids), what="every dismissal")
    state = check_order(ev)
    assert set(state) == set(ids) and all(v == "dismissed" for v in state.values()), state
    return "%d jobs, %d events" % (len(ids), len(ev))


def replay_after_disconnect(c):
    """A listener that drops and comes back with Last-Event-ID gets exactly what a
    listener that stayed saw meanwhile; ?last-event-id= does the same."""
    c.start()
    names = [c.image("r%d" % i) for i in range(3)]
    stay = c.stream()
    drop = c.stream()
    time.sleep(0.2)
    first = c.start_job("/v1/images/r0/check")
    c.wait(first)
    drop.wait(lambda e: any(x[0] == "job-status" and x[2]["status"] == "concluded" for x in e))
    before = drop.seen()
    last = [x[1] for x in before if x[1] is not None][-1]
    drop.close()
    jobs = [c.start_job("/v1/images/%s/check" % n) for n in names]
    for j in jobs:
        c.wait(j)
    c.ok("DELETE", "/v1/jobs/" + first, want=(204,))
    ref = stay.wait(lambda e: any(x[0] == "job-dismissed" for x in e), what="job-dismissed")
    missed = [x for x in ref if x[1] is not None and x[1] > last]
    assert len(missed) >= 3 * 3, missed
    for query in (False, True):
        back = c.stream(last, query)
        got = back.wait(lambda e: len(e) >= len(missed), what="the missed events")
        time.sleep(0.3)
        got = back.seen()
        assert got == missed, "replay (query %s) differs:\n got %r\nwant %r" % (query, got[:6], missed[:6])
        check_order(before + got)
    # not an id at all: 400 naming the header
    st, h, b = c.call("GET", "/v1/events", headers={"Last-Event-ID": "x1"})
    assert st == 400 and b"Last-Event-ID" in b, (st, b)
    return "%d events replayed" % len(missed)


def lost_when_history_overflowed(c):
    """--event-history 8: a listener back after 20+ events reads `lost` with the
    exact count first, then the 8 kept; an id of an earlier run of qcowd gives
    `lost` "unknown"."""
    c.start("--event-history", "8")
    c.image("h")
    s = c.stream()
    time.sleep(0.2)
    c.wait(c.start_job("/v1/images/h/check"))
    s.wait(lambda e: any(x[0] == "job-status" and x[2]["status"] == "concluded" for x in e))
    last = [x[1] for x in s.seen() if x[1] is not None][-1]
    s.close()
    for _ in range(6):
        c.wait(c.start_job("/v1/images/h/check"))
    probe = c.stream()
    time.sleep(0.1)
    c.wait(c.start_job("/v1/images/h/check"))
    newest = probe.wait(lambda e: any(x[0] == "job-status" and x[2]["status"] == "concluded" for x in e))
    top = [x[1] for x in newest if x[1] is not None][-1]
    back = c.stream(last)
    got = back.wait(lambda e: len(e) >= 9, what="lost and the history")
    assert got[0][0] == "lost" and got[0][1] is None, got[:2]
    assert got[0][2] == {"dropped": top - last - 8}, (got[0], top, last)
    assert [x[1] for x in got[1:9]] == list(range(top - 7, top + 1)), got
    job_events(got)
    c.d.stop_clean()  # a restart: ids of the new run are above the old ones
    c.d = None
    c.start("--event-history", "8")
    c.wait(c.start_job("/v1/images/h/check"))
    old = c.stream(top)
    got = old.wait(lambda e: len(e) >= 2, what="lost unknown")
    assert got[0][0] == "lost" and got[0][2] == {"dropped": "unknown"}, got[:2]
    assert got[1][1] > top, (got[1], top)
    job_events(got)
    return "lost %d" % (top - last - 8)


def paused_job_frees_the_worker(c):
    """--job-workers 1: a paused convert lets a check of another image run to
    the end; it stays paused meanwhile, then resumes and is cancelled."""
    c.start("--job-workers", "1")
    c.long_image("big")
    c.image("small")
    a = c.start_job("/v1/images/big/convert", {"target": "big2", "compress": True})
    c.running_with_progress(a)
    st, h, b = c.call("POST", "/v1/jobs/%s/pause" % a)
    assert st == 200 and json.loads(b)["status"] == "paused", (st, b)
    p = json.loads(b)["current-progress"]
    other = c.start_job("/v1/images/small/check")
    j = c.wait(other, timeout=30)
    assert j["error"] is None and not j["cancelled"], j
    ja = c.job(a)
    assert ja["status"] == "paused" and ja["current-progress"] == p, (p, ja)
    c.ok("POST", "/v1/jobs/%s/resume" % a)
    t = time.time() + 60
    while c.job(a)["current-progress"] == p and time.time() < t:
        time.sleep(0.02)
    assert c.job(a)["current-progress"] > p, "the resumed job did not go on"
    c.ok("POST", "/v1/jobs/%s/cancel" % a)
    assert c.wait(a)["cancelled"]


def pause_answers_once_stopped(c):
    """The pause answer's progress is where the job stopped: it does not move
    after the answer, over several pauses of a running convert."""
    c.start("--job-workers", "2")
    c.long_image("big")
    a = c.start_job("/v1/images/big/convert", {"target": "big2", "compress": True})
    waits = []
    for rnd in range(3):
        j = c.running_with_progress(a) if rnd == 0 else c.job(a)
        t0 = time.time()
        st, h, b = c.call("POST", "/v1/jobs/%s/pause" % a)
        waits.append(time.time() - t0)
        j = valid("Job", json.loads(b), "pause")
        assert st == 200 and j["status"] == "paused" and not j.get("pausing"), (st, j)
        p = j["current-progress"]
        assert p < j["total-progress"], "the job ended first: %r" % j
        for _ in range(5):
            time.sleep(0.1)
            k = c.job(a)
            assert k["status"] == "paused" and k["current-progress"] == p, \
                "progress moved after the pause answer: %d -> %d" % (p, k["current-progress"])
        c.ok("POST", "/v1/jobs/%s/resume" % a)
        t = time.time() + 60
        while c.job(a)["current-progress"] == p and time.time() < t:
            time.sleep(0.01)
    c.ok("POST", "/v1/jobs/%s/cancel" % a)
    assert c.wait(a)["cancelled"]
    return "pause answered in %s ms" % "/".join("%.0f" % (w * 1000) for w in waits)


def filters(c):
    """GET /v1/jobs?image=&status=, alone and together; bad values are 400."""
    c.start("--job-workers", "2")
    for n in ("fa", "fb"):
        c.image(n)
    c.long_image("big", 48)
    done = [c.start_job("/v1/images/%s/check" % n) for n in ("fa", "fb", "fa")]
    for j in done:
        c.wait(j)
    run = c.start_job("/v1/images/big/convert", {"target": "big2", "compress": True})
    c.running_with_progress(run)
    c.ok("POST", "/v1/jobs/%s/pause" % run)
    queued = c.start_job("/v1/images/fb/check")
    c.wait(queued)

    def ids(q):
        lst = valid("JobList", c.ok("GET", "/v1/jobs" + q), q)["jobs"]
        return [j["id"] for j in lst]
    assert ids("?image=fa") == [done[0], done[2]], ids("?image=fa")
    assert ids("?image=fb") == [done[1], queued], ids("?image=fb")
    assert ids("?status=paused") == [run], ids("?status=paused")
    assert ids("?status=concluded&image=fb") == [done[1], queued]
    assert ids("?image=big&status=concluded") == []
    assert ids("?image=nothing") == []
    for q, word in (("?status=bogus", "bogus"), ("?status=", "status"), ("?image=a/b", "image")):
        st, h, b = c.call("GET", "/v1/jobs" + q)
        assert st == 400 and word in json.loads(b)["error"]["message"], (q, st, b)
    c.ok("POST", "/v1/jobs/%s/cancel" % run)
    c.wait(run)


def auto_dismiss(c):
    """--job-retention 1: a concluded job is gone a second later, announced."""
    c.start("--job-retention", "1")
    c.image("ad")
    s = c.stream()
    time.sleep(0.2)
    jid = c.start_job("/v1/images/ad/check")
    c.wait(jid)
    t = time.time() + 10
    while time.time() < t:
        st, h, b = c.call("GET", "/v1/jobs/" + jid)
        if st == 404:
            break
        time.sleep(0.05)
    assert st == 404, "job %s still there after 10 s" % jid
    ev = s.wait(lambda e: any(x[0] == "job-dismissed" for x in e), what="job-dismissed")
    check_order(ev)


def records_bounded(c):
    """--max-job-records 3: the oldest concluded records go (and are announced)."""
    c.start("--max-job-records", "3", "--job-retention", "0")
    c.image("rb")
    ids = []
    for _ in range(5):
        ids.append(c.start_job("/v1/images/rb/check"))
        c.wait(ids[-1])
    lst = [j["id"] for j in c.ok("GET", "/v1/jobs")["jobs"]]
    assert lst == ids[2:], lst
    c.d.stop_clean()
    c.d = None
    with open(os.path.join(c.cat, JOBS_FILE)) as f:
        rec = json.load(f)
    assert rec["format"] == "qcowd-jobs" and rec["version"] == 1, rec
    assert [j["id"] for j in rec["jobs"]] == ids[2:], rec
    c.start("--max-job-records", "3", "--job-retention", "0")
    lst = [j["id"] for j in c.ok("GET", "/v1/jobs")["jobs"]]
    assert lst == ids[2:], lst


def records_versions(c):
    """A records file of another version, of the older unversioned shape, or
    garbage: qcowd starts with no jobs, says why on stderr, and sets the file
    aside unchanged (PATH.rejected) instead of overwriting it."""
    path = os.path.join(c.cat, JOBS_FILE)
    cases = [
        (b'{"format": "qcowd-jobs", "version": 7, "next-id": 5, "jobs": []}', "version 7"),
        (b'{"next-id": 3, "jobs": [{"id": "1", "type": "check", "image": "a", "status": "concluded"}]}',
         "qcowd-jobs"),
        (b"\x00\x01garbage{{{", "not JSON"),
    ]
    for text, word in cases:
        with open(path, "wb") as f:
            f.write(text)
        d = c.start()
        assert c.ok("GET", "/v1/jobs") == {"jobs": []}
        c.image("rv")
        jid = c.start_job("/v1/images/rv/check")
        assert jid == "1", "the first job has id %s: the rejected records were read" % jid
        c.wait(jid)
        said = [ln for ln in d.lines if "job records" in ln]
        assert said and word in said[0] and "set aside" in said[0], d.lines[-5:]
        with open(path + ".rejected", "rb") as f:
            assert f.read() == text
        d.stop_clean()
        c.d = None
        os.remove(path + ".rejected")
        os.remove(os.path.join(c.cat, "rv.qcow2"))


CASES = [
    ("events_in_order", events_in_order),
    ("replay_after_disconnect", replay_after_disconnect),
    ("lost_when_history_overflowed", lost_when_history_overflowed),
    ("paused_job_frees_the_worker", paused_job_frees_the_worker),
    ("pause_answers_once_stopped", pause_answers_once_stopped),
    ("filters", filters),
    ("auto_dismiss", auto_dismiss),
    ("records_bounded", records_bounded),
    ("records_versions", records_versions),
]


def run_case(root, name, fn):
    def task():
        c = Case(root, name)
        problems, note = [], ""
        try:
            note = fn(c) or ""
        except Exception as e:
            import traceback
            problems.append((str(e) or repr(e), traceback.format_exc().splitlines()[-6:]))
        finally:
            try:
                c.close()
            except Exception as e:
                problems.append(("qcowd did not stop cleanly: %s" % e, []))
        return suite.Outcome(name, problems, c.folder, note)
    return task


def main():
    ap = argparse.ArgumentParser()
    suite.add_common_args(ap)
    args = ap.parse_args()
    if args.list:
        print("\n".join(n for n, _ in CASES))
        return 0
    rc = suite.check_needs({"QCOWD": dm.QCOWD}, (dm.QEMU_IMG, dm.QEMU_IO))
    if rc is not None:
        return rc
    picked = suite.select(CASES, args.k)
    if picked is None:
        return suite.USAGE
    with suite.Scratch("qcowd-races-", args.keep) as scratch:
        passed, failed, _ = suite.run_all(scratch, [run_case(scratch.root, n, f) for n, f in picked], args.j)
    return suite.summary(passed, failed)


if __name__ == "__main__":
    sys.exit(main())
