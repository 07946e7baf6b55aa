"""Deploy a local tandem stack for a benchmark, on its own port range and run dir.

Uses deploy.local.stack (what `make deploy-local` runs), so a benchmark measures exactly
what users deploy. Port layout from `port_base` (P): router HTTP P, router gRPC P+1,
router system P+2, prefill i gRPC P+10+i / system P+20+i, decode i gRPC P+30+i / system
P+40+i, EPLB P+50 / P+51, Prometheus P+60. At most 10 workers of a kind.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from deploy.local.stack import DEFAULT_STACK, Stack, load_stack_config

MAX_WORKERS_PER_KIND = 10


def port_layout(port_base: int) -> dict[str, int]:
    if not 1024 <= port_base <= 65535 - 64:
        raise ValueError(f"--port-base {port_base}: must be in [1024, {65535 - 64}]")
    P = port_base
    return {"router_http": P, "router_grpc": P + 1, "router_system": P + 2,
            "prefill_grpc": P + 10, "prefill_system": P + 20, "decode_grpc": P + 30, "decode_system": P + 40,
            "eplb_grpc": P + 50, "eplb_system": P + 51, "prometheus": P + 60}


def parse_overrides(items: list[str] | None) -> dict[str, dict]:
    """['router.health_check_interval=1.0', 'engine.page_size=32'] -> {'router': {...}, 'engine': {...}}.
    Values are parsed as YAML scalars (numbers, booleans, strings)."""
    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and section and name):
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. router.health_check_interval=1.0")
        if section not in ("engine", "router", "disaggregation"):
            raise ValueError(f"--set {item!r}: section must be engine, router or disaggregation")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def stack_config(mode: str, model: str | None, num_prefill: int, num_decode: int, port_base: int,
                 stack_yaml: Path = DEFAULT_STACK, engine: dict | None = None,
                 sections: dict[str, dict] | None = None) -> dict:
    """The effective stack config of one benchmark deployment (validated by load_stack_config).
    `sections` updates the engine/router/disaggregation sections of the YAML (see parse_overrides)."""
    if mode not in ("agg", "disagg"):
        raise ValueError(f"mode {mode!r}: must be agg or disagg")
    for name, n in (("--prefill", num_prefill), ("--decode", num_decode)):
        if not 1 <= n <= MAX_WORKERS_PER_KIND:
            raise ValueError(f"{name} {n}: must be in [1, {MAX_WORKERS_PER_KIND}]")
    overrides = {"mode": mode, "model_path": model, "num_prefill": num_prefill, "num_decode": num_decode,
                 "ports": port_layout(port_base)}
    if engine:
        overrides["engine"] = engine
    overrides.update(sections or {})
    return load_stack_config(stack_yaml, overrides)


def num_workers(cfg: dict) -> int:
    """GPU-equivalents the deployment uses: every prefill and decode worker counts as one."""
    return cfg["num_decode"] + (cfg["num_prefill"] if cfg["mode"] == "disagg" else 0)


def served_model_name(openai_url: str, fallback: str, timeout: float = 5.0) -> str:
    """The model id the endpoint serves (GET /v1/models), else `fallback`."""
    try:
        with urllib.request.urlopen(f"{openai_url.rstrip('/')}/models", timeout=timeout) as r:
            data = json.loads(r.read())
        return data["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError):
        return fallback


def snapshot_config(stack: Stack, dest: Path) -> Path:
    """Copy every service's config YAML and the effective stack config into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    src = stack.run_dir / "config"
    for f in sorted(src.glob("*")):
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    shutil.copy2(stack.run_dir / "stack.json", dest / "stack.json")
    # Dynamo's perf.sh keeps a deployment_config.json next to the artifacts; same idea.
    plan = [{"name": s.name, "kind": s.kind, "grpc": s.grpc, "system": s.system, "argv": s.argv}
            for s in stack.specs]
    (dest / "deployment_config.json").write_text(json.dumps({"stack": stack.cfg, "processes": plan}, indent=2))
    return dest


@contextlib.contextmanager
def deployed(cfg: dict, run_dir: Path, progress: Callable[[str, str], None] | None = None,
             with_prometheus: bool = False, timeout: float = 300.0) -> Iterator[Stack]:
    """Start the stack, yield it, always stop it (no process left behind)."""
    stack = Stack(cfg, run_dir=run_dir, with_prometheus=with_prometheus)
    stack.start(progress, timeout=timeout)
    try:
        yield stack
    finally:
        stack.stop()
