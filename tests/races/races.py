"""races.py: the harness of the race suites (tests/races): a live qcowd with one
job worker and no --min-rate (a stalled client is the test's own doing), images
made with qemu-img/qemu-io, and raw-socket clients that hold one side of a race
open: a download read a little then stalled, a PUT whose body stops half way.

Use from a suite: `import races`, then races.main(CASES) with CASES a list of
(name, fn(r)) where r is a Races (r.d the daemon, r.cat the catalog folder)."""
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import qcowd  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
QEMU_IMG = qcowd.QEMU_IMG
QEMU_IO = qcowd.QEMU_IO


def run(*argv):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return p.returncode, p.stdout.decode(errors="replace")


class Held:
    """A raw HTTP/1.1 request on its own socket, with a small receive buffer so
    the server cannot push a large answer out at once: send() the head (and part
    of a body), read_some() a little of the answer, finish() the rest."""

    def __init__(self, port, method, path, headers=(), body=b""):
        self.s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)
        self.s.connect(("127.0.0.1", port))
        head = "%s %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" % (method, path)
        head += "".join("%s: %s\r\n" % h for h in headers) + "\r\n"
        self.s.sendall(head.encode() + body)
        self.buf = b""

    def send(self, data):
        self.s.sendall(data)

    def read_some(self, n):
        """Reads until n bytes of the answer (head included) have come."""
        while len(self.buf) < n:
            chunk = self.s.recv(min(65536, n - len(self.buf)))
            if not chunk:
                break
            self.buf += chunk
        return self.buf

    def finish(self):
        """The rest of the answer: (status, headers dict, body bytes)."""
        self.s.settimeout(120)
        while True:
            chunk = self.s.recv(1 << 20)
            if not chunk:
                break
            self.buf += chunk
        self.s.close()
        head, _, body = self.buf.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        return status, hdrs, body


class Races:
    def __init__(self, top, cat):
        self.top, self.cat = top, cat
        self.d = qcowd.Qcowd(qcowd.QCOWD, ["--catalog", cat, "--threads", "8", "--job-workers", "1",
                                           "--min-rate", "0", "--quiet"])

    def path(self, name):
        return os.path.join(self.cat, name + ".qcow2")

    def call(self, method, path, body=None, headers=None):
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        h = {"Host": "localhost"}
        h.update(headers or {})
        st, hd, b = self.d.exchange(method, path, data, h)
        return st, hd, b

    def json(self, method, path, body=None, want=None):
        st, h, b = self.call(method, path, body)
        if want is not None and st != want:
            raise AssertionError("%s %s: %d, want %d: %r" % (method, path, st, want, b[:300]))
        return st, h, json.loads(b) if b.strip() else None

    def make(self, name, size, *io_cmds, backing=None, cluster=None):
        """name.qcow2 in the catalog, written with qemu-io commands."""
        argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
        if cluster:
            argv += ["-o", "cluster_size=%d" % cluster]
        if backing:
            argv += ["-b", backing + ".qcow2", "-F", "qcow2"]
        rc, out = run(*(argv + [self.path(name), str(size)]))
        assert rc == 0, out
        for c in io_cmds:
            rc, out = run(QEMU_IO, "-f", "qcow2", "-c", c, self.path(name))
            assert rc == 0, out

    def make_long(self, name):
        """An image whose compressed convert takes seconds (half-random clusters)."""
        raw = os.path.join(self.top, name + ".raw")
        qcowd.slow_raw(raw)
        rc, out = run(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", raw, self.path(name))
        os.remove(raw)
        assert rc == 0, out

    def job(self, jid):
        return self.json("GET", "/v1/jobs/" + jid, want=200)[2]

    def wait(self, jid, status=("concluded",), timeout=120):
        t = time.time() + timeout
        while time.time() < t:
            j = self.job(jid)
            if j["status"] in status:
                return j
            time.sleep(0.02)
        raise AssertionError("job %s not %s after %ds: %r" % (jid, status, timeout, j))

    def start_long(self, src, target):
        """A compressed convert of src, running (progress made) when this returns."""
        j = self.json("POST", "/v1/images/%s/convert" % src, {"target": target, "compress": True}, want=202)[2]
        self.wait(j["id"], ("running",))
        t = time.time() + 60
        while self.job(j["id"])["current-progress"] == 0 and time.time() < t:
            time.sleep(0.01)
        return j["id"]

    def busy(self, where, st, h, b, holder=None):
        """A 409 that says the image is busy, with Retry-After, naming the holder."""
        assert st == 409, "%s: %d, want 409: %r" % (where, st, b[:300])
        assert "retry-after" in h, "%s: 409 without Retry-After: %r" % (where, h)
        msg = json.loads(b)["error"]["message"]
        if holder:
            assert holder in msg, "%s: %r does not name %r" % (where, msg, holder)
        return msg

    def check_file(self, path):
        rc, out = run(QEMU_IMG, "check", path)
        assert rc == 0, "qemu-img check %s: exit %d\n%s" % (path, rc, out[-1500:])


def main(cases, prefix="qcowd-races-"):
    args, top, cat = qcowd.prologue(prefix)
    ck = qcowd.Cases(args.seed)
    r = None
    try:
        r = Races(top, cat)
        for name, fn in cases:
            ck.case(name, lambda fn=fn: fn(r))
    except Exception:
        ck.setup_failed()
    finally:
        if r:
            try:
                r.d.stop_clean()
            except Exception:
                ck.setup_failed()
    qcowd.remove_temp(top, args.keep)
    return ck.summary()
