"""bench_s3.py: the body of bench_s3.sh (see there)."""
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "s3"))
import s3  # noqa: E402  (the Qcowd harness)
import s3fixture  # noqa: E402

MiB = 1 << 20
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
BUCKET = "qcowd-bench"
READS = 256


class LocalStore:
    """Stands in for the fixture when qcowd serves a local folder."""

    def __init__(self, folder):
        self.folder = folder

    def env(self, secret=None):
        return dict(os.environ)


class LocalQcowd(s3.Qcowd):
    """s3.py's harness (request, read, stop) on a local catalog folder: qcowd
    started without any s3 option."""

    def __init__(self, folder):
        s3.qcowd.Qcowd.__init__(self, s3.QCOWD, ["--quiet", "--catalog", folder])


def measure(d, img, raw, size):
    out = {}
    with open(img, "rb") as f:
        blob = f.read()
    t = time.time()
    st, b = d.request("PUT", "/v1/images/disk/file", blob)
    if st != 201:
        raise AssertionError("import: %d %s" % (st, b[:300]))
    out["import"] = len(blob) / MiB / (time.time() - t)
    t = time.time()
    st, b = d.request("GET", "/v1/images/disk/data")
    if st != 200 or b != raw:
        raise AssertionError("sequential read differs (%d, %d bytes)" % (st, len(b)))
    out["seq"] = size / MiB / (time.time() - t)
    rng = random.Random(7)
    t = time.time()
    for _ in range(READS):
        off = rng.randrange(size // 4096) * 4096
        if d.read("disk", off, 4096) != raw[off:off + 4096]:
            raise AssertionError("random read at %d differs" % off)
    out["rand_ms"] = (time.time() - t) * 1000 / READS
    return out


def main():
    size = int(sys.argv[1]) * MiB
    if not shutil.which(QEMU_IMG) or (not os.environ.get("S3_ENDPOINT") and not s3fixture.have_swift()):
        print("skip: qemu-img or Swift (swift-proxy ...) is not installed")
        return 77
    s3.QCOWD = os.environ["QCOWD"]
    s3.BUCKET = BUCKET
    tmp = tempfile.mkdtemp(prefix="qcowd-bench-s3-")
    try:
        rawp = os.path.join(tmp, "disk.raw")
        with open(rawp, "wb") as f:
            r = random.Random(1)
            for _ in range(size // MiB):
                f.write(r.randbytes(MiB))
        img = os.path.join(tmp, "disk.qcow2")
        subprocess.run([QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", rawp, img], check=True)
        with open(rawp, "rb") as f:
            raw = f.read()
        os.unlink(rawp)
        local = os.path.join(tmp, "local")
        os.mkdir(local)
        d = LocalQcowd(local)
        try:
            loc = measure(d, img, raw, size)
        finally:
            d.stop()
        with s3fixture.Swift(os.path.join(tmp, "swift")) as store:
            store.create_bucket(BUCKET)
            d = s3.Qcowd(store, "bench", os.path.join(tmp, "staging"))
            try:
                before = {}
                names = ["requests_" + k for k in ("get", "head", "put", "upload_part", "copy", "list", "delete",
                                                   "other")] + ["bytes_received", "bytes_sent", "bytes_copied",
                                                                "retries"]
                before = {n: d.metric(n) for n in names}
                rem = measure(d, img, raw, size)
                after = {n: d.metric(n) - before[n] for n in names}
            finally:
                d.stop()
        gib = size / (1 << 30)
        print("bench_s3: %d MiB image (%d MiB container), local folder vs Swift S3 on loopback" %
              (size // MiB, os.path.getsize(img) // MiB))
        print("  %-26s %12s %12s" % ("", "local", "s3"))
        print("  %-26s %12.1f %12.1f" % ("import MiB/s", loc["import"], rem["import"]))
        print("  %-26s %12.1f %12.1f" % ("sequential read MiB/s", loc["seq"], rem["seq"]))
        print("  %-26s %12.2f %12.2f" % ("4 KiB random read ms", loc["rand_ms"], rem["rand_ms"]))
        print("  S3 traffic for the whole run, per GiB of image:")
        for n in names:
            v = after[n] / gib
            unit = " MiB" if n.startswith("bytes") else ""
            print("    %-22s %14.1f%s" % (n, v / MiB if unit else v, unit))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
