"""The error channel against a live qcowd (see hostile.py): a failing store is a
5xx that names the file and the cause, never "corrupt image"; a corrupt image is a
4xx that says so; a failure of the moment is not remembered.

Storage faults come from the VFS fault filter (vfs.h): qcowd serves the catalog
as "fault:DIR" with QCOWD_FAULT aimed at one file, so the prober's image and every
other file stay untouched. Permission bits do not stop root (CI runs as root), so
EACCES is injected the same way, at open, as a file of mode 000 would refuse it;
a real mode-000 file is tried too when the suite does not run as root."""
import json
import os
import struct

import hostile

KiB = 1024
MiB = 1024 * KiB


def make(s, name, size="1M"):
    p = s.path(name)
    hostile.qemu_img("create", "-q", "-f", "qcow2", p, size)
    hostile.run(hostile.qcowd.QEMU_IO, "-f", "qcow2", "-c", "write -q -P 0x33 0 64k", p)
    return p


def expect(s, method, path, status, code, *words, body=None, headers=None):
    """The request answers status with error code and a message holding every one
    of words; returns the message."""
    st, _, data = s.call(method, path, body, headers)
    assert st == status, "%s %s: %d, want %d: %r" % (method, path, st, status, data[:300])
    j = json.loads(data)
    assert j["error"]["code"] == code, "%s %s: code %r, want %r" % (method, path, j["error"]["code"], code)
    msg = j["error"]["message"]
    for w in words:
        assert w in msg, "%s %s: message %r lacks %r" % (method, path, msg, w)
    return msg


def put(s, name, data=b"hello", off=0):
    return s.call("PUT", "/v1/images/%s/data" % name, data,
                  {"Content-Range": "bytes %d-%d/*" % (off, off + len(data) - 1)})


def with_fault(s, fault, fn):
    """fn() against a qcowd serving the catalog through the fault filter with
    QCOWD_FAULT=fault; a plain qcowd again afterwards."""
    old = os.environ.get("QCOWD_FAULT")
    os.environ["QCOWD_FAULT"] = fault
    try:
        s.start("--catalog", "fault:" + s.cat)
    finally:
        if old is None:
            del os.environ["QCOWD_FAULT"]
        else:
            os.environ["QCOWD_FAULT"] = old
    try:
        fn()
        s.up()
    finally:
        s.start()


def storage_eio(s):
    """A disk read error is 502 storage-error naming the file, not 422 corrupt-image;
    it is not remembered: the next request opens the image, read-write."""
    make(s, "eio")

    def fn():
        expect(s, "GET", "/v1/images/eio", 502, "storage-error", "eio.qcow2", "Input/output error")
        st, _, _ = s.call("GET", "/v1/images/eio")
        assert st == 200, "after one failed read the image stays unavailable: %d" % st
        st, _, data = put(s, "eio")
        assert st == 204, "after one failed read the image is not writable: %d %r" % (st, data[:200])
        st, _, data = s.call("GET", "/v1/images/eio/data", headers={"Range": "bytes=0-4"})
        assert st == 206 and data == b"hello", (st, data)
    with_fault(s, "read:1:EIO:eio.qcow2", fn)

    def every_read():
        for _ in range(3):
            expect(s, "GET", "/v1/images/eio/data", 502, "storage-error", "eio.qcow2")
    with_fault(s, "read:1+:EIO:eio.qcow2", every_read)


def corrupt_bit(s):
    """An image with the corrupt bit (incompatible feature bit 1) reads, and a write
    is 422 corrupt-image naming the bit, not a storage error or 409 read-only."""
    p = make(s, "corruptbit")
    with open(p, "r+b") as f:
        f.seek(72)
        bits = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", bits | 2))
    st, _, data = s.call("GET", "/v1/images/corruptbit")
    assert st == 200 and json.loads(data)["format-specific"]["data"]["corrupt"] is True, (st, data[:300])
    st, _, data = s.call("GET", "/v1/images/corruptbit/data", headers={"Range": "bytes=0-4095"})
    assert st == 206 and data == b"\x33" * 4096, st
    expect(s, "PUT", "/v1/images/corruptbit/data", 422, "corrupt-image", "corrupt bit", "check",
           body=b"x" * 512, headers={"Content-Range": "bytes 0-511/*"})
    expect(s, "PATCH", "/v1/images/corruptbit/data", 422, "corrupt-image", "corrupt bit",
           body=json.dumps({"op": "zero", "offset": 0, "size": 4096}),
           headers={"Content-Type": "application/json"})
    expect(s, "POST", "/v1/images/corruptbit/bitmaps", 422, "corrupt-image", "corrupt bit",
           body=json.dumps({"name": "b"}), headers={"Content-Type": "application/json"})


def storage_eacces(s):
    """A file the store will not open for qcowd is 503 storage-denied naming the
    file and the cause (not 403: the client's rights are not at stake), every time."""
    make(s, "locked")

    def fn():
        for path in ("/v1/images/locked", "/v1/images/locked/data", "/v1/images/locked/file"):
            expect(s, "GET", path, 503, "storage-denied", "locked.qcow2", "Permission denied")
        st, _, _ = s.call("GET", "/v1/images/eacces-other")
        assert st == 404, st
    with_fault(s, "open:1+:EACCES:locked.qcow2", fn)
    if os.geteuid() != 0:
        p = make(s, "mode000")
        os.chmod(p, 0)
        try:
            expect(s, "GET", "/v1/images/mode000", 503, "storage-denied", "mode000.qcow2", "Permission denied")
        finally:
            os.chmod(p, 0o644)
    else:
        print("   (as root, mode 000 stops nobody: EACCES came from the fault filter only)")


def storage_enospc(s):
    """Out of space on a write is 507 no-space naming the cause; the image takes the
    write once there is room again. A quota is the same."""
    make(s, "full")

    def fn():
        expect(s, "PUT", "/v1/images/full/data", 507, "no-space", "full.qcow2", "No space left",
               body=b"y" * 4096, headers={"Content-Range": "bytes %d-%d/*" % (MiB // 2, MiB // 2 + 4095)})
        st, _, data = put(s, "full", b"z" * 4096, MiB // 2)
        assert st == 204, "after ENOSPC passed, a write fails: %d %r" % (st, data[:200])
        st, _, data = s.call("GET", "/v1/images/full/data",
                             headers={"Range": "bytes=%d-%d" % (MiB // 2, MiB // 2 + 4095)})
        assert st == 206 and data == b"z" * 4096, st
    with_fault(s, "write:1:ENOSPC:full.qcow2", fn)

    def quota():
        for _ in range(2):
            expect(s, "PUT", "/v1/images/full/data", 507, "no-space", "full.qcow2", "quota",
                   body=b"q" * 4096, headers={"Content-Range": "bytes 0-4095/*"})
    with_fault(s, "write:1+:EDQUOT:full.qcow2", quota)


def snapshot_metadata(s):
    """A snapshot whose own L1 table is too small for the disk is 422 corrupt-image
    naming the problem, not 404 "no such snapshot"; the image itself still reads."""
    p = s.path("badsnap")
    hostile.qemu_img("create", "-q", "-f", "qcow2", p, "2G")   # 4 L1 entries with 64 KiB clusters
    hostile.run(hostile.qcowd.QEMU_IO, "-f", "qcow2", "-c", "write -q -P 0x44 0 64k", p)
    hostile.qemu_img("snapshot", "-c", "s1", p)
    with open(p, "r+b") as f:
        f.seek(64)
        table = struct.unpack(">Q", f.read(8))[0]
        f.seek(table + 8)
        f.write(struct.pack(">I", 1))
    expect(s, "GET", "/v1/images/badsnap/snapshots/s1/data", 422, "corrupt-image", "s1", "L1",
           headers={"Range": "bytes=0-4095"})
    st, _, data = s.call("GET", "/v1/images/badsnap/data", headers={"Range": "bytes=0-4095"})
    assert st == 206 and data == b"\x44" * 4096, st
    expect(s, "GET", "/v1/images/badsnap/snapshots/nosuch/data", 404, "not-found", "nosuch")


CASES = [("errors-storage-eio", storage_eio), ("errors-corrupt-bit", corrupt_bit),
         ("errors-storage-eacces", storage_eacces), ("errors-storage-enospc", storage_enospc),
         ("errors-snapshot-metadata", snapshot_metadata)]
