"""`make images`: one OCI image per service, built without Docker, reproducibly.

    python3 build-support/images/build.py [--variant cpu|cuda] [--docker-archive] [SERVICE ...]

Per image, three layers on top of each other:

1. base: a Debian bookworm root filesystem made by `mmdebstrap` from Debian packages
   (python3, ca-certificates, libstdc++6; essential variant, merged /usr, no docs), shared by every
   image. Its installed package list is written to build/images/base-packages.txt and compared with
   the list recorded in deploy/images/base-packages.txt, so a change in Debian (a security update)
   shows as a diff rather than as an unexplained digest change.
2. deps: the service PEX's third-party distributions, installed as a virtualenv at
   /opt/tandem/venv by the PEX's own tools (`PEX_TOOLS=1 <pex> venv --scope=deps --compile`),
   run with the image's python3 in a chroot of the base, so every path and shebang is the image's.
3. srcs: tandem's own code from the same PEX (`--scope=srcs`): the small layer that changes with
   tandem commits.

Layers are written by this script as tar files with sorted entries, owner 0:0, and every mtime set
to EPOCH; .pyc files are hash-based (SOURCE_DATE_EPOCH set while compiling) with PYTHONHASHSEED=0.
`umoci` assembles the OCI layout (it gzips the layers), the image config's `created` and the
history use the commit time, and the labels carry version, git commit and source. Two clean builds
of the same commit on the same day give the same digests (the Debian mirror is the only input that
can move between days: see base-packages.txt).

Layers are cached under build/images/.cache, keyed by their inputs (the base by its mmdebstrap
arguments and the UTC day; deps and srcs by the PEX's contents), so a rebuild redoes only what
changed: touching one service rebuilds only that service's layers.

Outputs: build/images/<name>/ (OCI layout, tag <version>[-cuda]), build/images/<name>.oci.tar
(the same layout as an oci-archive, byte-reproducible), build/images/<name>.docker.tar with
--docker-archive (`docker load` format, by skopeo), and build/images/<name>.json (digest, sizes,
labels). <name> is the service, or <service>-cuda for --variant cuda.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from deploy.services import module_of  # noqa: E402  (the one table of service -> module)

OUT = REPO / "build" / "images"
CACHE = OUT / ".cache"
# Every file in every layer gets this mtime (and mmdebstrap gets it as SOURCE_DATE_EPOCH): a fixed
# point, not a build date, so a layer's digest depends on its contents alone.
EPOCH = 1767225600  # 2026-01-01T00:00:00Z
SUITE = "bookworm"
BASE_PACKAGES = ["python3", "ca-certificates", "libstdc++6"]
VENV = "/opt/tandem/venv"
# Bumped when this script changes what it puts into a layer (part of every layer's cache key).
LAYOUT_VERSION = "1"

SERVICES = {
    "router": {"ports": [8000, 50051, 8051], "variants": ("cpu",),
               "description": "tandem router: OpenAI-compatible HTTP API and gRPC Router"},
    "prefill": {"ports": [50061, 8061], "variants": ("cpu", "cuda"),
                "description": "tandem prefill worker: runs prompts, writes KV pages to decode over NIXL"},
    "decode": {"ports": [50071, 8071], "variants": ("cpu", "cuda"),
               "description": "tandem decode worker: continuous-batching decode, remote prefill over NIXL"},
    "eplb": {"ports": [50081, 8081], "variants": ("cpu",),
             "description": "tandem EPLB planner: expert-parallel load balancing plans for MoE workers"},
}


def log(msg: str) -> None:
    print(f"[images] {msg}", flush=True)


def run(*cmd: str, env: dict | None = None, capture: bool = False) -> str:
    res = subprocess.run(list(cmd), env=env, check=False, text=True,
                         stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        detail = f"\n{res.stdout}\n{res.stderr}" if capture else ""
        raise SystemExit(f"[images] FAILED ({res.returncode}): {' '.join(cmd)}{detail}")
    return res.stdout if capture else ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def key_of(*parts: str) -> str:
    return hashlib.sha256("\0".join([LAYOUT_VERSION, *parts]).encode()).hexdigest()[:20]


# ---- git and version --------------------------------------------------------------------------
def git(*args: str) -> str:
    res = subprocess.run(["git", *args], cwd=REPO, text=True, capture_output=True, check=False)
    return res.stdout.strip() if res.returncode == 0 else ""


def source_info() -> dict:
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    commit_time = int(git("log", "-1", "--format=%ct") or EPOCH)
    source = (os.environ.get("TANDEM_SOURCE_URL") or git("config", "--get", "remote.origin.url")
              or "local checkout (no git remote configured)")
    version = (REPO / "VERSION").read_text().strip()
    return {"commit": commit, "dirty": dirty, "commit_time": commit_time, "source": source, "version": version}


def rfc3339(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- layer tar files ----------------------------------------------------------------------------
def _tarinfo(root: Path, rel: str) -> tuple[tarfile.TarInfo, Path]:
    path = root / rel
    st = path.lstat()
    ti = tarfile.TarInfo(rel)
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = EPOCH, 0, 0, "", ""
    ti.mode = st.st_mode & 0o7777
    if path.is_symlink():
        ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif path.is_dir():
        ti.type = tarfile.DIRTYPE
    elif path.is_file():
        ti.type, ti.size = tarfile.REGTYPE, st.st_size
    else:
        raise SystemExit(f"[images] unexpected file type in a layer: {path}")
    return ti, path


def write_layer(root: Path, paths: list[str], out: Path) -> None:
    """A deterministic tar of `paths` (relative to root) and their parent directories."""
    entries = set()
    for rel in paths:
        parts = Path(rel).parts
        for i in range(1, len(parts) + 1):
            entries.add("/".join(parts[:i]))
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(entries):
            ti, path = _tarinfo(root, rel)
            if ti.type == tarfile.REGTYPE:
                with open(path, "rb") as fh:
                    tar.addfile(ti, fh)
            else:
                tar.addfile(ti)
    tmp.replace(out)


def tree_manifest(root: Path, sub: str) -> dict[str, tuple]:
    """rel path -> (kind, mode, content sha256 or link target) for everything under root/sub."""
    out: dict[str, tuple] = {}
    base = root / sub
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("l", 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777, "")
            else:
                out[rel] = ("f", st.st_mode & 0o7777, sha256_file(p))
    return out


# ---- base root filesystem -----------------------------------------------------------------------
def mmdebstrap_args(out: Path) -> list[str]:
    args = ["mmdebstrap", "--quiet", "--mode=root", "--variant=essential", "--format=tar",
            "--include=" + ",".join(BASE_PACKAGES),
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr"]
    # dpkg's path filters are fnmatch globs (no braces): one option per directory.
    for d in ("man", "info", "locale", "doc", "doc-base", "lintian", "linda"):
        args.append(f"--dpkgopt=path-exclude=/usr/share/{d}/*")
    args.append("--dpkgopt=path-include=/usr/share/doc/*/copyright")
    # No mirror argument: mmdebstrap's default brings bookworm, -updates and -security.
    return [*args, SUITE, str(out)]


def build_base() -> tuple[Path, str]:
    day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    key = key_of("base", " ".join(mmdebstrap_args(Path("OUT"))), str(EPOCH), day)
    tar = CACHE / f"base-{key}.tar"
    if not tar.exists():
        log(f"base: mmdebstrap {SUITE} + {', '.join(BASE_PACKAGES)} (cached for the UTC day {day})")
        t0 = time.monotonic()
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)}
        tmp = tar.with_suffix(".tmp.tar")
        run(*mmdebstrap_args(tmp), env=env)
        tmp.replace(tar)
        log(f"base: {tar.stat().st_size / 1e6:.0f} MB in {time.monotonic() - t0:.0f} s")
    packages = base_packages(tar)
    (OUT / "base-packages.txt").write_text(packages)
    recorded = REPO / "deploy" / "images" / "base-packages.txt"
    if recorded.exists() and recorded.read_text() != packages:
        old = set(recorded.read_text().splitlines())
        new = set(packages.splitlines())
        log("NOTE: the base's Debian packages differ from deploy/images/base-packages.txt "
            "(a Debian update; commit the new list to record it):")
        for line in sorted(old - new):
            log(f"  - {line}")
        for line in sorted(new - old):
            log(f"  + {line}")
    return tar, packages


def base_packages(base_tar: Path) -> str:
    """'name version arch' of every installed package, from the base's dpkg status file."""
    with tarfile.open(base_tar) as tar:
        member = next(m for m in tar.getmembers() if m.name.lstrip("./") == "var/lib/dpkg/status")
        status = tar.extractfile(member).read().decode()
    rows = []
    for stanza in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Status", "").endswith(" installed"):
            rows.append(f"{fields['Package']} {fields['Version']} {fields['Architecture']}")
    return "\n".join(sorted(rows)) + "\n"


# ---- app layers from the PEX --------------------------------------------------------------------
def pex_info(pex: Path) -> dict:
    with zipfile.ZipFile(pex) as z:
        return json.loads(z.read("PEX-INFO"))


def build_app_layers(svc: str, pex: Path, base_tar: Path, base_key: str) -> tuple[Path, Path]:
    info = pex_info(pex)
    deps_key = key_of("deps", base_key, json.dumps(info.get("distributions", {}), sort_keys=True),
                      json.dumps(info.get("requirements", []), sort_keys=True))
    srcs_key = key_of("srcs", deps_key, sha256_file(pex))
    deps_tar, srcs_tar = CACHE / f"deps-{deps_key}.tar", CACHE / f"srcs-{srcs_key}.tar"
    if deps_tar.exists() and srcs_tar.exists():
        return deps_tar, srcs_tar
    t0 = time.monotonic()
    work = CACHE / f"rootfs-{svc}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        run("tar", "-x", "--numeric-owner", "-p", "-f", str(base_tar), "-C", str(work))
        shutil.copy2(pex, work / "tmp" / "app.pex")
        # The PEX installs itself with the image's own interpreter (same paths as at run time).
        env = {"PATH": "/usr/bin:/bin", "PEX_TOOLS": "1", "PEX_ROOT": "/tmp/pex-root", "HOME": "/tmp",
               "SOURCE_DATE_EPOCH": str(EPOCH), "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        venv = VENV.lstrip("/")

        chroot = shutil.which("chroot") or "/usr/sbin/chroot"

        def install(scope: str, compile_all: bool) -> None:
            run(chroot, str(work), "/usr/bin/python3", "/tmp/app.pex", "venv", f"--scope={scope}",
                *(["--compile"] if compile_all else []), VENV, env=env, capture=True)

        if deps_tar.exists():  # another service with the same distributions built it already
            run("tar", "-x", "--numeric-owner", "-p", "-f", str(deps_tar), "-C", str(work))
        else:
            install("deps", compile_all=True)
        before = tree_manifest(work, venv)
        if not deps_tar.exists():
            write_layer(work, sorted(before), deps_tar)
        t1 = time.monotonic()
        # `--compile` would recompile the whole venv: compile only what the srcs scope wrote.
        install("srcs", compile_all=False)
        written = tree_manifest(work, venv)
        sources = sorted("/" + p for p, v in written.items() if p.endswith(".py") and before.get(p) != v)
        if sources:
            run(chroot, str(work), "/usr/bin/python3", "-m", "compileall", "-q", *sources, env=env, capture=True)
        t_srcs = time.monotonic() - t1
        after = tree_manifest(work, venv)
        gone = set(before) - set(after)
        if gone:
            raise SystemExit(f"[images] {svc}: --scope=srcs removed files of the deps layer: {sorted(gone)[:5]}")
        changed = sorted(p for p, v in after.items() if before.get(p) != v)
        write_layer(work, changed, srcs_tar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{svc}: deps layer {deps_tar.stat().st_size / 1e6:.0f} MB, srcs layer {srcs_tar.stat().st_size / 1e6:.1f} MB "
        f"({len(changed)} entries) in {time.monotonic() - t0:.0f} s (srcs install {t_srcs:.0f} s)")
    return deps_tar, srcs_tar


# ---- Prometheus, for the compose stack (no registry to pull prom/prometheus from) ---------------
PROMETHEUS_FILES = ("usr/bin/prometheus", "usr/bin/promtool", "etc/prometheus", "usr/share/doc/prometheus/copyright")


def build_prometheus_layer() -> Path:
    """Debian's prometheus package (a Go binary that needs only libc), unpacked onto the base:
    the binaries, /etc/prometheus and the copyright file, plus an empty /prometheus for the TSDB."""
    debs = CACHE / "debs"
    debs.mkdir(exist_ok=True)
    version = run("apt-cache", "policy", "prometheus", capture=True).split("Candidate:")[1].split()[0]
    deb = next(debs.glob(f"prometheus_{version.replace(':', '%3a')}_*.deb"), None)
    if deb is None:
        subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"prometheus={version}"], cwd=debs, check=True,
                       stdout=subprocess.DEVNULL)
        deb = next(debs.glob("prometheus_*.deb"))
    layer = CACHE / f"prometheus-{version.replace(':', '_')}-{sha256_file(deb)[:12]}.tar"
    if layer.exists():
        return layer
    work = CACHE / "prometheus-root"
    shutil.rmtree(work, ignore_errors=True)
    try:
        run("dpkg-deb", "-x", str(deb), str(work))
        (work / "prometheus").mkdir()
        paths = [str(p.relative_to(work)) for f in PROMETHEUS_FILES for p in [work / f, *(work / f).rglob("*")]
                 if p.exists() or p.is_symlink()]
        write_layer(work, sorted({*paths, "prometheus"}), layer)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return layer


def prometheus_config(src: dict, packages: str, layer: Path) -> dict:
    labels = common_labels("tandem-prometheus", "Prometheus from Debian's package, for tandem's compose stack",
                           src, packages)
    return {"entrypoint": ["/usr/bin/prometheus"],
            "cmd": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
                    "--web.listen-address=:9090"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
            "ports": ["9090/tcp"], "labels": {**labels, "dev.tandem.layer": layer.name}}


# ---- OCI assembly ---------------------------------------------------------------------------------
def common_labels(title: str, description: str, src: dict, packages: str) -> dict:
    return {
        "org.opencontainers.image.title": title,
        "org.opencontainers.image.description": description,
        "org.opencontainers.image.version": src["version"],
        "org.opencontainers.image.revision": src["commit"],
        "org.opencontainers.image.source": src["source"],
        "org.opencontainers.image.created": rfc3339(src["commit_time"]),
        "org.opencontainers.image.base.name": f"debian:{SUITE} (mmdebstrap: {' '.join(BASE_PACKAGES)})",
        "dev.tandem.git.dirty": "true" if src["dirty"] else "false",
        "dev.tandem.base.packages.sha256": hashlib.sha256(packages.encode()).hexdigest(),
    }


def entrypoint(svc: str) -> list[str]:
    """What the image of ``svc`` runs: the venv's python on the service's module (deploy.services)."""
    return [f"{VENV}/bin/python", "-m", module_of(svc)]


def service_config(svc: str, variant: str, src: dict, packages: str, pex: Path) -> dict:
    spec = SERVICES[svc]
    labels = common_labels(f"tandem-{svc}", spec["description"], src, packages)
    labels.update({"dev.tandem.torch-variant": variant, "dev.tandem.pex.sha256": sha256_file(pex)})
    return {"entrypoint": entrypoint(svc), "cmd": [],
            "env": ["PATH=/opt/tandem/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG=C.UTF-8", "PYTHONUNBUFFERED=1", "HOME=/tmp"],
            "ports": [f"{p}/tcp" for p in spec["ports"]], "labels": labels}


def assemble(name: str, repo: str, tag: str, layers: list[tuple[Path, str]], config: dict, src: dict) -> dict:
    labels = config["labels"]
    inputs_key = key_of("image", json.dumps(config, sort_keys=True), tag, rfc3339(src["commit_time"]),
                        *[f"{p.name}:{c}" for p, c in layers])
    layout = OUT / name
    stamp = OUT / f".{name}.inputs"
    if layout.exists() and stamp.exists() and stamp.read_text() == inputs_key and (OUT / f"{name}.oci.tar").exists():
        return json.loads((OUT / f"{name}.json").read_text())
    if layout.exists():
        shutil.rmtree(layout)
    created = rfc3339(src["commit_time"])
    image = f"{layout}:{tag}"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", image)
    for tar, comment in layers:
        run("umoci", "raw", "add-layer", "--image", image, "--history.created", created,
            "--history.created_by", comment, "--history.author", "tandem build-support/images/build.py", str(tar))
    cfg = ["umoci", "config", "--image", image, "--no-history", "--created", created,
           "--author", "tandem build-support/images/build.py", "--architecture", "amd64", "--os", "linux",
           "--config.workingdir", "/tmp", "--config.stopsignal", "SIGTERM"]
    cfg += [f"--config.entrypoint={a}" for a in config["entrypoint"]]
    cfg += [f"--config.cmd={a}" for a in config["cmd"]]
    cfg += [f"--config.env={e}" for e in config["env"]]
    cfg += [f"--config.exposedports={p}" for p in config["ports"]]
    cfg += [f"--config.label={k}={v}" for k, v in labels.items()]
    cfg += [f"--manifest.annotation={k}={v}" for k, v in labels.items() if k.startswith("org.opencontainers")]
    run(*cfg)
    run("umoci", "gc", "--layout", str(layout))
    normalize_layout(layout)
    archive = OUT / f"{name}.oci.tar"
    tar_layout(layout, archive)
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    manifest = json.loads((layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_text())
    size = desc["size"] + manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
    result = {"name": name, "reference": f"localhost/tandem/{repo}:{tag}", "tag": tag,
              "digest": desc["digest"], "compressed_size": size,
              "layers": [{"digest": lay["digest"], "size": lay["size"], "created_by": c}
                         for lay, (_, c) in zip(manifest["layers"], layers)],
              "labels": labels, "entrypoint": config["entrypoint"]}
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    stamp.write_text(inputs_key)
    return result


def normalize_layout(layout: Path) -> None:
    """Same bytes for the same image: fixed mtimes on the layout's files (umoci's JSON is stable)."""
    for p in [layout, *layout.rglob("*")]:
        os.utime(p, (EPOCH, EPOCH), follow_symlinks=False)


def tar_layout(layout: Path, archive: Path) -> None:
    """The layout as an oci-archive (what `skopeo copy oci-archive:` and `podman load` read)."""
    tmp = archive.with_suffix(".tmp")
    run("tar", "--sort=name", f"--mtime=@{EPOCH}", "--owner=0", "--group=0", "--numeric-owner",
        "--format=posix", "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
        "-C", str(layout), "-cf", str(tmp), ".")
    tmp.replace(archive)


def docker_archive(name: str, repo: str, tag: str, digest: str) -> Path:
    """The image as a docker-archive (`docker load -i`), rewritten only when the image changed."""
    out, stamp = OUT / f"{name}.docker.tar", OUT / f".{name}.docker.digest"
    if out.exists() and stamp.exists() and stamp.read_text() == digest:
        return out
    out.unlink(missing_ok=True)
    run("skopeo", "copy", "--quiet", f"oci:{OUT / name}:{tag}", f"docker-archive:{out}:localhost/tandem/{repo}:{tag}")
    stamp.write_text(digest)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("services", nargs="*", help="default: every service of the variant")
    ap.add_argument("--variant", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dist", type=Path, help="folder of the PEX files (default dist/, dist/cuda/ for cuda)")
    ap.add_argument("--docker-archive", action="store_true", help="also write <name>.docker.tar")
    args = ap.parse_args()
    services = [s for s in args.services if s != "prometheus"] if args.services else \
        [s for s, spec in SERVICES.items() if args.variant in spec["variants"]]
    for s in services:
        if s not in SERVICES or args.variant not in SERVICES[s]["variants"]:
            raise SystemExit(f"[images] {s!r}: not a service with a {args.variant} image "
                             f"(have: {[n for n, v in SERVICES.items() if args.variant in v['variants']]})")
    if os.geteuid() != 0:
        raise SystemExit("[images] needs root: mmdebstrap --mode=root and chroot (run under sudo)")
    dist = args.dist or (REPO / "dist" / ("cuda" if args.variant == "cuda" else ""))
    t0 = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    src = source_info()
    base_tar, packages = build_base()
    base_key = sha256_file(base_tar)
    suffix = "-cuda" if args.variant == "cuda" else ""
    tag = src["version"] + suffix
    results = []
    for svc in services:
        pex = dist / f"tandem-{svc}.pex"
        if not pex.is_file():
            raise SystemExit(f"[images] {pex} missing: build it first (make package)")
        name = svc + suffix
        deps_tar, srcs_tar = build_app_layers(name, pex, base_tar, base_key)
        layers = [(base_tar, f"debian {SUITE} via mmdebstrap: {' '.join(BASE_PACKAGES)}"),
                  (deps_tar, f"{VENV}: third-party distributions of tandem-{svc}.pex (pex venv --scope=deps)"),
                  (srcs_tar, f"{VENV}: tandem sources of tandem-{svc}.pex (pex venv --scope=srcs)")]
        r = assemble(name, svc, tag, layers, service_config(svc, args.variant, src, packages, pex), src)
        r["_layer_files"] = [deps_tar, srcs_tar]
        if args.docker_archive:
            r["docker_archive"] = str(docker_archive(name, svc, tag, r["digest"]).relative_to(REPO))
        results.append(r)
        log(f"{name}: {r['reference']} {r['digest']} ({r['compressed_size'] / 1e6:.0f} MB compressed)")
    if args.variant == "cpu" and (not args.services or "prometheus" in args.services):
        layer = build_prometheus_layer()
        config = prometheus_config(src, packages, layer)
        layers = [(base_tar, f"debian {SUITE} via mmdebstrap: {' '.join(BASE_PACKAGES)}"),
                  (layer, f"Debian's prometheus package ({layer.stem.split('-', 1)[1]}): binaries and config")]
        r = assemble("prometheus", "prometheus", tag, layers, config, src)
        r["_layer_files"] = [layer]
        if args.docker_archive:
            r["docker_archive"] = str(docker_archive("prometheus", "prometheus", tag, r["digest"]).relative_to(REPO))
        results.append(r)
        log(f"prometheus: {r['reference']} {r['digest']} ({r['compressed_size'] / 1e6:.0f} MB compressed)")
    # Cached layers unused for a week (an older PEX, an older base) are dropped.
    for used in [base_tar, *(p for r in results for p in r.pop("_layer_files"))]:
        os.utime(used)
    for stale in CACHE.glob("*.tar"):
        if time.time() - stale.stat().st_mtime > 7 * 86400:
            stale.unlink()
    log(f"{len(results)} image(s) in {time.monotonic() - t0:.0f} s; digests in build/images/<name>.json")


if __name__ == "__main__":
    sys.exit(main())
