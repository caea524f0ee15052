#!/usr/bin/python3
"""docker_lint.py: checks docker/Dockerfile and docker/compose.yaml without a Docker
engine (none runs in CI), on the points that break an image:
  stages     a `build` and a `runtime` stage on Debian 12; COPY --from names a stage
  runtime    runs as a non-root user that the stage creates; VOLUME /data; EXPOSE 8443;
             the entrypoint script (TLS and tokens made on first start) copied in and
             used as ENTRYPOINT; a HEALTHCHECK on /v1/health
  packages   every package apt-get installs exists in Debian (apt-cache show; skipped
             with a message when apt has no package lists); the runtime stage installs
             no -dev package; the build stage installs the -dev package of every
             pkg-config module the copied CMake files ask for (found through dpkg -S)
  libraries  when the binaries are given (QCOWD, QCOWCTL, QCOWIMG), every shared
             library they need comes from a runtime-stage package or a Debian
             `required` package (those are in the base image)
  copy       every COPY source exists in the repository and is not dockerignored
  compose    the service builds docker/Dockerfile from the repository, mounts a volume
             at /data, maps port 8443 on loopback only, and its named volumes are declared

Environment: REPO (default: two folders up), QCOWD/QCOWCTL/QCOWIMG (optional).
Prints `ok NAME` / `FAIL NAME: reason` / `skip NAME: why`, then `N passed, M failed`.
"""

import fnmatch
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import traceback

import yaml

REPO = os.environ.get("REPO") or os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DOCKERFILE = os.path.join(REPO, "docker", "Dockerfile")
COMPOSE = os.path.join(REPO, "docker", "compose.yaml")
IGNORE = os.path.join(REPO, "docker", "Dockerfile.dockerignore")
RUNTIME_LIBS = ["libmicrohttpd12", "libjansson4", "zlib1g", "libzstd1", "libcurl3-gnutls", "libgnutls30"]
ENTRYPOINT = ["qcowd-entrypoint"]  # docker/entrypoint.sh: TLS and tokens, then exec qcowd
PORT = "8443"


class Skip(Exception):
    pass


def parse_dockerfile(path):
    """[(instruction, args text, line number)], continuations joined, comments dropped."""
    out, buf, start = [], "", 0
    with open(path) as f:
        for n, line in enumerate(f, 1):
            s = line.rstrip("\n")
            if not buf and (not s.strip() or s.lstrip().startswith("#")):
                continue
            if buf and s.lstrip().startswith("#"):  # comment inside a continuation
                continue
            if not buf:
                start = n
            if s.endswith("\\"):
                buf += s[:-1] + " "
                continue
            buf += s
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip(), start))
            buf = ""
    if buf:
        raise AssertionError("line %d: a continuation runs off the end" % start)
    return out


def stages_of(instrs):
    """{name: [(instr, args, line)]} in order, with ARG defaults substituted in FROM."""
    args, stages, order, cur = {}, {}, [], None
    for ins, rest, n in instrs:
        if ins == "ARG" and cur is None:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
            continue
        if ins == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", rest, re.I)
            assert m, "line %d: bad FROM" % n
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda mm: args.get(mm.group(1) or mm.group(2), ""), m.group(1))
            cur = m.group(2) or str(len(order))
            assert cur not in stages, "stage %s twice" % cur
            stages[cur] = [("FROM", image, n)]
            order.append(cur)
            continue
        assert cur is not None, "line %d: %s before FROM" % (n, ins)
        stages[cur].append((ins, rest, n))
    return stages, order


def apt_packages(stage):
    """The package names of every `apt-get install` in a stage's RUN lines."""
    pkgs = []
    for ins, rest, n in stage:
        if ins != "RUN":
            continue
        for cmd in re.split(r"&&|;|\|\|", rest):
            words = shlex.split(cmd)
            words = [w for w in words if "=" not in w or w.startswith("-")]  # drop VAR=value prefixes
            if "apt-get" in words and "install" in words:
                for w in words[words.index("install") + 1:]:
                    if not w.startswith("-"):
                        pkgs.append(w)
    return pkgs


def have_apt_lists():
    return bool(glob.glob("/var/lib/apt/lists/*_Packages*"))


def apt_show(pkg):
    p = subprocess.run(["apt-cache", "show", "--no-all-versions", pkg], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    return p.stdout.decode(errors="replace") if p.returncode == 0 and p.stdout.strip() else None


def apt_candidates(pkgs):
    """The names among pkgs that apt can install (one `apt-cache policy` call)."""
    out = subprocess.run(["apt-cache", "policy"] + list(pkgs), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         timeout=120).stdout.decode()
    found, cur = set(), None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            cur = line[:-1].split(":")[0]
        elif cur and line.strip().startswith("Candidate:") and "(none)" not in line:
            found.add(cur)
    return found


def owning_packages(paths):
    """{path: package} for the paths dpkg knows, in one dpkg -S call."""
    p = subprocess.run(["dpkg", "-S"] + sorted(set(paths)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=120)
    owners = {}
    for line in p.stdout.decode().splitlines():
        pkgs, _, path = line.partition(": ")
        owners[path.strip()] = pkgs.split(",")[0].split(":")[0].strip()
    return owners


def owning_package(path):
    p = subprocess.run(["dpkg", "-S", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    if p.returncode != 0:
        real = os.path.realpath(path)
        if real != path:
            return owning_package(real)
        return None
    return p.stdout.decode().split(":")[0].split(",")[0].strip()


class Lint:
    def __init__(self):
        self.passed = self.failed = self.skipped = 0

    def case(self, name, fn):
        try:
            fn()
            self.passed += 1
            print("ok", name, flush=True)
        except Skip as e:
            self.skipped += 1
            print("skip %s: %s" % (name, e), flush=True)
        except Exception as e:
            self.failed += 1
            print("FAIL %s: %s" % (name, e), flush=True)
            for line in traceback.format_exc().splitlines()[-4:]:
                print("    " + line)


def main():
    lint = Lint()
    instrs = parse_dockerfile(DOCKERFILE)
    stages, order = stages_of(instrs)
    build = stages.get("build", [])
    runtime = stages.get(order[-1]) if order else []

    def t_stages():
        assert "build" in stages, "no stage named build"
        assert order[-1] == "runtime", "the last stage is %r, not runtime" % order[-1]
        for name in order:
            image = stages[name][0][1]
            assert re.match(r"(docker\.io/)?(library/)?debian:(12|bookworm)", image), "%s: base %r is not Debian 12" % (name, image)
        for name in order:
            for ins, rest, n in stages[name]:
                m = re.search(r"--from=(\S+)", rest) if ins == "COPY" else None
                if m:
                    src = m.group(1)
                    assert src in order[:order.index(name)], "line %d: --from=%s is not an earlier stage" % (n, src)
        runs = " ".join(r for i, r, _ in build if i == "RUN")
        assert "cmake -S" in runs and "cmake --build" in runs, "the build stage does not build with cmake"
    lint.case("stages: build and runtime on Debian 12", t_stages)

    def t_runtime():
        ins = [i for i, _, _ in runtime]
        users = [(r, n) for i, r, n in runtime if i == "USER"]
        assert users, "the runtime stage has no USER: it runs as root"
        user, uline = users[-1]
        name = user.split(":")[0]
        assert name not in ("root", "0"), "the runtime stage runs as root"
        runs = " ".join(r for i, r, _ in runtime if i == "RUN")
        assert re.search(r"(useradd|adduser)\b[^&;]*\b%s\b" % re.escape(name), runs) or name.isdigit(), \
            "user %s is never created" % name
        ep = [(r, n) for i, r, n in runtime if i == "ENTRYPOINT"]
        assert ep and json.loads(ep[-1][0]) == ENTRYPOINT, "ENTRYPOINT is %r, want %r" % (ep and ep[-1][0], ENTRYPOINT)
        assert uline < ep[-1][1], "USER comes after ENTRYPOINT"
        vols = [r for i, r, _ in runtime if i == "VOLUME"]
        assert any("/data" in (json.loads(v) if v.startswith("[") else v.split()) for v in vols), "no VOLUME /data"
        assert any(PORT in r.split() or PORT + "/tcp" in r.split() for i, r, _ in runtime if i == "EXPOSE"), \
            "no EXPOSE " + PORT
        with open(os.path.join(REPO, "docker", "entrypoint.sh")) as f:
            script = f.read()
        for want in ("--tls-cert", "--tls-key", "--tokens", "qcowd token new", "exec qcowd"):
            assert want in script, "docker/entrypoint.sh does not %s" % want
        assert re.search(r"COPY\s+docker/entrypoint\.sh\s+\S*/qcowd-entrypoint", open(DOCKERFILE).read()), \
            "the entrypoint script is not copied into the image"
        hc = [r for i, r, _ in runtime if i == "HEALTHCHECK"]
        assert hc and "CMD" in hc[-1], "no HEALTHCHECK"
        assert "/v1/health" in hc[-1] or re.search(r'qcowctl"?,?\s*"?health', hc[-1]), "the HEALTHCHECK does not ask /v1/health"
        assert "chown" in runs and "/data" in runs, "/data is not given to the runtime user"
        assert "ADD" not in ins, "ADD in the runtime stage (use COPY)"
    lint.case("runtime: non-root, VOLUME /data, EXPOSE 8443, ENTRYPOINT with TLS and tokens, HEALTHCHECK", t_runtime)

    def t_packages_exist():
        pkgs = sorted(set(apt_packages(build) + apt_packages(runtime)))
        assert pkgs, "no apt-get install found"
        if not have_apt_lists():
            raise Skip("apt has no package lists here (run apt-get update); %d names not checked" % len(pkgs))
        missing = [p for p in pkgs if p not in apt_candidates(pkgs)]
        assert not missing, "not in Debian: %s" % " ".join(missing)
    lint.case("packages: every apt-get install name exists in Debian", t_packages_exist)

    def t_runtime_set():
        rt = apt_packages(runtime)
        dev = [p for p in rt if p.endswith("-dev")]
        assert not dev, "-dev packages in the runtime stage: %s" % dev
        miss = [p for p in RUNTIME_LIBS if p not in rt]
        assert not miss, "the runtime stage lacks %s" % miss
        for tool in ("gcc", "cmake", "make"):
            assert tool not in rt, "%s in the runtime stage" % tool
    lint.case("packages: runtime stage has the libraries and no build tools", t_runtime_set)

    def t_build_devs():
        copied = [rest.split()[0].rstrip("/") for i, rest, _ in build if i == "COPY" and "--from" not in rest]
        modules = set()
        for src in copied:
            for cm in glob.glob(os.path.join(REPO, src, "**", "CMakeLists.txt"), recursive=True) if os.path.isdir(
                    os.path.join(REPO, src)) else [os.path.join(REPO, src)]:
                if not cm.endswith("CMakeLists.txt"):
                    continue
                text = open(cm).read()
                # the top level asks for Check only when testing: the image builds without tests
                text = re.sub(r"if\(BUILD_TESTING\).*?endif\(\)", "", text, flags=re.S)
                for m in re.finditer(r"pkg_check_modules\(\s*\w+\s+(.*?)\)", text, re.S):
                    for w in m.group(1).split():
                        if w not in ("REQUIRED", "QUIET", "IMPORTED_TARGET", "GLOBAL", "NO_CMAKE_PATH",
                                     "NO_CMAKE_ENVIRONMENT_PATH"):
                            modules.add(re.split(r"[<>=]", w)[0])
        assert modules, "no pkg-config module found in the copied CMake files"
        bpkgs = set(apt_packages(build))
        unknown, missing = [], []
        for mod in sorted(modules):
            p = subprocess.run(["pkg-config", "--path", mod], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            pc = p.stdout.decode().strip()
            owner = owning_package(pc) if p.returncode == 0 and pc else None
            if not owner:
                unknown.append(mod)
            elif owner not in bpkgs:
                missing.append("%s (%s)" % (mod, owner))
        if unknown and len(unknown) == len(modules):
            raise Skip("pkg-config/dpkg cannot place the modules %s here" % unknown)
        assert not missing, "the build stage lacks the -dev package of %s" % ", ".join(missing)
        print("    pkg-config modules: %s" % " ".join(sorted(modules)))
    lint.case("packages: build stage has every pkg-config module's -dev package", t_build_devs)

    def t_libraries():
        bins = [os.environ.get(k) for k in ("QCOWD", "QCOWCTL", "QCOWIMG") if os.environ.get(k)]
        if not bins:
            raise Skip("QCOWD/QCOWCTL/QCOWIMG not given")
        if not have_apt_lists():
            raise Skip("apt has no package lists here")
        needs = []  # (binary, soname, path)
        for b in bins:
            out = subprocess.run(["ldd", b], stdout=subprocess.PIPE, timeout=60).stdout.decode()
            for m in re.finditer(r"^\s*(\S+) => (/\S+)", out, re.M):
                if not re.match(r"lib(asan|ubsan|tsan|lsan)", m.group(1)):  # sanitizer builds only
                    needs.append((os.path.basename(b), m.group(1), m.group(2)))
        owners = owning_packages([p for _, _, p in needs] + [os.path.realpath(p) for _, _, p in needs])
        # what the runtime image holds: the base image's required packages and the
        # runtime stage's packages, with everything they depend on
        base = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Priority} ${Essential}\\n"],
                              stdout=subprocess.PIPE, timeout=60).stdout.decode().split("\n")
        roots = [l.split()[0] for l in base if len(l.split()) >= 2 and (l.split()[1] == "required" or l.endswith(" yes"))]
        roots += apt_packages(runtime)
        out = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                              "--no-breaks", "--no-replaces", "--no-enhances"] + sorted(set(roots)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120).stdout.decode()
        have = {l.strip() for l in out.splitlines() if l and not l[0].isspace() and not l.startswith("<")}
        problems = []
        for b, lib, path in needs:
            owner = owners.get(path) or owners.get(os.path.realpath(path))
            if not owner:
                problems.append("%s: %s belongs to no package" % (b, lib))
            elif owner not in have:
                problems.append("%s needs %s from %s, not in the runtime image" % (b, lib, owner))
        assert not problems, "; ".join(sorted(set(problems)))
        print("    %d libraries of %d binaries, from %d packages" % (len(set(l for _, l, _ in needs)), len(bins),
                                                               len(set(owners.values()))))
    lint.case("libraries: the binaries' shared libraries come with the runtime stage", t_libraries)

    def t_copy():
        ignore = []
        if os.path.exists(IGNORE):
            ignore = [l.strip() for l in open(IGNORE) if l.strip() and not l.startswith("#")]

        def ignored(rel):
            state = False
            for pat in ignore:
                neg = pat.startswith("!")
                p = pat[1:] if neg else pat
                p = p.rstrip("/")
                if fnmatch.fnmatch(rel, p) or rel.startswith(p + "/"):
                    state = not neg
            return state

        n = 0
        for name in order:
            for ins, rest, line in stages[name]:
                if ins not in ("COPY", "ADD") or "--from" in rest:
                    continue
                words = [w for w in shlex.split(rest) if not w.startswith("--")]
                for src in words[:-1]:
                    path = os.path.join(REPO, src)
                    assert glob.glob(path), "line %d: COPY source %s is not in the repository" % (line, src)
                    assert not ignored(src.rstrip("/")), "line %d: COPY source %s is dockerignored" % (line, src)
                    n += 1
        assert n, "nothing is copied"
    lint.case("copy: every COPY source exists and is in the build context", t_copy)

    def t_compose():
        with open(COMPOSE) as f:
            doc = yaml.safe_load(f)
        services = doc.get("services") or {}
        assert services, "no services"
        svc = next((s for s in services.values() if s.get("build")), None)
        assert svc, "no service builds an image"
        b = svc["build"]
        ctx = os.path.normpath(os.path.join(os.path.dirname(COMPOSE), b if isinstance(b, str) else b.get("context", ".")))
        df = "Dockerfile" if isinstance(b, str) else b.get("dockerfile", "Dockerfile")
        assert os.path.samefile(os.path.join(ctx, df), DOCKERFILE), "the service does not build docker/Dockerfile"
        assert os.path.samefile(ctx, REPO), "the build context is not the repository root"
        targets, named = [], []
        for v in svc.get("volumes") or []:
            if isinstance(v, str):
                parts = v.split(":")
                src, tgt = (parts[0], parts[1]) if len(parts) >= 2 else (None, parts[0])
            else:
                src, tgt = v.get("source"), v.get("target")
            targets.append(tgt)
            if src and not src.startswith((".", "/", "~")):
                named.append(src)
        assert "/data" in targets, "no volume at /data"
        for n in named:
            assert n in (doc.get("volumes") or {}), "named volume %s is not declared" % n
        ports = []
        for p in svc.get("ports") or []:
            if isinstance(p, dict):
                ports.append(str(p.get("target")))
            else:
                ports.append(str(p).split(":")[-1].split("/")[0])
        assert PORT in ports, "port %s is not mapped (%s)" % (PORT, ports)
        for p in svc.get("ports") or []:
            assert not isinstance(p, str) or p.startswith("127.0.0.1:"), "port %s is published beyond loopback" % p
    lint.case("compose: builds docker/Dockerfile, volume at /data, port 8443 on loopback", t_compose)

    print("%d passed, %d failed, %d skipped" % (lint.passed, lint.failed, lint.skipped))
    return 1 if lint.failed else 0


if __name__ == "__main__":
    sys.exit(main())
