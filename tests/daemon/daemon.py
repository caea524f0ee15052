#!/usr/bin/python3
"""daemon.py: proves a live qcowd serves its catalog as qemu sees it, answers bad
input with the right status and a JSON error, matches openapi/openapi.yaml, and
stops cleanly on SIGTERM.

It builds a catalog in a temporary folder with qemu-img and qemu-io (plain,
compressed, extended L2, with a snapshot, an overlay on a backing image in the
catalog, images whose backing file is outside the catalog, a corrupt one, a file
that is not qcow2, an empty disk), starts qcowd on a free loopback port and checks:
  ranges     random single ranges (a-b, a-, -n) equal `qemu-img convert -O raw` bytes
  whole      a GET without Range equals the whole raw disk; HEAD gives the size only
  extents    /extents?context=zero equals `qemu-img map --output=json` (zero, !present)
  list/info  names, errors of broken images, info fields against `qemu-img info`
  bad input  unknown image, malformed/unsatisfiable/multiple ranges, hostile names,
             malformed URLs, wrong methods: status and JSON error; the daemon stays up
  openapi    the document parses, every operation has responses with schemas, every
             $ref resolves; every JSON body seen validates against its schema
  parallel   16 clients reading random ranges at once, every byte checked
  sigterm    a slow download in flight completes after SIGTERM, qcowd exits 0

Environment: QCOWD (the binary, required), OPENAPI (default ../../openapi/openapi.yaml
from this file), QEMU_IMG, QEMU_IO. Usage: daemon.py [--seed N] [--keep]
QCOWD_S3=1 runs the same cases with the catalog in a bucket of a local Swift + s3api
(tests/s3): the images are built locally, uploaded with the S3 API, and qcowd serves
s3://BUCKET/catalog; exit 77 when Swift is not installed.
Prints `ok NAME` / `FAIL NAME: reason`, then `N passed, M failed`; exits 1 on a
failure, 77 when qemu-img or qemu-io is missing.
"""

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

import jsonschema
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import qcowd  # noqa: E402  (the daemon, the cases, main()'s prologue)

KiB = 1024
MiB = 1024 * KiB

QCOWD = qcowd.QCOWD
QEMU_IMG = qcowd.QEMU_IMG
QEMU_IO = qcowd.QEMU_IO
OPENAPI = os.environ.get("OPENAPI") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "..", "..", "openapi", "openapi.yaml")
RANGES_PER_IMAGE = 100
if os.environ.get("QCOWD_S3"):  # each range costs S3 round trips (Swift on loopback): fewer
    RANGES_PER_IMAGE = 40
CLIENTS = 16
READS_PER_CLIENT = 25


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300, **kw)


def qemu_io(img, *cmds, fmt="qcow2"):
    args = [QEMU_IO, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, img)


# ---- the catalog ----

GOOD = ["plain", "compressed", "extl2", "snap", "base", "overlay", "empty"]
# broken image -> error code its listing must show
BROKEN = {"outside": "outside-catalog", "dotdot": "outside-catalog", "corrupt": "corrupt-image",
          "notqcow2": "corrupt-image", "nobacking": "bad-backing-chain"}


def build_catalog(d):
    def p(name):
        return os.path.join(d, name + ".qcow2")

    run(QEMU_IMG, "create", "-q", "-f", "qcow2", p("plain"), "16M")
    qemu_io(p("plain"), "write -q -P 0xa1 0 1M", "write -q -P 0x5c 3M 12345", "write -q -z 5M 1M",
            "write -q -P 0x33 8M 64k", "write -q -P 0x7e 16760832 4096")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", p("compressed"), "8M")
    qemu_io(p("compressed"), "write -q -c -P 0x11 0 64k", "write -q -c -P 0x22 1M 64k",
            "write -q -P 0x44 2M 100k", "write -q -c -P 0x66 7M 64k")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", p("extl2"), "8M")
    qemu_io(p("extl2"), "write -q -P 0x12 4k 4k", "write -q -P 0x34 70k 10k", "write -q -z 200k 8k",
            "write -q -P 0x56 1M 2k")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", p("snap"), "4M")
    qemu_io(p("snap"), "write -q -P 0x01 0 1M")
    run(QEMU_IMG, "snapshot", "-c", "s1", p("snap"))
    qemu_io(p("snap"), "write -q -P 0x02 512k 64k", "write -q -z 0 64k")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", p("base"), "8M")
    qemu_io(p("base"), "write -q -P 0xb0 0 4M", "write -q -P 0xb1 6M 1M")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p("overlay"))
    qemu_io(p("overlay"), "write -q -P 0xc0 1M 64k", "write -q -z 2M 128k", "write -q -P 0xc1 5M 8k")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", p("empty"), "0")
    # broken ones
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", p("outside"), "1M")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "../x.qcow2", "-F", "qcow2", p("dotdot"), "1M")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", p("nobacking"), "1M")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", p("corrupt"), "1M")
    with open(p("corrupt"), "r+b") as f:  # l1_table_offset, not cluster aligned
        f.seek(40)
        f.write((0x30008).to_bytes(8, "big"))
    with open(p("notqcow2"), "wb") as f:
        f.write(random.Random(5).randbytes(64 * KiB))
    # not part of the catalog: a name no URL may hold, another suffix
    with open(os.path.join(d, "bad name.qcow2"), "wb") as f:
        f.write(b"x")
    with open(os.path.join(d, "readme.txt"), "wb") as f:
        f.write(b"x")


def raw_of(d, name):
    out = os.path.join(d, "..", name + ".raw")
    run(QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", os.path.join(d, name + ".qcow2"), out)
    with open(out, "rb") as f:
        return f.read()


def runs_of_map(d, name):
    """qemu-img map's view as merged (start, length, zero, hole) runs."""
    out = run(QEMU_IMG, "map", "-f", "qcow2", "--output=json", os.path.join(d, name + ".qcow2")).stdout
    runs = []
    for e in json.loads(out):
        if e["length"] == 0:  # qemu-img shows an empty disk as one empty entry
            continue
        z, h = bool(e["zero"]), not e["present"]
        if runs and runs[-1][2] == z and runs[-1][3] == h and runs[-1][0] + runs[-1][1] == e["start"]:
            runs[-1][1] += e["length"]
        else:
            runs.append([e["start"], e["length"], z, h])
    return [{"start": s, "length": n, "zero": z, "hole": h} for s, n, z, h in runs]


# ---- the catalog in a bucket (QCOWD_S3=1) ----

S3 = None  # the tests/s3 store while the suite runs with QCOWD_S3=1
S3_BUCKET, S3_PREFIX = "qcowd-daemon", "catalog"


def s3_start(top):
    """Start Swift (tests/s3/s3fixture.py) and create the bucket; None without QCOWD_S3.
    Raises SystemExit(77) when Swift is not installed."""
    global S3
    if not os.environ.get("QCOWD_S3"):
        return None
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "s3"))
    import s3fixture
    if not os.environ.get("S3_ENDPOINT") and not s3fixture.have_swift():
        print("QCOWD_S3: Swift is not installed: skipped", file=sys.stderr)
        raise SystemExit(77)
    S3 = s3fixture.Swift(os.path.join(top, "swift"))
    S3.create_bucket(S3_BUCKET)
    return S3


def s3_stop():
    if S3:
        S3.stop()


def finish(top, keep, daemons):
    """The end of a suite's main(): kills the daemons still running (None is
    skipped), stops the S3 store if any, removes top (said and kept with keep)."""
    for d in daemons:
        if d:
            d.kill()
    s3_stop()
    qcowd.remove_temp(top, keep)


def sync_up(cat):
    """Upload every file of the local catalog folder to the bucket (no-op locally)."""
    if S3:
        for f in sorted(os.listdir(cat)):
            S3.put_file(S3_BUCKET, S3_PREFIX + "/" + f, os.path.join(cat, f))


def sync_down(cat, only=None):
    """Make the local catalog folder a copy of the bucket's (no-op locally), so the
    checks that run qemu-img or list files see what qcowd wrote; only: one file."""
    if not S3:
        return
    keys = {k[len(S3_PREFIX) + 1:]: k for k in S3.keys(S3_BUCKET, S3_PREFIX + "/" + (only or ""))}
    if only:
        keys = {f: k for f, k in keys.items() if f == only}
        if only not in keys and os.path.exists(os.path.join(cat, only)):
            os.remove(os.path.join(cat, only))
    for f in [only] if only else os.listdir(cat):
        if f not in keys and os.path.isfile(os.path.join(cat, f)):
            os.remove(os.path.join(cat, f))
    for f, k in keys.items():
        if f and "/" not in f:
            with open(os.path.join(cat, f), "wb") as out:
                out.write(S3.get(S3_BUCKET, k))


def store_put(cat, src, name):
    """Put the local file src into the catalog as name (a file copy, or a PUT)."""
    if S3:
        S3.put_file(S3_BUCKET, S3_PREFIX + "/" + name, src)
    else:
        shutil.copy(src, os.path.join(cat, name + ".tmp-put"))
        os.replace(os.path.join(cat, name + ".tmp-put"), os.path.join(cat, name))


def store_remove(cat, name):
    if S3:
        S3.delete(S3_BUCKET, S3_PREFIX + "/" + name)
    else:
        os.remove(os.path.join(cat, name))


def store_names(cat):
    """The file names of the catalog: the folder's, or the bucket's keys under the prefix."""
    if S3:
        return [k[len(S3_PREFIX) + 1:] for k in S3.keys(S3_BUCKET, S3_PREFIX + "/")]
    return os.listdir(cat)


# ---- the daemon ----

# These suites change objects behind qcowd's back (as files of a local folder)
# and expect it to notice at once: the plugin asks the store on every stat.
# What stat-ttl saves, and when changes are noticed with it, is tests/s3/s3.py's.
S3_OPTS = ("stat-ttl=0",)


class Daemon(qcowd.Qcowd):
    """qcowd serving catalog (with QCOWD_S3, the bucket's catalog, staging beside
    catalog) with `threads` HTTP threads and the extra arguments."""

    def __init__(self, catalog, threads=4, extra=()):
        s3 = S3.qcowd_args(S3_BUCKET, S3_PREFIX, os.path.join(catalog, "..", "staging"), *S3_OPTS) if S3 else []
        super().__init__(QCOWD, ["--catalog", catalog, "--threads", str(threads)] + s3 + list(extra),
                         env=S3.env() if S3 else None)

    def request(self, method, path, headers=None, conn=None):
        """exchange() without a body: (status, headers, body)."""
        return self.exchange(method, path, headers=headers, conn=conn)


class Checker(qcowd.Cases):
    """The cases of an HTTP suite, with the OpenAPI document (doc), every JSON body
    seen (checked against it at the end) and a count of bad inputs tried."""

    def __init__(self, args):
        super().__init__(args.seed)
        self.args = args
        self.bad_inputs = 0  # bad-input cases tried (every expected error counts one)
        with open(OPENAPI) as f:
            self.doc = yaml.safe_load(f)
        self.seen = []  # (schema name, json body, where)

    def report(self):
        """The summary lines; returns the exit status."""
        print("%d bad-input cases tried" % self.bad_inputs)
        return self.summary()

    # -- helpers --
    def json_of(self, status, headers, body, schema, where):
        if not headers.get("content-type", "").startswith("application/json"):
            raise AssertionError("%s: content-type %r, not JSON" % (where, headers.get("content-type")))
        j = json.loads(body)
        self.seen.append((schema, j, where))
        return j

    def expect_error(self, where, status, want_status, headers, body, code=None):
        self.bad_inputs += 1
        if status != want_status:
            raise AssertionError("%s: status %d, want %d (%r)" % (where, status, want_status, body[:200]))
        j = self.json_of(status, headers, body, "Error", where)
        if code and j["error"]["code"] != code:
            raise AssertionError("%s: code %r, want %r" % (where, j["error"]["code"], code))
        if not j["error"].get("message"):
            raise AssertionError("%s: empty message" % where)
        return j


def lint_openapi(doc):
    assert str(doc.get("openapi", "")).startswith("3.1"), "not OpenAPI 3.1"
    for key in ("info", "paths", "components"):
        assert key in doc, "no " + key

    def resolve(ref):
        assert ref.startswith("#/"), "external $ref " + ref
        node = doc
        for part in ref[2:].split("/"):
            assert isinstance(node, dict) and part in node, "unresolved $ref " + ref
            node = node[part]
        return node

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    resolve(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    nops = 0
    for path, item in doc["paths"].items():
        assert path.startswith("/"), path
        for params in [item.get("parameters", [])]:
            for prm in params:
                prm = resolve(prm["$ref"]) if "$ref" in prm else prm
                if prm["in"] == "path":
                    assert "{%s}" % prm["name"] in path, "%s: path parameter %s not in path" % (path, prm["name"])
        for m, op in item.items():
            if m not in methods:
                continue
            nops += 1
            assert op.get("operationId"), "%s %s: no operationId" % (m, path)
            resps = op.get("responses")
            assert resps, "%s %s: no responses" % (m, path)
            for st, r in resps.items():
                assert re.fullmatch(r"[1-5][0-9][0-9]", str(st)), "%s %s: status %r" % (m, path, st)
                r = resolve(r["$ref"]) if "$ref" in r else r
                assert r.get("description"), "%s %s %s: no description" % (m, path, st)
                if str(st) in ("204", "304"):  # no body by definition
                    assert not r.get("content"), "%s %s %s: a body is described" % (m, path, st)
                    continue
                content = r.get("content")
                assert content, "%s %s %s: no content" % (m, path, st)
                for ctype, media in content.items():
                    assert "schema" in media, "%s %s %s %s: no schema" % (m, path, st, ctype)
                    schema = media["schema"]
                    jsonschema.Draft202012Validator.check_schema(
                        dict(schema, components=doc["components"]) if "$ref" not in schema else
                        {"$ref": schema["$ref"], "components": doc["components"]})
    assert nops >= 5, "only %d operations" % nops
    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)


def validate(doc, schema_name, instance):
    schema = {"$ref": "#/components/schemas/" + schema_name, "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def main():
    args, top, cat = qcowd.prologue("qcowd-daemon-")
    ck = Checker(args)
    d = None
    try:
        build_catalog(cat)
        raws = {n: raw_of(cat, n) for n in GOOD}
        s3_start(top)
        sync_up(cat)
        d = Daemon(cat)
        rng = ck.rng

        ck.case("openapi_lint", lambda: lint_openapi(ck.doc))

        def health():
            st, h, b = d.request("GET", "/v1/health")
            assert st == 200, st
            assert ck.json_of(st, h, b, "Health", "health") == {"status": "ok"}
        ck.case("health", health)

        def listing():
            st, h, b = d.request("GET", "/v1/images")
            assert st == 200, st
            j = ck.json_of(st, h, b, "ImageList", "list")
            names = [i["name"] for i in j["images"]]
            want = sorted(GOOD + list(BROKEN))
            assert names == want, "names %s, want %s" % (names, want)
            for i in j["images"]:
                if i["name"] in BROKEN:
                    assert "error" in i, "%s listed without an error" % i["name"]
                    assert i["error"]["code"] == BROKEN[i["name"]], "%s: %r" % (i["name"], i["error"])
                else:
                    assert "error" not in i, "%s: %r" % (i["name"], i.get("error"))
        ck.case("list_names_and_errors", listing)

        def info():
            for n in GOOD:
                st, h, b = d.request("GET", "/v1/images/" + n)
                assert st == 200, (n, st, b)
                j = ck.json_of(st, h, b, "ImageInfo", "info " + n)
                q = json.loads(run(QEMU_IMG, "info", "--output=json", os.path.join(cat, n + ".qcow2")).stdout)
                for k in ("virtual-size", "cluster-size", "format", "backing-filename", "backing-filename-format"):
                    assert j.get(k) == q.get(k), "%s %s: %r, qemu-img %r" % (n, k, j.get(k), q.get(k))
                qd, jd = q["format-specific"]["data"], j["format-specific"]["data"]
                for k in ("compat", "compression-type", "refcount-bits", "extended-l2", "corrupt"):
                    assert jd.get(k) == qd.get(k), "%s %s: %r, qemu-img %r" % (n, k, jd.get(k), qd.get(k))
                assert [s["name"] for s in j["snapshots"]] == [s["name"] for s in q.get("snapshots", [])], n
            for n, code in BROKEN.items():
                st, h, b = d.request("GET", "/v1/images/" + n)
                ck.expect_error("info " + n, st, 422, h, b, code)
                st, h, b = d.request("GET", "/v1/images/%s/data" % n, {"Range": "bytes=0-15"})
                ck.expect_error("data " + n, st, 422, h, b, code)
        ck.case("info_matches_qemu_img", info)

        def ranges():
            total = 0
            c = d.conn()  # keep-alive: many requests on one connection
            for n in GOOD:
                raw = raws[n]
                size = len(raw)
                if size == 0:
                    continue
                for i in range(RANGES_PER_IMAGE):
                    kind = rng.random()
                    a = rng.randrange(size)
                    if kind < 0.6:
                        b_ = min(size - 1, a + rng.choice([0, 1, 511, 4095, 65535, 65536, rng.randrange(3 * MiB)]))
                        hdr, want = "bytes=%d-%d" % (a, b_), (a, b_)
                    elif kind < 0.75:
                        a = max(0, size - rng.randrange(1, 300 * KiB))
                        hdr, want = "bytes=%d-" % a, (a, size - 1)
                    elif kind < 0.9:
                        k = rng.randrange(1, 200 * KiB)
                        hdr, want = "bytes=-%d" % k, (max(0, size - k), size - 1)
                    else:  # past the end: clipped
                        hdr, want = "bytes=%d-%d" % (a, size + 12345), (a, size - 1)
                    st, h, body = d.request("GET", "/v1/images/%s/data" % n, {"Range": hdr}, conn=c)
                    assert st == 206, (n, hdr, st, body[:200])
                    assert h.get("content-range") == "bytes %d-%d/%d" % (want[0], want[1], size), \
                        (n, hdr, h.get("content-range"))
                    assert h.get("accept-ranges") == "bytes", h
                    if body != raw[want[0]:want[1] + 1]:
                        bad = next(i for i in range(len(body)) if body[i] != raw[want[0] + i]) \
                            if len(body) == want[1] + 1 - want[0] else -1
                        raise AssertionError("%s %s: bytes differ (len %d, first difference at %d)" %
                                             (n, hdr, len(body), bad))
                    total += 1
            c.close()
            assert total >= RANGES_PER_IMAGE * (len(GOOD) - 1)
        ck.case("random_ranges_equal_qemu_img_convert", ranges)

        def whole():
            for n in GOOD:
                st, h, body = d.request("GET", "/v1/images/%s/data" % n)
                assert st == 200, (n, st)
                assert body == raws[n], "%s: whole disk differs (%d vs %d bytes)" % (n, len(body), len(raws[n]))
                assert h.get("accept-ranges") == "bytes"
                st, h, body = d.request("HEAD", "/v1/images/%s/data" % n)
                assert st == 200 and body == b"", (n, st, len(body))
                assert int(h["content-length"]) == len(raws[n]), (n, h.get("content-length"))
            st, h, body = d.request("HEAD", "/v1/images/plain/data", {"Range": "bytes=10-19"})
            assert st == 206 and body == b"" and h.get("content-range") == "bytes 10-19/%d" % (16 * MiB), (st, h)
        ck.case("whole_disk_and_head", whole)

        def extents():
            for n in GOOD:
                st, h, b = d.request("GET", "/v1/images/%s/extents?context=zero" % n)
                assert st == 200, (n, st, b[:200])
                j = ck.json_of(st, h, b, "Extents", "extents " + n)
                want = runs_of_map(cat, n)
                assert j == want, "%s:\n  qcowd %s\n  qemu  %s" % (n, j, want)
            st, h, b = d.request("GET", "/v1/images/plain/extents")  # context defaults to zero
            assert st == 200 and json.loads(b) == runs_of_map(cat, "plain")
        ck.case("extents_equal_qemu_img_map", extents)

        def bad_ranges():
            size = 16 * MiB
            cases = [
                ("bytes=abc", 400, None), ("items=0-1", 400, None), ("bytes=5-1", 400, None),
                ("bytes=", 400, None), ("bytes=-", 400, None), ("bytes=1-2x", 400, None),
                ("bytes=%d-" % size, 416, "range-not-satisfiable"),
                ("bytes=%d-%d" % (size + 5, size + 9), 416, "range-not-satisfiable"),
                ("bytes=99999999999999999999999-", 416, "range-not-satisfiable"),
                ("bytes=-0", 416, "range-not-satisfiable"),
                ("bytes=0-1,5-6", 416, "range-not-satisfiable"),
                ("bytes=0-1, -5", 416, "range-not-satisfiable"),
            ]
            for hdr, want, code in cases:
                st, h, b = d.request("GET", "/v1/images/plain/data", {"Range": hdr})
                j = ck.expect_error("Range: " + hdr, st, want, h, b, code)
                if want == 416:
                    assert h.get("content-range") == "bytes */%d" % size, (hdr, h.get("content-range"))
                if "," in hdr:
                    assert "multiple ranges" in j["error"]["message"], j
            st, h, b = d.request("GET", "/v1/images/empty/data", {"Range": "bytes=0-0"})
            ck.expect_error("empty disk range", st, 416, h, b, "range-not-satisfiable")
            assert d.alive()
        ck.case("bad_ranges", bad_ranges)

        def bad_paths():
            cases = [
                ("GET", "/v1/images/nosuch", 404, "not-found"),
                ("GET", "/v1/images/nosuch/data", 404, "not-found"),
                ("GET", "/v1/images/nosuch/extents", 404, "not-found"),
                ("GET", "/v1/images/..%2Fx", 400, "bad-request"),
                ("GET", "/v1/images/%2e%2e", 400, "bad-request"),
                ("GET", "/v1/images/%2e%2e/data", 400, "bad-request"),
                ("GET", "/v1/images/../x", 400, "bad-request"),
                ("GET", "/v1/images/./plain", 400, "bad-request"),
                ("GET", "/v1/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/data", 400, "bad-request"),
                ("GET", "/v1/images/" + "a" * 129, 400, "bad-request"),
                ("GET", "/v1/images/" + "a" * 4000 + "/data", 400, "bad-request"),
                ("GET", "/v1/images/a%00b", 400, "bad-request"),
                ("GET", "/v1/images/%zz", 400, "bad-request"),
                ("GET", "/v1/images/abc%", 400, "bad-request"),
                ("GET", "/v1/images/.hidden", 400, "bad-request"),
                ("GET", "/v1/images/bad%20name", 400, "bad-request"),
                ("GET", "/v1/images/plain.qcow2", 404, "not-found"),
                ("GET", "/v1/images/plain/extents?context=dirty", 400, "bad-request"),
                ("GET", "/nope", 404, "not-found"),
                ("GET", "/ui/", 404, "not-found"),  # / is the dashboard (tests/web)
                ("GET", "/v1/images/plain/data/more", 404, "not-found"),
                ("GET", "/v1/images/", 400, "bad-request"),  # an empty name
                ("GET", "/v1//images", 404, "not-found"),
            ]
            for m, path, want, code in cases:
                st, h, b = d.request(m, path)
                ck.expect_error("%s %s" % (m, path[:60]), st, want, h, b, code)
            for m, path, allow in [("POST", "/v1/images/plain", "GET, HEAD, DELETE"),
                                   ("PUT", "/v1/images/plain", "GET, HEAD, DELETE"),
                                   ("POST", "/v1/images/plain/data", "GET, HEAD, PUT, PATCH, OPTIONS"),
                                   ("DELETE", "/v1/images/plain/data", "GET, HEAD, PUT, PATCH, OPTIONS"),
                                   ("PATCH", "/v1/images/plain/extents", "GET, HEAD"),
                                   ("DELETE", "/v1/images/plain/file", "GET, HEAD, PUT"),
                                   ("POST", "/v1/health", "GET, HEAD"), ("OPTIONS", "/v1/images", "GET, HEAD, POST"),
                                   ("DELETE", "/v1/images", "GET, HEAD, POST"), ("POST", "/metrics", "GET, HEAD")]:
                st, h, b = d.request(m, path)
                ck.expect_error("%s %s" % (m, path), st, 405, h, b, "method-not-allowed")
                assert h.get("allow") == allow, (m, path, h.get("allow"))
            # a raw request line no client library would send
            s = socket.create_connection(("127.0.0.1", d.port), timeout=30)
            s.sendall(b"GET /v1/images/%41%2F%2E%2E HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            resp = b""
            while True:
                k = s.recv(65536)
                if not k:
                    break
                resp += k
            s.close()
            assert resp.startswith(b"HTTP/1.1 400"), resp[:100]
            st, h, b = d.request("GET", "/v1/health")
            assert st == 200 and d.alive()
        ck.case("bad_paths_and_methods", bad_paths)

        def drop_in():
            store_put(cat, os.path.join(cat, "plain.qcow2"), "dropped.qcow2")
            st, h, b = d.request("GET", "/v1/images")
            assert "dropped" in [i["name"] for i in json.loads(b)["images"]]
            st, h, b = d.request("GET", "/v1/images/dropped/data", {"Range": "bytes=0-99"})
            assert st == 206 and b == raws["plain"][:100]
            # replaced by another image: the new content is served
            store_put(cat, os.path.join(cat, "base.qcow2"), "dropped.qcow2")
            if not S3:
                t = time.time() + 5
                os.utime(os.path.join(cat, "dropped.qcow2"), (t, t))
            st, h, b = d.request("GET", "/v1/images/dropped/data", {"Range": "bytes=0-99"})
            assert st == 206 and b == raws["base"][:100], "stale image served after replacement"
            store_remove(cat, "dropped.qcow2")
            st, h, b = d.request("GET", "/v1/images/dropped")
            ck.expect_error("removed image", st, 404, h, b, "not-found")
        ck.case("dropped_in_replaced_removed", drop_in)

        def parallel():
            errors = []
            names = [n for n in GOOD if raws[n]]

            def client(seed):
                r = random.Random(seed)
                c = d.conn()
                try:
                    for _ in range(READS_PER_CLIENT):
                        n = r.choice(names)
                        raw = raws[n]
                        a = r.randrange(len(raw))
                        b_ = min(len(raw) - 1, a + r.randrange(512 * KiB))
                        st, h, body = d.request("GET", "/v1/images/%s/data" % n, {"Range": "bytes=%d-%d" % (a, b_)},
                                                conn=c)
                        if st != 206 or body != raw[a:b_ + 1]:
                            errors.append("%s bytes=%d-%d: status %d, %d bytes, equal %s" %
                                          (n, a, b_, st, len(body), body == raw[a:b_ + 1]))
                            return
                except Exception as e:
                    errors.append(repr(e))
                finally:
                    c.close()

            ts = [threading.Thread(target=client, args=(rng.random(),)) for _ in range(CLIENTS)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert not errors, errors[:3]
        ck.case("parallel_clients_every_byte", parallel)

        def schemas():
            for name, body, where in ck.seen:
                try:
                    validate(ck.doc, name, body)
                except jsonschema.ValidationError as e:
                    raise AssertionError("%s: %s" % (where, e.message))
            assert len(ck.seen) > 50, len(ck.seen)
        ck.case("responses_match_openapi_schemas", schemas)

        def log_lines():
            assert any(re.search(r"GET /v1/health 200 \d+ [\d.]+ms", ln) for ln in d.lines), d.lines[-5:]
            assert any(re.search(r"GET /v1/images/plain/data 206 \d+ ", ln) for ln in d.lines)
        ck.case("one_log_line_per_request", log_lines)

        def sigterm():
            # a slow download in flight when SIGTERM arrives must complete
            c = d.conn()
            c.request("GET", "/v1/images/plain/data")
            r = c.getresponse()
            first = r.read(64 * KiB)
            d.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            refused = False
            try:
                socket.create_connection(("127.0.0.1", d.port), timeout=5).close()
            except OSError:
                refused = True
            rest = r.read()
            c.close()
            assert first + rest == raws["plain"], "in-flight download cut short (%d bytes)" % len(first + rest)
            d.check_clean_exit(60)
            assert refused, "new connections still accepted after SIGTERM"
        ck.case("sigterm_finishes_in_flight_and_exits_0", sigterm)
    except Exception:
        ck.setup_failed()
    finally:
        finish(top, args.keep, [d])
    return ck.report()


if __name__ == "__main__":
    sys.exit(main())
