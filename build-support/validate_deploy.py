"""Validate the deploy files (part of `make test`):

1. Each Kubernetes overlay (deploy/k8s/overlays/<cpu|gpu>) is rendered with kustomize
   (`kubectl kustomize`) into build/k8s/<overlay>.yaml and validated against the Kubernetes
   1.37 schemas by `kubernetes-validate --strict` (PyPI; installed into .tools/k8s-validate).
2. What schemas cannot see, checked here: every tandem config file (the ConfigMap's, and
   deploy/compose/config/) passes tandem's own config validation together with the environment
   the manifest gives it; each Deployment mounts the ConfigMap and a /dev/shm memory volume where
   it should, its gRPC probes and Prometheus annotations name ports it declares, each Service
   selects pods that exist; the GPU overlay requests nvidia.com/gpu, adds IPC_LOCK and runs the
   CUDA images; replica counts are the overlay's knobs.

    .venv/bin/python build-support/validate_deploy.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "k8s"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.37.0"
VALIDATE_VERSION = "1.37.0"
TOOLS = REPO / ".tools" / "k8s-validate"
WORKERS = ("prefill", "decode")


def log(msg: str) -> None:
    print(f"[validate-deploy] {msg}", flush=True)


def fail(msg: str) -> None:
    raise SystemExit(f"[validate-deploy] FAIL: {msg}")


def kubernetes_validate() -> Path:
    exe = TOOLS / "bin" / "kubernetes-validate"
    stamp = TOOLS / ".version"
    if not (exe.exists() and stamp.exists() and stamp.read_text() == VALIDATE_VERSION):
        log(f"installing kubernetes-validate {VALIDATE_VERSION} from PyPI into {TOOLS.relative_to(REPO)}")
        shutil.rmtree(TOOLS, ignore_errors=True)
        subprocess.run(["python3", "-m", "venv", str(TOOLS)], check=True)
        subprocess.run([str(TOOLS / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        f"kubernetes-validate=={VALIDATE_VERSION}"], check=True,
                       env={**os.environ, "PIP_CONFIG_FILE": "/dev/null"})
        stamp.write_text(VALIDATE_VERSION)
    return exe


def render(overlay: str) -> tuple[Path, list[dict]]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        fail("kubectl (for `kubectl kustomize`) is not on PATH; install kubectl >= 1.27 or kustomize 5")
    res = subprocess.run([kubectl, "kustomize", str(REPO / "deploy" / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        fail(f"kubectl kustomize deploy/k8s/overlays/{overlay}:\n{res.stderr}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{overlay}.yaml"
    path.write_text(res.stdout)
    return path, [d for d in yaml.safe_load_all(res.stdout) if d]


def check_tandem_config(origin: str, service: str, text: str, env: dict[str, str]) -> None:
    from tandem.config import SERVICE_SCHEMAS, ConfigError
    from tandem.config.loader import read_env, validate

    values = yaml.safe_load(text) or {}
    schema = SERVICE_SCHEMAS[service]
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update(read_env(schema, env))
    try:
        validate(schema, values)
    except ConfigError as e:
        fail(f"{origin}: {service} config does not validate: {e}")


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def check_overlay(overlay: str, docs: list[dict]) -> None:
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    configmaps = by_kind(docs, "ConfigMap")
    for name in ("router", *WORKERS, "eplb", "etcd"):
        if name not in deployments or name not in services:
            fail(f"{overlay}: no Deployment + Service named {name}")
    cm = next((c for n, c in configmaps.items() if n.startswith("tandem-config")), None)
    if cm is None:
        fail(f"{overlay}: no tandem-config ConfigMap")
    for svc in ("router", *WORKERS, "eplb"):
        dep = deployments[svc]
        pod = dep["spec"]["template"]
        spec = pod["spec"]
        c = spec["containers"][0]
        if c["args"] != ["--config", f"/etc/tandem/{svc}.yaml"]:
            fail(f"{overlay}/{svc}: args {c['args']}")
        if f"{svc}.yaml" not in cm["data"]:
            fail(f"{overlay}/{svc}: the ConfigMap has no {svc}.yaml")
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        if volumes[mounts["/etc/tandem"]["name"]].get("configMap", {}).get("name") != cm["metadata"]["name"]:
            fail(f"{overlay}/{svc}: /etc/tandem is not the tandem-config ConfigMap")
        if "persistentVolumeClaim" not in volumes[mounts["/models"]["name"]] or not mounts["/models"].get("readOnly"):
            fail(f"{overlay}/{svc}: /models is not the read-only model volume")
        env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
        for e in c.get("env", []):
            if "valueFrom" in e:  # secret or pod IP: any string passes the schema; stand in for it
                env[e["name"]] = "10.0.0.1" if "fieldRef" in e["valueFrom"] else "secret"
        check_tandem_config(f"k8s {overlay} ConfigMap", svc, cm["data"][f"{svc}.yaml"], env)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if c[probe]["grpc"]["port"] != ports["grpc"]:
                fail(f"{overlay}/{svc}: {probe} is not gRPC health on the gRPC port")
        ann = pod["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true" or int(ann["prometheus.io/port"]) != ports["metrics"]:
            fail(f"{overlay}/{svc}: Prometheus annotations do not name the metrics port")
        sel = services[svc]["spec"]["selector"]
        if any(pod["metadata"]["labels"].get(k) != v for k, v in sel.items()):
            fail(f"{overlay}/{svc}: the Service selects no pod of the Deployment")
        if svc in WORKERS:
            shm = volumes[mounts["/dev/shm"]["name"]]
            if shm.get("emptyDir", {}).get("medium") != "Memory":
                fail(f"{overlay}/{svc}: /dev/shm is not a memory-backed volume")
            if services[svc]["spec"].get("clusterIP") != "None":
                fail(f"{overlay}/{svc}: workers are reached by pod IP: the Service must be headless")
            if "TANDEM_ADVERTISE_HOST" not in {e["name"] for e in c["env"]}:
                fail(f"{overlay}/{svc}: the pod IP is not advertised (TANDEM_ADVERTISE_HOST)")
            gpu = c["resources"].get("limits", {}).get("nvidia.com/gpu")
            caps = c["securityContext"].get("capabilities", {}).get("add", [])
            image = c["image"]
            if overlay == "gpu" and not (gpu and "IPC_LOCK" in caps and image.endswith("-cuda")
                                         and "ulimit -l unlimited" in " ".join(c.get("command", []))):
                fail(f"{overlay}/{svc}: a GPU worker needs nvidia.com/gpu, IPC_LOCK, the memlock lift "
                     f"and the -cuda image (has {gpu}, {caps}, {image})")
            if overlay == "cpu" and (gpu or image.endswith("-cuda")):
                fail(f"{overlay}/{svc}: a CPU worker with a GPU or the CUDA image")
    for knob in WORKERS:
        if not isinstance(deployments[knob]["spec"].get("replicas"), int):
            fail(f"{overlay}/{knob}: no replica count")


def check_compose() -> None:
    compose = REPO / "deploy" / "compose"
    spec = yaml.safe_load((compose / "compose.yaml").read_text())
    for svc in ("router", *WORKERS, "eplb"):
        s = spec["services"][svc]
        conf = s["command"][-1].rsplit("/", 1)[-1]
        env = {k: _compose_default(str(v)) for k, v in s.get("environment", {}).items()}
        check_tandem_config(f"deploy/compose/config/{conf}", svc, (compose / "config" / conf).read_text(), env)


def _compose_default(value: str) -> str:
    """${VAR:-default} -> default (what compose runs with when VAR is unset)."""
    out = value
    while "${" in out:
        start = out.index("${")
        end = out.index("}", start)
        inner = out[start + 2:end]
        out = out[:start] + (inner.split(":-", 1)[1] if ":-" in inner else "") + out[end + 1:]
    return out


def main() -> None:
    t0 = time.monotonic()
    validate = kubernetes_validate()
    rendered = []
    for overlay in OVERLAYS:
        path, docs = render(overlay)
        check_overlay(overlay, docs)
        rendered.append(path)
        log(f"{overlay}: {len(docs)} objects ({', '.join(sorted({d['kind'] for d in docs}))}) "
            f"-> {path.relative_to(REPO)}")
    res = subprocess.run([str(validate), "--strict", "--quiet", "-k", K8S_VERSION, *map(str, rendered)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        fail(f"kubernetes-validate {K8S_VERSION} --strict:\n{res.stdout}{res.stderr}")
    check_compose()
    log(f"ok: both overlays valid against Kubernetes {K8S_VERSION} (kubernetes-validate --strict), "
        f"tandem configs valid (k8s and compose); {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
