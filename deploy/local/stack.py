"""Plan, start, watch and stop a local tandem stack (what `make deploy-local` runs).

Used by `python -m deploy.local.run` and by the benchmark suite, so both deploy
exactly the same way. Every process gets its own config file (the effective config is
also snapshotted), a log file, and a ready file that it writes once it is SERVING.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deploy.services import module_of

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STACK = Path(__file__).with_name("stack.yaml")
DEFAULT_RUN_DIR = REPO / ".run" / "deploy-local"


class PrometheusMissing(RuntimeError):
    """The full stack (with Prometheus) was asked for, but Prometheus is not installed."""


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        raise PrometheusMissing("Prometheus is not installed (no `prometheus` on PATH): run "
                                "build-support/install-prometheus.sh (`make deploy-local` does), "
                                "or start the stack without it (--no-prometheus)")
    return binary


@dataclass
class ProcessSpec:
    name: str  # e.g. "prefill-0"
    kind: str  # router | prefill | decode | eplb | prometheus
    argv: list[str]
    grpc: str | None = None
    system: str | None = None
    config: dict = field(default_factory=dict)


@dataclass
class RunningProcess:
    spec: ProcessSpec
    proc: subprocess.Popen
    log_path: Path
    ready_path: Path | None


def load_stack_config(path: Path = DEFAULT_STACK, overrides: dict | None = None) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    env_map = {"MODE": "mode", "MODEL": "model_path", "PREFILL": "num_prefill", "DECODE": "num_decode",
               "TLS": "tls", "EMBED": "embedding_model_path", "LORA": "lora", "TP": "tp_size"}
    for env, key in env_map.items():
        if os.environ.get(env):
            cfg[key] = os.environ[env]
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        elif value is not None:
            cfg[key] = value
    cfg["num_prefill"] = int(cfg["num_prefill"])
    cfg["num_decode"] = int(cfg["num_decode"])
    cfg["tls"] = str(cfg.get("tls", False)).lower() in ("1", "true", "yes", "on")
    cfg["lora"] = str(cfg.get("lora", False)).lower() in ("1", "true", "yes", "on")
    tp = int(cfg.pop("tp_size", 1) or 1)
    if tp > 1:  # every worker runs tp ranks (gloo on this CPU host); in disagg mode each rank moves its KV heads
        cfg.setdefault("engine", {})["tp_size"] = tp
    if cfg["mode"] not in ("agg", "disagg"):
        raise ValueError(f"MODE={cfg['mode']!r}: must be agg or disagg")
    if cfg["num_decode"] < 1 or (cfg["mode"] == "disagg" and cfg["num_prefill"] < 1):
        raise ValueError("need DECODE >= 1, and PREFILL >= 1 in disagg mode")
    model = Path(cfg["model_path"])
    if not model.is_absolute():
        model = REPO / model
    if not (model / "config.json").is_file():
        raise ValueError(f"MODEL={cfg['model_path']!r}: no config.json there (build demo models with make demo-models)")
    cfg["model_path"] = str(model)
    # An embedding checkpoint (sentence-transformers files) is served by aggregated --is-embedding
    # workers; EMBED=<checkpoint> adds one such worker beside any stack (the router sends it /v1/embeddings).
    cfg["embedding"] = is_embedding_model(cfg["model_path"])
    if cfg["embedding"]:
        if cfg["lora"]:
            raise ValueError(f"LORA=1 with MODEL={cfg['model_path']!r}: an embedding model serves no LoRA adapters "
                             "(--is-embedding refuses --enable-lora)")
        cfg["mode"] = "agg"
    embed = cfg.get("embedding_model_path")
    if embed:
        embed = Path(embed) if Path(embed).is_absolute() else REPO / embed
        if not is_embedding_model(str(embed)):
            raise ValueError(f"EMBED={cfg['embedding_model_path']!r}: not an embedding checkpoint (no modules.json; "
                             "make demo-models builds models/tandem-demo-embed)")
        cfg["embedding_model_path"] = str(embed)
    return cfg


def is_embedding_model(model_path: str) -> bool:
    """A sentence-transformers checkpoint (Qwen3-Embedding and the demo embedding model ship modules.json)."""
    return (Path(model_path) / "modules.json").is_file()


def is_moe(model_path: str) -> bool:
    c = json.loads((Path(model_path) / "config.json").read_text())
    return any(c.get(k) for k in ("num_experts", "n_routed_experts", "num_local_experts"))


def demo_lora_paths(model_path: str) -> list[str]:
    """LORA=1: the demo LoRA adapters (deploy/demo_lora.py), built next to the model, as --lora-paths."""
    from deploy.demo_lora import build_demo_adapters

    if is_moe(model_path):
        raise ValueError(f"LORA=1: the demo adapters target a dense model's MLP; MODEL={model_path!r} is MoE")
    root = str(Path(model_path).parent)
    return [f"{name}={path}" for name, path in build_demo_adapters(model_path, root).items()]


def plan_stack(cfg: dict) -> list[ProcessSpec]:
    """The processes of the stack, in start order (prefill before decode before router)."""
    host, ports = cfg["host"], cfg["ports"]
    py = [sys.executable, "-m"]
    specs: list[ProcessSpec] = []
    engine = dict(cfg.get("engine", {}), model_path=cfg["model_path"])
    if cfg.get("lora"):
        engine["lora_paths"] = demo_lora_paths(cfg["model_path"])
    if is_moe(cfg["model_path"]):
        eplb_addr = f"{host}:{ports['eplb_grpc']}"
        # MoE workers record expert load, report it to the planner and apply its plans.
        engine.update(enable_eplb=True, eplb_planner_address=eplb_addr)
        specs.append(ProcessSpec("eplb", "eplb", py + [module_of("eplb")], eplb_addr,
                                 f"{host}:{ports['eplb_system']}",
                                 {"host": host, "port": ports["eplb_grpc"], "system_port": ports["eplb_system"],
                                  "model_path": cfg["model_path"]}))
    prefill_addrs = []
    if cfg["mode"] == "disagg":
        for i in range(cfg["num_prefill"]):
            addr = f"{host}:{ports['prefill_grpc'] + i}"
            prefill_addrs.append(addr)
            conf = dict(engine, host=host, port=ports["prefill_grpc"] + i,
                        system_port=ports["prefill_system"] + i,
                        disaggregation_transfer_backend=cfg["disaggregation"]["disaggregation_transfer_backend"])
            specs.append(ProcessSpec(f"prefill-{i}", "prefill", py + [module_of("prefill")], addr,
                                     f"{host}:{ports['prefill_system'] + i}", conf))
    decode_addrs = []
    for i in range(cfg["num_decode"]):
        addr = f"{host}:{ports['decode_grpc'] + i}"
        decode_addrs.append(addr)
        conf = dict(engine, host=host, port=ports["decode_grpc"] + i, system_port=ports["decode_system"] + i)
        if cfg.get("embedding"):
            conf.update(is_embedding=True)
        if cfg["mode"] == "disagg":
            conf.update(cfg["disaggregation"], disaggregation_mode="decode", prefill_addresses=prefill_addrs)
        specs.append(ProcessSpec(f"decode-{i}", "decode", py + [module_of("decode")], addr,
                                 f"{host}:{ports['decode_system'] + i}", conf))
    if cfg.get("embedding_model_path"):
        addr = f"{host}:{ports['embed_grpc']}"
        decode_addrs.append(addr)
        conf = dict(cfg.get("engine", {}), model_path=cfg["embedding_model_path"], is_embedding=True, host=host,
                    port=ports["embed_grpc"], system_port=ports["embed_system"])
        specs.append(ProcessSpec("embed-0", "decode", py + [module_of("decode")], addr,
                                 f"{host}:{ports['embed_system']}", conf))
    router = dict(cfg.get("router", {}), host=host, port=ports["router_grpc"], system_port=ports["router_system"],
                  http_port=ports["router_http"], model_path=cfg["model_path"], workers=decode_addrs)
    specs.append(ProcessSpec("router", "router", py + [module_of("router")], f"{host}:{ports['router_grpc']}",
                             f"{host}:{ports['router_system']}", router))
    return specs


def scrape_targets(specs: list[ProcessSpec]) -> dict[str, list[str]]:
    targets: dict[str, list[str]] = {}
    for s in specs:
        if s.system:
            job = {"router": "tandem-router", "prefill": "tandem-prefill", "decode": "tandem-decode",
                   "eplb": "tandem-eplb"}[s.kind]
            targets.setdefault(job, []).append(s.system)
    return targets


def render_prometheus_yml(specs: list[ProcessSpec], scrape_interval: str, tls: dict | None = None) -> str:
    """`tls`: Prometheus's own client certificate (ssl_* fields) when the stack runs over mTLS."""
    lines = ["# Generated by deploy/local/stack.py from the deploy-local plan.", "global:",
             f"  scrape_interval: {scrape_interval}", f"  evaluation_interval: {scrape_interval}",
             "scrape_configs:"]
    for job, targets in scrape_targets(specs).items():
        lines += [f"  - job_name: {job}"]
        if tls:
            lines += ["    scheme: https", "    tls_config:", f"      ca_file: '{tls['ssl_ca_certs']}'",
                      f"      cert_file: '{tls['ssl_certfile']}'", f"      key_file: '{tls['ssl_keyfile']}'"]
        lines += ["    static_configs:", "      - targets: [" + ", ".join(f"'{t}'" for t in targets) + "]"]
    return "\n".join(lines) + "\n"


class Stack:
    def __init__(self, cfg: dict, run_dir: Path = DEFAULT_RUN_DIR, with_prometheus: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.specs = plan_stack(cfg)
        # Checked before anything starts: the full stack never comes up without its Prometheus.
        self.prometheus = prometheus_binary() if with_prometheus else None
        self.running: list[RunningProcess] = []
        self.client_tls: dict | None = None  # ssl_* files of clients (readiness checks, Prometheus, curl)

    @property
    def scheme(self) -> str:
        return "https" if self.cfg.get("tls") else "http"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context presenting the stack's client certificate (None without TLS)."""
        if not self.client_tls:
            return None
        ctx = ssl.create_default_context(cafile=self.client_tls["ssl_ca_certs"])
        ctx.load_cert_chain(self.client_tls["ssl_certfile"], self.client_tls["ssl_keyfile"])
        return ctx

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def openai_url(self) -> str:
        return f"{self.scheme}://{self.cfg['host']}:{self.cfg['ports']['router_http']}/v1"

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.cfg['host']}:{self.cfg['ports']['prometheus']}"

    def _issue_certificates(self) -> None:
        """TLS=1: a throw-away CA and one certificate per process (and one for clients)."""
        from deploy.local.certs import issue, make_ca  # needs `cryptography`: only with TLS

        tls_dir = self.run_dir / "tls"
        shutil.rmtree(tls_dir, ignore_errors=True)
        ca = make_ca(tls_dir)
        hosts = sorted({self.cfg["host"], "127.0.0.1", "localhost"})
        for spec in self.specs:
            spec.config.update(issue(ca, tls_dir, spec.name, hosts).flags())
        self.client_tls = issue(ca, tls_dir, "client", hosts).flags()

    def _write_configs(self) -> None:
        conf_dir = self.run_dir / "config"
        conf_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.get("tls"):
            self._issue_certificates()
        for spec in self.specs:
            path = conf_dir / f"{spec.name}.yaml"
            path.write_text(yaml.safe_dump(spec.config, sort_keys=True))
            spec.argv = spec.argv + ["--config", str(path)]
        (conf_dir / "prometheus.yml").write_text(
            render_prometheus_yml(self.specs, self.cfg.get("scrape_interval", "5s"), self.client_tls))
        (self.run_dir / "stack.json").write_text(json.dumps(self.cfg, indent=2))

    @property
    def process_names(self) -> list[str]:
        return [s.name for s in self.specs] + (["prometheus"] if self.prometheus else [])

    def _prometheus_spec(self) -> ProcessSpec | None:
        if self.prometheus is None:
            return None
        data = self.run_dir / "prometheus-data"
        data.mkdir(parents=True, exist_ok=True)
        addr = f"{self.cfg['host']}:{self.cfg['ports']['prometheus']}"
        return ProcessSpec("prometheus", "prometheus", [
            self.prometheus, f"--config.file={self.run_dir / 'config' / 'prometheus.yml'}",
            f"--storage.tsdb.path={data}", f"--web.listen-address={addr}"], system=addr)

    def start(self, progress: Callable[[str, str], None] | None = None, timeout: float = 180.0) -> None:
        """Start every process and wait until all are healthy; stops everything on failure."""
        progress = progress or (lambda name, state: None)
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir / "ready", ignore_errors=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "ready").mkdir(parents=True, exist_ok=True)
        self._write_configs()
        specs = list(self.specs)
        prom = self._prometheus_spec()
        if prom:
            specs.append(prom)
        try:
            # Everything starts at once (imports and model loads overlap); the router
            # health-checks its workers and routes only to healthy ones.
            deadline = time.monotonic() + timeout
            for spec in specs:
                self._spawn(spec, progress)
            self._wait_ready(deadline, progress)
        except BaseException:
            self.stop()
            raise
        self._write_pids()

    def _spawn(self, spec: ProcessSpec, progress) -> None:
        log_path = self.logs_dir / f"{spec.name}.log"
        ready = None
        argv = list(spec.argv)
        if spec.kind != "prometheus":
            ready = self.run_dir / "ready" / f"{spec.name}.json"
            argv += ["--ready-file", str(ready)]
        log = open(log_path, "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.running.append(RunningProcess(spec, proc, log_path, ready))
        progress(spec.name, "starting")

    def _is_ready(self, rp: RunningProcess) -> bool:
        if rp.ready_path is not None:
            if not rp.ready_path.exists():
                return False
            return rp.spec.kind != "router" or self._router_routes(rp.ready_path, self.scheme, self.ssl_context())
        try:
            with urllib.request.urlopen(f"http://{rp.spec.system}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    @staticmethod
    def _router_routes(ready_path: Path, scheme: str = "http", context: ssl.SSLContext | None = None) -> bool:
        """The router serves once it has health-checked every worker it knows as SERVING: its
        ready file comes earlier (its first checks may still be under way)."""
        try:
            http = json.loads(ready_path.read_text())["http"]
            with urllib.request.urlopen(f"{scheme}://{http}/health", timeout=1, context=context) as r:
                body = json.loads(r.read())
        except (OSError, ValueError, KeyError):  # 503 (no healthy worker yet) is an HTTPError, an OSError
            return False
        return body["workers"] > 0 and body["healthy_workers"] == body["workers"]

    def _wait_ready(self, deadline: float, progress) -> None:
        pending = [rp for rp in self.running if not getattr(rp, "_ready", False)]
        while pending:
            for rp in list(pending):
                if rp.proc.poll() is not None:
                    tail = rp.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{rp.spec.name} exited with code {rp.proc.returncode}; log tail:\n{tail}")
                if self._is_ready(rp):
                    rp._ready = True
                    pending.remove(rp)
                    progress(rp.spec.name, "healthy")
            if time.monotonic() > deadline:
                names = ", ".join(rp.spec.name for rp in pending)
                raise TimeoutError(f"not healthy in time: {names} (logs in {self.logs_dir})")
            time.sleep(0.1)

    def _write_pids(self) -> None:
        pids = {rp.spec.name: rp.proc.pid for rp in self.running}
        (self.run_dir / "pids.json").write_text(json.dumps(pids))
        # The process that owns this stack (`make deploy-local`): `make stop-local` asks it to stop
        # the stack, so that a requested stop does not read as a crash of its processes.
        (self.run_dir / "owner.pid").write_text(str(os.getpid()))

    def alive(self) -> dict[str, bool]:
        return {rp.spec.name: rp.proc.poll() is None for rp in self.running}

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process group (router first), then SIGKILL what is left."""
        order = sorted(self.running, key=lambda rp: ["router", "prometheus", "decode", "prefill", "eplb"]
                       .index(rp.spec.kind))
        for rp in order:
            _signal_group(rp.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for rp in order:
            try:
                rp.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(rp.proc.pid, signal.SIGKILL)
                rp.proc.wait(5)
        self.running.clear()
        (self.run_dir / "pids.json").unlink(missing_ok=True)
        (self.run_dir / "owner.pid").unlink(missing_ok=True)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_from_pidfile(run_dir: Path = DEFAULT_RUN_DIR, timeout: float = 10.0) -> list[str]:
    """`make stop-local`: stop a stack started by another process. Its owner (the running `make
    deploy-local`) gets SIGTERM and stops the stack itself, exiting 0 with "stopped"; processes
    still alive after that (an owner killed with SIGKILL leaves its stack behind) get SIGTERM,
    then SIGKILL."""
    run_dir = Path(run_dir)
    pidfile = run_dir / "pids.json"
    if not pidfile.exists():
        return []
    pids = json.loads(pidfile.read_text())
    try:
        owner = int((run_dir / "owner.pid").read_text())
    except (OSError, ValueError):
        owner = None
    if owner is not None and owner != os.getpid() and _alive(owner):
        os.kill(owner, signal.SIGTERM)
        deadline = time.monotonic() + timeout + 5  # the owner's own stop waits up to `timeout`
        while time.monotonic() < deadline and _alive(owner):
            time.sleep(0.1)
    left = [pid for pid in pids.values() if _alive(pid)]
    for pid in left:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in left:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    (run_dir / "owner.pid").unlink(missing_ok=True)
    return list(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def with_overrides(cfg: dict, **sections) -> dict:
    out = copy.deepcopy(cfg)
    for k, v in sections.items():
        if isinstance(v, dict):
            out.setdefault(k, {}).update(v)
        else:
            out[k] = v
    return out
