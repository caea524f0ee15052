"""Budgets of the daemon against greedy and slow clients (see hostile.py): a socket
flood from one address, slow headers, trickling uploads, downloads that never
read, uploads refused on their first bytes, upload and catalog size caps, the
virtual size cap, the job queue, event streams per address, and the stale
temporaries of a crash. Each refusal names its budget (the qcowd option)."""
import glob
import json
import os
import resource
import socket
import struct
import subprocess
import threading
import time

import qcowd

KiB = 1024
MiB = 1024 * KiB
FLOOD_ADDR = "127.0.0.3"

# the budgets these cases run with (the defaults are far larger or slower)
TIGHT = ["--header-timeout", "2", "--min-rate", "65536", "--max-upload", "16M",
         "--max-queued-jobs", "2", "--job-workers", "1", "--max-listeners-per-client", "2"]


def tight(s):
    """qcowd with TIGHT, started once for the cases that share it."""
    if getattr(s, "budgets_args", None) != TIGHT or s.d is None or not s.d.alive():
        s.start(*TIGHT)
        s.budgets_args = TIGHT


def defaults(s, *extra):
    s.start(*extra)
    s.budgets_args = list(extra)


def raw(s, src="127.0.0.1", timeout=10, rcvbuf=None):
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    c.settimeout(timeout)
    c.bind((src, 0))
    c.connect(("127.0.0.1", s.d.port))
    return c


def read_answer(c, limit_s):
    """The status and JSON body of what the server says on c within limit_s
    (it closes the connection after)."""
    c.settimeout(limit_s)
    data = b""
    t0 = time.monotonic()
    while b"\r\n\r\n" not in data or len(data) < head_len(data):
        if time.monotonic() - t0 > limit_s:
            raise AssertionError("no answer within %.1f s: %r" % (limit_s, data[:200]))
        try:
            got = c.recv(65536)
        except ConnectionResetError:
            break
        if not got:
            break
        data += got
    assert data.startswith(b"HTTP/1.1 "), "not an answer: %r" % data[:200]
    status = int(data[9:12])
    body = data.split(b"\r\n\r\n", 1)[1]
    return status, json.loads(body) if body.strip() else None


def head_len(data):
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return len(head) + 4


def names_budget(j, option):
    assert j and "error" in j, "not a JSON error: %r" % j
    assert option in j["error"]["message"], "%r does not name %s" % (j["error"]["message"], option)


def closed_within(c, limit_s):
    """True when the server closes c within limit_s (what it sent is read away)."""
    c.settimeout(0.2)
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        try:
            if not c.recv(65536):
                return True
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def qcow2_file(s, name, size="64M", fill=None):
    """A qcow2 container built outside the catalog; its bytes."""
    p = os.path.join(s.top, name + ".qcow2")
    subprocess.run([qcowd.QEMU_IMG, "create", "-q", "-f", "qcow2", p, size], check=True)
    if fill:
        subprocess.run([qcowd.QEMU_IO, "-f", "qcow2", "-c", "write -q -P 0x33 0 %s" % fill, p], check=True,
                       stdout=subprocess.DEVNULL)
    with open(p, "rb") as f:
        return f.read()


def temporaries(s):
    return glob.glob(os.path.join(s.cat, ".upload-*")) + glob.glob(os.path.join(s.cat, ".create-*"))


# ---- connections ----

def socket_flood(s):
    """1100 idle sockets from one address: over --max-connections-per-client
    they are closed at once, the other addresses keep being served, and every
    socket is gone at the end."""
    defaults(s)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    socks = []
    t0 = time.monotonic()
    try:
        for _ in range(1100):
            try:
                socks.append(raw(s, FLOOD_ADDR, timeout=5))
            except OSError:
                pass
        assert len(socks) > 1000, "only %d sockets connected" % len(socks)
        # another address, and a new connection: served while the flood sits
        st, _, _ = s.call("GET", "/v1/health", timeout=5)
        assert st == 200
        time.sleep(0.5)
        alive = 0
        for c in socks:
            c.settimeout(0.001)
            try:
                if c.recv(1):
                    alive += 1
            except socket.timeout:
                alive += 1
            except OSError:
                pass
        assert alive <= 128, "%d sockets of one address are still open (budget 128)" % alive
        held = metric(s, "qcowd_http_connections")
        assert held <= 128 + 4, "qcowd holds %d connections" % held
        st, _, _ = s.call("GET", "/v1/images/probe", timeout=5)
        assert st == 200
        assert any("--max-connections-per-client" in line for line in s.d.lines), s.d.lines[-5:]
    finally:
        for c in socks:
            c.close()
    # the server lets go of them too, in bounded time
    deadline = time.monotonic() + 5
    while metric(s, "qcowd_http_connections") > 4:
        assert time.monotonic() < deadline, "qcowd still holds %d connections" % metric(s, "qcowd_http_connections")
        time.sleep(0.1)
    took = time.monotonic() - t0
    print("   socket_flood: 1100 sockets from %s opened and closed in %.1f s, %d kept by qcowd at most" %
          (FLOOD_ADDR, took, held))
    assert took < 30, "the flood took %.0f s" % took


def metric(s, name):
    """The value of the metric line that starts with name (the first one)."""
    st, _, data = s.call("GET", "/metrics", timeout=5)
    assert st == 200, st
    for line in data.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no metric %s" % name)


def slow_headers(s):
    """Headers sent a byte at a time: 408 naming --header-timeout and closed,
    after the deadline, however busy the sender looks."""
    tight(s)
    c = raw(s)
    try:
        c.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n")
        t0 = time.monotonic()
        answered = None
        while time.monotonic() - t0 < 8:
            try:
                c.sendall(b"X")
            except OSError:
                break
            c.settimeout(0.3)
            try:
                data = c.recv(65536)
                answered = data
                break
            except socket.timeout:
                continue
        took = time.monotonic() - t0
        assert answered is not None, "still open after %.1f s" % took
        assert 1.5 < took < 4.5, "cut after %.1f s (deadline 2 s)" % took
        assert answered.startswith(b"HTTP/1.1 408"), answered[:100]
        names_budget(json.loads(answered.split(b"\r\n\r\n", 1)[1]), "--header-timeout")
    finally:
        c.close()
    # an idle socket that never says a word goes too
    c = raw(s)
    try:
        assert closed_within(c, 5), "an idle connection outlived --header-timeout"
    finally:
        c.close()
    assert metric(s, 'qcowd_http_connections_cut_total{budget="header-timeout"}') >= 2


# ---- uploads ----

def trickle_upload(s):
    """An upload that trickles after a valid header is cut below --min-rate,
    with a 408 naming it; no temporary file stays."""
    tight(s)
    head = qcow2_file(s, "trickle", "1M")[:4096]
    c = raw(s)
    try:
        c.sendall(b"PUT /v1/images/trickle/file HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (8 * MiB)
                  + head)
        t0 = time.monotonic()
        cut = None
        while time.monotonic() - t0 < 10:
            try:
                c.sendall(b"\0")
            except OSError:
                cut = b""
                break
            c.settimeout(0.25)
            try:
                cut = c.recv(65536)
                break
            except socket.timeout:
                continue
        took = time.monotonic() - t0
        assert cut is not None, "the trickle was still taken after %.1f s" % took
        assert took < 6, "cut after %.1f s" % took
        if cut:
            assert cut.startswith(b"HTTP/1.1 408"), cut[:100]
            names_budget(json.loads(cut.split(b"\r\n\r\n", 1)[1]), "--min-rate")
    finally:
        c.close()
    time.sleep(0.3)
    assert not temporaries(s), temporaries(s)
    s.error("GET", "/v1/images/trickle", 404)


def not_qcow2_at_once(s):
    """1 GiB announced, 4 KiB sent, not qcow2: 422 before the rest is sent."""
    defaults(s)
    c = raw(s)
    try:
        t0 = time.monotonic()
        c.sendall(b"PUT /v1/images/junk/file HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (1 << 30)
                  + b"\x7fELF" + b"\0" * 4092)
        st, j = read_answer(c, 2)
        assert st == 422, st
        assert "qcow2 magic" in j["error"]["message"], j
        assert time.monotonic() - t0 < 1.5
    finally:
        c.close()
    # a header whose disk is over --max-virtual-size: refused on its first bytes too
    hdr = b"QFI\xfb" + struct.pack(">IQIIQ", 3, 0, 0, 16, 1 << 50)
    c = raw(s)
    try:
        c.sendall(b"PUT /v1/images/huge/file HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (1 << 30)
                  + hdr + b"\0" * 4000)
        st, j = read_answer(c, 2)
        assert st == 422, st
        names_budget(j, "--max-virtual-size")
    finally:
        c.close()
    time.sleep(0.3)
    assert not temporaries(s), temporaries(s)


def upload_caps(s):
    """Content-Length over --max-upload: 413 before a byte is stored; an image
    that would take the catalog past --max-catalog: 507."""
    tight(s)
    body = qcow2_file(s, "big", "64M", fill="40M")
    assert len(body) > 32 * MiB
    st, j = put_head(s, "big", body)
    assert st == 413, st
    names_budget(j, "--max-upload")
    assert not temporaries(s), temporaries(s)
    # without a Content-Length (chunked), cut as it passes the cap, answered at once
    c = raw(s)
    try:
        c.sendall(b"PUT /v1/images/big/file HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent = 0
        try:
            while sent < len(body):
                piece = body[sent:sent + MiB]
                c.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                sent += len(piece)
        except OSError:
            pass
        st, j = read_answer(c, 5)
        assert st == 413, st
        names_budget(j, "--max-upload")
        # what the client got rid of includes what loopback's socket buffers took
        # (several MiB) after qcowd stopped reading at the cap, but never the body
        assert sent <= 28 * MiB, "%d bytes were taken" % sent
    finally:
        c.close()
    time.sleep(0.2)
    assert not temporaries(s), temporaries(s)
    defaults(s, "--max-catalog", "8M")
    small = qcow2_file(s, "small", "16M", fill="5M")
    st, j = put_head(s, "small", small)
    assert st == 507, st
    names_budget(j, "--max-catalog")
    assert not temporaries(s), temporaries(s)
    s.error("GET", "/v1/images/small", 404)
    # a catalog past its cap takes no new image: create and convert are 507 too
    defaults(s, "--max-catalog", "1M")
    msg = s.error("POST", "/v1/images", 507, body=json.dumps({"name": "more", "size": 1 << 20}),
                  headers={"Content-Type": "application/json"})
    assert "--max-catalog" in msg, msg
    msg = s.error("POST", "/v1/images/probe/convert", 507, body=json.dumps({"target": "copy"}),
                  headers={"Content-Type": "application/json"})
    assert "--max-catalog" in msg, msg
    # under the cap an upload goes through
    defaults(s, "--max-catalog", "64M")
    st, _, data = s.call("PUT", "/v1/images/small/file", body=small)
    assert st == 201, (st, data[:200])
    s.call("DELETE", "/v1/images/small")


def put_head(s, name, body):
    """PUT .../file announcing body's length and sending its first 64 KiB: the
    answer a budget gives on the headers (the rest is never sent)."""
    c = raw(s)
    try:
        c.sendall(b"PUT /v1/images/%s/file HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
                  % (name.encode(), len(body)))
        try:
            c.sendall(body[:64 * KiB])
        except OSError:
            pass
        return read_answer(c, 3)
    finally:
        c.close()


def virtual_size(s):
    """A create over --max-virtual-size (default 64 TiB) is 400 naming it."""
    defaults(s)
    msg = s.error("POST", "/v1/images", 400, body=json.dumps({"name": "vast", "size": 1 << 47}),
                  headers={"Content-Type": "application/json"})
    assert "--max-virtual-size" in msg, msg
    s.error("GET", "/v1/images/vast", 404)


def create_outside_lock(s):
    """A preallocating create holds nothing back: not the other creates (the
    create lock), not the only server thread (--threads 1: it runs on a thread
    of its own), not the prober."""
    defaults(s, "--threads", "1")
    # the preallocating create must last long enough to be met by the other one:
    # a larger disk (more metadata written) until it does
    for size in (64 << 30, 256 << 30, 1 << 40):
        done = {}

        def big():
            t0 = time.monotonic()
            done["big"] = s.call("POST", "/v1/images", body=json.dumps(
                {"name": "prealloc", "size": size, "preallocation": "metadata"}),
                headers={"Content-Type": "application/json"})[0]
            done["big_s"] = time.monotonic() - t0

        t = threading.Thread(target=big)
        t.start()
        time.sleep(0.15)
        t0 = time.monotonic()
        st, _, data = s.call("POST", "/v1/images", body=json.dumps({"name": "quick", "size": 1 << 20}),
                             headers={"Content-Type": "application/json"})
        quick = time.monotonic() - t0
        t.join(120)
        assert st == 201, (st, data)
        assert done.get("big") == 201, done
        print("   create_outside_lock: preallocating create of %d GiB %.2f s, another create meanwhile %.3f s" %
              (size >> 30, done["big_s"], quick))
        if done["big_s"] > 0.3 or size == 1 << 40:
            break
        for n in ("prealloc", "quick"):
            s.call("DELETE", "/v1/images/" + n)
    assert done["big_s"] > 0.3 and quick < done["big_s"] / 4, "the quick create waited %.2f s" % quick
    # its failures answer as before
    msg = s.error("POST", "/v1/images", 409, body=json.dumps(
        {"name": "quick", "size": 1 << 30, "preallocation": "metadata"}), headers={"Content-Type": "application/json"})
    assert "quick" in msg, msg
    for n in ("prealloc", "quick"):
        s.call("DELETE", "/v1/images/" + n)


# ---- downloads ----

def stalled_download(s):
    """GET .../file that never reads holds writers off only until --min-rate
    cuts it; then a write to the image succeeds."""
    tight(s)
    body = qcow2_file(s, "held", "64M", fill="48M")  # far more than the sockets buffer
    with open(s.path("held"), "wb") as f:
        f.write(body)
    c = raw(s, rcvbuf=4096)
    try:
        c.sendall(b"GET /v1/images/held/file HTTP/1.1\r\nHost: localhost\r\n\r\n")
        c.recv(100)  # the answer started; then nothing more is read
        time.sleep(0.3)
        put = {"body": b"\x11" * 4096, "headers": {"Content-Range": "bytes 0-4095/*"}}
        st, _, data = s.call("PUT", "/v1/images/held/data", **put)
        assert st == 409 and b"downloaded" in data, (st, data[:200])
        t0 = time.monotonic()
        while True:
            st, _, data = s.call("PUT", "/v1/images/held/data", **put)
            if st == 204:
                break
            assert st == 409, (st, data[:200])
            assert time.monotonic() - t0 < 8, "writers still held off after %.1f s" % (time.monotonic() - t0)
            time.sleep(0.2)
        print("   stalled_download: the write went through %.1f s after the reader stalled" %
              (time.monotonic() - t0 + 0.3))
        assert any("download below --min-rate" in line for line in s.d.lines), s.d.lines[-5:]
    finally:
        c.close()
    s.call("DELETE", "/v1/images/held")


# ---- jobs and events ----

def job_queue(s):
    """A slow PUT holds its image, not a job worker: a job waiting for the image
    leaves the only worker to others; jobs behind it fill --max-queued-jobs and
    the next is 503 with Retry-After naming it."""
    tight(s)
    for n in ("jq", "other"):
        st, _, _ = s.call("POST", "/v1/images", body=json.dumps({"name": n, "size": 1 << 20}),
                          headers={"Content-Type": "application/json"})
        assert st == 201
    slow = raw(s)
    jobs = []
    try:
        slow.sendall(b"PUT /v1/images/jq/data HTTP/1.1\r\nHost: localhost\r\nContent-Range: bytes 0-65535/*\r\n"
                     b"Content-Length: 65536\r\n\r\n" + b"\1" * 1000)
        time.sleep(0.3)

        def snap(i):
            return s.call("POST", "/v1/images/jq/snapshots", body=json.dumps({"name": "s%d" % i}),
                          headers={"Content-Type": "application/json"})

        st, _, data = snap(0)  # takes the worker, finds jq written, waits off it
        assert st == 202, (st, data)
        jobs.append(json.loads(data)["id"])
        t0 = time.monotonic()
        st, _, data = s.call("POST", "/v1/images/other/check", body=b"{}",
                             headers={"Content-Type": "application/json"})
        assert st == 202, (st, data)
        other = json.loads(data)["id"]
        while True:
            st, _, data = s.call("GET", "/v1/jobs/" + other)
            if json.loads(data)["status"] == "concluded":
                break
            assert time.monotonic() - t0 < 1.5, "the worker is held: %s" % data
            time.sleep(0.05)
        for i in (1, 2):
            st, _, data = snap(i)
            assert st == 202, (st, data)
            jobs.append(json.loads(data)["id"])
        st, hdrs, data = snap(3)
        assert st == 503, (st, data)
        assert "retry-after" in hdrs, hdrs
        names_budget(json.loads(data), "--max-queued-jobs")
        slow.sendall(b"\1" * (65536 - 1000))
        st, _ = read_answer(slow, 5)
        assert st == 204, st
    finally:
        slow.close()
    t0 = time.monotonic()
    for j in jobs:
        while True:
            st, _, data = s.call("GET", "/v1/jobs/" + j)
            o = json.loads(data)
            if o["status"] == "concluded":
                assert o["error"] is None, o
                break
            assert time.monotonic() - t0 < 20, o
            time.sleep(0.05)
    for n in ("jq", "other"):
        s.call("DELETE", "/v1/images/" + n)


def listeners_per_client(s):
    """--max-listeners-per-client event streams from one address; the next is 503
    naming it; another address still listens."""
    tight(s)
    streams = []
    try:
        for _ in range(2):
            c = raw(s, "127.0.0.4")
            c.sendall(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert c.recv(4096).startswith(b"HTTP/1.1 200"), "no stream"
            streams.append(c)
        c = raw(s, "127.0.0.4")
        streams.append(c)
        c.sendall(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        st, j = read_answer(c, 3)
        assert st == 503, st
        names_budget(j, "--max-listeners-per-client")
        c = raw(s, "127.0.0.5")
        streams.append(c)
        c.sendall(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert c.recv(4096).startswith(b"HTTP/1.1 200"), "another address is refused"
    finally:
        for c in streams:  # abortive closes: the next keepalive finds them gone
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
    # the count goes down as streams end (a sleeping stream notices its client
    # went away at the next keepalive, every 5 s)
    t0 = time.monotonic()
    while True:
        c = raw(s, "127.0.0.4")
        try:
            c.sendall(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            if c.recv(4096).startswith(b"HTTP/1.1 200"):
                break
        finally:
            c.close()
        assert time.monotonic() - t0 < 8, "the closed streams are still counted"
        time.sleep(0.5)


def open_images(s):
    """--max-open-images bounds the open images the catalog keeps."""
    defaults(s, "--max-open-images", "2")
    names = ["open%d" % i for i in range(6)]
    for n in names:
        st, _, _ = s.call("POST", "/v1/images", body=json.dumps({"name": n, "size": 1 << 20}),
                          headers={"Content-Type": "application/json"})
        assert st == 201
    for n in names:
        st, _, _ = s.call("GET", "/v1/images/" + n)
        assert st == 200
    held = metric(s, "qcowd_open_images")
    assert held <= 3, "%d images open (2 cached, the prober's in use)" % held
    for n in names:
        s.call("DELETE", "/v1/images/" + n)


# ---- a crash's leftovers ----

def stale_temporaries(s):
    """.convert-, .create- and .upload- temporaries of a dead daemon are removed
    at the next start."""
    old = time.time() - 3 * 24 * 3600
    made = []
    for kind in ("convert", "create", "upload"):
        p = os.path.join(s.cat, ".%s-x@elsewhere-4242-1.tmp" % kind)
        with open(p, "wb") as f:
            f.write(b"half")
        os.utime(p, (old, old))
        made.append(p)
    defaults(s)
    left = [p for p in made if os.path.exists(p)]
    assert not left, left
    assert any(".convert-x@" in line for line in s.d.lines), s.d.lines[-5:]


def restore(s):
    """The next modules' cases run on a qcowd with the default budgets."""
    defaults(s)


CASES = [("socket_flood", socket_flood), ("slow_headers", slow_headers), ("trickle_upload", trickle_upload),
         ("not_qcow2_at_once", not_qcow2_at_once), ("upload_caps", upload_caps),
         ("stalled_download", stalled_download), ("job_queue", job_queue),
         ("listeners_per_client", listeners_per_client), ("virtual_size", virtual_size),
         ("create_outside_lock", create_outside_lock), ("open_images", open_images),
         ("stale_temporaries", stale_temporaries),
         ("budgets_restore", restore)]
