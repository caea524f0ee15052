#!/usr/bin/python3
"""daemon_robust.py: proves qcowd holds up under many clients and odd conditions.

  config      --config FILE: settings as "key = value" (threads shows as max_readers),
              the command line wins; unknown keys, bad flag values, missing values,
              bad values, keys that are not settings, a missing file: exit 2 naming
              the file and line
  stale tmp   temporary files of an interrupted create/upload are removed at
              start-up with a log line: this host's whose process is gone, and
              any host's not changed for a day; a live process's, another
              host's and those without a host are kept while recent
  keep-alive  GETs on one connection reuse it (no "Connection: close")
  download    GET .../file is one consistent container: writes while it streams
              answer 409, the bytes equal the file before, writes work after it
  change      a file changed behind qcowd's back is noticed: in place within the
              same second (nanosecond mtime), and replaced by a file of the same
              size and mtime (inode)
  upload cut  a client that closes in the middle of PUT .../file: the temporary
              file is removed, nothing is listed, the daemon stays up; a huge or
              malformed Content-Length too
  64 clients  64 clients on keep-alive connections write and read 4 images at once:
              each owns some blocks (unaligned writes, zero, read back exactly) and
              all share others, where the test serialises each block with a lock (so
              the model is exact); then SIGTERM, exit 0, qemu-img check clean and
              qemu-img compare equal to the model
Environment and output as daemon.py (QCOWD, OPENAPI, QEMU_IMG, QEMU_IO).
QCOWD_S3=1 runs the cases with the catalog in a bucket of a local Swift + s3api
(daemon.py's s3_start; exit 77 without Swift): images are built locally and
uploaded, checks of the files read the bucket's keys (temporary objects, stale
ones put there with the S3 API) and the plugin's staging folder (a cut upload
leaves no staging file), the config file also names the bucket, the endpoint
and an --s3-opt, the 64 clients do 15 operations each (every flush publishes an
image), and qemu-img checks run on copies fetched from the bucket. The change
case becomes object_changes_noticed_by_etag: an object replaced by one of the
same size (Last-Modified has whole seconds, there are no inodes) is noticed.
"""

import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import daemon as base  # noqa: E402

KiB = base.KiB
MiB = base.MiB
run = base.run

CLIENTS = 64
IMAGES = [("m64k", []), ("m4k", ["-o", "cluster_size=4096"]),
          ("mext", ["-o", "extended_l2=on,cluster_size=128k"]), ("mlazy", ["-o", "lazy_refcounts=on"])]
IMG_SIZE = 8 * MiB
BLOCK = 64 * KiB
OWN_PER_CLIENT = 2    # blocks each client owns in its image
SHARED = 8            # blocks of each image every client of it may write
OPS = 30              # operations per client
if os.environ.get("QCOWD_S3"):  # a flush publishes the whole image to Swift: fewer rounds
    OPS = 15


def qemu_img(*a):
    return run(base.QEMU_IMG, *a)


def start_fails(args, want):
    """qcowd with args must exit 2 at once, its stderr matching the regex want."""
    r = subprocess.run([base.QCOWD] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2, "%s: exit %d, want 2 (%s)" % (args, r.returncode, err)
    assert re.search(want, err), "%s: stderr %r does not match %r" % (args, err, want)


def http_raw(port, data, read=True):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while True:
            try:
                k = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not k:
                break
            out += k
            hdr, sep, rest = out.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length: *(\d+)", hdr)
            if sep and m and len(rest) >= int(m.group(1)):
                break
        return out
    finally:
        s.close()


def main():
    args, top, cat = base.qcowd.prologue("qcowd-robust-")
    ck = base.Checker(args)
    daemons = []

    def p(name):
        return os.path.join(cat, name + ".qcow2")

    def publish(*names):
        """Images built or changed locally in the catalog folder: with QCOWD_S3, put
        into the bucket."""
        if base.S3:
            for n in names:
                base.store_put(cat, p(n), n + ".qcow2")

    def put_file(f, data):
        """A file of the catalog (an object with QCOWD_S3) holding data."""
        if base.S3:
            base.S3.put(base.S3_BUCKET, base.S3_PREFIX + "/" + f, data)
        else:
            with open(os.path.join(cat, f), "wb") as fh:
                fh.write(data)

    def temps():
        return [f for f in base.store_names(cat) if f.endswith(".tmp")]

    def staging():
        """The s3 plugin's staging files (a .data and a .meta per object open for writing)."""
        sd = os.path.join(top, "staging")
        return sorted(os.listdir(sd)) if base.S3 and os.path.isdir(sd) else []

    def catalog_args():
        """The catalog on qcowd's command line (or in its config file)."""
        if base.S3:
            return base.S3.qcowd_args(base.S3_BUCKET, base.S3_PREFIX, os.path.join(top, "staging"), *base.S3_OPTS)
        return ["--catalog", cat]

    def start(*extra, threads=8):
        d = base.Daemon(cat, threads=threads, extra=list(extra))
        daemons.append(d)
        return d

    def stop(d):
        d.stop_clean(90)

    def signal_handler(sig, frame):
        for d in daemons:
            if d.alive():
                d.proc.kill()
        base.s3_stop()
        shutil.rmtree(top, ignore_errors=True)
        sys.exit(1)
    signal.signal(signal.SIGTERM, signal_handler)
    signal.signal(signal.SIGINT, signal_handler)

    try:
        base.s3_start(top)
        qemu_img("create", "-q", "-f", "qcow2", p("small"), "4M")
        base.qemu_io(p("small"), "write -q -P 0x42 0 1M")
        publish("small")

        def config():
            conf = os.path.join(top, "q.conf")
            with open(conf, "w") as f:
                f.write("# settings\n\n  threads = 3  \nquiet = false\n")
            d = start("--config", conf, threads=5)  # --threads 5 comes before --config: still the command line
            st, h, b = d.request("OPTIONS", "/v1/images/small/data")
            assert st == 200 and json.loads(b)["max_readers"] == 5, (st, b)
            stop(d)
            # the file alone sets the pool size (the Daemon's own --threads left out)
            ca = catalog_args()
            with open(conf, "w") as f:  # --catalog s3://... --s3-endpoint ... --s3-opt staging-dir=...
                f.write("listen = 127.0.0.1:0\nthreads = 3\njob-workers = 1\nquiet\n" +
                        "".join("%s = %s\n" % (ca[i][2:], ca[i + 1]) for i in range(0, len(ca), 2)))
            proc = subprocess.Popen([base.QCOWD, "--config", conf], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env=base.S3.env() if base.S3 else None)
            line = proc.stderr.readline().decode()
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)/ \(catalog .*, 3 threads\)", line)
            try:
                assert m, line
                c = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=30)
                c.request("OPTIONS", "/v1/images/small/data")
                assert json.loads(c.getresponse().read())["max_readers"] == 3
                c.close()
                # the main thread (waiting for signals), a pool of 3 HTTP threads,
                # 1 job worker and the event bus's ticker (TSan's runtime adds one);
                # on S3 the plugin's sweep of stale uploads has a timer thread, and a
                # read-ahead worker may have started
                tasks = len(os.listdir("/proc/%d/task" % proc.pid))
                hi = 7 + (2 if base.S3 else 0)
                assert 6 <= tasks <= hi, "%d threads, want 1 + a pool of 3 + 1 job worker + 1 ticker%s" % (
                    tasks, " + the S3 sweep's timer" if base.S3 else "")
            finally:
                proc.send_signal(signal.SIGTERM)
                rest = proc.communicate(timeout=60)[1].decode()
            assert proc.returncode == 0, rest
            assert "GET" not in rest and "OPTIONS" not in rest, "quiet = true from the file was ignored: " + rest
            cases = [
                ("threads = 4\nbogus = 1\n", r"q\.conf:2: unknown key 'bogus'"),
                ("quiet = maybe\n", r"q\.conf:1: quiet takes true or false"),
                ("listen =\n", r"q\.conf:1: listen needs a value"),
                ("\n\nthreads = 0\n", r"--threads must be 1\.\.1024\n.*set in .*q\.conf, line 3"),
                ("threads = many\n", r"set in .*q\.conf, line 1"),
                ("help\n", r"q\.conf:1: unknown key 'help'"),
                ("config = other.conf\n", r"q\.conf:1: unknown key 'config'"),
                ("= 5\n", r"q\.conf:1: unknown key ''"),
                ("thread = 5\n", r"q\.conf:1: unknown key 'thread'"),
            ]
            for text, want in cases:
                with open(conf, "w") as f:
                    f.write(text)
                start_fails(["--config", conf] + catalog_args(), want)
                ck.bad_inputs += 1
            start_fails(["--config", os.path.join(top, "missing.conf")], r"missing\.conf: No such file")
            ck.bad_inputs += 1
        ck.case("config_file_settings_and_errors", config)

        def stale_tmp():
            """Temporary names carry the host (16 hex digits of the boot id, '.',
            the pid namespace's inode: where kill(pid, 0) means something). This
            host's whose process is gone are removed; a live one's, another
            host's (a daemon elsewhere on the bucket) and names without a host
            are kept while recent, and removed from any host once not changed for
            a day (locally aged with utime; objects cannot be aged, so with
            QCOWD_S3 they are a few seconds old and QCOWD_TEST_TEMP_AGE=3
            stands for the day)."""
            dead = 1 << 22
            while True:  # a pid no process has
                try:
                    os.kill(dead, 0)
                    dead += 1
                except ProcessLookupError:
                    break
                except PermissionError:
                    dead += 1
            with open("/proc/sys/kernel/random/boot_id") as f:
                host = "%s.%x" % (f.read().strip().replace("-", "")[:16], os.stat("/proc/self/ns/pid").st_ino)
            other = "0123456789abcdef.effffffb"
            me = os.getpid()
            old = [".upload-o1@%s-%d-1.tmp" % (other, dead), ".create-o2-%d-2.tmp" % me,
                   ".upload-o3@%s-%d-3.tmp" % (host, me)]
            stale = [".upload-small@%s-%d-1.tmp" % (host, dead), ".create-a-b-c@%s-%d-7.tmp" % (host, dead)]
            kept = [".upload-x@%s-%d-3.tmp" % (host, me), ".upload-y@%s-%d-4.tmp" % (other, dead),
                    ".upload-z-%d-5.tmp" % dead, ".upload-notours.txt"]
            for f in old:
                put_file(f, b"half an image")
                if not base.S3:
                    t = time.time() - 2 * 86400
                    os.utime(os.path.join(cat, f), (t, t))
            if base.S3:
                time.sleep(5.5)  # Last-Modified has whole seconds, rounded up
                os.environ["QCOWD_TEST_TEMP_AGE"] = "3"
            for f in stale + kept:
                put_file(f, b"half an image")
            try:
                d = start()
            finally:
                os.environ.pop("QCOWD_TEST_TEMP_AGE", None)
            left = sorted(f for f in base.store_names(cat) if f.startswith(".") and f != ".qcowd-jobs.json")
            stop(d)
            assert left == sorted(kept), left
            for f in stale:
                assert any("removed the stale temporary file %s (left by an interrupted create or upload: its "
                           "process %d on this host is gone)" % (f, dead) in ln for ln in d.lines), (f, d.lines[:8])
            for f in old:
                assert any("removed the stale temporary file %s (left by an interrupted create or upload: not "
                           "changed for " % f in ln for ln in d.lines), (f, d.lines[:8])
            for f in kept:
                base.store_remove(cat, f)
        ck.case("stale_temp_files_removed_at_start", stale_tmp)

        d = start()

        def keep_alive():
            c = d.conn()
            socks = set()
            for i in range(5):
                c.request("GET", "/v1/images/small/data", headers={"Range": "bytes=%d-%d" % (i * 4096, i * 4096 + 9)})
                r = c.getresponse()
                assert r.status == 206 and r.read() == b"\x42" * 10
                assert (r.getheader("Connection") or "").lower() != "close", r.getheaders()
                socks.add(id(c.sock))
                assert c.sock is not None, "connection closed after a GET"
            c.close()
            assert len(socks) == 1, "a new connection per request"
        ck.case("keep_alive_between_gets", keep_alive)

        def listing_errors_name_no_server_path():
            # an overlay whose backing file is gone: the listing's entry for it is
            # an error, which names the image's files as an error answer does
            # (the catalog's own folder or bucket prefix cut)
            qemu_img("create", "-q", "-f", "qcow2", p("lgone"), "1M")
            qemu_img("create", "-q", "-f", "qcow2", "-b", "lgone.qcow2", "-F", "qcow2", p("lorphan"), "1M")
            publish("lorphan")
            os.remove(p("lgone"))
            try:
                st, h, b = d.request("GET", "/v1/images")
                assert st == 200, (st, b[:200])
                ent = [e for e in json.loads(b)["images"] if e["name"] == "lorphan"]
                assert ent and "error" in ent[0], ent
                msg = ent[0]["error"]["message"]
                assert "lgone.qcow2" in msg, msg
                root = "s3://%s/%s" % (base.S3_BUCKET, base.S3_PREFIX) if base.S3 else cat
                assert root not in msg and top not in msg, msg
            finally:
                if base.S3:
                    base.store_remove(cat, "lorphan.qcow2")
                if os.path.exists(p("lorphan")):
                    os.remove(p("lorphan"))
        ck.case("listing_errors_name_no_server_path", listing_errors_name_no_server_path)

        def download_isolated():
            # bigger than what the socket buffers hold, so the download is still
            # streaming while the client waits
            qemu_img("create", "-q", "-f", "qcow2", p("big"), "64M")
            base.qemu_io(p("big"), "write -q -P 0x42 0 48M")
            publish("big")
            with open(p("small"), "rb") as f:
                small = f.read()
            with open(p("big"), "rb") as f:
                before = f.read()
            st, h, b = d.request("GET", "/v1/images/small/file")
            assert st == 200 and b == small
            c = d.conn()
            c.request("GET", "/v1/images/big/file")
            r = c.getresponse()
            assert r.status == 200
            got = r.read(4096)
            time.sleep(0.2)
            # a write while the download streams: refused
            for method, path, body, hdrs in [
                ("PUT", "/v1/images/big/data?offset=0", b"\x99" * 512, {}),
                ("PATCH", "/v1/images/big/data", json.dumps({"op": "zero", "offset": 0, "size": 65536}).encode(),
                 {"Content-Type": "application/json"}),
            ]:
                c2 = d.conn()
                c2.request(method, path, body=body, headers=hdrs)
                r2 = c2.getresponse()
                ck.expect_error("%s during a download" % method, r2.status, 409, {k.lower(): v for k, v in
                                                                                 r2.getheaders()}, r2.read(),
                                "conflict")
                c2.close()
            got += r.read()
            c.close()
            assert got == before, "the download differs from the file"
            # after it: writes go through
            c2 = d.conn()
            c2.request("PUT", "/v1/images/big/data?offset=0", body=b"\x43" * 512)
            r2 = c2.getresponse()
            r2.read()
            c2.close()
            assert r2.status == 204, r2.status
            st, h, b = d.request("GET", "/v1/images/big/data", {"Range": "bytes=0-511"})
            assert st == 206 and b == b"\x43" * 512
        ck.case("download_is_isolated_from_writes", download_isolated)

        def file_changes():
            # a freed cluster inside the file, so a later write changes the
            # mapping (which a cached handle would miss) without growing the file
            qemu_img("create", "-q", "-f", "qcow2", p("chg"), "1M")
            base.qemu_io(p("chg"), "write -q -P 0x01 0 64k", "write -q -P 0x09 64k 64k",
                         "write -q -P 0x0a 128k 64k", "discard -q 64k 64k")
            publish("chg")
            st, h, b = d.request("GET", "/v1/images/chg/data", {"Range": "bytes=524288-524291"})
            assert b == b"\0" * 4
            # same size and the same second: only the nanoseconds differ (in a
            # bucket: the ETag, Last-Modified having whole seconds)
            st0 = os.stat(p("chg"))
            base.qemu_io(p("chg"), "write -q -P 0x02 512k 64k")
            assert os.stat(p("chg")).st_size == st0.st_size, "the write grew the file"
            if base.S3:
                publish("chg")
            else:
                sec, ns = divmod(st0.st_mtime_ns, 10**9)
                os.utime(p("chg"), ns=(st0.st_atime_ns, sec * 10**9 + (ns + 1) % 10**9))
            st, h, b = d.request("GET", "/v1/images/chg/data", {"Range": "bytes=524288-524291"})
            assert b == b"\x02" * 4, "a change within one second went unnoticed: %r" % b
            st, h, b = d.request("GET", "/v1/images/chg/data", {"Range": "bytes=0-3"})
            assert b == b"\x01" * 4
            if base.S3:  # no inodes: an object replaced by one of the same size, told by its ETag
                base.qemu_io(p("chg"), "write -q -P 0x03 0 64k")
                assert os.stat(p("chg")).st_size == st0.st_size
                publish("chg")
                st, h, b = d.request("GET", "/v1/images/chg/data", {"Range": "bytes=0-3"})
                assert b == b"\x03" * 4, "an object replaced by one of the same size went unnoticed: %r" % b
                return
            # replaced by a file of the same size and the same mtime: only the inode differs
            st0 = os.stat(p("chg"))
            tmp = os.path.join(top, "chg.new")
            shutil.copyfile(p("chg"), tmp)
            base.qemu_io(tmp, "write -q -P 0x03 0 64k")
            assert os.stat(tmp).st_size == st0.st_size
            os.utime(tmp, ns=(st0.st_atime_ns, st0.st_mtime_ns))
            os.rename(tmp, p("chg"))
            st, h, b = d.request("GET", "/v1/images/chg/data", {"Range": "bytes=0-3"})
            assert b == b"\x03" * 4, "a replaced file with the same size and mtime went unnoticed: %r" % b
        ck.case("object_changes_noticed_by_etag" if base.S3 else "file_changes_noticed_by_ns_mtime_and_inode",
                file_changes)

        def upload_cut():
            src = os.path.join(top, "up.qcow2")
            qemu_img("create", "-q", "-f", "qcow2", src, "4M")
            base.qemu_io(src, "write -q -P 0x11 0 1M")
            with open(src, "rb") as f:
                data = f.read()
            cases = [
                (len(data), len(data) // 2),  # half of a good file, then closed
                (len(data), 0),               # headers only
                (10**15, 4096),               # a Content-Length far past any disk
            ]
            staged = staging()
            for i, (cl, sent) in enumerate(cases):
                name = "cut%d" % i
                head = ("PUT /v1/images/%s/file HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" %
                        (name, cl)).encode()
                http_raw(d.port, head + data[:sent], read=False)
                ck.bad_inputs += 1
                deadline = time.time() + 30  # until the request's log line says it is over
                while time.time() < deadline:
                    if any("PUT /v1/images/%s/file" % name in ln for ln in list(d.lines)):
                        break
                    time.sleep(0.05)
                tmps = temps()
                assert not tmps, "temporary files left: %s" % tmps
                assert staging() == staged, "staging files left: %s" % sorted(set(staging()) - set(staged))
                st, h, b = d.request("GET", "/v1/images")
                assert name not in [i["name"] for i in json.loads(b)["images"]], name
                assert d.alive()
            for cl in ["99999999999999999999999", "-1", "12abc"]:
                out = http_raw(d.port, ("PUT /v1/images/badcl/file HTTP/1.1\r\nHost: localhost\r\nContent-Length: %s\r\n"
                                        "Connection: close\r\n\r\n" % cl).encode())
                ck.bad_inputs += 1
                assert re.match(rb"HTTP/1\.1 4\d\d ", out), (cl, out[:100])
            assert not temps()
            st, h, b = d.request("GET", "/v1/health")
            assert st == 200
        ck.case("upload_cut_short_leaves_nothing", upload_cut)
        stop(d)

        # ---- 64 clients ----
        models = {}
        for name, opts in IMAGES:
            qemu_img("create", "-q", "-f", "qcow2", *opts, p(name), str(IMG_SIZE))
            base.qemu_io(p(name), "write -q -P 0x5a 0 %d" % (IMG_SIZE // 2))
            models[name] = bytearray(b"\x5a" * (IMG_SIZE // 2) + b"\0" * (IMG_SIZE // 2))
            publish(name)
        d = start(threads=8)

        def many_clients():
            per_image = CLIENTS // len(IMAGES)
            nblocks = IMG_SIZE // BLOCK
            locks = {(n, b): threading.Lock() for n, _ in IMAGES for b in range(nblocks)}
            errors = []
            counts = {"put": 0, "get": 0, "zero": 0, "checked": 0}
            clock = threading.Lock()

            def client(k):
                r = random.Random(args.seed * 1000 + k)
                name = IMAGES[k % len(IMAGES)][0]
                slot = k // len(IMAGES)
                own = [SHARED + slot * OWN_PER_CLIENT + i for i in range(OWN_PER_CLIENT)]
                shared = list(range(SHARED))
                model = models[name]
                c = d.conn()
                done = {"put": 0, "get": 0, "zero": 0, "checked": 0}

                def req(method, path, body=None, hdrs=None):
                    nonlocal c
                    for attempt in range(2):
                        try:
                            c.request(method, path, body=body, headers=hdrs or {})
                            resp = c.getresponse()
                            return resp.status, resp.read()
                        except (http.client.HTTPException, ConnectionError):
                            if attempt:
                                raise
                            c.close()
                            c = d.conn()

                def write(b):
                    off = b * BLOCK + r.randrange(BLOCK - 1)
                    n = r.randrange(1, b * BLOCK + BLOCK - off + 1)
                    data = r.randbytes(n)
                    flush = "y" if r.random() < 0.1 else "n"
                    st, body = req("PUT", "/v1/images/%s/data?offset=%d&flush=%s" % (name, off, flush), data)
                    if st != 204:
                        raise AssertionError("PUT %s @%d+%d: %d %r" % (name, off, n, st, body[:200]))
                    model[off:off + n] = data
                    done["put"] += 1

                def zero(b):
                    st, body = req("PATCH", "/v1/images/%s/data" % name,
                                   json.dumps({"op": "zero", "offset": b * BLOCK, "size": BLOCK}).encode(),
                                   {"Content-Type": "application/json"})
                    if st != 204:
                        raise AssertionError("zero %s block %d: %d %r" % (name, b, st, body[:200]))
                    model[b * BLOCK:(b + 1) * BLOCK] = bytes(BLOCK)
                    done["zero"] += 1

                def read(b):
                    off = b * BLOCK + r.randrange(BLOCK)
                    n = r.randrange(1, (b + 1) * BLOCK - off + 1)
                    st, body = req("GET", "/v1/images/%s/data" % name, None,
                                   {"Range": "bytes=%d-%d" % (off, off + n - 1)})
                    if st != 206 or body != bytes(model[off:off + n]):
                        i = next((i for i in range(min(len(body), n)) if body[i] != model[off + i]), None)
                        raise AssertionError("GET %s @%d+%d: %d, %d bytes, first difference at %s" %
                                             (name, off, n, st, len(body), i))
                    done["get"] += 1
                    done["checked"] += n

                try:
                    for _ in range(OPS):
                        x = r.random()
                        b = r.choice(own) if r.random() < 0.6 else r.choice(shared)
                        lock = locks[(name, b)]
                        with lock:  # the owner's lock is uncontended; shared blocks take turns
                            if x < 0.45:
                                write(b)
                            elif x < 0.5:
                                zero(b)
                            else:
                                read(b)
                    for b in own:  # each client ends by checking all it owns
                        with locks[(name, b)]:
                            st, body = req("GET", "/v1/images/%s/data" % name, None,
                                           {"Range": "bytes=%d-%d" % (b * BLOCK, (b + 1) * BLOCK - 1)})
                            if body != bytes(model[b * BLOCK:(b + 1) * BLOCK]):
                                raise AssertionError("final read of %s block %d differs" % (name, b))
                            done["checked"] += BLOCK
                except Exception as e:
                    errors.append("client %d: %s" % (k, e))
                finally:
                    c.close()
                    with clock:
                        for key in counts:
                            counts[key] += done[key]

            threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
            t0 = time.time()
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert not errors, errors[:5]
            assert d.alive()
            # every byte of every image, over HTTP, against the model
            for name, _ in IMAGES:
                st, h, body = d.request("GET", "/v1/images/%s/data" % name)
                assert st == 200 and body == bytes(models[name]), "%s differs from the model" % name
            print("    64 clients: %d PUTs, %d zeroes, %d GETs, %d bytes checked, %.1f s" %
                  (counts["put"], counts["zero"], counts["get"], counts["checked"], time.time() - t0), flush=True)
            stop(d)
            base.sync_down(cat)
            for name, _ in IMAGES:
                r = subprocess.run([base.QEMU_IMG, "check", "-f", "qcow2", p(name)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
                assert r.returncode == 0, "%s: qemu-img check: %s" % (name, r.stdout.decode()[-500:])
                ref = os.path.join(top, name + ".model.raw")
                with open(ref, "wb") as f:
                    f.write(models[name])
                r = subprocess.run([base.QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", ref, p(name)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                assert r.returncode == 0, "%s: qemu-img compare: %s" % (name, r.stdout.decode()[-300:])
            assert not temps()
        ck.case("64_clients_write_and_read_then_qemu_img_check_and_compare", many_clients)
    except Exception:
        ck.setup_failed()
    finally:
        base.finish(top, args.keep, daemons)
    return ck.report()


if __name__ == "__main__":
    sys.exit(main())
