"""The catalog folder as an attacker with a foothold in it would leave it (see
hostile.py): links and special files are not followed or opened."""
import os
import stat
import threading

import hostile


def symlinks_refused(s):
    """A *.qcow2 link to a file outside the catalog (and to an image inside it) is
    not followed: info, data and file reads answer 422 naming the link, and the
    target's bytes never come back."""
    os.symlink("/etc/passwd", s.path("passwd"))
    hostile.qemu_img("create", "-q", "-f", "qcow2", s.path("real"), "1M")
    os.symlink(s.path("real"), s.path("alias"))
    for name in ("passwd", "alias"):
        for path in ("/v1/images/%s" % name, "/v1/images/%s/file" % name, "/v1/images/%s/data" % name):
            st, _, body = s.call("GET", path)
            assert st == 422, "%s: %d %r" % (path, st, body[:200])
            assert b"root:" not in body and b"QFI" not in body, body[:200]
            assert b"symbolic link" in body, body
        st, _, body = s.call("PUT", "/v1/images/%s/data" % name, body=b"x" * 512,
                             headers={"Content-Range": "bytes 0-511/*"})
        assert st in (404, 409, 422), (st, body)
    st, _, _ = s.call("GET", "/v1/images/real/file")
    assert st == 200, st
    for name in ("passwd", "alias"):
        os.unlink(s.path(name))


def fifo_refused(s):
    """A FIFO named like an image must not hang the request that opens it."""
    os.mkfifo(s.path("pipe"))
    try:
        result = {}

        def get():
            result["st"] = s.call("GET", "/v1/images/pipe/data", timeout=10)[0]
        t = threading.Thread(target=get)
        t.start()
        t.join(15)
        assert not t.is_alive(), "the request on a FIFO hangs"
        assert result.get("st") == 422, result
    finally:
        os.unlink(s.path("pipe"))


def created_private(s):
    """Images qcowd creates are 0640, whatever the umask."""
    old = os.umask(0)
    try:
        st, _, body = s.call("POST", "/v1/images", body=b'{"name": "mine", "size": 1048576}',
                             headers={"Content-Type": "application/json"})
    finally:
        os.umask(old)
    assert st == 201, (st, body)
    mode = stat.S_IMODE(os.stat(s.path("mine")).st_mode)
    assert mode == 0o640, oct(mode)


CASES = [("symlinks-refused", symlinks_refused), ("fifo-refused", fifo_refused), ("created-0640", created_private)]
