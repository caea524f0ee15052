#!/usr/bin/python3
"""sdk.py: the storage-plugin SDK as a third party uses it, against an install of
this build:

  install   `cmake --install` into a temporary prefix puts qcowd, the SDK header
            and qcowd-plugin.pc there; pkg-config finds them through the .pc file
  exports   the installed qcowd exports none of its own functions (plugins get the
            host's functions in a table), and the in-tree s3 plugin exports only
            its entry point
  build     examples/vfs-tar, copied out of the source tree, builds with its own
            Makefile and `pkg-config --cflags qcowd-plugin` only (-Werror), and
            installs into a plugin folder
  serve     the installed qcowd loads it (--plugin-dir) and serves a ustar archive
            of qemu-img-made images as a catalog: the list, info, and every byte
            of an image and of an overlay read through its backing file, against
            `qemu-img convert -O raw`
  refuse    a write to the read-only store is refused with a JSON error, a corrupt
            archive (bad checksum) is an error naming it, and qcowd stays up

Environment: BUILD_DIR (the CMake build tree), SOURCE_DIR, QEMU_IMG, QEMU_IO.
Prints `ok NAME` / `FAIL NAME: reason`, then `N passed, M failed`.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
import qcowd  # noqa: E402

BUILD = os.environ.get("BUILD_DIR", "")
SOURCE = os.environ.get("SOURCE_DIR", os.path.join(HERE, "..", ".."))
OWN_PREFIXES = ("err_", "vfs_", "qcow2_", "catalog_", "api_", "jobs_", "job_", "events_", "auth_",
                "access_", "ticket", "s3_", "sbuf_", "main_", "config_")


def run(cmd, **kw):
    """cmd's output; AssertionError with the output when it fails."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, "%s: exit %d:\n%s" % (" ".join(cmd), p.returncode, out[-3000:])
    return out


def exported(path):
    out = run(["nm", "-D", "--defined-only", path])
    return [ln.split()[-1] for ln in out.splitlines() if ln.split()]


def main():
    args, top, _ = qcowd.prologue("qcowd-sdk-", binaries={"BUILD_DIR": os.path.join(BUILD, "qcowd", "qcowd")})
    cases = qcowd.Cases(args.seed)
    prefix = os.path.join(top, "prefix")
    plugins = os.path.join(top, "plugins")
    env = dict(os.environ)
    st = {}

    def install():
        run(["cmake", "--install", BUILD, "--prefix", prefix])
        pcs = glob.glob(os.path.join(prefix, "**", "qcowd-plugin.pc"), recursive=True)
        assert len(pcs) == 1, pcs
        env["PKG_CONFIG_PATH"] = os.path.dirname(pcs[0])
        cflags = run(["pkg-config", "--cflags", "qcowd-plugin"], env=env).strip()
        inc = cflags[2:] if cflags.startswith("-I") else cflags
        assert os.path.isfile(os.path.join(inc, "qcowd", "vfs_plugin.h")), cflags
        pdir = run(["pkg-config", "--variable=plugindir", "qcowd-plugin"], env=env).strip()
        assert os.path.realpath(pdir).startswith(os.path.realpath(prefix)), pdir
        st["qcowd"] = os.path.join(prefix, "bin", "qcowd")
        assert os.access(st["qcowd"], os.X_OK)
        st["s3"] = glob.glob(os.path.join(prefix, "**", "plugins", "s3.so"), recursive=True)

    def exports():
        own = [s for s in exported(st["qcowd"]) if s.startswith(OWN_PREFIXES)]
        assert not own, "qcowd exports %s" % own[:10]
        assert st["s3"], "s3.so was not installed"
        syms = [s for s in exported(st["s3"][0]) if not s.startswith("_")]
        assert syms == ["qcowd_vfs_plugin_init"], syms

    def build():
        src = os.path.join(top, "vfs-tar")
        shutil.copytree(os.path.join(SOURCE, "examples", "vfs-tar"), src)
        run(["make", "-C", src, "PLUGINDIR=" + plugins, "install"], env=env)
        assert os.path.isfile(os.path.join(plugins, "tar.so"))

    def serve():
        imgs = os.path.join(top, "imgs")
        os.mkdir(imgs)
        base, top_img = os.path.join(imgs, "base.qcow2"), os.path.join(imgs, "top.qcow2")
        run([qcowd.QEMU_IMG, "create", "-q", "-f", "qcow2", base, "8M"])
        run([qcowd.QEMU_IO, "-c", "write -P 0x5a 0 3M", "-c", "write -z 4M 1M", base])
        run([qcowd.QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top_img])
        run([qcowd.QEMU_IO, "-c", "write -P 0xa5 1M 65k", "-c", "write -c -P 0x11 6M 64k", top_img])
        archive = os.path.join(top, "images.tar")
        run(["tar", "--format=ustar", "-C", imgs, "-cf", archive, "base.qcow2", "top.qcow2"])
        d = qcowd.Qcowd(st["qcowd"], ["--catalog", "tar:" + archive, "--plugin-dir", plugins])
        st["d"] = d
        s, _, body = d.exchange("GET", "/v1/images", headers={"Host": "localhost"})
        assert s == 200, (s, body)
        names = sorted(i["name"] if isinstance(i, dict) else i for i in json.loads(body)["images"])
        assert names == ["base", "top"], names
        for name, path in (("base", base), ("top", top_img)):
            raw = os.path.join(top, name + ".raw")
            run([qcowd.QEMU_IMG, "convert", "-O", "raw", path, raw])
            want = open(raw, "rb").read()
            s, _, got = d.exchange("GET", "/v1/images/%s/data" % name, headers={"Host": "localhost"})
            assert s == 200 and got == want, (name, s, len(got), len(want))
            s, _, got = d.exchange("GET", "/v1/images/%s/data" % name,
                                   headers={"Host": "localhost", "Range": "bytes=1048000-1118000"})
            assert s == 206 and got == want[1048000:1118001], (name, s, len(got))

    def refuse():
        d = st["d"]
        s, _, body = d.exchange("PUT", "/v1/images/top/data", body=b"x" * 512,
                                headers={"Host": "localhost", "Content-Range": "bytes 0-511/*"})
        assert s >= 400 and json.loads(body).get("error"), (s, body)
        bad = os.path.join(top, "bad.tar")
        blob = bytearray(open(os.path.join(top, "images.tar"), "rb").read())
        blob[148:156] = b"0000000\0"  # the first header's checksum
        open(bad, "wb").write(blob)
        d2 = qcowd.Qcowd(st["qcowd"], ["--catalog", "tar:" + bad, "--plugin-dir", plugins], expect_fail=True)
        try:
            if d2.port is None:
                d2.wait_log(60)
                text = "\n".join(d2.lines)
                assert "checksum" in text, text
            else:
                s, _, body = d2.exchange("GET", "/v1/images", headers={"Host": "localhost"})
                assert s >= 400 and b"checksum" in body, (s, body)
                assert d2.alive()
        finally:
            d2.kill()
        assert d.alive()

    for name, fn in (("install", install), ("exports", exports), ("build", build), ("serve", serve),
                     ("refuse", refuse)):
        cases.case(name, fn)
    if "d" in st:
        st["d"].stop_clean()
    qcowd.remove_temp(top, args.keep)
    return cases.summary()


if __name__ == "__main__":
    sys.exit(main())
