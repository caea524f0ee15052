#!/usr/bin/python3
"""hostile.py: hostile requests and hand-made images against a live qcowd.

Every case sends what an attacker would (deep paths, crafted qcow2 containers
built here byte by byte) and checks the status and JSON error, that the daemon
stays up, and that another client's reads keep answering meanwhile.

  routes      paths of 7 to 12 segments on every method: 404, no crash

Environment: QCOWD (the binary), QEMU_IMG. Usage: hostile.py [--seed N] [--keep]
Prints `ok NAME` / `FAIL NAME: reason`, then `N passed, M failed`.
"""
import json
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import qcowd  # noqa: E402

KiB = 1024
MiB = 1024 * KiB


def run(*cmd):
    import subprocess
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


class Hostile(qcowd.Cases):
    def __init__(self, args, cat):
        super().__init__(args.seed)
        self.cat = cat
        self.d = None

    def path(self, name):
        return os.path.join(self.cat, name + ".qcow2")

    def call(self, method, path, body=None, headers=None):
        st, hdrs, data = self.d.exchange(method, path, body=body, headers=headers)
        return st, hdrs, data

    def error(self, method, path, want, body=None, headers=None):
        """The request answers status want with a JSON error; returns the message."""
        st, hdrs, data = self.call(method, path, body, headers)
        assert st == want, "%s %s: %d, want %d: %r" % (method, path, st, want, data[:300])
        if method == "HEAD":
            return ""
        j = json.loads(data)
        assert set(j) == {"error"} and j["error"]["code"] and j["error"]["message"], j
        return j["error"]["message"]

    def up(self):
        assert self.d.alive(), "qcowd died: %s" % self.d.lines[-10:]
        st, _, _ = self.call("GET", "/v1/health")
        assert st == 200, "health %d" % st


def case_routes(s):
    """Paths longer than any route are 404 on every method; the daemon stays up."""
    shapes = ["/v1/images/a/snapshots/b/data/c", "/v1/images/x/bitmaps/b/clear/y",
              "/v1/images/a/b/c/d/e/f/g/h", "/v1/jobs/1/cancel/x/y/z/w",
              "/" + "/".join(["v1"] * 12), "/v1/images/a/bitmaps/b/merge/c/d/e/f/g"]
    for p in shapes:
        for m in ("GET", "HEAD", "DELETE", "POST", "PUT", "PATCH", "OPTIONS"):
            s.error(m, p, 404, body=b"{}" if m in ("POST", "PUT", "PATCH") else None)
        s.up()
    # exactly the longest routes still work
    st, _, _ = s.call("GET", "/v1/images/nosuch/snapshots/s/data")
    assert st == 404, st
    s.up()


def snap_entry(l1_off, l1_size, ident, name, extra=b"", pad=True):
    e = struct.pack(">QIHHIIQII", l1_off, l1_size, len(ident), len(name), 0, 0, 0, 0, len(extra))
    e += extra + ident + name
    if pad:
        e += b"\0" * (-len(e) % 8)
    return e


def case_snaptable(s):
    """A snapshot table whose last entry fits unpadded but whose padded step leaves
    the table: the next entry must not be read from past the buffer."""
    name = "snapover"
    p = s.path(name)
    run(qcowd.QEMU_IMG, "create", "-q", "-f", "qcow2", p, "1M")
    with open(p, "r+b") as f:
        hdr = bytearray(f.read(104))
        l1_off = struct.unpack(">Q", hdr[40:48])[0]
        l1_size = struct.unpack(">I", hdr[36:40])[0]
        f.seek(0, 2)
        end = f.tell()
        table_off = (end + 65535) & ~65535
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
        assert all(0x20 <= ord(c) < 0x7f for c in msg), repr(msg)
    s.up()


CASES = [("routes", case_routes)]


def main():
    args, top, cat = qcowd.prologue("qcowd-hostile-")
    s = Hostile(args, cat)
    try:
        s.d = qcowd.Qcowd(qcowd.QCOWD, ["--catalog", cat])
        for name, fn in CASES:
            s.case(name, lambda fn=fn: fn(s))
        try:
            s.d.stop_clean()
        except Exception as e:  # noqa: BLE001
            s.failed += 1
            print("FAIL stop: %s" % e)
    except Exception:  # noqa: BLE001
        s.setup_failed()
    finally:
        if s.d:
            s.d.kill()
        qcowd.remove_temp(top, args.keep)
    return s.summary()


if __name__ == "__main__":
    sys.exit(main())
