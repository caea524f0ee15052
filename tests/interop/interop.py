#!/usr/bin/python3
"""interop.py: proves qcowimg reads what qemu-img and qemu-io write, byte for byte,
and that `qcowimg info`/`map --output=json` agree with qemu-img's.

Every case builds images in its own folder of a temporary directory with qemu-img and
qemu-io, then checks qcowimg against qemu's view of the same image:
  convert   `qcowimg convert -O raw` equals `qemu-img convert -O raw` (for the huge
            sparse cases: `qemu-img compare`, and the output must stay sparse)
  read      `qcowimg read IMG OFF LEN` at seeded pseudo-random places (unaligned, across
            cluster, subcluster and extent boundaries, the tail) equals the same slice
  info      `qcowimg info --output=json` equals `qemu-img info --output=json`, key by key
  map       `qcowimg map --output=json` equals `qemu-img map --output=json`, entry by entry
  snapshot  `convert`/`read -l snapshot.name=S` equal qemu-img's view of each snapshot
Both tools always get the same path argument from the same working directory, so
`filename` and `full-backing-filename` are compared exactly; nothing is normalized
(see Checker.check_info for the reasoning on actual-size). Each case also checks that
qemu built what it means to test (compressed clusters exist, map shows the extent
kind the case is about), so a qemu change cannot quietly hollow a case out.

Environment: QCOWIMG (the binary under test, required), QEMU_IMG, QEMU_IO (default
qemu-img, qemu-io). Usage: interop.py [-k NAME]... [-j N] [--seed N] [--keep] [--list]
Prints `ok NAME` or `FAIL NAME: reason` per case (details indented below a failure),
then `N passed, M failed`; exits 1 if anything failed, 2 on bad usage or a missing
QCOWIMG, 77 (CTest's skip code) when qemu-img or qemu-io is missing.
"""

import argparse
import json
import os
import random
import resource
import shlex
import subprocess
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import suite  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

QCOWIMG = os.environ.get("QCOWIMG", "")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")

CMD_TIMEOUT = 300          # seconds for any one command (ASan builds are slow)
READS_PER_CASE = 8         # `qcowimg read` calls per case (plus 2 per snapshot)
MAX_READ = 2 * MiB + 4321  # upper bound on one read's length
SPARSE_LIMIT = 64 * MiB    # allocated bytes allowed in the raw copy of a huge image

# Pattern files for `qemu-io write -s FILE`: qemu-io repeats the file to fill the
# buffer. Prime lengths and distinct contents make a read from a wrong host offset,
# a wrong subcluster or a wrong layer show up as differing bytes, which one-byte
# `-P` patterns would hide.
# pat8 is random bytes from a 16-letter alphabet: it compresses to about half in
# any cluster size, so compressed clusters get odd lengths and some straddle host
# cluster boundaries (random data would not compress and qemu would store it plain).
PATTERN_LENGTHS = [4099, 65537, 8191, 131071, 509, 30011, 1021, 262147, 10007]
SEMI = 8
PATTERN_DIR = None


class SetupError(Exception):
    """Building the case's images with qemu failed: a harness or qemu problem."""


def human_cmd(argv, cwd=None):
    s = " ".join(shlex.quote(str(a)) for a in argv)
    return f"(cd {shlex.quote(cwd)} && {s})" if cwd else s


def run(argv, cwd, check=True, stdin=None):
    """Runs argv in cwd; returns (rc, stdout bytes, stderr text)."""
    def no_core():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    p = subprocess.run([str(a) for a in argv], cwd=cwd, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=CMD_TIMEOUT, preexec_fn=no_core,
                       env=dict(os.environ, LC_ALL="C"))
    err = p.stderr.decode("utf-8", "replace")
    if check and p.returncode != 0:
        raise SetupError(f"{human_cmd(argv, cwd)} exited {p.returncode}: {err.strip()[:500]}")
    return p.returncode, p.stdout, err


# ---------------------------------------------------------------------------
# Building images: a tiny DSL over qemu-img and qemu-io

def W(off, length, pat=0):
    """qemu-io command: write pattern file `pat` at off."""
    return f"write -q -s {PATTERN_DIR}/pat{pat} {off} {length}"


def WC(off, length, pat=0):
    """qemu-io command: compressed write (cluster aligned, or up to the end)."""
    return f"write -q -c -s {PATTERN_DIR}/pat{pat} {off} {length}"


def P(byte, off, length):
    return f"write -q -P {byte} {off} {length}"


def Z(off, length):
    """Zero write: keeps allocated clusters allocated (zero-alloc) on v3."""
    return f"write -q -z {off} {length}"


def ZU(off, length):
    """Zero write that may unmap."""
    return f"write -q -z -u {off} {length}"


def D(off, length):
    return f"discard -q {off} {length}"


class Builder:
    def __init__(self, d):
        self.dir = d

    def path(self, name):
        return os.path.join(self.dir, name)

    def qemu_img(self, *args):
        return run([QEMU_IMG, *args], self.dir)

    def create(self, name, size, opts=None, fmt="qcow2", backing=None, bfmt=None):
        args = ["create", "-q", "-f", fmt]
        if opts:
            args += ["-o", opts]
        if backing is not None:
            args += ["-b", backing]
            if bfmt:
                args += ["-F", bfmt]
        os.makedirs(os.path.dirname(self.path(name)) or self.dir, exist_ok=True)
        self.qemu_img(*args, name, str(size))
        return name

    def io(self, img, *cmds, fmt=None, may_abort=False):
        argv = [QEMU_IO]
        if fmt:
            argv += ["-f", fmt]
        for c in cmds:
            argv += ["-c", c]
        argv.append(img)
        rc, out, err = run(argv, self.dir, check=False)
        bad = rc != 0 and not (may_abort and rc < 0)
        if bad or "failed" in err or "error" in err.lower():
            raise SetupError(f"{human_cmd(argv, self.dir)} exited {rc}: {err.strip()[:500]}")

    def raw(self, name, size, chunks=()):
        """A sparse raw file with pattern data at (off, len, pat) chunks."""
        with open(self.path(name), "wb") as f:
            f.truncate(size)
            for off, length, pat in chunks:
                f.seek(off)
                f.write(pattern_bytes(pat, length))
        return name

    def poke(self, name, off, data):
        with open(self.path(name), "r+b") as f:
            f.seek(off)
            f.write(data)


def pattern_bytes(pat, length):
    with open(f"{PATTERN_DIR}/pat{pat}", "rb") as f:
        p = f.read()
    return (p * (length // len(p) + 1))[:length]


class Target:
    """What a case checks: img (path relative to the case folder), its format,
    internal snapshot names, whether it is huge and sparse, and extra path spellings
    under which info/map are compared too."""
    def __init__(self, img, fmt="qcow2", snapshots=(), big=False, alt_paths=(),
                 compressed=False, expect=()):
        self.img, self.fmt, self.snapshots = img, fmt, list(snapshots)
        self.big, self.alt_paths = big, list(alt_paths)
        self.compressed = compressed   # the case means to hold compressed clusters
        self.expect = list(expect)     # (zero, data) pairs qemu-img map must show on
                                       # some extent with an offset: the case's point


CASES = []


def case(name):
    def deco(fn):
        CASES.append((name, fn))
        return fn
    return deco


def add(name, fn):
    CASES.append((name, fn))


def std_ops(cs, size, compressed=True):
    """The common workload for an image of `size` bytes (>= 14 clusters): data
    with unaligned edges, zero writes on allocated (zero-alloc on v3) and
    unallocated clusters, a discard, compressed clusters and a tail write."""
    assert size >= 14 * cs
    ops = [
        W(0, cs + cs // 2 + 1000, 0),            # cluster 0, half of 1, unaligned end
        W(2 * cs + 100, cs - 100 + 333, 1),      # unaligned start, spills into 3
        W(4 * cs, 2 * cs, 2), Z(5 * cs, cs),     # zero over an allocated cluster
        Z(4 * cs + 512, 1024),                   # partial zero: written as zero bytes
        W(7 * cs, cs, 3), D(7 * cs, cs),         # discarded cluster
        Z(9 * cs, cs),                           # zero over an unallocated cluster
        W(size - 1000, 1000, 5),                 # the last bytes
    ]
    if compressed:
        ops.append(WC(10 * cs, 2 * cs, SEMI))    # two compressed clusters
    return ops


# ---------------------------------------------------------------------------
# Cluster sizes x compat versions

def _cs_case(cs, compat, odd):
    def build(b):
        size = 14 * cs + (cs // 2 + 512 if odd else 0)
        if cs == 512 and odd:
            size = 14 * cs + 512 + 512   # sizes must be multiples of 512
        img = b.create("img.qcow2", size, f"cluster_size={cs},compat={compat}")
        b.io(img, *std_ops(cs, size))
        return Target(img, compressed=True)
    return build


for _cs, _cn in [(512, "512"), (4 * KiB, "4k"), (64 * KiB, "64k"), (2 * MiB, "2m")]:
    for _compat, _vn in [("1.1", "v3"), ("0.10", "v2")]:
        add(f"cs{_cn}_{_vn}", _cs_case(_cs, _compat, False))
    add(f"cs{_cn}_v3_oddsize", _cs_case(_cs, "1.1", True))


# ---------------------------------------------------------------------------
# Refcount widths

def _refcount_case(bits):
    def build(b):
        cs = 64 * KiB
        size = 16 * cs
        img = b.create("img.qcow2", size, f"refcount_bits={bits}")
        # compressed clusters share host clusters: too many references for 1 or 2 bits
        b.io(img, *std_ops(cs, size, compressed=bits > 2))
        snaps = []
        if bits > 1:   # a 1-bit refcount cannot share a cluster
            b.qemu_img("snapshot", "-c", "s1", img)
            b.io(img, W(cs + 4096, 8192, 6), Z(4 * cs, cs), D(0, cs))
            snaps = ["s1"]
        return Target(img, snapshots=snaps, compressed=bits > 2)
    return build


for _bits in [1, 2, 4, 8, 16, 32, 64]:
    add(f"refcount_bits_{_bits}", _refcount_case(_bits))


# ---------------------------------------------------------------------------
# Compression

# Raw sources mix incompressible data (stored plain by qemu), repeating data and
# semi-compressible data; each case checks that compressed clusters really exist.
COMPRESS_SRC = [(0, 700 * KiB, SEMI), (1 * MiB + 4096, 300 * KiB, 1),
                (2 * MiB, 200 * KiB, 2), (3 * MiB - 4096, 4608, SEMI)]


@case("compress_convert_zlib")
def _(b):
    b.raw("src.raw", 3 * MiB + 512, COMPRESS_SRC)
    b.qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-c", "src.raw", "img.qcow2")
    return Target("img.qcow2", compressed=True)


@case("compress_convert_zstd")
def _(b):
    b.raw("src.raw", 3 * MiB + 512, COMPRESS_SRC)
    b.qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
               "src.raw", "img.qcow2")
    return Target("img.qcow2", compressed=True)


@case("compress_convert_zstd_cs2m")
def _(b):
    b.raw("src.raw", 6 * MiB, [(0, 2 * MiB + 5, 3), (2 * MiB + 77, 3 * MiB, SEMI)])
    b.qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-c",
               "-o", "compression_type=zstd,cluster_size=2M", "src.raw", "img.qcow2")
    return Target("img.qcow2", compressed=True)


@case("compress_convert_zlib_cs512")
def _(b):
    b.raw("src.raw", 1 * MiB, [(0, 300 * KiB, SEMI), (512 * KiB + 100, 3000, 2)])
    b.qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-c", "-o", "cluster_size=512",
               "src.raw", "img.qcow2")
    return Target("img.qcow2", compressed=True)


@case("compress_io_zlib_cs4k")
def _(b):
    img = b.create("img.qcow2", 1 * MiB + 3 * 512, "cluster_size=4k")
    # many compressed clusters of odd lengths (some straddle host clusters),
    # incompressible ones, one compressed then overwritten, one zeroed, and a
    # compressed partial cluster at the image end
    b.io(img, WC(0, 256 * KiB, SEMI), P(0x5a, 64 * KiB, 4096), "write -q -c -P 0x11 512k 8192",
         WC(256 * KiB, 4096, 1), WC(384 * KiB, 8192, SEMI), W(384 * KiB + 100, 200, 2),
         Z(16 * KiB, 4096), WC(1 * MiB, 3 * 512, SEMI))
    return Target(img, compressed=True)


@case("compress_io_zstd")
def _(b):
    img = b.create("img.qcow2", 2 * MiB, "compression_type=zstd")
    b.io(img, WC(0, 256 * KiB, SEMI), "write -q -c -P 0x33 256k 64k", W(320 * KiB, 64 * KiB, 1),
         WC(1 * MiB, 192 * KiB, 5), W(1 * MiB + 65536 + 3, 10, 6), D(1 * MiB + 128 * KiB, 64 * KiB))
    return Target(img, compressed=True)


@case("compress_zstd_extl2")
def _(b):
    img = b.create("img.qcow2", 2 * MiB, "compression_type=zstd,extended_l2=on")
    b.io(img, WC(0, 192 * KiB, SEMI), W(64 * KiB + 2048, 4096, 1), Z(128 * KiB + 6144, 2048))
    return Target(img, compressed=True)


@case("compress_snapshot_cs512")
def _(b):
    img = b.create("img.qcow2", 512 * KiB, "cluster_size=512")
    b.io(img, WC(0, 128 * KiB, SEMI))
    b.qemu_img("snapshot", "-c", "s", img)
    b.io(img, W(1024, 512, 1), Z(2048, 1024), WC(8 * KiB, 1 * KiB, 2))
    return Target(img, snapshots=["s"], compressed=True)


# ---------------------------------------------------------------------------
# Extended L2 (subclusters)

@case("extl2_64k_partial")
def _(b):
    img = b.create("img.qcow2", 2 * MiB + 512, "extended_l2=on")
    b.io(img,
         W(4096, 4096, 0),                      # 4k aligned inside cluster 0
         W(64 * KiB + 1000, 3000, 1),           # unaligned inside cluster 1
         W(128 * KiB, 64 * KiB, 2),             # full cluster 2 ...
         Z(128 * KiB + 2048, 2048),             # ... a zero subcluster in it
         Z(128 * KiB + 10240, 6144),            # three more
         Z(128 * KiB + 30000, 5000),            # unaligned zero
         Z(192 * KiB + 6144, 4096),             # zero subclusters in an unallocated cluster
         W(256 * KiB, 128 * KiB, 3), D(256 * KiB, 64 * KiB),   # discard a whole cluster
         W(512 * KiB + 62 * KiB, 4 * KiB, 4),   # straddles two clusters' subclusters
         W(2 * MiB - 1024, 1536, 5))            # tail, crosses into the odd 512 bytes
    return Target(img)


@case("extl2_16k")
def _(b):
    img = b.create("img.qcow2", 1 * MiB, "extended_l2=on,cluster_size=16k")  # 512 B subclusters
    b.io(img, W(512, 512, 0), W(3000, 100, 1), W(16 * KiB + 7 * 512, 9 * 512, 2),
         Z(16 * KiB + 8 * 512, 512), W(64 * KiB, 16 * KiB, 3), Z(64 * KiB, 8 * KiB))
    return Target(img)


@case("extl2_2m")
def _(b):
    img = b.create("img.qcow2", 10 * MiB, "extended_l2=on,cluster_size=2M")  # 64 KiB subclusters
    b.io(img, W(100 * KiB, 50 * KiB, 0), W(2 * MiB - 4096, 8192, 1),
         Z(4 * MiB, 128 * KiB), W(4 * MiB + 192 * KiB, 70 * KiB, 2), WC(6 * MiB, 2 * MiB, SEMI),
         W(8 * MiB, 2 * MiB, 3), D(8 * MiB, 2 * MiB))
    return Target(img, compressed=True)


@case("extl2_backing")
def _(b):
    base = b.create("base.qcow2", 1 * MiB)
    b.io(base, W(0, 1 * MiB, 0))
    top = b.create("top.qcow2", 1 * MiB, "extended_l2=on", backing="base.qcow2", bfmt="qcow2")
    # partially allocated clusters: the other subclusters still read from base
    b.io(top, W(4096, 4096, 1), W(64 * KiB + 333, 3000, 2), Z(128 * KiB + 2048, 4096),
         Z(192 * KiB, 64 * KiB), W(256 * KiB, 64 * KiB, 3), D(256 * KiB, 64 * KiB),
         ZU(320 * KiB + 4096, 2048))
    return Target(top)


@case("extl2_snapshot")
def _(b):
    img = b.create("img.qcow2", 1 * MiB, "extended_l2=on")
    b.io(img, W(0, 192 * KiB, 0), W(300 * KiB, 4096, 1))
    b.qemu_img("snapshot", "-c", "s1", img)
    b.io(img, W(2048, 2048, 2), Z(64 * KiB + 4096, 4096), W(300 * KiB + 4096, 4096, 3))
    return Target(img, snapshots=["s1"])


# ---------------------------------------------------------------------------
# Zero writes and discards

@case("zero_alloc_v3")
def _(b):
    img = b.create("img.qcow2", 2 * MiB)
    b.io(img, W(0, 1 * MiB, 0), Z(64 * KiB, 128 * KiB), ZU(256 * KiB, 64 * KiB),
         D(384 * KiB, 64 * KiB), Z(1 * MiB, 256 * KiB), Z(1000, 5000))
    return Target(img)


@case("zero_discard_v2")
def _(b):
    img = b.create("img.qcow2", 2 * MiB, "compat=0.10")
    b.io(img, W(0, 1 * MiB, 0), Z(64 * KiB, 128 * KiB), ZU(256 * KiB, 64 * KiB),
         D(384 * KiB, 64 * KiB), Z(1000, 5000))
    return Target(img)


# ---------------------------------------------------------------------------
# Odd virtual sizes

@case("oddsize_1m512")
def _(b):
    img = b.create("img.qcow2", 1 * MiB + 512)
    b.io(img, W(1 * MiB - 100, 612, 0), W(0, 4096, 1))
    return Target(img)


@case("oddsize_1m512_cs2m")
def _(b):
    img = b.create("img.qcow2", 1 * MiB + 512, "cluster_size=2M")
    b.io(img, W(1 * MiB - 100, 612, 0), Z(4096, 8192))
    return Target(img)


@case("oddsize_5m1536_v2")
def _(b):
    img = b.create("img.qcow2", 5 * MiB + 1536, "compat=0.10,cluster_size=4k")
    b.io(img, W(5 * MiB, 1536, 0), W(2 * MiB + 17, 100000, 1))
    return Target(img)


# ---------------------------------------------------------------------------
# Huge sparse images

@case("sparse_1t")
def _(b):
    img = b.create("img.qcow2", 1 * TiB)
    b.io(img, W(0, 100 * KiB, 0), W(512 * GiB - 3000, 70000, 1), Z(700 * GiB, 1 * MiB),
         W(1 * TiB - 1 * MiB - 777, 1 * MiB + 777, 2))
    return Target(img, big=True)


@case("sparse_1t_over_small_raw")
def _(b):
    b.raw("base.raw", 1 * MiB, [(0, 1 * MiB, 3)])
    img = b.create("img.qcow2", 1 * TiB, backing="base.raw", bfmt="raw")
    b.io(img, W(4096, 4096, 0), W(1 * TiB - 65536, 65536, 1))
    return Target(img, big=True)


@case("sparse_1t_extl2_cs2m")
def _(b):
    img = b.create("img.qcow2", 1 * TiB, "extended_l2=on,cluster_size=2M")
    b.io(img, W(64 * KiB, 64 * KiB, 0), W(300 * GiB + 3, 200 * KiB, 1),
         Z(1 * TiB - 2 * MiB, 64 * KiB), W(1 * TiB - 4096, 4096, 2))
    return Target(img, big=True)


# ---------------------------------------------------------------------------
# Backing chains

@case("chain3_qcow2")
def _(b):
    b.create("base.qcow2", 4 * MiB)
    b.io("base.qcow2", W(0, 4 * MiB, 0))
    b.create("mid.qcow2", 4 * MiB, "cluster_size=4k", backing="base.qcow2", bfmt="qcow2")
    b.io("mid.qcow2", W(64 * KiB + 512, 64 * KiB, 1), Z(1 * MiB, 64 * KiB), D(2 * MiB, 64 * KiB))
    b.create("top.qcow2", 4 * MiB, backing="mid.qcow2", bfmt="qcow2")
    # zero clusters and a discard in top hide data below
    b.io("top.qcow2", W(100 * KiB, 200 * KiB, 2), Z(3 * MiB, 128 * KiB), D(0, 64 * KiB),
         ZU(2 * MiB + 64 * KiB, 64 * KiB))
    return Target("top.qcow2", alt_paths=["ABS"])


@case("chain3_over_raw")
def _(b):
    b.raw("base.raw", 3 * MiB, [(0, 512 * KiB, 0), (2 * MiB, 512 * KiB + 3, 1)])
    b.create("mid.qcow2", 3 * MiB, backing="base.raw", bfmt="raw")
    b.io("mid.qcow2", W(256 * KiB, 512 * KiB, 2), Z(2 * MiB + 64 * KiB, 64 * KiB))
    b.create("top.qcow2", 3 * MiB, "compat=0.10", backing="mid.qcow2", bfmt="qcow2")
    b.io("top.qcow2", W(1 * MiB - 1000, 3000, 3), Z(0, 64 * KiB))
    return Target("top.qcow2", alt_paths=["ABS"])


@case("chain_backing_smaller")
def _(b):
    b.create("base.qcow2", 1 * MiB + 512)
    b.io("base.qcow2", W(0, 1 * MiB + 512, 0))
    b.create("top.qcow2", 3 * MiB, backing="base.qcow2", bfmt="qcow2")
    b.io("top.qcow2", W(2 * MiB, 4096, 1), W(512 * KiB, 1000, 2))
    return Target("top.qcow2")


@case("chain_backing_smaller_raw_unaligned")
def _(b):
    # the raw backing ends inside a cluster of the overlay
    b.raw("base.raw", 100 * KiB + 512, [(0, 100 * KiB + 512, 0)])
    b.create("top.qcow2", 1 * MiB, backing="base.raw", bfmt="raw")
    b.io("top.qcow2", W(64 * KiB, 1000, 1))
    return Target("top.qcow2")


@case("chain_backing_larger")
def _(b):
    b.create("base.qcow2", 4 * MiB)
    b.io("base.qcow2", W(0, 4 * MiB, 0))
    b.create("top.qcow2", 2 * MiB + 512, backing="base.qcow2", bfmt="qcow2")
    b.io("top.qcow2", W(1 * MiB, 4096, 1))
    return Target("top.qcow2")


@case("chain_relative_subdir")
def _(b):
    # names stored relative to each image's own folder; the top is opened as sub/top.qcow2
    b.create("sub/base/base.qcow2", 2 * MiB)
    b.io("sub/base/base.qcow2", W(0, 2 * MiB, 0))
    b.create("sub/mid.qcow2", 2 * MiB, backing="base/base.qcow2", bfmt="qcow2")
    b.io("sub/mid.qcow2", W(64 * KiB, 64 * KiB, 1))
    b.create("sub/top.qcow2", 2 * MiB, backing="mid.qcow2", bfmt="qcow2")
    b.io("sub/top.qcow2", W(128 * KiB, 64 * KiB, 2))
    return Target("sub/top.qcow2", alt_paths=["ABS"])


@case("chain_absolute_names")
def _(b):
    b.create("base.qcow2", 2 * MiB)
    b.io("base.qcow2", W(0, 1 * MiB, 0))
    b.create("top.qcow2", 2 * MiB, backing=b.path("base.qcow2"), bfmt="qcow2")
    b.io("top.qcow2", W(512 * KiB, 1 * MiB, 1))
    return Target("top.qcow2", alt_paths=["ABS"])


@case("chain_cs512_over_cs2m")
def _(b):
    b.create("base.qcow2", 4 * MiB, "cluster_size=2M")
    b.io("base.qcow2", W(1 * MiB, 2 * MiB, 0))
    b.create("top.qcow2", 4 * MiB, "cluster_size=512", backing="base.qcow2", bfmt="qcow2")
    b.io("top.qcow2", W(2 * MiB - 700, 1400, 1), Z(2 * MiB + 4096, 4096), WC(3 * MiB, 1024, 2))
    return Target("top.qcow2")


@case("chain_over_datafile_base")
def _(b):
    # the backing image keeps its data in an external data file
    b.create("base.qcow2", 2 * MiB, "data_file=base.data")
    b.io("base.qcow2", W(0, 2 * MiB, 0), Z(1 * MiB, 64 * KiB))
    b.create("top.qcow2", 2 * MiB, backing="base.qcow2", bfmt="qcow2")
    b.io("top.qcow2", W(64 * KiB, 64 * KiB, 1))
    return Target("top.qcow2")


@case("chain_5_deep_mixed")
def _(b):
    # v2, v3, extended L2, 4 KiB clusters and raw in one chain; each layer writes
    # its own stripe and zeroes part of the one below
    b.raw("l0.raw", 3 * MiB, [(0, 3 * MiB, 0)])
    layers = [("l1.qcow2", "compat=0.10", "l0.raw", "raw"),
              ("l2.qcow2", "extended_l2=on", "l1.qcow2", "qcow2"),
              ("l3.qcow2", "cluster_size=4k", "l2.qcow2", "qcow2"),
              ("l4.qcow2", "extended_l2=on,cluster_size=128k", "l3.qcow2", "qcow2")]
    for i, (name, opts, back, bfmt) in enumerate(layers, 1):
        b.create(name, 3 * MiB, opts, backing=back, bfmt=bfmt)
        b.io(name, W(i * 300 * KiB + i * 1000, 100 * KiB, i), Z(i * 300 * KiB - 64 * KiB, 32 * KiB))
    return Target("l4.qcow2")


@case("rebase_safe")
def _(b):
    b.create("old.qcow2", 2 * MiB)
    b.io("old.qcow2", W(0, 2 * MiB, 0))
    b.create("new.qcow2", 2 * MiB)
    b.io("new.qcow2", W(512 * KiB, 512 * KiB, 1))
    b.create("top.qcow2", 2 * MiB, backing="old.qcow2", bfmt="qcow2")
    b.io("top.qcow2", W(64 * KiB, 4096, 2))
    b.qemu_img("rebase", "-q", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2")
    return Target("top.qcow2")


@case("rebase_unsafe")
def _(b):
    b.create("a.qcow2", 2 * MiB)
    b.io("a.qcow2", W(0, 2 * MiB, 0))
    b.raw("b.raw", 1 * MiB, [(0, 1 * MiB, 1)])
    b.create("top.qcow2", 2 * MiB, backing="a.qcow2", bfmt="qcow2")
    b.io("top.qcow2", W(64 * KiB, 4096, 2))
    b.qemu_img("rebase", "-q", "-u", "-b", "b.raw", "-F", "raw", "top.qcow2")
    return Target("top.qcow2")


@case("rebase_flatten")
def _(b):
    b.create("base.qcow2", 2 * MiB)
    b.io("base.qcow2", W(0, 1 * MiB, 0))
    b.create("top.qcow2", 2 * MiB, backing="base.qcow2", bfmt="qcow2")
    b.io("top.qcow2", W(64 * KiB, 4096, 2))
    b.qemu_img("rebase", "-q", "-b", "", "top.qcow2")
    return Target("top.qcow2")


@case("commit_into_mid")
def _(b):
    b.create("base.qcow2", 2 * MiB)
    b.io("base.qcow2", W(0, 2 * MiB, 0))
    b.create("mid.qcow2", 2 * MiB, backing="base.qcow2", bfmt="qcow2")
    b.io("mid.qcow2", W(0, 64 * KiB, 1))
    b.create("top.qcow2", 2 * MiB, backing="mid.qcow2", bfmt="qcow2")
    b.io("top.qcow2", W(1 * MiB, 128 * KiB, 2), Z(32 * KiB, 64 * KiB))
    b.qemu_img("commit", "-q", "top.qcow2")
    return Target("mid.qcow2")


# ---------------------------------------------------------------------------
# External data files

@case("datafile_raw_on")
def _(b):
    img = b.create("img.qcow2", 2 * MiB, "data_file=img.data,data_file_raw=on")
    b.io(img, W(0, 100 * KiB, 0), Z(128 * KiB, 64 * KiB), W(1 * MiB + 5, 5000, 1),
         D(512 * KiB, 64 * KiB))
    return Target(img)


@case("datafile_raw_off")
def _(b):
    img = b.create("img.qcow2", 2 * MiB, "data_file=img.data,data_file_raw=off")
    b.io(img, W(0, 100 * KiB, 0), Z(128 * KiB, 64 * KiB), W(1 * MiB + 5, 5000, 1),
         W(512 * KiB, 64 * KiB, 2), D(512 * KiB, 64 * KiB))
    return Target(img)


@case("datafile_relative_name")
def _(b):
    # A relative data file name in a subfolder. QEMU 7.2 resolves a relative data_file
    # against its working directory, not the image's folder as it does for backing
    # files (and as qcowimg does for both), so the image sits in the folder both tools
    # run in, where the two rules agree; the ABS spelling checks the name is still
    # resolved against the image's folder when the image is named by absolute path.
    os.makedirs(b.path("data"))
    img = b.create("img.qcow2", 1 * MiB, "data_file=data/img.bin")
    b.io(img, W(4096, 200 * KiB, 0), Z(64 * KiB, 64 * KiB))
    return Target(img, alt_paths=["ABS"])


@case("datafile_extl2_backing")
def _(b):
    b.create("base.qcow2", 1 * MiB)
    b.io("base.qcow2", W(0, 1 * MiB, 0))
    img = b.create("img.qcow2", 1 * MiB, "data_file=img.data,extended_l2=on",
                   backing="base.qcow2", bfmt="qcow2")
    b.io(img, W(4096, 4096, 1), Z(64 * KiB + 2048, 2048), W(200 * KiB, 100 * KiB, 2))
    return Target(img)


# ---------------------------------------------------------------------------
# Internal snapshots

@case("snapshots_v3")
def _(b):
    img = b.create("img.qcow2", 2 * MiB)
    b.io(img, W(0, 512 * KiB, 0), WC(1 * MiB, 128 * KiB, 1))
    b.qemu_img("snapshot", "-c", "s1", img)
    b.io(img, W(64 * KiB + 5, 100, 2), Z(128 * KiB, 64 * KiB), D(1 * MiB, 64 * KiB),
         W(1536 * KiB, 64 * KiB, 3))
    b.qemu_img("snapshot", "-c", "s2", img)
    b.io(img, W(0, 4096, 4), D(256 * KiB, 64 * KiB))
    return Target(img, snapshots=["s1", "s2"])


@case("snapshots_v2")
def _(b):
    img = b.create("img.qcow2", 2 * MiB, "compat=0.10")
    b.io(img, W(0, 512 * KiB, 0))
    b.qemu_img("snapshot", "-c", "first", img)
    b.io(img, W(64 * KiB + 5, 100, 2), Z(128 * KiB, 64 * KiB))
    b.qemu_img("snapshot", "-c", "second one", img)
    b.io(img, W(0, 4096, 4))
    return Target(img, snapshots=["first", "second one"])


@case("snapshots_resize")
def _(b):
    img = b.create("img.qcow2", 1 * MiB)
    b.io(img, W(0, 1 * MiB, 0))
    b.qemu_img("snapshot", "-c", "small", img)
    b.qemu_img("resize", "-q", img, "3M")
    b.io(img, W(2 * MiB, 512 * KiB, 1))
    b.qemu_img("snapshot", "-c", "big", img)
    b.qemu_img("resize", "-q", "--shrink", img, "1572864")
    return Target(img, snapshots=["small", "big"])


@case("snapshots_delete_apply")
def _(b):
    img = b.create("img.qcow2", 1 * MiB)
    b.io(img, P(1, 0, 256 * KiB))
    b.qemu_img("snapshot", "-c", "a", img)
    b.io(img, P(2, 64 * KiB, 64 * KiB))
    b.qemu_img("snapshot", "-c", "b", img)
    b.io(img, P(3, 128 * KiB, 64 * KiB))
    b.qemu_img("snapshot", "-c", "c", img)
    b.qemu_img("snapshot", "-d", "b", img)
    b.qemu_img("snapshot", "-a", "a", img)
    b.io(img, W(512 * KiB, 4096, 0))
    return Target(img, snapshots=["a", "c"])


@case("snapshot_table_at_eof")
def _(b):
    # qemu does not pad the last snapshot table entry to 8 bytes: when the table is
    # the last thing in the file, the file ends inside the padding
    img = b.create("img.qcow2", 1 * MiB)
    b.io(img, W(0, 64 * KiB, 0))
    b.qemu_img("snapshot", "-c", "s1", img)
    b.qemu_img("snapshot", "-c", "abcdef", img)
    if os.path.getsize(b.path(img)) % 8 == 0:
        raise SetupError("expected the file to end inside the snapshot table's padding")
    return Target(img, snapshots=["s1", "abcdef"])


# ---------------------------------------------------------------------------
# Persistent bitmaps, lazy refcounts, header flags

@case("bitmaps")
def _(b):
    img = b.create("img.qcow2", 4 * MiB)
    b.qemu_img("bitmap", "--add", img, "b-enabled")
    b.qemu_img("bitmap", "--add", "-g", "128k", img, "b-gran")
    b.qemu_img("bitmap", "--add", "--disable", img, "b-disabled")
    b.io(img, W(0, 300 * KiB, 0), Z(1 * MiB, 64 * KiB))
    b.qemu_img("bitmap", "--add", img, "later")
    b.qemu_img("bitmap", "--disable", img, "later")
    b.io(img, W(2 * MiB, 64 * KiB, 1))
    return Target(img)


@case("bitmaps_extl2_cs4k")
def _(b):
    img = b.create("img.qcow2", 1 * MiB, "cluster_size=16k,extended_l2=on")
    b.qemu_img("bitmap", "--add", "-g", "512", img, "fine")
    b.io(img, W(512, 1000, 0))
    b.qemu_img("bitmap", "--clear", img, "fine")
    return Target(img)


@case("lazy_refcounts_clean")
def _(b):
    img = b.create("img.qcow2", 2 * MiB, "lazy_refcounts=on")
    b.io(img, W(0, 300 * KiB, 0), Z(64 * KiB, 64 * KiB))
    return Target(img)


@case("lazy_refcounts_dirty_inuse_bitmap")
def _(b):
    # qemu-io aborts after a flush: the dirty bit stays set, the bitmap stays in-use
    img = b.create("img.qcow2", 2 * MiB, "lazy_refcounts=on")
    b.qemu_img("bitmap", "--add", img, "bm")
    b.io(img, W(0, 300 * KiB, 0), "flush", "abort", may_abort=True)
    return Target(img)


@case("corrupt_bit")
def _(b):
    img = b.create("img.qcow2", 1 * MiB)
    b.io(img, W(0, 64 * KiB, 0))
    b.poke(img, 72, (2).to_bytes(8, "big"))   # incompatible features: corrupt
    return Target(img)


# ---------------------------------------------------------------------------
# amend, convert, create options, resize

@case("amend_downgrade_v2")
def _(b):
    img = b.create("img.qcow2", 2 * MiB)
    b.io(img, W(0, 256 * KiB, 0), Z(64 * KiB, 64 * KiB), Z(1 * MiB, 64 * KiB))
    b.qemu_img("amend", "-q", "-o", "compat=0.10", img)
    return Target(img)


@case("amend_upgrade_refcount_lazy")
def _(b):
    img = b.create("img.qcow2", 2 * MiB, "compat=0.10")
    b.io(img, W(0, 256 * KiB, 0))
    b.qemu_img("amend", "-q", "-o", "compat=1.1", img)
    b.qemu_img("amend", "-q", "-o", "refcount_bits=4,lazy_refcounts=on", img)
    b.io(img, Z(0, 64 * KiB))
    return Target(img)


@case("convert_from_raw")
def _(b):
    b.raw("src.raw", 3 * MiB + 512, [(0, 4096, 0), (1 * MiB, 700 * KiB, 1), (3 * MiB, 512, 2)])
    b.qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "src.raw", "img.qcow2")
    return Target("img.qcow2")


@case("convert_from_raw_opts")
def _(b):
    b.raw("src.raw", 3 * MiB, [(0, 4096, 0), (1 * MiB, 700 * KiB, 1)])
    b.qemu_img("convert", "-q", "-S", "0", "-f", "raw", "-O", "qcow2",
               "-o", "cluster_size=512,refcount_bits=8", "src.raw", "img.qcow2")
    return Target("img.qcow2")


@case("convert_extl2_from_raw")
def _(b):
    b.raw("src.raw", 2 * MiB, [(2048, 2048, 0), (70000, 9000, 1), (1 * MiB, 1 * MiB, 2)])
    b.qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on",
               "src.raw", "img.qcow2")
    return Target("img.qcow2")


@case("convert_flatten_chain")
def _(b):
    b.create("base.qcow2", 2 * MiB)
    b.io("base.qcow2", W(0, 2 * MiB, 0))
    b.create("top.qcow2", 2 * MiB, backing="base.qcow2", bfmt="qcow2")
    b.io("top.qcow2", W(64 * KiB, 64 * KiB, 1), Z(512 * KiB, 512 * KiB))
    b.qemu_img("convert", "-q", "-O", "qcow2", "top.qcow2", "flat.qcow2")
    return Target("flat.qcow2")


@case("convert_with_backing_B")
def _(b):
    b.create("base.qcow2", 2 * MiB)
    b.io("base.qcow2", W(0, 2 * MiB, 0))
    b.create("top.qcow2", 2 * MiB, backing="base.qcow2", bfmt="qcow2")
    b.io("top.qcow2", W(64 * KiB, 64 * KiB, 1), Z(512 * KiB, 512 * KiB))
    b.qemu_img("convert", "-q", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2",
               "top.qcow2", "new.qcow2")
    return Target("new.qcow2")


@case("prealloc_metadata")
def _(b):
    # the host file is sparse: qemu-img map reports unwritten data clusters as zero
    img = b.create("img.qcow2", 2 * MiB, "preallocation=metadata")
    b.io(img, W(64 * KiB, 4096, 0), Z(128 * KiB, 64 * KiB))
    return Target(img, expect=[(True, True), (False, True)])


@case("prealloc_metadata_extl2")
def _(b):
    img = b.create("img.qcow2", 2 * MiB, "preallocation=metadata,extended_l2=on")
    b.io(img, W(64 * KiB + 2048, 2048, 0))
    return Target(img)


@case("prealloc_metadata_truncated")
def _(b):
    # data clusters past the end of the file: they read as zeroes, and qemu-img map
    # (its metadata-preallocation heuristic holds here) reports them zero
    img = b.create("img.qcow2", 2 * MiB, "preallocation=metadata")
    b.io(img, W(0, 64 * KiB, 0))
    os.truncate(b.path(img), 1 * MiB + 4096)
    return Target(img, expect=[(True, True)])


@case("sparse_copy_heuristic_on")
def _(b):
    # data clusters of zero bytes become holes in a sparse copy; with most data
    # clusters holes, qemu-img map assumes metadata preallocation and says zero
    img = b.create("orig.qcow2", 2 * MiB)
    b.io(img, P(0, 0, 1 * MiB), W(1 * MiB, 64 * KiB, 0))
    run(["cp", "--sparse=always", "orig.qcow2", "img.qcow2"], b.dir)
    return Target("img.qcow2", expect=[(True, True)])


@case("sparse_copy_heuristic_off")
def _(b):
    # one hole among fully allocated clusters: the heuristic does not hold, so
    # qemu-img map reports the hole as data, not zero
    img = b.create("orig.qcow2", 1 * MiB, "cluster_size=4k")
    b.io(img, W(0, 64 * KiB, 0), P(0, 128 * KiB, 4096))
    run(["cp", "--sparse=always", "orig.qcow2", "img.qcow2"], b.dir)
    return Target("img.qcow2", expect=[(False, True)])


@case("datafile_truncated")
def _(b):
    # clusters of the external data file past its end read as zeroes
    img = b.create("img.qcow2", 2 * MiB, "data_file=img.data")
    b.io(img, W(0, 128 * KiB, 0), W(1 * MiB, 256 * KiB, 1))
    os.truncate(b.path("img.data"), 1 * MiB + 64 * KiB + 1000)
    return Target(img)


@case("prealloc_falloc")
def _(b):
    img = b.create("img.qcow2", 2 * MiB, "preallocation=falloc")
    b.io(img, W(64 * KiB, 4096, 0))
    return Target(img)


@case("prealloc_full_v2")
def _(b):
    img = b.create("img.qcow2", 1 * MiB, "preallocation=full,compat=0.10")
    b.io(img, W(0, 1000, 0))
    return Target(img)


@case("resize_grow_shrink")
def _(b):
    img = b.create("img.qcow2", 1 * MiB)
    b.io(img, W(0, 1 * MiB, 0))
    b.qemu_img("resize", "-q", img, "+2M")
    b.io(img, W(2 * MiB + 100, 100, 1))
    b.qemu_img("resize", "-q", "--shrink", img, str(2 * MiB + 512))
    return Target(img)


@case("resize_l1_growth_cs512")
def _(b):
    # each L1 entry maps 32 KiB: growing from 1 MiB to 64 MiB moves the L1 table
    img = b.create("img.qcow2", 1 * MiB, "cluster_size=512")
    b.io(img, W(0, 1 * MiB, 0))
    b.qemu_img("resize", "-q", img, "64M")
    b.io(img, W(40 * MiB + 3, 70000, 1), W(64 * MiB - 512, 512, 2))
    return Target(img)


@case("cs512_scattered_64m")
def _(b):
    # 512 B clusters: each L2 table maps only 32 KiB, so many L2 tables
    img = b.create("img.qcow2", 64 * MiB, "cluster_size=512")
    rng = random.Random(7)
    ops = []
    for i in range(24):
        off = rng.randrange(0, 64 * MiB - 70000) & ~511
        ops.append(W(off, rng.choice([512, 1536, 33 * 1024, 65536]), i % 8))
    ops.append(Z(32 * MiB - 1024, 2048))
    b.io(img, *ops)
    return Target(img)


# ---------------------------------------------------------------------------
# Raw format (-f raw)

@case("raw_sparse")
def _(b):
    b.raw("img.raw", 2 * MiB + 512, [(0, 5000, 0), (1 * MiB, 64 * KiB, 1), (2 * MiB, 512, 2)])
    return Target("img.raw", fmt="raw")


@case("qcow2_file_as_raw")
def _(b):
    img = b.create("img.qcow2", 1 * MiB)
    b.io(img, W(0, 4096, 0))
    return Target(img, fmt="raw")


# ---------------------------------------------------------------------------
# Checks

class Checker:
    def __init__(self, name, d, target, rng):
        self.name, self.dir, self.t, self.rng = name, d, target, rng
        self.problems = []   # (reason, detail lines)
        self.ref_cmd = {}    # snapshot name (None: active image) -> qemu-img convert argv

    def fail(self, reason, *details):
        self.problems.append((reason, list(details)))

    def fmt_args(self):
        """Format options for qemu-img: always explicit, so qemu never probes."""
        return ["-f", self.t.fmt]

    def my_fmt_args(self):
        """Format options for qcowimg: none for qcow2, its default, so the
        default is what gets tested; -f raw for raw images."""
        return [] if self.t.fmt == "qcow2" else ["-f", self.t.fmt]

    def qcowimg(self, *args):
        argv = [QCOWIMG, *args]
        rc, out, err = run(argv, self.dir, check=False)
        return argv, rc, out, err

    def qcowimg_ok(self, what, *args):
        """Runs qcowimg; on failure records it and returns None, else stdout."""
        argv, rc, out, err = self.qcowimg(*args)
        if rc != 0:
            self.fail(f"{what}: qcowimg exited {rc}", f"command: {human_cmd(argv, self.dir)}",
                      *[f"stderr: {l}" for l in err.strip().splitlines()[:15]])
            return None
        return out

    # -- convert ---------------------------------------------------------
    def reference_raw(self, snapshot=None):
        """qemu-img's raw copy of the image (or of one snapshot)."""
        out = "ref.raw" if snapshot is None else f"ref.snap{self.t.snapshots.index(snapshot)}.raw"
        args = ["convert", "-q", *self.fmt_args()]
        if snapshot is not None:
            args += ["-l", f"snapshot.name={snapshot}"]
        argv = [QEMU_IMG, *args, "-O", "raw", self.t.img, out]
        run(argv, self.dir)
        self.ref_cmd[snapshot] = argv
        return os.path.join(self.dir, out)

    def check_convert(self, ref, vsize, snapshot=None):
        out = "out.raw" if snapshot is None else f"out.snap{self.t.snapshots.index(snapshot)}.raw"
        args = ["convert", *self.my_fmt_args()]
        label = "convert"
        if snapshot is not None:
            args += ["-l", f"snapshot.name={snapshot}"]
            label = f"convert -l snapshot.name={snapshot}"
        args += ["-O", "raw", self.t.img, out]
        if self.qcowimg_ok(label, *args) is None:
            return
        argv = human_cmd([QCOWIMG, *args], self.dir)
        path = os.path.join(self.dir, out)
        if not os.path.exists(path):
            self.fail(f"{label}: no output file", f"command: {argv}")
            return
        st = os.stat(path)
        if st.st_size != vsize:
            self.fail(f"{label}: output is {st.st_size} bytes, expected {vsize}", f"command: {argv}")
            return
        if self.t.big:
            cmp = [QEMU_IMG, "compare", "-q", "-f", "raw", "-F", self.t.fmt, out, self.t.img]
            if snapshot is not None:   # compare cannot select a snapshot: use qemu's raw copy
                cmp = [QEMU_IMG, "compare", "-q", "-f", "raw", "-F", "raw", out, ref]
            rc, so, se = run(cmp, self.dir, check=False)
            if rc != 0:
                rc2, so2, _ = run([c for c in cmp if c != "-q"], self.dir, check=False)
                self.fail(f"{label}: differs from qemu's view (qemu-img compare exit {rc})",
                          f"command: {argv}", f"check: {human_cmd(cmp, self.dir)}",
                          so2.decode(errors="replace").strip() + se.strip())
            if st.st_blocks * 512 > SPARSE_LIMIT:
                self.fail(f"{label}: output not sparse: {st.st_blocks * 512} bytes allocated "
                          f"of {vsize}", f"command: {argv}")
            return
        diff = first_difference(ref, path)
        if diff is not None:
            self.fail(f"{label}: differs from qemu-img convert at guest offset {diff[0]} "
                      f"(qemu {diff[1]}, qcowimg {diff[2]})", f"command: {argv}",
                      f"reference: {human_cmd(self.ref_cmd[snapshot], self.dir)}")

    # -- read -------------------------------------------------------------
    def read_plan(self, vsize, cs, sub, bounds, count):
        rng = self.rng
        plan = []

        def add(off, length):
            off = max(0, min(off, vsize - 1))
            length = max(1, min(length, vsize - off, MAX_READ))
            plan.append((off, length))

        nclusters = max(1, vsize // cs)
        add(0, rng.randint(1, cs + sub + 3))                          # from the start
        k = rng.randrange(1, max(2, min(nclusters, 1 << 40)))         # across a cluster edge
        add(k * cs - rng.randint(1, min(cs, 4096)), rng.randint(2, min(2 * cs, 300 * KiB)))
        if sub < cs:                                                 # across subcluster edges
            j = rng.randrange(1, max(2, min(vsize // sub, 1 << 40)))
            add(j * sub - rng.randint(1, sub - 1), rng.randint(sub // 2, 3 * sub))
        else:
            add(rng.randrange(0, vsize) // 512 * 512, cs)            # one aligned cluster
        for _ in range(2):                                           # across map extents
            if bounds:
                bnd = rng.choice(bounds)
                add(bnd - rng.randint(1, 3000), rng.randint(2, 9000))
        off = rng.randrange(0, vsize)                                # anywhere
        add(off, rng.randint(1, min(3 * cs, 1 * MiB)))
        length = rng.randint(1, min(vsize, 70000))                   # the tail
        add(vsize - length, length)
        add(rng.randrange(0, vsize), 1)                              # one byte
        return plan[:count] if count < len(plan) else plan

    def check_reads(self, ref, plan, snapshot=None):
        with open(ref, "rb") as f:
            for off, length in plan:
                args = ["read", *self.my_fmt_args()]
                if snapshot is not None:
                    args += ["-l", f"snapshot.name={snapshot}"]
                args += [self.t.img, str(off), str(length)]
                label = f"read {off} {length}" + (f" (snapshot {snapshot})" if snapshot else "")
                out = self.qcowimg_ok(label, *args)
                if out is None:
                    continue
                f.seek(off)
                want = f.read(length)
                if out != want:
                    i = next((i for i in range(min(len(out), len(want))) if out[i] != want[i]),
                             min(len(out), len(want)))
                    self.fail(f"{label}: got {len(out)} bytes, first difference at guest offset "
                              f"{off + i} (qemu {want[i:i+1].hex() or 'EOF'}, "
                              f"qcowimg {out[i:i+1].hex() or 'EOF'})",
                              f"command: {human_cmd([QCOWIMG, *args], self.dir)}")

    # -- info / map ---------------------------------------------------------
    def json_of(self, who, argv):
        rc, out, err = run(argv, self.dir, check=False)
        if rc != 0:
            if who == "qemu":
                raise SetupError(f"{human_cmd(argv, self.dir)} exited {rc}: {err.strip()[:300]}")
            self.fail(f"{argv[1]}: qcowimg exited {rc}", f"command: {human_cmd(argv, self.dir)}",
                      *[f"stderr: {l}" for l in err.strip().splitlines()[:15]])
            return None
        try:
            return json.loads(out)
        except ValueError as e:
            if who == "qemu":
                raise SetupError(f"qemu output not JSON: {e}")
            self.fail(f"{argv[1]}: qcowimg output is not JSON ({e})",
                      f"command: {human_cmd(argv, self.dir)}",
                      f"output: {out[:400].decode(errors='replace')!r}")
            return None

    def check_info(self, path):
        """Exact comparison. Nothing is normalized: both tools get the same path
        argument from the same folder, so filename and full-backing-filename must
        agree, and actual-size is the image file's allocated bytes (st_blocks*512)
        for both, since neither tool writes. Returns qemu's info."""
        q = self.json_of("qemu", [QEMU_IMG, "info", *self.fmt_args(), "--output=json", path])
        argv = [QCOWIMG, "info", *self.my_fmt_args(), "--output=json", path]
        m = self.json_of("qcowimg", argv)
        if m is not None:
            diffs = json_diff(q, m, "")
            if diffs:
                self.fail(f"info {path}: {len(diffs)} key(s) differ: "
                          + ", ".join(d[0] or "<root>" for d in diffs[:8]),
                          f"command: {human_cmd(argv, self.dir)}",
                          *[f"{k or '<root>'}: qemu={a} qcowimg={b}" for k, a, b in diffs[:20]])
        return q

    def check_map(self, path):
        q = self.json_of("qemu", [QEMU_IMG, "map", *self.fmt_args(), "--output=json", path])
        argv = [QCOWIMG, "map", *self.my_fmt_args(), "--output=json", path]
        m = self.json_of("qcowimg", argv)
        if m is not None and m != q:
            details = [f"command: {human_cmd(argv, self.dir)}"]
            if not isinstance(m, list):
                details.append(f"qcowimg printed a {type(m).__name__}, not a list")
            else:
                i = next((i for i in range(min(len(q), len(m))) if q[i] != m[i]),
                         min(len(q), len(m)))
                details.append(f"{len(q)} qemu entries, {len(m)} qcowimg entries; first "
                               f"difference at entry {i}")
                for j in range(max(0, i - 1), min(max(len(q), len(m)), i + 3)):
                    details.append(f"  [{j}] qemu:    {compact(q[j]) if j < len(q) else '-'}")
                    details.append(f"  [{j}] qcowimg: {compact(m[j]) if j < len(m) else '-'}")
            self.fail(f"map {path}: differs from qemu-img map", *details)
        return q

    # -- all of it --------------------------------------------------------------
    def run_all(self):
        paths = [self.t.img] + [os.path.join(self.dir, self.t.img) if p == "ABS" else p
                                for p in self.t.alt_paths]
        info = None
        qmap = None
        for p in paths:
            i = self.check_info(p)
            mp = self.check_map(p)
            if info is None:
                info, qmap = i, mp
        vsize = info["virtual-size"]
        cs = info.get("cluster-size", 4096)
        ext = info.get("format-specific", {}).get("data", {}).get("extended-l2", False)
        sub = cs // 32 if ext else cs
        bounds = sorted({e["start"] for e in qmap if 0 < e["start"] < vsize} |
                        {e["start"] + e["length"] for e in qmap
                         if 0 < e["start"] + e["length"] < vsize})
        ref = self.reference_raw()
        self.check_convert(ref, vsize)
        self.check_reads(ref, self.read_plan(vsize, cs, sub, bounds, READS_PER_CASE))
        if self.t.compressed and not any(e["data"] and e["depth"] == 0 and "offset" not in e
                                         for e in qmap):
            raise SetupError("the case means to test compressed clusters but qemu-img map "
                             "shows none")
        for zero, data in self.t.expect:
            if not any(e["zero"] == zero and e["data"] == data and "offset" in e for e in qmap):
                raise SetupError(f"the case means qemu-img map to show an extent with "
                                 f"zero={zero}, data={data} and an offset, but it shows none")
        names = [s["name"] for s in info.get("snapshots", [])]
        for s in self.t.snapshots:
            if s not in names:
                raise SetupError(f"snapshot {s!r} missing from qemu-img info")
        for s in self.t.snapshots:
            sref = self.reference_raw(snapshot=s)
            ssize = os.path.getsize(sref)
            self.check_convert(sref, ssize, snapshot=s)
            self.check_reads(sref, self.read_plan(ssize, cs, sub, bounds, 2), snapshot=s)


def compact(x):
    return json.dumps(x, sort_keys=True, separators=(",", ":"))


def json_diff(a, b, path):
    """Differences between qemu's value a and qcowimg's b: [(keypath, a, b)]."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else k
            if k not in b:
                out.append((p, compact(a[k]), "<missing>"))
            elif k not in a:
                out.append((p, "<missing>", compact(b[k])))
            else:
                out += json_diff(a[k], b[k], p)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += json_diff(x, y, f"{path}[{i}]")
        return out
    # bool is a subclass of int in Python: 1 must not pass for true
    if a != b or type(a) is not type(b):
        return [(path, compact(a), compact(b))]
    return []


def first_difference(p1, p2, chunk=1 << 20):
    """(offset, byte in p1, byte in p2) of the first difference, or None."""
    with open(p1, "rb") as f1, open(p2, "rb") as f2:
        off = 0
        while True:
            a, b = f1.read(chunk), f2.read(chunk)
            if a != b:
                n = min(len(a), len(b))
                i = next((i for i in range(n) if a[i] != b[i]), n)
                return off + i, a[i:i+1].hex() or "EOF", b[i:i+1].hex() or "EOF"
            if not a:
                return None
            off += len(a)


def run_case(name, fn, root, seed):
    d = os.path.join(root, name)
    os.makedirs(d)
    try:
        target = fn(Builder(d))
        chk = Checker(name, d, target, random.Random(f"{seed}:{name}"))
        chk.run_all()
    except SetupError as e:
        return name, [(f"setup: {e}", [])], d
    except subprocess.TimeoutExpired as e:
        return name, [(f"timeout after {e.timeout}s: {human_cmd(e.cmd, d)}", [])], d
    except Exception as e:   # a harness bug: report it as a failure, never pass
        return name, [(f"harness error: {e!r}", traceback.format_exc().splitlines())], d
    return name, chk.problems, d


def make_patterns(root, seed):
    global PATTERN_DIR
    PATTERN_DIR = os.path.join(root, "patterns")
    os.makedirs(PATTERN_DIR)
    rng = random.Random(f"{seed}:patterns")
    for i, n in enumerate(PATTERN_LENGTHS):
        bits = 4 if i == SEMI else 8
        with open(os.path.join(PATTERN_DIR, f"pat{i}"), "wb") as f:
            f.write(bytes(rng.getrandbits(bits) * (3 if bits == 4 else 1) for _ in range(n)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    suite.add_common_args(ap)
    ap.add_argument("--seed", type=int, default=int(os.environ.get("INTEROP_SEED", "20240611")))
    args = ap.parse_args()
    if args.list:
        print("\n".join(n for n, _ in CASES))
        return 0
    selected = suite.select(CASES, args.k)
    if selected is None:
        return suite.USAGE
    bad = suite.check_needs({"QCOWIMG": QCOWIMG}, (QEMU_IMG, QEMU_IO))
    if bad is not None:
        return bad

    def task(name, fn, root):
        return lambda: suite.Outcome(*run_case(name, fn, root, args.seed))

    with suite.Scratch("qcowd-interop-", args.keep) as scratch:
        print(f"# seed {args.seed} (rerun with --seed {args.seed}); qcowimg={QCOWIMG}; dir {scratch.root}",
              flush=True)
        make_patterns(scratch.root, args.seed)
        passed, failed, _ = suite.run_all(scratch, [task(n, fn, scratch.root) for n, fn in selected], args.j)
    return suite.summary(passed, failed)


if __name__ == "__main__":
    sys.exit(main())
