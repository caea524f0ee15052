#!/usr/bin/python3
"""check_compare.py: qcowimg check must judge every broken image as qemu-img check does.

For each image corrupt.py builds (its ~117 cases), the hostile suite's image builders
(tests/hostile/cases_images.py: bitmap bombs, 16k snapshots, header extensions), and
the images built here that aim at metadata overlaps (each pair of L1, L2, refcount
table and blocks, snapshot table and L1s, bitmap directory, tables and data, and each
over the header, where the format lets them meet), misaligned and reserved-bit
entries, references past the end, leaks only, and 0-byte images, run
  qemu-img check -f qcow2 --output=json IMG      and
  $QCOWIMG check -f qcow2 --output=json IMG
and compare the exit codes (0 clean, 1 check failed, 2 corruptions, 3 leaks only) and
the counts (corruptions, leaks, check-errors). Where qemu-img refuses the image (exit 1,
no report), qcowimg must refuse it too (exit 1). Then `check -r all` runs on one copy
of the image with each tool: the exit codes and the fixed counts must match, and
qemu-img check must find qcowimg's repaired copy as clean as qemu-img's own.

Environment: QCOWIMG (required), QEMU_IMG (default qemu-img). Usage: check_compare.py
[-k NAME]... [-j N] [--keep] [--list]. Prints `ok NAME` or `FAIL NAME: reason` per
image, the counts compared, then `N passed, M failed`; exits 1 on a difference not in
ALLOWED, 77 without qemu-img.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import suite  # noqa: E402
import corrupt  # noqa: E402
from corrupt import KiB, MiB, OFLAG_COPIED, OFFSET_MASK, Q, SetupError, make_image, sh  # noqa: E402

QCOWIMG = os.environ.get("QCOWIMG", "")
QCOWIMG = os.path.abspath(QCOWIMG) if os.sep in QCOWIMG else QCOWIMG
QEMU_IMG = corrupt.QEMU_IMG
TIMEOUT = 60   # seconds for one check (qemu-img's or ours); a hang is reported, not judged

# Images where the two checks may still differ, each with the reason. Empty is the goal.
# qcowimg opens images more strictly than qemu-img opens them for a check (qemu's
# BDRV_O_CHECK skips the snapshot table and takes tables past the end of the file):
# those it refuses (exit 1) where qemu-img counts corruptions (exit 2).
_OPEN_STRICTER = "qcowimg's open refuses the image (exit 1) where qemu-img's check mode opens it and counts corruptions"
# Both -r all stop (exit 1) at the same write that their overlap checks refuse (an
# OFLAG_COPIED fix in an L2 table over a snapshot's L1 table); qcowimg has written its
# refcount fixes by then, qemu-img drops its own, so qemu-img check then finds leaks
# on its copy and, on ours, none but a few more OFLAG_COPIED errors.
_REPAIR_STOPS = "-r all stops where qemu-img's stops; qcowimg's refcount fixes are kept, qemu-img's are not"
# qemu-img check -r all opens the image read-write: that loads an enabled bitmap and
# stores it again when the image closes, in new clusters, so a reference of its table
# or data past the end of the file is gone; qcowimg's repair does not rewrite bitmaps.
_BITMAP_STORED = "-r all: qemu-img stores the enabled bitmap anew on close, which drops its reference past the end"
ALLOWED = {
    "truncated_v2_50_bytes": _OPEN_STRICTER + " (a file shorter than its header)",
    "bitmap_extension_twice": "qcowimg refuses a header with two bitmap extensions; qemu-img uses the first",
    "backing_chain_70_deep": "qcowd's backing chain limit is 64 (DESIGN: limits as QEMU's or stricter)",
    "x_snapshot_l1_over_active_l2": _REPAIR_STOPS + " (the L2 table is also a snapshot's L1 table)",
    "snapshot_l1_size_huge": _REPAIR_STOPS + " (a snapshot's L1 table of 16 GiB covers the whole file)",
    "backing_raw_without_format": "qcowd never probes a backing file's format (DESIGN: no format is guessed)",
    "x_bitmap_table_past_end": _BITMAP_STORED,
    "x_bitmap_data_past_end": _BITMAP_STORED,
}

COUNTS = ("corruptions", "leaks", "check-errors")
FIXED = ("corruptions-fixed", "leaks-fixed")


# ---------------------------------------------------------------------------
# Images aimed at the overlap cases (the corrupt.py cases come on top).

EXTRA = {}


def extra(name):
    def deco(fn):
        EXTRA[name] = fn
        return fn
    return deco


def poked(name, poke, prepare=()):
    """An image of corrupt.py's default guest, after the qemu-img commands in prepare
    (e.g. a snapshot; "IMG" stands for the image), with poke(q) applied to its bytes."""
    def build(d):
        img, _ = make_image(d)
        for argv in prepare:
            sh([QEMU_IMG] + [img if a == "IMG" else a for a in argv], d)
        q = Q(d, img)
        poke(q)
        q.save()
        return img
    EXTRA[name] = build


def file_end(q):
    return (len(q.b) + q.cluster_size - 1) // q.cluster_size * q.cluster_size


def l1(q, i):
    return q.u64(q.l1_entry_off(i))


def set_l1(q, i, v):
    q.put(q.l1_entry_off(i), "Q", v)


def set_l2(q, guest_off, v):
    q.put(q.l2_entry_off(guest_off), "Q", v)


def set_reft(q, i, v):
    q.put(q["refcount_table_offset"] + 8 * i, "Q", v)


def reft(q, i):
    return q.u64(q["refcount_table_offset"] + 8 * i)


SNAP = (["snapshot", "-c", "s1", "IMG"],)
BITMAP = (["bitmap", "--add", "IMG", "b0"],)
poked("x_l2_over_header", lambda q: set_l1(q, 0, OFLAG_COPIED | 0))
poked("x_l2_over_reftable", lambda q: set_l1(q, 1, OFLAG_COPIED | q["refcount_table_offset"]))
poked("x_l2_over_l1", lambda q: set_l1(q, 1, OFLAG_COPIED | q["l1_table_offset"]))
poked("x_l1_entries_share_l2", lambda q: set_l1(q, 1, l1(q, 0)))
poked("x_data_over_l2", lambda q: set_l2(q, 0, OFLAG_COPIED | (l1(q, 0) & OFFSET_MASK)))
poked("x_data_over_refblock", lambda q: set_l2(q, 0, OFLAG_COPIED | (reft(q, 0) & OFFSET_MASK)))
poked("x_refblock_past_end", lambda q: set_reft(q, 1, file_end(q) + 4 * q.cluster_size))
poked("x_refblock_over_l1", lambda q: set_reft(q, 1, q["l1_table_offset"] & ~(q.cluster_size - 1)))
poked("x_refblock_misaligned", lambda q: set_reft(q, 0, reft(q, 0) + 512))
poked("x_reftable_reserved_bits", lambda q: set_reft(q, 0, reft(q, 0) | 0x100))
poked("x_l1_reserved_bits", lambda q: set_l1(q, 0, l1(q, 0) | (1 << 57)))
poked("x_l2_reserved_bits", lambda q: set_l2(q, 0, q.l2_entry(0) | (1 << 57) | 0x2))
poked("x_l2_misaligned", lambda q: set_l1(q, 0, l1(q, 0) + 512))
poked("x_data_misaligned", lambda q: set_l2(q, 0, q.l2_entry(0) + 512))
poked("x_zero_misaligned", lambda q: set_l2(q, 0, q.l2_entry(0) + 512 | 1))   # preallocated zero: -r all zeroes it
poked("x_data_past_end", lambda q: set_l2(q, 0, OFLAG_COPIED | (file_end(q) + 16 * q.cluster_size)))
poked("x_l2_past_end", lambda q: set_l1(q, 1, OFLAG_COPIED | (file_end(q) + 8 * q.cluster_size)))
poked("x_snapshot_l1_over_active_l2", lambda q: q.put(q.snapshot_entry(0), "Q", l1(q, 0) & OFFSET_MASK), SNAP)
poked("x_snapshot_table_over_l1", lambda q: q.__setitem__("snapshots_offset", q["l1_table_offset"]), SNAP)
poked("x_bitmap_table_over_l2", lambda q: q.put(q.bitmap_dir()[3], "Q", l1(q, 0) & OFFSET_MASK), BITMAP)
# every pair of metadata kinds that can be made to overlap, and each over the header
poked("x_l1_over_reftable", lambda q: q.__setitem__("l1_table_offset", q["refcount_table_offset"]))
poked("x_reftable_over_l1", lambda q: q.__setitem__("refcount_table_offset", q["l1_table_offset"] & ~0xffff))
poked("x_refblock_over_l2", lambda q: set_reft(q, 1, l1(q, 0) & OFFSET_MASK))
poked("x_refblock_over_reftable", lambda q: set_reft(q, 1, q["refcount_table_offset"]))
poked("x_l2_over_refblock", lambda q: set_l1(q, 1, OFLAG_COPIED | (reft(q, 0) & OFFSET_MASK)))
poked("x_data_over_l1", lambda q: set_l2(q, 0, OFLAG_COPIED | (q["l1_table_offset"] & OFFSET_MASK)))
poked("x_data_over_reftable", lambda q: set_l2(q, 0, OFLAG_COPIED | q["refcount_table_offset"]))
poked("x_snapshot_table_over_reftable", lambda q: q.__setitem__("snapshots_offset", q["refcount_table_offset"]), SNAP)
poked("x_snapshot_l1_over_header", lambda q: q.put(q.snapshot_entry(0), "Q", 0), SNAP)
poked("x_snapshot_l1_over_reftable", lambda q: q.put(q.snapshot_entry(0), "Q", q["refcount_table_offset"]), SNAP)
poked("x_snapshot_l1_entry_reserved_bits", lambda q: q.put(q.u64(q.snapshot_entry(0)), "Q",
                                                         q.u64(q.u64(q.snapshot_entry(0))) | (1 << 58)), SNAP)
poked("x_l2_over_snapshot_table", lambda q: set_l1(q, 1, OFLAG_COPIED | (q["snapshots_offset"] & ~0xffff)), SNAP)
poked("x_bitmap_dir_over_header", lambda q: q.put(q.bitmap_dir()[0].off + 8 + 16, "Q", 0), BITMAP)
poked("x_bitmap_dir_over_l1", lambda q: q.put(q.bitmap_dir()[0].off + 8 + 16, "Q", q["l1_table_offset"]), BITMAP)
poked("x_bitmap_table_over_header", lambda q: q.put(q.bitmap_dir()[3], "Q", 0), BITMAP)
poked("x_bitmap_table_over_reftable", lambda q: q.put(q.bitmap_dir()[3], "Q", q["refcount_table_offset"]), BITMAP)
poked("x_bitmap_table_past_end", lambda q: q.put(q.bitmap_dir()[3], "Q", file_end(q) + 8 * q.cluster_size), BITMAP)
poked("x_bitmap_table_entry_reserved_bits", lambda q: q.put(q.u64(q.bitmap_dir()[3]), "Q", 1 << 60), BITMAP)
poked("x_l2_over_bitmap_dir", lambda q: set_l1(q, 1, OFLAG_COPIED | (q.bitmap_dir()[3] & ~0xffff)), BITMAP)
poked("x_leak_only", lambda q: set_l2(q, 192 * KiB, 0))   # cluster B unmapped: its cluster leaks
poked("x_copied_flags_cleared", lambda q: (set_l2(q, 0, q.l2_entry(0) & ~OFLAG_COPIED),
                                          set_l1(q, 0, l1(q, 0) & ~OFLAG_COPIED)))


def dirty_bitmap_poked(name, poke):
    """A bitmap whose table points at a data cluster (qemu-io marks an enabled
    persistent bitmap and stores it), then poke(q, table entry offset, entry)."""
    def build(d):
        img, _ = make_image(d)
        sh([QEMU_IMG, "bitmap", "--add", img, "b0"], d)
        corrupt.qemu_io(d, img, "write -P 0x5a 0 64k")
        q = Q(d, img)
        at = q.u64(q.bitmap_dir()[3])   # the bitmap table; its entry 0 holds the data cluster
        if not q.u64(at) & OFFSET_MASK:
            raise SetupError("qemu-io left the bitmap without a data cluster")
        poke(q, at, q.u64(at))
        q.save()
        return img
    EXTRA[name] = build


dirty_bitmap_poked("x_bitmap_data_over_l2", lambda q, at, e: q.put(at, "Q", l1(q, 0) & OFFSET_MASK))
dirty_bitmap_poked("x_bitmap_data_over_reftable", lambda q, at, e: q.put(at, "Q", q["refcount_table_offset"]))
dirty_bitmap_poked("x_bitmap_data_misaligned", lambda q, at, e: q.put(at, "Q", e + 512))
dirty_bitmap_poked("x_bitmap_data_past_end", lambda q, at, e: q.put(at, "Q", file_end(q) + 4 * q.cluster_size))
dirty_bitmap_poked("x_data_over_bitmap_data", lambda q, at, e: set_l2(q, 0, OFLAG_COPIED | (e & OFFSET_MASK)))


class _Folder:
    """What tests/hostile/cases_images.py's image builders ask of their harness:
    path(name), here a file in one case's folder."""

    def __init__(self, d):
        self.d = d

    def path(self, name):
        return os.path.join(self.d, name + ".qcow2")


def hostile_image(name, make):
    """An image built by one of the hostile suite's builders: make(cases_images, s)."""
    def build(d):
        sys.path.insert(0, os.path.join(HERE, "..", "hostile"))
        import cases_images
        return os.path.basename(make(cases_images, _Folder(d)))
    EXTRA[name] = build


TiB = 1 << 40
hostile_image("h_bitmap_bomb", lambda ci, s: ci.big_bitmap_image(s, "img", 4 * TiB, 9, 1))
hostile_image("h_bitmap_stream", lambda ci, s: ci.big_bitmap_image(s, "img", 4 * TiB, 12, 1))
hostile_image("h_snapshots_16k", lambda ci, s: ci.snap_table_image(s, "img", 16384, 64))
hostile_image("h_snapshots_2k_names", lambda ci, s: ci.snap_table_image(s, "img", 1024, 2048))
hostile_image("h_ext_long", lambda ci, s: ci.header_ext(s, "img", struct.pack(">II", 0x12345678, 0xFFFF0000)))
hostile_image("h_ext_over_backing", lambda ci, s: ci.header_ext(s, "img", struct.pack(">II", 0x12345678, 64) + b"x" * 8, 16))
hostile_image("h_ext_cut_by_backing", lambda ci, s: ci.header_ext(s, "img", struct.pack(">II", 0x12345678, 0) + b"\0" * 4, 12))
hostile_image("h_ext_feature_table_long", lambda ci, s: ci.header_ext(s, "img", struct.pack(">II", 0x6803f857, 0x7FFFFFF0)))


@extra("x_zero_byte_image")
def _(d):
    sh([QEMU_IMG, "create", "-q", "-f", "qcow2", "img.qcow2", "0"], d)
    return "img.qcow2"


@extra("x_zero_byte_image_qcowimg")
def _(d):
    sh([QCOWIMG, "create", "-f", "qcow2", "img.qcow2", "0"], d)
    return "img.qcow2"


@extra("x_zero_byte_image_compat")
def _(d):
    sh([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "img.qcow2", "0"], d)
    return "img.qcow2"


# ---------------------------------------------------------------------------
# Running both checks.

def run(argv, cwd):
    """(exit code or "timeout", report dict or None, stderr text)."""
    try:
        p = subprocess.run([str(a) for a in argv], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=TIMEOUT, env=dict(os.environ, LC_ALL="C"))
    except subprocess.TimeoutExpired:
        return "timeout", None, ""
    err = p.stderr.decode("utf-8", "replace")
    try:
        rep = json.loads(p.stdout.decode("utf-8", "replace")) if p.stdout.strip() else None
    except ValueError:
        rep = None
    return p.returncode, rep if isinstance(rep, dict) else None, err


def qemu_check(img, d, repair=False):
    return run([QEMU_IMG, "check", "-f", "qcow2", "--output=json"] + (["-r", "all"] if repair else []) + [img], d)


def our_check(img, d, repair=False):
    return run([QCOWIMG, "check", "-f", "qcow2", "--output=json"] + (["-r", "all"] if repair else []) + [img], d)


def counts(rep, keys=COUNTS):
    return {k: int(rep.get(k, 0)) for k in keys} if rep else None


def first_line(err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    return lines[0][:200] if lines else ""


def sanitizer(err):
    return "Sanitizer" in err or "runtime error" in err


STATS_LOCK = threading.Lock()


def bump(stats, key, name=None):
    """One more in stats[key] (or name appended to that list): images run on threads."""
    with STATS_LOCK:
        if name is None:
            stats[key] += 1
        else:
            stats[key].append(name)


def compare(img, d, stats):
    """Problems (list of str) comparing the two checks on img in d, plain then -r all."""
    p = []
    qrc, qrep, qerr = qemu_check(img, d)
    orc, orep, oerr = our_check(img, d)
    if qrc == "timeout":
        bump(stats, "qemu-timeout")
        bump(stats, "hung", os.path.basename(d))
        return p   # qemu-img hangs: nothing to compare with
    if orc == "timeout":
        return [f"qcowimg check hung ({TIMEOUT} s)"]
    if sanitizer(oerr):
        return ["sanitizer report: " + first_line(oerr)]
    bump(stats, "compared")
    if qrc == orc:
        bump(stats, "same-exit")
    else:
        p.append(f"exit {orc}, qemu-img {qrc} (qemu: {first_line(qerr)!r}; ours: {first_line(oerr)!r})")
    if qrep is None:
        bump(stats, "refused")   # qemu-img refused the image or its check failed: exit classes only
        if orc != 1:
            p.append(f"qemu-img refused the image ({first_line(qerr)!r}), qcowimg exited {orc}")
        return p
    if counts(qrep) == counts(orep):
        bump(stats, "same-counts")
    else:
        p.append(f"counts {counts(orep)}, qemu-img {counts(qrep)}")
    if p:
        return p

    # repair a copy with each tool; nothing left to repair when the image is clean
    if qrc == 0:
        return p
    ext = os.path.splitext(img)[1] or ".qcow2"
    qcopy, ocopy = "rep-qemu" + ext, "rep-ours" + ext
    shutil.copyfile(os.path.join(d, img), os.path.join(d, qcopy))
    shutil.copyfile(os.path.join(d, img), os.path.join(d, ocopy))
    qrc, qrep, qerr = qemu_check(qcopy, d, repair=True)
    orc, orep, oerr = our_check(ocopy, d, repair=True)
    if qrc == "timeout":
        bump(stats, "qemu-timeout")
        bump(stats, "hung", os.path.basename(d) + " (-r all)")
        return p
    if orc == "timeout":
        return [f"qcowimg check -r all hung ({TIMEOUT} s)"]
    if sanitizer(oerr):
        return ["-r all: sanitizer report: " + first_line(oerr)]
    bump(stats, "repaired")
    # qemu-img's verdict on both repaired copies
    arc, arep, _ = qemu_check(qcopy, d)
    brc, brep, berr = qemu_check(ocopy, d)
    clean = no_worse(brc, brep, arc, arep)
    # qemu-img's repair fails (exit 1) where its own overlap checks refuse a write it
    # needs, or where it marked the image corrupt while reading: doing better is fine
    better = qrc == 1 and orc != 1 and clean
    if better:
        bump(stats, "repair-better")
    elif qrc != orc:
        p.append(f"-r all: exit {orc}, qemu-img {qrc} (qemu: {first_line(qerr)!r}; ours: {first_line(oerr)!r})")
    elif qrep is not None and counts(qrep, COUNTS + FIXED) != counts(orep, COUNTS + FIXED):
        p.append(f"-r all: counts {counts(orep, COUNTS + FIXED)}, qemu-img {counts(qrep, COUNTS + FIXED)}")
    else:
        bump(stats, "repair-same")
    if clean:
        bump(stats, "repair-as-clean")
    else:
        p.append(f"after -r all qemu-img check finds on our copy: exit {brc} {counts(brep)}, on its own: "
                 f"exit {arc} {counts(arep)} ({first_line(berr)!r})")
    return p


def no_worse(brc, brep, arc, arep):
    """qemu-img check's verdict on our repaired copy (brc, brep) is no worse than on
    its own (arc, arep): clean, or no count higher."""
    if brc == 0:
        return True
    if brc == "timeout" or brep is None:
        return False
    if arc == "timeout" or arep is None:
        return True
    return all(counts(brep)[k] <= counts(arep)[k] for k in COUNTS)


def build(name, d):
    """Builds the named image in d; returns its file name."""
    if name in EXTRA:
        return EXTRA[name](d)
    fn, _ = corrupt.CASES[name]
    return fn(d).img


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    suite.add_common_args(ap, "image", parallel=2)
    args = ap.parse_args()
    names = list(EXTRA) + list(corrupt.CASES)
    if args.list:
        print("\n".join(names))
        return 0
    picked = suite.select([(n,) for n in names], args.k, "image")
    if picked is None:
        return suite.USAGE
    bad = suite.check_needs(binaries={"QCOWIMG": QCOWIMG}, tools=(QEMU_IMG,))
    if bad is not None:
        return bad
    stats = dict.fromkeys(("compared", "same-exit", "same-counts", "refused", "repaired", "repair-same", "repair-better", "repair-as-clean",
                           "qemu-timeout", "allowed"), 0)
    stats["hung"] = []

    def task(n, root):
        def go():
            d = os.path.join(root, n)
            os.makedirs(d)
            try:
                img = build(n, d)
            except SetupError as e:
                return suite.Outcome(n, [(f"setup: {e}", [])], d)
            problems = compare(img, d, stats)
            if problems and n in ALLOWED:
                bump(stats, "allowed")
                return suite.Outcome(n, [], d, f"allowed: {ALLOWED[n]}; " + "; ".join(problems))
            return suite.Outcome(n, [(x, []) for x in problems], d)
        return go

    with suite.Scratch("qcowd-check-compare-", args.keep) as scratch:
        passed, failed, _ = suite.run_all(scratch, [task(n, scratch.root) for (n,) in picked], args.j)
    print(f"images compared: {stats['compared']} (qemu-img refused {stats['refused']}), "
          f"equal exit codes: {stats['same-exit']}, equal counts: {stats['same-counts']}, "
          f"repaired: {stats['repaired']} (same exit and counts: {stats['repair-same']}, repaired where qemu-img's "
          f"repair fails: {stats['repair-better']}), left as clean as qemu-img leaves it: {stats['repair-as-clean']}, "
          f"qemu-img hung: {stats['qemu-timeout']}, allowed differences: {stats['allowed']}")
    if stats["hung"]:
        print(f"not compared, qemu-img check hangs on: {', '.join(sorted(stats['hung']))}")
    return suite.summary(passed, failed)


if __name__ == "__main__":
    sys.exit(main())
