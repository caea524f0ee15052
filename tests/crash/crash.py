#!/usr/bin/python3
"""crash.py: kills the engine mid-write and proves the image survives.

Each case makes one image of a kind (default, extended L2, lazy refcounts, 512-byte
clusters with 1-bit refcounts so refcount blocks keep being added, 512-byte clusters
with 64-bit refcounts so the refcount table keeps growing, an overlay on a backing
file, an image whose clusters and L2 tables an internal snapshot shares) and runs
rounds. A round:
  1. starts `crash_writer run` (random writes, zero writes, discards through the
     engine; qcow2_flush every 1..8 ops, each completed flush journaled and fsynced)
     and SIGKILLs it after a seeded random delay;
  2. unless the image carries the dirty bit (lazy refcounts: refcounts may lag until
     a read-write open rebuilds them), `qemu-img check` must find no corruptions
     (leaks are allowed: exit 0 or 3) and `qcowimg check` must agree, corruptions
     and leak count both (except leaks of clusters past the end of the file, which
     qemu-img check does not look at: a write that failed before it could extend
     the file leaves those);
  3. qemu's view of the guest disk (`qemu-img convert -O raw`) must hold every op up
     to the last journaled flush, and for bytes that ops after it touched, either
     that state or one of those ops' values (crash_writer verify explains the rule);
  4. on most rounds the image must take writes again: `crash_writer run` for a few
     ops with a clean close (this read-write open rebuilds the refcounts of a dirty
     image), then `qemu-img compare` with the exact expected disk, and `qemu-img
     check` clean (exit 0 after a rebuild; otherwise no corruptions and no new leaks).
     The lazy-refcounts case skips this step on odd rounds, so the next killed run
     opens a dirty image and may be killed while it rebuilds.
At the end of a case `qcowimg check -r leaks` must leave an image that both checks
call clean. The snapshot case also proves after every step that the internal
snapshot still reads as it did.

The sweep cases replace the random kill by every crash point in turn: a fixed run of
ops is made once to count the calls that change storage (writes, flushes, truncates,
discards); then for each N the image is restored and crash_writer dies just before
call N (CRASH_DIE_AT), which leaves exactly the state a kill at that instant leaves;
each state is judged as above (and every few points, and always after a dirty one,
written again). The fail sweeps make call N fail with EIO instead and die a few
changing calls later (CRASH_FAIL_AT, CRASH_DIE_AFTER): the engine's handling of a
storage error must not leave a state a crash turns into corruption. Sweeps with more
points than --max-points test a seeded sample (the first and last few always).

Environment: QCOWIMG, CRASH_WRITER (required), QEMU_IMG, QEMU_IO (default qemu-img, qemu-io).
Usage: crash.py [-k NAME]... [-j N] [--seed N] [--rounds X] [--max-points N] [--keep] [--list]
Prints `ok NAME (K kills, ...)` or `FAIL NAME: reason` per case, then
`N passed, M failed`; exits 1 if anything failed, 2 on bad usage, 77 without qemu-img.
"""

import argparse
import json
import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import suite  # noqa: E402

KiB = 1024
MiB = 1024 * KiB

QCOWIMG = os.environ.get("QCOWIMG", "")
WRITER = os.environ.get("CRASH_WRITER", "")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")
CMD_TIMEOUT = 300

# (name, image kind, mode, rounds or points): mode "kill" runs rounds of random
# SIGKILLs, "die" and "fail" sweep crash points (at most that many).
CASES = [
    ("default", "default", "kill", 8),
    ("extended-l2", "extl2", "kill", 7),
    ("lazy-refcounts", "lazy", "kill", 8),
    ("rc1-512", "rc1", "kill", 7),
    ("rc64-512", "rc64", "kill", 7),
    ("overlay", "overlay", "kill", 7),
    ("snapshot", "snapshot", "kill", 7),
    ("sweep-default", "default", "die", 40),
    ("sweep-extended-l2", "extl2", "die", 30),
    ("sweep-snapshot", "snapshot", "die", 40),
    ("sweep-lazy-refcounts", "lazy", "die", 30),
    ("sweep-overlay", "overlay", "die", 30),
    ("sweep-rc64-512", "rc64", "die", 30),
    ("sweep-fail-default", "default", "fail", 30),
    ("sweep-fail-snapshot", "snapshot", "fail", 30),
]
DIE_EXIT = 75


class SetupError(Exception):
    pass


class Failure(Exception):
    def __init__(self, reason, *details):
        super().__init__(reason)
        self.reason, self.details = reason, list(details)


def human_cmd(argv, cwd=None, env=None):
    s = " ".join(shlex.quote(str(a)) for a in argv)
    if env:
        s = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + s
    return f"(cd {shlex.quote(cwd)} && {s})" if cwd else s


def no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(argv, cwd, ok=(0,), what=None, env=None):
    """Runs argv (with env added to the environment); returns (rc, stdout text,
    stderr text). An exit status not in ok raises Failure named by what, or
    SetupError when what is None."""
    e = dict(os.environ, LC_ALL="C")
    for k in ("CRASH_DIE_AT", "CRASH_FAIL_AT", "CRASH_DIE_AFTER", "CRASH_COUNT_FILE"):
        e.pop(k, None)
    e.update(env or {})
    p = subprocess.run([str(a) for a in argv], cwd=cwd, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=CMD_TIMEOUT,
                       preexec_fn=no_core, env=e)
    out, err = p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
    if ok is not None and p.returncode not in ok:
        msg = f"{human_cmd(argv, cwd)} exited {p.returncode}"
        lines = [f"command: {human_cmd(argv, cwd)}"] + \
            [f"stdout: {l}" for l in out.strip().splitlines()[:15]] + \
            [f"stderr: {l}" for l in err.strip().splitlines()[:15]]
        if what is None:
            raise SetupError(f"{msg}: {err.strip()[:400]}")
        raise Failure(f"{what}: exit {p.returncode}", *lines)
    return p.returncode, out, err


def last_number(path):
    """The last complete line of a journal, as an int (0 when there is none)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    lines = data.split(b"\n")[:-1]   # a line is complete only with its newline
    return int(lines[-1]) if lines else 0


class Case:
    def __init__(self, name, kind, mode, rounds, d, rng):
        self.name, self.kind, self.mode, self.rounds, self.dir, self.rng = name, kind, mode, rounds, d, rng
        self.img = "img.qcow2"
        self.kills = self.dirty_kills = self.flushed_kills = self.max_ops = 0
        self.leaks_seen = 0
        self.total_points = 0
        self.snap_ref = None
        self.leaks_past_eof = 0   # leaks only qcowimg check sees (past the end of the file)

    def p(self, name):
        return os.path.join(self.dir, name)

    # -- setup ------------------------------------------------------------
    def setup(self):
        opts = {"default": None, "extl2": "extended_l2=on", "lazy": "lazy_refcounts=on",
                "rc1": "cluster_size=512,refcount_bits=1",
                "rc64": "cluster_size=512,refcount_bits=64", "overlay": None,
                "snapshot": "cluster_size=16384"}[self.kind]
        # sweeps restore and judge the disk at every point: small disks keep that quick
        size = 8 * MiB if self.mode != "kill" else 16 * MiB if self.kind in ("rc1", "rc64") else 32 * MiB
        if self.kind == "overlay":
            run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
                 "base.qcow2", str(size)], self.dir)
            cmds = []
            for i in range(24):   # backing data the overlay's COW must copy up
                off = self.rng.randrange(0, size - 300 * KiB)
                cmds += ["-c", f"write -q -P {i + 1} {off} {self.rng.randint(1, 300 * KiB)}"]
            run([QEMU_IO, *cmds, "base.qcow2"], self.dir)
            argv = [QCOWIMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", self.img]
        else:
            argv = [QCOWIMG, "create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) + \
                [self.img, str(size)]
        run(argv, self.dir, what="qcowimg create")
        info = self.info()
        self.size, self.cs = info["virtual-size"], info["cluster-size"]
        self.lazy = info["format-specific"]["data"].get("lazy-refcounts", False)
        run([QEMU_IMG, "convert", "-O", "raw", self.img, "base.raw"], self.dir)
        if self.kind == "snapshot":
            # data in the first eighth (where half the ops go), then a snapshot that
            # shares every cluster and L2 table: writes copy, discards drop references
            self.write_again("setup", False, count=40, every=40)
            run([QEMU_IMG, "snapshot", "-c", "s1", self.img], self.dir)
            run([QEMU_IMG, "convert", "-l", "snapshot.name=s1", "-O", "raw", self.img, "snap-s1.raw"], self.dir)
            self.snap_ref = "snap-s1.raw"

    def check_snapshot(self, label):
        if not self.snap_ref:
            return
        run([QEMU_IMG, "convert", "-U", "-l", "snapshot.name=s1", "-O", "raw", self.img, "snap-now.raw"], self.dir)
        argv = [QEMU_IMG, "compare", "-f", "raw", "-F", "raw", self.snap_ref, "snap-now.raw"]
        rc, out, err = run(argv, self.dir, ok=None)
        if rc != 0:
            raise Failure(f"{label}: snapshot s1 changed ({out.strip() or err.strip()})",
                          f"command: {human_cmd(argv, self.dir)}")

    def info(self):
        _, out, _ = run([QEMU_IMG, "info", "--output=json", "-U", self.img], self.dir)
        return json.loads(out)

    # -- checks -------------------------------------------------------------
    def qemu_check(self, label, allowed):
        rc, out, err = run([QEMU_IMG, "check", "--output=json", self.img], self.dir, ok=None)
        try:
            r = json.loads(out)
        except ValueError:
            r = {}
        if rc not in allowed:
            _, hout, _ = run([QEMU_IMG, "check", self.img], self.dir, ok=None)
            raise Failure(f"{label}: qemu-img check exit {rc} (want {'/'.join(map(str, allowed))})",
                          f"command: {human_cmd([QEMU_IMG, 'check', self.img], self.dir)}",
                          *[f"  {l}" for l in (hout + err).strip().splitlines()[:25]])
        return r.get("corruptions", 0), r.get("leaks", 0)

    def qcowimg_check(self, label, want_leaks):
        argv = [QCOWIMG, "check", "--output=json", self.img]
        rc, out, err = run(argv, self.dir, ok=None)
        try:
            r = json.loads(out)
        except ValueError:
            raise Failure(f"{label}: qcowimg check exit {rc}, output not JSON",
                          f"command: {human_cmd(argv, self.dir)}", f"stderr: {err.strip()[:400]}")
        c, l = r.get("corruptions", 0), r.get("leaks", 0)
        if not c and rc in (0, 3) and l != want_leaks:
            # qemu-img check counts only clusters inside the file: a cluster whose
            # refcount was raised before a failed write could extend the file is a
            # leak qcowimg reports and qemu cannot see. Only those may differ.
            _, hout, herr = run([QCOWIMG, "check", self.img], self.dir, ok=None)
            cs, fsize = self.cs, os.path.getsize(self.p(self.img))
            leaked = [int(x.split()[2]) for x in hout.splitlines() + herr.splitlines()
                      if x.startswith("Leaked cluster ")]
            if len(leaked) == l and sum(1 for n in leaked if n * cs < fsize) == want_leaks:
                self.leaks_past_eof += l - want_leaks
                return l
        if c or rc not in (0, 3) or l != want_leaks:
            _, hout, herr = run([QCOWIMG, "check", self.img], self.dir, ok=None)
            raise Failure(f"{label}: qcowimg check disagrees with qemu-img check: exit {rc}, "
                          f"{c} corruptions, {l} leaks (qemu-img: 0 corruptions, {want_leaks} leaks)",
                          f"command: {human_cmd(argv, self.dir)}",
                          *[f"  {x}" for x in (hout + herr).strip().splitlines()[:25]])
        return l

    def both_checks(self, label, allowed=(0, 3)):
        c, leaks = self.qemu_check(label, allowed)
        return self.qcowimg_check(label, leaks)

    def compare(self, label, ref):
        argv = [QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", ref, self.img]
        rc, out, err = run(argv, self.dir, ok=None)
        if rc != 0:
            raise Failure(f"{label}: guest data differs from the expected disk ({out.strip() or err.strip()})",
                          f"command: {human_cmd(argv, self.dir)}")

    # -- one round --------------------------------------------------------
    def kill_round(self, r):
        seed = self.rng.getrandbits(48)
        every = self.rng.randint(1, 8)
        journal, progress = f"journal{r}", f"progress{r}"
        argv = [WRITER, "run", self.img, seed, 1, 0, every, journal, progress]
        delay = self.rng.uniform(0.02, 0.35)
        label = f"round {r} (seed {seed}, flush every {every}, kill after {delay:.3f}s)"
        errf = open(self.p(f"writer{r}.err"), "wb")
        proc = subprocess.Popen([str(a) for a in argv], cwd=self.dir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errf, preexec_fn=no_core)
        time.sleep(delay)
        early = proc.poll()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        errf.close()
        if early is not None:
            with open(self.p(f"writer{r}.err"), errors="replace") as f:
                raise Failure(f"{label}: the writer stopped by itself with exit {early}",
                              f"command: {human_cmd(argv, self.dir)}",
                              *[f"stderr: {l}" for l in f.read().strip().splitlines()[:20]])
        self.kills += 1
        dirty = self.judge(label, seed, journal, progress, f"round{r}", argv)
        if self.kind == "lazy" and r % 2 == 1:
            return   # the next killed run opens the image as the kill left it
        self.write_again(label, dirty)

    def judge(self, label, seed, journal, progress, tag, argv, env=None):
        """The checks after a crash: returns whether the image had the dirty bit.
        Leaves the state's guest view as base.raw."""
        n, k = last_number(self.p(journal)), last_number(self.p(progress))
        self.max_ops = max(self.max_ops, k)
        if n:
            self.flushed_kills += 1
        label += f", {n} ops flushed, {k} started"
        dirty = self.info().get("dirty-flag", False)
        if dirty:
            if not self.lazy:
                raise Failure(f"{label}: the image has the dirty bit set without lazy refcounts")
            self.dirty_kills += 1
        else:
            self.leaks_seen = self.both_checks(f"{label}: after the crash")
        self.check_snapshot(label)
        run([QEMU_IMG, "convert", "-U", "-O", "raw", self.img, "actual.raw"], self.dir)
        rc, out, err = run([WRITER, "verify", seed, self.size, self.cs, "base.raw", "actual.raw", n, k],
                           self.dir, ok=None)
        if rc != 0:
            os.replace(self.p("base.raw"), self.p(f"base-before-{tag}.raw"))
            raise Failure(f"{label}: guest data after the crash is wrong",
                          f"writer: {human_cmd(argv, self.dir, env)}",
                          f"judge: {human_cmd([WRITER, 'verify', seed, self.size, self.cs, f'base-before-{tag}.raw', 'actual.raw', n, k], self.dir)}",
                          *out.strip().splitlines()[:20], *err.strip().splitlines()[:5])
        os.replace(self.p("actual.raw"), self.p("base.raw"))
        return dirty

    def write_again(self, label, was_dirty, count=None, every=None):
        seed = self.rng.getrandbits(48)
        count = count or self.rng.randint(2, 12)
        for f in ("journal-again", "progress-again"):
            if os.path.exists(self.p(f)):
                os.unlink(self.p(f))
        argv = [WRITER, "run", self.img, seed, 1, count, every or self.rng.randint(1, 4),
                "journal-again", "progress-again"]
        label = f"{label}; writing again (seed {seed}, {count} ops)"
        run(argv, self.dir, what=f"{label}: crash_writer run")
        run([WRITER, "expect", seed, self.size, self.cs, "base.raw", "expect.raw", 1, count], self.dir)
        self.compare(label, "expect.raw")
        if was_dirty:   # the read-write open rebuilt the refcounts: nothing may be left
            self.both_checks(f"{label}: after the rebuild", allowed=(0,))
        else:
            before = self.leaks_seen
            leaks = self.both_checks(label)
            if leaks > before:
                raise Failure(f"{label}: {leaks} leaked clusters, {before} before the writes: "
                              "a clean write session leaked")
            self.leaks_seen = leaks
        if self.info().get("dirty-flag", False):
            raise Failure(f"{label}: dirty bit still set after a clean close")
        self.check_snapshot(label)
        os.replace(self.p("expect.raw"), self.p("base.raw"))

    # -- sweeps -----------------------------------------------------------
    def sweep(self):
        """Every crash point of one fixed run (or a sample of them)."""
        self.write_again("preparing", False, count=30, every=30)   # clusters to overwrite and free
        with open(self.p(self.img), "rb") as f:
            pristine = f.read()
        os.replace(self.p("base.raw"), self.p("pristine.raw"))
        seed, count, every = self.rng.getrandbits(48), 10, 3

        def restore():
            with open(self.p(self.img), "wb") as f:
                f.write(pristine)
            shutil.copyfile(self.p("pristine.raw"), self.p("base.raw"))
            for f in ("journal", "progress", "count"):
                if os.path.exists(self.p(f)):
                    os.unlink(self.p(f))

        restore()
        argv = [WRITER, "run", self.img, seed, 1, count, every, "journal", "progress"]
        run(argv, self.dir, what="counting run", env={"CRASH_COUNT_FILE": "count"})
        with open(self.p("count")) as f:
            total = int(f.read())
        run([WRITER, "expect", seed, self.size, self.cs, "pristine.raw", "expect.raw", 1, count], self.dir)
        self.compare("counting run", "expect.raw")
        self.total_points = total
        points = list(range(1, total + 1))
        if len(points) > self.rounds:
            edge = points[:3] + points[-3:]
            points = sorted(set(edge) | set(self.rng.sample(points[3:-3], self.rounds - len(edge))))
        for i, n in enumerate(points):
            restore()
            if self.mode == "die":
                env = {"CRASH_DIE_AT": str(n)}
            else:
                env = {"CRASH_FAIL_AT": str(n), "CRASH_DIE_AFTER": str(self.rng.randint(1, 8))}
            label = f"crash point {n} of {total} ({' '.join(f'{k}={v}' for k, v in env.items())})"
            rc, out, err = run(argv, self.dir, ok=None, env=env)
            if "Sanitizer" in err or "runtime error:" in err or rc < 0:
                raise Failure(f"{label}: crash_writer crashed (exit {rc})",
                              f"command: {human_cmd(argv, self.dir, env)}",
                              *[f"stderr: {l}" for l in err.strip().splitlines()[:30]])
            want = (DIE_EXIT,) if self.mode == "die" else (DIE_EXIT, 0, 1)
            if rc not in want:
                raise Failure(f"{label}: crash_writer exit {rc}, want {'/'.join(map(str, want))}",
                              f"command: {human_cmd(argv, self.dir, env)}",
                              *[f"stderr: {l}" for l in err.strip().splitlines()[:10]])
            self.kills += 1
            dirty = self.judge(label, seed, "journal", "progress", f"point{n}", argv, env)
            if dirty or i % 4 == 0:
                self.write_again(label, dirty)

    def run_all(self):
        self.setup()
        if self.mode == "kill":
            for r in range(self.rounds):
                self.kill_round(r)
        else:
            self.sweep()
        # leave it clean: repair the leaks, then both checks must say nothing
        run([QCOWIMG, "check", "-r", "leaks", self.img], self.dir, ok=(0, 3), what="qcowimg check -r leaks")
        self.both_checks("after check -r leaks", allowed=(0,))
        self.compare("after check -r leaks", "base.raw")


def run_case(name, kind, mode, rounds, root, seed):
    t0 = time.time()
    r = _run_case(name, kind, mode, rounds, root, seed)
    r[1].secs = time.time() - t0
    return r


def _run_case(name, kind, mode, rounds, root, seed):
    d = os.path.join(root, name)
    os.makedirs(d)
    c = Case(name, kind, mode, rounds, d, random.Random(f"{seed}:{name}"))
    try:
        c.run_all()
    except Failure as e:
        return name, c, (e.reason, e.details), d
    except SetupError as e:
        return name, c, (f"setup: {e}", []), d
    except subprocess.TimeoutExpired as e:
        return name, c, (f"timeout after {e.timeout}s: {human_cmd(e.cmd, d)}", []), d
    except Exception as e:   # a harness bug: a failure, never a pass
        return name, c, (f"harness error: {e!r}", traceback.format_exc().splitlines()), d
    return name, c, None, d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    suite.add_common_args(ap)
    ap.add_argument("--seed", type=int, default=int(os.environ.get("CRASH_SEED", "20240611")))
    ap.add_argument("--rounds", type=float, default=1.0, help="scale the rounds (kills) per kill case")
    ap.add_argument("--max-points", type=float, default=1.0, help="scale the points per sweep case")
    args = ap.parse_args()
    if args.list:
        print("\n".join(c[0] for c in CASES))
        return 0
    selected = suite.select(CASES, args.k)
    if selected is None:
        return suite.USAGE
    bad = suite.check_needs({"QCOWIMG": QCOWIMG, "CRASH_WRITER": WRITER}, (QEMU_IMG, QEMU_IO))
    if bad is not None:
        return bad
    def task(name, kind, mode, rounds, root):
        def run():
            scale = args.rounds if mode == "kill" else args.max_points
            name_, c, problem, d = run_case(name, kind, mode, max(7, round(rounds * scale)), root, args.seed)
            stats = (f"{c.kills} kills, {c.flushed_kills} after a flush, {c.dirty_kills} left dirty, "
                     f"up to {c.max_ops} ops per run")
            if c.mode != "kill":
                stats = f"{c.kills} of {c.total_points} crash points, " + stats.split(", ", 1)[1]
            if c.leaks_past_eof:
                stats += f", {c.leaks_past_eof} leaks past the end of the file"
            return suite.Outcome(name_, [problem] if problem else [], d, f"{stats}; {c.secs:.0f}s", c.kills)
        return run

    t0 = time.time()
    with suite.Scratch("qcowd-crash-", args.keep) as scratch:
        print(f"# seed {args.seed} (rerun with --seed {args.seed}); writer={WRITER}; dir {scratch.root}",
              flush=True)
        passed, failed, outs = suite.run_all(scratch, [task(*c, scratch.root) for c in selected], args.j)
    print(f"# {sum(o.count for o in outs)} kills in {time.time() - t0:.0f}s")
    return suite.summary(passed, failed)


if __name__ == "__main__":
    sys.exit(main())
