#!/usr/bin/python3
"""faults.py: storage errors at every point of a write (QEMU iotest 026 style).

Each scenario is an image state and one qcowimg command that changes it: an
allocating write on a fresh image, one that needs new refcount blocks (512-byte
clusters), one that makes the refcount table grow, one into extended-L2
subclusters, one into clusters shared with an internal snapshot (copy on write of
data and L2 table), one over compressed clusters, one on an overlay (copy-up from
the backing file), on a lazy-refcounts image, on an image with an enabled bitmap,
and zero, discard and compressed writes. fault_probe first counts the reads, writes,
flushes and truncates the command makes on the image file; then, for every one of
them (beyond --max-points of a kind, a seeded sample that keeps the first and last
ten) and both EIO and ENOSPC, the command runs on a fresh copy of the image as
`QCOWD_FAULT=KIND:N:ERR qcowimg CMD fault:/abs/img.qcow2 ...`, and:
  - it must fail with exit 1 and a `qcowimg: ...` message naming the error (no crash,
    no sanitizer report, no hang); exit 0 passes only if the message still tells of
    the fault and the files are byte for byte what a run without it leaves (the
    fault hit a call that no longer mattered);
  - if the files are unchanged, nothing more is needed; a state already judged (the
    same bytes as an earlier point left) is not judged again;
  - `qemu-img check` must find no corruptions (leaks are allowed: exit 0 or 3), and
    the image must not be marked corrupt for a storage error;
  - qemu's view of the guest disk must hold the old bytes outside the written range,
    and in it, per cluster, either the old bytes or the new ones;
  - qcowimg must open it again and read the same bytes;
  - the same command without the fault must then succeed and leave the new data
    with no corruptions.
Each scenario also checks that it reaches the state it is about (a new refcount
block, a grown refcount table, a compressed cluster overwritten, ...).

Environment: QCOWIMG, FAULT_PROBE (required), QEMU_IMG, QEMU_IO.
Usage: faults.py [-k NAME]... [-j N] [--seed N] [--max-points N] [--keep] [--list]
Prints `ok NAME (P fault points)` or `FAIL NAME: reason` per scenario, the number of
fault points exercised, then `N passed, M failed`; exits 1 if anything failed, 2 on
bad usage, 77 without qemu-img/qemu-io.
"""

import argparse
import hashlib
import json
import os
import random
import resource
import shlex
import struct
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import suite  # noqa: E402

KiB = 1024
MiB = 1024 * KiB

QCOWIMG = os.environ.get("QCOWIMG", "")
PROBE = os.environ.get("FAULT_PROBE", "")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")
CMD_TIMEOUT = 120
KINDS = ("read", "write", "flush", "truncate")
ERRNOS = {"EIO": "Input/output error", "ENOSPC": "No space left on device"}


class SetupError(Exception):
    pass


class Failure(Exception):
    def __init__(self, reason, *details):
        super().__init__(reason)
        self.reason, self.details = reason, list(details)


def human_cmd(argv, cwd=None, env=None, stdin=None):
    s = " ".join(shlex.quote(str(a)) for a in argv)
    if env:
        s = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + s
    if stdin:
        s += f" < {shlex.quote(stdin)}"
    return f"(cd {shlex.quote(cwd)} && {s})" if cwd else s


def no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(argv, cwd, data=None, env=None, check=True):
    e = dict(os.environ, LC_ALL="C")
    e.pop("QCOWD_FAULT", None)
    if env:
        e.update(env)
    p = subprocess.run([str(a) for a in argv], cwd=cwd, input=data if data is not None else b"",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=CMD_TIMEOUT,
                       preexec_fn=no_core, env=e)
    err = p.stderr.decode("utf-8", "replace")
    if check and p.returncode != 0:
        raise SetupError(f"{human_cmd(argv, cwd)} exited {p.returncode}: {err.strip()[:400]}")
    return p.returncode, p.stdout, err


def sanitizer_report(err):
    return "Sanitizer" in err or "runtime error:" in err


def semi_compressible(rng, n):
    return bytes(rng.getrandbits(4) * 3 for _ in range(n))


def header_u32(path, off):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">I", f.read(4))[0]


# ---------------------------------------------------------------------------
# Scenarios: setup(b) builds the pristine images in b.dir and returns a Scenario

class Scenario:
    """cmd: 'write', 'writec', 'zero' or 'discard'; off/data or off/length; files:
    the files the command may change (restored before each run); proof(dir): checks,
    after a successful run, that the command did what the scenario is about."""
    def __init__(self, cmd, off, data=None, length=None, files=("img.qcow2",), proof=None):
        self.cmd, self.off, self.data = cmd, off, data
        self.length = len(data) if data is not None else length
        self.files, self.proof = list(files), proof

    def args(self, img):
        if self.cmd in ("write", "writec"):
            return (["write", "-c"] if self.cmd == "writec" else ["write"]) + [img, self.off]
        return [self.cmd, img, self.off, self.length]


class Builder:
    def __init__(self, d, rng):
        self.dir, self.rng = d, rng

    def path(self, n):
        return os.path.join(self.dir, n)

    def qemu_img(self, *args):
        run([QEMU_IMG, *args], self.dir)

    def qcowimg_create(self, name, size, opts=None, backing=None, bfmt=None):
        argv = [QCOWIMG, "create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else [])
        if backing:
            argv += ["-b", backing, "-F", bfmt]
        run(argv + [name] + ([str(size)] if size else []), self.dir)
        return name

    def io(self, img, *cmds):
        argv = [QEMU_IO]
        for c in cmds:
            argv += ["-c", c]
        rc, out, err = run([*argv, img], self.dir, check=False)
        text = out.decode(errors="replace") + err
        if rc != 0 or "failed" in text or "error" in text.lower():
            raise SetupError(f"{human_cmd([*argv, img], self.dir)}: {text.strip()[:300]}")

    def pattern(self, name, n, semi=False):
        with open(self.path(name), "wb") as f:
            f.write(semi_compressible(self.rng, n) if semi else self.rng.randbytes(n))
        return self.path(name)

    def fill(self, img, upto, step=60 * KiB):
        """Data from 0 up to guest offset upto, in qemu-io writes."""
        pat = self.pattern("fill.pat", 65537)
        self.io(img, *[f"write -q -s {pat} {o} {min(step, upto - o)}" for o in range(0, upto, step)])


SCENARIOS = []


def scenario(name):
    def deco(fn):
        SCENARIOS.append((name, fn))
        return fn
    return deco


def _map(d, img):
    return json.loads(run([QEMU_IMG, "map", "--output=json", img], d)[1])


@scenario("fresh-write")
def _(b):
    b.qcowimg_create("img.qcow2", 4 * MiB)
    return Scenario("write", 1 * MiB + 123, b.rng.randbytes(100 * KiB))


@scenario("fresh-write-second-l2")
def _(b):
    # 4 KiB clusters: an L2 table maps 2 MiB, so this write needs new L2 tables
    b.qcowimg_create("img.qcow2", 8 * MiB, "cluster_size=4096")
    b.fill("img.qcow2", 256 * KiB)
    return Scenario("write", 4 * MiB - 50 * KiB, b.rng.randbytes(120 * KiB))


@scenario("new-refcount-block")
def _(b):
    # 512-byte clusters, 16-bit refcounts: a block covers 256 clusters (128 KiB of
    # file), so 300 KiB of new data needs new refcount blocks
    b.qcowimg_create("img.qcow2", 4 * MiB, "cluster_size=512")
    b.fill("img.qcow2", 100 * KiB)
    before = refcount_blocks(b.path("img.qcow2"))

    def proof(d):
        now = refcount_blocks(os.path.join(d, "img.qcow2"))
        if now <= before:
            raise SetupError(f"the write added no refcount block ({before} -> {now})")
    return Scenario("write", 2 * MiB + 7, b.rng.randbytes(100 * KiB), proof=proof)


def refcount_blocks(path):
    """Refcount blocks the refcount table points at."""
    with open(path, "rb") as f:
        h = f.read(64)
        cs = 1 << struct.unpack(">I", h[20:24])[0]
        rt_off = struct.unpack(">Q", h[48:56])[0]
        rt_clusters = struct.unpack(">I", h[56:60])[0]
        f.seek(rt_off)
        t = f.read(rt_clusters * cs)
    return sum(1 for i in range(0, len(t), 8) if struct.unpack(">Q", t[i:i + 8])[0])


@scenario("refcount-table-grows")
def _(b):
    # 512-byte clusters, 64-bit refcounts: a block covers 64 clusters (32 KiB of
    # file), a one-cluster table 64 blocks (2 MiB): fill until the file is just short
    # of that, so a small write makes the table grow
    b.qcowimg_create("img.qcow2", 4 * MiB, "cluster_size=512,refcount_bits=64")
    rtc = header_u32(b.path("img.qcow2"), 56)
    reach = rtc * 512 // 8 * 64 * 512
    b.fill("img.qcow2", reach - 320 * KiB)
    pat = b.pattern("step.pat", 4099)
    guest = reach - 320 * KiB
    while os.path.getsize(b.path("img.qcow2")) < reach - 24 * KiB:
        b.io("img.qcow2", f"write -q -s {pat} {guest} 8k")
        guest += 8 * KiB
    if os.path.getsize(b.path("img.qcow2")) >= reach:
        raise SetupError(f"filled too far: file {os.path.getsize(b.path('img.qcow2'))}, table reach {reach}")

    def proof(d):
        now = header_u32(os.path.join(d, "img.qcow2"), 56)
        if now <= rtc:
            raise SetupError(f"the refcount table did not grow ({rtc} -> {now} clusters)")
    return Scenario("write", 3 * MiB + 3, b.rng.randbytes(40 * KiB), proof=proof)


@scenario("new-refcount-block-rc1")
def _(b):
    # 1-bit refcounts with 512-byte clusters: the first block covers 2 MiB of file;
    # fill to just short of that
    b.qcowimg_create("img.qcow2", 4 * MiB, "cluster_size=512,refcount_bits=1")
    b.fill("img.qcow2", 1900 * KiB)
    size = os.path.getsize(b.path("img.qcow2"))
    if not 2 * MiB - 150 * KiB < size < 2 * MiB:
        raise SetupError(f"the file ({size} bytes) does not end just short of the first block's reach")
    before = refcount_blocks(b.path("img.qcow2"))

    def proof(d):
        now = refcount_blocks(os.path.join(d, "img.qcow2"))
        if now <= before:
            raise SetupError(f"the write added no refcount block ({before} -> {now})")
    return Scenario("write", 3 * MiB + 1, b.rng.randbytes(160 * KiB), proof=proof)


@scenario("extl2-subclusters")
def _(b):
    b.qcowimg_create("img.qcow2", 4 * MiB, "extended_l2=on")
    pat = b.pattern("p.pat", 4099)
    b.io("img.qcow2", f"write -q -s {pat} 1M 4k", f"write -q -s {pat} 1100k 2k")
    return Scenario("write", 1 * MiB + 3000, b.rng.randbytes(70 * KiB))


@scenario("snapshot-cow")
def _(b):
    b.qcowimg_create("img.qcow2", 4 * MiB)
    b.fill("img.qcow2", 2 * MiB)
    b.qemu_img("snapshot", "-c", "s1", "img.qcow2")

    def proof(d):
        run([QEMU_IMG, "convert", "-l", "snapshot.name=s1", "-O", "raw", "img.qcow2", "snap.raw"], d)
        with open(os.path.join(d, "snap.raw"), "rb") as f, open(os.path.join(d, "fill.pat"), "rb") as p:
            if f.read(60 * KiB) != p.read(60 * KiB):
                raise SetupError("snapshot changed")
    return Scenario("write", 100 * KiB + 5, b.rng.randbytes(150 * KiB), proof=proof)


@scenario("snapshot-zero")
def _(b):
    b.qcowimg_create("img.qcow2", 4 * MiB)
    b.fill("img.qcow2", 2 * MiB)
    b.qemu_img("snapshot", "-c", "s1", "img.qcow2")
    return Scenario("zero", 30 * KiB, length=300 * KiB)


@scenario("snapshot-discard")
def _(b):
    b.qcowimg_create("img.qcow2", 4 * MiB)
    b.fill("img.qcow2", 2 * MiB)
    b.qemu_img("snapshot", "-c", "s1", "img.qcow2")
    return Scenario("discard", 0, length=1 * MiB)


@scenario("discard-owned")
def _(b):
    b.qcowimg_create("img.qcow2", 4 * MiB, "cluster_size=4096")
    b.fill("img.qcow2", 1 * MiB)
    return Scenario("discard", 64 * KiB, length=512 * KiB)


@scenario("over-compressed")
def _(b):
    b.qcowimg_create("img.qcow2", 4 * MiB)
    semi = b.pattern("semi.pat", 4099, semi=True)
    b.io("img.qcow2", f"write -q -c -s {semi} 0 1M")

    def proof(d):
        if any("offset" not in e and e["data"] and e["start"] < 192 * KiB for e in _map(d, "img.qcow2")):
            raise SetupError("the written range is still compressed")
    if not any("offset" not in e and e["data"] for e in _map(b.dir, "img.qcow2")):
        raise SetupError("qemu-io made no compressed clusters")
    return Scenario("write", 50 * KiB + 1, b.rng.randbytes(100 * KiB), proof=proof)


@scenario("write-compressed")
def _(b):
    b.qcowimg_create("img.qcow2", 4 * MiB, "compression_type=zstd")
    b.fill("img.qcow2", 256 * KiB)

    def proof(d):
        if not any("offset" not in e and e["data"] for e in _map(d, "img.qcow2")):
            raise SetupError("write -c stored nothing compressed")
    return Scenario("writec", 128 * KiB, semi_compressible(b.rng, 192 * KiB), proof=proof)


@scenario("overlay-copy-up")
def _(b):
    b.qcowimg_create("base.qcow2", 4 * MiB)
    b.fill("base.qcow2", 2 * MiB)
    b.qcowimg_create("img.qcow2", None, backing="base.qcow2", bfmt="qcow2")
    return Scenario("write", 1 * MiB + 1000, b.rng.randbytes(130 * KiB))


@scenario("overlay-raw-base-v2")
def _(b):
    with open(b.path("base.raw"), "wb") as f:
        f.write(b.rng.randbytes(3 * MiB))
    b.qcowimg_create("img.qcow2", 4 * MiB, "compat=0.10,cluster_size=4096", backing="base.raw", bfmt="raw")
    return Scenario("write", 3 * MiB - 1000, b.rng.randbytes(130 * KiB))


@scenario("lazy-refcounts")
def _(b):
    b.qcowimg_create("img.qcow2", 4 * MiB, "lazy_refcounts=on")
    b.fill("img.qcow2", 128 * KiB)
    return Scenario("write", 2 * MiB + 9, b.rng.randbytes(100 * KiB))


@scenario("bitmap-enabled")
def _(b):
    b.qcowimg_create("img.qcow2", 4 * MiB)
    b.fill("img.qcow2", 128 * KiB)
    b.qemu_img("bitmap", "--add", "img.qcow2", "b0")
    return Scenario("write", 3 * MiB + 9, b.rng.randbytes(100 * KiB))


@scenario("datafile")
def _(b):
    b.qcowimg_create("img.qcow2", 4 * MiB, "data_file=img.data")
    return Scenario("write", 2 * MiB + 9, b.rng.randbytes(100 * KiB), files=("img.qcow2", "img.data"))


# ---------------------------------------------------------------------------

class Runner:
    def __init__(self, name, d, sc):
        self.name, self.dir, self.sc = name, d, sc
        self.img = os.path.join(d, "img.qcow2")
        self.points = self.untouched = 0
        self.tolerated = []   # fault points after which the command succeeded (see fault_point)
        self.verified = set() # states (digest of the files) already judged good after a failure

    def p(self, n):
        return os.path.join(self.dir, n)

    def restore(self):
        """Put the pristine files back (held in memory: the images are small)."""
        for f, data in self.pristine.items():
            with open(self.p(f), "wb") as out:
                out.write(data)

    def files_now(self):
        out = {}
        for f in self.pristine:
            with open(self.p(f), "rb") as cur:
                out[f] = cur.read()
        return out

    def digest(self, files):
        h = hashlib.sha256()
        for f in sorted(files):
            h.update(f.encode() + b"\0" + hashlib.sha256(files[f]).digest())
        return h.hexdigest()

    def command(self, env=None, img=None):
        argv = [QCOWIMG, *self.sc.args(img or f"fault:{self.img}")]
        rc, out, err = run(argv, self.dir, data=self.sc.data if self.sc.data is not None else b"",
                           env=env, check=False)
        return argv, rc, err

    def qemu_view(self, out="view.raw"):
        run([QEMU_IMG, "convert", "-U", "-O", "raw", "img.qcow2", out], self.dir)
        with open(self.p(out), "rb") as f:
            return f.read()

    def setup(self):
        os.makedirs(self.p("pristine"))
        self.pristine = {}
        for f in self.sc.files:
            run(["cp", "--sparse=always", f, os.path.join("pristine", f)], self.dir)
            with open(self.p(f), "rb") as fh:
                self.pristine[f] = fh.read()
        if self.sc.data is not None:
            with open(self.p("data.bin"), "wb") as f:
                f.write(self.sc.data)
        q = json.loads(run([QEMU_IMG, "info", "--output=json", "img.qcow2"], self.dir)[1])
        self.cs = q["cluster-size"]
        self.old = self.qemu_view()
        new = bytearray(self.old)
        off, n = self.sc.off, self.sc.length
        new[off:off + n] = self.sc.data if self.sc.data is not None else bytes(n)
        self.new = bytes(new)
        with open(self.p("new.raw"), "wb") as f:
            f.write(self.new)
        # the count, from the probe
        probe = [PROBE, self.sc.cmd, self.img, self.sc.off] + ([self.sc.length] if self.sc.data is None else [])
        rc, out, err = run(probe, self.dir, data=self.sc.data, check=False)
        if rc != 0:
            raise Failure(f"fault_probe (the command without faults) failed: {err.strip()[:300]}",
                          f"command: {human_cmd(probe, self.dir)}")
        words = out.decode().split()
        self.counts = {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}
        self.check_after("without faults (fault_probe)", exact=True)
        if self.sc.proof:
            self.sc.proof(self.dir)
        # the plain command must do the same
        self.restore()
        argv, rc, err = self.command()
        if rc != 0:
            raise Failure(f"the command without faults failed: exit {rc}: {err.strip()[:300]}",
                          f"command: {human_cmd(argv, self.dir)}")
        self.check_after("without faults (qcowimg)", exact=True)
        self.done = self.files_now()   # what a fault-free run leaves, byte for byte

    def check_after(self, label, exact=False, repro=()):
        """No corruptions, not marked corrupt; guest bytes old outside the range and, per
        cluster inside it, old or new (exactly new when exact). Returns qemu's view (or
        None when exact)."""
        argv = [QEMU_IMG, "check", "img.qcow2"]
        rc, out, err = run(argv, self.dir, check=False)
        if rc not in (0, 3):
            raise Failure(f"{label}: qemu-img check exit {rc}", *repro,
                          *[f"  {l}" for l in (out.decode(errors='replace') + err).strip().splitlines()[:20]])
        with open(self.img, "rb") as f:
            f.seek(72)
            incompat = struct.unpack(">Q", f.read(8))[0] if header_u32(self.img, 4) >= 3 else 0
        if incompat & 2:
            raise Failure(f"{label}: the image is marked corrupt after a storage error", *repro)
        if exact:
            argv = [QEMU_IMG, "compare", "-U", "-f", "raw", "-F", "qcow2", "new.raw", "img.qcow2"]
            rc, out, err = run(argv, self.dir, check=False)
            if rc != 0:
                raise Failure(f"{label}: guest data differs from the expected: {out.decode().strip()}{err.strip()}",
                              *repro, f"check: {human_cmd(argv, self.dir)}")
            return None
        view = self.qemu_view()
        off, end = self.sc.off, self.sc.off + self.sc.length
        if view[:off] != self.old[:off] or view[end:] != self.old[end:]:
            i = next(i for i in list(range(off)) + list(range(end, len(view))) if view[i] != self.old[i])
            raise Failure(f"{label}: guest byte {i}, outside the written range {off}+{self.sc.length}, "
                          f"changed ({self.old[i]:02x} -> {view[i]:02x})", *repro)
        c = off
        while c < end:
            ce = min(end, (c // self.cs + 1) * self.cs)
            if view[c:ce] != self.old[c:ce] and view[c:ce] != self.new[c:ce]:
                raise Failure(f"{label}: guest bytes {c}+{ce - c} (one cluster's part of the written range) "
                              "are neither all old nor all new", *repro)
            c = ce
        return view

    def fault_point(self, kind, n, errname):
        self.restore()
        env = {"QCOWD_FAULT": f"{kind}:{n}:{errname}"}
        argv, rc, err = self.command(env=env)
        repro = [f"command: {human_cmd(argv, self.dir, env, 'data.bin' if self.sc.data else None)}",
                 f"restore first: (cd {shlex.quote(self.dir)} && cp pristine/* .)"]
        label = f"{kind} #{n} {errname}"
        self.points += 1
        if sanitizer_report(err) or rc < 0:
            raise Failure(f"{label}: crashed (exit {rc})", *repro, *[f"stderr: {l}" for l in err.splitlines()[:30]])
        if rc == 0:
            # Succeeding is right only when the fault hit a call that no longer mattered
            # (a redundant flush once everything was on disk): then the files must be
            # byte for byte what a run without the fault leaves. Anything else means
            # a failure was swallowed (e.g. in qcow2_close, which cannot report one).
            if "injected fault" not in err:
                raise Failure(f"{label}: exit 0 and no word of the fault: it never fired (fault_probe and "
                              "qcowimg disagree on the calls) or it was swallowed without a trace", *repro)
            now = self.files_now()
            if now != self.done:
                diff = [f for f in now if now[f] != self.done[f]]
                first = next(i for i in range(min(len(now[diff[0]]), len(self.done[diff[0]]))) if
                             now[diff[0]][i] != self.done[diff[0]][i]) if \
                    len(now[diff[0]]) == len(self.done[diff[0]]) else "(length)"
                raise Failure(f"{label}: exit 0 despite the fault, but {diff[0]} differs from what a run "
                              f"without the fault leaves (first at byte {first}): a failure was swallowed",
                              *repro, *[f"stderr: {l}" for l in err.splitlines()[:10]])
            self.tolerated.append(f"{kind}#{n}:{errname}")
            return
        if rc != 1:
            raise Failure(f"{label}: exit {rc}, want 1", *repro, *[f"stderr: {l}" for l in err.splitlines()[:10]])
        if not err.startswith("qcowimg: ") or (ERRNOS[errname] not in err and "injected fault" not in err):
            raise Failure(f"{label}: the message does not name the error: {err.strip()[:300]!r}", *repro)
        now = self.files_now()
        if now == self.pristine:
            self.untouched += 1   # failed before changing anything: nothing more to check
            return
        key = self.digest(now)
        if key in self.verified:
            return                # the same state as an earlier fault point left: judged already
        view = self.check_after(label, repro=repro)
        # qcowimg opens it again and reads what qemu reads
        off = max(0, self.sc.off - self.cs)
        ln = min(len(view) - off, self.sc.length + 2 * self.cs)
        rargv = [QCOWIMG, "read", "img.qcow2", off, ln]
        rc, out, err = run(rargv, self.dir, check=False)
        if rc != 0 or out != view[off:off + ln]:
            raise Failure(f"{label}: then qcowimg read differs from qemu's view (exit {rc}) {err.strip()[:200]}",
                          *repro, f"then: {human_cmd(rargv, self.dir)}")
        # and takes the write again
        argv2, rc, err = self.command(img="img.qcow2")
        if rc != 0:
            raise Failure(f"{label}: then the same command without the fault failed: {err.strip()[:300]}",
                          *repro, f"then: {human_cmd(argv2, self.dir)}")
        self.check_after(f"{label}, then the command again without the fault", exact=True, repro=repro)
        self.verified.add(key)

    def run_all(self, max_points, rng):
        self.setup()
        self.sampled = []
        for kind in KINDS:
            count = self.counts.get(kind, 0)
            ns = list(range(1, count + 1))
            if count > max_points:   # a seeded sample; the first and last ten always
                edge = ns[:10] + ns[-10:]
                ns = sorted(set(edge) | set(rng.sample(ns[10:-10], max(0, max_points - 20))))
                self.sampled.append(f"{kind} {len(ns)} of {count}")
            for n in ns:
                for errname in ERRNOS:
                    self.fault_point(kind, n, errname)


def compress_points(points):
    """["flush#6:EIO", "flush#6:ENOSPC", "flush#7:EIO", ...] -> "flush #6-#7 (EIO ENOSPC)"."""
    by_kind = {}
    for p in points:
        kn, err = p.split(":")
        kind, n = kn.split("#")
        by_kind.setdefault(kind, {}).setdefault(int(n), []).append(err)
    out = []
    for kind, ns in by_kind.items():
        keys = sorted(ns)
        runs, start = [], keys[0]
        for a, b in zip(keys, keys[1:] + [None]):
            if b != a + 1:
                runs.append(f"#{start}" if start == a else f"#{start}-#{a}")
                start = b
        errs = sorted({e for v in ns.values() for e in v})
        out.append(f"{kind} {','.join(runs)} ({' '.join(errs)})")
    return "; ".join(out)


def run_one(name, fn, root, seed, max_points):
    d = os.path.join(root, name)
    os.makedirs(d)
    r = None
    t0 = time.time()
    try:
        rng = random.Random(f"{seed}:{name}")
        sc = fn(Builder(d, rng))
        r = Runner(name, d, sc)
        r.run_all(max_points, rng)
    except Failure as e:
        return name, r, (e.reason, e.details), d, time.time() - t0
    except SetupError as e:
        return name, r, (f"setup: {e}", []), d, time.time() - t0
    except subprocess.TimeoutExpired as e:
        return name, r, (f"timeout after {e.timeout}s (a hang?): {human_cmd(e.cmd, d)}", []), d, time.time() - t0
    except Exception as e:
        return name, r, (f"harness error: {e!r}", traceback.format_exc().splitlines()), d, time.time() - t0
    return name, r, None, d, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    suite.add_common_args(ap, "scenario")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("FAULTS_SEED", "20240611")))
    ap.add_argument("--max-points", type=int, default=60,
                    help="per call kind, test at most this many points (a seeded sample); 0: all")
    args = ap.parse_args()
    if args.list:
        print("\n".join(n for n, _ in SCENARIOS))
        return 0
    selected = suite.select(SCENARIOS, args.k, "scenario")
    if selected is None:
        return suite.USAGE
    bad = suite.check_needs({"QCOWIMG": QCOWIMG, "FAULT_PROBE": PROBE}, (QEMU_IMG, QEMU_IO))
    if bad is not None:
        return bad

    def task(name, fn, root):
        def run():
            name_, r, problem, d, secs = run_one(name, fn, root, args.seed, args.max_points or 1 << 40)
            pts = r.points if r else 0
            counts = " ".join(f"{k} {v}" for k, v in r.counts.items()) if r and hasattr(r, "counts") else ""
            if problem is None:
                tol = f"; succeeded despite {compress_points(r.tolerated)}" if r.tolerated else ""
                smp = f"; sampled {', '.join(r.sampled)}" if r.sampled else ""
                note = f"{pts} fault points, {r.untouched} failed before writing; {counts}{smp}{tol}; {secs:.1f}s"
            else:
                note = f"after {pts} fault points passed; {counts}"
            return suite.Outcome(name_, [problem] if problem else [], d, note, pts)
        return run

    t0 = time.time()
    with suite.Scratch("qcowd-faults-", args.keep) as scratch:
        print(f"# seed {args.seed}; qcowimg={QCOWIMG}; dir {scratch.root}", flush=True)
        passed, failed, outs = suite.run_all(scratch, [task(n, fn, scratch.root) for n, fn in selected], args.j)
    print(f"# {sum(o.count for o in outs)} fault points exercised in {time.time() - t0:.0f}s")
    return suite.summary(passed, failed)


if __name__ == "__main__":
    sys.exit(main())
