#!/usr/bin/python3
"""clients.py: drives qcowctl and the Python client (clients/python, installed offline
with pip into a temporary folder and imported from there) against a live qcowd through every subcommand and method, and checks the result
with qemu-img once qcowd has stopped.

For each client, on its own image:
  create     options reach the server (cluster size, backing file), info agrees
  write      random data at random offsets (qcowctl: from a file, and from a pipe in
             several chunks), read back in random ranges and whole, compared with a
             reference kept in memory
  zero/discard/flush   the reference follows; discarded clusters read as zeroes or
             as before (discard is a hint), partial clusters unchanged
  extents    equal for both clients, and equal to `qemu-img map` after qcowd stops
  upload/download      download, upload as a new image, download again: equal bytes
  rm         the image is gone; deleting a backing image is refused (409)
  errors     unknown image: exit 1 and `qcowctl: CODE: MESSAGE` with the server's own
             code and message (from its JSON body); a bad size (exit 2), an
             unreachable server (exit 3), a hostile name
After SIGTERM (qcowd exits 0): `qemu-img check` clean on every image and
`qemu-img compare` equal to the raw reference.

Environment: QCOWD, QCOWCTL (the binaries, required), QEMU_IMG.
Usage: clients.py [--seed N] [--keep]. Prints `ok NAME` / `FAIL NAME: reason`, then
`N passed, M failed`; exits 1 on a failure, 77 when qemu-img is missing.
"""

import json
import os
import subprocess
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import qcowd  # noqa: E402  (the daemon, the cases, main()'s prologue)
import installed  # noqa: E402  (clients/python, pip-installed offline)

Client = QcowdError = None  # from the installed package, in main()

KiB = 1024
MiB = 1024 * KiB

QCOWD = qcowd.QCOWD
QCOWCTL = os.environ.get("QCOWCTL", "")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")

SIZE = 48 * MiB
CLUSTER = 64 * KiB


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300, **kw)


class Daemon(qcowd.Qcowd):
    """qcowd serving catalog with 4 HTTP threads."""

    def __init__(self, catalog):
        super().__init__(QCOWD, ["--catalog", catalog, "--threads", "4"])

    def raw_error(self, method, path):
        """The server's own JSON error for a request, as (status, message)."""
        st, _, body = self.exchange(method, path)
        return st, json.loads(body)["error"]["message"]


def ctl(url, *args, stdin=None, input=None, check=True):
    """Runs qcowctl; returns (exit status, stdout bytes, stderr text)."""
    p = subprocess.run([QCOWCTL, "--url", url, *args], stdin=stdin, input=input, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=300)
    err = p.stderr.decode(errors="replace")
    if check and p.returncode != 0:
        raise AssertionError("qcowctl %s: exit %d: %s" % (" ".join(args), p.returncode, err.strip()))
    return p.returncode, p.stdout, err


def runs_of_map(path):
    """qemu-img map's view as merged {start, length, zero, hole} runs."""
    out = run(QEMU_IMG, "map", "-f", "qcow2", "--output=json", path).stdout
    runs = []
    for e in json.loads(out):
        if e["length"] == 0:
            continue
        z, h = bool(e["zero"]), not e["present"]
        if runs and runs[-1][2] == z and runs[-1][3] == h and runs[-1][0] + runs[-1][1] == e["start"]:
            runs[-1][1] += e["length"]
        else:
            runs.append([e["start"], e["length"], z, h])
    return [{"start": s, "length": n, "zero": z, "hole": h} for s, n, z, h in runs]


class Driver:
    """The operations of one client, so both clients run the same scenario."""

    def __init__(self, kind, url, tmp):
        self.kind, self.url, self.tmp = kind, url, tmp
        self.py = Client(url)

    def create(self, name, size, **opts):
        if self.kind == "py":
            return self.py.create(name, size, **opts)
        args = ["create", name] + ([str(size)] if size is not None else [])
        if "cluster_size" in opts:
            args += ["--cluster-size", "%dk" % (opts["cluster_size"] // KiB)]
        if "backing_file" in opts:
            args += ["--backing", opts["backing_file"]]
        return json.loads(ctl(self.url, *args)[1])

    def info(self, name):
        if self.kind == "py":
            return self.py.info(name)
        return json.loads(ctl(self.url, "info", name)[1])

    def list(self):
        if self.kind == "py":
            return self.py.list()
        return json.loads(ctl(self.url, "list")[1])

    def write(self, name, off, data, how=None):
        if self.kind == "py":
            if how == "file":
                path = os.path.join(self.tmp, "in.bin")
                with open(path, "wb") as f:
                    f.write(data)
                with open(path, "rb") as f:
                    return self.py.write(name, off, f)
            return self.py.write(name, off, data, flush=how != "noflush")
        if how == "pipe":  # stdin a pipe: qcowctl sends chunks
            return ctl(self.url, "write", name, str(off), input=data)
        path = os.path.join(self.tmp, "in.bin")
        with open(path, "wb") as f:
            f.write(data)
        with open(path, "rb") as f:
            args = ["write"] + (["--no-flush"] if how == "noflush" else []) + [name, str(off)]
            return ctl(self.url, *args, stdin=f)

    def read(self, name, off=None, length=None):
        if self.kind == "py":
            return self.py.read(name, off or 0, length)
        args = ["read", name] + ([str(off)] if off is not None else []) + ([str(length)] if length is not None else [])
        return ctl(self.url, *args)[1]

    def patch(self, op, name, off=None, length=None):
        if self.kind == "py":
            if op == "flush":
                return self.py.flush(name)
            return getattr(self.py, op)(name, off, length)
        args = [op, name] + ([str(off), str(length)] if off is not None else [])
        return ctl(self.url, *args)

    def extents(self, name):
        if self.kind == "py":
            return self.py.extents(name)
        return json.loads(ctl(self.url, "extents", name)[1])

    def upload(self, name, path):
        if self.kind == "py":
            return self.py.upload(name, path)
        return json.loads(ctl(self.url, "upload", name, path)[1])

    def download(self, name, path):
        if self.kind == "py":
            return self.py.download(name, path)
        return ctl(self.url, "download", name, path)

    def rm(self, name):
        if self.kind == "py":
            return self.py.delete(name)
        return ctl(self.url, "rm", name)


def scenario(ck, d, drv, catalog, refs, final_extents):
    """Everything one client does, on image `<kind>img` (+ helpers)."""
    k = drv.kind
    img = k + "img"
    rng = ck.rng
    ref = bytearray(SIZE)
    refs[img] = ref

    def t_create():
        info = drv.create(img, SIZE, cluster_size=CLUSTER)
        assert info["virtual-size"] == SIZE and info["cluster-size"] == CLUSTER, info
        got = drv.info(img)
        assert got["name"] == img and got["virtual-size"] == SIZE, got
        assert img in [i["name"] for i in drv.list()], "not listed"
    ck.case(k + " create/info/list", t_create)

    def t_write():
        for i in range(40):
            n = rng.choice([1, 511, 4096, 65536, 100000, rng.randrange(1, 400 * KiB)])
            off = rng.randrange(0, SIZE - n)
            data = rng.randbytes(n)
            drv.write(img, off, data, how=rng.choice(["file", "pipe", "noflush", None]))
            ref[off:off + n] = data
        # a pipe longer than qcowctl's 8 MiB chunk, and a write that ends at the end of the disk
        data = rng.randbytes(9 * MiB + 12345)
        drv.write(img, 20 * MiB + 7, data, how="pipe")
        ref[20 * MiB + 7:20 * MiB + 7 + len(data)] = data
        data = rng.randbytes(3000)
        drv.write(img, SIZE - 3000, data)
        ref[SIZE - 3000:] = data
    ck.case(k + " write (random offsets)", t_write)

    def check_reads(count=60):
        for i in range(count):
            off = rng.randrange(0, SIZE)
            n = rng.randrange(1, min(SIZE - off, 2 * MiB) + 1)
            got = drv.read(img, off, n)
            assert got == bytes(ref[off:off + n]), "range %d+%d differs" % (off, n)
        assert drv.read(img) == bytes(ref), "whole-disk read differs"
        tail = drv.read(img, SIZE - 100)
        assert tail == bytes(ref[SIZE - 100:]), "open-ended read differs"

    ck.case(k + " read back", check_reads)

    def t_zero_discard_flush():
        for i in range(6):
            off = rng.randrange(0, SIZE - MiB)
            n = rng.randrange(1, MiB)
            drv.patch("zero", img, off, n)
            ref[off:off + n] = bytes(n)
        for i in range(4):
            off = rng.randrange(0, SIZE - 2 * MiB)
            n = rng.randrange(1, 2 * MiB)
            drv.patch("discard", img, off, n)
            got = drv.read(img, off, n)
            # whole clusters may now read as zeroes; partial ones must be unchanged
            c0 = -(-off // CLUSTER) * CLUSTER
            c1 = (off + n) // CLUSTER * CLUSTER
            segs = [(off, min(c0, off + n))] + [(c, c + CLUSTER) for c in range(c0, c1, CLUSTER)] + \
                   [(max(c1, off), off + n)]
            for s, e in segs:
                if s >= e:
                    continue
                old, new = bytes(ref[s:e]), got[s - off:e - off]
                whole = s % CLUSTER == 0 and e - s == CLUSTER
                if new != old and not (whole and new == bytes(e - s)):
                    raise AssertionError("discard %d+%d changed %d..%d wrongly" % (off, n, s, e))
            ref[off:off + n] = got
        drv.patch("flush", img)
        check_reads(20)
    ck.case(k + " zero/discard/flush", t_zero_discard_flush)

    def t_extents():
        ext = drv.extents(img)
        pos = 0
        for e in ext:
            assert e["start"] == pos and e["length"] > 0, "extents not contiguous at %d" % pos
            if e["zero"]:
                s, n = e["start"], e["length"]
                assert ref[s:s + n] == bytes(n), "extent %d+%d says zero, data is not" % (s, n)
            pos += e["length"]
        assert pos == SIZE, "extents cover %d of %d bytes" % (pos, SIZE)
        final_extents[img] = ext
    ck.case(k + " extents", t_extents)

    def t_upload_download():
        f1 = os.path.join(drv.tmp, k + "-dl1.qcow2")
        f2 = os.path.join(drv.tmp, k + "-dl2.qcow2")
        drv.download(img, f1)
        run(QEMU_IMG, "check", "-q", f1)
        info = drv.upload(img + "-copy", f1)
        assert info["name"] == img + "-copy" and info["virtual-size"] == SIZE, info
        drv.download(img + "-copy", f2)
        with open(f1, "rb") as a, open(f2, "rb") as b:
            assert a.read() == b.read(), "download/upload/download changed the file"
        assert drv.read(img + "-copy") == bytes(ref), "the uploaded copy reads differently"
        assert not os.path.exists(f2 + ".part"), "a .part file was left"
    ck.case(k + " upload/download round trip", t_upload_download)

    def t_backing():
        base, top = k + "base", k + "top"
        drv.create(base, 4 * MiB)
        data = rng.randbytes(100000)
        drv.write(base, 12345, data)
        info = drv.create(top, None, backing_file=base)
        assert info["virtual-size"] == 4 * MiB and info.get("backing-filename") == base + ".qcow2", info
        assert drv.read(top, 12345, len(data)) == data, "overlay does not read its backing image"
        if k == "py":
            try:
                drv.rm(base)
                raise AssertionError("deleting a backing image was allowed")
            except QcowdError as e:
                assert e.status == 409 and e.message, (e.status, e.message)
        else:
            rc, _, err = ctl(drv.url, "rm", base, check=False)
            assert rc == 1 and err.startswith("qcowctl: "), (rc, err)
        drv.rm(top)
        drv.rm(base)
    ck.case(k + " backing file, rm refused then allowed", t_backing)

    def t_rm():
        drv.rm(img + "-copy")
        names = [i["name"] for i in drv.list()]
        assert img + "-copy" not in names and img in names, names
        assert not os.path.exists(os.path.join(catalog, img + "-copy.qcow2")), "file left in the catalog"
    ck.case(k + " rm", t_rm)


def ctl_errors(ck, d, tmp):
    url = d.url

    def t_unknown():
        status, msg = d.raw_error("GET", "/v1/images/nosuch")
        assert status == 404
        msg = "not-found: " + msg
        for args in (["info", "nosuch"], ["read", "nosuch", "0", "10"], ["rm", "nosuch"], ["flush", "nosuch"],
                     ["extents", "nosuch"], ["zero", "nosuch", "0", "1"], ["download", "nosuch", os.path.join(tmp, "x")]):
            rc, out, err = ctl(url, *args, check=False)
            assert rc == 1, "%s: exit %d" % (args, rc)
            assert err == "qcowctl: %s\n" % msg, "%s: stderr %r, want the server's %r" % (args, err, msg)
            assert out == b"", "%s: output on error" % args
        assert not os.path.exists(os.path.join(tmp, "x")) and not os.path.exists(os.path.join(tmp, "x.part"))
        rc, out, err = ctl(url, "write", "nosuch", "0", input=b"abc", check=False)
        assert rc == 1 and err == "qcowctl: %s\n" % msg, (rc, err)
    ck.case("qcowctl unknown image: exit 1 with the server's message", t_unknown)

    def t_bad_size():
        for bad in ("12Q", "-5", "", "1.5G", "99999999999999999999", "16E"):
            rc, out, err = ctl(url, "create", "badsize", "--", bad, check=False)
            assert rc == 2 and err.startswith("qcowctl: bad size"), (bad, rc, err)
        rc, _, err = ctl(url, "create", "badsize", "1M", "--frob", check=False)
        assert rc == 2 and err.startswith("qcowctl: create: bad option '--frob'"), err
        rc, _, err = ctl(url, "read", "x", "abc", "1", check=False)
        assert rc == 2 and "bad offset" in err, err
        assert "badsize" not in [i["name"] for i in Client(url).list()], "an image was created"
    ck.case("qcowctl bad size/offset: exit 2", t_bad_size)

    def t_server_errors():
        ctl(url, "create", "dup", "1M")
        status, msg = 409, None
        rc, _, err = ctl(url, "create", "dup", "1M", check=False)
        assert rc == 1 and err.startswith("qcowctl: conflict: ") and "dup" in err, err
        rc, _, err = ctl(url, "create", "../evil", "1M", check=False)
        assert rc == 1 and err.startswith("qcowctl: "), err
        rc, _, err = ctl(url, "read", "dup", "2M", "10", check=False)  # past the end: 416
        assert rc == 1 and err.startswith("qcowctl: "), err
        rc, _, err = ctl(url, "write", "dup", "1048000", input=b"x" * 1000, check=False)
        assert rc == 1 and err.startswith("qcowctl: "), err
        ctl(url, "rm", "dup")
    ck.case("qcowctl server errors (name taken, hostile name, ranges)", t_server_errors)

    def t_misc():
        rc, out, err = ctl("http://127.0.0.1:1", "list", check=False)
        assert rc == 3 and err.startswith("qcowctl: ") and out == b"", (rc, err)
        rc, out, _ = ctl(url, "--help", check=False)
        assert rc == 0 and b"usage: qcowctl" in out
        rc, out, _ = ctl(url, "--version", check=False)
        assert rc == 0 and out.startswith(b"qcowctl "), out
        rc, _, err = ctl(url, "frobnicate", check=False)
        assert rc == 2 and "unknown command" in err, err
        rc, _, err = ctl(url, "info", check=False)
        assert rc == 2 and "usage" in err, err
        assert json.loads(ctl(url, "health")[1]) == {"status": "ok"}
        assert b"qcowd_http_requests_total" in ctl(url, "metrics")[1]
        # QCOWD_URL from the environment
        p = subprocess.run([QCOWCTL, "health"], env=dict(os.environ, QCOWD_URL=url), stdout=subprocess.PIPE,
                           timeout=60)
        assert p.returncode == 0 and b"ok" in p.stdout
    ck.case("qcowctl unreachable server, --help, --version, health, metrics, QCOWD_URL", t_misc)


def py_errors(ck, d):
    c = Client(d.url)

    def t_errors():
        status, msg = d.raw_error("GET", "/v1/images/nosuch")
        for fn in (lambda: c.info("nosuch"), lambda: c.read("nosuch", 0, 1), lambda: c.delete("nosuch"),
                   lambda: c.write("nosuch", 0, b"x"), lambda: c.zero("nosuch", 0, 1), lambda: c.extents("nosuch")):
            try:
                fn()
                raise AssertionError("no error")
            except QcowdError as e:
                assert (e.status, e.code, e.message) == (404, "not-found", msg), (e.status, e.code, e.message)
        try:
            c.create("pybad", "12Q")
            raise AssertionError("a bad size was accepted")
        except QcowdError as e:
            assert e.status == 400 and e.code == "bad-request", (e.status, e.code)
        try:
            c.create("pybad", -1)
            raise AssertionError("a negative size was accepted")
        except QcowdError as e:
            assert e.status == 400, e.status
        try:
            c.read("nosuch/../x", 0, 1)
            raise AssertionError("a hostile name was accepted")
        except QcowdError as e:
            assert e.status in (400, 404), e.status
        assert c.health() == {"status": "ok"}
        assert "qcowd_http_requests_total" in c.metrics()
        c.create("pysz", 3 * MiB + 512)
        assert c.size("pysz") == 3 * MiB + 512
        assert "zero" in c.options("pysz")["features"]
        c.write("pysz", 0, b"")  # nothing to do
        assert c.read("pysz", 0, 0) == b""
        c.delete("pysz")
        try:
            Client("http://127.0.0.1:1").health()
            raise AssertionError("no error from a closed port")
        except OSError:
            pass
    ck.case("python errors, health, metrics, size, options", t_errors)


def main():
    global Client, QcowdError
    args, tmp, catalog = qcowd.prologue("qcowd-clients-", tools=(QEMU_IMG,),
                                        seed=int.from_bytes(os.urandom(4), "little"),
                                        binaries={"QCOWD": QCOWD, "QCOWCTL": QCOWCTL})
    qc = installed.install(tmp)
    Client, QcowdError = qc.Client, qc.QcowdError
    print("seed", args.seed, flush=True)
    ck = qcowd.Cases(args.seed)
    refs, final_extents = {}, {}
    d = Daemon(catalog)
    try:
        for kind in ("ctl", "py"):
            scenario(ck, d, Driver(kind, d.url, tmp), catalog, refs, final_extents)
        ctl_errors(ck, d, tmp)
        py_errors(ck, d)

        def t_same_extents():
            # both clients see the same map of the same image
            for img in final_extents:
                a = json.loads(ctl(d.url, "extents", img)[1])
                b = Client(d.url).extents(img)
                assert a == b == final_extents[img], img
        ck.case("extents: qcowctl and python agree", t_same_extents)
    finally:
        rc = d.stop(timeout=120)
    ck.case("qcowd exits 0 on SIGTERM", lambda: (_ for _ in ()).throw(AssertionError("exit %d" % rc)) if rc else None)

    for img, ref in refs.items():
        path = os.path.join(catalog, img + ".qcow2")

        def t_offline(img=img, ref=ref, path=path):
            run(QEMU_IMG, "check", "-q", path)
            raw = os.path.join(tmp, img + ".raw")
            with open(raw, "wb") as f:
                f.write(ref)
            p = subprocess.run([QEMU_IMG, "compare", "-q", "-f", "qcow2", "-F", "raw", path, raw],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
            assert p.returncode == 0, "qemu-img compare: %d %s" % (p.returncode, p.stderr.decode().strip())
            if img in final_extents:
                want = runs_of_map(path)
                assert final_extents[img] == want, "extents %s != qemu-img map %s" % (final_extents[img][:6], want[:6])
        ck.case("%s: qemu-img check clean, compare equal, map equal" % img, t_offline)

    qcowd.remove_temp(tmp, args.keep)
    return ck.summary()


if __name__ == "__main__":
    sys.exit(main())
