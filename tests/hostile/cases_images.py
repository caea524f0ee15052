"""Hand-made hostile images (see hostile.py). Each is built here from a
qemu-img image by poking bytes, then read through qcowd."""
import json
import os
import struct
import subprocess
import time

import hostile
import qcowd


def snap_entry(l1_off, l1_size, ident, name, extra=b"", pad=True):
    """One snapshot table entry (qcow2.txt, "Snapshots")."""
    e = struct.pack(">QIHHIIQII", l1_off, l1_size, len(ident), len(name), 0, 0, 0, 0, len(extra))
    e += extra + ident + name
    if pad:
        e += b"\0" * (-len(e) % 8)
    return e


def header(path):
    with open(path, "rb") as f:
        return bytearray(f.read(112))


def snaptable_padding(s):
    """A snapshot table whose last entry fits unpadded but whose padded step leaves
    the table: the next entry must not be read from past the buffer (it was: a heap
    over-read whose bytes came back in the error message)."""
    name = "snapover"
    p = s.path(name)
    hostile.qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    with open(p, "r+b") as f:
        hdr = bytearray(f.read(104))
        l1_size, l1_off = struct.unpack(">IQ", hdr[36:48])
        f.seek(0, 2)
        table_off = (f.tell() + 65535) & ~65535
        # entry 0: 40 + 0 + 1 + 40 = 81 bytes, padded to 88; two entries claimed
        # (80 bytes at least, so the header's bound passes), and the file ends
        # right after the unpadded first entry
        e = snap_entry(l1_off, l1_size, b"1", b"n" * 40, pad=False)
        f.seek(table_off)
        f.write(e)
        f.truncate(table_off + len(e))
        struct.pack_into(">IQ", hdr, 60, 2, table_off)
        f.seek(0)
        f.write(hdr)
    for path in ("/v1/images/%s" % name, "/v1/images/%s/data" % name, "/v1/images/%s/snapshots" % name):
        msg = s.error("GET", path, 422)
        assert "snapshot" in msg, msg


KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB
EXT_BITMAPS = 0x23852875
AUTOCLEAR_BITMAPS = 1
INCOMPAT_DIRTY = 1


def qcow2(s, name, size, *opts):
    """A fresh qemu-img image in the catalog folder; its path."""
    p = s.path(name)
    if os.path.exists(p):
        os.remove(p)
    o = ["-o", ",".join(opts)] if opts else []
    hostile.qemu_img("create", "-q", "-f", "qcow2", *o, p, str(size))
    return p


def extensions(blob):
    """The header extensions of a v3 image: [(type, data offset, length)]."""
    hl = struct.unpack(">I", blob[100:104])[0]
    off, out = hl, []
    while off + 8 <= len(blob):
        t, n = struct.unpack(">II", blob[off:off + 8])
        if t == 0:
            break
        out.append((t, off + 8, n))
        off += 8 + (n + 7) // 8 * 8
    return out, off


def bitmap_dir(p):
    """(directory offset, size, count, ext data offset) of an image's bitmaps."""
    with open(p, "rb") as f:
        blob = f.read(65536)
    for t, off, n in extensions(blob)[0]:
        if t == EXT_BITMAPS:
            cnt, _, size, doff = struct.unpack(">IIQQ", blob[off:off + 24])
            return doff, size, cnt, off
    raise AssertionError("no bitmaps extension")


def append_cluster_aligned(f, data, cs=64 * KiB):
    """Write data at the next cluster boundary past the end of the file; its offset."""
    f.seek(0, 2)
    off = (f.tell() + cs - 1) // cs * cs
    f.seek(off)
    f.write(data)
    f.write(b"\0" * (-len(data) % cs))
    return off


def big_bitmap_image(s, name, size, gran_bits, entry):
    """An image of `size` bytes with one bitmap 'b' whose directory entry says
    granularity 2^gran_bits and whose table (at the end of the file) holds
    `entry` everywhere (1: the all-ones flag, no data cluster)."""
    p = qcow2(s, name, size)
    hostile.qemu_img("bitmap", "--add", "-g", str(1 << 30), p, "b")
    doff, dsize, cnt, _ = bitmap_dir(p)
    assert cnt == 1
    bits = (size + (1 << gran_bits) - 1) >> gran_bits
    entries = ((bits + 7) // 8 + 65535) // 65536
    with open(p, "r+b") as f:
        toff = append_cluster_aligned(f, struct.pack(">Q", entry) * entries)
        f.seek(doff)
        e = bytearray(f.read(24))
        struct.pack_into(">QI", e, 0, toff, entries)
        e[17] = gran_bits
        f.seek(doff)
        f.write(e)
    return p


def bitmap_bomb(s):
    """The 448 KiB upload of issue 15: a 4 TiB disk whose bitmap has granularity
    512 (1 GiB of bits) and a table of all-ones entries. Refused at load with
    QEMU's cap named (it cost 1 GiB of RSS on the dirty-extents GET)."""
    p = big_bitmap_image(s, "bmbomb-src", 4 * TiB, 9, 1)
    with open(p, "rb") as f:
        blob = f.read()
    os.remove(p)
    assert len(blob) <= 512 * KiB, len(blob)
    msg = s.error("PUT", "/v1/images/bmbomb/file", 422, body=blob)
    assert "bitmap 'b' needs 1 GiB of memory" in msg and "512 MiB" in msg and "QEMU" in msg, msg
    s.error("GET", "/v1/images/bmbomb/extents?context=dirty&bitmap=b", 404)
    # the same image put in the folder by hand: refused when opened
    with open(s.path("bmbomb"), "wb") as f:
        f.write(blob)
    msg = s.error("GET", "/v1/images/bmbomb/extents?context=dirty&bitmap=b", 422)
    assert "512 MiB" in msg, msg
    os.remove(s.path("bmbomb"))


def bitmap_stream(s):
    """A bitmap under QEMU's cap but far over the memory budget (4 TiB at 4 KiB:
    128 MiB of bits, all ones): the dirty extents are read from the table a piece
    at a time and answer at once, one run, without loading the bits."""
    p = big_bitmap_image(s, "bmstream", 4 * TiB, 12, 1)
    with open(p, "rb") as f:
        blob = f.read()
    os.remove(p)
    st, _, data = s.call("PUT", "/v1/images/bmstream/file", body=blob)
    assert st == 201, (st, data[:300])
    st, _, data = s.call("GET", "/v1/images/bmstream/extents?context=dirty&bitmap=b")
    assert st == 200, (st, data[:300])
    assert json.loads(data) == [{"start": 0, "length": 4 * TiB, "dirty": True}], data[:300]


def huge_virtual_size(s):
    """2 PiB: a 32 MiB L1 table per open. Refused at create (by --max-virtual-size
    first, and by the metadata budget when that allows it) and at open, naming
    the budget (16 MiB by default)."""
    body = json.dumps({"name": "twopib", "size": 2 * PiB}).encode()
    msg = s.error("POST", "/v1/images", 400, body=body, headers={"Content-Type": "application/json"})
    assert "--max-virtual-size" in msg, msg
    s.start("--max-virtual-size", "4P")
    try:
        msg = s.error("POST", "/v1/images", 422, body=body, headers={"Content-Type": "application/json"})
        assert "metadata budget of 16 MiB" in msg and "32 MiB" in msg, msg
    finally:
        s.start()
    assert not os.path.exists(s.path("twopib"))
    # by hand: the header says 2 PiB, with a (sparse) 32 MiB L1 table in the file
    p = qcow2(s, "twopib", 1 * MiB)
    with open(p, "r+b") as f:
        hdr = bytearray(f.read(112))
        struct.pack_into(">Q", hdr, 24, 2 * PiB)
        struct.pack_into(">IQ", hdr, 36, 4 * MiB, 4 * MiB)  # l1_size entries, at 4 MiB
        f.seek(0)
        f.write(hdr)
        f.truncate(4 * MiB + 32 * MiB)
    for path in ("/v1/images/twopib", "/v1/images/twopib/data"):
        msg = s.error("GET", path, 422)
        assert "L1 table needs 32 MiB of memory" in msg and "metadata budget of 16 MiB" in msg, msg
    os.remove(p)


def overlay_chain(s):
    """Overlays multiply the L1 tables a chain holds: the budget is for the whole
    chain. 512 TiB disks (an 8 MiB L1 each): the base fits in 16 MiB, an overlay
    over it does not: refused at create, and, made by hand, at open, naming the
    budget."""
    s.start("--max-virtual-size", "1P")  # past the default 64 TiB: the metadata budget is the bound here
    try:
        overlay_chain_within(s)
    finally:
        s.start()


def overlay_chain_within(s):
    hdr = {"Content-Type": "application/json"}
    body = json.dumps({"name": "ovl0", "size": 512 * TiB}).encode()
    st, _, data = s.call("POST", "/v1/images", body=body, headers=hdr)
    assert st == 201, (st, data[:300])
    st, _, data = s.call("GET", "/v1/images/ovl0/data", headers={"Range": "bytes=0-4095"})
    assert st == 206, (st, data[:300])
    body = json.dumps({"name": "ovl1", "size": 512 * TiB, "backing-file": "ovl0"}).encode()
    msg = s.error("POST", "/v1/images", 422, body=body, headers=hdr)
    assert "needs an L1 table of 8 MiB" in msg and "backing chain holds" in msg, msg
    assert "metadata budget of 16 MiB" in msg, msg
    assert not os.path.exists(s.path("ovl1"))
    hostile.qemu_img("create", "-q", "-f", "qcow2", "-b", "ovl0.qcow2", "-F", "qcow2", s.path("ovl1"))
    msg = s.error("GET", "/v1/images/ovl1/data", 422, headers={"Range": "bytes=0-4095"})
    assert "L1 table needs 8 MiB" in msg and "metadata budget of 16 MiB" in msg, msg
    for name in ("ovl1", "ovl0"):
        os.remove(s.path(name))


def budget_option(s):
    """--max-image-meta sets the budget (and bad values are refused at start):
    with 64K, a 1 MiB image's 64 KiB refcount table and 8-byte L1 are too much."""
    for bad in ("0", "12X", "-1", "2T", "M"):
        r = subprocess.run([qcowd.QCOWD, "--max-image-meta", bad], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "--max-image-meta" in r.stderr, (bad, r.returncode, r.stderr)
    qcow2(s, "tiny", 1 * MiB)
    s.start("--max-image-meta", "64K")
    try:
        msg = s.error("GET", "/v1/images/tiny", 422)
        assert "metadata budget of 64 KiB" in msg, msg
    finally:
        s.start()
    st, _, data = s.call("GET", "/v1/images/tiny")
    assert st == 200, (st, data[:300])
    os.remove(s.path("tiny"))


def snap_table_image(s, name, count, name_len):
    """A 1 MiB image whose snapshot table holds count entries (each pointing at
    the active L1) with names of name_len bytes."""
    p = qcow2(s, name, 1 * MiB)
    with open(p, "r+b") as f:
        hdr = bytearray(f.read(112))
        l1_size, l1_off = struct.unpack(">IQ", hdr[36:48])
        extra = struct.pack(">QQQ", 0, 1 * MiB, 0)
        table = b"".join(snap_entry(l1_off, l1_size, b"%d" % (i + 1), (b"%06d" % i).ljust(name_len, b"s"), extra)
                         for i in range(count))
        toff = append_cluster_aligned(f, table)
        struct.pack_into(">IQ", hdr, 60, count, toff)
        f.seek(0)
        f.write(hdr)
    return p


def probe_listed(imgs):
    """The prober's image is in a listing, without an error."""
    return hostile.PROBE in imgs and "error" not in imgs[hostile.PROBE]


def snapshots_16k(s):
    """16384 snapshots: listed in one streamed answer that costs one entry's JSON
    at a time, from the engine's shared list (no copy of the table per listing);
    so do the image's info and the list of images, which hold the list too."""
    snap_table_image(s, "snap16k", 16384, 64)
    for _ in range(3):
        st, _, data = s.call("GET", "/v1/images/snap16k/snapshots")
        assert st == 200, (st, data[:300])
        snaps = json.loads(data)["snapshots"]
        assert len(snaps) == 16384 and snaps[16383]["name"].startswith("016383"), len(snaps)
    for _ in range(2):
        st, _, data = s.call("GET", "/v1/images/snap16k")
        assert st == 200, (st, data[:300])
        info = json.loads(data)
        assert len(info["snapshots"]) == 16384 and info["format-specific"]["type"] == "qcow2", data[:300]
        st, _, data = s.call("GET", "/v1/images")
        assert st == 200, (st, data[:300])
        imgs = {i["name"]: i for i in json.loads(data)["images"]}
        assert len(imgs["snap16k"]["snapshots"]) == 16384 and probe_listed(imgs), list(imgs)
    os.remove(s.path("snap16k"))


def snapshots_over_budget(s):
    """16384 snapshots with 2 KiB names: a 33 MiB table, over the budget."""
    snap_table_image(s, "snapbig", 16384, 2048)
    msg = s.error("GET", "/v1/images/snapbig/snapshots", 422)
    assert "snapshot table" in msg and "metadata budget of 16 MiB" in msg, msg
    os.remove(s.path("snapbig"))


def wait_job(s, job):
    for _ in range(600):
        st, _, data = s.call("GET", "/v1/jobs/%s" % job)
        j = json.loads(data)
        if j["status"] == "concluded":
            return j
        time.sleep(0.05)
    raise AssertionError("job %s did not end" % job)


def dirty_bit(s):
    """An image left dirty by a crash with lazy refcounts: reads work, a write is
    409 pointing to POST .../check (the rebuild is not done on the request
    thread); after the check with repair the write works."""
    p = qcow2(s, "dirtyimg", 1 * MiB, "lazy_refcounts=on")
    hostile.run(qcowd.QEMU_IO, "-f", "qcow2", "-c", "write -q -P 0x5a 0 64k", p)
    with open(p, "r+b") as f:
        f.seek(72)
        inc = struct.unpack(">Q", f.read(8))[0] | INCOMPAT_DIRTY
        f.seek(72)
        f.write(struct.pack(">Q", inc))
    st, _, data = s.call("GET", "/v1/images/dirtyimg/data", headers={"Range": "bytes=0-4095"})
    assert st == 206 and data == b"\x5a" * 4096, st
    hdr = {"Content-Range": "bytes 0-4095/*"}
    msg = s.error("PUT", "/v1/images/dirtyimg/data", 409, body=b"\x11" * 4096, headers=hdr)
    assert "not closed cleanly" in msg and "POST /v1/images/dirtyimg/check" in msg and '"repair"' in msg, msg
    st, _, data = s.call("POST", "/v1/images/dirtyimg/check", body=b'{"repair": "leaks"}',
                         headers={"Content-Type": "application/json"})
    assert st == 202, (st, data[:300])
    j = wait_job(s, json.loads(data)["id"])
    assert j["error"] is None, j
    st, _, data = s.call("GET", "/v1/images/dirtyimg")
    assert json.loads(data)["dirty-flag"] is False, data[:300]
    st, _, data = s.call("PUT", "/v1/images/dirtyimg/data", body=b"\x11" * 4096, headers=hdr)
    assert st in (200, 204), (st, data[:300])
    st, _, data = s.call("GET", "/v1/images/dirtyimg/data", headers={"Range": "bytes=0-8191"})
    assert st == 206 and data == b"\x11" * 4096 + b"\x5a" * 4096, st
    os.remove(p)


def header_ext(s, name, ext, backing_at=None):
    """A 1 MiB image whose header extensions area is replaced by ext bytes."""
    p = qcow2(s, name, 1 * MiB)
    with open(p, "r+b") as f:
        hdr = bytearray(f.read(4096))
        hl = struct.unpack(">I", hdr[100:104])[0]
        hdr[hl:] = ext + b"\0" * (4096 - hl - len(ext))
        if backing_at is not None:
            struct.pack_into(">QI", hdr, 8, hl + backing_at, 4)
            hdr[hl + backing_at:hl + backing_at + 4] = b"base"
        f.seek(0)
        f.write(hdr)
    return p


def header_extensions(s):
    """Extensions running past the header cluster, or into the backing file name,
    or cut short by it."""
    cases = [
        ("extlong", struct.pack(">II", 0x12345678, 0xFFFF0000), None, "past the end of the header area"),
        ("extover", struct.pack(">II", 0x12345678, 64) + b"x" * 8, 16, "past the end of the header area"),
        ("extcut", struct.pack(">II", 0x12345678, 0) + b"\0" * 4, 12, "is truncated"),
        ("extfeat", struct.pack(">II", 0x6803f857, 0x7FFFFFF0), None, "past the end of the header area"),
    ]
    for name, ext, backing_at, want in cases:
        p = header_ext(s, name, ext, backing_at)
        msg = s.error("GET", "/v1/images/%s" % name, 422)
        assert "header extension" in msg and want in msg, (name, msg)
        os.remove(p)


def bitmap_entry_past(s):
    """A bitmap directory entry whose name or extra data runs past the directory,
    and one whose table runs past the end of the file."""
    p = qcow2(s, "bmpast", 1 * MiB)
    hostile.qemu_img("bitmap", "--add", p, "b")
    doff, dsize, _, _ = bitmap_dir(p)
    with open(p, "r+b") as f:
        f.seek(doff + 18)
        f.write(struct.pack(">H", 1000))
    msg = s.error("GET", "/v1/images/bmpast", 422)
    assert "bitmap directory entry 0" in msg and "runs past the end of the directory" in msg, msg
    with open(p, "r+b") as f:
        f.seek(doff + 18)
        f.write(struct.pack(">HI", 1, 0x7FFFFFF0))  # extra data past the directory
    msg = s.error("GET", "/v1/images/bmpast", 422)
    assert "bitmap directory entry 0" in msg and "runs past" in msg, msg
    # a sane entry whose bitmap table lies past the end of the file
    with open(p, "r+b") as f:
        f.seek(doff + 18)
        f.write(struct.pack(">HI", 1, 0))
        f.seek(0, 2)
        end = f.tell()
        f.seek(doff)
        f.write(struct.pack(">Q", (end + 65535) // 65536 * 65536))
    msg = s.error("GET", "/v1/images/bmpast", 422)
    assert "table of bitmap 'b'" in msg and "past the end of the file" in msg, msg
    os.remove(p)


def huge_counts(s):
    """Counts that promise far more than the tables hold."""
    p = qcow2(s, "manysnaps", 1 * MiB)
    with open(p, "r+b") as f:
        hdr = bytearray(f.read(112))
        struct.pack_into(">IQ", hdr, 60, 65536, 0x30000)
        f.seek(0)
        f.write(hdr)
    msg = s.error("GET", "/v1/images/manysnaps", 422)
    assert "snapshot table" in msg and "past the end of the file" in msg, msg
    with open(p, "r+b") as f:
        struct.pack_into(">I", hdr, 60, 65537)
        f.seek(0)
        f.write(hdr)
    msg = s.error("GET", "/v1/images/manysnaps", 422)
    assert "65537 snapshots" in msg and "limit of 65536" in msg, msg
    os.remove(p)
    p = qcow2(s, "manybms", 1 * MiB)
    hostile.qemu_img("bitmap", "--add", p, "b")
    _, _, _, ext = bitmap_dir(p)
    for count, want in ((0xFFFFFFFF, "out of range"), (65535, "too small for 65535 bitmaps")):
        with open(p, "r+b") as f:
            f.seek(ext)
            f.write(struct.pack(">I", count))
        msg = s.error("GET", "/v1/images/manybms", 422)
        assert "bitmaps extension" in msg and want in msg, (count, msg)
    os.remove(p)


CASES = [
    ("snaptable-padding", snaptable_padding),
    ("bitmap-bomb", bitmap_bomb),
    ("bitmap-stream", bitmap_stream),
    ("huge-virtual-size", huge_virtual_size),
    ("overlay-chain", overlay_chain),
    ("budget-option", budget_option),
    ("snapshots-16k", snapshots_16k),
    ("snapshots-over-budget", snapshots_over_budget),
    ("dirty-bit", dirty_bit),
    ("header-extensions", header_extensions),
    ("bitmap-entry-past", bitmap_entry_past),
    ("huge-counts", huge_counts),
]
