#!/usr/bin/python3
"""hostile.py: hostile requests and hand-made images against a live qcowd.

Every case sends what an attacker would (deep paths, crafted qcow2 containers
built here byte by byte, floods of sockets, stalled clients) and checks the
status and JSON error, that the daemon stays up, that its RSS does not rise past
RSS_BUDGET_MIB during the case (VmHWM reset before each case), and that another
client, from another loopback address (127.0.0.2), keeps getting answers to its
ranged reads within PROBE_LIMIT_S all along.

The cases live in cases_*.py beside this file: each module has CASES, a list of
(name, function(suite)); the functions use the Hostile methods below.

Environment: QCOWD (the binary), QEMU_IMG, QEMU_IO.
Usage: hostile.py [--seed N] [--keep] [-k NAME]...
Prints `ok NAME (rss +N MiB, probe worst N ms)` / `FAIL NAME: reason`, then
`N passed, M failed`, and the worst figures of the whole run.
"""
import glob
import http.client
import importlib
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import qcowd  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
RSS_BUDGET_MIB = 64      # what one hostile case may add to qcowd's peak RSS
PROBE_LIMIT_S = 1.0      # the other client's worst answer time
PROBE = "probe"          # the image the other client reads
PROBE_ADDR = "127.0.0.2"


def run(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def qemu_img(*a):
    run(qcowd.QEMU_IMG, *a)


class Prober(threading.Thread):
    """Reads 64 KiB ranges of PROBE from PROBE_ADDR every 20 ms on a connection of
    its own (a new one after any failure); worst holds the longest answer time
    since the last reset, failures what went wrong."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.worst = 0.0
        self.failures = []
        self.count = 0
        self.lock = threading.Lock()

    def reset(self):
        """(worst answer time, failures, reads) since the last reset."""
        with self.lock:
            w, f, n = self.worst, self.failures, self.count
            self.worst, self.failures, self.count = 0.0, [], 0
        return w, f, n

    def run(self):
        c = None
        off = 0
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                if c is None:
                    c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10,
                                                   source_address=(PROBE_ADDR, 0))
                c.request("GET", "/v1/images/%s/data" % PROBE, headers={"Range": "bytes=%d-%d" % (off, off + 65535)})
                r = c.getresponse()
                data = r.read()
                if r.status != 206 or len(data) != 65536:
                    raise RuntimeError("status %d, %d bytes" % (r.status, len(data)))
                ok = None
            except Exception as e:  # noqa: BLE001
                ok = "%s: %s" % (type(e).__name__, e)
                if c is not None:
                    c.close()
                c = None
            dt = time.monotonic() - t0
            with self.lock:
                self.worst = max(self.worst, dt)
                self.count += 1
                if ok:
                    self.failures.append(ok)
            off = (off + 65536) % (4 * MiB)
            self.stop.wait(0.02)
        if c is not None:
            c.close()


class Hostile(qcowd.Cases):
    def __init__(self, args, top, cat):
        super().__init__(args.seed)
        self.top = top
        self.cat = cat
        self.d = None
        self.prober = None
        self.worst_rss = 0
        self.worst_probe = 0.0

    # ---- the daemon ----
    def start(self, *extra):
        """A new qcowd on the catalog (the old one stopped cleanly first), with the
        prober reading from another address."""
        self.stop_daemon()
        env = dict(os.environ)
        # ASan keeps freed memory in a quarantine (256 MiB by default), which would
        # read as RSS here: keep it small, so RSS says what qcowd itself holds.
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=8:malloc_context_size=5"
        self.d = qcowd.Qcowd(qcowd.QCOWD, ["--catalog", self.cat] + list(extra), env=env)
        self.prober = Prober(self.d.port)
        self.prober.start()

    def stop_daemon(self):
        if self.prober:
            self.prober.stop.set()
            self.prober.join(15)
            self.prober = None
        if self.d:
            d, self.d = self.d, None
            d.stop_clean()

    def rss_kib(self, field="VmRSS"):
        with open("/proc/%d/status" % self.d.proc.pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def reset_peak(self):
        """Resets VmHWM to the current RSS (Linux: 5 > clear_refs)."""
        with open("/proc/%d/clear_refs" % self.d.proc.pid, "w") as f:
            f.write("5")

    # ---- requests ----
    def path(self, name):
        return os.path.join(self.cat, name + ".qcow2")

    def call(self, method, path, body=None, headers=None, timeout=60):
        """One request on a connection of its own (qcowd.Qcowd.exchange, which sends
        a POST/PATCH body as JSON unless headers say otherwise)."""
        c = self.d.conn(timeout=timeout)
        try:
            return self.d.exchange(method, path, body=body, headers=headers, conn=c)
        finally:
            c.close()

    def error(self, method, path, want, body=None, headers=None):
        """The request answers status want (one of want when a tuple) with a JSON
        error; returns its message."""
        st, hdrs, data = self.call(method, path, body, headers)
        wants = want if isinstance(want, tuple) else (want,)
        assert st in wants, "%s %s: %d, want %s: %r" % (method, path, st, want, data[:300])
        if method == "HEAD":
            return ""
        j = json.loads(data)
        assert set(j) == {"error"} and j["error"]["code"] and j["error"]["message"], j
        msg = j["error"]["message"]
        assert all(0x20 <= ord(c) < 0x7f for c in msg), "message has raw bytes: %r" % msg
        assert self.top not in msg, "the server's own path is in the message: %r" % msg
        return msg

    def up(self):
        assert self.d.alive(), "qcowd died: %s" % self.d.lines[-10:]
        st, _, _ = self.call("GET", "/v1/health")
        assert st == 200, "health %d" % st

    def run_case(self, name, fn):
        def body():
            if self.d is None or not self.d.alive():
                self.start()
            self.prober.reset()
            base = self.rss_kib()
            self.reset_peak()
            fn(self)
            self.up()
            peak = self.rss_kib("VmHWM")
            worst, failures, reads = self.prober.reset()
            grew = (peak - base) / 1024.0
            self.worst_rss = max(self.worst_rss, grew)
            self.worst_probe = max(self.worst_probe, worst)
            print("   %s: rss +%.1f MiB (peak %.1f MiB), %d probe reads, worst %.0f ms" %
                  (name, grew, peak / 1024.0, reads, worst * 1000), flush=True)
            assert not failures, "the other client's reads failed: %s" % failures[:3]
            assert worst < PROBE_LIMIT_S, "the other client waited %.2f s for a read" % worst
            assert grew < RSS_BUDGET_MIB, "RSS rose by %.1f MiB (budget %d MiB)" % (grew, RSS_BUDGET_MIB)
        self.case(name, body)


def load_cases():
    cases = []
    for f in sorted(glob.glob(os.path.join(HERE, "cases_*.py"))):
        mod = importlib.import_module(os.path.basename(f)[:-3])
        cases += mod.CASES
    return cases


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=int(os.environ.get("SEED", qcowd.DEFAULT_SEED)))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("-k", action="append", default=[])
    args = ap.parse_args()
    import suite
    rc = suite.check_needs({"QCOWD": qcowd.QCOWD}, (qcowd.QEMU_IMG, qcowd.QEMU_IO))
    if rc is not None:
        return rc
    import tempfile
    top = tempfile.mkdtemp(prefix="qcowd-hostile-")
    cat = os.path.join(top, "catalog")
    os.mkdir(cat)
    s = Hostile(args, top, cat)
    try:
        qemu_img("create", "-q", "-f", "qcow2", s.path(PROBE), "4M")
        run(qcowd.QEMU_IO, "-f", "qcow2", "-c", "write -q -P 0x5a 0 4M", s.path(PROBE))
        cases = [c for c in load_cases() if not args.k or any(k in c[0] for k in args.k)]
        for name, fn in cases:
            s.run_case(name, fn)
        try:
            s.stop_daemon()
        except Exception as e:  # noqa: BLE001
            s.failed += 1
            print("FAIL stop: %s" % e)
    except Exception:  # noqa: BLE001
        s.setup_failed()
    finally:
        if s.d:
            s.d.kill()
        qcowd.remove_temp(top, args.keep or s.failed)
    print("hostile: worst RSS rise %.1f MiB, worst probe answer %.0f ms" % (s.worst_rss, s.worst_probe * 1000))
    return s.summary()


if __name__ == "__main__":
    sys.exit(main())
