"""tlsfixture.py: certificates for the TLS tests, made at test time with the
openssl command (Debian's openssl package): a CA, a server certificate for
127.0.0.1/localhost signed by it, a client CA with one client certificate, and a
second, unrelated CA (the "wrong" one).

    pki = tlsfixture.Pki(folder)
    pki.ca, pki.server_cert, pki.server_key, pki.client_ca, pki.client_cert,
    pki.client_key, pki.other_ca      # file paths
    pki.reissue_server()              # a new server key and certificate (new serial)
"""
import os
import subprocess


def _openssl(*args, cwd=None):
    subprocess.run(["openssl"] + list(args), check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Pki:
    def __init__(self, folder):
        self.dir = folder
        os.makedirs(folder, exist_ok=True)
        p = lambda n: os.path.join(folder, n)  # noqa: E731
        self.ca, self.ca_key = p("ca.pem"), p("ca.key")
        self.other_ca, self.other_ca_key = p("other-ca.pem"), p("other-ca.key")
        self.client_ca, self.client_ca_key = p("client-ca.pem"), p("client-ca.key")
        self.server_cert, self.server_key = p("server.pem"), p("server.key")
        self.client_cert, self.client_key = p("client.pem"), p("client.key")
        self.serial = 1
        for cert, key, cn in ((self.ca, self.ca_key, "qcowd test CA"), (self.other_ca, self.other_ca_key, "other CA"),
                              (self.client_ca, self.client_ca_key, "qcowd client CA")):
            _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=" + cn,
                     "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self.reissue_server()
        self._issue(self.client_cert, self.client_key, self.client_ca, self.client_ca_key, "backup-agent",
                    "extendedKeyUsage=clientAuth")

    def _issue(self, cert, key, ca, ca_key, cn, ext):
        csr = cert + ".csr"
        extfile = cert + ".ext"
        with open(extfile, "w") as f:
            f.write(ext + "\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
                 "-out", csr, "-subj", "/CN=" + cn)
        self.serial += 1
        _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-set_serial", str(self.serial),
                 "-out", cert, "-days", "2", "-extfile", extfile)
        os.unlink(csr)
        os.unlink(extfile)
        os.chmod(key, 0o600)

    def reissue_server(self):
        """A new key and certificate for the server (127.0.0.1, ::1, localhost)."""
        self._issue(self.server_cert, self.server_key, self.ca, self.ca_key, "qcowd test server",
                    "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nextendedKeyUsage=serverAuth")

    def server_serial(self):
        out = subprocess.run(["openssl", "x509", "-in", self.server_cert, "-noout", "-serial"], check=True,
                             stdout=subprocess.PIPE).stdout.decode()
        return int(out.strip().split("=")[1], 16)
