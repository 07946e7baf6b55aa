"""Checks that a running tandem stack serves: shared by the PEX smoke step (pex_smoke.py) and the
image test (images/test_images.py). Standard library, plus grpcio for gRPC health checking.
"""
from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Ports told to a process in advance: random, below the kernel's ephemeral range (one rule, shared
# with the tests).
from tests.support.ports import free_ports  # noqa: E402,F401

SERVING = health_pb2.HealthCheckResponse.SERVING


def grpc_health(address: str, timeout: float = 3.0) -> int:
    """grpc.health.v1 status of the whole server ("" service); raises grpc.RpcError when unreachable."""
    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return resp.status


def http(method: str, url: str, body: dict | None = None, timeout: float = 10.0,
         headers: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Fatal(Exception):
    """Raised by a check when waiting longer cannot help (the process died)."""


def wait_until(what: str, check, timeout: float, interval: float = 0.5, on_timeout=None):
    """Poll check() until it returns a truthy value; raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Fatal:
            raise
        except Exception as e:  # not up yet: connection refused, 503, ...
            last = e
        time.sleep(interval)
    extra = on_timeout() if on_timeout else ""
    raise TimeoutError(f"{what}: not reached in {timeout:.0f}s (last error: {last}){extra}")


def wait_serving(name: str, grpc_address: str, system_address: str, timeout: float, on_timeout=None,
                 alive=None) -> None:
    """gRPC health SERVING and the system port's /health answering 200. `alive()`, when given,
    returns why the service is gone (a string) or None; waiting stops at once when it is gone."""
    def serving():
        if alive is not None and (gone := alive()):
            raise Fatal(f"{name}: {gone}" + (on_timeout() if on_timeout else ""))
        return grpc_health(grpc_address) == SERVING

    wait_until(f"{name} gRPC health SERVING at {grpc_address}", serving, timeout, on_timeout=on_timeout)
    wait_until(f"{name} GET http://{system_address}/health == 200",
               lambda: http("GET", f"http://{system_address}/health")[0] == 200, 30, on_timeout=on_timeout)


def metric_sum(metrics_text: str, name: str) -> float:
    """Sum of every sample of one metric family in Prometheus text format (0 if absent)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metrics(system_address: str) -> str:
    status, body = http("GET", f"http://{system_address}/metrics")
    if status != 200:
        raise RuntimeError(f"GET http://{system_address}/metrics answered {status}")
    return body.decode()


def chat(router_http: str, model: str, prompt: str, max_tokens: int = 8, api_key: str | None = None,
         timeout: float = 120.0) -> dict:
    """One non-streaming chat completion; raises unless it returned non-empty content."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    status, body = http("POST", f"http://{router_http}/v1/chat/completions",
                        {"model": model, "messages": [{"role": "user", "content": prompt}],
                         "max_tokens": max_tokens, "temperature": 0}, timeout=timeout, headers=headers)
    if status != 200:
        raise RuntimeError(f"chat completion answered {status}: {body[:500]!r}")
    out = json.loads(body)
    content = out["choices"][0]["message"].get("content") or ""
    if not content or out["usage"]["completion_tokens"] < 1:
        raise RuntimeError(f"chat completion returned no content: {out}")
    return out


def chat_when_routable(router_http: str, model: str, prompt: str, timeout: float = 60.0, **kw) -> dict:
    """chat(), retried while the router answers 503 because it has not yet seen a healthy worker
    (it turns SERVING before its first health check of the workers)."""
    def attempt():
        try:
            return chat(router_http, model, prompt, **kw)
        except RuntimeError as e:
            if "answered 503" in str(e):
                return None
            raise
    return wait_until(f"a chat completion through the router at {router_http}", attempt, timeout)


def prometheus_targets(prometheus: str) -> list[dict]:
    """Prometheus's active targets: [{job, instance, health, lastError}]."""
    status, body = http("GET", f"http://{prometheus}/api/v1/targets?state=active")
    if status != 200:
        raise RuntimeError(f"Prometheus targets API answered {status}")
    return [{"job": t["labels"].get("job"), "instance": t["labels"].get("instance"), "health": t["health"],
             "lastError": t.get("lastError", "")} for t in json.loads(body)["data"]["activeTargets"]]


def wait_prometheus_scrapes(prometheus: str, jobs: set[str], timeout: float) -> list[dict]:
    """Until every target is up and every job in `jobs` has one; returns the targets."""
    def all_up():
        targets = prometheus_targets(prometheus)
        seen = {t["job"] for t in targets}
        return targets if jobs <= seen and all(t["health"] == "up" for t in targets) else None

    def why():
        try:
            return f"\ntargets: {prometheus_targets(prometheus)}"
        except Exception as e:
            return f"\ntargets unavailable: {e}"

    return wait_until(f"Prometheus at {prometheus} scraping {sorted(jobs)}", all_up, timeout, on_timeout=why)
