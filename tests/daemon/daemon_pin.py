#!/usr/bin/python3
"""daemon_pin.py: ranged reads the kernel sends straight from the image file
(sendfile) stay correct while writers free and reuse clusters under them.

A read of one run of plain data is answered from the image file by the kernel
after qcowd has let go of the image's lock; the run is pinned until the answer
is sent, and a cluster freed meanwhile is neither reused nor deallocated until
no pin can still read it. These cases prove it from the outside:

  reuse       readers GET cluster-sized and multi-cluster ranges (half of them on
              keep-alive connections, half reading slowly through a small receive
              buffer, so the kernel is still sending when writers act) while
              writers discard clusters and write others (so
              freed clusters are reallocated at once); every 8-byte word a reader
              gets names the guest cluster it belongs to (or is zero, a racing
              discard): a word of another cluster is data served from a reused
              cluster. The metrics show the kernel sent most answers; then
              SIGTERM, exit 0, qemu-img check clean, the disk equals the model.
  stalled     a reader asks for 8 MiB of contiguous clusters and stops reading
              after 4 KiB, so most of the answer is not sent yet; meanwhile the
              cluster it is reading is overwritten, the guest cluster near its end
              is discarded and a new cluster written (the allocator's first free
              cluster is the one just freed): once the reader goes on, it gets
              the old bytes, never a mix of two writes or another cluster's data
  let go      once the readers are done, a freed cluster is reused again: the
              file does not grow while clusters are discarded and others written
              (a pin that is never let go would keep every freed cluster unused).
  killed      the same load on a restarted qcowd, then SIGKILL: qemu-img check finds
              no corruption (leaks at most) and no cluster holds another's data
  no sendfile --sendfile no copies every answer (the counter stays 0); a bad value
              is refused with exit 2

Images: 64 KiB clusters, and extended L2 with 128 KiB clusters.
Environment: QCOWD, QEMU_IMG (as daemon.py); SECONDS_LOAD (default 6).
"""

import array
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import daemon as base  # noqa: E402

KiB = base.KiB
MiB = base.MiB

IMAGES = [("p64k", 64 * KiB, []), ("pext", 128 * KiB, ["-o", "extended_l2=on,cluster_size=128k"])]
STALL_CS = 64 * KiB
STALL_RUN = 128  # clusters the stalled reader asks for (8 MiB: more than a socket buffer holds)
CLUSTERS = 96  # guest clusters per image
READERS = 12
LOAD_SECONDS = float(os.environ.get("SECONDS_LOAD", "6"))


def pattern(k, gen, cs):
    """Cluster k's bytes at generation gen: 8-byte words (k+1, gen)."""
    return struct.pack("<II", k + 1, gen) * (cs // 8)


def bad_words(data, first_cluster, cs):
    """Clusters of data (read from cluster first_cluster on) holding words that
    name another cluster. (A racing discard or rewrite may leave zeroes or mix
    generations; cluster indexes stay below 256, so a torn word cannot forge one.)"""
    a = array.array("I")
    a.frombytes(data)
    per = cs // 4
    bad = []
    for i in range(0, len(a), per):
        k = first_cluster + i // per
        idx = set(a[i:i + per:2])
        if not idx <= {0, k + 1}:
            bad.append((k, sorted(idx - {0, k + 1})[:4]))
    return bad


def slow_get(port, path, first, last):
    """GET a range on a socket with a small receive buffer, read a little at a
    time: the answer takes tens of milliseconds to send, so writers run while
    the kernel is still sending it. Returns (status, body)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(60)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(("GET %s HTTP/1.1\r\nHost: localhost\r\nRange: bytes=%d-%d\r\nConnection: close\r\n\r\n"
                   % (path, first, last)).encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise AssertionError("GET %s: connection closed in the headers" % path)
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(ln.split(":", 1)[1]) for ln in lines if ln.lower().startswith("content-length:"))
        parts = [body]
        got = len(body)
        while got < length:
            chunk = s.recv(4096)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
            time.sleep(0.0005)
        return status, b"".join(parts)
    finally:
        s.close()


def metric(d, name):
    st, h, b = d.request("GET", "/metrics")
    assert st == 200, st
    for line in b.decode().splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise AssertionError("no metric %s" % name)


def main():
    args, top, cat = base.qcowd.prologue("qcowd-pin-", tools=(base.QEMU_IMG,))
    ck = base.Checker(args)
    rng = ck.rng

    def p(name):
        return os.path.join(cat, name + ".qcow2")

    base.run(base.QEMU_IMG, "create", "-q", "-f", "qcow2", p("stall"), str(4 * STALL_RUN * STALL_CS))
    models = {}  # name -> [gen or 0 per cluster]
    for name, cs, opts in IMAGES:
        base.run(base.QEMU_IMG, "create", "-q", "-f", "qcow2", *opts, p(name), str(CLUSTERS * cs))
        models[name] = [0] * CLUSTERS
    d = base.Daemon(cat, threads=8)

    def put(conn, name, k, gen, cs):
        body = pattern(k, gen, cs)
        conn.request("PUT", "/v1/images/%s/data" % name, body=body,
                     headers={"Content-Range": "bytes %d-%d/*" % (k * cs, (k + 1) * cs - 1)})
        r = conn.getresponse()
        r.read()
        assert r.status == 204, (name, k, r.status)

    def discard(conn, name, k, cs):
        body = '{"op":"discard","offset":%d,"size":%d}' % (k * cs, cs)
        conn.request("PATCH", "/v1/images/%s/data" % name, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 204, (name, k, r.status)

    def fill():
        for name, cs, _ in IMAGES:
            c = d.conn()
            for k in range(CLUSTERS):
                put(c, name, k, 1, cs)
                models[name][k] = 1
            c.close()

    def load(d, seconds, kill=False):
        """Readers and writers on d for seconds (then SIGKILL d when kill);
        returns (reads checked, answers sent by the kernel)."""
        stop = threading.Event()
        errors, reads = [], [0]
        lock = threading.Lock()

        def reader(seed, slow):
            r = random.Random(seed)
            c = d.conn()
            try:
                while not stop.is_set():
                    name, cs, _ = r.choice(IMAGES)
                    n = r.choice([1, 1, 2, 4])
                    k = r.randrange(CLUSTERS - n + 1)
                    path, first, last = "/v1/images/%s/data" % name, k * cs, (k + n) * cs - 1
                    if slow:
                        status, body = slow_get(d.port, path, first, last)
                    else:
                        c.request("GET", path, headers={"Range": "bytes=%d-%d" % (first, last)})
                        resp = c.getresponse()
                        status, body = resp.status, resp.read()
                    if status != 206 or len(body) != n * cs:
                        raise AssertionError("GET %s clusters %d+%d: %d, %d bytes" % (name, k, n, status,
                                                                                      len(body)))
                    bad = bad_words(body, k, cs)
                    if bad:
                        raise AssertionError("GET %s clusters %d+%d: bytes of another cluster: %s" % (name, k, n,
                                                                                                     bad[:3]))
                    with lock:
                        reads[0] += 1
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(e)
                stop.set()
            finally:
                c.close()

        def writer(name, cs, seed):
            r = random.Random(seed)
            c = d.conn()
            gen = 1
            try:
                while not stop.is_set():
                    m = models[name]
                    live = [k for k in range(CLUSTERS) if m[k]]
                    gone = [k for k in range(CLUSTERS) if not m[k]]
                    if live and (not gone or r.random() < 0.5):
                        k = r.choice(live)
                        discard(c, name, k, cs)
                        m[k] = 0
                    if gone:
                        gen += 1
                        k = r.choice(gone)  # a new allocation: takes the first free cluster
                        put(c, name, k, gen, cs)
                        m[k] = gen
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                stop.set()
            finally:
                c.close()

        sent0 = metric(d, "qcowd_http_sendfile_responses_total")
        threads = [threading.Thread(target=reader, args=(rng.random(), i % 2 == 0)) for i in range(READERS)]
        threads += [threading.Thread(target=writer, args=(name, cs, rng.random())) for name, cs, _ in IMAGES]
        for t in threads:
            t.start()
        stop.wait(seconds)
        if kill:
            d.proc.kill()
            d.proc.wait(30)
        stop.set()
        for t in threads:
            t.join(120)
        if kill:
            return reads[0], 0  # the connections broke: errors are expected
        if errors:
            raise errors[0]
        return reads[0], metric(d, "qcowd_http_sendfile_responses_total") - sent0

    def reuse():
        n, sent = load(d, LOAD_SECONDS)
        reads = [n]
        print("  %d reads checked, %d sent by the kernel" % (reads[0], sent))
        assert reads[0] >= 100, reads[0]
        assert sent >= reads[0] // 4, "only %d of %d reads went through sendfile" % (sent, reads[0])
        # the disk is the model: every cluster read back whole
        c = d.conn()
        for name, cs, _ in IMAGES:
            for k in range(CLUSTERS):
                c.request("GET", "/v1/images/%s/data" % name, headers={"Range": "bytes=%d-%d" % (k * cs,
                                                                                                (k + 1) * cs - 1)})
                resp = c.getresponse()
                body = resp.read()
                want = pattern(k, models[name][k], cs) if models[name][k] else bytes(cs)
                assert body == want, "%s cluster %d is not generation %d" % (name, k, models[name][k])
        c.close()

    def stalled():
        cs, victim, newk = STALL_CS, STALL_RUN - 2, 3 * STALL_RUN
        c = d.conn()
        for k in range(STALL_RUN):
            put(c, "stall", k, 1, cs)
        sent0 = metric(d, "qcowd_http_sendfile_responses_total")
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(60)
        s.connect(("127.0.0.1", d.port))
        s.sendall(("GET /v1/images/stall/data HTTP/1.1\r\nHost: localhost\r\nRange: bytes=0-%d\r\n"
                   "Connection: close\r\n\r\n" % (STALL_RUN * cs - 1)).encode())
        buf = b""
        while b"\r\n\r\n" not in buf or len(buf.split(b"\r\n\r\n", 1)[1]) < 4096:
            chunk = s.recv(4096)
            assert chunk, "connection closed early"
            buf += chunk
        time.sleep(0.2)  # qcowd has handed the kernel what fits; the rest waits
        put(c, "stall", 0, 3, cs)  # over the cluster the reader is in the middle of
        discard(c, "stall", victim, cs)
        put(c, "stall", newk, 2, cs)  # flushes: the freed cluster is free now
        put(c, "stall", newk + 1, 2, cs)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        s.close()
        head, body = buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 206"), head[:100]
        assert len(body) == STALL_RUN * cs, len(body)
        bad = bad_words(body, 0, cs)
        assert not bad, "the stalled answer carries bytes of another cluster: %s" % bad[:3]
        assert body[:cs] in (pattern(0, 1, cs), pattern(0, 3, cs)), "cluster 0 mixes two writes (torn read)"

        assert metric(d, "qcowd_http_sendfile_responses_total") == sent0 + 1, "the answer was not sent by sendfile"
        for k, want in ((0, pattern(0, 3, cs)), (victim, bytes(cs)), (newk, pattern(newk, 2, cs)),
                        (newk + 1, pattern(newk + 1, 2, cs))):
            c.request("GET", "/v1/images/stall/data", headers={"Range": "bytes=%d-%d" % (k * cs, (k + 1) * cs - 1)})
            r = c.getresponse()
            assert r.read() == want, "cluster %d after the stall" % k
        c.close()

    def let_go():
        c = d.conn()
        for name, cs, _ in IMAGES:
            m = models[name]
            # settle: a flush applies the frees still pending, an allocation drains
            c.request("PATCH", "/v1/images/%s/data" % name, body='{"op":"flush"}',
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            assert r.status == 204, r.status
            for _ in range(3):
                k = next(k for k in range(CLUSTERS) if m[k])
                discard(c, name, k, cs)
                m[k] = 0
                put(c, name, k, 99, cs)
                m[k] = 99
            size0 = os.path.getsize(p(name))
            for i in range(24):
                live = [k for k in range(CLUSTERS) if m[k]]
                gone = [k for k in range(CLUSTERS) if not m[k]]
                k = live[i % len(live)]
                discard(c, name, k, cs)
                m[k] = 0
                j = gone[i % len(gone)] if gone else k
                put(c, name, j, 100 + i, cs)
                m[j] = 100 + i
            grew = (os.path.getsize(p(name)) - size0) // cs
            assert grew <= 2, "%s grew by %d clusters while freed ones should be reused" % (name, grew)
        c.close()

    def stop_check():
        d.stop_clean(90)
        for name, cs, _ in IMAGES:
            base.run(base.QEMU_IMG, "check", "-q", p(name))
            raw = os.path.join(top, name + ".raw")
            base.run(base.QEMU_IMG, "convert", "-O", "raw", p(name), raw)
            with open(raw, "rb") as f:
                for k in range(CLUSTERS):
                    g = models[name][k]
                    got = f.read(cs)
                    assert got == (pattern(k, g, cs) if g else bytes(cs)), "%s cluster %d after stop" % (name, k)

    def killed():
        d2 = base.Daemon(cat, threads=8)
        try:
            load(d2, 1.5, kill=True)
        finally:
            if d2.alive():
                d2.proc.kill()
        for name, cs, _ in IMAGES:
            r = subprocess.run([base.QEMU_IMG, "check", p(name)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            out = r.stdout.decode(errors="replace")
            assert r.returncode in (0, 3), "%s after SIGKILL: qemu-img check exit %d: %s" % (name, r.returncode,
                                                                                            out[-400:])
            raw = os.path.join(top, name + ".raw")
            base.run(base.QEMU_IMG, "convert", "-O", "raw", p(name), raw)
            with open(raw, "rb") as f:
                bad = bad_words(f.read(CLUSTERS * cs), 0, cs)
            assert not bad, "%s after SIGKILL: clusters with another cluster's data: %s" % (name, bad[:3])

    def sendfile_off():
        d3 = base.Daemon(cat, threads=2, extra=["--sendfile", "no"])
        try:
            cs = IMAGES[0][1]
            st, h, body = d3.request("GET", "/v1/images/%s/data" % IMAGES[0][0], {"Range": "bytes=0-%d" % (4 * cs - 1)})
            assert st == 206 and len(body) == 4 * cs, st
            assert not bad_words(body, 0, cs)
            assert metric(d3, "qcowd_http_sendfile_responses_total") == 0, "--sendfile no still sent from the file"
        finally:
            d3.proc.kill()
            d3.proc.wait(30)
        r = subprocess.run([base.QCOWD, "--sendfile", "maybe"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert r.returncode == 2 and b"--sendfile wants yes or no" in r.stderr, (r.returncode, r.stderr)
        ck.bad_inputs += 1

    try:
        ck.case("fill", fill)
        ck.case("reuse", reuse)
        ck.case("stalled", stalled)
        ck.case("let go", let_go)
        ck.case("stop, check, compare", stop_check)
        ck.case("killed under load", killed)
        ck.case("sendfile=no copies", sendfile_off)
    finally:
        d.kill()
        base.qcowd.remove_temp(top, args.keep)
    return ck.report()


if __name__ == "__main__":
    sys.exit(main())
