"""s3fixture.py: a throw-away S3 store for tests (OpenStack Swift with s3api on
loopback, started by start-swift-s3.sh next to this file) and a small SigV4 client
to fill and inspect buckets.

Other suites reuse it:

    sys.path.insert(0, os.path.join(TOP, "tests", "s3"))
    import s3fixture
    with s3fixture.Swift() as s3:          # starts Swift (about 4-10 s), stops it at exit
        s3.create_bucket("b")
        s3.put("b", "img/x.qcow2", data)
        args = s3.qcowd_args("b", "img")    # --catalog s3://b/img --s3-endpoint ... --s3-opt ...
        env = s3.env()                      # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION

A test run may share one server: set S3_ENDPOINT (and optionally S3_ACCESS_KEY,
S3_SECRET_KEY) to use a running store instead of starting one.
"""
import datetime
import hashlib
import hmac
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ACCESS = "test:tester"
SECRET = "testing"
REGION = "us-east-1"
SKIP = 77


def have_swift():
    return all(shutil.which(c) for c in ("swift-proxy-server", "swift-account-server",
                                         "swift-container-server", "swift-object-server"))


def ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port_block(n=5):
    """A base port with n free consecutive ports after it, below the ephemeral range
    when there is room: there, no client connection nor listener on port 0 (another
    test running at the same time) takes one between this check and Swift's bind."""
    low = ephemeral_low()
    for _ in range(200):
        if low > 12000:
            base = random.SystemRandom().randrange(10000, low - n)
        else:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
            s.close()
        if base + n >= 65535:
            continue
        ok = True
        for p in range(base, base + n):
            t = socket.socket()
            try:
                t.bind(("127.0.0.1", p))
            except OSError:
                ok = False
            finally:
                t.close()
            if not ok:
                break
        if ok:
            return base
    raise RuntimeError("no block of free ports")


def quote(s, keep_slash):
    return urllib.parse.quote(s, safe="-_.~/" if keep_slash else "-_.~")


class Client:
    """Path-style SigV4 requests to endpoint (our own small signer, independent of qcowd's)."""

    def __init__(self, endpoint, access=ACCESS, secret=SECRET, region=REGION):
        self.endpoint = endpoint.rstrip("/")
        self.access, self.secret, self.region = access, secret, region

    def request(self, method, bucket, key="", params=None, headers=None, body=b""):
        host = urllib.parse.urlsplit(self.endpoint).netloc
        path = "/" + quote(bucket, False) + ("/" + quote(key, True) if key else "")
        params = params or {}
        query = "&".join("%s=%s" % (quote(k, False), quote(v, False))
                         for k, v in sorted(params.items()))
        amz = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        scope = "%s/%s/s3/aws4_request" % (amz[:8], self.region)
        phash = hashlib.sha256(body).hexdigest()
        hdrs = {"host": host, "x-amz-date": amz, "x-amz-content-sha256": phash}
        for k, v in (headers or {}).items():
            hdrs[k.lower()] = v
        names = sorted(hdrs)
        creq = "\n".join([method, path, query] + ["%s:%s" % (n, hdrs[n].strip()) for n in names] +
                         ["", ";".join(names), phash])
        sts = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(creq.encode()).hexdigest()])
        k = ("AWS4" + self.secret).encode()
        for part in scope.split("/"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
        hdrs["authorization"] = "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
            self.access, scope, ";".join(names), sig)
        del hdrs["host"]
        url = self.endpoint + path + ("?" + query if query else "")
        req = urllib.request.Request(url, data=body if method in ("PUT", "POST") else None,
                                     headers=hdrs, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def ok(self, what, res):
        if res[0] // 100 != 2:
            raise RuntimeError("%s: %d %s" % (what, res[0], res[2][:300]))
        return res

    def create_bucket(self, bucket):
        """Create bucket; one this store already has is emptied instead."""
        r = self.request("PUT", bucket)
        if r[0] == 409 and b"BucketAlreadyOwnedByYou" in r[2]:
            for k in self.keys(bucket):
                self.delete(bucket, k)
            return
        self.ok("create bucket " + bucket, r)

    def put(self, bucket, key, data):
        self.ok("put " + key, self.request("PUT", bucket, key, body=data))

    def put_file(self, bucket, key, path):
        with open(path, "rb") as f:
            self.put(bucket, key, f.read())

    def get(self, bucket, key, rng=None):
        h = {"range": "bytes=%d-%d" % rng} if rng else None
        return self.ok("get " + key, self.request("GET", bucket, key, headers=h))[2]

    def exists(self, bucket, key):
        return self.request("HEAD", bucket, key)[0] == 200

    def delete(self, bucket, key):
        self.request("DELETE", bucket, key)

    def keys(self, bucket, prefix=""):
        import re
        out, token = [], None
        while True:
            p = {"list-type": "2", "prefix": prefix}
            if token:
                p["continuation-token"] = token
            body = self.ok("list", self.request("GET", bucket, params=p))[2].decode()
            out += [urllib.parse.unquote(k) for k in re.findall(r"<Key>([^<]*)</Key>", body)]
            m = re.search(r"<NextContinuationToken>([^<]*)<", body)
            if "<IsTruncated>true" not in body or not m:
                return out
            token = m.group(1)

    def uploads(self, bucket):
        """Multipart uploads in progress (started, neither completed nor aborted)."""
        import re
        body = self.ok("list uploads", self.request("GET", bucket, params={"uploads": ""}))[2].decode()
        return re.findall(r"<UploadId>([^<]*)</UploadId>", body)


class Swift(Client):
    """Starts Swift+s3api in a temporary folder on free loopback ports; a context
    manager that stops it (only the processes it started)."""

    def __init__(self, workdir=None):
        ep = os.environ.get("S3_ENDPOINT")
        self.dir = None
        if ep:
            super().__init__(ep, os.environ.get("S3_ACCESS_KEY", ACCESS), os.environ.get("S3_SECRET_KEY", SECRET))
            return
        self.dir = workdir or tempfile.mkdtemp(prefix="qcowd-swift-")
        for attempt in range(3):  # a port of the block taken meanwhile: another block
            port = free_port_block()
            r = subprocess.run(["bash", os.path.join(HERE, "start-swift-s3.sh"), self.dir, str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180)
            out = r.stdout.decode(errors="replace")
            if r.returncode == 0 or not re.search(r"Could not bind|already in use", out):
                break
            print("Swift: a port of %d-%d was taken, trying others" % (port, port + 4), file=sys.stderr)
            shutil.rmtree(self.dir, ignore_errors=True)
        if r.returncode != 0:
            raise RuntimeError("Swift did not start:\n" + out)
        super().__init__("http://127.0.0.1:%d" % port)

    def stop(self):
        if self.dir:
            subprocess.run(["bash", os.path.join(HERE, "stop-swift-s3.sh"), self.dir],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def env(self, secret=None):
        e = dict(os.environ)
        e.update(AWS_ACCESS_KEY_ID=self.access, AWS_SECRET_ACCESS_KEY=secret or self.secret, AWS_REGION=self.region)
        return e

    def qcowd_args(self, bucket, prefix, staging=None, *opts):
        args = ["--catalog", "s3://%s/%s" % (bucket, prefix), "--s3-endpoint", self.endpoint]
        if self.endpoint.startswith("http://"):  # the local Swift: plain HTTP on loopback
            args += ["--s3-opt", "allow-http=yes"]
        if staging:
            args += ["--s3-opt", "staging-dir=" + staging]
        for o in opts:
            args += ["--s3-opt", o]
        return args
