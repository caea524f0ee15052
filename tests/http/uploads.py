#!/usr/bin/python3
"""uploads.py: resumable uploads of a container (PUT .../file in pieces with
Content-Range) against a live qcowd:

  pieces        an upload in three pieces: 202 with where it stands, then 201; the
                image reads as qemu-img reads the file
  broken        a connection cut in the middle of a piece: the bytes that arrived
                are kept; asked with "bytes */TOTAL", the server says how many; the
                rest from there makes the image, equal to the file
  wrong-offset  a piece that does not continue where the upload stands: 409 with
                "received" and "total" in the error, nothing changed
  status        no upload: 404; another total: 409
  held-name     while an upload waits, creating or uploading the name whole is 409
                naming the upload; restarting it from 0 replaces it
  refused       a first piece that is not qcow2: 422 and nothing kept (404 after);
                a body longer than its Content-Range: 400 and nothing kept
  whole-cut     a PUT sent whole (no Content-Range) and cut: nothing kept, as before
  expiry        with --upload-resume-time 1, a waiting upload goes after a second:
                404, its temporary file removed, the name free
  budget        with --max-catalog room for 1.5 images, a waiting upload counts its
                declared total: a second one is 507 at its first piece although the
                folder holds only the first one's piece; after the first completes
                it is 507 still

Environment: QCOWD (required), QEMU_IMG, QEMU_IO. Prints `ok NAME` / `FAIL NAME:
reason`, then `N passed, M failed`; exits 1 on a failure, 77 when a tool is missing.
"""
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import qcowd  # noqa: E402

MiB = 1 << 20
H = {"Host": "localhost"}


def make_image(path, pattern):
    subprocess.run([qcowd.QEMU_IMG, "create", "-q", "-f", "qcow2", path, "16M"], check=True)
    subprocess.run([qcowd.QEMU_IO, "-c", "write -q -P 0x%02x 0 3M" % pattern, "-c", "write -q -z 5M 1M", path],
                   check=True)
    return open(path, "rb").read()


def raw_of(path):
    out = path + ".raw"
    subprocess.run([qcowd.QEMU_IMG, "convert", "-O", "raw", path, out], check=True)
    return open(out, "rb").read()


def put(port, name, body, headers):
    """PUT .../file over a socket of its own: (status, body). An answer sent before
    the whole body (a refusal on the headers or the first bytes) is read too."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = "PUT /v1/images/%s/file HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: %d\r\n" % (
        name, len(body))
    for k, v in headers.items():
        head += "%s: %s\r\n" % (k, v)
    try:
        s.sendall(head.encode() + b"\r\n" + body)
    except (BrokenPipeError, ConnectionResetError):
        pass
    data = b""
    try:
        while True:
            k = s.recv(65536)
            if not k:
                break
            data += k
    except ConnectionResetError:
        pass
    s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def piece(d, name, blob, first, last, total=None):
    total = len(blob) if total is None else total
    st, b = put(d.port, name, blob[first:last + 1], {"Content-Range": "bytes %d-%d/%d" % (first, last, total)})
    return st, (json.loads(b) if b else None)


def status(d, name, total):
    st, _, b = d.exchange("PUT", "/v1/images/%s/file" % name, b"",
                          dict(H, **{"Content-Range": "bytes */%d" % total}))
    return st, (json.loads(b) if b else None)


def cut_piece(port, name, blob, first, sent, total):
    """A piece from first to the end of blob of which only `sent` bytes go out,
    then the connection is closed."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = blob[first:]
    head = ("PUT /v1/images/%s/file HTTP/1.1\r\nHost: localhost\r\nContent-Range: bytes %d-%d/%d\r\n"
            "Content-Length: %d\r\n\r\n" % (name, first, len(blob) - 1, total, len(body)))
    s.sendall(head.encode() + body[:sent])
    time.sleep(0.2)
    s.close()


def main():
    args, top, catalog = qcowd.prologue("qcowd-uploads-")
    cases = qcowd.Cases(args.seed)
    src = os.path.join(top, "src.qcow2")
    blob = make_image(src, 0x5a)
    want = raw_of(src)
    T = len(blob)
    d = qcowd.Qcowd(qcowd.QCOWD, ["--catalog", catalog])

    def data(name):
        st, _, b = d.exchange("GET", "/v1/images/%s/data" % name, headers=H)
        assert st == 200, (st, b[:200])
        return b

    def pieces():
        a, b = T // 3, 2 * T // 3
        st, e = piece(d, "p", blob, 0, a - 1)
        assert st == 202 and e == {"name": "p", "received": a, "total": T}, (st, e)
        st, e = piece(d, "p", blob, a, b - 1)
        assert st == 202 and e["received"] == b, (st, e)
        st, e = piece(d, "p", blob, b, T - 1)
        assert st == 201 and e["name"] == "p", (st, e)
        assert data("p") == want
        assert status(d, "p", T)[0] == 404

    def broken():
        cut_piece(d.port, "q", blob, 0, T // 2, T)
        end = time.time() + 20
        while True:  # until the server has let go of the cut connection
            st, e = status(d, "q", T)
            assert st == 200 and 0 < e["received"] <= T // 2, (st, e)
            got = e["received"]
            st, e = piece(d, "q", blob, got, T - 1)
            if st != 409 or "another connection" not in e["error"]["message"] or time.time() > end:
                break
            time.sleep(0.1)
        assert st == 201, (st, e)
        assert data("q") == want

    def wrong_offset():
        st, e = piece(d, "w", blob, 0, 99999)
        assert st == 202, (st, e)
        st, e = piece(d, "w", blob, 50000, T - 1)
        assert st == 409 and e["error"]["received"] == 100000 and e["error"]["total"] == T, (st, e)
        assert "continue it at 100000" in e["error"]["message"], e
        st, e = piece(d, "w", blob, 100000, T - 1)
        assert st == 201, (st, e)
        assert data("w") == want

    def status_cases():
        assert status(d, "nosuch", T)[0] == 404
        st, e = piece(d, "s", blob, 0, 65535)
        assert st == 202, (st, e)
        st, e = status(d, "s", T + 1)
        assert st == 409 and e["error"]["received"] == 65536, (st, e)
        st, e = status(d, "s", T)
        assert st == 200 and e["received"] == 65536, (st, e)

    def held_name():
        st, _, b = d.exchange("POST", "/v1/images", json.dumps({"name": "s", "size": MiB}).encode(), H)
        assert st == 409 and b"upload" in b, (st, b)
        st, b = put(d.port, "s", blob, {})
        assert st == 409 and b"upload" in b, (st, b)
        st, e = piece(d, "s", blob, 0, 9999)  # from the start: replaces the waiting one
        assert st == 202 and e["received"] == 10000, (st, e)
        st, e = piece(d, "s", blob, 10000, T - 1)
        assert st == 201, (st, e)

    def refused():
        junk = b"not a qcow2 image" * 100
        st, e = piece(d, "j", junk, 0, 999, 5000)
        assert st == 422, (st, e)
        assert status(d, "j", 5000)[0] == 404
        st, b = put(d.port, "l", blob[:20], {"Content-Range": "bytes 0-9/%d" % T})
        assert st == 400, (st, b)
        assert status(d, "l", T)[0] == 404

    def whole_cut():
        s = socket.create_connection(("127.0.0.1", d.port), timeout=30)
        s.sendall(("PUT /v1/images/c/file HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % T).encode()
                  + blob[:T // 2])
        time.sleep(0.2)
        s.close()
        time.sleep(0.5)
        assert status(d, "c", T)[0] == 404

    def expiry():
        cat2 = os.path.join(top, "cat2")
        os.mkdir(cat2)
        d2 = qcowd.Qcowd(qcowd.QCOWD, ["--catalog", cat2, "--upload-resume-time", "1"])
        try:
            st, e = piece(d2, "x", blob, 0, 65535)
            assert st == 202, (st, e)
            assert any(f.startswith(".upload-x") for f in os.listdir(cat2)), os.listdir(cat2)
            time.sleep(2.2)
            assert status(d2, "x", T)[0] == 404
            assert not [f for f in os.listdir(cat2) if f.startswith(".upload-")], os.listdir(cat2)
            st, _, b = d2.exchange("POST", "/v1/images", json.dumps({"name": "x", "size": MiB}).encode(), H)
            assert st == 201, (st, b)
        finally:
            d2.stop_clean()

    def budget():
        cat3 = os.path.join(top, "cat3")
        os.mkdir(cat3)
        d3 = qcowd.Qcowd(qcowd.QCOWD, ["--catalog", cat3, "--max-catalog", str(T + T // 2)])
        try:
            st, e = piece(d3, "b1", blob, 0, 65535)
            assert st == 202, (st, e)
            st, e = piece(d3, "b2", blob, 0, 65535)
            assert st == 507 and "--max-catalog" in e["error"]["message"], (st, e)
            st, e = piece(d3, "b1", blob, 65536, T - 1)
            assert st == 201, (st, e)
            st, e = piece(d3, "b2", blob, 0, 65535)
            assert st == 507, (st, e)
            assert [f for f in os.listdir(cat3) if not f.startswith(".qcowd-")] == ["b1.qcow2"], os.listdir(cat3)
        finally:
            d3.stop_clean()

    for name, fn in (("pieces", pieces), ("broken", broken), ("wrong-offset", wrong_offset),
                     ("status", status_cases), ("held-name", held_name), ("refused", refused),
                     ("whole-cut", whole_cut), ("expiry", expiry), ("budget", budget)):
        cases.case(name, fn)
    return qcowd.finish(cases, d, top, args.keep)


if __name__ == "__main__":
    sys.exit(main())
