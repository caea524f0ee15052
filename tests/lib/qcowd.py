"""qcowd.py: the harness of the HTTP suites that run a live qcowd (tests/daemon,
jobs, bitmaps_http, clients, s3, bench_s3).

Qcowd starts one daemon on a free loopback port and stops it; Cases runs named
cases and prints `ok NAME` / `FAIL NAME: reason` and `N passed, M failed`;
prologue() and remove_temp() are the start and the end of such a suite's main().
The checks of binaries and tools are suite.py's (check_needs).

Use from a suite:

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
    import qcowd
"""
import argparse
import http.client
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback

import suite

QCOWD = os.environ.get("QCOWD", "")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")
DEFAULT_SEED = 20261124

LISTENING = re.compile(r"listening on https?://127\.0\.0\.1:(\d+)/")
SANITIZER_MARKS = ("Sanitizer", "runtime error")  # ASan/LSan/TSan reports, UBSan's lines


class Qcowd:
    """`binary --listen 127.0.0.1:0 ARGS...`, its stdout discarded.

    When the constructor returns, port is the port it listens on and url its base
    URL; lines fills with its stderr lines (a thread, pump, reads them, so a
    chatty daemon never blocks). If it does not say where it listens within 60 s
    it is killed and RuntimeError raised with its stderr, unless expect_fail:
    then port is None and the process is the caller's to wait for."""

    def __init__(self, binary, args, env=None, expect_fail=False):
        self.proc = subprocess.Popen([binary, "--listen", "127.0.0.1:0"] + list(args),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self.lines = []
        self.port = None
        ready = threading.Event()

        def pump():
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append(line)
                m = LISTENING.search(line)
                if m:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        self.pump = threading.Thread(target=pump, daemon=True)
        self.pump.start()
        ready.wait(60)
        if not self.port and not expect_fail:
            self.proc.kill()
            raise RuntimeError("qcowd did not start:\n" + "\n".join(self.lines))

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def conn(self, timeout=120):
        """A new connection to the daemon; the caller closes it."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def exchange(self, method, path, body=None, headers=None, conn=None):
        """One request and its whole answer: (status, {lower-case name: value}, body
        bytes). On conn when given (left open), else on a connection of its own."""
        c = conn or self.conn()
        headers = dict(headers or {})
        if body is not None and method in ("POST", "PATCH") and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"  # the JSON endpoints ask for it (else 415)
        try:
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            data = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        finally:
            if conn is None:
                c.close()

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=90):
        """Sends sig unless it has exited already, waits for the exit (up to timeout
        s, else subprocess.TimeoutExpired) and for its last stderr line; the exit
        status."""
        if self.alive():
            self.proc.send_signal(sig)
        return self.wait_log(timeout)

    def wait_log(self, timeout=90):
        """Waits for the exit (a signal the caller sent) and its last stderr line;
        the exit status."""
        rc = self.proc.wait(timeout)
        self.pump.join(10)
        return rc

    def check_clean_exit(self, timeout=90):
        """Waits for the exit (the caller sent the signal); AssertionError unless it
        exited 0 with no sanitizer report or UBSan `runtime error` in its stderr."""
        rc = self.wait_log(timeout)
        assert rc == 0, "exit status %d: %s" % (rc, self.lines[-5:])
        bad = [ln for ln in self.lines if any(mark in ln for mark in SANITIZER_MARKS)]
        assert not bad, bad[:5]

    def stop_clean(self, timeout=90):
        """SIGTERM, then check_clean_exit()."""
        self.proc.send_signal(signal.SIGTERM)
        self.check_clean_exit(timeout)

    def kill(self):
        """SIGKILL if it still runs; it is reaped either way."""
        if self.alive():
            self.proc.kill()
        self.proc.wait()


class Cases:
    """Named cases run one after the other. case() prints `ok NAME`, or `FAIL NAME:
    reason` and the traceback indented, and counts it; an exception never escapes.
    rng is seeded with seed, so a run repeats with --seed."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.passed = self.failed = 0

    def case(self, name, fn):
        try:
            fn()
            self.passed += 1
            print("ok", name, flush=True)
        except Exception as e:
            self.failed += 1
            print("FAIL %s: %s" % (name, e), flush=True)
            for line in traceback.format_exc().splitlines():
                print("    " + line)

    def setup_failed(self):
        """Counts a failure outside any case (building images, starting qcowd) and
        prints `FAIL setup:` with the traceback; call it from an except block."""
        self.failed += 1
        print("FAIL setup:", flush=True)
        traceback.print_exc(file=sys.stdout)

    def summary(self):
        """Prints `N passed, M failed`, the line CTest logs are read for; the exit status."""
        print("%d passed, %d failed" % (self.passed, self.failed))
        return 1 if self.failed else 0


def parse_args(seed=DEFAULT_SEED):
    """--seed N (default $SEED, else seed) and --keep."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=int(os.environ.get("SEED", seed)))
    ap.add_argument("--keep", action="store_true")
    return ap.parse_args()


def prologue(prefix, tools=(QEMU_IMG, QEMU_IO), seed=DEFAULT_SEED, binaries=None):
    """The start of a suite's main(): the options (parse_args), the checks
    (suite.check_needs: binaries defaults to {"QCOWD": QCOWD}; SystemExit 2 when
    one is not runnable, 77 when a tool is missing), then a new temporary folder
    and an empty catalog/ in it. Returns (args, top, catalog)."""
    args = parse_args(seed)
    rc = suite.check_needs(binaries or {"QCOWD": QCOWD}, tools)
    if rc is not None:
        raise SystemExit(rc)
    top = tempfile.mkdtemp(prefix=prefix)
    catalog = os.path.join(top, "catalog")
    os.mkdir(catalog)
    return args, top, catalog


def slow_raw(path):
    """A 160 MiB raw file of half-random clusters: converting it to compressed qcow2
    takes seconds (for suites that need a job that is still running)."""
    r = random.Random(7)
    with open(path, "wb") as f:
        blob = r.randbytes(4 * 1024 * 1024)
        for i in range(40):
            for c in range(64):
                k = (i * 64 + c) * 977 % (4 * 1024 * 1024 - 32 * 1024)
                f.write(blob[k:k + 24 * 1024] + bytes(40 * 1024))


def finish(cases, daemon, top, keep):
    """The end of a suite's main() with one daemon: stops it (a dirty exit or a
    sanitizer report counts as a failure), removes top, returns the exit status."""
    try:
        daemon.stop_clean()
    except AssertionError as e:
        print("FAIL qcowd exit:", e)
        cases.failed += 1
    remove_temp(top, keep)
    return cases.summary()


def remove_temp(top, keep):
    """The end of a suite's main(): removes top, or with keep says `kept TOP`."""
    if keep:
        print("kept", top)
    else:
        shutil.rmtree(top, ignore_errors=True)
