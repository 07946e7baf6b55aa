"""Router benchmark: added latency of the router, and kv_aware decisions per second.

1. Added latency, on one run of the same requests: a real aggregated decode worker
   (`python -m tandem.decode`) and a real router in front of it (`python -m tandem.router`);
   each request goes once straight to `Decode.Generate` and once through `Router.Generate`
   (token-id prompt, greedy, fixed output length), alternating so both see the same machine
   noise. Reported: end-to-end and first-chunk latency p50/p99 both ways, and the router's
   added latency = router - direct (p50 of the per-pair differences, and difference of
   p50s/p99s). Also the OpenAI HTTP path (/v1/completions, non-streaming) for reference.
   Goal: added p50 <= 1 ms. With ``--baseline-source DIR`` (a checkout of another commit,
   e.g. ``git worktree add /tmp/base main``), a second router started from that tree's code
   serves the same requests in the same rounds (order alternating), so the change and its
   baseline are measured like for like on the same machine noise.
2. kv_aware routing decisions per second (prompt block hashing + index lookup + cost) with
   8 workers and 10k indexed blocks, in-process. Goal >= 2000/s.

Usage: python benchmarks/router_bench.py [--requests 300] [--prompt-len 16] [--max-tokens 4] [--baseline-source DIR]
Writes benchmarks/results/router_bench.{json,md}.
"""
from __future__ import annotations

import argparse
import http.client as http_client
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import httpx  # noqa: E402
from tandem.routing.block_hash import block_hashes  # noqa: E402
from tandem.routing.kv_index import KvIndex  # noqa: E402
from tandem.routing.policies import KvAwarePolicy, WorkerView  # noqa: E402
from tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc, router_pb2, router_pb2_grpc  # noqa: E402

from benchmarks.common.baseline import git_commit, source_path  # noqa: E402
from benchmarks.common.results import print_targets, provenance, target, write_json  # noqa: E402
from tests.support.procs import start_service  # noqa: E402

MODEL = REPO / "models" / "tandem-demo-dense"


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def ms(x):
    return round(x * 1e3, 3)


def timed_stream(call_iter):
    t0 = time.perf_counter()
    first = None
    n = 0
    for chunk in call_iter:
        if first is None:
            first = time.perf_counter() - t0
        n += len(chunk.token_ids)
    return time.perf_counter() - t0, first, n


def bench_latency(args) -> dict:
    if not (MODEL / "config.json").exists():
        raise SystemExit(f"demo model missing at {MODEL}: run `make demo-models`")
    worker = start_service("tandem.decode", "--disaggregation-mode", "null", "--model-path", str(MODEL),
                           "--log-level", "warning")
    router = baseline = None
    try:
        router_args = ("--model-path", str(MODEL), "--workers", worker.grpc_address, "--http-port", "0",
                       "--log-level", "warning")
        router = start_service("tandem.router", *router_args)
        if args.baseline_source:
            baseline = start_service("tandem.router", *router_args, env={"PYTHONPATH": source_path(args.baseline_source)})
        http_addr = router.info["http"]
        rng = random.Random(0)
        direct = decode_pb2_grpc.DecodeStub(grpc.insecure_channel(worker.grpc_address))
        via = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.grpc_address))
        via_base = baseline and router_pb2_grpc.RouterStub(grpc.insecure_channel(baseline.grpc_address))
        http = httpx.Client(base_url=f"http://{http_addr}", timeout=60)
        model_name = http.get("/v1/models").json()["data"][0]["id"]
        # The timed HTTP requests use the stdlib client on one keep-alive connection: httpx adds
        # ~40 ms per request on loopback here (client-side), which would hide the router's cost.
        host, port = http_addr.rsplit(":", 1)
        conn = http_client.HTTPConnection(host, int(port), timeout=60)
        sp = common_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        # Wait until the router sees the worker healthy.
        deadline = time.monotonic() + 30
        while http.get("/health").status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("router never saw a healthy worker")
            time.sleep(0.1)
        res = {"direct": [], "router": [], "http": [], "baseline": [], "direct_first": [], "router_first": [],
               "baseline_first": []}
        kinds = ["direct", "router", "http"] + (["baseline"] if baseline else [])
        for i in range(args.warmup + args.requests):
            ids = [rng.randrange(10, 4000) for _ in range(args.prompt_len)]
            order = kinds if i % 2 == 0 else kinds[::-1]
            for kind in order:
                if kind == "direct":
                    e2e, first, n = timed_stream(direct.Generate(decode_pb2.GenerateRequest(
                        request_id=f"d{i}", input_ids=ids, sampling=sp)))
                elif kind in ("router", "baseline"):
                    e2e, first, n = timed_stream((via if kind == "router" else via_base).Generate(
                        router_pb2.RouterGenerateRequest(request_id=f"{kind[0]}{i}", token_ids=router_pb2.TokenIds(ids=ids),
                                                         sampling=sp)))
                else:
                    body = json.dumps({"model": model_name, "prompt": ids, "max_tokens": args.max_tokens,
                                       "temperature": 0, "ignore_eos": True})
                    t0 = time.perf_counter()
                    try:
                        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                        payload = conn.getresponse().read()
                    except (BrokenPipeError, ConnectionResetError, http_client.RemoteDisconnected):
                        # The server closed the idle keep-alive connection (a loaded machine can stretch
                        # a round past uvicorn's keep-alive timeout): reconnect, and time the retry alone.
                        conn.close()
                        t0 = time.perf_counter()
                        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                        payload = conn.getresponse().read()
                    e2e, first = time.perf_counter() - t0, None
                    n = json.loads(payload)["usage"]["completion_tokens"]
                assert n == args.max_tokens, (kind, n)
                if i >= args.warmup:
                    res[kind].append(e2e)
                    if first is not None:
                        res[kind + "_first"].append(first)
        diffs = [r - d for r, d in zip(res["router"], res["direct"], strict=True)]
        diffs_first = [r - d for r, d in zip(res["router_first"], res["direct_first"], strict=True)]
        http_diffs = [h - d for h, d in zip(res["http"], res["direct"], strict=True)]
        out = {
            "requests": args.requests, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
            "direct_e2e_ms": {"p50": ms(pct(res["direct"], 50)), "p99": ms(pct(res["direct"], 99))},
            "router_grpc_e2e_ms": {"p50": ms(pct(res["router"], 50)), "p99": ms(pct(res["router"], 99))},
            "router_http_e2e_ms": {"p50": ms(pct(res["http"], 50)), "p99": ms(pct(res["http"], 99))},
            "direct_first_chunk_ms": {"p50": ms(pct(res["direct_first"], 50)), "p99": ms(pct(res["direct_first"], 99))},
            "router_first_chunk_ms": {"p50": ms(pct(res["router_first"], 50)), "p99": ms(pct(res["router_first"], 99))},
            "added_grpc_ms": {"p50_of_pair_diffs": ms(statistics.median(diffs)),
                              "p99_of_pair_diffs": ms(pct(diffs, 99)),
                              "p50_diff": ms(pct(res["router"], 50) - pct(res["direct"], 50)),
                              "p99_diff": ms(pct(res["router"], 99) - pct(res["direct"], 99))},
            "added_grpc_first_chunk_ms": {"p50_of_pair_diffs": ms(statistics.median(diffs_first)),
                                          "p99_of_pair_diffs": ms(pct(diffs_first, 99))},
            "added_http_ms": {"p50_of_pair_diffs": ms(statistics.median(http_diffs)),
                              "p99_of_pair_diffs": ms(pct(http_diffs, 99))},
        }
        if baseline:
            base_diffs = [b - d for b, d in zip(res["baseline"], res["direct"], strict=True)]
            base_first = [b - d for b, d in zip(res["baseline_first"], res["direct_first"], strict=True)]
            out["baseline"] = {
                "source": args.baseline_source, "commit": git_commit(args.baseline_source),
                "router_grpc_e2e_ms": {"p50": ms(pct(res["baseline"], 50)), "p99": ms(pct(res["baseline"], 99))},
                "added_grpc_ms": {"p50_of_pair_diffs": ms(statistics.median(base_diffs)),
                                  "p99_of_pair_diffs": ms(pct(base_diffs, 99))},
                "added_grpc_first_chunk_ms": {"p50_of_pair_diffs": ms(statistics.median(base_first)),
                                              "p99_of_pair_diffs": ms(pct(base_first, 99))}}
        return out
    finally:
        for p in (baseline, router):
            if p is not None:
                p.stop()
        worker.stop()


def bench_decisions(args) -> dict:
    rng = random.Random(1)
    bs = 16
    index = KvIndex()
    workers = [f"worker-{i}" for i in range(8)]
    prompts = []
    # Shared "system prompts" plus per-request tails, spread over the workers until 10k blocks.
    systems = [[rng.randrange(10, 30000) for _ in range(bs * 16)] for _ in range(32)]
    while index.num_blocks() < args.indexed_blocks:
        w = rng.choice(workers)
        ids = rng.choice(systems) + [rng.randrange(10, 30000) for _ in range(bs * rng.randrange(4, 32))]
        index.store(w, block_hashes(ids, bs), ids[:len(ids) // bs * bs], bs)
        prompts.append(ids)
    policy = KvAwarePolicy(index, overlap_weight=1.0)
    views = [WorkerView(w, active_requests=rng.randrange(4), active_blocks=rng.randrange(200)) for w in workers]
    queries = [rng.choice(systems) + [rng.randrange(10, 30000) for _ in range(args.query_tail)] for _ in range(2000)]
    for q in queries[:100]:
        policy.choose(views, q)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.decision_seconds:
        for q in queries:
            policy.choose(views, q)
        n += len(queries)
    dt = time.perf_counter() - t0
    overlaps = [policy.choose(views, q).overlap_blocks for q in queries[:200]]
    return {"workers": len(workers), "indexed_blocks": index.num_blocks(), "block_size": bs,
            "query_tokens": len(queries[0]), "decisions_per_s": round(n / dt, 1),
            "us_per_decision": round(dt / n * 1e6, 2), "mean_overlap_blocks": round(statistics.mean(overlaps), 2)}


def targets_of(result: dict) -> list[dict]:
    d = result["kv_aware_decisions"]
    out = [target("kv_aware decisions/s (8 workers, 10k blocks)", d["decisions_per_s"], ">= 2000",
                  d["decisions_per_s"] >= 2000)]
    lat = result.get("latency")
    added = None if lat is None else lat["added_grpc_ms"]["p50_of_pair_diffs"]
    out.append(target("router added latency p50, gRPC, loopback (ms)", added, "<= 1",
                      None if added is None else added <= 1.0))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--indexed-blocks", type=int, default=10_000)
    ap.add_argument("--query-tail", type=int, default=256, help="tokens after the shared prefix in each query")
    ap.add_argument("--decision-seconds", type=float, default=3.0)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--baseline-source", default=None,
                    help="a tandem checkout (another commit) whose router serves the same requests in the same "
                         "rounds, as the baseline of the measured change")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "router_bench"),
                    help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    result = provenance(argv)
    result["args"] = vars(args)
    result["kv_aware_decisions"] = d = bench_decisions(args)
    print(f"kv_aware: {d['decisions_per_s']:.0f} decisions/s ({d['us_per_decision']} us each) with "
          f"{d['workers']} workers, {d['indexed_blocks']} indexed blocks, {d['query_tokens']}-token prompts "
          f"(goal >= 2000/s: {d['decisions_per_s'] / 2000:.1f}x)")
    if not args.skip_latency:
        result["latency"] = lat = bench_latency(args)
        a = lat["added_grpc_ms"]
        print(f"direct Decode.Generate e2e p50/p99: {lat['direct_e2e_ms']['p50']}/{lat['direct_e2e_ms']['p99']} ms; "
              f"via Router.Generate: {lat['router_grpc_e2e_ms']['p50']}/{lat['router_grpc_e2e_ms']['p99']} ms; "
              f"via HTTP /v1/completions: {lat['router_http_e2e_ms']['p50']}/{lat['router_http_e2e_ms']['p99']} ms")
        print(f"router added latency (gRPC): p50 {a['p50_of_pair_diffs']} ms, p99 {a['p99_of_pair_diffs']} ms "
              f"(per-request pairs); difference of p50s {a['p50_diff']} ms (goal p50 <= 1 ms); first chunk "
              f"+{lat['added_grpc_first_chunk_ms']['p50_of_pair_diffs']} ms; HTTP path "
              f"+{lat['added_http_ms']['p50_of_pair_diffs']} ms p50")
        if "baseline" in lat:
            b = lat["baseline"]
            print(f"baseline router ({b['source']}, commit {b['commit']}): added p50 "
                  f"{b['added_grpc_ms']['p50_of_pair_diffs']} ms, p99 {b['added_grpc_ms']['p99_of_pair_diffs']} ms; "
                  f"first chunk +{b['added_grpc_first_chunk_ms']['p50_of_pair_diffs']} ms")
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    result["targets"] = targets_of(result)
    print_targets(result["targets"])
    write_json(Path(args.out + ".json"), result)
    Path(args.out + ".md").write_text(
        f"# router_bench ({result['started']}, {result['machine']['cpu_model']}, "
        f"{result['machine']['cpu_count']} CPUs, commit {result['git']['commit']}"
        f"{' dirty' if result['git']['dirty'] else ''})\n\n`{result['command']}`\n\n"
        f"```json\n{json.dumps(result, indent=2)}\n```\n")
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
