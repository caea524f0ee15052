#!/usr/bin/python3
"""corrupt.py: proves qcowimg survives broken qcow2 images: it refuses them with a
message that names the problem, or, where the damage sits inside the data mapping
(a bad L2 entry, a garbage compressed cluster), fails only the reads that meet it.

Every case starts from a good image made by qemu-img (convert from a raw file with
known contents, snapshot, bitmap, create -b), pokes bytes into it (header fields,
extensions, L1/L2 entries, refcount table, snapshot table, bitmap directory,
compressed data; all big-endian, see docs/interop/qcow2.txt), then runs qcowimg on it:
  info IMG, map --output=json IMG, convert -O raw IMG out.raw, read IMG OFF LEN
Every run must: not crash (no signal, no exit code >= 2, no sanitizer report), not
hang (killed after CMD_TIMEOUT seconds), stay under RSS_LIMIT of peak memory (measured
per process with wait4), and exit 0, or exit 1 with stderr starting `qcowimg: `.
On top of that each check expects one outcome:
  fail    exit 1, and the message holds one of the case's keywords (case-insensitive)
  ok      exit 0 (and stdout/output equal to the expected guest bytes where given)
  either  exit 0 (then bytes as for ok) or a failure as for fail
A damaged-mapping case expects `info` to succeed, the read and the convert that touch
the bad cluster to fail, and a read elsewhere to return the right bytes.

Environment: QCOWIMG (the binary under test, required), QEMU_IMG, QEMU_IO (default
qemu-img, qemu-io). Usage: corrupt.py [-k NAME|GLOB]... [-j N] [--keep] [--list]
[--check-qemu]. --check-qemu runs qemu-img on each broken image instead of qcowimg and
compares with what the case expects qemu to say: a check of the harness itself (that
each poke breaks what it means to break), not of qcowimg.
Prints `ok NAME` or `FAIL NAME: reason` per case (details indented below), then
`N passed, M failed`; exits 1 if anything failed, 77 if the tools are missing.
"""

import argparse
import fnmatch
import json
import os
import random
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import suite  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

QCOWIMG = os.environ.get("QCOWIMG", "")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")

CMD_TIMEOUT = 20              # seconds for one qcowimg run (a hang is a failure)
SETUP_TIMEOUT = 120           # seconds for one qemu-img run while building images
RSS_LIMIT_KIB = 512 * 1024    # peak resident memory allowed for one qcowimg run
AS_LIMIT = 2 * GiB            # address-space limit, only for builds without ASan

# On-disk constants (docs/interop/qcow2.txt).
QCOW2_MAGIC = 0x514649FB
EXT_BACKING_FMT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Header fields: name -> (offset, struct format).
HEADER = {
    "magic": (0, "I"), "version": (4, "I"),
    "backing_file_offset": (8, "Q"), "backing_file_size": (16, "I"),
    "cluster_bits": (20, "I"), "size": (24, "Q"), "crypt_method": (32, "I"),
    "l1_size": (36, "I"), "l1_table_offset": (40, "Q"),
    "refcount_table_offset": (48, "Q"), "refcount_table_clusters": (56, "I"),
    "nb_snapshots": (60, "I"), "snapshots_offset": (64, "Q"),
    "incompatible_features": (72, "Q"), "compatible_features": (80, "Q"),
    "autoclear_features": (88, "Q"), "refcount_order": (96, "I"),
    "header_length": (100, "I"), "compression_type": (104, "B"),
}


class SetupError(Exception):
    """Building the case's image failed: a harness or qemu problem, not qcowimg's."""


class CaseFailure(Exception):
    pass


def human_cmd(argv, cwd=None):
    s = " ".join(shlex.quote(str(a)) for a in argv)
    return f"(cd {shlex.quote(cwd)} && {s})" if cwd else s


def sh(argv, cwd):
    """Runs a qemu tool while building images; raises SetupError on failure."""
    try:
        p = subprocess.run([str(a) for a in argv], cwd=cwd, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=SETUP_TIMEOUT, env=dict(os.environ, LC_ALL="C"))
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SetupError(f"{human_cmd(argv, cwd)}: {e}")
    if p.returncode != 0:
        raise SetupError(f"{human_cmd(argv, cwd)} exited {p.returncode}: "
                         f"{p.stderr.decode('utf-8', 'replace').strip()[:400]}")
    return p.stdout


# ---------------------------------------------------------------------------
# Running the tool under test: timeout, peak RSS, crash detection.

def binary_has_asan(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return b"__asan_init" in data or b"AddressSanitizer" in data


ASAN_BUILD = False
PEAK = {"kib": 0, "where": ""}   # the largest peak RSS seen, for the summary
PEAK_LOCK = threading.Lock()


class Result:
    def __init__(self, argv, cwd, rc, out, err, maxrss_kib, timed_out, secs):
        self.argv, self.cwd, self.rc, self.out, self.err = argv, cwd, rc, out, err
        self.maxrss_kib, self.timed_out, self.secs = maxrss_kib, timed_out, secs

    def cmdline(self):
        return human_cmd(["$QCOWIMG"] + self.argv[1:], self.cwd)


def run_tool(args, cwd, timeout=CMD_TIMEOUT):
    """Runs QCOWIMG args in cwd; kills it after timeout seconds. Peak RSS comes from
    wait4 on that very process (getrusage(RUSAGE_CHILDREN) only keeps a maximum over
    all children, and ASan's reserved virtual memory rules out RLIMIT_AS there)."""
    argv = [QCOWIMG] + [str(a) for a in args]

    def child_setup():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if not ASAN_BUILD:
            resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    env = dict(os.environ, LC_ALL="C")
    with tempfile.TemporaryFile(dir=cwd) as fout, tempfile.TemporaryFile(dir=cwd) as ferr:
        start = time.monotonic()
        p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr,
                             env=env, preexec_fn=child_setup, start_new_session=True)
        timed_out = False
        delay = 0.002
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                break
            if time.monotonic() - start > timeout:
                timed_out = True
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        p.returncode = rc = os.waitstatus_to_exitcode(status)  # Popen must not reap it again
        secs = time.monotonic() - start
        fout.seek(0)
        ferr.seek(0)
        out = fout.read()
        err = ferr.read().decode("utf-8", "replace")
    return Result(argv, cwd, rc, out, err, ru.ru_maxrss, timed_out, secs)


# ---------------------------------------------------------------------------
# Known guest contents and good images made by qemu-img.

def content(tag, n):
    """n bytes that say where they are: 16-byte records `T` + 15 hex digits of the
    offset. Compressible (so qemu-img convert -c really compresses), and a read from
    a wrong place shows up as wrong bytes."""
    t = ord(tag)
    return b"".join(b"%c%015x" % (t, i) for i in range(0, n, 16))[:n]


class Guest:
    """The guest disk an image should show: a size and extents of known bytes
    (later extents win where they overlap)."""

    def __init__(self, size, extents):
        self.size = size
        self.extents = list(extents)

    def with_extent(self, off, data):
        return Guest(self.size, self.extents + [(off, data)])

    def read(self, off, n):
        n = max(0, min(n, self.size - off))
        buf = bytearray(n)
        for eoff, data in self.extents:
            lo, hi = max(off, eoff), min(off + n, eoff + len(data))
            if lo < hi:
                buf[lo - off:hi - off] = data[lo - eoff:hi - eoff]
        return bytes(buf)

    def write_raw(self, path):
        with open(path, "wb") as f:
            f.truncate(self.size)
            for off, data in self.extents:
                f.seek(off)
                f.write(data)


# Three 64 KiB extents: guest clusters 0 and 3 share an L2 table; 600 MiB is in the
# second L2 table (with 64 KiB clusters one L2 table maps 512 MiB).
A_OFF, B_OFF, C_OFF = 0, 192 * KiB, 600 * MiB


def default_guest(size=GiB):
    ext = [(A_OFF, content("A", 64 * KiB)), (B_OFF, content("B", 64 * KiB))]
    if size > C_OFF + 64 * KiB:
        ext.append((C_OFF, content("C", 64 * KiB)))
    return Guest(size, ext)


def make_image(d, name="img.qcow2", guest=None, compat="1.1", cluster=64 * KiB,
               compress=None, opts=""):
    """A good qcow2 image of guest (default_guest()) via qemu-img convert from raw.
    compress: None, "zlib" or "zstd" (-c, every data cluster compressed)."""
    guest = guest or default_guest()
    raw = os.path.join(d, name + ".src.raw")
    guest.write_raw(raw)
    o = f"compat={compat},cluster_size={cluster}"
    if compress == "zstd":
        o += ",compression_type=zstd"
    if opts:
        o += "," + opts
    argv = [QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", "-o", o]
    if compress:
        argv.append("-c")
    sh(argv + [raw, name], d)
    os.unlink(raw)
    return name, guest


def qemu_io(d, img, *cmds):
    argv = [QEMU_IO, "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    sh(argv + [img], d)


def create_overlay(d, name, backing, backing_fmt="qcow2", size="1G"):
    """An empty overlay naming backing, made without opening it (-u)."""
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", backing]
    if backing_fmt:
        argv += ["-F", backing_fmt]
    sh(argv + [name, size], d)
    return name


# ---------------------------------------------------------------------------
# Poking bytes: a qcow2 file in memory, big-endian accessors, table walks.

class Ext:
    def __init__(self, off, type_, length, data):
        self.off, self.type, self.len, self.data = off, type_, length, data


class Q:
    def __init__(self, d, name):
        self.path = os.path.join(d, name)
        with open(self.path, "rb") as f:
            self.b = bytearray(f.read())

    def save(self):
        with open(self.path, "wb") as f:
            f.write(self.b)

    # raw accessors
    def get(self, off, fmt):
        return struct.unpack_from(">" + fmt, self.b, off)[0]

    def put(self, off, fmt, v):
        need = off + struct.calcsize(fmt)
        if need > len(self.b):
            self.b.extend(bytes(need - len(self.b)))
        struct.pack_into(">" + fmt, self.b, off, v)

    def u64(self, off):
        return self.get(off, "Q")

    def fill(self, off, n, byte):
        self.b[off:off + n] = bytes([byte]) * n

    # header fields
    def __getitem__(self, name):
        return self.get(*HEADER[name])

    def __setitem__(self, name, v):
        off, fmt = HEADER[name]
        self.put(off, fmt, v)

    @property
    def cluster_size(self):
        return 1 << self["cluster_bits"]

    @property
    def hdr_len(self):
        return 72 if self["version"] == 2 else self["header_length"]

    @property
    def extended(self):
        return self["version"] >= 3 and bool(self["incompatible_features"] & INCOMPAT_EXTL2)

    def backing_name(self):
        off, n = self["backing_file_offset"], self["backing_file_size"]
        return bytes(self.b[off:off + n]) if off else b""

    # header extensions
    def exts(self):
        res, off, end = [], self.hdr_len, self.cluster_size
        while off + 8 <= end:
            t, n = self.get(off, "I"), self.get(off + 4, "I")
            if t == 0:
                break
            res.append(Ext(off, t, n, bytes(self.b[off + 8:off + 8 + n])))
            off += 8 + ((n + 7) & ~7)
        return res

    def ext(self, type_):
        for e in self.exts():
            if e.type == type_:
                return e
        raise SetupError(f"no extension {type_:#x} in {self.path}")

    def set_exts(self, exts):
        """Rewrites the extension area as exts [(type, data)], then the end marker and
        the backing file name (if any), as qemu lays them out."""
        name = self.backing_name()
        area = bytearray()
        for t, data in exts:
            area += struct.pack(">II", t, len(data)) + data + bytes(-len(data) % 8)
        area += bytes(8)
        start, cs = self.hdr_len, self.cluster_size
        if start + len(area) + len(name) > cs:
            raise SetupError("extensions do not fit in the header cluster")
        self.b[start:cs] = bytes(cs - start)
        self.b[start:start + len(area)] = area
        if name:
            self["backing_file_offset"] = start + len(area)
            self.b[start + len(area):start + len(area) + len(name)] = name

    def set_backing_name(self, name):
        name = name.encode() if isinstance(name, str) else name
        off = self["backing_file_offset"]
        if not off:
            raise SetupError("image has no backing file to rename")
        self.b[off:off + max(len(name), self["backing_file_size"])] = bytes(
            max(len(name), self["backing_file_size"]))
        self.b[off:off + len(name)] = name
        self["backing_file_size"] = len(name)

    # L1/L2
    def l1_entry_off(self, idx):
        return self["l1_table_offset"] + 8 * idx

    def l2_geometry(self, guest_off):
        cb = self["cluster_bits"]
        es = 16 if self.extended else 8
        l2_bits = cb - (4 if self.extended else 3)
        return guest_off >> (cb + l2_bits), (guest_off >> cb) & ((1 << l2_bits) - 1), es

    def l2_entry_off(self, guest_off):
        l1i, l2i, es = self.l2_geometry(guest_off)
        l2 = self.u64(self.l1_entry_off(l1i)) & OFFSET_MASK
        if not l2:
            raise SetupError(f"guest offset {guest_off:#x} has no L2 table")
        return l2 + es * l2i

    def l2_entry(self, guest_off):
        return self.u64(self.l2_entry_off(guest_off))

    def data_off(self, guest_off):
        e = self.l2_entry(guest_off)
        if e & OFLAG_COMPRESSED or not e & OFFSET_MASK:
            raise SetupError(f"guest offset {guest_off:#x} is not a plain data cluster")
        return e & OFFSET_MASK

    def compressed(self, guest_off):
        """(entry offset, host offset, bytes the descriptor spans, sector field shift)."""
        eo = self.l2_entry_off(guest_off)
        e = self.u64(eo)
        if not e & OFLAG_COMPRESSED:
            raise SetupError(f"guest offset {guest_off:#x} is not compressed")
        x = 62 - (self["cluster_bits"] - 8)
        host = e & ((1 << x) - 1)
        sectors = ((e >> x) & ((1 << (self["cluster_bits"] - 8)) - 1)) + 1
        return eo, host, sectors * 512 - (host & 511), x

    # snapshots, bitmaps
    def snapshot_entry(self, idx=0):
        off = self["snapshots_offset"]
        for _ in range(idx):
            extra, ids, names = self.get(off + 36, "I"), self.get(off + 12, "H"), self.get(off + 14, "H")
            n = 40 + extra + ids + names
            off += n + (-n % 8)
        return off

    def bitmap_dir(self):
        e = self.ext(EXT_BITMAPS)
        nb, _, size, off = struct.unpack(">IIQQ", e.data)
        return e, nb, size, off


# ---------------------------------------------------------------------------
# Checks.

class Check:
    def __init__(self, label, args, expect, kw=(), data=None, post=None):
        self.label, self.args, self.expect = label, args, expect
        self.kw = tuple(kw)
        self.data = data     # expected stdout bytes on success
        self.post = post     # post(result, case_dir) -> problem text or None on success


class Spec:
    """What a case built: the top image (for --check-qemu) and the checks to run."""

    def __init__(self, img, checks, snapshot=None):
        self.img, self.checks, self.snapshot = img, checks, snapshot


def cmd_info(img):
    return ["info", img]


def cmd_map(img):
    return ["map", "--output=json", img]


def cmd_convert(img, snap=None):
    return ["convert", "-O", "raw"] + (["-l", f"snapshot.name={snap}"] if snap else []) + [img, "out.raw"]


def cmd_read(img, off, n=64 * KiB, snap=None):
    return ["read"] + (["-l", f"snapshot.name={snap}"] if snap else []) + [img, str(off), str(n)]


def reject(img, kw, info="fail"):
    """Every command refuses the image, naming the problem."""
    return [Check("info", cmd_info(img), info, kw),
            Check("map", cmd_map(img), "fail", kw),
            Check("convert", cmd_convert(img), "fail", kw),
            Check("read", cmd_read(img, 0), "fail", kw)]


def damaged(img, guest, bad, good, kw):
    """Damage inside the mapping: the image opens, what touches the bad cluster fails,
    the rest reads right."""
    return [Check("info", cmd_info(img), "ok"),
            Check("read-bad", cmd_read(img, bad), "fail", kw),
            Check("convert", cmd_convert(img), "fail", kw),
            Check("read-good", cmd_read(img, good), "ok", data=guest.read(good, 64 * KiB)),
            Check("map", cmd_map(img), "either", kw)]


def lenient(img, guest=None, good=(), info="either", kw=()):
    """Anything but a crash, hang, memory blow-up or a malformed failure; reads that
    succeed at the good offsets must return the right bytes."""
    checks = [Check("info", cmd_info(img), info, kw),
              Check("map", cmd_map(img), "either", kw),
              Check("convert", cmd_convert(img), "either", kw),
              Check("read-0", cmd_read(img, 0), "either", kw)]
    for g in good:
        checks.append(Check(f"read-{g:#x}", cmd_read(img, g), "either", kw, data=guest.read(g, 64 * KiB)))
    return checks


def convert_equals(guest):
    """post-check: out.raw has the guest's size and bytes (at each extent and at the end)."""
    def post(res, d):
        path = os.path.join(d, "out.raw")
        try:
            size = os.path.getsize(path)
            if size != guest.size:
                return f"out.raw is {size} bytes, expected {guest.size}"
            with open(path, "rb") as f:
                spots = [off for off, _ in guest.extents] + [max(0, guest.size - 64 * KiB)]
                for off in spots:
                    f.seek(off)
                    got = f.read(64 * KiB)
                    if got != guest.read(off, 64 * KiB):
                        return f"out.raw differs from the guest at {off:#x}"
        except OSError as e:
            return f"out.raw: {e}"
        return None
    return post


def judge(res, chk):
    """Problems with one run, as a list of strings (empty: passed)."""
    p = []
    err = res.err
    if res.timed_out:
        p.append(f"hung: killed after {CMD_TIMEOUT} s")
    elif res.rc < 0:
        p.append(f"killed by signal {-res.rc} ({signal.Signals(-res.rc).name})")
    elif res.rc not in (0, 1):
        p.append(f"exit code {res.rc} (only 0 or 1 allowed)")
    if "Sanitizer" in err or "runtime error" in err:
        lines = [l for l in err.splitlines() if "Sanitizer" in l or "runtime error" in l or " #" in l]
        p.append("sanitizer report: " + " | ".join(l.strip() for l in lines[:6]))
    if res.maxrss_kib > RSS_LIMIT_KIB:
        p.append(f"peak RSS {res.maxrss_kib // 1024} MiB > {RSS_LIMIT_KIB // 1024} MiB")
    if p:
        return p
    first = err.strip().splitlines()[0] if err.strip() else ""
    if res.rc == 1:
        if chk.expect == "ok":
            p.append(f"expected success, failed: {first[:300]}")
        elif not first.startswith("qcowimg: ") or len(first) <= len("qcowimg: "):
            p.append(f"failure message does not start with 'qcowimg: ': {err.strip()[:300]!r}")
        elif chk.kw and not any(k.lower() in err.lower() for k in chk.kw):
            p.append(f"message does not name the problem (wanted one of {list(chk.kw)}): {first[:300]}")
    else:
        if chk.expect == "fail":
            p.append("expected failure, exited 0" + (f" (stderr: {first[:200]})" if first else ""))
        else:
            if chk.data is not None and res.out != chk.data:
                diff = next((i for i, (a, b) in enumerate(zip(res.out, chk.data)) if a != b),
                            min(len(res.out), len(chk.data)))
                p.append(f"wrong bytes: {len(res.out)} bytes out, {len(chk.data)} expected, "
                         f"first difference at +{diff:#x}")
            if chk.post:
                why = chk.post(res, res.cwd)
                if why:
                    p.append(why)
    return p


# ---------------------------------------------------------------------------
# The cases. Each builds its images in d and returns a Spec. qemu= says what qemu-img
# 7.2 makes of the image (for --check-qemu): "reject" (info -f qcow2 fails), "damage"
# (info works, convert fails), "ok" (both work), None (not compared: qemu is lenient
# where we are strict, or would hang).

CASES = {}


def case(name, qemu=None):
    def deco(fn):
        assert name not in CASES, name
        CASES[name] = (fn, qemu)
        return fn
    return deco


def poke_header(field, value, kw, qemu="reject", info="fail", **mk):
    def build(d):
        img, _ = make_image(d, **mk)
        q = Q(d, img)
        q[field] = value
        q.save()
        return Spec(img, reject(img, kw, info=info))
    return build


# --- controls: the harness must see good images as good ---------------------

@case("control_good_v3", qemu="ok")
def _(d):
    img, g = make_image(d)
    return Spec(img, [Check("info", cmd_info(img), "ok"),
                      Check("map", cmd_map(img), "ok"),
                      Check("convert", cmd_convert(img), "ok", post=convert_equals(g)),
                      Check("read-a", cmd_read(img, 0), "ok", data=g.read(0, 64 * KiB)),
                      Check("read-c", cmd_read(img, C_OFF - 4096, 128 * KiB), "ok",
                            data=g.read(C_OFF - 4096, 128 * KiB))])


@case("control_compressed_zstd", qemu="ok")
def _(d):
    img, g = make_image(d, compress="zstd")
    Q(d, img).compressed(0)  # proves the image really is compressed
    return Spec(img, [Check("convert", cmd_convert(img), "ok", post=convert_equals(g)),
                      Check("read-b", cmd_read(img, B_OFF), "ok", data=g.read(B_OFF, 64 * KiB))])


@case("control_chain_10", qemu="ok")
def _(d):
    g = build_chain(d, 10)
    return Spec("l00.qcow2", [Check("info", cmd_info("l00.qcow2"), "ok"),
                              Check("read", cmd_read("l00.qcow2", B_OFF), "ok", data=g.read(B_OFF, 64 * KiB))])


@case("control_raw_backing_with_format", qemu="ok")
def _(d):
    g = default_guest(64 * MiB)
    g.write_raw(os.path.join(d, "base.raw"))
    create_overlay(d, "top.qcow2", "base.raw", "raw", "64M")
    return Spec("top.qcow2", [Check("read", cmd_read("top.qcow2", B_OFF), "ok", data=g.read(B_OFF, 64 * KiB))])


@case("control_virtual_size_0", qemu="ok")
def _(d):
    img, _ = make_image(d)
    q = Q(d, img)
    q["size"] = 0
    q.save()

    def info_zero(res, _d):
        try:
            v = json.loads(res.out)["virtual-size"]
        except (ValueError, KeyError, TypeError) as e:
            return f"info --output=json: {e}"
        return None if v == 0 else f"virtual-size {v}, expected 0"

    def empty_out(res, d2):
        s = os.path.getsize(os.path.join(d2, "out.raw"))
        return None if s == 0 else f"out.raw is {s} bytes, expected 0"

    return Spec(img, [Check("info", ["info", "--output=json", img], "ok", post=info_zero),
                      Check("map", cmd_map(img), "ok"),
                      Check("convert", cmd_convert(img), "ok", post=empty_out),
                      Check("read", cmd_read(img, 0), "fail", ("end", "past", "beyond", "range", "size"))])


# --- header ------------------------------------------------------------------

case("bad_magic", "reject")(poke_header("magic", 0x51464958, ("magic", "not a qcow2")))
case("version_0", "reject")(poke_header("version", 0, ("version",)))
case("version_1", "reject")(poke_header("version", 1, ("version",)))
case("version_4", "reject")(poke_header("version", 4, ("version",)))
case("cluster_bits_8", "reject")(poke_header("cluster_bits", 8, ("cluster",)))
case("cluster_bits_22", "reject")(poke_header("cluster_bits", 22, ("cluster",)))
case("cluster_bits_63", "reject")(poke_header("cluster_bits", 63, ("cluster",)))
case("cluster_bits_0xffffffff", "reject")(poke_header("cluster_bits", 0xFFFFFFFF, ("cluster",)))
HLEN = ("header_length", "header length", "header size")
case("header_length_100", "reject")(poke_header("header_length", 100, HLEN))
case("header_length_unaligned", "reject")(poke_header("header_length", 108, HLEN))
case("header_length_past_cluster", "reject")(poke_header("header_length", 64 * KiB + 8, HLEN))
case("header_length_0xfffffff8", "reject")(poke_header("header_length", 0xFFFFFFF8, HLEN))
CRYPT = ("crypt", "luks")
case("crypt_method_3", "reject")(poke_header("crypt_method", 3, CRYPT))
case("crypt_luks_without_header", "reject")(poke_header("crypt_method", 2, CRYPT))
L1 = ("l1",)
case("l1_size_huge", "reject")(poke_header("l1_size", 0x1000000, L1))
case("l1_size_0xffffffff", "reject")(poke_header("l1_size", 0xFFFFFFFF, L1))
case("l1_size_too_small", "reject")(poke_header("l1_size", 1, L1))
case("l1_table_past_eof", None)(poke_header("l1_table_offset", 1 << 40, L1))
case("l1_table_unaligned", "reject")(poke_header("l1_table_offset", 0x30200, L1))
case("l1_table_at_offset_0", None)(poke_header("l1_table_offset", 0, L1))
REF = ("refcount",)
case("refcount_table_huge", "reject")(poke_header("refcount_table_clusters", 0x100000, REF))
case("refcount_table_unaligned", "reject")(poke_header("refcount_table_offset", 0x10200, REF))
case("refcount_table_past_eof", None)(poke_header("refcount_table_offset", 1 << 40, REF))
case("refcount_table_empty", "reject")(poke_header("refcount_table_clusters", 0, REF))
case("refcount_table_at_offset_0", None)(poke_header("refcount_table_offset", 0, REF))
case("refcount_order_7", "reject")(poke_header("refcount_order", 7, REF))
SIZE = ("size", "large", "big", "l1")
case("virtual_size_2_63", "reject")(poke_header("size", 1 << 63, SIZE))
case("virtual_size_2_62", "reject")(poke_header("size", 1 << 62, SIZE))
COMP = ("compression",)
case("compression_bit_without_type", "reject")(poke_header("incompatible_features", INCOMPAT_COMPRESSION, COMP))
case("compression_type_without_bit", "reject")(poke_header("compression_type", 1, COMP))
case("data_file_bit_without_name", "damage")(poke_header(
    "incompatible_features", INCOMPAT_DATA_FILE, ("data file", "data-file", "data_file", "external"),
    info="either"))
case("data_file_raw_without_data_file", None)(poke_header(
    "autoclear_features", AUTOCLEAR_DATA_FILE_RAW, ("data file", "data-file", "data_file", "external")))
case("extended_l2_with_4k_clusters", "reject")(poke_header(
    "incompatible_features", INCOMPAT_EXTL2, ("extended", "subcluster"), cluster=4 * KiB))
case("incompatible_unknown_bit", "reject")(poke_header("incompatible_features", 1 << 40, ("incompatible",)))


@case("compression_type_unknown", qemu="reject")
def _(d):
    img, _ = make_image(d)
    q = Q(d, img)
    if q["header_length"] < 105:
        raise SetupError("qemu-img wrote no compression_type field")
    q["incompatible_features"] = INCOMPAT_COMPRESSION
    q["compression_type"] = 7
    q.save()
    return Spec(img, reject(img, COMP))


@case("incompatible_named_bit", qemu="reject")
def _(d):
    """An unknown incompatible bit the feature name table names: the message must
    carry the name."""
    img, _ = make_image(d)
    q = Q(d, img)
    exts = [(e.type, e.data) for e in q.exts()]
    if not any(t == EXT_FEATURE_TABLE for t, _ in exts):
        exts.append((EXT_FEATURE_TABLE, b""))
    exts = [(t, data + struct.pack(">BB46s", 0, 40, b"frobnicate-v9") if t == EXT_FEATURE_TABLE else data)
            for t, data in exts]
    q.set_exts(exts)
    q["incompatible_features"] = 1 << 40
    q.save()
    return Spec(img, reject(img, ("frobnicate-v9",)))


def truncated(n, **mk):
    def build(d):
        img, _ = make_image(d, **mk)
        os.truncate(os.path.join(d, img), n)
        return Spec(img, reject(img, ("short", "truncat", "small", "header", "empty", "magic", "not a qcow2")))
    return build


case("truncated_empty", "reject")(truncated(0))
case("truncated_50_bytes", "reject")(truncated(50))
case("truncated_v2_50_bytes", "reject")(truncated(50, compat="0.10"))
case("truncated_v3_100_bytes", "reject")(truncated(100))


# --- header extensions --------------------------------------------------------

EXTKW = ("extension",)


@case("extension_overruns_cluster", qemu="reject")
def _(d):
    img, _ = make_image(d)
    q = Q(d, img)
    e = q.exts()[0]
    q.put(e.off + 4, "I", q.cluster_size)
    q.save()
    return Spec(img, reject(img, EXTKW))


@case("extension_area_garbage", qemu="reject")
def _(d):
    img, _ = make_image(d)
    q = Q(d, img)
    q.fill(q.hdr_len, q.cluster_size - q.hdr_len, 0xAB)
    q.save()
    return Spec(img, reject(img, EXTKW))


@case("extension_length_0xffffffff", qemu="reject")
def _(d):
    img, _ = make_image(d)
    q = Q(d, img)
    q.put(q.exts()[0].off + 4, "I", 0xFFFFFFFF)
    q.save()
    return Spec(img, reject(img, EXTKW))


def backing_top(d, fmt="qcow2"):
    """base.qcow2 (default guest) under an empty top.qcow2."""
    make_image(d, "base.qcow2")
    create_overlay(d, "top.qcow2", "base.qcow2", fmt)
    return "top.qcow2", default_guest()


@case("backing_format_extension_too_long", qemu="reject")
def _(d):
    img, _ = backing_top(d)
    q = Q(d, img)
    q.set_exts([(t, b"qcow2" * 20 if t == EXT_BACKING_FMT else data) for t, data in
                [(e.type, e.data) for e in q.exts()]])
    q.save()
    return Spec(img, reject(img, ("format",)))


# --- backing file -------------------------------------------------------------

BACK = ("backing",)


@case("backing_file_size_1024", qemu="reject")
def _(d):
    img, _ = backing_top(d)
    q = Q(d, img)
    q["backing_file_size"] = 1024
    q.save()
    return Spec(img, reject(img, BACK))


@case("backing_name_past_cluster", qemu="reject")
def _(d):
    img, _ = backing_top(d)
    q = Q(d, img)
    q["backing_file_offset"] = q.cluster_size - 4
    q.save()
    return Spec(img, reject(img, BACK))


@case("backing_name_offset_2_62", qemu="reject")
def _(d):
    img, _ = backing_top(d)
    q = Q(d, img)
    q["backing_file_offset"] = 1 << 62
    q.save()
    return Spec(img, reject(img, BACK))


def loop_spec(img):
    return Spec(img, reject(img, ("loop",), info="either"))


@case("backing_loop_a_b_a", qemu=None)
def _(d):
    make_image(d, "a.qcow2")
    create_overlay(d, "a.qcow2", "b.qcow2")
    create_overlay(d, "b.qcow2", "a.qcow2")
    return loop_spec("a.qcow2")


@case("backing_loop_self", qemu=None)
def _(d):
    create_overlay(d, "a.qcow2", "z.qcow2")
    q = Q(d, "a.qcow2")
    q.set_backing_name("a.qcow2")
    q.save()
    return loop_spec("a.qcow2")


@case("backing_loop_self_dot_slash", qemu=None)
def _(d):
    create_overlay(d, "a.qcow2", "z.qcow2")
    q = Q(d, "a.qcow2")
    q.set_backing_name("./a.qcow2")
    q.save()
    return loop_spec("a.qcow2")


@case("backing_loop_a_b_c_b", qemu=None)
def _(d):
    create_overlay(d, "a.qcow2", "b.qcow2")
    create_overlay(d, "b.qcow2", "c.qcow2")
    create_overlay(d, "c.qcow2", "b.qcow2")
    return loop_spec("a.qcow2")


def build_chain(d, n):
    """l00.qcow2 -> l01.qcow2 -> ... -> l{n-1}.qcow2 (the default guest). The overlays
    are copies of one qemu-made overlay with the backing name rewritten."""
    _, g = make_image(d, f"l{n - 1:02d}.qcow2")
    create_overlay(d, "l00.qcow2", "l01.qcow2")
    tmpl = Q(d, "l00.qcow2")
    for i in range(1, n - 1):
        q = Q(d, "l00.qcow2")
        q.b = bytearray(tmpl.b)
        q.path = os.path.join(d, f"l{i:02d}.qcow2")
        q.set_backing_name(f"l{i + 1:02d}.qcow2")
        q.save()
    return g


@case("backing_chain_70_deep", qemu=None)
def _(d):
    build_chain(d, 70)
    return Spec("l00.qcow2", reject("l00.qcow2", ("deep", "depth", "chain", "too many", "nested"), info="either"))


@case("backing_file_missing", qemu=None)
def _(d):
    create_overlay(d, "top.qcow2", "nonexistent.qcow2")
    return Spec("top.qcow2", reject("top.qcow2", ("nonexistent", "backing", "no such"), info="either"))


@case("backing_raw_without_format", qemu=None)
def _(d):
    """A raw backing file and no backing format: no guessing, so it must be refused."""
    g = default_guest(64 * MiB)
    g.write_raw(os.path.join(d, "base.raw"))
    create_overlay(d, "top.qcow2", "base.raw", "raw", "64M")
    q = Q(d, "top.qcow2")
    q.set_exts([(e.type, e.data) for e in q.exts() if e.type != EXT_BACKING_FMT])
    q.save()
    return Spec("top.qcow2", reject("top.qcow2", ("format", "raw", "magic", "qcow2"), info="either"))


@case("backing_format_qcow2_on_raw_file", qemu=None)
def _(d):
    g = default_guest(64 * MiB)
    g.write_raw(os.path.join(d, "base.raw"))
    create_overlay(d, "top.qcow2", "base.raw", "qcow2", "64M")
    return Spec("top.qcow2", reject("top.qcow2", ("magic", "qcow2", "format"), info="either"))


@case("backing_format_unknown", qemu=None)
def _(d):
    img, _ = backing_top(d)
    q = Q(d, img)
    q.set_exts([(e.type, b"vmdk" if e.type == EXT_BACKING_FMT else e.data) for e in q.exts()])
    q.save()
    return Spec(img, reject(img, ("vmdk", "format"), info="either"))


@case("data_file_missing", qemu="damage")
def _(d):
    sh([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "img.qcow2", "64M"], d)
    os.unlink(os.path.join(d, "data.raw"))
    return Spec("img.qcow2", reject("img.qcow2", ("data.raw",), info="either"))


# --- L1/L2 entries: damage inside the mapping -----------------------------------

L2KW = ("l2",)


@case("l2_table_offset_unaligned", qemu="damage")
def _(d):
    img, g = make_image(d)
    q = Q(d, img)
    o = q.l1_entry_off(0)
    q.put(o, "Q", q.u64(o) + 512)
    q.save()
    return Spec(img, damaged(img, g, A_OFF, C_OFF, L2KW))


@case("l2_table_past_eof", qemu=None)
def _(d):
    img, g = make_image(d)
    q = Q(d, img)
    q.put(q.l1_entry_off(0), "Q", OFLAG_COPIED | (1 << 40))
    q.save()
    return Spec(img, damaged(img, g, A_OFF, C_OFF, L2KW))


@case("l1_entry_reserved_bits", qemu=None)
def _(d):
    """Bits 1-8 of an L1 entry are reserved: QEMU masks them off. Either way no crash,
    and a successful read must be right."""
    img, g = make_image(d)
    q = Q(d, img)
    o = q.l1_entry_off(0)
    q.put(o, "Q", q.u64(o) | 0x1FE)
    q.save()
    return Spec(img, lenient(img, g, good=(A_OFF, C_OFF), info="ok"))


@case("l2_entry_unaligned", qemu="damage")
def _(d):
    img, g = make_image(d)
    q = Q(d, img)
    o = q.l2_entry_off(A_OFF)
    q.put(o, "Q", q.u64(o) + 512)
    q.save()
    return Spec(img, damaged(img, g, A_OFF, B_OFF, ("align",)))


@case("l2_entry_past_eof", qemu=None)
def _(d):
    """A data cluster past the end of the file: QEMU reads zeroes there; an error is
    fine too. The other clusters must read right."""
    img, g = make_image(d)
    q = Q(d, img)
    o = q.l2_entry_off(A_OFF)
    q.put(o, "Q", OFLAG_COPIED | (1 << 40))
    q.save()
    return Spec(img, lenient(img, g, good=(B_OFF, C_OFF), info="ok"))


@case("l2_entry_reserved_bits", qemu=None)
def _(d):
    img, g = make_image(d)
    q = Q(d, img)
    o = q.l2_entry_off(A_OFF)
    q.put(o, "Q", q.u64(o) | 0x1FE)
    q.save()
    return Spec(img, lenient(img, g, good=(B_OFF, C_OFF), info="ok"))


@case("l2_table_all_ones", qemu=None)
def _(d):
    img, g = make_image(d)
    q = Q(d, img)
    l2 = q.u64(q.l1_entry_off(0)) & OFFSET_MASK
    q.fill(l2, q.cluster_size, 0xFF)
    q.save()
    return Spec(img, lenient(img, g, good=(C_OFF,), info="ok"))


@case("zero_flag_in_v2_image", qemu="damage")
def _(d):
    img, g = make_image(d, compat="0.10")
    q = Q(d, img)
    o = q.l2_entry_off(A_OFF)
    q.put(o, "Q", q.u64(o) | OFLAG_ZERO)
    q.save()
    return Spec(img, damaged(img, g, A_OFF, B_OFF, ("zero",)))


@case("extended_l2_alloc_and_zero", qemu="damage")
def _(d):
    img, g = make_image(d, opts="extended_l2=on")
    q = Q(d, img)
    o = q.l2_entry_off(A_OFF)
    if not q.extended:
        raise SetupError("image is not extended_l2")
    q.put(o + 8, "Q", q.u64(o + 8) | (1 << 32))
    q.save()
    return Spec(img, damaged(img, g, A_OFF, B_OFF, ("zero", "subcluster")))


@case("extended_l2_alloc_without_cluster", qemu="damage")
def _(d):
    img, g = make_image(d, opts="extended_l2=on")
    q = Q(d, img)
    o = q.l2_entry_off(5 * 64 * KiB)
    if q.u64(o) != 0:
        raise SetupError("guest cluster 5 is allocated")
    q.put(o + 8, "Q", 1)
    q.save()
    return Spec(img, damaged(img, g, 5 * 64 * KiB, A_OFF, ("l2", "subcluster", "alloc", "host")))


@case("data_truncated_after_metadata", qemu=None)
def _(d):
    """The file ends before the data clusters: metadata is intact, so the image opens;
    reads of the missing clusters may give zeroes or an error."""
    img, g = make_image(d)
    q = Q(d, img)
    first = min(q.data_off(A_OFF), q.data_off(B_OFF), q.data_off(C_OFF))
    os.truncate(q.path, first)
    return Spec(img, lenient(img, g, info="ok"))


# --- compressed clusters -----------------------------------------------------------

CKW = ("compress",)


def compressed_garbage(kind):
    def build(d):
        img, g = make_image(d, compress=kind)
        q = Q(d, img)
        _, host, _, _ = q.compressed(A_OFF)
        q.fill(host, 64, 0xFF)   # zlib: invalid block type 3; zstd: bad frame magic
        q.save()
        return Spec(img, damaged(img, g, A_OFF, B_OFF, CKW))
    return build


case("compressed_zlib_garbage", "damage")(compressed_garbage("zlib"))
case("compressed_zstd_garbage", "damage")(compressed_garbage("zstd"))


def compressed_past_eof(kind):
    def build(d):
        img, g = make_image(d, compress=kind)
        q = Q(d, img)
        eo, host, _, x = q.compressed(A_OFF)
        e = q.u64(eo)
        q.put(eo, "Q", (e & ~((1 << x) - 1)) | (len(q.b) + 12345))
        q.save()
        return Spec(img, damaged(img, g, A_OFF, B_OFF, CKW))
    return build


case("compressed_offset_past_eof_zlib", None)(compressed_past_eof("zlib"))
case("compressed_offset_past_eof_zstd", None)(compressed_past_eof("zstd"))


@case("compressed_sector_count_max", qemu=None)
def _(d):
    """The descriptor claims the most sectors it can: more input than the data needs,
    partly past the end of the file."""
    img, g = make_image(d, compress="zlib")
    q = Q(d, img)
    eo, _, _, x = q.compressed(B_OFF)
    q.put(eo, "Q", q.u64(eo) | (((1 << (q["cluster_bits"] - 8)) - 1) << x))
    q.save()
    return Spec(img, lenient(img, g, good=(A_OFF, B_OFF), info="ok"))


@case("compressed_in_extended_l2_garbage", qemu="damage")
def _(d):
    img, g = make_image(d, compress="zlib", opts="extended_l2=on")
    q = Q(d, img)
    _, host, _, _ = q.compressed(A_OFF)
    q.fill(host, 64, 0xFF)
    q.save()
    return Spec(img, damaged(img, g, A_OFF, B_OFF, CKW))


# --- refcount structures (not needed to read; must not crash) --------------------

def refcount_damage(how):
    def build(d):
        img, g = make_image(d)
        q = Q(d, img)
        rt = q["refcount_table_offset"]
        if how == "unaligned":
            q.put(rt, "Q", q.u64(rt) + 512)
        elif how == "past_eof":
            q.put(rt, "Q", 1 << 40)
        else:
            q.fill(rt, q.cluster_size, 0xFF)
        q.save()
        return Spec(img, lenient(img, g, good=(A_OFF, C_OFF)))
    return build


case("refcount_block_unaligned", None)(refcount_damage("unaligned"))
case("refcount_block_past_eof", None)(refcount_damage("past_eof"))
case("refcount_table_all_ones", None)(refcount_damage("ones"))


# --- encryption --------------------------------------------------------------------

@case("crypt_method_aes", qemu=None)
def _(d):
    """An AES image (header poked, data not really encrypted): it may open, but
    reading guest data must be refused, not return ciphertext as plaintext."""
    img, _ = make_image(d)
    q = Q(d, img)
    q["crypt_method"] = 1
    q.save()
    return Spec(img, [Check("info", cmd_info(img), "either", CRYPT),
                      Check("read", cmd_read(img, 0), "fail", CRYPT + ("decrypt",)),
                      Check("convert", cmd_convert(img), "fail", CRYPT + ("decrypt",)),
                      Check("map", cmd_map(img), "either", CRYPT)])


# --- snapshots -----------------------------------------------------------------------

SNAP = ("snapshot",)


def snap_image(d):
    """img.qcow2 with snapshot s1 of the default guest, then cluster 0 rewritten."""
    img, g = make_image(d)
    sh([QEMU_IMG, "snapshot", "-c", "s1", img], d)
    qemu_io(d, img, "write -P 0x5a 0 64k")
    return img, g, g.with_extent(0, b"\x5a" * 64 * KiB)


def snap_table_damage(poke):
    def build(d):
        img, _, _ = snap_image(d)
        q = Q(d, img)
        poke(q)
        q.save()
        return Spec(img, reject(img, SNAP))
    return build


def _snap_unaligned(q):
    q["snapshots_offset"] = q["snapshots_offset"] + 8


def _snap_nb_huge(q):
    q["nb_snapshots"] = 0x7FFFFFFF


def _snap_past_eof(q):
    q["snapshots_offset"] = 1 << 40


def _snap_offset_zero(q):
    q["snapshots_offset"] = 0


def _snap_extra_huge(q):
    q.put(q.snapshot_entry(0) + 36, "I", 0xFFFFFFFF)


case("snapshot_table_unaligned", "reject")(snap_table_damage(_snap_unaligned))
case("snapshot_count_huge", "reject")(snap_table_damage(_snap_nb_huge))
case("snapshot_table_past_eof", None)(snap_table_damage(_snap_past_eof))
case("snapshot_table_at_offset_0", None)(snap_table_damage(_snap_offset_zero))
case("snapshot_extra_data_huge", "reject")(snap_table_damage(_snap_extra_huge))


def snap_l1_damage(poke):
    """The snapshot's own L1 table is bad: reading the snapshot must fail naming it;
    the active image may still open (then it must read right)."""
    def build(d):
        img, g_snap, g_act = snap_image(d)
        q = Q(d, img)
        poke(q, q.snapshot_entry(0))
        q.save()
        kw = ("snapshot", "l1")
        return Spec(img, [Check("info", cmd_info(img), "either", kw),
                          Check("read-active", cmd_read(img, 0), "either", kw, data=g_act.read(0, 64 * KiB)),
                          Check("read-snapshot", cmd_read(img, 0, snap="s1"), "fail", kw),
                          Check("convert-snapshot", cmd_convert(img, snap="s1"), "fail", kw),
                          Check("map", cmd_map(img), "either", kw)])
    return build


case("snapshot_l1_past_eof", None)(snap_l1_damage(lambda q, e: q.put(e, "Q", 1 << 40)))
case("snapshot_l1_unaligned", None)(snap_l1_damage(lambda q, e: q.put(e, "Q", q.u64(e) + 512)))
case("snapshot_l1_size_huge", None)(snap_l1_damage(lambda q, e: q.put(e + 8, "I", 0x7FFFFFFF)))


@case("snapshot_name_size_overrun", qemu=None)
def _(d):
    img, _, g_act = snap_image(d)
    q = Q(d, img)
    q.put(q.snapshot_entry(0) + 14, "H", 0xFFFF)
    q.save()
    return Spec(img, lenient(img, g_act, good=(0, C_OFF), kw=SNAP))


# --- bitmaps ------------------------------------------------------------------------

BMK = ("bitmap",)


def bitmap_damage(poke, info="fail"):
    def build(d):
        img, g = make_image(d)
        sh([QEMU_IMG, "bitmap", "--add", img, "b0"], d)
        q = Q(d, img)
        poke(q)
        q.save()
        return Spec(img, [Check("info", cmd_info(img), info, BMK),
                          Check("read", cmd_read(img, B_OFF), "either", BMK, data=g.read(B_OFF, 64 * KiB)),
                          Check("convert", cmd_convert(img), "either", BMK),
                          Check("map", cmd_map(img), "either", BMK)])
    return build


def _bm_garbage(q):
    _, _, size, off = q.bitmap_dir()
    q.fill(off, max(size, 64), 0xA5)


def _bm_ext_field(field_off, fmt, value):
    def poke(q):
        e = q.ext(EXT_BITMAPS)
        q.put(e.off + 8 + field_off, fmt, value)
    return poke


def _bm_ext_len(q):
    q.put(q.ext(EXT_BITMAPS).off + 4, "I", 16)


def _bm_duplicate(q):
    exts = [(e.type, e.data) for e in q.exts()]
    q.set_exts(exts + [(t, dd) for t, dd in exts if t == EXT_BITMAPS])


def _bm_table_unaligned(q):
    _, _, _, off = q.bitmap_dir()
    q.put(off, "Q", q.u64(off) + 8)


def _bm_name_size_huge(q):
    _, _, _, off = q.bitmap_dir()
    q.put(off + 18, "H", 0xFFFF)


def _bm_extra_past_dir(q):
    _, _, _, off = q.bitmap_dir()
    q.put(off + 20, "I", 0x7FFFFFF0)


def _bm_count_more_than_dir(q):
    _, _, _, off = q.bitmap_dir()
    e = q.ext(EXT_BITMAPS)
    q.put(e.off + 8, "I", 2)  # two entries promised, the directory holds one (but is big enough for two fixed parts)
    q.put(e.off + 8 + 8, "Q", 56)


def _bm_all_ones_table(q):
    # the table's only entry all ones, without a data cluster: valid, the bitmap is all dirty
    _, _, _, off = q.bitmap_dir()
    q.put(q.u64(off), "Q", 1)


case("bitmap_entry_extra_past_directory", "reject")(bitmap_damage(_bm_extra_past_dir))
case("bitmap_count_more_than_directory", "reject")(bitmap_damage(_bm_count_more_than_dir))
case("bitmap_table_all_ones", None)(bitmap_damage(_bm_all_ones_table, info="ok"))
case("bitmap_directory_garbage", "reject")(bitmap_damage(_bm_garbage))
case("bitmap_count_zero", "reject")(bitmap_damage(_bm_ext_field(0, "I", 0)))
case("bitmap_directory_size_huge", "reject")(bitmap_damage(_bm_ext_field(8, "Q", 1 << 40)))
case("bitmap_directory_past_eof", None)(bitmap_damage(_bm_ext_field(16, "Q", 1 << 40)))
case("bitmap_directory_unaligned", "reject")(bitmap_damage(_bm_ext_field(16, "Q", 0)))
case("bitmap_extension_bad_length", "reject")(bitmap_damage(_bm_ext_len))
case("bitmap_extension_twice", None)(bitmap_damage(_bm_duplicate, info="either"))
case("bitmap_name_size_huge", "reject")(bitmap_damage(_bm_name_size_huge))
case("bitmap_table_unaligned", None)(bitmap_damage(_bm_table_unaligned, info="either"))


# --- seeded random damage: no crash, hang or blow-up whatever the bytes -----------

def random_damage(seed, where):
    def build(d):
        rng = random.Random(seed)
        kind = rng.choice(["plain", "zlib", "zstd", "extl2", "v2"])
        img, g = make_image(d, compress=kind if kind in ("zlib", "zstd") else None,
                            compat="0.10" if kind == "v2" else "1.1",
                            opts="extended_l2=on" if kind == "extl2" else "")
        q = Q(d, img)
        if where == "header":
            lo, hi = 0, q.hdr_len + 256
        else:
            areas = [q["l1_table_offset"], q["refcount_table_offset"],
                     q.u64(q.l1_entry_off(0)) & OFFSET_MASK]
            lo = rng.choice(areas)
            hi = lo + min(q.cluster_size, 4096)
        for _ in range(rng.randint(1, 6)):
            off = rng.randrange(lo, hi)
            q.b[off] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        q.save()
        return Spec(img, lenient(img, g, good=(C_OFF,)))
    return build


for _i in range(8):
    case(f"random_header_{_i}", None)(random_damage(1000 + _i, "header"))
    case(f"random_tables_{_i}", None)(random_damage(2000 + _i, "tables"))


# ---------------------------------------------------------------------------
# Driver.

def run_case(name, root, keep):
    fn, _ = CASES[name]
    d = os.path.join(root, name)
    os.makedirs(d)
    try:
        spec = fn(d)
    except SetupError as e:
        return False, [f"setup: {e}"]
    problems = []
    for chk in spec.checks:
        res = run_tool(chk.args, d)
        with PEAK_LOCK:
            if res.maxrss_kib > PEAK["kib"]:
                PEAK["kib"], PEAK["where"] = res.maxrss_kib, f"{name}/{chk.label}"
        for why in judge(res, chk):
            problems.append(f"{chk.label}: {why}\n      run: {res.cmdline()}")
        out = os.path.join(d, "out.raw")
        if os.path.exists(out):
            os.unlink(out)
    if not problems and not keep:
        shutil.rmtree(d, ignore_errors=True)
    return not problems, problems


def qemu_case(name, root):
    """--check-qemu: what qemu-img makes of the broken image."""
    fn, want = CASES[name]
    d = os.path.join(root, name)
    os.makedirs(d)
    try:
        spec = fn(d)
    except SetupError as e:
        return False, [f"setup: {e}"]

    def q(argv):
        try:
            p = subprocess.run(argv, cwd=d, stdin=subprocess.DEVNULL, capture_output=True, timeout=15)
            return p.returncode, [l[:160] for l in p.stderr.decode("utf-8", "replace").strip().splitlines()[:1]]
        except subprocess.TimeoutExpired:
            return "timeout", []
    irc, imsg = q([QEMU_IMG, "info", "-f", "qcow2", spec.img])
    crc, cmsg = q([QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", spec.img, "qemu-out.raw"])
    got = "reject" if irc != 0 else "damage" if crc != 0 else "ok"
    detail = f"qemu-img info rc={irc} {imsg}; convert rc={crc} {cmsg}"
    ok = want is None or want == got
    return ok, [("" if ok else f"expected {want}, qemu says {got}: ") + detail]


def main():
    global ASAN_BUILD
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", action="append", default=[], metavar="NAME",
                    help="run only this case, or the cases matching a glob (repeatable)")
    ap.add_argument("-j", type=int, default=min(4, os.cpu_count() or 1), help="cases run in parallel")
    ap.add_argument("--keep", action="store_true", help="keep every case's folder")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--check-qemu", action="store_true", help="check the broken images against qemu-img")
    args = ap.parse_args()

    if args.list:
        print("\n".join(CASES))
        return 0
    names = []
    for pat in args.k or ["*"]:
        names += [n for n in CASES if fnmatch.fnmatchcase(n, pat) and n not in names] or [pat]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    bad = suite.check_needs(tools=(QEMU_IMG, QEMU_IO))
    if bad is not None:
        return bad
    if not args.check_qemu:
        if not QCOWIMG or not os.access(QCOWIMG, os.X_OK):
            print("corrupt.py: set QCOWIMG to the qcowimg binary", file=sys.stderr)
            return 2
        ASAN_BUILD = binary_has_asan(QCOWIMG)

    def task(n, root):
        def run():
            if args.check_qemu:
                ok, problems = qemu_case(n, root)
            else:
                ok, problems = run_case(n, root, args.keep)
            if ok:
                return suite.Outcome(n, [], os.path.join(root, n), problems[0] if args.check_qemu else "")
            return suite.Outcome(n, [(p.splitlines()[0], p.splitlines()[1:]) for p in problems],
                                 os.path.join(root, n))
        return run

    with suite.Scratch("qcowd-corrupt-", args.keep) as scratch:
        passed, failed, _ = suite.run_all(scratch, [task(n, scratch.root) for n in names], args.j)
    if PEAK["where"]:
        print(f"largest peak RSS: {PEAK['kib'] // 1024} MiB ({PEAK['where']})")
    return suite.summary(passed, failed)


if __name__ == "__main__":
    sys.exit(main())
