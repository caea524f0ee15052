#!/usr/bin/python3
"""backup_example.py: the README's incremental backup
(clients/python/examples/incremental_backup.py) against a live qcowd, as an
orchestrator runs it: a full backup, then increments while a writer changes the
image between and during runs. After each run the backup must equal the disk as
that run's snapshot holds it (qemu-img convert of the image file's snapshot), an
increment must copy only about what changed, and the previous run's bitmap and
snapshot must be gone.

Environment: QCOWD, QEMU_IMG, QEMU_IO. Prints `ok NAME` / `FAIL NAME: reason`,
then `N passed, M failed`.
"""
import os
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import qcowd  # noqa: E402
import qcowd_client  # noqa: E402

EXAMPLE = os.path.join(ROOT, "clients", "python", "examples", "incremental_backup.py")
MiB = 1 << 20


def main():
    args, top, catalog = qcowd.prologue("qcowd-backup-")
    cases = qcowd.Cases(args.seed)
    img = os.path.join(catalog, "vm1.qcow2")
    subprocess.run([qcowd.QEMU_IMG, "create", "-q", "-f", "qcow2", img, "64M"], check=True)
    subprocess.run([qcowd.QEMU_IO, "-c", "write -P 0x11 0 24M", img], check=True, stdout=subprocess.DEVNULL)
    d = qcowd.Qcowd(qcowd.QCOWD, ["--catalog", catalog])
    c = qcowd_client.Client(d.url)
    dest = os.path.join(top, "vm1.raw")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "clients", "python"))

    def run_example():
        out = subprocess.run([sys.executable, EXAMPLE, d.url, "vm1", dest], env=env, check=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout.decode()
        # "backup N of vm1: COPIED of SIZE bytes copied"
        words = out.split()
        return int(words[1]), int(words[4])

    def snapshot_raw(n):
        """The disk as snapshot backup-N holds it, read by qemu-img from the file."""
        c.flush("vm1")
        raw = os.path.join(top, "snap-%d.raw" % n)
        subprocess.run([qcowd.QEMU_IMG, "convert", "-U", "-O", "raw", "-l", "snapshot.name=backup-%d" % n,
                        img, raw], check=True)
        return open(raw, "rb").read()

    def same(n):
        got = open(dest, "rb").read()
        want = snapshot_raw(n)
        assert got == want, "backup %d differs from its snapshot (%d vs %d bytes)" % (n, len(got), len(want))

    def full():
        n, copied = run_example()
        assert n == 1 and copied == 64 * MiB, (n, copied)
        same(1)
        assert [b["name"] for b in c.bitmaps("vm1")] == ["backup-1"]

    def increments():
        rng = cases.rng
        for n in (2, 3, 4):
            offsets = sorted({rng.randrange(0, 64 * MiB // 65536) * 65536 for _ in range(6)})
            for off in offsets:
                c.write("vm1", off, bytes([n]) * 65536)
            c.zero("vm1", 40 * MiB, MiB)
            # a writer keeps going while the backup runs: its writes land in the image,
            # after or before the snapshot, and the backup is still one point in time
            stop = threading.Event()

            def writer():
                i = 0
                while not stop.is_set():
                    try:
                        c2.write("vm1", 50 * MiB + (i % 64) * 4096, b"w" * 4096)
                    except qcowd_client.Conflict:
                        pass  # the snapshot job holds the image for a moment
                    i += 1
            c2 = qcowd_client.Client(d.url)
            t = threading.Thread(target=writer)
            t.start()
            try:
                got_n, copied = run_example()
            finally:
                stop.set()
                t.join()
                c2.close()
            assert got_n == n, got_n
            # only about what changed: the writes, the zeroed MiB, the writer's area
            assert copied <= (len(offsets) + 1) * 65536 + MiB + 2 * MiB, copied
            same(n)
            names = [b["name"] for b in c.bitmaps("vm1")]
            snaps = [s["name"] for s in c.snapshots("vm1")]
            assert names == ["backup-%d" % n] and snaps == ["backup-%d" % n], (names, snaps)

    for name, fn in (("full backup equals the snapshot", full),
                     ("three increments under a writer equal their snapshots, copying only what changed",
                      increments)):
        cases.case(name, fn)
    c.close()
    return qcowd.finish(cases, d, top, args.keep)


if __name__ == "__main__":
    sys.exit(main())
