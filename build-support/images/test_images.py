"""`make test-images`: the images `make images` built, run the way users run them.

1. Each image is copied from its OCI layout into a private podman storage (build/podman/), and
   every docker-archive (`make images-docker`) is read back (`skopeo inspect`); the router's is
   loaded with `podman load`, the same format `docker load` reads.
2. Each tandem image's entrypoint runs with `--help` (Prometheus's with `--version`).
3. deploy/compose/compose.yaml comes up with podman-compose on the host network, on free ports:
   planner, prefill and decode serving the MoE demo model with EPLB (nixl, every prompt prefilled
   remotely), router, Prometheus. Checked: gRPC health SERVING and /health 200 for all four,
   chat completions through the router, prefill computing their prompts and registering decode
   with the nixl backend, Prometheus scraping every target.
4. podman-compose down; no container of the project may remain, running or stopped.

podman is configured as build-support/images/README.md says (runc, cgroupfs, fixed ulimits):
crun and podman's default rlimits fail on this kind of machine.

    .venv/bin/python build-support/images/test_images.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
import stack_checks as sc  # noqa: E402

sys.path.insert(0, str(REPO))
from deploy.services import module_of, service_modules  # noqa: E402

IMAGES = REPO / "build" / "images"
PODMAN = REPO / "build" / "podman"
SERVICES = tuple(service_modules())
MODEL = "tandem-demo-moe"


def log(msg: str) -> None:
    print(f"[test-images] {msg}", flush=True)


def podman_env() -> dict:
    import resource

    PODMAN.mkdir(parents=True, exist_ok=True)
    # podman's default rlimits exceed what may be set here ("error setting rlimit type 7 / 6:
    # operation not permitted"): containers get this process's open-files limit, and a process
    # limit of 32768 (64K and more fail here too, although this process's own limit is higher).
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = [min(v, 32768) for v in resource.getrlimit(resource.RLIMIT_NPROC)]
    (PODMAN / "containers.conf").write_text(
        "# Written by build-support/images/test_images.py.\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile[0]}:{nofile[1]}", "nproc={nproc[0]}:{nproc[1]}"]\n'
        "[engine]\n"
        '# crun fails on this kind of machine ("cgroups in hybrid mode not supported")\n'
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n')
    (PODMAN / "storage.conf").write_text(
        "# Written by build-support/images/test_images.py: a private image store (a cache; `make clean` keeps it).\n"
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{PODMAN / "storage"}"\n'
        f'runroot = "{PODMAN / "run"}"\n')
    return {**os.environ, "CONTAINERS_CONF": str(PODMAN / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(PODMAN / "storage.conf")}


def sh(*cmd: str, env: dict, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), env=env, text=True, capture_output=True, timeout=timeout)
    if check and res.returncode != 0:
        raise SystemExit(f"[test-images] FAILED ({res.returncode}): {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    return res


def image_ref(name: str) -> tuple[str, str]:
    info = json.loads((IMAGES / f"{name}.json").read_text())
    return info["tag"], info["reference"]


def load_images(env: dict) -> dict[str, str]:
    refs = {}
    for name in (*SERVICES, "prometheus"):
        if not (IMAGES / f"{name}.json").exists():
            raise SystemExit(f"[test-images] build/images/{name}.json missing: run `make images` first")
        tag, ref = image_ref(name)
        sh("skopeo", "copy", "--quiet", f"oci:{IMAGES / name}:{tag}", f"containers-storage:{ref}", env=env)
        refs[name] = ref
        archive = IMAGES / f"{name}.docker.tar"
        if archive.exists():
            info = json.loads(sh("skopeo", "inspect", f"docker-archive:{archive}", env=env).stdout)
            if info["Labels"]["org.opencontainers.image.revision"] != json.loads(
                    (IMAGES / f"{name}.json").read_text())["labels"]["org.opencontainers.image.revision"]:
                raise SystemExit(f"[test-images] {archive} is not the image in build/images/{name}")
    archive = IMAGES / "router.docker.tar"
    if archive.exists():
        out = sh("podman", "load", "-i", str(archive), env=env).stdout
        if refs["router"] not in out:
            raise SystemExit(f"[test-images] podman load {archive} did not load {refs['router']}: {out}")
        log(f"docker-archive: {archive.name} loads ({out.strip()})")
    return refs


def check_help(refs: dict, env: dict) -> None:
    for svc in SERVICES:
        out = sh("podman", "run", "--rm", "--network", "host", refs[svc], "--help", env=env).stdout
        if f"usage: python -m {module_of(svc)} " not in out:
            raise SystemExit(f"[test-images] {refs[svc]} --help printed:\n{out}")
    out = sh("podman", "run", "--rm", "--network", "host", refs["prometheus"], "--version", env=env)
    if "prometheus, version" not in out.stdout + out.stderr:
        raise SystemExit(f"[test-images] {refs['prometheus']} --version printed:\n{out.stdout}{out.stderr}")
    log(f"entrypoints: --help of {', '.join(SERVICES)} and prometheus --version ok")


def compose_stack(refs: dict, env: dict) -> None:
    names = ["router", "router_sys", "router_http", "prefill", "prefill_sys", "decode", "decode_sys",
             "eplb", "eplb_sys", "prometheus"]
    port = dict(zip(names, sc.free_ports(len(names))))
    addr = {k: f"127.0.0.1:{v}" for k, v in port.items()}
    scratch = Path(tempfile.mkdtemp(prefix="tandem-test-images-"))
    prom_cfg = scratch / "prometheus.yml"
    prom_cfg.write_text("global: {scrape_interval: 2s, evaluation_interval: 2s}\nscrape_configs:\n" + "".join(
        f"  - job_name: tandem-{s}\n    static_configs: [{{targets: ['{addr[s + '_sys']}']}}]\n" for s in SERVICES))
    project = f"tandem-test-{os.getpid()}"
    # The containers run as uid 65532 (as on Kubernetes); the demo checkpoint's safetensors file is
    # written 0600 by its builder, so they get a world-readable copy.
    models = scratch / "models"
    shutil.copytree(REPO / "models" / MODEL, models / MODEL)
    for f in [models, *models.rglob("*")]:
        f.chmod(0o755 if f.is_dir() else 0o644)
    tag = image_ref("router")[0]
    cenv = {**env, "TANDEM_VERSION": tag, "TANDEM_MODELS": str(models), "TANDEM_MODEL": MODEL,
            "PROMETHEUS_IMAGE": refs["prometheus"], "PROMETHEUS_CONFIG": str(prom_cfg),
            "PROMETHEUS_PORT": str(port["prometheus"]), "ROUTER_HTTP_PORT": str(port["router_http"]),
            **{f"{s.upper()}_PORT": str(port[s]) for s in SERVICES},
            **{f"{s.upper()}_SYSTEM_PORT": str(port[s + "_sys"]) for s in SERVICES}}
    compose = [str(REPO / ".tools" / "podman-compose" / "bin" / "podman-compose"), "-p", project, "-f", str(REPO / "deploy" / "compose" / "compose.yaml")]

    def container(svc: str) -> str:
        return f"{project}_{svc}_1"

    def logs(svc: str) -> str:
        r = sh("podman", "logs", container(svc), env=env, check=False)
        return r.stdout + r.stderr

    def tails() -> str:
        ps = sh("podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={project}",
                "--format", "{{.Names}} {{.Status}}", env=env, check=False).stdout
        return f"\ncontainers:\n{ps}" + "".join(f"\n--- {s} log (tail) ---\n{logs(s)[-2500:]}" for s in SERVICES)

    t0 = time.monotonic()
    up = sh(*compose, "up", "-d", env=cenv, check=False)
    try:
        running = sh("podman", "ps", "-q", "--filter", f"label=io.podman.compose.project={project}",
                     env=env, check=False).stdout.split()
        if up.returncode != 0 or len(running) != 5:
            raise SystemExit(f"[test-images] podman-compose up (rc {up.returncode}, {len(running)} of 5 "
                             f"containers running):\n{up.stdout}\n{up.stderr}")
        def exited():
            gone = sh("podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={project}",
                      "--filter", "status=exited", "--format", "{{.Names}} {{.Status}}", env=env,
                      check=False).stdout.split("\n")
            gone = [line for line in gone if line.strip()]
            return f"containers exited: {gone}" if gone else None

        for s in ("eplb", "prefill", "decode", "router"):
            sc.wait_serving(s, addr[s], addr[s + "_sys"], timeout=300, on_timeout=tails, alive=exited)
        log(f"compose up: all four SERVING (gRPC health + /health) after {time.monotonic() - t0:.0f} s")
        before = sc.metric_sum(sc.metrics(addr["prefill_sys"]), "sglang:prompt_tokens_total")
        prompts = ["Hello from a container.", "What does the decode worker do?", "Count to three."]
        outs = [sc.chat_when_routable(addr["router_http"], MODEL, p, max_tokens=8) for p in prompts]
        want = before + sum(o["usage"]["prompt_tokens"] for o in outs)
        sc.wait_until("prefill counting every prompt (remote prefill)",
                      lambda: sc.metric_sum(sc.metrics(addr["prefill_sys"]), "sglang:prompt_tokens_total") >= want,
                      30, on_timeout=tails)
        if "backend nixl" not in logs("prefill"):
            raise SystemExit("[test-images] prefill did not register decode with the nixl backend" + tails())
        log(f"{len(outs)} chat completions through router -> decode -> prefill (nixl, remote prefill): "
            + "; ".join(repr(o["choices"][0]["message"]["content"]) for o in outs))
        targets = sc.wait_prometheus_scrapes(addr["prometheus"], {f"tandem-{s}" for s in SERVICES}, 90)
        log(f"Prometheus scrapes every target: {', '.join(t['job'] + '=' + t['health'] for t in targets)}")
    except BaseException:
        print(tails(), file=sys.stderr)
        raise
    finally:
        down = sh(*compose, "down", "-t", "20", env=cenv, check=False, timeout=300)
        left = sh("podman", "ps", "-a", "-q", "--filter", f"label=io.podman.compose.project={project}",
                  env=env, check=False).stdout.split()
        if down.returncode != 0 or left:
            raise SystemExit(f"[test-images] podman-compose down left {left} (rc {down.returncode}):\n"
                             f"{down.stdout}\n{down.stderr}")
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    log(f"compose down: no container of {project} left ({time.monotonic() - t0:.0f} s for the stack)")


def main() -> None:
    t0 = time.monotonic()
    env = podman_env()
    refs = load_images(env)
    log(f"images in podman's store ({PODMAN / 'storage'}): {', '.join(refs.values())}")
    check_help(refs, env)
    compose_stack(refs, env)
    log(f"ok in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
