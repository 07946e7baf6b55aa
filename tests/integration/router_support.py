"""Helpers for router integration tests: real worker processes, started in parallel."""
from __future__ import annotations

import threading
from pathlib import Path

from support.procs import ServiceProcess, start_service


def start_many(specs: list[tuple[str, list[str]]], timeout: float = 180.0,
               envs: list[dict | None] | None = None) -> list[ServiceProcess]:
    """Start several services at once (module, args; ``envs``: each one's extra environment)
    and wait for all; stop all if one fails."""
    out: list = [None] * len(specs)
    errors: list[BaseException] = []
    envs = envs or [None] * len(specs)

    def one(i, module, args):
        try:
            out[i] = start_service(module, *args, timeout=timeout, env=envs[i])
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, m, a)) for i, (m, a) in enumerate(specs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for p in out:
            if p is not None:
                p.stop()
        raise errors[0]
    return out


def agg_worker_args(model: str, *extra: str) -> list[str]:
    return ["--disaggregation-mode", "null", "--model-path", model, "--log-level", "warning", *extra]


def log_tail(p: ServiceProcess, n: int = 3000) -> str:
    return Path(p.log_path).read_text(errors="replace")[-n:]


def need_demo_model(name: str = "tandem-demo-dense") -> str:
    """The demo checkpoint `name` (built first when missing)."""
    from tests.support.models import demo_model

    return demo_model(name)
