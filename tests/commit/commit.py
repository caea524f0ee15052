#!/usr/bin/python3
"""commit.py: qcowimg commit against qemu-img commit, cancels, kills and faults.

Equal cases: a backing chain is built with qemu-img/qemu-io (two and three deep,
zero and discarded ranges, compressed clusters, extended L2, other cluster sizes
per layer, a raw base, a top larger or smaller than its base, a shorter image in
between, external data files, version 2, lazy refcounts, an internal snapshot in
top, a base whose own backing file is longer), copied twice; `qemu-img commit`
runs on one copy and `qcowimg commit` with the same options on the other. Then,
for every image of the chain, `qemu-img compare` between the copies (the guest
content each image presents, backing files included) must say identical,
`qemu-img check` must be clean on ours, and top must still read as before the
commit (it always does: emptied, it falls through to the updated base).

Cancel: `QCOWIMG_COMMIT_CANCEL_AT=BYTES` makes qcowimg's progress callback cancel
once that much is done; the command must fail with a message, top read as
before, both checks be clean, and a commit run afterwards give qemu's result.

Kill: qcowimg commit is SIGKILLed after seeded random delays (rounds), and, through
the fault filter, just before each of a sample of its storage writes
(QCOWD_FAULT=write:N:KILL, the state a kill at that instant leaves); the fail sweep
makes write N fail with EIO instead. After each: `qemu-img check` on top and base
finds no corruptions (leaks are allowed after a kill, not after a clean failure),
top reads exactly as before, and on some rounds a new commit completes and gives
qemu's result.

Environment: QCOWIMG (required), QEMU_IMG, QEMU_IO.
Usage: commit.py [-k NAME]... [-j N] [--seed N] [--keep] [--list]
Prints `ok NAME` or `FAIL NAME: reason` per case, then `N passed, M failed`; exits
1 on failure, 2 on bad usage, 77 without qemu-img/qemu-io.
"""

import argparse
import concurrent.futures
import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

KiB = 1024
MiB = 1024 * KiB
QCOWIMG = os.environ.get("QCOWIMG", "")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")
CMD_TIMEOUT = 300


class Failure(Exception):
    pass


def no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def human(argv, cwd, env=None):
    s = " ".join(shlex.quote(str(a)) for a in argv)
    if env:
        s = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + s
    return f"(cd {shlex.quote(cwd)} && {s})"


def run(argv, cwd, ok=(0,), env=None):
    e = dict(os.environ, LC_ALL="C")
    e.pop("QCOWD_FAULT", None)
    e.pop("QCOWIMG_COMMIT_CANCEL_AT", None)
    e.update(env or {})
    p = subprocess.run([str(a) for a in argv], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=CMD_TIMEOUT, preexec_fn=no_core, env=e)
    out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    if "Sanitizer" in err or "runtime error:" in err:
        raise Failure(f"sanitizer report from {human(argv, cwd, env)}:\n{err[:3000]}")
    if ok is not None and p.returncode not in ok:
        raise Failure(f"{human(argv, cwd, env)} exited {p.returncode}: {(out + err).strip()[:600]}")
    return p.returncode, out, err


# ---------------------------------------------------------------------------
# Chains. A builder makes the images in d and returns (top, [images top..bottom],
# {image: format}). Every builder's data is seeded by the qemu-io patterns only.

def qimg(d, *a):
    run([QEMU_IMG, *a], d)


def create(d, name, size=None, opts=None, backing=None, bfmt="qcow2"):
    argv = ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else [])
    if backing:
        argv += ["-b", backing, "-F", bfmt]
    qimg(d, *argv, name, *([str(size)] if size is not None else []))


def io(d, img, *cmds, fmt="qcow2"):
    argv = [QEMU_IO, "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    _, out, err = run(argv + [img], d)
    if "failed" in out + err or "error" in (out + err).lower():
        raise Failure(f"qemu-io {img}: {(out + err).strip()[:300]}")


def fill(d, img, size, pat, step=MiB, fmt="qcow2"):
    io(d, img, *[f"write -q -P {pat + i % 7} {o} {min(step, size - o)}" for i, o in enumerate(range(0, size, step))],
       fmt=fmt)


def messy(d, img, size, rng, pat=0x40, n=24, zero=True, discard=True, compress=False):
    """Writes of odd sizes and places, zero writes, discards (and compressed clusters)."""
    cmds = []
    for i in range(n):
        ln = rng.choice([512, 4 * KiB, 60 * KiB + 512, 200 * KiB, MiB + 4 * KiB])
        off = rng.randrange(0, size - ln) // 512 * 512
        cmds.append(f"write -q -P {pat + i} {off} {ln}")
    for i in range(n // 4 if zero else 0):
        ln = rng.choice([512, 64 * KiB, 300 * KiB, MiB])
        off = rng.randrange(0, size - ln) // 512 * 512
        cmds.append(f"write -q -z {off} {ln}")
    for i in range(n // 4 if discard else 0):
        ln = rng.choice([64 * KiB, 256 * KiB, MiB])
        off = rng.randrange(0, size - ln) // (64 * KiB) * (64 * KiB)
        cmds.append(f"discard -q {off} {ln}")
    if compress:   # first: qemu writes compressed clusters only where nothing is allocated
        offs = rng.sample(range(size // (64 * KiB)), 8)
        cmds = [f"write -q -c -P {pat + 100 + i} {o * 64 * KiB} 64k" for i, o in enumerate(offs)] + cmds
    io(d, img, *cmds)


def two_deep(top_opts=None, base_opts=None, size=8 * MiB, **kw):
    def build(d, rng):
        create(d, "base.qcow2", size, base_opts)
        fill(d, "base.qcow2", size, 0x10)
        create(d, "top.qcow2", None, top_opts, backing="base.qcow2")
        messy(d, "top.qcow2", size, rng, **kw)
        return "top.qcow2", ["top.qcow2", "base.qcow2"], {}
    return build


def three_deep(opts=(None, None, None), sizes=(8 * MiB, 8 * MiB, 8 * MiB)):
    def build(d, rng):
        create(d, "base.qcow2", sizes[2], opts[2])
        fill(d, "base.qcow2", sizes[2], 0x10)
        create(d, "mid.qcow2", sizes[1], opts[1], backing="base.qcow2")
        messy(d, "mid.qcow2", sizes[1], rng, pat=0x30, n=12)
        create(d, "top.qcow2", sizes[0], opts[0], backing="mid.qcow2")
        messy(d, "top.qcow2", sizes[0], rng, pat=0x60)
        return "top.qcow2", ["top.qcow2", "mid.qcow2", "base.qcow2"], {}
    return build


def raw_base(d, rng):
    with open(os.path.join(d, "base.raw"), "wb") as f:
        f.write(rng.randbytes(6 * MiB))
    create(d, "top.qcow2", 8 * MiB, "cluster_size=4096", backing="base.raw", bfmt="raw")
    messy(d, "top.qcow2", 8 * MiB, rng)
    return "top.qcow2", ["top.qcow2", "base.raw"], {"base.raw": "raw"}


def top_larger(d, rng):
    create(d, "base.qcow2", 3 * MiB + 512)
    fill(d, "base.qcow2", 3 * MiB + 512, 0x10, step=MiB + 512)
    create(d, "top.qcow2", 10 * MiB, backing="base.qcow2")
    messy(d, "top.qcow2", 10 * MiB, rng)
    io(d, "top.qcow2", "write -q -P 0x77 3M 4k", "write -q -P 0x78 9M 1M")
    return "top.qcow2", ["top.qcow2", "base.qcow2"], {}


def top_smaller(d, rng):
    create(d, "base.qcow2", 12 * MiB)
    fill(d, "base.qcow2", 12 * MiB, 0x10)
    create(d, "top.qcow2", 5 * MiB, backing="base.qcow2")
    messy(d, "top.qcow2", 5 * MiB, rng)
    return "top.qcow2", ["top.qcow2", "base.qcow2"], {}


def longer_backing_of_base(d, rng):
    # base (4 MiB) has a backing file of 8 MiB; top (8 MiB) over base: base grows,
    # and its new part must read zeroes, not its backing file's bytes
    create(d, "bb.qcow2", 8 * MiB)
    fill(d, "bb.qcow2", 8 * MiB, 0x20)
    create(d, "base.qcow2", 4 * MiB, backing="bb.qcow2")
    io(d, "base.qcow2", "write -q -P 0x31 1M 1M")
    create(d, "top.qcow2", 8 * MiB, backing="base.qcow2")
    io(d, "top.qcow2", "write -q -P 0x41 3M 2M", "write -q -P 0x42 7M 4k")
    return "top.qcow2", ["top.qcow2", "base.qcow2", "bb.qcow2"], {}


def data_files(d, rng):
    create(d, "base.qcow2", 8 * MiB, "data_file=base.data")
    fill(d, "base.qcow2", 8 * MiB, 0x10)
    create(d, "top.qcow2", 8 * MiB, "data_file=top.data", backing="base.qcow2")
    messy(d, "top.qcow2", 8 * MiB, rng)
    return "top.qcow2", ["top.qcow2", "base.qcow2"], {}


def snapshot_in_top(d, rng):
    create(d, "base.qcow2", 8 * MiB)
    fill(d, "base.qcow2", 8 * MiB, 0x10)
    create(d, "top.qcow2", None, backing="base.qcow2")
    messy(d, "top.qcow2", 8 * MiB, rng, n=10)
    qimg(d, "snapshot", "-c", "s1", "top.qcow2")
    messy(d, "top.qcow2", 8 * MiB, rng, pat=0x90, n=10)
    return "top.qcow2", ["top.qcow2", "base.qcow2"], {}


def compressed_base(d, rng):
    create(d, "base.qcow2", 8 * MiB)
    io(d, "base.qcow2", *[f"write -q -c -P {0x10 + i} {i * 64 * KiB} 64k" for i in range(128)])
    create(d, "top.qcow2", None, "cluster_size=4096", backing="base.qcow2")
    messy(d, "top.qcow2", 8 * MiB, rng, compress=False)
    return "top.qcow2", ["top.qcow2", "base.qcow2"], {}


# (name, builder, commit options)
CASES = [
    ("two-deep", two_deep(), []),
    ("two-deep-d", two_deep(), ["-d"]),
    ("two-deep-compressed", two_deep(compress=True), []),
    ("two-deep-no-zeroes", two_deep(zero=False, discard=False), []),
    ("extended-l2", two_deep("extended_l2=on", "extended_l2=on"), []),
    ("extended-l2-top-only", two_deep("extended_l2=on,cluster_size=128k"), []),
    ("cluster-sizes", two_deep("cluster_size=4096", "cluster_size=2M"), []),
    ("cluster-512-over-64k", two_deep("cluster_size=512", "cluster_size=65536"), []),
    ("version-2", two_deep("compat=0.10", "compat=0.10"), []),
    ("lazy-refcounts", two_deep("lazy_refcounts=on", "lazy_refcounts=on"), []),
    ("zstd-compressed", two_deep("compression_type=zstd", compress=True), []),
    ("three-deep", three_deep(), []),
    ("three-deep-b-bottom", three_deep(), ["-b", "base.qcow2"]),
    ("three-deep-b-backing", three_deep(), ["-b", "mid.qcow2"]),
    ("three-deep-b-bottom-sizes", three_deep(("cluster_size=4096", "extended_l2=on", "cluster_size=16384"),
                                             (12 * MiB, 5 * MiB, 8 * MiB)), ["-b", "base.qcow2"]),
    ("three-deep-d", three_deep(), ["-d"]),
    ("raw-base", raw_base, []),
    ("top-larger", top_larger, []),
    ("top-smaller", top_smaller, []),
    ("base-with-longer-backing", longer_backing_of_base, []),
    ("data-files", data_files, []),
    ("snapshot-in-top", snapshot_in_top, []),
    ("compressed-base", compressed_base, []),
]


class Case:
    def __init__(self, name, d, rng):
        self.name, self.dir, self.rng = name, d, rng
        self.notes = []

    def p(self, *a):
        return os.path.join(self.dir, *a)

    def build(self, builder):
        os.makedirs(self.p("orig"))
        self.top, self.chain, self.fmts = builder(self.p("orig"), self.rng)
        run([QEMU_IMG, "convert", "-O", "raw", self.top, "../before.raw"], self.p("orig"))

    def copy(self, name):
        shutil.rmtree(self.p(name), ignore_errors=True)
        shutil.copytree(self.p("orig"), self.p(name))

    def view(self, sub, img):
        """The guest content img presents, as qemu reads it from inside sub (where
        relative data file names resolve), in a raw file; returns its path."""
        out = f"view-{img}.raw"
        if os.path.exists(self.p(sub, out)):
            os.unlink(self.p(sub, out))
        run([QEMU_IMG, "convert", "-U", "-f", self.fmts.get(img, "qcow2"), "-O", "raw", img, out], self.p(sub))
        return os.path.join(sub, out)

    def compare_raw(self, a, b, what):
        rc, out, err = run([QEMU_IMG, "compare", "-f", "raw", "-F", "raw", a, b], self.dir, ok=None)
        if rc != 0:
            raise Failure(f"{what}: {a} and {b} differ: {(out + err).strip()[:300]}")

    def same_as_before(self, sub, what):
        self.compare_raw("before.raw", self.view(sub, self.top), f"{what}: top does not read as before the commit")

    def check(self, sub, what, allowed=(0,)):
        for img in self.chain:
            if self.fmts.get(img, "qcow2") != "qcow2":
                continue
            rc, out, err = run([QEMU_IMG, "check", img], self.p(sub), ok=None)
            if rc not in allowed:
                raise Failure(f"{what}: qemu-img check {sub}/{img} exit {rc}: {(out + err).strip()[:400]}")

    def qcowimg_commit(self, sub, opts, env=None, ok=(0,)):
        return run([QCOWIMG, "commit", *opts, self.top], self.p(sub), ok=ok, env=env)

    def equal_to_qemu(self, sub, what):
        for img in self.chain:
            self.compare_raw(self.view("qemu", img), self.view(sub, img), what)

    def equal(self, builder, opts):
        self.build(builder)
        self.copy("qemu")
        self.copy("ours")
        run([QEMU_IMG, "commit", "-q", *opts, self.top], self.p("qemu"))
        _, out, _ = self.qcowimg_commit("ours", opts)
        if "Image committed." not in out:
            raise Failure(f"qcowimg commit printed {out.strip()!r}, not 'Image committed.'")
        self.equal_to_qemu("ours", "after the commit")
        self.check("ours", "after the commit")
        self.same_as_before("ours", "after the commit")
        if "snapshot" in self.name:   # top's snapshot keeps its clusters and reads through the new base
            views = []
            for sub in ("qemu", "ours"):
                run([QEMU_IMG, "convert", "-l", "snapshot.name=s1", "-O", "raw", self.top, "snap.raw"], self.p(sub))
                views.append(os.path.join(sub, "snap.raw"))
            self.compare_raw(*views, "snapshot s1 of top")
        if "-d" not in opts and "-b" not in opts:
            # emptied: nothing left allocated in top (qemu-img map shows no range in it)
            _, out, _ = run([QEMU_IMG, "map", "--output=json", self.top], self.p("ours"))
            if '"depth": 0' in out and '"data": true' in out.split('"depth": 0')[1].split("}")[0]:
                raise Failure(f"top still holds data after the commit: {out[:300]}")


# ---- cancel, kill and fault cases: one bigger chain ---------------------------

def kill_chain(d, rng):
    create(d, "base.qcow2", 24 * MiB, "cluster_size=16384")
    io(d, "base.qcow2", *[f"write -q -c -P 0x2f {8 * MiB + i * 16 * KiB} 16k" for i in range(64)])
    fill(d, "base.qcow2", 8 * MiB, 0x10, step=4 * MiB)
    io(d, "base.qcow2", "write -q -P 0x1f 12M 12M")
    create(d, "top.qcow2", 32 * MiB, backing="base.qcow2")
    fill(d, "top.qcow2", 20 * MiB, 0x50, step=2 * MiB)
    messy(d, "top.qcow2", 32 * MiB, rng, pat=0x70, n=16)
    return "top.qcow2", ["top.qcow2", "base.qcow2"], {}


class Special(Case):
    def prepare(self):
        self.build(kill_chain)
        self.copy("qemu")
        run([QEMU_IMG, "commit", "-q", self.top], self.p("qemu"))
        with open(self.p("orig", "top.qcow2"), "rb") as f:
            self.pristine = {n: open(self.p("orig", n), "rb").read() for n in self.chain}

    def restore(self):
        os.makedirs(self.p("work"), exist_ok=True)
        for n, data in self.pristine.items():
            with open(self.p("work", n), "wb") as f:
                f.write(data)

    def judge(self, what, allowed=(0, 3), again=False):
        self.check("work", what, allowed)
        self.same_as_before("work", what)
        if again:
            self.qcowimg_commit("work", [])
            self.check("work", f"{what}, then a full commit", (0, 3) if 3 in allowed else (0,))
            self.equal_to_qemu("work", f"{what}, then a full commit")

    def cancel(self):
        self.prepare()
        for at in ("1", "6M", "16M"):
            self.restore()
            rc, out, err = self.qcowimg_commit("work", ["-p"], env={"QCOWIMG_COMMIT_CANCEL_AT": at}, ok=(1,))
            if "cancel" not in err:
                raise Failure(f"cancel at {at}: the message does not say so: {err.strip()[:200]}")
            self.judge(f"cancelled at {at} bytes", allowed=(0,), again=True)
        self.notes.append("3 cancels")

    def kill(self, rounds=20):
        self.prepare()
        self.restore()
        t0 = time.time()
        self.qcowimg_commit("work", [])
        full = time.time() - t0
        midway = 0
        for r in range(rounds):
            self.restore()
            delay = self.rng.uniform(0, full * 1.1)
            p = subprocess.Popen([QCOWIMG, "commit", self.top], cwd=self.p("work"), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, preexec_fn=no_core)
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.wait()
            if open(self.p("work", "base.qcow2"), "rb").read() != self.pristine["base.qcow2"]:
                midway += 1
            self.judge(f"round {r}: killed after {delay:.3f}s (exit {p.returncode})", again=r % 5 == 0)
        self.notes.append(f"{rounds} kills over {full:.2f}s runs, {midway} after base changed")

    def count_writes(self, uri):
        """The number of storage writes a commit makes: the smallest N whose kill never comes."""
        lo, hi = 1, 64
        while True:
            self.restore()
            rc, _, _ = run([QCOWIMG, "commit", uri], self.p("work"), ok=None, env={"QCOWD_FAULT": f"write:{hi}:KILL"})
            if rc == 0:
                break
            lo, hi = hi, hi * 2
        while lo < hi:   # rc 0 at hi, killed at lo
            mid = (lo + hi) // 2
            self.restore()
            rc, _, _ = run([QCOWIMG, "commit", uri], self.p("work"), ok=None, env={"QCOWD_FAULT": f"write:{mid}:KILL"})
            if rc == 0:
                hi = mid
            else:
                lo = mid + 1
        return lo - 1

    def sweep(self, kind, points):
        self.prepare()
        uri = "fault:" + self.p("work", self.top)
        total = self.count_writes(uri)
        ns = list(range(1, total + 1))
        if len(ns) > points:
            ns = sorted(set(ns[:3] + ns[-3:]) | set(self.rng.sample(ns[3:-3], points - 6)))
        for i, n in enumerate(ns):
            self.restore()
            env = {"QCOWD_FAULT": f"write:{n}:{kind}"}
            rc, out, err = run([QCOWIMG, "commit", uri], self.p("work"), ok=None, env=env)
            what = f"write {n} of {total} ({kind})"
            if kind == "KILL" and rc != -signal.SIGKILL:
                raise Failure(f"{what}: exit {rc}, want death by SIGKILL: {err.strip()[:300]}")
            if kind != "KILL" and (rc != 1 or "injected fault" not in err):
                raise Failure(f"{what}: exit {rc}, want 1 naming the fault: {err.strip()[:300]}")
            self.judge(what, allowed=(0, 3) if kind == "KILL" else (0,), again=i % 6 == 0)
        self.notes.append(f"{len(ns)} of {total} write points")


SPECIAL = [
    ("cancel", lambda c: c.cancel()),
    ("kill-random", lambda c: c.kill()),
    ("kill-sweep", lambda c: c.sweep("KILL", 24)),
    ("fail-sweep", lambda c: c.sweep("EIO", 12)),
]


def run_case(name, root, seed, fn):
    d = os.path.join(root, name)
    os.makedirs(d)
    t0 = time.time()
    rng = random.Random(f"{seed}:{name}")
    c = Special(name, d, rng)
    try:
        fn(c)
    except Failure as e:
        return name, c, str(e), time.time() - t0
    except subprocess.TimeoutExpired as e:
        return name, c, f"timeout: {e.cmd}", time.time() - t0
    except Exception as e:
        return name, c, f"harness error: {e!r}\n{traceback.format_exc()}", time.time() - t0
    return name, c, None, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", action="append", default=[], metavar="NAME")
    ap.add_argument("-j", type=int, default=2)
    ap.add_argument("--seed", type=int, default=int(os.environ.get("COMMIT_SEED", "20261124")))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    allcases = [(n, (lambda b, o: lambda c: c.equal(b, o))(b, o)) for n, b, o in CASES] + SPECIAL
    if args.list:
        print("\n".join(n for n, _ in allcases))
        return 0
    selected = allcases
    if args.k:
        selected = [c for c in allcases if any(k == c[0] for k in args.k)] or \
            [c for c in allcases if any(k in c[0] for k in args.k)]
        if not selected:
            print(f"no case matches {args.k}", file=sys.stderr)
            return 2
    if not QCOWIMG or not shutil.which(QCOWIMG):
        print("QCOWIMG is not set to a runnable binary", file=sys.stderr)
        return 2
    for tool in (QEMU_IMG, QEMU_IO):
        if not shutil.which(tool):
            print(f"cannot run {tool}: skipping (install qemu-utils)", file=sys.stderr)
            return 77
    root = tempfile.mkdtemp(prefix="qcowd-commit-")

    def handler(signum, frame):
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        os._exit(128 + signum)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    print(f"# seed {args.seed}; qcowimg={QCOWIMG}; dir {root}", flush=True)
    passed = failed = 0
    t0 = time.time()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.j)) as pool:
            futs = [pool.submit(run_case, n, root, args.seed, fn) for n, fn in selected]
            for fut in futs:
                name, c, problem, secs = fut.result()
                notes = "; ".join(c.notes + [f"{secs:.1f}s"])
                if problem is None:
                    passed += 1
                    print(f"ok {name} ({notes})", flush=True)
                    if not args.keep:
                        shutil.rmtree(c.dir, ignore_errors=True)
                else:
                    failed += 1
                    print(f"FAIL {name}: {problem} ({notes})", flush=True)
    finally:
        if args.keep or failed:
            print(f"# images kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"# {time.time() - t0:.0f}s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
