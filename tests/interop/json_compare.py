#!/usr/bin/python3
"""json_compare.py: qcowimg's and the daemon's qemu-img-shaped JSON equal qemu-img's.

One catalog of images built with qemu-img, qemu-io and qcowimg (plain, compat 0.10,
a backing chain, compressed with zlib and zstd, internal snapshots, one with a name
that is not UTF-8, bitmaps enabled and disabled, extended L2, external data files,
lazy refcounts left dirty, the corrupt bit, AES and LUKS encryption (three ciphers
and IV generators: the LUKS header as qemu-img shows it), odd cluster and
refcount sizes, 0-byte images, and broken ones from tests/corrupt/check_compare.py:
an L2 table over the header, leaks, entries past the end, misaligned refcount
blocks). For each image NAME, from the catalog folder as working directory:
  info       `qemu-img info --output=json NAME.qcow2` against `qcowimg info` (exact,
             key by key) and `GET /v1/images/NAME` of a live qcowd on that catalog
             (key by key, with DAEMON_SHAPE's differences only)
  lists      `GET .../snapshots` and `GET .../bitmaps` against qemu-img info's lists
  check      `qemu-img check --output=json` against `qcowimg check` and the result of
             the daemon's check job (`POST .../check`), key by key; where qemu-img
             refuses (exit 1), qcowimg exits 1 and the job fails
  repair     for images qemu-img check finds fault with: `-r all` on a copy by each
             of the three (the daemon's job with {"repair": "all"}): exit codes, the
             counts and the fixed counts
Differences allowed are listed below with the reason (DAEMON_SHAPE for the REST shape
of every image, ALLOWED per image). qemu-img info runs before qcowd starts, so an
image the daemon changed on open would show.

Environment: QCOWIMG, QCOWD (required), QEMU_IMG, QEMU_IO. Usage: json_compare.py
[-k NAME]... [--keep] [--list]. Prints `ok NAME` / `FAIL NAME: reason` per image and
`N passed, M failed`; exits 1 on a difference, 77 without qemu-img/qemu-io.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, os.path.join(HERE, "..", "corrupt"))
sys.path.insert(0, HERE)
import suite  # noqa: E402
import qcowd  # noqa: E402
import interop  # noqa: E402  (its key-by-key json_diff)

QCOWIMG = os.environ.get("QCOWIMG", "")
QCOWIMG = os.path.abspath(QCOWIMG) if os.sep in QCOWIMG else QCOWIMG
QCOWD = os.environ.get("QCOWD", "")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")
TIMEOUT = 120

# The REST shape of the daemon's info: what it shows that qemu-img does not (never a
# different value for a key both show). Keys are paths as json_diff names them.
DAEMON_EXTRA = {"name"}                              # the catalog name
DAEMON_EMPTY_LISTS = {"snapshots", "format-specific.data.bitmaps"}   # [] where qemu-img leaves them out
DAEMON_V3_KEYS = {"format-specific.data.lazy-refcounts", "format-specific.data.corrupt",
                  "format-specific.data.extended-l2"}               # false for compat 0.10 too

# Per image: paths whose difference is allowed, for every tool, with the reason.
ALLOWED = {
    # "<open>": qemu-img info refuses the image, ours show it
    "x_bitmap_table_over_l2": ({"<open>"},
                               "qemu-img loads an enabled bitmap's table when it opens the image and refuses it for "
                               "a bad entry; qcowd reads a bitmap table when it is used (dirty queries, merges, writes "
                               "that mark it) and refuses it then; both checks fail (exit 1)"),
}

SECRET = ["--object", "secret,id=sec0,data=123456"]


# ---------------------------------------------------------------------------
# The images: name -> build(d), run with the catalog folder d as working directory,
# making d/NAME.qcow2 (and any file it needs).

IMAGES = {}


def image(name):
    def deco(fn):
        IMAGES[name] = fn
        return fn
    return deco


def sh(argv, d):
    p = subprocess.run([a if isinstance(a, bytes) else str(a) for a in argv], cwd=d, capture_output=True,
                       timeout=TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {p.returncode}: {p.stderr.decode()[:300]}")


def create(d, name, size="4M", opts="", extra=()):
    sh([QEMU_IMG, "create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) + list(extra) + [name + ".qcow2", size], d)


def write(d, name, *cmds, fmt="qcow2"):
    argv = [QEMU_IO, "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    sh(argv + [name + ".qcow2"], d)


def poke_incompat(d, name, bit):
    path = os.path.join(d, name + ".qcow2")
    with open(path, "r+b") as f:
        f.seek(72)
        v = int.from_bytes(f.read(8), "big") | bit
        f.seek(72)
        f.write(v.to_bytes(8, "big"))


@image("plain")
def _(d):
    create(d, "plain")
    write(d, "plain", "write -P 0x11 0 192k", "write -z 1M 64k")


@image("compat010")
def _(d):
    create(d, "compat010", opts="compat=0.10")
    write(d, "compat010", "write -P 0x22 64k 64k")


@image("base")
def _(d):
    create(d, "base", "8M")
    write(d, "base", "write -P 0x33 0 1M")


@image("overlay")
def _(d):
    if not os.path.exists(os.path.join(d, "base.qcow2")):
        IMAGES["base"](d)
    create(d, "overlay", opts="backing_file=base.qcow2,backing_fmt=qcow2", size="8M")
    write(d, "overlay", "write -P 0x44 512k 64k")


@image("compressed")
def _(d):
    create(d, "compressed")
    write(d, "compressed", "write -c -P 0x55 0 64k", "write -c -P 0x56 128k 64k")


@image("zstd")
def _(d):
    create(d, "zstd", opts="compression_type=zstd")
    write(d, "zstd", "write -c -P 0x57 0 64k")


@image("snapshots")
def _(d):
    create(d, "snapshots")
    write(d, "snapshots", "write -P 0x61 0 64k")
    sh([QEMU_IMG, "snapshot", "-c", "first", "snapshots.qcow2"], d)
    write(d, "snapshots", "write -P 0x62 0 64k")
    sh([QEMU_IMG, "snapshot", "-c", "second one", "snapshots.qcow2"], d)


@image("snapshot_compat010")
def _(d):
    create(d, "snapshot_compat010", opts="compat=0.10")
    sh([QEMU_IMG, "snapshot", "-c", "old", "snapshot_compat010.qcow2"], d)


@image("snapshot_not_utf8")
def _(d):
    create(d, "snapshot_not_utf8")
    # a stray byte, a lead byte without its continuation, an overlong NUL, a surrogate
    sh([QEMU_IMG, "snapshot", "-c", b"s\xff\xc3x\xc0\x80\xed\xa0\x80.", "snapshot_not_utf8.qcow2"], d)


@image("bitmaps")
def _(d):
    create(d, "bitmaps", "16M")
    sh([QEMU_IMG, "bitmap", "--add", "-g", "128k", "bitmaps.qcow2", "enabled"], d)
    sh([QEMU_IMG, "bitmap", "--add", "--disable", "bitmaps.qcow2", "disabled"], d)
    write(d, "bitmaps", "write -P 0x71 0 1M")


@image("extended_l2")
def _(d):
    create(d, "extended_l2", opts="extended_l2=on,cluster_size=128k")
    write(d, "extended_l2", "write -P 0x72 4k 8k", "write -z 64k 4k")


@image("data_file_raw")
def _(d):
    create(d, "data_file_raw", opts="data_file=data_file_raw.data,data_file_raw=on")
    write(d, "data_file_raw", "write -P 0x73 0 128k")


@image("data_file")
def _(d):
    create(d, "data_file", opts="data_file=data_file.data")
    write(d, "data_file", "write -P 0x74 64k 64k")


@image("lazy_dirty")
def _(d):
    create(d, "lazy_dirty", opts="lazy_refcounts=on")
    write(d, "lazy_dirty", "write -P 0x75 0 64k")
    poke_incompat(d, "lazy_dirty", 1)   # the dirty bit, as a crash with lazy refcounts leaves it


@image("corrupt_bit")
def _(d):
    create(d, "corrupt_bit")
    write(d, "corrupt_bit", "write -P 0x76 0 64k")
    poke_incompat(d, "corrupt_bit", 2)


@image("aes")
def _(d):
    create(d, "aes", "1M", "encrypt.format=aes,encrypt.key-secret=sec0,compat=0.10", SECRET)


def luks(d, name, opts):
    # qemu times its key derivation: on a busy machine a short measure can fail
    # ("Unable to get accurate CPU usage"), so try again, then with its default time
    for t in ["encrypt.iter-time=50"] * 3 + [""]:
        try:
            return create(d, name, "1M", ",".join(filter(None, ["encrypt.format=luks,encrypt.key-secret=sec0", opts, t])),
                          SECRET)
        except RuntimeError as e:
            if "accurate CPU usage" not in str(e) or not t:
                raise


@image("luks")
def _(d):
    luks(d, "luks", "")   # aes-256, xts-plain64, sha256


@image("luks_cbc_essiv")
def _(d):
    luks(d, "luks_cbc_essiv", "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
                          "encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512")


@image("luks_serpent_xts_plain")
def _(d):
    luks(d, "luks_serpent_xts_plain", "encrypt.cipher-alg=serpent-192,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain")


@image("small_clusters_refcount1")
def _(d):
    create(d, "small_clusters_refcount1", "1M", "cluster_size=512,refcount_bits=1")
    write(d, "small_clusters_refcount1", "write -P 0x77 0 4k")


@image("big_clusters_refcount64")
def _(d):
    create(d, "big_clusters_refcount64", "8M", "cluster_size=2M,refcount_bits=64")
    write(d, "big_clusters_refcount64", "write -P 0x78 3M 4k")


@image("zero_byte")
def _(d):
    create(d, "zero_byte", "0")


@image("zero_byte_qcowimg")
def _(d):
    sh([QCOWIMG, "create", "-f", "qcow2", "zero_byte_qcowimg.qcow2", "0"], d)


# broken images of check_compare.py (built in a folder of their own, then moved in)
for _name in ("x_l2_over_header", "x_leak_only", "x_data_past_end", "x_refblock_misaligned",
              "x_copied_flags_cleared", "x_snapshot_table_over_l1", "x_bitmap_table_over_l2"):
    def _broken(d, n=_name):
        import check_compare
        side = tempfile.mkdtemp(dir=d, prefix=".build-")
        img = check_compare.EXTRA[n](side)
        os.rename(os.path.join(side, img), os.path.join(d, n + ".qcow2"))
        shutil.rmtree(side)
    IMAGES[_name] = _broken


# ---------------------------------------------------------------------------
# Comparing.

compact = interop.compact


def json_diff(a, b):
    """[(path, qemu-img's value a, ours b)], key by key; a key on one side only is <missing>."""
    return interop.json_diff(a, b, "")


def daemon_shape_ok(path, q, mine, qinfo):
    """A difference the REST shape explains: a daemon-only key, an empty list
    qemu-img leaves out, a v3 boolean (false) on a compat 0.10 image."""
    if q != "<missing>":
        return False
    if path in DAEMON_EXTRA:
        return True
    if path in DAEMON_EMPTY_LISTS:
        return mine == "[]"
    if path in DAEMON_V3_KEYS:
        return mine == "false" and qinfo["format-specific"]["data"]["compat"] == "0.10"
    return False


def report(what, diffs, allowed):
    """Problems for the differences not allowed (a path in allowed, or below one)."""
    bad = [x for x in diffs if not any(x[0] == a or x[0].startswith(a + ".") for a in allowed)]
    if not bad:
        return []
    return [(f"{what}: {len(bad)} key(s) differ: " + ", ".join(x[0] or "<root>" for x in bad[:8]),
             [f"{p or '<root>'}: qemu-img={a} ours={b}" for p, a, b in bad[:20]])]


def run(argv, cwd):
    """(exit code, parsed stdout or None, stderr)."""
    p = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, timeout=TIMEOUT,
                       env=dict(os.environ, LC_ALL="C"))
    try:
        out = json.loads(p.stdout) if p.stdout.strip() else None
    except ValueError:
        out = None
    return p.returncode, out, p.stderr.decode(errors="replace")


def qemu_info(name, cat):
    """qemu-img info's object, or None when qemu-img refuses the image."""
    rc, out, err = run([QEMU_IMG, "info", "--output=json", f"{name}.qcow2"], cat)
    if rc == 1 and out is None and err.startswith("qemu-img: Could not open"):
        return None
    if rc != 0 or not isinstance(out, dict):
        raise RuntimeError(f"qemu-img info {name}: exit {rc}: {err[:300]}")
    return out


def get(d, path):
    st, _, body = d.exchange("GET", path, headers={"Host": "localhost"})
    return st, json.loads(body) if body.strip() else None


def check_job(d, name, repair=None):
    """The daemon's check job on name: (result or None, error or None)."""
    body = json.dumps({"repair": repair} if repair else {})
    st, _, b = d.exchange("POST", f"/v1/images/{name}/check", body=body, headers={"Host": "localhost"})
    if st != 202:
        return None, f"POST check: {st} {b[:200]!r}"
    job = json.loads(b)["id"]
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        st, j = get(d, f"/v1/jobs/{job}")
        if j and j.get("status") == "concluded":
            d.exchange("DELETE", f"/v1/jobs/{job}", headers={"Host": "localhost"})
            return j.get("result"), j.get("error")
        time.sleep(0.05)
    return None, "job did not conclude"


COUNTS = ("corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed")


def counts(rep):
    return {k: rep.get(k, 0) for k in COUNTS} if isinstance(rep, dict) else None


def compare_info(name, cat, d, qinfo, allowed):
    p = []
    rc, mine, err = run([QCOWIMG, "info", "--output=json", f"{name}.qcow2"], cat)
    if qinfo is None and "<open>" in allowed:
        return p
    if qinfo is None:   # qemu-img refuses to open it: so must both of ours
        st, info = get(d, f"/v1/images/{name}")
        if rc != 1 or mine is not None:
            p.append((f"qcowimg info: exit {rc} where qemu-img refuses the image", []))
        if st < 400 or not isinstance(info, dict) or "error" not in info:
            p.append((f"GET /v1/images/{name}: {st} where qemu-img refuses the image", []))
        return p
    if rc != 0 or mine is None:
        p.append((f"qcowimg info: exit {rc}", [err.strip()[:300]]))
    else:
        p += report("qcowimg info", json_diff(qinfo, mine), allowed)
    st, info = get(d, f"/v1/images/{name}")
    if st != 200:
        p.append((f"GET /v1/images/{name}: {st} {compact(info)}", []))
        return p
    diffs = [x for x in json_diff(qinfo, info) if not daemon_shape_ok(x[0], x[1], x[2], qinfo)]
    p += report("daemon info", diffs, allowed)
    if info.get("name") != name:
        p.append((f"daemon info: name {info.get('name')!r}", []))
    st, snaps = get(d, f"/v1/images/{name}/snapshots")
    p += report("daemon snapshots", json_diff({"snapshots": qinfo.get("snapshots", [])}, snaps), set())
    st, bms = get(d, f"/v1/images/{name}/bitmaps")
    qb = qinfo.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    p += report("daemon bitmaps", json_diff({"bitmaps": qb}, bms), set())
    return p


def compare_check(name, cat, d, stats):
    """qemu-img check, qcowimg check and the check job on name (not changed); then,
    when qemu-img finds fault, -r all on a copy by each."""
    p = []
    qrc, qrep, qerr = run([QEMU_IMG, "check", "--output=json", f"{name}.qcow2"], cat)
    orc, orep, oerr = run([QCOWIMG, "check", "--output=json", f"{name}.qcow2"], cat)
    jrep, jerr = check_job(d, name)
    stats["checked"] += 1
    if orc != qrc:
        p.append((f"qcowimg check: exit {orc}, qemu-img {qrc}", [qerr.strip()[:200], oerr.strip()[:200]]))
    if qrc == 1 and qrep is None:   # qemu-img refused the image
        stats["refused"] += 1
        if jerr is None:
            p.append((f"check job: no error where qemu-img refuses ({qerr.strip()[:120]!r})", []))
        return p
    if qrep is None:
        return p + [(f"qemu-img check printed no report (exit {qrc})", [])]
    p += report("qcowimg check", json_diff(qrep, orep), set())
    if jerr is not None:
        p.append((f"check job failed: {jerr}", []))
    else:
        p += report("check job", json_diff(qrep, jrep), set())
    if not p:
        stats["check-same"] += 1
    if qrc == 0:
        return p
    # -r all on a copy each: qcowimg's report and the job's result equal (one engine,
    # one library), and their counts qemu-img's unless qemu-img's own repair fails
    # (exit 1: check_compare.py judges those, on qemu-img's verdict of the copies)
    stats["repaired"] += 1
    rname = f"{name}-r"
    side = tempfile.mkdtemp(dir=os.path.dirname(cat), prefix=f"repair-{name}-")
    try:
        for who in ("qemu", "ours"):
            os.mkdir(os.path.join(side, who))
            shutil.copyfile(os.path.join(cat, f"{name}.qcow2"), os.path.join(side, who, f"{rname}.qcow2"))
        qrc, qrep, qerr = run([QEMU_IMG, "check", "-r", "all", "--output=json", f"{rname}.qcow2"],
                              os.path.join(side, "qemu"))
        orc, orep, oerr = run([QCOWIMG, "check", "-r", "all", "--output=json", f"{rname}.qcow2"],
                              os.path.join(side, "ours"))
        shutil.copyfile(os.path.join(cat, f"{name}.qcow2"), os.path.join(cat, f"{rname}.qcow2"))
        jrep, jerr = check_job(d, rname, "all")
        d.exchange("DELETE", f"/v1/images/{rname}", headers={"Host": "localhost"})
    finally:
        shutil.rmtree(side, ignore_errors=True)
    q = []
    if (orc == 1) != (jerr is not None):
        q.append((f"-r all: qcowimg exit {orc}, check job error {jerr!r}", [oerr.strip()[:200]]))
    elif orep is not None:
        q += report("-r all: check job", json_diff(orep, jrep), set())
    if qrc != 1 and orc != qrc:
        q.append((f"-r all: qcowimg exit {orc}, qemu-img {qrc}", [qerr.strip()[:200], oerr.strip()[:200]]))
    if qrc != 1 and counts(orep) != counts(qrep):
        q.append((f"-r all: qcowimg counts {counts(orep)}, qemu-img {counts(qrep)}", []))
    if not q:
        stats["repair-same"] += 1
    return p + q


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    suite.add_common_args(ap, "image")
    args = ap.parse_args()
    if args.list:
        print("\n".join(IMAGES))
        return 0
    picked = suite.select([(n,) for n in IMAGES], args.k, "image")
    if picked is None:
        return suite.USAGE
    bad = suite.check_needs(binaries={"QCOWIMG": QCOWIMG, "QCOWD": QCOWD}, tools=(QEMU_IMG, QEMU_IO))
    if bad is not None:
        return bad
    names = [n for (n,) in picked]
    if "overlay" in names and "base" not in names:
        names.insert(0, "base")
    top = tempfile.mkdtemp(prefix="qcowd-json-compare-")
    cat = os.path.join(top, "catalog")
    os.mkdir(cat)
    passed = failed = 0
    stats = dict.fromkeys(("checked", "refused", "check-same", "repaired", "repair-same"), 0)
    qinfos, problems = {}, {}
    for n in names:   # every image and qemu-img's info of it before qcowd opens anything
        try:
            if not os.path.exists(os.path.join(cat, n + ".qcow2")):
                IMAGES[n](cat)
            qinfos[n] = qemu_info(n, cat)
        except Exception as e:  # noqa: BLE001 (a setup failure is the case's failure)
            problems[n] = [(f"setup: {e}", [])]
    d = qcowd.Qcowd(QCOWD, ["--catalog", cat])
    try:
        for n in names:
            p = problems.get(n, [])
            if not p:
                allowed, why = ALLOWED.get(n, (set(), ""))
                try:
                    p = compare_info(n, cat, d, qinfos[n], allowed)
                    p += compare_check(n, cat, d, stats)
                except Exception as e:  # noqa: BLE001
                    p = [(f"{type(e).__name__}: {e}", [])]
            if p:
                failed += 1
                print(f"FAIL {n}: {p[0][0]}")
                for reason, details in p:
                    print(f"    {reason}")
                    for line in details:
                        print(f"        {line}")
            else:
                passed += 1
                note = f" (allowed: {ALLOWED[n][1]})" if n in ALLOWED else ""
                print(f"ok {n}{note}")
    finally:
        d.stop_clean()
        bad_lines = [ln for ln in d.lines if any(m in ln for m in qcowd.SANITIZER_MARKS)]
        if bad_lines:
            failed += 1
            print("FAIL qcowd: " + bad_lines[0])
    print(f"images: {len(names)}, checks compared: {stats['checked']} (qemu-img refused {stats['refused']}, all three "
          f"reports equal on the others: {stats['check-same']}), "
          f"repaired: {stats['repaired']} (equal counts: {stats['repair-same']})")
    if failed or args.keep:
        print("kept", top)
    else:
        shutil.rmtree(top, ignore_errors=True)
    return suite.summary(passed, failed)


if __name__ == "__main__":
    sys.exit(main())
