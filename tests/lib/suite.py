"""suite.py: the parts every case-based test suite here shares.

A suite is a list of named cases run in parallel threads, each in its own folder
under one temporary root. This module picks the cases (-k), checks the binaries
and tools the suite needs, owns the temporary root (removed when everything
passed, kept otherwise or with --keep, removed on SIGINT/SIGTERM too), runs the
cases and prints one `ok NAME (note)` or `FAIL NAME: reason` line per case plus
the `N passed, M failed` summary the CTest logs are read for.

Use from a suite (tests/<suite>/<suite>.py):

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
    import suite
"""
import concurrent.futures
import os
import shutil
import signal
import sys
import tempfile
import traceback

SKIP = 77   # CTest SKIP_RETURN_CODE of every suite
USAGE = 2


class Outcome:
    """What one case reports: problems is a list of (reason, [detail lines]);
    empty means the case passed. note goes in parentheses after the name; count
    is a number the suite sums over its cases (kills, fault points...)."""

    def __init__(self, name, problems=(), folder=None, note="", count=0):
        self.name = name
        self.problems = list(problems)
        self.folder = folder
        self.note = note
        self.count = count


def add_common_args(ap, what="case", parallel=None):
    """-k, -j, --keep and --list, the options every suite takes."""
    ap.add_argument("-k", action="append", default=[], metavar="NAME",
                    help=f"run only this {what} (exact name, else every {what} containing it)")
    ap.add_argument("-j", type=int, default=parallel or min(2, os.cpu_count() or 1),
                    help=f"{what}s run in parallel")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--list", action="store_true", help=f"list the {what}s and exit")


def select(cases, ks, what="case"):
    """The cases (tuples whose [0] is the name) that -k names pick, in the order
    given: an exact name, else every case whose name contains it. None (after a
    message) when a -k matches nothing."""
    names = [c[0] for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    if not ks:
        return list(cases)
    picked = []
    for k in ks:
        found = [c for c in cases if c[0] == k] or [c for c in cases if k in c[0]]
        if not found:
            print(f"no {what} matches {k!r}", file=sys.stderr)
            return None
        picked += [c for c in found if c not in picked]
    return picked


def check_needs(binaries=None, tools=()):
    """None when everything is there; else the exit code after a message:
    USAGE when an environment variable does not name a runnable binary of ours
    (binaries: {VAR: value}), SKIP when an outside tool (qemu-img...) is missing."""
    for var, val in (binaries or {}).items():
        if not val or not shutil.which(val):
            print(f"{var} is not set to a runnable binary", file=sys.stderr)
            return USAGE
    for tool in tools:
        if not shutil.which(tool):
            print(f"cannot run {tool}: skipping (install it: scripts/install-deps.sh --test)", file=sys.stderr)
            return SKIP
    return None


class Scratch:
    """The temporary root of one run. Leaving the with-block removes it unless
    --keep or a case failed (then it says where it is); SIGINT/SIGTERM remove it
    too (unless --keep) and exit at once, worker threads with us."""

    def __init__(self, prefix, keep):
        self.keep = keep
        self.failed = 0
        self.root = tempfile.mkdtemp(prefix=prefix)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        print(f"# interrupted by signal {signum}; "
              + (f"files kept in {self.root}" if self.keep else f"removed {self.root}"), flush=True)
        os._exit(128 + signum)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.keep or self.failed or exc[0] is not None:
            print(f"# files kept in {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        return False


def run_all(scratch, tasks, jobs):
    """Run tasks (callables returning an Outcome) on `jobs` threads and print one
    line per case in the tasks' order. A task that raises is a failure, never a
    pass. A passed case's folder goes at once unless --keep. Returns (passed,
    failed, outcomes) and counts failures into scratch.failed."""
    passed = failed = 0
    outcomes = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = [pool.submit(t) for t in tasks]
        for fut in futs:
            try:
                o = fut.result()
            except Exception as e:
                o = Outcome("?", [(f"harness error: {e!r}", traceback.format_exc().splitlines())])
            outcomes.append(o)
            note = f" ({o.note})" if o.note else ""
            if not o.problems:
                passed += 1
                print(f"ok {o.name}{note}", flush=True)
                if o.folder and not scratch.keep:
                    shutil.rmtree(o.folder, ignore_errors=True)
                continue
            failed += 1
            more = f" (+{len(o.problems) - 1} more)" if len(o.problems) > 1 else ""
            print(f"FAIL {o.name}: {o.problems[0][0]}{more}{note}")
            for reason, details in o.problems:
                if len(o.problems) > 1:
                    print(f"    - {reason}")
                for line in details:
                    print(f"        {line}")
            if o.folder:
                print(f"        files: {o.folder}")
            sys.stdout.flush()
    scratch.failed += failed
    return passed, failed, outcomes


def summary(passed, failed):
    """The last line CTest logs are read for; the exit code."""
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0
