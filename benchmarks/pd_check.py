"""PD disaggregation check on any device: disaggregated output vs aggregated, per
transfer backend, plus TTFT of a long prompt. Used for the GPU runs (KV pages in VRAM,
NIXL over UCX's CUDA transports), where CI cannot go.

TTFT: ``--ttft-samples`` pairs of one long prompt (its last token varied, so neither side's
prefix cache holds the whole prompt), disaggregated and aggregated in alternating order (the
first pair is warmup). Gate (issue 33): disaggregated TTFT p50 <= aggregated p50 + 5 ms.

    python benchmarks/pd_check.py --device cuda --dtype bfloat16 --backends nixl --out results.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common.results import (  # noqa: E402
    command_line,
    git_info,
    machine_info,
    print_targets,
    target,
    write_json,
)
from tests.support.clients import generate_many, load, pages_in_use, sampling  # noqa: E402
from tests.support.procs import start_service  # noqa: E402


def prompts(n: int) -> list[list[int]]:
    return [[(i * 131 + j * 17) % 7000 + 20 for j in range(16 + 37 * i)] for i in range(n)]


def ttft(address: str, ids: list[int], override: str = "") -> float:
    t0 = time.perf_counter()
    import grpc
    from tandem.v1 import decode_pb2, decode_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        for chunk in decode_pb2_grpc.DecodeStub(ch).Generate(decode_pb2.GenerateRequest(
                input_ids=ids, sampling=sampling(max_tokens=2, ignore_eos=True), prefill_override=override)):
            if chunk.token_ids:
                return time.perf_counter() - t0
    raise RuntimeError("no token")


def check(args, backend: str) -> dict:
    common = ["--model-path", args.model, "--device", args.device, "--dtype", args.dtype,
              "--max-total-tokens", "65536", "--page-size", str(args.page_size)]
    prefill = start_service("tandem.prefill", *common, "--disaggregation-transfer-backend", backend, timeout=300)
    decode = start_service("tandem.decode", *common, "--disaggregation-transfer-backend", backend,
                           "--disaggregation-mode", "decode", "--prefill-addresses", prefill.grpc_address, timeout=300)
    agg = start_service("tandem.decode", *common, timeout=300)
    try:
        ps = prompts(16)
        greedy = [sampling(max_tokens=24)] * len(ps)
        seeded = [sampling(max_tokens=24, temperature=0.8, seed=7 + i) for i in range(len(ps))]
        out = {"backend": backend}
        for name, params in (("greedy", greedy), ("seeded", seeded)):
            d = generate_many(decode.grpc_address, ps, params, 16, override="remote")
            a = generate_many(agg.grpc_address, ps, params, 16)
            out[f"{name}_identical"] = sum(x == y for x, y in zip(d, a))
            out[f"{name}_prompts"] = len(ps)
        long = [(j * 7) % 7000 + 20 for j in range(args.long_prompt)]
        sides = (("disagg", decode.grpc_address, "remote"), ("agg", agg.grpc_address, ""))
        samples: dict[str, list[float]] = {"disagg": [], "agg": []}
        for i in range(args.ttft_samples + 1):
            for label, addr, override in (sides if i % 2 == 0 else sides[::-1]):
                samples[label].append(ttft(addr, long[:-1] + [i + 30], override))
        for label in samples:
            out[f"ttft_{label}_ms_p50"] = statistics.median(samples[label][1:]) * 1e3
        out["ttft_samples"] = args.ttft_samples
        out["ttft_added_ms_p50_of_pairs"] = statistics.median(
            d - a for d, a in zip(samples["disagg"][1:], samples["agg"][1:], strict=True)) * 1e3
        out["decode_pages_in_use_after"] = pages_in_use(decode.grpc_address)
        out["prefill_pages_in_use_after"] = pages_in_use(prefill.grpc_address, "prefill")
        out["prefill_completed"] = load(prefill.grpc_address, "prefill").num_prefilled_reqs
        return out
    finally:
        for s in (decode, prefill, agg):
            s.stop()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models/tandem-demo-dense"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--backends", nargs="+", default=["nixl", "grpc"])
    ap.add_argument("--long-prompt", type=int, default=1024)
    ap.add_argument("--ttft-samples", type=int, default=15, help="timed TTFT pairs (after one warmup pair)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    results = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command_line(argv), "git": git_info(),
               "machine": machine_info(), "device": args.device, "dtype": args.dtype, "runs": []}
    for backend in args.backends:
        try:
            r = check(args, backend)
        except Exception as exc:  # report and go on with the next backend
            r = {"backend": backend, "error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
        print(json.dumps(r), flush=True)
        results["runs"].append(r)
    results["targets"] = [
        target(f"disaggregated TTFT p50 - aggregated, {r['backend']}, {args.long_prompt}-token prompt (ms)",
               round(r["ttft_disagg_ms_p50"] - r["ttft_agg_ms_p50"], 2), "<= 5",
               r["ttft_disagg_ms_p50"] <= r["ttft_agg_ms_p50"] + 5.0)
        for r in results["runs"] if "ttft_agg_ms_p50" in r]
    print_targets(results["targets"])
    if args.out:
        write_json(Path(args.out), results)


if __name__ == "__main__":
    main()
