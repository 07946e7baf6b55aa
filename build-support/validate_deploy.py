"""Validate the deploy files (part of `make test`):

1. Each Kubernetes overlay (deploy/k8s/overlays/<cpu|gpu|gpu-tp>) is rendered with kustomize
   (`kubectl kustomize`) into build/k8s/<overlay>.yaml and validated against the Kubernetes
   1.37 schemas by `kubernetes-validate --strict` (PyPI; installed into .tools/k8s-validate).
2. What schemas cannot see, checked here: every tandem config file (the ConfigMap's, and
   deploy/compose/config/) passes tandem's own config validation together with the environment
   the manifest gives it and the files its Secret volumes hold (the etcd Secrets are made by
   deploy/k8s/etcd_certs.py; its server certificate must name the host of etcd_endpoint, and
   etcd must serve TLS with client-certificate auth from the files of its Secret); each Deployment mounts the ConfigMap and a /dev/shm memory volume where
   it should, its gRPC probes and Prometheus annotations name ports it declares, each Service
   selects pods that exist; the GPU overlays request nvidia.com/gpu (one per rank: tp_size), add
   IPC_LOCK and run the CUDA images; replica counts are the overlay's knobs.

    .venv/bin/python build-support/validate_deploy.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import entrypoints_check as entrypoints  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "k8s"
OVERLAYS = ("cpu", "gpu", "gpu-tp")
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


def check_tandem_config(origin: str, service: str, text: str, env: dict[str, str],
                        files: dict[str, str] | None = None) -> dict:
    """Validate a tandem config file; `files` maps the paths a pod's Secret volumes hold to local
    stand-ins (tandem checks that its certificate files exist)."""
    from tandem.config import SERVICE_SCHEMAS, ConfigError
    from tandem.config.loader import read_env, validate

    values = yaml.safe_load(text) or {}
    schema = SERVICE_SCHEMAS[service]
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update(read_env(schema, env))
    values = {k: (files or {}).get(v, v) if isinstance(v, str) else v for k, v in values.items()}
    try:
        validate(schema, values)
    except ConfigError as e:
        fail(f"{origin}: {service} config does not validate: {e}")
    return values


class SecretFiles:
    """The Secrets applied out of band (deploy/k8s/etcd_certs.py), as the files a pod sees."""

    def __init__(self) -> None:
        from deploy.k8s.etcd_certs import secret_manifests

        self.docs = {d["metadata"]["name"]: d["stringData"] for d in secret_manifests(days=1)}
        self._tmp = tempfile.TemporaryDirectory(prefix="validate-deploy-secrets-")  # removed at exit
        self._dir = Path(self._tmp.name)

    def mounted(self, container: dict, volumes: dict[str, dict]) -> dict[str, str]:
        """{path in the container: local stand-in} for every key of the known Secrets it mounts."""
        out = {}
        for m in container.get("volumeMounts", []):
            name = volumes[m["name"]].get("secret", {}).get("secretName")
            for key, data in self.docs.get(name, {}).items():
                standin = self._dir / name / key
                standin.parent.mkdir(exist_ok=True)
                standin.write_text(data)
                out[f"{m['mountPath']}/{key}"] = str(standin)
        return out

    def server_names(self) -> set[str]:
        """The DNS names of etcd's server certificate."""
        from cryptography import x509

        from deploy.k8s.etcd_certs import SERVER_SECRET

        cert = x509.load_pem_x509_certificate(self.docs[SERVER_SECRET]["tls.crt"].encode())
        return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                   .get_values_for_type(x509.DNSName))


def check_etcd(overlay: str, etcd: dict, secrets: SecretFiles, endpoints: set[str]) -> None:
    """etcd serves TLS with client-certificate auth, from files its Secret holds, under a name the
    tandem configs' https:// endpoints use."""
    spec = etcd["spec"]["template"]["spec"]
    c = spec["containers"][0]
    flags = dict((a.removeprefix("--").split("=", 1) + [""])[:2] for a in c["command"][1:])
    if "client-cert-auth" not in flags or not flags.get("listen-client-urls", "").startswith("https://"):
        fail(f"{overlay}/etcd: clients are not required to present a certificate over https "
             "(--client-cert-auth, https:// --listen-client-urls)")
    files = secrets.mounted(c, {v["name"]: v for v in spec["volumes"]})
    for flag in ("cert-file", "key-file", "trusted-ca-file"):
        if flags.get(flag) not in files:
            fail(f"{overlay}/etcd: --{flag}={flags.get(flag)} is not a file of its Secret volume")
    names = secrets.server_names()
    for endpoint in endpoints:
        parts = urlsplit(endpoint)
        if parts.scheme != "https" or parts.hostname not in names:
            fail(f"{overlay}: etcd_endpoint {endpoint} is not https:// to a name of etcd's certificate {sorted(names)}")


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def check_overlay(overlay: str, docs: list[dict], secrets: SecretFiles) -> None:
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    etcd_endpoints = set()
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
        values = check_tandem_config(f"k8s {overlay} ConfigMap", svc, cm["data"][f"{svc}.yaml"], env,
                                     secrets.mounted(c, volumes))
        if values.get("etcd_endpoint"):
            etcd_endpoints.add(values["etcd_endpoint"])
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
            if overlay.startswith("gpu") and not (gpu and "IPC_LOCK" in caps and image.endswith("-cuda")
                                                  and "ulimit -l unlimited" in " ".join(c.get("command", []))):
                fail(f"{overlay}/{svc}: a GPU worker needs nvidia.com/gpu, IPC_LOCK, the memlock lift "
                     f"and the -cuda image (has {gpu}, {caps}, {image})")
            # One GPU per rank: a worker of --tp-size N (one process per rank) requests N GPUs.
            ranks = max(int(values.get("tp_size", 1)), int(values.get("ep_size", 1)))
            requested = c["resources"].get("requests", {}).get("nvidia.com/gpu")
            if overlay.startswith("gpu") and not (int(gpu) == ranks and int(requested or 0) == ranks):
                fail(f"{overlay}/{svc}: tp_size/ep_size make {ranks} ranks but the pod requests {requested} "
                     f"and limits {gpu} nvidia.com/gpu (one per rank)")
            if overlay == "cpu" and (gpu or image.endswith("-cuda")):
                fail(f"{overlay}/{svc}: a CPU worker with a GPU or the CUDA image")
    for knob in WORKERS:
        if not isinstance(deployments[knob]["spec"].get("replicas"), int):
            fail(f"{overlay}/{knob}: no replica count")
    check_etcd(overlay, deployments["etcd"], secrets, etcd_endpoints)


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
    secrets = SecretFiles()
    help_of = entrypoints.HelpTexts()
    started = []
    for overlay in OVERLAYS:
        path, docs = render(overlay)
        check_overlay(overlay, docs, secrets)
        started += check_entrypoints(entrypoints.check_k8s, overlay, docs, help_of)
        rendered.append(path)
        log(f"{overlay}: {len(docs)} objects ({', '.join(sorted({d['kind'] for d in docs}))}) "
            f"-> {path.relative_to(REPO)}")
    res = subprocess.run([str(validate), "--strict", "--quiet", "-k", K8S_VERSION, *map(str, rendered)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        fail(f"kubernetes-validate {K8S_VERSION} --strict:\n{res.stdout}{res.stderr}")
    check_compose()
    started += check_entrypoints(entrypoints.check_compose,
                                 yaml.safe_load((REPO / "deploy" / "compose" / "compose.yaml").read_text()), help_of)
    started += check_entrypoints(entrypoints.check_images, help_of)
    log(f"ok: every overlay ({', '.join(OVERLAYS)}) valid against Kubernetes {K8S_VERSION} (kubernetes-validate --strict), "
        f"tandem configs valid (k8s and compose), {len(started)} start commands name a module and flags "
        f"that exist ({', '.join(started)}); {time.monotonic() - t0:.1f} s")


def check_entrypoints(check, *args) -> list[str]:
    try:
        return check(*args)
    except entrypoints.EntrypointError as exc:
        fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
