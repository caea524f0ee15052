"""qcowd_client: a client for qcowd's REST API (openapi/openapi.yaml), standard
library only (http.client, json).

    from qcowd_client import Client, QcowdError
    c = Client("http://127.0.0.1:8080")
    c.create("disk", 1 << 30, cluster_size=65536)
    c.write("disk", 4096, b"hello")
    assert c.read("disk", 4096, 5) == b"hello"
    for e in c.extents("disk"):
        if not e["zero"]:
            data = c.read("disk", e["start"], e["length"])

Every method raises QcowdError(status, code, message) when the server answers
an error (its JSON body gives code and message) and OSError when it cannot be
reached. A Client keeps one HTTP/1.1 connection: use one Client per thread.
"""

import http.client
import json
import os
import ssl
import urllib.parse

__all__ = ["Client", "QcowdError"]

CHUNK = 1 << 20  # bytes per socket read or write when streaming


class QcowdError(Exception):
    """An error answer: HTTP status, the error code ("not-found", ...) and message."""

    def __init__(self, status, code, message):
        super().__init__("%s (HTTP %d, %s)" % (message, status, code))
        self.status = status
        self.code = code
        self.message = message


class Client:
    def __init__(self, url="http://127.0.0.1:8080", timeout=300, token=None, cacert=None):
        """url: the server; token: the bearer token sent with every request
        (default $QCOWD_TOKEN); cacert: a PEM file of the CA that verifies an
        https:// server (default $QCOWD_CACERT, else the system's)."""
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("not an http(s) URL: %r" % url)
        self.url = url
        self._https = u.scheme == "https"
        self._host = u.hostname
        self._port = u.port or (443 if self._https else 80)
        self._prefix = u.path.rstrip("/")
        self._timeout = timeout
        self._conn = None
        token = token if token is not None else os.environ.get("QCOWD_TOKEN") or None
        if token is not None and ("\r" in token or "\n" in token):
            raise ValueError("the token has a line break in it")
        self._auth = {"Authorization": "Bearer " + token} if token else {}
        cacert = cacert if cacert is not None else os.environ.get("QCOWD_CACERT") or None
        self._ssl = ssl.create_default_context(cafile=cacert) if self._https else None

    # ---- plumbing ----

    def close(self):
        if self._conn:
            self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _connection(self):
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                                         context=self._ssl)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    @staticmethod
    def _image(name, suffix=""):
        return "/v1/images/" + urllib.parse.quote(name, safe="") + suffix

    def _send(self, method, path, body=None, headers=None):
        """Sends a request and returns the response, headers read, body not.
        A request whose body can be sent again is retried once on a fresh
        connection if a kept-alive one turns out to be closed."""
        headers = dict(headers or {})
        headers.update(self._auth)
        retry = body is None or isinstance(body, (bytes, bytearray, memoryview))
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    http.client.CannotSendRequest):
                self.close()
                if attempt or not retry:
                    raise

    def _check(self, resp, ok):
        if resp.status in ok:
            return resp
        body = resp.read()
        if resp.will_close:
            self.close()
        code, message = None, None
        try:
            err = json.loads(body)["error"]
            code, message = err.get("code"), err.get("message")
        except (ValueError, KeyError, TypeError):
            pass
        raise QcowdError(resp.status, code, message or body.decode(errors="replace")[:200] or resp.reason)

    def _call(self, method, path, ok=(200,), body=None, headers=None):
        """A request whose whole answer is small: returns (response, body bytes)."""
        resp = self._check(self._send(method, path, body, headers), ok)
        data = resp.read()
        if resp.will_close:
            self.close()
        return resp, data

    def _json(self, method, path, ok=(200,), obj=None):
        body, headers = None, {}
        if obj is not None:
            body = json.dumps(obj).encode()
            headers["Content-Type"] = "application/json"
        _, data = self._call(method, path, ok, body, headers)
        return json.loads(data) if data else None

    # ---- the API ----

    def health(self):
        """GET /v1/health: {"status": "ok"}."""
        return self._json("GET", "/v1/health")

    def metrics(self):
        """GET /metrics: the Prometheus text."""
        return self._call("GET", "/metrics")[1].decode()

    def list(self):
        """The catalog: a list of info dicts (or {"name", "error"} for broken images)."""
        return self._json("GET", "/v1/images")["images"]

    def info(self, name):
        return self._json("GET", self._image(name))

    def create(self, name, size=None, **options):
        """Creates an image; options as QMP's blockdev-create, with '_' for '-'
        (cluster_size=65536, backing_file="base", extended_l2=True, ...).
        Returns the new image's info."""
        obj = {"name": name}
        if size is not None:
            obj["size"] = size
        for k, v in options.items():
            obj[k.replace("_", "-")] = v
        return self._json("POST", "/v1/images", (201,), obj)

    def delete(self, name):
        self._call("DELETE", self._image(name), (204,))

    def size(self, name):
        """The virtual size, from HEAD .../data."""
        resp, _ = self._call("HEAD", self._image(name, "/data"))
        return int(resp.getheader("Content-Length"))

    def options(self, name):
        """OPTIONS .../data: {"features": [...], "max_readers", "max_writers"}."""
        return self._json("OPTIONS", self._image(name, "/data"))

    def read(self, name, offset=0, length=None):
        """Guest bytes [offset, offset+length) (length None: to the end); a
        range past the end of the disk is cut there."""
        if length == 0:
            return b""
        last = "" if length is None else str(offset + length - 1)
        resp, data = self._call("GET", self._image(name, "/data"), (200, 206),
                                headers={"Range": "bytes=%d-%s" % (offset, last)})
        return data

    def write(self, name, offset, data, flush=True):
        """Writes bytes (or a binary file object, read to its end) at offset."""
        if hasattr(data, "read"):
            pos = data.tell()
            length = os.fstat(data.fileno()).st_size - pos
        else:
            data = memoryview(data).cast("B")
            length = len(data)
            if length == 0:
                return
            data = bytes(data)
        if length == 0:
            return
        headers = {"Content-Range": "bytes %d-%d/*" % (offset, offset + length - 1),
                   "Content-Length": str(length), "Content-Type": "application/octet-stream"}
        self._call("PUT", self._image(name, "/data?flush=" + ("y" if flush else "n")), (204,), data, headers)

    def zero(self, name, offset, size, flush=True):
        self._json("PATCH", self._image(name, "/data"), (204,),
                   {"op": "zero", "offset": offset, "size": size, "flush": flush})

    def discard(self, name, offset, size, flush=True):
        self._json("PATCH", self._image(name, "/data"), (204,),
                   {"op": "discard", "offset": offset, "size": size, "flush": flush})

    def flush(self, name):
        self._json("PATCH", self._image(name, "/data"), (204,), {"op": "flush"})

    def extents(self, name, context="zero"):
        """[{"start", "length", "zero", "hole"}, ...] covering the disk."""
        return self._json("GET", self._image(name, "/extents?context=" + urllib.parse.quote(context)))

    def upload(self, name, path):
        """PUT .../file: a qcow2 file becomes image `name` (streamed). Returns its info."""
        with open(path, "rb") as f:
            length = os.fstat(f.fileno()).st_size
            headers = {"Content-Length": str(length), "Content-Type": "application/octet-stream"}
            resp = self._check(self._send("PUT", self._image(name, "/file"), f, headers), (201,))
            data = resp.read()
            if resp.will_close:
                self.close()
            return json.loads(data)

    def download(self, name, path):
        """GET .../file into path (streamed; path appears only when complete)."""
        resp = self._check(self._send("GET", self._image(name, "/file")), (200,))
        part = path + ".part"
        try:
            with open(part, "wb") as f:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
            if resp.length not in (None, 0):
                raise OSError("download of %s ended early" % name)
            os.replace(part, path)
        except BaseException:
            self.close()
            try:
                os.unlink(part)
            except OSError:
                pass
            raise
        if resp.will_close:
            self.close()
