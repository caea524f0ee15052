#!/usr/bin/python3
"""bitmaps.py: proves qcowimg's persistent dirty bitmaps are the ones qemu knows:
bitmaps qcowimg adds or changes show in `qemu-img info` with the same fields and
keep working under `qemu-img bitmap`; bitmaps qemu-img and qemu-io made (any
granularity) read the same in qcowimg; after qcowimg write/zero/discard the dirty
runs `qcowimg dirty` lists equal what qemu-nbd exports (nbdinfo
--map=qemu:dirty-bitmap:NAME) and what the writes must have marked; a bitmap left
in use by a killed writer is reported and can be cleared or removed; bad input
fails as qemu-img fails. `qemu-img check` is clean after every change.

Environment: QCOWIMG (required), QEMU_IMG, QEMU_IO, QEMU_NBD, NBDINFO.
Usage: bitmaps.py [--seed N] [--keep]. Prints `ok NAME` / `FAIL NAME: reason`, then
`N passed, M failed`; exits 1 on a failure, 77 when a qemu tool is missing.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import qcowd  # noqa: E402  (Cases, the options)
import suite  # noqa: E402  (check_needs)

KiB = 1024
MiB = 1024 * KiB

QCOWIMG = os.environ.get("QCOWIMG", "")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")
QEMU_NBD = os.environ.get("QEMU_NBD", "qemu-nbd")
NBDINFO = os.environ.get("NBDINFO", "nbdinfo")
EXT_BITMAPS = 0x23852875


def run(*cmd, ok=True, stdin=None):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, input=stdin, timeout=300)
    if ok and p.returncode != 0:
        raise AssertionError("%s failed (%d): %s" % (" ".join(map(str, cmd))[:200], p.returncode,
                                                     p.stderr.decode(errors="replace")[:500]))
    return p


def qimg(*args, ok=True):
    return run(QCOWIMG, *args, ok=ok)


def qemu_info_bitmaps(img):
    j = json.loads(run(QEMU_IMG, "info", "-U", "--output=json", img).stdout)
    return j["format-specific"]["data"].get("bitmaps", [])


def our_info_bitmaps(img):
    j = json.loads(qimg("info", "--output=json", img).stdout)
    return j["format-specific"]["data"].get("bitmaps", [])


def check_clean(img):
    p = run(QEMU_IMG, "check", "--output=json", img, ok=False)
    j = json.loads(p.stdout) if p.stdout else {}
    bad = {k: j.get(k) for k in ("corruptions", "leaks", "check-errors") if j.get(k)}
    if p.returncode != 0 or bad:
        raise AssertionError("qemu-img check %s: rc %d %s %s" % (img, p.returncode, bad, p.stderr[:300]))


def runs(entries):
    """Merge [(start, length, dirty)] into maximal runs."""
    out = []
    for s, n, d in entries:
        if n == 0:
            continue
        if out and out[-1][2] == d and out[-1][0] + out[-1][1] == s:
            out[-1][1] += n
        else:
            out.append([s, n, d])
    return [tuple(x) for x in out]


def nbd_map(img, name):
    p = run(NBDINFO, "--json", "--map=qemu:dirty-bitmap:" + name, "--", "[", QEMU_NBD, "-r", "-f", "qcow2",
            "-B", name, img, "]")
    return runs((e["offset"], e["length"], e["type"] == 1) for e in json.loads(p.stdout))


def our_map(img, name):
    p = qimg("dirty", "--output=json", img, name)
    return runs((e["start"], e["length"], e["dirty"]) for e in json.loads(p.stdout))


def expected_map(size, gran, ranges):
    """The runs a bitmap of granularity gran shows after writes to ranges [(off, len)]."""
    nb = (size + gran - 1) // gran
    bits = bytearray(nb)
    for off, n in ranges:
        if n:
            for k in range(off // gran, (off + n - 1) // gran + 1):
                bits[k] = 1
    return runs((k * gran, min(gran, size - k * gran), bool(bits[k])) for k in range(nb))


def all_clean(size):
    return [(0, size, False)]


def dir_entry(img, name):
    """(entry offset, table offset, table size) of a bitmap, read from the file."""
    with open(img, "rb") as f:
        h = f.read(4096)
        pos = struct.unpack(">I", h[100:104])[0]
        while True:
            t, n = struct.unpack(">II", h[pos:pos + 8])
            if t == 0:
                raise AssertionError("no bitmaps extension")
            if t == EXT_BITMAPS:
                cnt, _, _, off = struct.unpack(">IIQQ", h[pos + 8:pos + 32])
                break
            pos += 8 + ((n + 7) & ~7)
        for _ in range(cnt):
            f.seek(off)
            e = f.read(24)
            toff, tsize = struct.unpack(">QI", e[:12])
            nl, extra = struct.unpack(">HI", e[18:24])
            if f.read(extra + nl)[extra:].decode() == name:
                return off, toff, tsize
            off += (24 + extra + nl + 7) & ~7
    raise AssertionError("no bitmap " + name)


def autoclear(img):
    with open(img, "rb") as f:
        return struct.unpack(">Q", f.read(96)[88:96])[0]


def set_in_use(img, name):
    """Poke the in_use flag of a bitmap's directory entry, as a crash leaves it."""
    off, _, _ = dir_entry(img, name)
    with open(img, "r+b") as f:
        f.seek(off + 12)
        fl = struct.unpack(">I", f.read(4))[0]
        f.seek(off + 12)
        f.write(struct.pack(">I", fl | 1))


class Suite(qcowd.Cases):
    """The cases, and the images they make in top."""

    def __init__(self, args, top):
        super().__init__(args.seed)
        self.top = top
        self.n = 0

    def img(self, size="64M", opts=None, backing=None):
        self.n += 1
        p = os.path.join(self.top, "i%d.qcow2" % self.n)
        cmd = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
        if opts:
            cmd += ["-o", opts]
        if backing:
            cmd += ["-b", backing, "-F", "qcow2"]
        run(*cmd, p, *([size] if size else []))
        return p

    def random_ranges(self, size, count, maxlen=300 * KiB):
        out = []
        for _ in range(count):
            n = self.rng.randrange(1, maxlen)
            out.append((self.rng.randrange(0, size - n), n))
        return out


def same_maps(img, name, want=None):
    a, b = nbd_map(img, name), our_map(img, name)
    assert a == b, "%s: qemu-nbd shows %s, qcowimg %s" % (name, a[:8], b[:8])
    if want is not None:
        assert a == want, "%s: %s, want %s" % (name, a[:8], want[:8])


def our_write(img, off, n, rng):
    run(QCOWIMG, "write", img, str(off), stdin=rng.randbytes(n))


def main():
    args = qcowd.parse_args()
    rc = suite.check_needs({"QCOWIMG": QCOWIMG}, (QEMU_IMG, QEMU_IO, QEMU_NBD, NBDINFO))
    if rc is not None:
        return rc
    top = tempfile.mkdtemp(prefix="qcowd-bitmaps-")
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    s = Suite(args, top)
    try:
        cases(s)
    finally:
        qcowd.remove_temp(top, args.keep)
    return s.summary()


def cases(s):
    rng = s.rng

    def add_matches_qemu():
        # default granularity as qemu-img picks it, per cluster size; explicit ones; disabled
        for cs in (512, 4096, 65536, 2 * MiB):
            a, b = s.img("16M", "cluster_size=%d" % cs), s.img("16M", "cluster_size=%d" % cs)
            qimg("bitmap", "--add", a, "d")
            qimg("bitmap", "--add", "-g", "512", a, "g512")
            qimg("bitmap", "--add", "-g", "1M", "--disable", a, "off")
            run(QEMU_IMG, "bitmap", "--add", b, "d")
            run(QEMU_IMG, "bitmap", "--add", "-g", "512", b, "g512")
            run(QEMU_IMG, "bitmap", "--add", "-g", "1M", "--disable", b, "off")
            qa, qb = qemu_info_bitmaps(a), qemu_info_bitmaps(b)
            assert qa == qb, "cluster %d: ours %s, qemu-img's %s" % (cs, qa, qb)
            assert our_info_bitmaps(a) == qa, "qcowimg info %s != qemu-img info %s" % (our_info_bitmaps(a), qa)
            check_clean(a)
            for name in ("d", "g512", "off"):
                same_maps(a, name, all_clean(16 * MiB))
    s.case("add_matches_qemu_img_info", add_matches_qemu)

    def writes_mark():
        size = 64 * MiB
        img = s.img("64M")
        qimg("bitmap", "--add", img, "b64k")
        qimg("bitmap", "--add", "-g", "4k", img, "b4k")
        qimg("bitmap", "--add", "-g", "2M", img, "b2m")
        qimg("bitmap", "--add", "--disable", img, "off")
        done = []
        for i, (off, n) in enumerate(s.random_ranges(size, 12)):
            if i % 3 == 0:
                our_write(img, off, n, rng)
            elif i % 3 == 1:
                qimg("zero", img, str(off), str(n))
            else:
                qimg("discard", img, str(off), str(n))
            done.append((off, n))
        check_clean(img)
        for name, g in (("b64k", 64 * KiB), ("b4k", 4 * KiB), ("b2m", 2 * MiB)):
            same_maps(img, name, expected_map(size, g, done))
        same_maps(img, "off", all_clean(size))
        assert [b["flags"] for b in qemu_info_bitmaps(img)] == [["auto"]] * 3 + [[]]
    s.case("qcowimg_writes_mark_enabled_bitmaps", writes_mark)

    def qemu_ops_on_ours():
        size = 32 * MiB
        img = s.img("32M")
        qimg("bitmap", "--add", img, "a")
        qimg("bitmap", "--add", "-g", "8k", "--disable", img, "b")
        w = s.random_ranges(size, 5)
        for off, n in w:
            our_write(img, off, n, rng)
        run(QEMU_IMG, "bitmap", "--merge", "a", img, "b")
        check_clean(img)
        # b (8k) got a's 64k granules: each dirty 64k granule is dirty in b too
        same_maps(img, "b", expected_map(size, 64 * KiB, w))
        run(QEMU_IMG, "bitmap", "--clear", img, "a")
        check_clean(img)
        same_maps(img, "a", all_clean(size))
        run(QEMU_IMG, "bitmap", "--disable", img, "a")
        our_write(img, 0, 4096, rng)
        same_maps(img, "a", all_clean(size))
        run(QEMU_IMG, "bitmap", "--enable", img, "a")
        our_write(img, 5 * MiB, 4096, rng)
        same_maps(img, "a", expected_map(size, 64 * KiB, [(5 * MiB, 4096)]))
        run(QEMU_IMG, "bitmap", "--remove", img, "b")
        check_clean(img)
        assert [b["name"] for b in qemu_info_bitmaps(img)] == ["a"]
        assert our_info_bitmaps(img) == qemu_info_bitmaps(img)
    s.case("qemu_img_bitmap_works_on_qcowimg_bitmaps", qemu_ops_on_ours)

    def ours_on_qemus():
        size = 48 * MiB
        img = s.img("48M")
        grans = {"g512": 512, "g16k": 16 * KiB, "g64k": 64 * KiB, "g1m": MiB, "g4m": 4 * MiB}
        for name, g in grans.items():
            run(QEMU_IMG, "bitmap", "--add", "-g", str(g), img, name)
        w = [(off & ~511, (n + 511) & ~511) for off, n in s.random_ranges(size, 8)]
        cmds = []
        for i, (off, n) in enumerate(w):
            cmds += ["-c", "write -q -P %d %d %d" % (i + 1, off, n) if i % 2 else "write -q -z %d %d" % (off, n)]
        run(QEMU_IO, "-f", "qcow2", *cmds, img)
        assert our_info_bitmaps(img) == qemu_info_bitmaps(img)
        for name, g in grans.items():
            same_maps(img, name, expected_map(size, g, w))
        # our changes to them, with qemu-img's view after each
        qimg("bitmap", "--add", "-g", "32k", "--disable", img, "m")
        qimg("bitmap", "--merge", "g4m", img, "m")
        check_clean(img)
        same_maps(img, "m", expected_map(size, 4 * MiB, w))
        qimg("bitmap", "--merge", "g512", img, "g1m")
        same_maps(img, "g1m", expected_map(size, MiB, w))
        qimg("bitmap", "--clear", img, "g16k")
        same_maps(img, "g16k", all_clean(size))
        qimg("bitmap", "--disable", img, "g512")
        our_write(img, 0, 100, rng)
        same_maps(img, "g512", expected_map(size, 512, w))
        same_maps(img, "g16k", expected_map(size, 16 * KiB, [(0, 100)]))
        qimg("bitmap", "--remove", img, "g64k")
        check_clean(img)
        names = [b["name"] for b in qemu_info_bitmaps(img)]
        assert names == ["g512", "g16k", "g1m", "g4m", "m"], names
        assert our_info_bitmaps(img) == qemu_info_bitmaps(img)
        # and qemu keeps using what we rewrote
        run(QEMU_IO, "-f", "qcow2", "-c", "write -q 40M 1k", img)
        same_maps(img, "g16k", expected_map(size, 16 * KiB, [(0, 100), (40 * MiB, 1024)]))
        check_clean(img)
    s.case("qcowimg_reads_and_changes_qemu_bitmaps", ours_on_qemus)

    def merge_other_file():
        a, b, c = s.img("16M"), s.img("16M"), s.img("16M")
        for img in (a, b):
            run(QEMU_IMG, "bitmap", "--add", "-g", "4k", img, "src")
        w = s.random_ranges(16 * MiB, 4)
        for img in (a, b):
            run(QEMU_IO, "-f", "qcow2", *sum((["-c", "write -q %d %d" % r] for r in w), []), img)
        qimg("bitmap", "--add", c, "dst")
        qimg("bitmap", "--merge", "src", "-b", a, "-F", "qcow2", c, "dst")
        c2 = s.img("16M")
        run(QEMU_IMG, "bitmap", "--add", c2, "dst")
        run(QEMU_IMG, "bitmap", "--merge", "src", "-b", b, "-F", "qcow2", c2, "dst")
        assert nbd_map(c, "dst") == nbd_map(c2, "dst") == expected_map(16 * MiB, 64 * KiB, w)
        same_maps(c, "dst")
        check_clean(c)
        d = s.img("8M")
        p = qimg("bitmap", "--add", "--merge", "src", "-b", a, d, "x", ok=False)
        assert p.returncode == 1 and b"different sizes" in p.stderr, p.stderr
    s.case("merge_from_another_file_as_qemu_img", merge_other_file)

    def header_variants():
        # the header cluster is rewritten: backing name, backing format, other extensions survive
        base = s.img("8M")
        run(QEMU_IO, "-f", "qcow2", "-c", "write -q -P 7 0 1M", base)
        for opts, backing in (("compression_type=zstd", None), ("extended_l2=on", None), ("lazy_refcounts=on", None),
                              (None, base), ("cluster_size=512", base)):
            img = s.img("8M" if not backing else None, opts, backing)
            before = json.loads(run(QEMU_IMG, "info", "--output=json", img).stdout)
            qimg("bitmap", "--add", img, "x")
            our_write(img, 3 * MiB, 5000, rng)
            qimg("bitmap", "--add", "--disable", img, "y")
            after = json.loads(run(QEMU_IMG, "info", "--output=json", img).stdout)
            for k in ("backing-filename", "backing-filename-format", "cluster-size", "virtual-size"):
                assert before.get(k) == after.get(k), "%s %s: %r -> %r" % (opts, k, before.get(k), after.get(k))
            fb, fa = before["format-specific"]["data"], after["format-specific"]["data"]
            fa = {k: v for k, v in fa.items() if k != "bitmaps"}
            assert fb == fa, "%s: %s -> %s" % (opts, fb, fa)
            check_clean(img)
            same_maps(img, "x", expected_map(8 * MiB, max(4096, min(65536, after["cluster-size"])), [(3 * MiB, 5000)]))
            if backing:
                run(QEMU_IMG, "convert", "-O", "raw", img, img + ".raw")
                with open(img + ".raw", "rb") as f:
                    assert f.read(4) == b"\x07" * 4, "backing data lost"
            assert autoclear(img) & 1, "the bitmaps autoclear bit is not set"
            qimg("bitmap", "--remove", img, "x")
            qimg("bitmap", "--remove", img, "y")
            assert not autoclear(img) & 1, "the bitmaps autoclear bit stays after the last bitmap went"
            check_clean(img)
            assert "bitmaps" not in json.loads(run(QEMU_IMG, "info", "--output=json", img).stdout)[
                "format-specific"]["data"], "the extension stays after the last bitmap went"
    s.case("header_extensions_and_backing_name_survive", header_variants)

    def many():
        img = s.img("4M")
        names = ["bm-%03d" % i for i in range(60)]
        for i, n in enumerate(names):
            qimg("bitmap", "--add", "-g", str(512 << (i % 5)), img, n)
        for n in names[::2]:
            qimg("bitmap", "--remove", img, n)
        check_clean(img)
        assert [b["name"] for b in qemu_info_bitmaps(img)] == names[1::2]
        assert our_info_bitmaps(img) == qemu_info_bitmaps(img)
        long_name = "n" * 1023
        qimg("bitmap", "--add", img, long_name)
        assert qemu_info_bitmaps(img)[-1]["name"] == long_name
        check_clean(img)
    s.case("many_bitmaps_and_a_1023_byte_name", many)

    def stale():
        size = 16 * MiB
        img = s.img("16M")
        qimg("bitmap", "--add", img, "crashed")
        qimg("bitmap", "--add", img, "crashed2")
        our_write(img, MiB, 4096, rng)
        # a writer killed while it had the image open: qemu-nbd marks enabled bitmaps in use
        # (-t: it stays up after the client goes, so the kill finds it idle, not closing)
        sock = os.path.join(s.top, "nbd.sock")
        p = subprocess.Popen([QEMU_NBD, "-t", "-f", "qcow2", "-k", sock, img], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        run(NBDINFO, "--size", "nbd+unix:///?socket=" + sock)
        p.kill()
        p.wait()
        qimg("bitmap", "--add", img, "live")
        flags = {b["name"]: b["flags"] for b in qemu_info_bitmaps(img)}
        assert flags["crashed"] == ["in-use", "auto"], flags
        assert our_info_bitmaps(img) == qemu_info_bitmaps(img)
        r = qimg("dirty", img, "crashed", ok=False)
        assert r.returncode == 1 and b"in use" in r.stderr, r.stderr
        for op in (["--enable"], ["--disable"], ["--merge", "live"]):
            r = qimg("bitmap", *op, img, "crashed", ok=False)
            assert r.returncode == 1 and b"inconsistent" in r.stderr, (op, r.stderr)
            assert run(QEMU_IMG, "bitmap", *op, img, "crashed", ok=False).returncode != 0
        # clear makes it usable again (qemu-img only removes), remove drops it
        qimg("bitmap", "--clear", img, "crashed")
        qimg("bitmap", "--remove", img, "crashed2")
        check_clean(img)
        b = {x["name"]: x for x in qemu_info_bitmaps(img)}
        assert b["crashed"]["flags"] == ["auto"] and "crashed2" not in b, b
        same_maps(img, "crashed", all_clean(size))
        our_write(img, 2 * MiB, 10, rng)
        same_maps(img, "crashed", expected_map(size, 64 * KiB, [(2 * MiB, 10)]))
        # a poked flag, as a crash of any writer leaves it
        set_in_use(img, "live")
        assert {x["name"]: x["flags"] for x in qemu_info_bitmaps(img)}["live"] == ["in-use", "auto"]
        r = qimg("dirty", img, "live", ok=False)
        assert r.returncode == 1
        qimg("bitmap", "--remove", img, "live")
        check_clean(img)
        assert [x["name"] for x in qemu_info_bitmaps(img)] == ["crashed"]
    s.case("stale_in_use_bitmap_reported_cleared_removed", stale)

    def errors():
        img = s.img("16M")
        v2 = s.img("1M", "compat=0.10")
        qimg("bitmap", "--add", img, "x")
        bad = [  # arguments, what the message says; qemu-img refuses each too
            (["--add", img, "x"], "exists"),
            (["--add", img, ""], "empty"),
            (["--add", img, "y" * 1024], "1023"),
            (["--add", "-g", "256", img, "g"], "power of 2"),
            (["--add", "-g", "3000", img, "g"], "power of 2"),
            (["--remove", img, "nope"], "no bitmap"),
            (["--clear", img, "nope"], "no bitmap"),
            (["--enable", img, "nope"], "no bitmap"),
            (["--merge", "nope", img, "x"], "no bitmap"),
            (["--add", v2, "x"], "v2"),
            (["--remove", "-g", "4k", img, "x"], "-g"),
            ([img, "x"], "at least one"),
            (["--add", img], "expected"),
        ]
        for a, want in bad:
            r = qimg("bitmap", *a, ok=False)
            assert r.returncode == 1, (a, r.returncode)
            assert want.encode() in r.stderr and r.stderr.startswith(b"qcowimg: "), (a, r.stderr)
            assert run(QEMU_IMG, "bitmap", *a, ok=False).returncode != 0, ("qemu-img accepts", a)
        check_clean(img)
        assert qemu_info_bitmaps(img) == [{"flags": ["auto"], "name": "x", "granularity": 65536}]
    s.case("bad_input_fails_as_qemu_img", errors)

    def all_ones_and_empty():
        # a table entry of 1 (no cluster) reads as all ones, in qemu and here
        img = s.img("8M", "cluster_size=512")
        qimg("bitmap", "--add", "-g", "512", "--disable", img, "ones")
        _, toff, tsize = dir_entry(img, "ones")
        assert tsize == 4, tsize  # 8 MiB / 512 B per bit / 8 bits = 2 KiB = 4 clusters
        with open(img, "r+b") as f:
            f.seek(toff + 8)
            f.write(struct.pack(">Q", 1))
        want = [(0, 2 * MiB, False), (2 * MiB, 2 * MiB, True), (4 * MiB, 4 * MiB, False)]
        same_maps(img, "ones", want)
        qimg("bitmap", "--add", "-g", "4k", "--disable", img, "m")
        qimg("bitmap", "--merge", "ones", img, "m")
        same_maps(img, "m", want)
        qimg("bitmap", "--clear", img, "ones")
        same_maps(img, "ones", all_clean(8 * MiB))
        check_clean(img)
        # a disk of 0 bytes has nothing to track (qemu cannot store such a bitmap either)
        z = s.img("0")
        r = qimg("bitmap", "--add", z, "b", ok=False)
        assert r.returncode == 1 and b"0 bytes" in r.stderr, r.stderr
        assert qemu_info_bitmaps(z) == []
        check_clean(z)
    s.case("all_ones_table_entry_and_empty_disk", all_ones_and_empty)

    def revert_refused():
        # qemu-img refuses to apply a snapshot while the image has bitmaps: so do we
        img = s.img("16M")
        run(QEMU_IMG, "snapshot", "-c", "s", img)
        qimg("bitmap", "--add", "--disable", img, "b")
        assert run(QEMU_IMG, "snapshot", "-a", "s", img, ok=False).returncode != 0
        r = qimg("snapshot", "-a", "s", img, ok=False)
        assert r.returncode == 1 and b"bitmaps" in r.stderr, r.stderr
        qimg("bitmap", "--remove", img, "b")
        qimg("snapshot", "-a", "s", img)
        check_clean(img)
    s.case("snapshot_apply_refused_while_bitmaps_exist", revert_refused)


if __name__ == "__main__":
    sys.exit(main())
