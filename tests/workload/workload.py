#!/usr/bin/python3
"""workload.py: random write workloads through `qcowimg`, checked by qemu after every op.

Each case makes an image, either with `qcowimg create` (one case per create option:
cluster sizes 512 B..2 MiB, compat 0.10/1.1, refcount_bits 1..64, extended L2, zlib and
zstd, lazy refcounts, metadata preallocation, external data files, overlays) or with
qemu-img/qemu-io (compressed clusters, extended L2 with subcluster data, zero
clusters, internal snapshots, persistent bitmaps, overlays on 2- and 3-deep chains
over qcow2 and raw bases, a v2 overlay). Then a seeded random workload runs through
`qcowimg write` (1 byte .. 300 KiB of random data at random offsets: anywhere, in a
hot area so data gets overwritten, cluster aligned, at the tail), `qcowimg write -c`
(whole clusters, mostly compressible data), `qcowimg zero` and `qcowimg discard`,
while a raw reference file is kept in step. After every op (--check-every):
  `qemu-img check` exit 0 (no corruptions, no leaks) and
  `qemu-img compare -f raw -F qcow2 REF IMG` equal.
The reference follows the documented rules and never asks qemu, except where the
rules leave a choice: a discard frees whole clusters (v3: they read zeroes, even over
a backing file; v2: the backing file, or zeroes, shows through); bytes of partial
clusters stay as they were, except that whole subclusters of an extended-L2 image and
the complete short cluster at the tail of an odd-sized disk may or may not be
zeroed. For those units qemu's view decides, and it must be one of the two.
At the end: `qcowimg check` exit 0, `qcowimg convert` equals the reference (the
engine reads what it wrote), no dirty or corrupt flag, every internal snapshot reads
as before the workload, and persistent bitmaps are honest: an enabled bitmap that
still claims to be consistent must have every written granule set, a disabled one
must be unchanged. Cases made by `qcowimg create` first check that `qemu-img info
--output=json` reports exactly the options asked (and the defaults for the rest).

A failing case keeps its folder with initial/ (the images before the workload),
ops/ (each write's data) and replay.sh, which repeats the ops up to the failure.

Environment: QCOWIMG (the binary under test, required), QEMU_IMG, QEMU_IO.
Usage: workload.py [-k NAME]... [-j N] [--seed N] [--ops N] [--check-every N] [--keep] [--list]
Prints `ok NAME` or `FAIL NAME: reason` per case, then `N passed, M failed`; exits 1
if anything failed, 2 on bad usage, 77 (CTest's skip code) without qemu-img/qemu-io.
"""

import argparse
import json
import os
import random
import resource
import shlex
import shutil
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
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")
CMD_TIMEOUT = 300
MAX_WRITE = 300 * KiB
DEFAULT_OPS = 36


class SetupError(Exception):
    """Building the case's images with qemu failed: a harness or qemu problem."""


class Failure(Exception):
    def __init__(self, reason, *details):
        super().__init__(reason)
        self.reason, self.details = reason, list(details)


def human_cmd(argv, cwd=None, stdin=None):
    s = " ".join(shlex.quote(str(a)) for a in argv)
    if stdin:
        s += f" < {shlex.quote(stdin)}"
    return f"(cd {shlex.quote(cwd)} && {s})" if cwd else s


def no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(argv, cwd, data=None, check=True):
    """Runs argv in cwd with data on stdin; returns (rc, stdout bytes, stderr text).
    check: a non-zero exit raises SetupError (for commands that build the case)."""
    p = subprocess.run([str(a) for a in argv], cwd=cwd, input=data if data is not None else b"",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=CMD_TIMEOUT,
                       preexec_fn=no_core, env=dict(os.environ, LC_ALL="C"))
    err = p.stderr.decode("utf-8", "replace")
    if check and p.returncode != 0:
        raise SetupError(f"{human_cmd(argv, cwd)} exited {p.returncode}: {err.strip()[:500]}")
    return p.returncode, p.stdout, err


def parse_size(s):
    """qemu-img's size spelling: a number with an optional k/M/G suffix."""
    mult = {"k": KiB, "K": KiB, "M": MiB, "G": 1024 * MiB}.get(s[-1:], 1)
    return int(s[:-1] if mult > 1 else s) * mult


def semi_compressible(rng, n):
    """Random bytes from a 16-letter alphabet: compresses to about half."""
    return bytes(rng.getrandbits(4) * 3 for _ in range(n))


# ---------------------------------------------------------------------------
# Persistent bitmaps, read straight from the file (qemu-img has no way to dump them)

BME_IN_USE, BME_AUTO = 1, 2


def read_bitmaps(path):
    """(autoclear bitmaps bit, {name: (flags, granularity, set of dirty granule numbers)})."""
    with open(path, "rb") as f:
        hdr = f.read(104)
        magic, version = struct.unpack(">II", hdr[:8])
        cluster_bits = struct.unpack(">I", hdr[20:24])[0]
        size = struct.unpack(">Q", hdr[24:32])[0]
        if version < 3:
            return False, {}
        autoclear = struct.unpack(">Q", hdr[88:96])[0]
        hlen = struct.unpack(">I", hdr[100:104])[0]
        cs = 1 << cluster_bits
        f.seek(hlen)
        ext = f.read(cs - hlen)
        pos, bext = 0, None
        while pos + 8 <= len(ext):
            etype, elen = struct.unpack(">II", ext[pos:pos + 8])
            if etype == 0:
                break
            if etype == 0x23852875:
                bext = ext[pos + 8:pos + 8 + elen]
            pos += 8 + (elen + 7) // 8 * 8
        if bext is None:
            return bool(autoclear & 1), {}
        nb, _, dsize, doff = struct.unpack(">IIQQ", bext[:24])
        f.seek(doff)
        d = f.read(dsize)
        out, p = {}, 0
        for _ in range(nb):
            toff, tsize, flags, _type, gbits, nsize, xsize = struct.unpack(">QIIBBHI", d[p:p + 24])
            name = d[p + 24 + xsize:p + 24 + xsize + nsize].decode()
            p += (24 + xsize + nsize + 7) // 8 * 8
            gran = 1 << gbits
            f.seek(toff)
            table = struct.unpack(f">{tsize}Q", f.read(tsize * 8))
            bits_per_cluster = cs * 8
            ngran = (size + gran - 1) // gran
            dirty = set()
            for i, e in enumerate(table):
                first = i * bits_per_cluster
                count = min(bits_per_cluster, ngran - first)
                off = e & 0x00fffffffffffe00
                if off == 0:
                    if e & 1:
                        dirty.update(range(first, first + count))
                    continue
                f.seek(off)
                data = f.read(cs)
                for byte_i, byte in enumerate(data[:(count + 7) // 8]):
                    if byte:
                        for bit in range(8):
                            if byte >> bit & 1 and byte_i * 8 + bit < count:
                                dirty.add(first + byte_i * 8 + bit)
            out[name] = (flags, gran, dirty)
        return bool(autoclear & 1), out


# ---------------------------------------------------------------------------
# What a case sets up

class Work:
    """An image ready for the workload. img: top image (relative to the case folder);
    files: the files the workload changes (copied to initial/ for replay); backing_raw:
    raw file with the backing chain's guest view (what v2 discards reveal), or None;
    snapshots: names whose view must not change; bitmaps: check bitmap honesty;
    cprob: share of compressed writes; expect_info: what `qemu-img info` must say
    right after `qcowimg create` (None for images qemu made)."""
    def __init__(self, img, files=None, backing_raw=None, snapshots=(), bitmaps=False,
                 cprob=0.08, expect_info=None, ops_scale=1.0):
        self.img, self.files = img, list(files or [img])
        self.backing_raw, self.snapshots, self.bitmaps = backing_raw, list(snapshots), bitmaps
        self.cprob, self.expect_info, self.ops_scale = cprob, expect_info, ops_scale


class Builder:
    def __init__(self, d, rng):
        self.dir, self.rng = d, rng

    def path(self, name):
        return os.path.join(self.dir, name)

    def qemu_img(self, *args):
        return run([QEMU_IMG, *args], self.dir)

    def qemu_create(self, name, size, opts=None, backing=None, bfmt=None):
        args = ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else [])
        if backing:
            args += ["-b", backing, "-F", bfmt]
        self.qemu_img(*args, name, str(size))
        return name

    def io(self, img, *cmds):
        argv = [QEMU_IO]
        for c in cmds:
            argv += ["-c", c]
        rc, out, err = run([*argv, img], self.dir, check=False)
        text = out.decode(errors="replace") + err
        if rc != 0 or "failed" in text or "error" in text.lower():
            raise SetupError(f"{human_cmd([*argv, img], self.dir)} exited {rc}: {text.strip()[:400]}")

    def pattern(self, name, n, semi=False):
        """A pattern file for `qemu-io write -s` (random or semi-compressible bytes)."""
        p = self.path(name)
        with open(p, "wb") as f:
            f.write(semi_compressible(self.rng, n) if semi else self.rng.randbytes(n))
        return p

    def raw(self, name, size, chunks=()):
        with open(self.path(name), "wb") as f:
            f.truncate(size)
            for off, data in chunks:
                f.seek(off)
                f.write(data)
        return name

    def create(self, name, size=None, opts=None, backing=None, bfmt=None):
        """qcowimg create; returns the info expectations for it."""
        argv = [QCOWIMG, "create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else [])
        if backing:
            argv += ["-b", backing, "-F", bfmt]
        argv.append(name)
        if size is not None:
            argv.append(str(size))
        rc, _, err = run(argv, self.dir, check=False)
        if rc != 0:
            raise Failure(f"qcowimg create exited {rc}: {err.strip()[:300]}", f"command: {human_cmd(argv, self.dir)}")
        o = dict(kv.split("=", 1) for kv in opts.split(",")) if opts else {}
        v3 = o.get("compat", "1.1") == "1.1"
        data = {"compat": "1.1" if v3 else "0.10",
                "compression-type": o.get("compression_type", "zlib"),
                "refcount-bits": int(o.get("refcount_bits", 16))}
        if v3:
            data.update({"lazy-refcounts": o.get("lazy_refcounts") == "on", "corrupt": False,
                         "extended-l2": o.get("extended_l2") == "on"})
        if "data_file" in o:
            data["data-file"] = o["data_file"]
            data["data-file-raw"] = o.get("data_file_raw") == "on"
        top = {"cluster-size": parse_size(o.get("cluster_size", "65536")), "format": "qcow2", "dirty-flag": False,
               "format-specific": {"type": "qcow2", "data": data}}
        if size is not None:
            top["virtual-size"] = size
        if backing:
            top.update({"backing-filename": backing, "full-backing-filename": backing,
                        "backing-filename-format": bfmt})
        return top


CASES = []


def case(name):
    def deco(fn):
        CASES.append((name, fn))
        return fn
    return deco


# ---- images made by qcowimg create: one per option ----

def _created(name, size, opts, **kw):
    @case(name)
    def _(b):
        exp = b.create("img.qcow2", size, opts)
        files = ["img.qcow2"]
        if opts and "data_file=" in opts:
            files.append(dict(kv.split("=", 1) for kv in opts.split(","))["data_file"])
        return Work("img.qcow2", files=files, expect_info=exp, **kw)


_created("create-cs512", 8 * MiB, "cluster_size=512")
_created("create-cs4k", 32 * MiB, "cluster_size=4096")
_created("create-cs64k", 64 * MiB, None)
_created("create-cs2m", 64 * MiB, "cluster_size=2M", ops_scale=0.7)
_created("create-compat010", 32 * MiB, "compat=0.10")
_created("create-compat11", 32 * MiB, "compat=1.1")
for _bits in (1, 2, 4, 8, 16, 32, 64):
    _created(f"create-rc{_bits}", 16 * MiB, f"cluster_size=4096,refcount_bits={_bits}")
_created("create-rc1-cs512", 4 * MiB, "cluster_size=512,refcount_bits=1")
_created("create-rc1-compressed", 8 * MiB, "cluster_size=4096,refcount_bits=1", cprob=0.5)
_created("create-rc2-cs512-zstd", 4 * MiB, "cluster_size=512,refcount_bits=2,compression_type=zstd", cprob=0.5)
_created("create-rc64-cs512", 4 * MiB, "cluster_size=512,refcount_bits=64")
_created("create-extl2", 32 * MiB, "extended_l2=on")
_created("create-extl2-cs16k", 16 * MiB, "extended_l2=on,cluster_size=16384")
_created("create-zlib", 32 * MiB, "compression_type=zlib", cprob=0.35)
_created("create-zstd", 32 * MiB, "compression_type=zstd", cprob=0.35)
_created("create-zstd-cs4k", 8 * MiB, "compression_type=zstd,cluster_size=4096", cprob=0.35)
_created("create-lazy", 32 * MiB, "lazy_refcounts=on")
_created("create-prealloc", 32 * MiB, "preallocation=metadata")
_created("create-prealloc-cs4k-extl2", 16 * MiB, "preallocation=metadata,cluster_size=16384,extended_l2=on")
_created("create-datafile", 32 * MiB, "data_file=img.data")
_created("create-datafile-raw", 32 * MiB, "data_file=img.data,data_file_raw=on")
_created("create-odd-size", 10 * MiB + 3 * 512, None, cprob=0.2)
_created("create-odd-size-extl2", 10 * MiB + 5 * 512, "extended_l2=on", cprob=0.2)
_created("create-cs2m-extl2", 32 * MiB, "cluster_size=2M,extended_l2=on", ops_scale=0.5)


def _backing_raw(b, top, name="backing.raw"):
    """The guest view of top's backing chain, padded or cut to top's size."""
    info = json.loads(run([QEMU_IMG, "info", "--output=json", top], b.dir)[1])
    back = info["backing-filename"]
    bfmt = info.get("backing-filename-format", "qcow2")
    run([QEMU_IMG, "convert", "-f", bfmt, "-O", "raw", back, name], b.dir)
    os.truncate(b.path(name), info["virtual-size"])
    return name


def _qemu_base(b, name, size, opts=None, nwrites=12):
    b.qemu_create(name, size, opts)
    pat = b.pattern(f"{name}.pat", 65537)
    cmds = []
    for i in range(nwrites):
        off = b.rng.randrange(0, size - 400 * KiB)
        cmds.append(f"write -q -s {pat} {off} {b.rng.randint(1, 400 * KiB)}")
    b.io(name, *cmds)


@case("create-overlay-qcow2")
def _(b):
    _qemu_base(b, "base.qcow2", 32 * MiB)
    exp = b.create("img.qcow2", None, None, backing="base.qcow2", bfmt="qcow2")
    exp["virtual-size"] = 32 * MiB
    return Work("img.qcow2", backing_raw=_backing_raw(b, "img.qcow2"), expect_info=exp)


@case("create-overlay-raw")
def _(b):
    b.raw("base.raw", 16 * MiB, [(b.rng.randrange(0, 15 * MiB), b.rng.randbytes(300 * KiB)) for _ in range(10)])
    exp = b.create("img.qcow2", 16 * MiB, "cluster_size=4096", backing="base.raw", bfmt="raw")
    return Work("img.qcow2", backing_raw=_backing_raw(b, "img.qcow2"), expect_info=exp)


@case("create-overlay-v2")
def _(b):
    _qemu_base(b, "base.qcow2", 16 * MiB)
    exp = b.create("img.qcow2", 16 * MiB, "compat=0.10", backing="base.qcow2", bfmt="qcow2")
    return Work("img.qcow2", backing_raw=_backing_raw(b, "img.qcow2"), expect_info=exp)


@case("create-overlay-extl2")
def _(b):
    _qemu_base(b, "base.qcow2", 16 * MiB, "cluster_size=4096")
    exp = b.create("img.qcow2", 16 * MiB, "extended_l2=on", backing="base.qcow2", bfmt="qcow2")
    return Work("img.qcow2", backing_raw=_backing_raw(b, "img.qcow2"), expect_info=exp)


@case("create-datafile-extl2-overlay")
def _(b):
    _qemu_base(b, "base.qcow2", 16 * MiB)
    exp = b.create("img.qcow2", 16 * MiB, "data_file=img.data,extended_l2=on", backing="base.qcow2", bfmt="qcow2")
    return Work("img.qcow2", files=["img.qcow2", "img.data"], backing_raw=_backing_raw(b, "img.qcow2"),
                expect_info=exp)


# ---- images qemu made ----

@case("qemu-odd-size-compressed-tail")
def _(b):
    img = b.qemu_create("img.qcow2", 6 * MiB + 1536)
    pat = b.pattern("semi.pat", 4099, semi=True)
    b.io(img, f"write -q -c -s {pat} 0 1M", f"write -q -c -s {pat} 6M 1536", f"write -q -s {pat} 2M 100k")
    return Work(img, cprob=0.25)


@case("qemu-compressed-zlib")
def _(b):
    img = b.qemu_create("img.qcow2", 16 * MiB)
    pat = b.pattern("semi.pat", 65537, semi=True)
    b.io(img, f"write -q -c -s {pat} 0 8M", f"write -q -c -s {pat} 12M 2M", f"write -q -s {pat} 9M 1M")
    return Work(img, cprob=0.3)


@case("qemu-compressed-zstd-cs4k")
def _(b):
    img = b.qemu_create("img.qcow2", 8 * MiB, "compression_type=zstd,cluster_size=4096")
    pat = b.pattern("semi.pat", 65537, semi=True)
    b.io(img, f"write -q -c -s {pat} 0 4M", f"write -q -c -s {pat} 6M 1M")
    return Work(img, cprob=0.3)


@case("qemu-extl2-subclusters")
def _(b):
    img = b.qemu_create("img.qcow2", 16 * MiB, "extended_l2=on,cluster_size=64k")
    pat = b.pattern("p.pat", 8191)
    cmds = []
    for i in range(40):   # subcluster-sized pieces, zeroes and discards between them
        off = b.rng.randrange(0, 16 * MiB - 8 * KiB) // 2048 * 2048
        kind = b.rng.choice(["w", "w", "w", "z", "zu", "d"])
        ln = b.rng.randint(1, 4) * 2048
        cmds.append({"w": f"write -q -s {pat} {off} {ln}", "z": f"write -q -z {off} {ln}",
                     "zu": f"write -q -z -u {off} {ln}", "d": f"discard -q {off // 65536 * 65536} 65536"}[kind])
    b.io(img, *cmds)
    return Work(img)


@case("qemu-extl2-overlay")
def _(b):
    _qemu_base(b, "base.qcow2", 16 * MiB)
    img = b.qemu_create("img.qcow2", 16 * MiB, "extended_l2=on,cluster_size=32k", backing="base.qcow2", bfmt="qcow2")
    pat = b.pattern("p.pat", 4099)
    b.io(img, *[f"write -q -s {pat} {b.rng.randrange(0, 16 * MiB - 8 * KiB) // 1024 * 1024} {b.rng.randint(1, 3) * 1024}"
                for _ in range(30)], "write -q -z 1M 3k")
    return Work(img, backing_raw=_backing_raw(b, img))


@case("qemu-zero-clusters")
def _(b):
    img = b.qemu_create("img.qcow2", 16 * MiB)
    pat = b.pattern("p.pat", 65537)
    b.io(img, f"write -q -s {pat} 0 16M", "write -q -z 1M 2M", "write -q -z -u 4M 2M", "discard -q 8M 1M",
         "write -q -z 14M 64k")
    return Work(img)


@case("qemu-snapshots")
def _(b):
    img = b.qemu_create("img.qcow2", 16 * MiB)
    pat = b.pattern("p.pat", 65537)
    semi = b.pattern("semi.pat", 4099, semi=True)
    b.io(img, f"write -q -s {pat} 0 6M", f"write -q -c -s {semi} 8M 1M")
    b.qemu_img("snapshot", "-c", "s1", img)
    b.io(img, f"write -q -s {pat} 1M 100k", "write -q -z 2M 128k", "discard -q 8M 128k", f"write -q -s {pat} 12M 1M")
    b.qemu_img("snapshot", "-c", "s2", img)
    b.io(img, f"write -q -s {pat} 3M 5000")
    return Work(img, snapshots=["s1", "s2"])


@case("qemu-snapshots-v2-cs4k")
def _(b):
    img = b.qemu_create("img.qcow2", 8 * MiB, "compat=0.10,cluster_size=4096")
    pat = b.pattern("p.pat", 65537)
    b.io(img, f"write -q -s {pat} 0 4M")
    b.qemu_img("snapshot", "-c", "first", img)
    b.io(img, f"write -q -s {pat} 2M 100k")
    return Work(img, snapshots=["first"])


@case("qemu-bitmaps")
def _(b):
    img = b.qemu_create("img.qcow2", 16 * MiB)
    pat = b.pattern("p.pat", 65537)
    b.io(img, f"write -q -s {pat} 0 2M")
    b.qemu_img("bitmap", "--add", img, "enabled")
    b.qemu_img("bitmap", "--add", "-g", "4096", img, "disabled")
    b.io(img, f"write -q -s {pat} 4M 100k")          # both record this
    b.qemu_img("bitmap", "--disable", img, "disabled")
    b.io(img, f"write -q -s {pat} 8M 64k")           # only "enabled" records this
    return Work(img, bitmaps=True)


@case("qemu-chain2")
def _(b):
    _qemu_base(b, "base.qcow2", 32 * MiB, "cluster_size=4096")
    img = b.qemu_create("img.qcow2", 32 * MiB, None, backing="base.qcow2", bfmt="qcow2")
    pat = b.pattern("p.pat", 30011)
    b.io(img, f"write -q -s {pat} 1M 1M", "write -q -z 4M 256k", f"write -q -s {pat} 10M 300k")
    return Work(img, backing_raw=_backing_raw(b, img))


@case("qemu-chain3-raw-base")
def _(b):
    # raw base (smaller than the rest), a qcow2 middle, the top written here
    b.raw("base.raw", 12 * MiB + 512, [(b.rng.randrange(0, 12 * MiB - 300 * KiB), b.rng.randbytes(300 * KiB))
                                      for _ in range(12)])
    b.qemu_create("mid.qcow2", 16 * MiB, "cluster_size=16k", backing="base.raw", bfmt="raw")
    pat = b.pattern("p.pat", 8191)
    b.io("mid.qcow2", f"write -q -s {pat} 2M 1M", "write -q -z 5M 64k", f"write -q -s {pat} 12M 64k")
    img = b.qemu_create("img.qcow2", 16 * MiB, None, backing="mid.qcow2", bfmt="qcow2")
    b.io(img, f"write -q -s {pat} 2500k 100k")
    return Work(img, backing_raw=_backing_raw(b, img))


@case("qemu-chain3-v2-top")
def _(b):
    _qemu_base(b, "base.qcow2", 16 * MiB)
    b.qemu_create("mid.qcow2", 16 * MiB, "compat=0.10", backing="base.qcow2", bfmt="qcow2")
    pat = b.pattern("p.pat", 8191)
    b.io("mid.qcow2", f"write -q -s {pat} 3M 1M")
    img = b.qemu_create("img.qcow2", 16 * MiB, "compat=0.10,cluster_size=4096", backing="mid.qcow2", bfmt="qcow2")
    b.io(img, f"write -q -s {pat} 3500k 10k")
    return Work(img, backing_raw=_backing_raw(b, img))


# ---------------------------------------------------------------------------
# The workload

class Runner:
    def __init__(self, name, d, work, rng, nops, check_every):
        self.name, self.dir, self.w, self.rng = name, d, work, rng
        self.nops, self.check_every = nops, check_every
        self.log = []        # (argv, stdin bytes or None) of every qcowimg op, for replay.sh
        self.touched = []    # guest ranges written, zeroed or discarded (for bitmaps)

    def p(self, name):
        return os.path.join(self.dir, name)

    def qcowimg(self, label, *args, data=None):
        argv = [QCOWIMG, *args]
        self.log.append((argv, data))
        rc, out, err = run(argv, self.dir, data=data, check=False)
        if rc != 0:
            raise Failure(f"{label}: qcowimg exited {rc}", f"command: {human_cmd(argv, self.dir)}",
                          *[f"stderr: {l}" for l in err.strip().splitlines()[:15]])
        return out

    def info(self):
        return json.loads(run([QEMU_IMG, "info", "--output=json", self.w.img], self.dir)[1])

    # -- setup checks -------------------------------------------------------
    def check_create_info(self):
        q = self.info()
        exp = self.w.expect_info
        diffs = []
        for k, v in exp.items():
            if k == "format-specific":
                got = q.get(k, {})
                gd = {kk: vv for kk, vv in got.get("data", {}).items() if kk != "bitmaps"}
                if got.get("type") != v["type"] or gd != v["data"]:
                    diffs.append(f"format-specific.data: qemu-img says {json.dumps(gd, sort_keys=True)}, "
                                 f"asked for {json.dumps(v['data'], sort_keys=True)}")
            elif q.get(k, "<missing>") != v or type(q.get(k)) is not type(v):
                diffs.append(f"{k}: qemu-img says {json.dumps(q.get(k, '<missing>'))}, asked for {json.dumps(v)}")
        for k in ("backing-filename", "backing-filename-format"):
            if k in q and k not in exp:
                diffs.append(f"{k}: qemu-img says {json.dumps(q[k])}, none was asked for")
        if diffs:
            raise Failure(f"qemu-img info after qcowimg create differs from the options: {diffs[0]}",
                          *diffs[1:])

    # -- ops ---------------------------------------------------------------
    def pick_offset(self, n, align=1):
        size, cs = self.size, self.cs
        r = self.rng.random()
        if r < 0.06:         # the first clusters: where an image's own metadata sits in its file
            off = self.rng.randrange(0, min(4 * cs, size - n) + 1)
        elif r < 0.35:
            off = self.rng.randrange(0, size - n + 1)
        elif r < 0.65:       # a hot area: later ops overwrite earlier ones
            off = self.rng.randrange(0, max(1, min(size // 8, size - n) + 1))
        elif r < 0.85:       # from a cluster boundary
            off = self.rng.randrange(0, (size - n) // cs + 1) * cs
        else:                # up to the end of the disk
            off = size - n - self.rng.randrange(0, min(2 * cs, size - n) + 1)
        return max(0, min(off, size - n)) // align * align

    def pick_len(self):
        cls = self.rng.random()
        top = 512 if cls < 0.25 else min(2 * self.cs, MAX_WRITE) if cls < 0.5 else MAX_WRITE
        return self.rng.randint(1, min(top, self.size))

    def next_op(self, i):
        """One op: returns a label; runs qcowimg and updates the reference."""
        r = self.rng.random()
        cs, size = self.cs, self.size
        if r < self.w.cprob:
            nclusters = self.rng.randint(1, 3)
            first = self.pick_offset(min(nclusters * cs, size), align=cs) // cs
            off = first * cs
            n = min(nclusters * cs, size - off)
            kind = self.rng.random()
            data = (semi_compressible(self.rng, n) if kind < 0.7 else bytes(n) if kind < 0.8
                    else self.rng.randbytes(n))   # random: does not shrink, stored plain
            self.qcowimg(f"op {i}: write -c {off}+{n}", "write", "-c", self.w.img, off, data=data)
            self.ref_write(off, data)
            return
        if r < 0.62:
            n = self.pick_len()
            off = self.pick_offset(n)
            data = self.rng.randbytes(n) if self.rng.random() < 0.9 else bytes(n)
            self.qcowimg(f"op {i}: write {off}+{n}", "write", self.w.img, off, data=data)
            self.ref_write(off, data)
            return
        if r < 0.8:
            n = self.rng.randint(1, min(4 * cs, 2 * MiB, size)) if self.rng.random() < 0.7 else \
                self.rng.randint(1, min(size, 4 * MiB))
            off = self.pick_offset(n, align=cs if self.rng.random() < 0.3 else 1)
            self.qcowimg(f"op {i}: zero {off}+{n}", "zero", self.w.img, off, n)
            self.ref_write(off, bytes(n))
            return
        if self.rng.random() < 0.5:   # whole clusters
            n = min(self.rng.randint(1, 16) * cs, size)
            off = self.pick_offset(n, align=cs)
            n = min(n, size - off)
        else:
            n = self.rng.randint(1, min(size, 4 * cs))
            off = self.pick_offset(n)
        self.qcowimg(f"op {i}: discard {off}+{n}", "discard", self.w.img, off, n)
        self.ref_discard(i, off, n)

    def ref_write(self, off, data):
        self.touched.append((off, len(data)))
        os.pwrite(self.ref_fd, data, off)

    def discarded(self, off, n):
        """What a freed range reads as: zeroes on v3; the backing file on v2."""
        if self.v3 or not self.w.backing_raw:
            return bytes(n)
        with open(self.p(self.w.backing_raw), "rb") as f:
            f.seek(off)
            return f.read(n).ljust(n, b"\0")

    def ref_discard(self, i, off, n):
        cs, size, end = self.cs, self.size, off + n
        sub = cs // 32 if self.extl2 else cs
        definite, open_units = [], []
        c = (off + cs - 1) // cs * cs
        while c + cs <= end:                     # whole clusters: defined
            definite.append((c, cs))
            c += cs
        tail = size // cs * cs
        if self.extl2:   # whole subclusters of partial clusters (and of the short tail cluster)
            s = (off + sub - 1) // sub * sub
            while s < end and (s + sub <= end or end == size):
                if not any(d <= s < d + cs for d, _ in definite):
                    open_units.append((s, min(sub, size - s)))
                s += sub
        elif tail < size and off <= tail and end == size:
            open_units.append((tail, size - tail))   # the complete short cluster at the tail
        for d, ln in definite:
            self.ref_write(d, self.discarded(d, ln))
        if not open_units:
            return
        run([QEMU_IMG, "convert", "-O", "raw", self.w.img, "qemu-view.raw"], self.dir)
        with open(self.p("qemu-view.raw"), "rb") as f:
            for u, ln in open_units:
                f.seek(u)
                got = f.read(ln)
                old = os.pread(self.ref_fd, ln, u)
                if got != old and got != self.discarded(u, ln):
                    raise Failure(f"op {i}: discard {off}+{n} left guest bytes {u}+{ln} neither as they "
                                  "were nor discarded", f"command: {human_cmd(self.log[-1][0], self.dir)}")
                if got != old:
                    self.ref_write(u, got)
        os.unlink(self.p("qemu-view.raw"))

    # -- checks ------------------------------------------------------------
    def check(self, label):
        argv = [QEMU_IMG, "check", self.w.img]
        rc, out, err = run(argv, self.dir, check=False)
        if rc != 0:
            raise Failure(f"{label}: qemu-img check exit {rc}", f"command: {human_cmd(argv, self.dir)}",
                          *[f"  {l}" for l in (out.decode(errors='replace') + err).strip().splitlines()[:25]])
        argv = [QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", "ref.raw", self.w.img]
        rc, out, err = run(argv, self.dir, check=False)
        if rc != 0:
            raise Failure(f"{label}: guest data differs from the reference: "
                          f"{(out.decode(errors='replace') + err).strip()[:200]}",
                          f"command: {human_cmd(argv, self.dir)}")

    def final_checks(self):
        argv = [QCOWIMG, "check", self.w.img]
        rc, out, err = run(argv, self.dir, check=False)
        if rc != 0:
            raise Failure(f"qcowimg check exit {rc} where qemu-img check is clean",
                          f"command: {human_cmd(argv, self.dir)}",
                          *[f"  {l}" for l in (out.decode(errors='replace') + err).strip().splitlines()[:20]])
        argv = [QCOWIMG, "convert", "-O", "raw", self.w.img, "mine.raw"]
        rc, out, err = run(argv, self.dir, check=False)
        if rc != 0:
            raise Failure(f"qcowimg convert exit {rc}: {err.strip()[:200]}", f"command: {human_cmd(argv, self.dir)}")
        argv2 = [QEMU_IMG, "compare", "-f", "raw", "-F", "raw", "ref.raw", "mine.raw"]
        rc, out, err = run(argv2, self.dir, check=False)
        if rc != 0:
            raise Failure("qcowimg reads back other bytes than it wrote: "
                          f"{(out.decode(errors='replace') + err).strip()[:200]}",
                          f"command: {human_cmd(argv, self.dir)}", f"then: {human_cmd(argv2, self.dir)}")
        os.unlink(self.p("mine.raw"))
        q = self.info()
        if q.get("dirty-flag") or q.get("format-specific", {}).get("data", {}).get("corrupt"):
            raise Failure(f"image left with dirty-flag={q.get('dirty-flag')}, "
                          f"corrupt={q['format-specific']['data'].get('corrupt')}")
        for s in self.w.snapshots:
            argv = [QEMU_IMG, "convert", "-l", f"snapshot.name={s}", "-O", "raw", self.w.img, "snap-now.raw"]
            run(argv, self.dir)
            argv2 = [QEMU_IMG, "compare", "-f", "raw", "-F", "raw", f"snap-{s}.raw", "snap-now.raw"]
            rc, out, err = run(argv2, self.dir, check=False)
            if rc != 0:
                raise Failure(f"snapshot {s!r} changed under the workload: "
                              f"{(out.decode(errors='replace') + err).strip()[:200]}",
                              f"command: {human_cmd(argv, self.dir)}", f"then: {human_cmd(argv2, self.dir)}")
        if self.w.bitmaps:
            self.check_bitmaps()

    def check_bitmaps(self):
        consistent, now = read_bitmaps(self.p(self.w.img))
        if set(now) != set(self.bitmaps_before):
            raise Failure(f"bitmaps {sorted(self.bitmaps_before)} became {sorted(now)}")
        if not consistent:
            return   # the autoclear bit is off: every bitmap is known inconsistent, which is honest
        for name, (flags, gran, dirty) in sorted(now.items()):
            bflags, _, bdirty = self.bitmaps_before[name]
            if flags & BME_IN_USE:
                continue   # marked in use: inconsistent, which is honest
            if not (bflags & BME_AUTO):
                if dirty != bdirty or flags != bflags:
                    raise Failure(f"disabled bitmap {name!r} changed: {len(bdirty)} dirty granules before, "
                                  f"{len(dirty)} after, flags {bflags:#x} -> {flags:#x}")
                continue
            missing = [g for off, n in self.touched for g in range(off // gran, (off + n - 1) // gran + 1)
                       if g not in dirty]
            if missing:
                g = missing[0]
                raise Failure(f"enabled bitmap {name!r} claims to be consistent but misses "
                              f"{len(set(missing))} written granules, first guest {g * gran}+{gran} "
                              f"(flags {flags:#x}, autoclear bit set)",
                              f"the workload wrote {len(self.touched)} ranges; dirty granules before "
                              f"{len(bdirty)}, after {len(dirty)}")
            if not bdirty <= dirty:
                raise Failure(f"enabled bitmap {name!r} lost dirty granules")

    # -- all of it ---------------------------------------------------------
    def run_all(self):
        if self.w.expect_info is not None:
            self.check_create_info()
        q = self.info()
        self.size, self.cs = q["virtual-size"], q["cluster-size"]
        fs = q["format-specific"]["data"]
        self.v3 = fs["compat"] != "0.10"
        self.extl2 = fs.get("extended-l2", False)
        if self.w.bitmaps:
            consistent, self.bitmaps_before = read_bitmaps(self.p(self.w.img))
            en = self.bitmaps_before.get("enabled")
            if not consistent or not en or not (en[0] & BME_AUTO) or 8 * MiB // en[1] not in en[2]:
                raise SetupError(f"the bitmap reader does not see what qemu recorded: {consistent}, "
                                 f"{ {k: (v[0], v[1], len(v[2])) for k, v in self.bitmaps_before.items()} }")
        for s in self.w.snapshots:
            run([QEMU_IMG, "convert", "-l", f"snapshot.name={s}", "-O", "raw", self.w.img, f"snap-{s}.raw"], self.dir)
        run([QEMU_IMG, "convert", "-O", "raw", self.w.img, "ref.raw"], self.dir)
        os.makedirs(self.p("initial"))
        for f in self.w.files:
            run(["cp", "--sparse=always", f, os.path.join("initial", f)], self.dir)
        self.ref_fd = os.open(self.p("ref.raw"), os.O_RDWR)
        try:
            n = max(1, round(self.nops * self.w.ops_scale))
            for i in range(1, n + 1):
                self.next_op(i)
                if i % self.check_every == 0 or i == n:
                    self.check(f"after op {i} ({human_cmd(self.log[-1][0][1:2])})")
            self.final_checks()
        finally:
            os.close(self.ref_fd)

    def write_replay(self):
        """replay.sh: restore initial/ and repeat every qcowimg op (data in ops/)."""
        os.makedirs(self.p("ops"), exist_ok=True)
        lines = ["#!/bin/sh", "# repeats the workload up to the failing op; run from this folder",
                 f"QCOWIMG=${{QCOWIMG:-{shlex.quote(QCOWIMG)}}}", "set -x"]
        for f in self.w.files:
            lines.append(f"cp --sparse=always initial/{shlex.quote(f)} {shlex.quote(f)}")
        for i, (argv, data) in enumerate(self.log, 1):
            cmd = '"$QCOWIMG" ' + " ".join(shlex.quote(str(a)) for a in argv[1:])
            if data is not None:
                with open(self.p(f"ops/{i:04d}.bin"), "wb") as f:
                    f.write(data)
                cmd += f" < ops/{i:04d}.bin"
            lines.append(cmd)
        lines.append("qemu-img check " + shlex.quote(self.w.img))
        lines.append("qemu-img compare -f raw -F qcow2 ref.raw " + shlex.quote(self.w.img))
        with open(self.p("replay.sh"), "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(self.p("replay.sh"), 0o755)


def run_case(name, fn, root, seed, nops, check_every):
    d = os.path.join(root, name)
    os.makedirs(d)
    rng = random.Random(f"{seed}:{name}")
    runner = None
    t0 = time.time()
    try:
        work = fn(Builder(d, rng))
        runner = Runner(name, d, work, rng, nops, check_every)
        runner.run_all()
    except Failure as e:
        if runner is not None and runner.log:
            runner.write_replay()
            e.details.append(f"replay: (cd {shlex.quote(d)} && ./replay.sh)")
        return name, (e.reason, e.details), d, time.time() - t0
    except SetupError as e:
        return name, (f"setup: {e}", []), d, time.time() - t0
    except subprocess.TimeoutExpired as e:
        return name, (f"timeout after {e.timeout}s: {human_cmd(e.cmd, d)}", []), d, time.time() - t0
    except Exception as e:   # a harness bug: a failure, never a pass
        return name, (f"harness error: {e!r}", traceback.format_exc().splitlines()), d, time.time() - t0
    return name, None, d, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    suite.add_common_args(ap)
    ap.add_argument("--seed", type=int, default=int(os.environ.get("WORKLOAD_SEED", "20240611")))
    ap.add_argument("--ops", type=int, default=DEFAULT_OPS, help="ops per case")
    ap.add_argument("--check-every", type=int, default=1, help="run the qemu checks every N ops")
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
        def run():
            name_, problem, d, secs = run_case(name, fn, root, args.seed, args.ops, args.check_every)
            return suite.Outcome(name_, [problem] if problem else [], d, f"{secs:.1f}s")
        return run

    t0 = time.time()
    with suite.Scratch("qcowd-workload-", args.keep) as scratch:
        print(f"# seed {args.seed} (rerun with --seed {args.seed}); {args.ops} ops per case; "
              f"qcowimg={QCOWIMG}; dir {scratch.root}", flush=True)
        passed, failed, _ = suite.run_all(scratch, [task(n, fn, scratch.root) for n, fn in selected], args.j)
    print(f"# {time.time() - t0:.0f}s")
    return suite.summary(passed, failed)


if __name__ == "__main__":
    sys.exit(main())
