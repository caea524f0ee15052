"""installed.py: installs clients/python the way a user would, offline
(`pip install --no-index --no-build-isolation`, into a --target folder), and
imports qcowd_client from there, never from the source tree."""

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "..", "clients", "python")


def install(tmp):
    """Installs the package under tmp and returns the imported module. pip builds in
    a copy of the source, so no build/ or .egg-info lands in the tree."""
    src = os.path.join(tmp, "qcowd-client-src")
    site = os.path.join(tmp, "site")
    shutil.copytree(SOURCE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps",
                        "--quiet", "--disable-pip-version-check", "--target", site, src],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    if p.returncode != 0:
        raise RuntimeError("pip install of clients/python failed:\n" + p.stdout.decode(errors="replace"))
    sys.path.insert(0, site)
    import qcowd_client
    where = os.path.realpath(qcowd_client.__file__)
    if not where.startswith(os.path.realpath(site) + os.sep):
        raise RuntimeError("qcowd_client imported from %s, not the installed copy in %s" % (where, site))
    return qcowd_client
