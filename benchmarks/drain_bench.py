"""Drain benchmark: the latency a drain adds to the requests it moves, and that none fails.

Two aggregated decode workers (`python -m tandem.decode`, the CPU perf workload's model) behind
the router (in-process RouterApp, --migration-limit 1, round_robin). ``--concurrency`` streams
(token-id prompts of ``--isl`` tokens, ``--osl`` output tokens, ignore_eos, greedy) start at
once; when every stream has received ``--drain-after`` tokens, the first worker is drained
(`EngineControl.Drain`): its requests are handed back and migrated to the other worker, which
prefills each prompt plus its tokens so far (the KV is not moved). Every token's arrival time
is recorded at the client.

Reported: ITL p50/p99 of all streams away from the drain (the baseline: gaps that do not span
the drain), the seam gap of each moved request (its longest gap ending after the drain began:
the handover and the recompute on the target, p50/p99), the ITL p50/p99 of the moved
requests' first ``--window`` tokens after the seam (the target now runs twice the batch), and
the requests that failed. Target: no request failed.

Usage: python benchmarks/drain_bench.py [--concurrency 8] [--isl 128] [--osl 64] [--drain-after 8]
Writes benchmarks/results/drain_bench_cpu.{json,md} (--out to change).
"""
from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from tandem.config import RouterConfig  # noqa: E402
from tandem.router.app import build_router  # noqa: E402
from tandem.v1 import common_pb2, engine_control_pb2, engine_control_pb2_grpc, router_pb2  # noqa: E402

from benchmarks.common.results import print_targets, provenance, target, write_results, written_by  # noqa: E402
from tests.support.grpc_router import router_stub  # noqa: E402
from tests.support.procs import start_service  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

MODEL = REPO / "models" / "tandem-demo-dense"
SCRIPT = "benchmarks/drain_bench.py"


def pct(xs, q):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] * 1e3, 3) if xs else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=SCRIPT, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--concurrency", type=int, default=8, help="streams in flight when the drain starts")
    p.add_argument("--isl", type=int, default=128, help="prompt tokens")
    p.add_argument("--osl", type=int, default=64, help="output tokens per request")
    p.add_argument("--drain-after", type=int, default=8, help="drain once every stream has this many tokens")
    p.add_argument("--window", type=int, default=8, help="tokens after the seam in the moved requests' ITL")
    p.add_argument("--torch-threads", type=int, default=1, help="each worker's --torch-num-threads")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "drain_bench_cpu.json"))
    return p


def run(args) -> dict:
    worker_args = ["--disaggregation-mode", "null", "--model-path", args.model, "--log-level", "warning",
                   "--torch-num-threads", str(args.torch_threads)]
    procs = [start_service("tandem.decode", *worker_args) for _ in range(2)]
    drained, target_worker = sorted(procs, key=lambda p: p.grpc_address)  # round_robin's first pick: the lowest id
    cfg = RouterConfig(model_path=args.model, workers=[p.grpc_address for p in procs], http_port=0,
                       routing_policy="round_robin", migration_limit=1, health_check_interval=3600)
    app = build_router(cfg)
    app.start()
    try:
        wait_for(lambda: len(app.core.pool.healthy()) == 2, timeout=60, what="workers healthy")
        rng = random.Random(100)
        times: list[list[float]] = [[] for _ in range(args.concurrency)]
        errors: dict[int, str] = {}

        def one(i: int) -> None:
            ids = [rng.randrange(100, 1000) for _ in range(args.isl)]
            req = router_pb2.RouterGenerateRequest(
                request_id=f"drain-bench-{i}", token_ids=router_pb2.TokenIds(ids=ids),
                sampling=common_pb2.SamplingParams(max_tokens=args.osl, temperature=0, ignore_eos=True))
            try:
                with router_stub(app) as stub:
                    for chunk in stub.Generate(req, timeout=600):
                        now = time.perf_counter()
                        times[i].extend([now] * len(chunk.token_ids))
            except grpc.RpcError as e:
                errors[i] = f"{e.code().name}: {e.details()}"

        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.concurrency)]
        for t in threads:
            t.start()
        wait_for(lambda: all(len(t) >= args.drain_after for t in times) or errors, timeout=600,
                 what="every stream's first tokens")
        t_drain = time.perf_counter()
        with grpc.insecure_channel(drained.grpc_address) as ch:
            resp = engine_control_pb2_grpc.EngineControlStub(ch).Drain(engine_control_pb2.DrainRequest(), timeout=600)
        drain_s = time.perf_counter() - t_drain
        for t in threads:
            t.join(600)
    finally:
        app.stop()
        for p in procs:
            p.stop()
    moved = {int(r.rsplit("-", 1)[1]) for r in resp.request_ids if r.startswith("drain-bench-")}
    base, seams, after = [], [], []
    for i, ts in enumerate(times):
        gaps = [(a, b - a) for a, b in zip(ts, ts[1:]) if b > a]  # tokens of one chunk arrive together
        # The handover: a moved request's longest gap among those that end after the drain began
        # (tokens its old worker made before the aborts applied still arrive after t_drain).
        late = [k for k, (a, g) in enumerate(gaps) if a + g > t_drain]
        seam = max(late, key=lambda k: gaps[k][1]) if late else None
        if i in moved and seam is not None:
            seams.append(gaps[seam][1])
            after += [g for _, g in gaps[seam + 1:seam + 1 + args.window]]
        base += [g for k, (a, g) in enumerate(gaps) if a + g < t_drain or a > t_drain + drain_s]
    failed = len(errors) + sum(1 for i, ts in enumerate(times) if i not in errors and len(ts) != args.osl)
    result = {
        **provenance(),
        "workload": {"concurrency": args.concurrency, "isl": args.isl, "osl": args.osl,
                     "drain_after_tokens": args.drain_after, "model": args.model, "workers": 2,
                     "router": "in-process RouterApp, --migration-limit 1, round_robin"},
        "drain": {"ok": resp.ok, "message": resp.message, "requests_handed_back": resp.num_requests_handed_back,
                  "pages_in_use_after": resp.num_pages_in_use, "rpc_s": round(drain_s, 3)},
        "itl_ms_baseline": {"p50": pct(base, 50), "p99": pct(base, 99), "n": len(base)},
        "seam_gap_ms_moved": {"p50": pct(seams, 50), "p99": pct(seams, 99), "n": len(seams)},
        "itl_ms_moved_after_seam": {"p50": pct(after, 50), "p99": pct(after, 99), "n": len(after),
                                    "window_tokens": args.window},
        "requests_failed": failed, "errors": errors,
    }
    result["targets"] = [target("requests failed during the drain", failed, "0", failed == 0),
                         target("drained worker's pages in use after the drain", resp.num_pages_in_use, "0",
                                resp.ok and resp.num_pages_in_use == 0)]
    return result


def write_markdown(path: Path, r: dict) -> None:
    b, s, a = r["itl_ms_baseline"], r["seam_gap_ms_moved"], r["itl_ms_moved_after_seam"]
    w = r["workload"]
    lines = ["# Drain benchmark (CPU)\n", written_by(SCRIPT, r) + "\n",
             f"Machine: {r['machine'].get('cpu_model')}, load average at start {r['machine'].get('load_avg')}.\n",
             f"{w['concurrency']} streams, ISL {w['isl']}, OSL {w['osl']}; drain after {w['drain_after_tokens']} "
             f"tokens each; {r['drain']['requests_handed_back']} requests moved (recomputed on the target).\n",
             "| | p50 ms | p99 ms | n |", "|---|---|---|---|",
             f"| ITL away from the drain (all streams) | {b['p50']} | {b['p99']} | {b['n']} |",
             f"| seam gap of a moved request | {s['p50']} | {s['p99']} | {s['n']} |",
             f"| ITL of moved requests, {a['window_tokens']} tokens after the seam | {a['p50']} | {a['p99']} | {a['n']} |",
             "", f"Requests failed: {r['requests_failed']}. Drain RPC: {r['drain']['rpc_s']} s, ok {r['drain']['ok']}.", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    r = run(args)
    write_results(args.out, r, write_markdown)
    print_targets(r["targets"])
    return 0 if all(t["met"] for t in r["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
