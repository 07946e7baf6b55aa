"""Drain benchmark: the latency a drain adds to the requests it moves, and that none fails,
with the KV moved (--drain-timeout > 0) and, in the same run, recomputed (--drain-timeout 0).

Per path: two aggregated decode workers (`python -m tandem.decode`, the CPU perf workload's
model, --disaggregation-transfer-backend as given: nixl by default) behind the router
(in-process RouterApp, --migration-limit 1, round_robin). ``--concurrency`` streams (token-id
prompts of ``--isl`` tokens, ``--osl`` output tokens, ignore_eos, greedy) start at once; when
every stream has received ``--drain-after`` tokens, the first worker is drained
(`EngineControl.Drain`): its requests are handed over to the other worker, which either fetches
each one's KV over the PD page-write path and decodes on (path "move"), or prefills its prompt
plus its tokens so far (path "recompute"). Every token's arrival time is recorded at the client.

Reported per path: ITL p50/p99 of all streams away from the drain (the baseline: gaps that do not
span the drain), the seam gap of each moved request (its longest gap ending after the drain
began: the handover, and the KV fetch or the recompute on the target, p50/p99), the ITL p50/p99
of the moved requests' first ``--window`` tokens after the seam (the target now runs twice the
batch), the requests that failed, and (move) how many requests and KV pages the target fetched
and how many prompts it computed (0 expected). Targets: no request failed; every handed-over
request moved with its KV and none recomputed; the seam gap p50 below the recompute path's.

Usage: python benchmarks/drain_bench.py [--concurrency 8] [--isl 128] [--osl 64] [--drain-after 8] [--paths move,recompute]
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
from tandem.v1 import common_pb2, decode_pb2_grpc, engine_control_pb2, engine_control_pb2_grpc, router_pb2  # noqa: E402

from benchmarks.common.results import (  # noqa: E402
    print_targets,
    provenance,
    target,
    target_items,
    write_results,
    written_by,
)
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
    p.add_argument("--transfer-backend", default="nixl", choices=["nixl", "grpc"],
                   help="the workers' --disaggregation-transfer-backend (how the moved KV travels)")
    p.add_argument("--paths", default="move,recompute", help="which drain paths to run, in this order: move "
                   "(--drain-timeout 30), recompute (--drain-timeout 0)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "drain_bench_cpu.json"))
    return p


DRAIN_TIMEOUT_S = {"move": 30.0, "recompute": 0.0}


def prefills(worker) -> int:
    """Prompts the worker computed itself (GetLoad.num_prefilled_reqs)."""
    with grpc.insecure_channel(worker.grpc_address) as ch:
        return decode_pb2_grpc.DecodeStub(ch).GetLoad(common_pb2.GetLoadRequest(), timeout=10).num_prefilled_reqs


def run_path(args, path: str) -> dict:
    worker_args = ["--disaggregation-mode", "null", "--model-path", args.model, "--log-level", "warning",
                   "--torch-num-threads", str(args.torch_threads), "--disaggregation-transfer-backend",
                   args.transfer_backend, "--drain-timeout", str(DRAIN_TIMEOUT_S[path])]
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
        prefills_before = prefills(target_worker)
        t_drain = time.perf_counter()
        with grpc.insecure_channel(drained.grpc_address) as ch:
            resp = engine_control_pb2_grpc.EngineControlStub(ch).Drain(engine_control_pb2.DrainRequest(), timeout=600)
        drain_s = time.perf_counter() - t_drain
        for t in threads:
            t.join(600)
        target_prefills = prefills(target_worker) - prefills_before
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
    return {
        "worker_drain_timeout_s": DRAIN_TIMEOUT_S[path],
        "drain": {"ok": resp.ok, "message": resp.message, "requests_handed_back": resp.num_requests_handed_back,
                  "requests_moved_with_kv": resp.num_requests_moved, "pages_moved": resp.num_pages_moved,
                  "pages_in_use_after": resp.num_pages_in_use, "rpc_s": round(drain_s, 3)},
        "target_prompts_computed_during_drain": target_prefills,
        "itl_ms_baseline": {"p50": pct(base, 50), "p99": pct(base, 99), "n": len(base)},
        "seam_gap_ms_moved": {"p50": pct(seams, 50), "p99": pct(seams, 99), "n": len(seams)},
        "itl_ms_moved_after_seam": {"p50": pct(after, 50), "p99": pct(after, 99), "n": len(after),
                                    "window_tokens": args.window},
        "requests_failed": failed, "errors": errors,
    }


def run(args) -> dict:
    result = {
        **provenance(),
        "workload": {"concurrency": args.concurrency, "isl": args.isl, "osl": args.osl,
                     "drain_after_tokens": args.drain_after, "model": args.model, "workers": 2,
                     "transfer_backend": args.transfer_backend,
                     "router": "in-process RouterApp, --migration-limit 1, round_robin"},
        "paths": {},
    }
    for path in args.paths.split(","):
        result["paths"][path] = run_path(args, path)
    targets = []
    for path, r in result["paths"].items():
        d = r["drain"]
        targets.append(target(f"{path}: requests failed during the drain", r["requests_failed"], "0",
                              r["requests_failed"] == 0))
        targets.append(target(f"{path}: drained worker's pages in use after the drain", d["pages_in_use_after"], "0",
                              d["ok"] and d["pages_in_use_after"] == 0))
    move, recompute = result["paths"].get("move"), result["paths"].get("recompute")
    if move is not None:
        d = move["drain"]
        targets.append(target("move: requests handed over with their KV / handed back",
                              f"{d['requests_moved_with_kv']}/{d['requests_handed_back']}", "all",
                              d["requests_handed_back"] > 0 and d["requests_moved_with_kv"] == d["requests_handed_back"]))
        targets.append(target("move: prompts computed on the target during the drain",
                              move["target_prompts_computed_during_drain"], "0",
                              move["target_prompts_computed_during_drain"] == 0))
    if move is not None and recompute is not None:
        a, b = move["seam_gap_ms_moved"]["p50"], recompute["seam_gap_ms_moved"]["p50"]
        targets.append(target("seam gap p50, KV moved vs recomputed (ms)", f"{a} vs {b}", "below",
                              None if a is None or b is None else a < b))
    result["targets"] = targets
    return result


def write_markdown(path: Path, r: dict) -> None:
    w = r["workload"]
    lines = ["# Drain benchmark (CPU)\n", written_by(SCRIPT, r) + "\n",
             f"Machine: {r['machine'].get('cpu_model')}, load average at start {r['machine'].get('load_avg')}.\n",
             f"{w['concurrency']} streams, ISL {w['isl']}, OSL {w['osl']}; drain after {w['drain_after_tokens']} "
             f"tokens each; two aggregated workers, transfer backend {w['transfer_backend']}. Path move: the "
             "target fetches each handed-over request's KV (--drain-timeout 30); recompute: it prefills the "
             "prompt and the tokens so far (--drain-timeout 0). Fresh workers per path.\n",
             "| path | handed back | with KV (pages) | target prompts computed | ITL away from the drain p50 / p99 ms "
             "| seam gap p50 / p99 ms (n) | ITL after the seam p50 / p99 ms | failed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, p in r["paths"].items():
        d, b, s, a = p["drain"], p["itl_ms_baseline"], p["seam_gap_ms_moved"], p["itl_ms_moved_after_seam"]
        lines.append(f"| {name} | {d['requests_handed_back']} | {d['requests_moved_with_kv']} ({d['pages_moved']}) "
                     f"| {p['target_prompts_computed_during_drain']} | {b['p50']} / {b['p99']} "
                     f"| {s['p50']} / {s['p99']} ({s['n']}) | {a['p50']} / {a['p99']} | {p['requests_failed']} |")
    lines += ["", "Targets:", ""] + target_items(r["targets"]) + [""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [p for p in args.paths.split(",") if p not in DRAIN_TIMEOUT_S]
    if unknown:
        parser.error(f"--paths: {unknown} not among {sorted(DRAIN_TIMEOUT_S)}")
    r = run(args)
    write_results(args.out, r, write_markdown)
    print_targets(r["targets"])
    return 0 if all(t["met"] for t in r["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
