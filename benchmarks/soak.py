"""Soak: the deploy-local stack under mixed load for a given time, memory and KV sampled.

    .venv/bin/python benchmarks/soak.py --duration 600          # 10 minutes (the default)
    .venv/bin/python benchmarks/soak.py --duration 180 --concurrency 4 --mode disagg

Load (closed loop, `--concurrency` clients): streaming chat, streams cancelled after a few
events, long prompts, plain completions, bad requests (which must get a 4xx) and, less often,
stalled clients: a long stream whose client stops reading, which the router must drop after its
`--stream-stall-timeout` (set from `--stall-timeout`) without a [DONE]. Every
`--sample-interval` seconds it records each process's RSS and the KV pages in use on every
worker. Afterwards it waits for the KV pages to return to the idle baseline.

Targets (printed, met or not, and written to the result file with commit, machine and command
line): 0 unexpected errors (a stalled client served to the end is one); every stalled client
counted by the router (tandem_router_stalled_streams_total); RSS slope over the last 80% of the run below 1 MiB/min per process;
KV pages in use back to the idle baseline after the load stops.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tandem.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc  # noqa: E402

from benchmarks.common.deploy import deployed, stack_config  # noqa: E402
from benchmarks.common.results import REPO, git_info, machine_info, timestamp, write_json  # noqa: E402
from tests.support.stalled_client import (  # noqa: E402
    closed_by_server,
    large_chat_stream,
    raw_http_stream,
    read_to_end,
)

SLOPE_TARGET_MIB_PER_MIN = 1.0
# A stalled client waits this long past the stall timeout for the router to drop it: its stream
# first has to fill the buffers, at the pace the loaded machine generates.
STALL_GRACE_S = 120.0
WORDS = ("the quick brown fox jumps over the lazy dog while tandem routes every request to a "
         "worker and moves pages between prefill and decode").split()


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def pages_in_use(address: str, kind: str) -> int | None:
    try:
        with grpc.insecure_channel(address) as ch:
            stub = decode_pb2_grpc.DecodeStub(ch) if kind == "decode" else prefill_pb2_grpc.PrefillStub(ch)
            w = stub.GetLoad(common_pb2.GetLoadRequest(), timeout=5)
        return w.total_pages - w.free_pages - w.evictable_pages
    except grpc.RpcError:
        return None


def slope_mib_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) over the last 80% of the run, in MiB per minute."""
    if len(points) < 3:
        return None
    t_end = points[-1][0]
    t0 = points[0][0] + 0.2 * (t_end - points[0][0])
    pts = [(t, v) for t, v in points if t >= t0]
    n = len(pts)
    if n < 2:
        return None
    mt, mv = sum(t for t, _ in pts) / n, sum(v for _, v in pts) / n
    den = sum((t - mt) ** 2 for t, _ in pts)
    return None if den == 0 else 60.0 * sum((t - mt) * (v - mv) for t, v in pts) / den


def router_stalled_streams(openai_url: str) -> float | None:
    """tandem_router_stalled_streams_total of the router (all APIs), from its /metrics."""
    try:
        text = httpx.get(openai_url.rstrip("/").removesuffix("/v1") + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "tandem_router_stalled_streams_total")


class Sampler(threading.Thread):
    def __init__(self, stack, interval: float) -> None:
        super().__init__(daemon=True)
        self.stack, self.interval = stack, interval
        self.rss: dict[str, list[tuple[float, float]]] = {}
        self.kv: dict[str, list[tuple[float, int]]] = {}
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        now = time.monotonic() - self.t0
        for rp in self.stack.running:
            v = rss_mib(rp.proc.pid)
            if v is not None:
                self.rss.setdefault(rp.spec.name, []).append((now, v))
            if rp.spec.kind in ("decode", "prefill"):
                used = pages_in_use(rp.spec.grpc, rp.spec.kind)
                if used is not None:
                    self.kv.setdefault(rp.spec.name, []).append((now, used))

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.sample()


class Load:
    KINDS = ("stream", "cancel", "long", "plain", "bad", "stall")
    WEIGHTS = (3, 3, 3, 3, 3, 1)  # a stalled client holds its load slot for the whole stall timeout
    STALL_MAX_TOKENS = 1000  # ~1.7 MB of SSE: far more than the buffers between client and router hold

    def __init__(self, url: str, model: str, seed: int, stall_timeout: float) -> None:
        self.url, self.model, self.rng = url, model, random.Random(seed)
        self.stall_timeout = stall_timeout
        self.ok = dict.fromkeys(self.KINDS, 0)
        self.expected_errors = 0
        self.unexpected: list[str] = []

    def _prompt(self, words: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(words))

    async def one(self, client: httpx.AsyncClient) -> None:
        kind = self.rng.choices(self.KINDS, self.WEIGHTS)[0]
        try:
            if kind == "stall":
                # Counted here, on the loop: threads adding to the counts could lose an update
                # (stalled clients dropped in one watchdog pass end together).
                error = await asyncio.to_thread(self.stalled_client, self._prompt(20))
                if error is None:
                    self.ok["stall"] += 1
                else:
                    self.unexpected.append(error)
                return
            if kind == "bad":
                body = self.rng.choice([{"model": self.model, "prompt": "x", "max_tokens": -1},
                                        {"model": self.model}, {"model": "nope", "prompt": "x"}])
                r = await client.post("/completions", json=body)
                if 400 <= r.status_code < 500:
                    self.expected_errors += 1
                else:
                    self.unexpected.append(f"bad request got {r.status_code}")
                return
            if kind in ("stream", "cancel"):
                body = {"model": self.model, "messages": [{"role": "user", "content": self._prompt(20)}],
                        "max_tokens": self.rng.randint(16, 64), "stream": True, "ignore_eos": True}
                async with client.stream("POST", "/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        self.unexpected.append(f"{kind}: {r.status_code}")
                        return
                    events = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            events += 1
                            if "error" in json.loads(line[6:]):  # an error object ends the stream
                                self.unexpected.append(f"{kind}: {line[:200]}")
                                return
                            if kind == "cancel" and events == 3:
                                break  # the client goes away mid-stream
                self.ok[kind] += 1
                return
            words = 700 if kind == "long" else 12
            body = {"model": self.model, "prompt": self._prompt(words), "max_tokens": 16}
            r = await client.post("/completions", json=body)
            if r.status_code == 200 and r.json()["choices"]:
                self.ok[kind] += 1
            else:
                self.unexpected.append(f"{kind}: {r.status_code} {r.text[:200]}")
        except httpx.HTTPError as e:
            self.unexpected.append(f"{kind}: {type(e).__name__}: {e}")

    def stalled_client(self, prompt: str) -> str | None:
        """Stops reading at once; the router must drop the stream (reset the connection) once the
        buffers are full and the stall timeout passed. Returns None when it did, else the error."""
        http = self.url.split("://", 1)[1].split("/", 1)[0]
        try:
            sock = raw_http_stream(http, "/v1/chat/completions",
                                   large_chat_stream(self.model, self.STALL_MAX_TOKENS, prompt))
            try:
                dropped = closed_by_server(sock, self.stall_timeout + STALL_GRACE_S)
                data = read_to_end(sock, timeout=30)
            finally:
                sock.close()
        except OSError as e:
            return f"stall: {type(e).__name__}: {e}"
        if dropped and b"data: [DONE]" not in data:
            return None
        return (f"stall: not dropped within {self.stall_timeout + STALL_GRACE_S:g} s: "
                f"{data[:120]!r} ... {data[-120:]!r}")

    async def run(self, concurrency: int, duration: float) -> None:
        deadline = time.monotonic() + duration
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            async def worker():
                while time.monotonic() < deadline:
                    await self.one(client)
            await asyncio.gather(*[worker() for _ in range(concurrency)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--mode", choices=["agg", "disagg"], default="disagg")
    p.add_argument("--model", default=None, help="checkpoint (default: the stack's demo model)")
    p.add_argument("--sample-interval", type=float, default=5.0)
    p.add_argument("--stall-timeout", type=float, default=5.0,
                   help="the router's --stream-stall-timeout for the run (stalled clients wait for it)")
    p.add_argument("--port-base", type=int, default=23000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/soak_<time>.json)")
    args = p.parse_args(argv)
    git = git_info()  # at start: the tree may change during a long run
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"soak_{timestamp()}.json"
    cfg = stack_config(args.mode, args.model, 1, 1, args.port_base,
                       sections={"router": {"stream_stall_timeout": args.stall_timeout}})
    run_dir = REPO / ".run" / f"soak-{timestamp()}"
    with deployed(cfg, run_dir) as stack:
        model = Path(cfg["model_path"]).name
        sampler = Sampler(stack, args.sample_interval)
        sampler.sample()
        baseline = {k: v[-1][1] for k, v in sampler.kv.items()}
        sampler.start()
        load = Load(stack.openai_url, model, args.seed, args.stall_timeout)
        t0 = time.monotonic()
        asyncio.run(load.run(args.concurrency, args.duration))
        ran = time.monotonic() - t0
        sampler.stop_event.set()
        sampler.join()
        deadline = time.monotonic() + 60
        after = {}
        while time.monotonic() < deadline:
            after = {rp.spec.name: pages_in_use(rp.spec.grpc, rp.spec.kind) for rp in stack.running
                     if rp.spec.kind in ("decode", "prefill")}
            if all(after[k] is not None and after[k] <= baseline.get(k, 0) for k in after):
                break
            time.sleep(1)
        alive = stack.alive()
        stalled = router_stalled_streams(stack.openai_url)
    slopes = {name: slope_mib_per_min(pts) for name, pts in sampler.rss.items()}
    targets = {
        "unexpected_errors == 0": len(load.unexpected) == 0,
        f"RSS slope < {SLOPE_TARGET_MIB_PER_MIN} MiB/min per process (last 80%)":
            all(s is not None and s < SLOPE_TARGET_MIB_PER_MIN for s in slopes.values()),
        "KV pages back to the idle baseline": all(after.get(k) is not None and after[k] <= baseline.get(k, 0)
                                                  for k in baseline),
        "every process alive": all(alive.values()),
        "every stalled client dropped and counted by the router": stalled == load.ok["stall"],
    }
    result = {
        "command": [sys.executable, *sys.argv], "git": git, "machine": machine_info(),
        "note": "measured on a shared 2-core CPU machine with other test runs: latency-free figures only",
        "duration_s": round(ran, 1), "concurrency": args.concurrency, "mode": args.mode, "model": model,
        "completed": load.ok, "expected_errors": load.expected_errors,
        "stall_timeout_s": args.stall_timeout, "router_stalled_streams": stalled,
        "unexpected_errors": len(load.unexpected), "unexpected_samples": load.unexpected[:20],
        "rss_slope_mib_per_min": slopes,
        "rss_first_last_mib": {k: (v[0][1], v[-1][1]) for k, v in sampler.rss.items()},
        "kv_pages_in_use": {"idle_baseline": baseline, "after_load": after,
                            "max_during": {k: max(x for _, x in v) for k, v in sampler.kv.items()}},
        "alive_at_end": alive, "targets": targets, "samples": {"rss": sampler.rss, "kv": sampler.kv},
    }
    write_json(out, result)
    print(json.dumps({k: result[k] for k in ("duration_s", "completed", "expected_errors", "unexpected_errors",
                                             "router_stalled_streams",
                                             "rss_slope_mib_per_min", "kv_pages_in_use")}, indent=2))
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    print(f"written {out}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
