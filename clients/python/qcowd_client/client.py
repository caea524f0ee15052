"""qcowd_client.client: Client, one method per operation of openapi/openapi.yaml,
over one kept-alive http.client connection (reopened when the server dropped it)."""

import collections
import http.client
import io
import json
import os
import shutil
import ssl
import stat
import tempfile
import time
import urllib.parse

from .errors import JobCancelled, JobFailed, JobTimeout, error_for

CHUNK = 1 << 20  # bytes per socket read or write when streaming
PIPE_CHUNK = 8 << 20  # a body of unknown length goes in PUTs of this size

# One event of GET /v1/events: type ("job-status", "image-changed", "lost", ...),
# id (the server's sequence number as a string, or None) and data (the parsed JSON).
Event = collections.namedtuple("Event", "type id data")

# a kept-alive connection the server closed shows as one of these on the next request
_DROPPED = (http.client.RemoteDisconnected, http.client.CannotSendRequest, BrokenPipeError, ConnectionResetError,
            ConnectionAbortedError)


def _remaining(f):
    """Bytes left in a binary file object from its position, or None when it cannot
    tell (a pipe, a socket, a generator-like stream)."""
    try:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode):
            return max(st.st_size - f.tell(), 0)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    try:
        if f.seekable():
            pos = f.tell()
            end = f.seek(0, io.SEEK_END)
            f.seek(pos)
            return max(end - pos, 0)
    except (AttributeError, OSError, ValueError):
        pass
    return None


def _query(**params):
    q = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return "?" + q if q else ""


def _kebab(options):
    return {k.replace("_", "-"): v for k, v in options.items()}


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
        self.connections = 0  # connections opened so far (one, while the server keeps it alive)
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

    def _new_connection(self, timeout):
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl,
                                               blocksize=CHUNK)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout, blocksize=CHUNK)

    def _connection(self):
        if self._conn is None:
            self._conn = self._new_connection(self._timeout)
            self.connections += 1
        return self._conn

    @staticmethod
    def _image(name, suffix=""):
        return "/v1/images/" + urllib.parse.quote(name, safe="") + suffix

    @classmethod
    def _item(cls, name, sub, item, suffix=""):
        return cls._image(name, "/%s/%s%s" % (sub, urllib.parse.quote(item, safe=""), suffix))

    @staticmethod
    def _job(job_id, suffix=""):
        return "/v1/jobs/" + urllib.parse.quote(str(job_id), safe="") + suffix

    def _send(self, method, path, body=None, headers=None):
        """Sends a request and returns the response, headers read, body not. When a
        kept-alive connection turns out to be closed, the request goes again on a
        fresh one if its body can be sent again (none, bytes, or a seekable file)."""
        headers = dict(headers or {})
        headers.update(self._auth)
        rewind = None
        if body is not None and not isinstance(body, (bytes, bytearray, memoryview)):
            try:
                pos = body.tell()
                rewind = lambda: body.seek(pos)  # noqa: E731
            except (AttributeError, OSError, ValueError):
                pass
        again = body is None or isinstance(body, (bytes, bytearray, memoryview)) or rewind is not None
        for attempt in (0, 1):
            conn = self._connection()
            reused = conn.sock is not None
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
                return conn.getresponse()
            except _DROPPED:
                self.close()
                if attempt or not again or not reused:
                    raise
                if rewind:
                    rewind()
            except BaseException:
                self.close()  # a half-sent request leaves the connection unusable
                raise

    def _finish(self, resp):
        if resp.will_close:
            self.close()

    def _check(self, resp, ok):
        if resp.status in ok:
            return resp
        body = resp.read()
        self._finish(resp)
        code, message = None, None
        try:
            err = json.loads(body)["error"]
            code, message = err.get("code"), err.get("message")
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        retry = resp.getheader("Retry-After")
        retry = int(retry) if retry and retry.strip().isdigit() else None
        headers = {k.lower(): v for k, v in resp.getheaders()}
        raise error_for(resp.status, code, message or body.decode(errors="replace")[:200] or resp.reason, retry,
                        headers)

    def _call(self, method, path, ok=(200,), body=None, headers=None):
        """A request whose whole answer is small: returns (response, body bytes)."""
        resp = self._check(self._send(method, path, body, headers), ok)
        try:
            data = resp.read()
        except BaseException:
            self.close()
            raise
        self._finish(resp)
        return resp, data

    def _json(self, method, path, ok=(200,), obj=None, headers=None):
        body, headers = None, dict(headers or {})
        if obj is not None:
            body = json.dumps(obj).encode()
            headers["Content-Type"] = "application/json"
        _, data = self._call(method, path, ok, body, headers)
        return json.loads(data) if data else None

    def _stream_to(self, resp, out):
        """Copies the body of resp into out (a binary file object); returns the byte count."""
        n = 0
        try:
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                n += len(chunk)
            if resp.length not in (None, 0):
                raise OSError("the answer ended early")
        except BaseException:
            self.close()
            raise
        self._finish(resp)
        return n

    @staticmethod
    def _if_match(if_match):
        return {"If-Match": if_match} if if_match else {}

    # ---- service ----

    def health(self):
        """GET /v1/health: {"status": "ok"}."""
        return self._json("GET", "/v1/health")

    def whoami(self):
        """GET /v1/whoami: {"name": TOKEN NAME, "role": ROLE, "auth": whether tokens are on}."""
        return self._json("GET", "/v1/whoami")

    def metrics(self):
        """GET /metrics: the Prometheus text."""
        return self._call("GET", "/metrics")[1].decode()

    # ---- images ----

    def list(self):
        """The catalog: a list of info dicts (or {"name", "error"} for broken images)."""
        return self._json("GET", "/v1/images")["images"]

    images = list

    def info(self, name):
        return self._json("GET", self._image(name))

    def create(self, name, size=None, **options):
        """Creates an image; options as QMP's blockdev-create, with '_' for '-'
        (cluster_size=65536, backing_file="base", extended_l2=True, ...).
        Returns the new image's info."""
        obj = {"name": name}
        if size is not None:
            obj["size"] = size
        obj.update(_kebab(options))
        return self._json("POST", "/v1/images", (201,), obj)

    def delete(self, name, if_match=None):
        self._call("DELETE", self._image(name), (204,), headers=self._if_match(if_match))

    # ---- guest data ----

    def size(self, name):
        """The virtual size, from HEAD .../data."""
        resp, _ = self._call("HEAD", self._image(name, "/data"))
        return int(resp.getheader("Content-Length"))

    def etag(self, name):
        """The image's current ETag (HEAD .../data), for if_match= and if_range=; None
        from a server that gives none."""
        resp, _ = self._call("HEAD", self._image(name, "/data"))
        return resp.getheader("ETag")

    def options(self, name):
        """OPTIONS .../data: {"features": [...], "max_readers", "max_writers"}."""
        return self._json("OPTIONS", self._image(name, "/data"))

    def _read(self, path, offset, length, into, if_range):
        if length == 0:
            return 0 if into is not None else b""
        headers = {}
        if offset or length is not None:  # no Range at all for a whole disk (a 0-byte one has no byte 0)
            headers["Range"] = "bytes=%d-%s" % (offset, "" if length is None else offset + length - 1)
            if if_range:
                headers["If-Range"] = if_range
        resp = self._check(self._send("GET", path, headers=headers), (200, 206))
        if into is not None:
            return self._stream_to(resp, into)
        out = io.BytesIO()
        self._stream_to(resp, out)
        return out.getvalue()

    def read(self, name, offset=0, length=None, into=None, if_range=None):
        """Guest bytes [offset, offset+length) (length None: to the end; a range past
        the end of the disk is cut there). With into (a binary file object) the
        bytes are streamed into it and their count returned; else returned."""
        return self._read(self._image(name, "/data"), offset, length, into, if_range)

    def write(self, name, offset, data, flush=True, if_match=None):
        """Writes data at offset: bytes-like, or a binary file object read from its
        position to its end (a file, io.BytesIO, a pipe: streamed; one of unknown
        length goes in 8 MiB PUTs, then one flush)."""
        if hasattr(data, "read"):
            length = _remaining(data)
            if length is None:
                return self._write_pieces(name, offset, data, flush, if_match)
            body = data
        else:
            body = memoryview(data).cast("B")
            length = len(body)
        if length == 0:
            return
        self._put(name, offset, body, length, flush, if_match)

    def _put(self, name, offset, body, length, flush, if_match):
        headers = {"Content-Range": "bytes %d-%d/*" % (offset, offset + length - 1),
                   "Content-Length": str(length), "Content-Type": "application/octet-stream"}
        headers.update(self._if_match(if_match))
        self._call("PUT", self._image(name, "/data" + _query(flush="y" if flush else "n")), (204,), body, headers)

    def _write_pieces(self, name, offset, f, flush, if_match):
        wrote = False
        while True:
            piece = f.read(PIPE_CHUNK)
            if not piece:
                break
            # the precondition holds for the first piece: the ones after it see the image it changed
            self._put(name, offset, piece, len(piece), False, None if wrote else if_match)
            offset += len(piece)
            wrote = True
        if wrote and flush:
            self.flush(name)

    def zero(self, name, offset, size, flush=True, if_match=None):
        self._json("PATCH", self._image(name, "/data"), (204,),
                   {"op": "zero", "offset": offset, "size": size, "flush": flush}, self._if_match(if_match))

    def discard(self, name, offset, size, flush=True, if_match=None):
        self._json("PATCH", self._image(name, "/data"), (204,),
                   {"op": "discard", "offset": offset, "size": size, "flush": flush}, self._if_match(if_match))

    def flush(self, name):
        self._json("PATCH", self._image(name, "/data"), (204,), {"op": "flush"})

    def extents(self, name, context="zero", bitmap=None):
        """[{"start", "length", "zero", "hole"}, ...] covering the disk; with bitmap
        (context "dirty"): [{"start", "length", "dirty"}, ...] of that bitmap."""
        if bitmap is not None:
            context = "dirty"
        return self._json("GET", self._image(name, "/extents" + _query(context=context, bitmap=bitmap)))

    def dirty_extents(self, name, bitmap):
        """The runs bitmap marks dirty or clean: what an incremental backup reads."""
        return self.extents(name, bitmap=bitmap)

    # ---- the container ----

    def upload(self, name, source):
        """PUT .../file: a qcow2 file (a path, or a binary file object read from its
        position) becomes image `name`, streamed. Returns its info."""
        if isinstance(source, (str, bytes, os.PathLike)):
            with open(source, "rb") as f:
                return self.upload(name, f)
        length = _remaining(source)
        if length is None:  # the length goes first: spool a stream of unknown length
            with tempfile.TemporaryFile() as spool:
                shutil.copyfileobj(source, spool, CHUNK)
                spool.seek(0)
                return self.upload(name, spool)
        headers = {"Content-Length": str(length), "Content-Type": "application/octet-stream"}
        _, data = self._call("PUT", self._image(name, "/file"), (201,), source, headers)
        return json.loads(data)

    def download(self, name, dest):
        """GET .../file into dest: a path (written as path.part, renamed when
        complete) or a binary file object. Returns the byte count."""
        if not isinstance(dest, (str, bytes, os.PathLike)):
            return self._stream_to(self._check(self._send("GET", self._image(name, "/file")), (200,)), dest)
        part = os.fsdecode(dest) + ".part"
        try:
            with open(part, "wb") as f:
                n = self.download(name, f)
            os.replace(part, dest)
            return n
        except BaseException:
            try:
                os.unlink(part)
            except OSError:
                pass
            raise

    # ---- snapshots ----

    def snapshots(self, name):
        return self._json("GET", self._image(name, "/snapshots"))["snapshots"]

    def create_snapshot(self, name, snap, wait=False, timeout=None, progress=None):
        """Starts a job taking snapshot `snap`; returns the job (with wait: the
        concluded job, JobFailed if it failed)."""
        return self._started(self._json("POST", self._image(name, "/snapshots"), (202,), {"name": snap}),
                             wait, timeout, progress)

    def delete_snapshot(self, name, snap, wait=False, timeout=None, progress=None):
        return self._started(self._json("DELETE", self._item(name, "snapshots", snap), (202,)),
                             wait, timeout, progress)

    def revert_snapshot(self, name, snap, wait=False, timeout=None, progress=None):
        return self._started(self._json("POST", self._item(name, "snapshots", snap, "/revert"), (202,)),
                             wait, timeout, progress)

    def read_snapshot(self, name, snap, offset=0, length=None, into=None):
        """As read(), on the disk as snapshot `snap` holds it."""
        return self._read(self._item(name, "snapshots", snap, "/data"), offset, length, into, None)

    # ---- bitmaps ----

    def bitmaps(self, name):
        return self._json("GET", self._image(name, "/bitmaps"))["bitmaps"]

    def bitmap(self, name, bitmap):
        return self._json("GET", self._item(name, "bitmaps", bitmap))

    def add_bitmap(self, name, bitmap, granularity=None, disabled=False):
        obj = {"name": bitmap}
        if granularity is not None:
            obj["granularity"] = granularity
        if disabled:
            obj["disabled"] = True
        return self._json("POST", self._image(name, "/bitmaps"), (201,), obj)

    def remove_bitmap(self, name, bitmap):
        self._call("DELETE", self._item(name, "bitmaps", bitmap), (204,))

    def clear_bitmap(self, name, bitmap):
        return self._json("POST", self._item(name, "bitmaps", bitmap, "/clear"))

    def enable_bitmap(self, name, bitmap):
        return self._json("POST", self._item(name, "bitmaps", bitmap, "/enable"))

    def disable_bitmap(self, name, bitmap):
        return self._json("POST", self._item(name, "bitmaps", bitmap, "/disable"))

    def merge_bitmap(self, name, bitmap, source, source_image=None):
        """Marks in `bitmap` what `source` marks (a bitmap of this image, or of source_image)."""
        obj = {"source": source}
        if source_image is not None:
            obj["source-image"] = source_image
        return self._json("POST", self._item(name, "bitmaps", bitmap, "/merge"), obj=obj)

    # ---- long operations (jobs) ----

    def _started(self, job, wait, timeout, progress):
        return self.wait_job(job["id"], timeout, progress) if wait else job

    def commit(self, name, base=None, force=False, wait=False, timeout=None, progress=None):
        """Writes the image's data into its backing file (or `base`); force commits
        into a base that other images share."""
        obj = {}
        if base is not None:
            obj["base"] = base
        if force:
            obj["force"] = True
        return self._started(self._json("POST", self._image(name, "/commit"), (202,), obj or None),
                             wait, timeout, progress)

    def convert(self, name, target, wait=False, timeout=None, progress=None, **options):
        """Copies the image (or options snapshot=S) into a new image `target`; options
        as the API's, '_' for '-' (compress=True, cluster_size=..., backing="keep")."""
        obj = {"target": target}
        obj.update(_kebab(options))
        return self._started(self._json("POST", self._image(name, "/convert"), (202,), obj), wait, timeout, progress)

    def check(self, name, repair=None, wait=False, timeout=None, progress=None):
        """Checks (repair: "leaks" or "all") the image; the concluded job's result is the report."""
        obj = {"repair": repair} if repair else None
        return self._started(self._json("POST", self._image(name, "/check"), (202,), obj), wait, timeout, progress)

    def jobs(self, image=None, status=None):
        """The jobs not yet dismissed, optionally only those of an image or in a status."""
        jobs = self._json("GET", "/v1/jobs" + _query(image=image, status=status))["jobs"]
        # the same filters here, for a server that ignores them
        return [j for j in jobs if (image is None or j.get("image") == image) and
                (status is None or j.get("status") == status)]

    def job(self, job_id):
        return self._json("GET", self._job(job_id))

    def cancel_job(self, job_id):
        return self._json("POST", self._job(job_id, "/cancel"))

    def pause_job(self, job_id):
        return self._json("POST", self._job(job_id, "/pause"))

    def resume_job(self, job_id):
        return self._json("POST", self._job(job_id, "/resume"))

    def dismiss_job(self, job_id):
        self._call("DELETE", self._job(job_id), (204,))

    def wait_job(self, job_id, timeout=None, progress=None, interval=0.2):
        """Follows a job until it concludes; progress(job) is called at each look.
        Returns the concluded job; raises JobFailed (JobCancelled) when it failed or
        was cancelled, JobTimeout after timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if progress:
                progress(job)
            if job["status"] == "concluded":
                if job.get("cancelled"):
                    raise JobCancelled(job)
                if job.get("error"):
                    raise JobFailed(job)
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(job, timeout)
            time.sleep(interval if deadline is None else max(0, min(interval, deadline - time.monotonic())))

    # ---- events ----

    def events(self, last_event_id=None, reconnect=True, idle_timeout=30):
        """Yields Event(type, id, data) from GET /v1/events, on a connection of its
        own. When the stream breaks or goes silent for idle_timeout seconds (the
        server sends a keepalive every 5), it reconnects with Last-Event-ID so the
        server can replay what was missed (an `event: lost` says when it could
        not); reconnect=False ends the iteration instead."""
        last = None if last_event_id is None else str(last_event_id)
        retry = 1.0
        while True:
            conn = self._new_connection(idle_timeout)
            got = False
            try:
                headers = {"Accept": "text/event-stream"}
                headers.update(self._auth)
                if last is not None:
                    headers["Last-Event-ID"] = last
                conn.request("GET", self._prefix + "/v1/events", headers=headers)
                resp = conn.getresponse()
                if resp.status != 200:
                    self._check(resp, (200,))
                etype, eid, data = None, None, []
                while True:
                    raw = resp.readline()
                    if not raw:
                        break
                    line = raw.decode(errors="replace").rstrip("\r\n")
                    if not line:
                        if etype or data:
                            text = "\n".join(data)
                            try:
                                payload = json.loads(text) if text else None
                            except ValueError:
                                payload = text
                            if eid is not None:
                                last = eid
                            got = True
                            yield Event(etype or "message", eid, payload)
                        etype, eid, data = None, None, []
                        continue
                    if line.startswith(":"):
                        continue
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "event":
                        etype = value
                    elif field == "id":
                        eid = value
                    elif field == "data":
                        data.append(value)
                    elif field == "retry" and value.isdigit():
                        retry = int(value) / 1000.0
            except (OSError, http.client.HTTPException):
                if not reconnect:
                    raise
            finally:
                conn.close()
            if not reconnect:
                return
            time.sleep(0 if got else retry)

    # ---- tickets ----

    def tickets(self):
        return self._json("GET", "/v1/tickets")["tickets"]

    def create_ticket(self, image, ops=("read",), timeout=3600):
        """A data ticket for one image; its "token" is in the answer only."""
        return self._json("POST", "/v1/tickets", (201,), {"image": image, "ops": list(ops), "timeout": timeout})

    def revoke_ticket(self, ticket_id):
        self._call("DELETE", "/v1/tickets/" + urllib.parse.quote(ticket_id, safe=""), (204,))

