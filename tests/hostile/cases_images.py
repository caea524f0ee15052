"""Hand-made hostile images (see hostile.py). Each is built here from a
qemu-img image by poking bytes, then read through qcowd."""
import struct

import hostile


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


CASES = [("snaptable-padding", snaptable_padding)]
