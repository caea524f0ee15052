"""sse.py: a GET /v1/events listener on a raw socket for the job suites (jobs.py,
races.py): the stream read and parsed in a thread, events kept in order."""
import json
import re
import socket
import threading
import time


class Sse:
    """One GET /v1/events listener on a raw socket (optionally with Last-Event-ID,
    as a header or as ?last-event-id=); events (type, id or None, data) parsed in
    a thread."""

    def __init__(self, port, last=None, query=False):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        path = "/v1/events"
        hdr = ""
        if last is not None and query:
            path += "?last-event-id=%s" % last
        elif last is not None:
            hdr = "Last-Event-ID: %s\r\n" % last
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: localhost\r\n%s\r\n" % (path, hdr)).encode())
        self.events = []
        self.head = b""
        self.text = b""
        self.lock = threading.Lock()
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def loop(self):
        buf = b""
        try:
            while True:
                k = self.sock.recv(65536)
                if not k:
                    break
                buf += k
                if not self.head:
                    i = buf.find(b"\r\n\r\n")
                    if i < 0:
                        continue
                    self.head, buf = buf[:i], buf[i + 4:]
                while True:  # chunked encoding
                    m = re.match(rb"([0-9a-fA-F]+)\r\n", buf)
                    if not m:
                        break
                    n = int(m.group(1), 16)
                    if len(buf) < m.end() + n + 2:
                        break
                    self.feed(buf[m.end():m.end() + n])
                    buf = buf[m.end() + n + 2:]
        except OSError:
            pass

    def feed(self, chunk):
        self.text += chunk
        while b"\n\n" in self.text:
            block, self.text = self.text.split(b"\n\n", 1)
            ev = {}
            for line in block.decode().split("\n"):
                if line.startswith(":") or not line:
                    continue
                k, _, v = line.partition(": ")
                ev[k] = v
            if "event" in ev:
                data = json.loads(ev.get("data", "null"))
                with self.lock:
                    self.events.append((ev["event"], int(ev["id"]) if "id" in ev else None, data))

    def seen(self):
        with self.lock:
            return list(self.events)

    def wait(self, pred, timeout=60, what="an event"):
        t = time.time() + timeout
        while time.time() < t:
            s = self.seen()
            if pred(s):
                return s
            time.sleep(0.02)
        raise AssertionError("no %s on the stream after %ds; last: %r" % (what, timeout, self.seen()[-5:]))

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
