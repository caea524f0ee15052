"""faultproxy.py: an HTTP proxy in front of an S3 store that passes requests on
unchanged (the Host header too, so SigV4 signatures stay valid) and, when told,
answers instead with a fault: 503 SlowDown, 500, 403 SignatureDoesNotMatch,
404 NoSuchUpload, a delay, a dropped connection, or a lost answer (the request
reaches the store, the connection is then closed without its answer). Used by
s3.py to prove retries and error messages; runs in a thread of the test process.

    p = FaultProxy("http://127.0.0.1:PORT")
    p.fault("slowdown", count=2, match="/bkt/img/a.qcow2")   # the next 2 matching requests
    p.fault("500")                                             # every request, until p.clear()
    p.fault("lose", count=1, match="uploadId=", method="POST") # CompleteMultipartUpload done, answer lost
    p.peak                                                     # the most requests it held at once
"""
import http.client
import http.server
import socketserver
import threading
import time
import urllib.parse

BODIES = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."),
    "nosuchupload": (404, "NoSuchUpload", "The specified multipart upload does not exist."),
}


class FaultProxy:
    def __init__(self, upstream):
        u = urllib.parse.urlsplit(upstream)
        self.up_host, self.up_port = u.hostname, u.port
        self.lock = threading.Lock()
        self.rules = []  # [kind, remaining or None, match, arg, method or None]
        self.hits = 0
        self.active = self.peak = 0  # requests being handled now, and the most at once
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def handle_any(self):
                with proxy.lock:
                    proxy.active += 1
                    proxy.peak = max(proxy.peak, proxy.active)
                try:
                    self.handle_one()
                finally:
                    with proxy.lock:
                        proxy.active -= 1

            def handle_one(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                rule = proxy.take(self.command, self.path)
                if rule:
                    kind, arg = rule
                    if kind == "drop":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if kind == "delay":
                        time.sleep(arg)
                    elif kind != "lose":
                        status, code, msg = BODIES[kind]
                        xml = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>%s</Code><Message>%s</Message></Error>"
                               % (code, msg)).encode()
                        self.send_response(status)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(xml) if self.command != "HEAD" else 0))
                        self.end_headers()
                        if self.command != "HEAD":
                            self.wfile.write(xml)
                        return
                c = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=120)
                hdrs = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                c.request(self.command, self.path, body=body if (body or self.command in ("PUT", "POST")) else None,
                          headers=hdrs)
                r = c.getresponse()
                data = r.read()
                c.close()
                if rule and rule[0] == "lose":  # the store did it; its answer never arrives
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive"):
                        self.send_header(k, v)
                if self.command == "HEAD":
                    self.send_header("Content-Length", r.getheader("Content-Length") or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fault(self, kind, count=None, match="", arg=None, method=None):
        """Answer matching requests (path contains match; method, when given, is
        theirs) with kind: slowdown, 500, 403, nosuchupload, drop, lose (pass on,
        then close without the answer), or delay (arg seconds, then pass on);
        count times, or always."""
        with self.lock:
            self.rules.append([kind, count, match, arg, method])

    def clear(self):
        with self.lock:
            self.rules = []

    def take(self, method, path):
        with self.lock:
            for r in self.rules:
                if r[2] in path and (r[4] is None or r[4] == method) and (r[1] is None or r[1] > 0):
                    if r[1] is not None:
                        r[1] -= 1
                    self.hits += 1
                    return r[0], r[3]
        return None

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
