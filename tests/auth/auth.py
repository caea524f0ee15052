#!/usr/bin/python3
"""auth.py: who may do what, against a live qcowd over TLS on loopback.

  roles        every operation of the OpenAPI document (each must name its role in
               x-qcowd-role) called without a token (401 and WWW-Authenticate:
               Bearer, unless the role is none), with a bad token (401), with each
               token below its role (403) and at or above it (neither 401 nor 403)
  tickets      a data ticket works on its image's data, extents and file only, for
               its ops only, until it expires or is revoked; listed without its
               secret; a reader cannot make one
  tls          curl with the right CA reads, with another CA fails verification,
               plain HTTP to the TLS port gets no answer, TLS 1.1 is refused
  client-cert  with --tls-client-ca: no certificate 403, the client's certificate
               200, /v1/health open
  browser      a foreign Host 421, a foreign Origin 403, an allowed --cors-origin
               gets CORS headers and its preflight 204, a JSON body without
               application/json 415
  defaults     --listen 0.0.0.0 without --tokens refuses to start naming the fix;
               with --insecure-no-auth it starts with a warning; a world-writable
               token file and a half TLS pair are refused
  logs         no token or ticket secret in any log line; state changes have an
               audit line naming the token
  clients      qcowctl (--token, --cacert, QCOWD_TOKEN, QCOWD_CACERT) and the Python
               client (token=, cacert=) over TLS; 401 without a token, a wrong CA fails
  docker       docker/entrypoint.sh makes a certificate and an admin token on the
               first start (secrets folder 0700, never in the log) and serves HTTPS
               with tokens; the second start keeps them
  reload       SIGHUP reloads the tokens (an old one stops, a new one works) and the
               certificate (new connections see the new one) while a connection
               opened before keeps working; a broken token file keeps the old table

Environment: QCOWD (the binary), QCOWCTL, OPENAPI, QEMU_IMG. Needs the openssl command.
Prints `ok NAME` / `FAIL NAME: reason`, then `N passed, M failed`.
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
import qcowd  # noqa: E402
import tlsfixture  # noqa: E402

OPENAPI = os.environ.get("OPENAPI") or os.path.join(HERE, "..", "..", "openapi", "openapi.yaml")
ROLES = ["reader", "operator", "admin"]
RANK = {"none": 0, "reader": 1, "operator": 2, "admin": 3}


def new_token(name, role):
    out = subprocess.run([qcowd.QCOWD, "token", "new", name, role], check=True, stdout=subprocess.PIPE).stdout
    token, line = out.decode().splitlines()
    return token, line


class TlsQcowd(qcowd.Qcowd):
    def __init__(self, args, ca, **kw):
        self.ca = ca
        self.client = None  # (cert, key) to present
        super().__init__(qcowd.QCOWD, args, **kw)

    def ctx(self):
        c = ssl.create_default_context(cafile=self.ca)
        if self.client:
            c.load_cert_chain(*self.client)
        return c

    def conn(self, timeout=60):
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=self.ctx())

    def call(self, method, path, token=None, body=None, headers=None, conn=None):
        h = dict(headers or {})
        if token:
            h["Authorization"] = "Bearer " + token
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        if path == "/v1/events":  # a stream without end: the status and headers only
            c = self.conn(timeout=30)
            try:
                c.request(method, path, body=body, headers=h)
                r = c.getresponse()
                data = r.read() if r.status >= 300 else b""
                return r.status, {k.lower(): v for k, v in r.getheaders()}, data
            finally:
                c.close()
        return self.exchange(method, path, body=body, headers=h, conn=conn)


class Suite(qcowd.Cases):
    pass


def fill(path):
    """A concrete path for an OpenAPI path template: names that do not exist, so an
    admitted call answers 404/400/409 and changes nothing."""
    return (path.replace("{name}", "nosuch").replace("{bitmap}", "nob").replace("{snapshot}", "nosnap")
            .replace("{snap}", "nosnap").replace("{id}", "999999"))


def main():
    args, top, cat = qcowd.prologue("qcowd-auth-", tools=(qcowd.QEMU_IMG,))
    if not shutil.which("openssl"):
        print("skip: no openssl command")
        return 77
    s = Suite(args.seed)
    daemons = []
    pki = tlsfixture.Pki(os.path.join(top, "pki"))
    tokens = {r: new_token("t-" + r, r) for r in ROLES}
    secrets = [t for t, _ in tokens.values()]
    tfile = os.path.join(top, "tokens")

    def write_tokens(entries):
        with open(tfile, "w") as f:
            f.write("# test tokens\n" + "".join(line + "\n" for _, line in entries))
        os.chmod(tfile, 0o600)

    write_tokens(tokens.values())
    for n in ("a", "b"):
        subprocess.run([qcowd.QEMU_IMG, "create", "-q", "-f", "qcow2", os.path.join(cat, n + ".qcow2"), "1M"],
                       check=True)
    base = ["--catalog", cat, "--tokens", tfile, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
            "--cors-origin", "https://dash.example:9443", "--public-name", "qcowd.test"]
    try:
        d = TlsQcowd(base, pki.ca)
        daemons.append(d)
        tok = lambda r: tokens[r][0]  # noqa: E731

        def roles():
            doc = yaml.safe_load(open(OPENAPI))
            n = 0
            for path, item in doc["paths"].items():
                for method, op in item.items():
                    if method not in ("get", "put", "post", "delete", "patch", "options", "head"):
                        continue
                    role = op.get("x-qcowd-role")
                    assert role in RANK, "%s %s: no x-qcowd-role" % (method, path)
                    m = method.upper()
                    p = fill(path)
                    body = {} if m in ("POST", "PATCH") else None
                    st, h, b = d.call(m, p, body=body)
                    if role == "none":
                        assert st not in (401, 403), (m, p, st, b[:200])
                        continue
                    assert st == 401 and h.get("www-authenticate", "").startswith("Bearer"), (m, p, st, h)
                    st, _, _ = d.call(m, p, token="not-a-token", body=body)
                    assert st == 401, (m, p, "bad token", st)
                    for r in ROLES:
                        st, _, b = d.call(m, p, token=tok(r), body=body)
                        if RANK[r] < RANK[role]:
                            assert st == 403 and b"t-" + r.encode() in b, (m, p, r, st, b[:200])
                        else:
                            assert st not in (401, 403), (m, p, r, st, b[:200])
                        n += 1
            assert n >= 100, n
            print("   roles: %d (operation, token) pairs checked" % n)
        s.case("roles_from_openapi", roles)

        def tickets():
            st, _, b = d.call("POST", "/v1/tickets", tok("reader"), {"image": "a", "ops": ["read"], "timeout": 60})
            assert st == 403, (st, b)
            st, h, b = d.call("POST", "/v1/tickets", tok("operator"), {"image": "a", "ops": ["read"], "timeout": 60})
            assert st == 201, (st, b)
            t = json.loads(b)
            secrets.append(t["token"])
            assert t["image"] == "a" and t["ops"] == ["read"] and t["owner"] == "t-operator", t
            assert h["location"] == "/v1/tickets/" + t["id"]
            rd = t["token"]
            st, _, _ = d.call("GET", "/v1/images/a/data", rd, headers={"Range": "bytes=0-511"})
            assert st == 206, st
            for m, p in (("GET", "/v1/images/a/extents"), ("GET", "/v1/images/a/file"), ("HEAD", "/v1/images/a/data")):
                st, _, _ = d.call(m, p, rd)
                assert st == 200, (m, p, st)
            for m, p, body in (("GET", "/v1/images/b/data", None), ("PUT", "/v1/images/a/data", b"x" * 512),
                               ("GET", "/v1/images/a", None), ("GET", "/v1/images", None),
                               ("DELETE", "/v1/images/a", None), ("POST", "/v1/tickets",
                                                                  {"image": "a", "ops": ["read"], "timeout": 5})):
                st, _, b = d.call(m, p, rd, body=body, headers={"Content-Range": "bytes 0-511/*"} if m == "PUT" else None)
                assert st == 403 and b"ticket" in b, (m, p, st, b[:200])
            # a write ticket
            st, _, b = d.call("POST", "/v1/tickets", tok("operator"), {"image": "b", "ops": ["write"], "timeout": 60})
            wt = json.loads(b)["token"]
            secrets.append(wt)
            st, _, b = d.call("PUT", "/v1/images/b/data?flush=y", wt, body=b"\x5a" * 512,
                              headers={"Content-Range": "bytes 0-511/*"})
            assert st == 204, (st, b)
            st, _, _ = d.call("GET", "/v1/images/b/data", wt, headers={"Range": "bytes=0-511"})
            assert st == 403, st
            # listed without secrets
            st, _, b = d.call("GET", "/v1/tickets", tok("operator"))
            lst = json.loads(b)["tickets"]
            assert st == 200 and len(lst) == 2 and all("token" not in x for x in lst), lst
            assert rd.encode() not in b and wt.encode() not in b
            # revocation
            st, _, _ = d.call("DELETE", "/v1/tickets/" + t["id"], tok("operator"))
            assert st == 204, st
            st, _, _ = d.call("GET", "/v1/images/a/data", rd, headers={"Range": "bytes=0-511"})
            assert st == 401, st
            st, _, _ = d.call("DELETE", "/v1/tickets/" + t["id"], tok("operator"))
            assert st == 404, st
            # expiry
            # (3 s: a sanitizer build under load may take a second to answer)
            st, _, b = d.call("POST", "/v1/tickets", tok("operator"), {"image": "a", "ops": ["read"], "timeout": 3})
            short = json.loads(b)["token"]
            secrets.append(short)
            st, _, _ = d.call("GET", "/v1/images/a/extents", short)
            assert st == 200, st
            time.sleep(3.2)
            st, _, _ = d.call("GET", "/v1/images/a/extents", short)
            assert st == 401, st
            for bad in ({"image": "a", "ops": ["delete"], "timeout": 5}, {"image": "a", "ops": [], "timeout": 5},
                        {"image": "a", "ops": ["read"], "timeout": 0}, {"image": "../x", "ops": ["read"], "timeout": 5},
                        {"image": "a", "ops": ["read"], "timeout": 5, "extra": 1}):
                st, _, b = d.call("POST", "/v1/tickets", tok("operator"), bad)
                assert st == 400, (bad, st, b)
        s.case("tickets_scope_ops_expiry_revocation", tickets)

        def curl(*a):
            return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"] + list(a),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def tls():
            url = "https://127.0.0.1:%d/v1/images" % d.port
            r = curl("--cacert", pki.ca, "-H", "Authorization: Bearer " + tok("reader"), url)
            assert r.returncode == 0 and r.stdout == b"200", r
            r = curl("--cacert", pki.other_ca, url)
            assert r.returncode == 60, r  # peer certificate cannot be authenticated
            r = curl("http://127.0.0.1:%d/v1/health" % d.port)
            assert r.returncode != 0 and r.stdout in (b"000", b""), r
            r = curl("--cacert", pki.ca, "--tls-max", "1.1", url)
            assert r.returncode == 35, r  # no TLS 1.1
            r = curl("--cacert", pki.ca, "--tlsv1.2", "--tls-max", "1.2", "-H", "Authorization: Bearer " + tok("reader"),
                     url)
            assert r.returncode == 0 and r.stdout == b"200", r
        if shutil.which("curl"):
            s.case("tls_right_and_wrong_ca_plain_http_old_tls", tls)

        def browser():
            st, _, b = d.call("GET", "/v1/images", tok("reader"), headers={"Host": "evil.example:8443"})
            assert st == 421, (st, b)
            st, _, _ = d.call("GET", "/v1/images", tok("reader"), headers={"Host": "qcowd.test:8443"})
            assert st == 200, st
            st, _, b = d.call("GET", "/v1/images", tok("reader"), headers={"Origin": "https://evil.example"})
            assert st == 403 and b"origin" in b.lower(), (st, b)
            st, h, _ = d.call("GET", "/v1/images", tok("reader"), headers={"Origin": "https://dash.example:9443"})
            assert st == 200 and h.get("access-control-allow-origin") == "https://dash.example:9443", h
            st, h, _ = d.call("GET", "/v1/images", tok("reader"), headers={"Origin": "https://127.0.0.1:%d" % d.port})
            assert st == 200, st  # the server's own origin
            st, h, _ = d.call("OPTIONS", "/v1/images/a/data", headers={
                "Origin": "https://dash.example:9443", "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "authorization, content-range"})
            assert st == 204 and "PUT" in h.get("access-control-allow-methods", ""), (st, h)
            assert "Authorization" in h.get("access-control-allow-headers", ""), h
            for ct in ("text/plain", None, "application/x-www-form-urlencoded"):
                hd = {"Content-Type": ct} if ct else {}
                c = d.conn()
                c.putrequest("POST", "/v1/images/a/snapshots")
                c.putheader("Authorization", "Bearer " + tok("operator"))
                for k, v in hd.items():
                    c.putheader(k, v)
                c.putheader("Content-Length", "14")
                c.endheaders(b'{"name": "s1"}')
                r = c.getresponse()
                body = r.read()
                c.close()
                assert r.status == 415, (ct, r.status, body)
        s.case("host_origin_cors_content_type", browser)

        def logs_hold_no_secrets():
            joined = "\n".join(d.lines)
            for sec in secrets:
                assert sec not in joined, "a secret is in the log"
            assert re.search(r"audit: t-operator POST /v1/tickets 201", joined), joined[-2000:]
            assert re.search(r"audit: ticket:[0-9a-f]{16} PUT /v1/images/b/data 204", joined)
        s.case("no_secret_in_logs_and_audit_lines", logs_hold_no_secrets)

        def reload():
            kept = d.conn()
            st, _, _ = d.call("GET", "/v1/images", tok("reader"), conn=kept)
            assert st == 200
            old_serial = pki.server_serial()
            newtok = new_token("t-new", "operator")
            secrets.append(newtok[0])
            write_tokens([tokens["operator"], tokens["admin"], newtok])  # the reader's token goes
            pki.reissue_server()
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 10
            while time.time() < deadline and not any("reloaded the TLS" in ln for ln in d.lines):
                time.sleep(0.05)
            assert any("reloaded 3 tokens" in ln for ln in d.lines), d.lines[-5:]
            st, _, _ = d.call("GET", "/v1/images", tok("reader"))
            assert st == 401, st
            st, _, _ = d.call("GET", "/v1/images", newtok[0])
            assert st == 200, st
            # the connection opened before the reload goes on (same TLS session)
            st, _, _ = d.call("GET", "/v1/images", tok("admin"), conn=kept)
            assert st == 200, st
            kept.close()
            sock = socket.create_connection(("127.0.0.1", d.port))
            tls_sock = d.ctx().wrap_socket(sock, server_hostname="127.0.0.1")
            serial = int(tls_sock.getpeercert()["serialNumber"], 16)
            tls_sock.close()
            assert serial == pki.server_serial() and serial != old_serial, (serial, old_serial)
            # a broken file keeps the table in force
            with open(tfile, "a") as f:
                f.write("broken line\n")
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 10
            while time.time() < deadline and not any("tokens not reloaded" in ln for ln in d.lines):
                time.sleep(0.05)
            assert any("tokens not reloaded" in ln and ":5:" in ln for ln in d.lines), d.lines[-5:]
            st, _, _ = d.call("GET", "/v1/images", newtok[0])
            assert st == 200, st
        s.case("sighup_reloads_tokens_and_certificate", reload)

        def client_cert():
            c = TlsQcowd(["--catalog", cat, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                          "--tls-client-ca", pki.client_ca], pki.ca)
            daemons.append(c)
            st, _, b = c.call("GET", "/v1/images")
            assert st == 403 and b"client certificate" in b, (st, b)
            st, _, _ = c.call("GET", "/v1/health")
            assert st == 200, st
            c.client = (pki.client_cert, pki.client_key)
            st, _, _ = c.call("GET", "/v1/images")
            assert st == 200, st
            c.client = (pki.server_cert, pki.server_key)  # issued by another CA
            st, _, b = c.call("GET", "/v1/images")
            assert st == 403, (st, b)
            c.stop_clean()
        s.case("client_certificate_required", client_cert)

        def defaults():
            def start(extra, timeout=30):
                return subprocess.run([qcowd.QCOWD, "--catalog", cat] + extra, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, timeout=timeout)
            r = start(["--listen", "0.0.0.0:0"])
            assert r.returncode == 2 and b"--tokens" in r.stderr and b"--insecure-no-auth" in r.stderr, r.stderr
            r = start(["--listen", "[::]:0"])
            assert r.returncode == 2 and b"--tokens" in r.stderr, r.stderr
            p = subprocess.Popen([qcowd.QCOWD, "--catalog", cat, "--listen", "0.0.0.0:0", "--insecure-no-auth"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            first = p.stderr.readline() + p.stderr.readline()
            p.send_signal(signal.SIGTERM)
            p.wait(30)
            p.stderr.close()
            assert b"WARNING: --insecure-no-auth" in first and b"listening on" in first, first
            bad = os.path.join(top, "tokens-open")
            shutil.copy(tfile, bad)
            os.chmod(bad, 0o666)
            r = start(["--tokens", bad])
            assert r.returncode == 2 and b"anyone may write it" in r.stderr, r.stderr
            r = start(["--tls-cert", pki.server_cert])
            assert r.returncode == 2 and b"go together" in r.stderr, r.stderr
            r = start(["--tls-cert", pki.server_cert, "--tls-key", pki.client_key])
            assert r.returncode == 2 and b"does not belong" in r.stderr, r.stderr
        s.case("safe_defaults_and_refusals", defaults)

        def clients_with_token_and_ca():
            """qcowctl (--token/--cacert and QCOWD_TOKEN/QCOWD_CACERT) and the Python
            client (token=, cacert=) reach the TLS server with a token; without the
            token they get the server's 401 message; with the wrong CA they fail."""
            url = "https://127.0.0.1:%d" % d.port
            ctl = os.environ.get("QCOWCTL")
            if ctl:
                def run(args, env=None):
                    return subprocess.run([ctl, "--url", url] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          env=env, timeout=60)
                r = run(["--token", tok("operator"), "--cacert", pki.ca, "list"])
                assert r.returncode == 0 and b'"a"' in r.stdout, r
                env = dict(os.environ, QCOWD_TOKEN=tok("operator"), QCOWD_CACERT=pki.ca)  # (reload took the reader's)
                r = run(["info", "a"], env=env)
                assert r.returncode == 0 and b'"virtual-size"' in r.stdout, r
                r = run(["--cacert", pki.ca, "list"])
                assert r.returncode != 0 and b"bearer token" in r.stderr, r
                r = run(["--token", tok("operator"), "--cacert", pki.other_ca, "list"])
                assert r.returncode != 0, r
                r = run(["rm", "a"], env=env)  # an operator may not delete
                assert r.returncode != 0 and b"t-operator" in r.stderr and b"admin" in r.stderr, r
            sys.path.insert(0, os.path.join(HERE, "..", "clients"))
            import installed  # the package as a user installs it, not the source tree
            qcowd_client = installed.install(top)
            with qcowd_client.Client(url, token=tok("operator"), cacert=pki.ca) as c:
                assert any(i["name"] == "a" for i in c.list()), c.list()
                assert c.read("a", 0, 512) == b"\0" * 512
            try:
                with qcowd_client.Client(url, cacert=pki.ca, token="") as c:
                    c.list()
                raise AssertionError("a call without a token was answered")
            except qcowd_client.QcowdError as e:
                assert e.status == 401 and e.code == "unauthorized", (e.status, e.code)
        s.case("clients_with_token_and_cacert", clients_with_token_and_ca)

        def docker_entrypoint():
            """docker/entrypoint.sh outside Docker: it makes a certificate and an admin
            token on the first start, serves HTTPS with tokens, and on the second start
            keeps both."""
            sec = os.path.join(top, "secrets")
            dcat = os.path.join(top, "dcat")
            os.mkdir(dcat)
            env = dict(os.environ, QCOWD_SECRETS=sec, QCOWD_CATALOG=dcat, QCOWD_LISTEN="127.0.0.1:0",
                       PATH=os.path.dirname(qcowd.QCOWD) + os.pathsep + os.environ.get("PATH", ""))
            script = os.path.join(HERE, "..", "..", "docker", "entrypoint.sh")
            for round_ in (1, 2):
                p = subprocess.Popen(["/bin/sh", script, "--quiet"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
                lines = []
                while True:
                    ln = p.stderr.readline().decode()
                    lines.append(ln)
                    if not ln or "listening on" in ln:
                        break
                m = re.search(r"listening on https://127\.0\.0\.1:(\d+)/ .*tokens required", lines[-1])
                assert m, lines
                made = [ln for ln in lines if "made" in ln]
                assert (len(made) == 2) == (round_ == 1), lines
                admin = open(os.path.join(sec, "admin.token")).read().strip()
                secrets.append(admin)
                assert admin not in "".join(lines)
                assert oct(os.stat(sec).st_mode & 0o777) == "0o700" and oct(os.stat(os.path.join(sec, "tls.key")).st_mode & 0o777) == "0o600"
                ctx = ssl.create_default_context(cafile=os.path.join(sec, "tls.pem"))
                c = http.client.HTTPSConnection("127.0.0.1", int(m.group(1)), timeout=30, context=ctx)
                c.request("GET", "/v1/images")
                r = c.getresponse()
                r.read()
                assert r.status == 401, r.status
                c.request("GET", "/v1/images", headers={"Authorization": "Bearer " + admin})
                r = c.getresponse()
                r.read()
                assert r.status == 200, r.status
                c.close()
                p.send_signal(signal.SIGTERM)
                assert p.wait(60) == 0
                p.stderr.close()
        if shutil.which("openssl"):
            s.case("docker_entrypoint_makes_tls_and_tokens", docker_entrypoint)

        for x in daemons:
            if x.alive():
                x.stop_clean()
    except Exception:  # noqa: BLE001
        s.setup_failed()
    finally:
        for x in daemons:
            x.kill()
        qcowd.remove_temp(top, args.keep or s.failed)
    return s.summary()


if __name__ == "__main__":
    sys.exit(main())
