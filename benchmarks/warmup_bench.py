"""First-request TTFT with and without prefill warmup, against steady-state TTFT.

For each setting a fresh prefill + decode pair is started (disaggregated, NIXL), the
first request's TTFT is measured, then the median TTFT of the next requests (steady
state). Goal: with warmup, first TTFT <= 1.5x steady state.

    .venv/bin/python benchmarks/warmup_bench.py [--model DIR] [--steady 10] [--isl 256]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc  # noqa: E402

from benchmarks.common.results import print_targets, provenance, target, write_json  # noqa: E402
from tests.support.procs import start_service  # noqa: E402


def ttft(address: str, ids: list[int]) -> float:
    with grpc.insecure_channel(address) as ch:
        stub = decode_pb2_grpc.DecodeStub(ch)
        t0 = time.perf_counter()
        stream = stub.Generate(decode_pb2.GenerateRequest(
            input_ids=ids, sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True),
            prefill_override="remote"))
        first = None
        for chunk in stream:
            if chunk.token_ids and first is None:
                first = time.perf_counter() - t0
        return first


def run(model: str, warmup: bool, isl: int, steady: int) -> dict:
    common = ["--model-path", model, "--max-total-tokens", "16384"] + ([] if warmup else ["--skip-warmup"])
    prefill = start_service("tandem.prefill", *common)
    decode = start_service("tandem.decode", *common, "--disaggregation-mode", "decode",
                           "--prefill-addresses", prefill.grpc_address)
    try:
        prompts = [[(i * 31 + j * 7) % 4000 + 10 for j in range(isl)] for i in range(steady + 1)]
        first = ttft(decode.grpc_address, prompts[0])
        rest = [ttft(decode.grpc_address, p) for p in prompts[1:]]
    finally:
        decode.stop()
        prefill.stop()
    return {"warmup": warmup, "first_ttft_s": first, "steady_ttft_s": statistics.median(rest)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models/tandem-demo-dense"))
    ap.add_argument("--isl", type=int, default=256)
    ap.add_argument("--steady", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/warmup_bench.json"))
    args = ap.parse_args(argv)
    result = {**provenance(argv), "args": vars(args)}
    # Both settings in this one run, so the cold and the warm first request meet the same machine.
    cold = run(args.model, warmup=False, isl=args.isl, steady=args.steady)
    warm = run(args.model, warmup=True, isl=args.isl, steady=args.steady)
    steady = statistics.median([cold["steady_ttft_s"], warm["steady_ttft_s"]])
    rows = {"first request, no warmup": cold["first_ttft_s"], "first request, with warmup": warm["first_ttft_s"],
            "steady state": steady}
    print(f"{'TTFT':<28}{'ms':>10}{'x steady':>10}")
    for name, value in rows.items():
        print(f"{name:<28}{value * 1e3:>10.1f}{value / steady:>10.2f}")
    ratio = warm["first_ttft_s"] / steady
    result.update({"isl": args.isl, "runs": [cold, warm], "steady_ttft_s": steady,
                   "ratio_no_warmup": cold["first_ttft_s"] / steady, "ratio_with_warmup": ratio,
                   "load_avg_1m": round(os.getloadavg()[0], 2)})
    result["targets"] = [
        target("first TTFT with warmup / steady TTFT", round(ratio, 3), "<= 1.5", ratio <= 1.5),
        target("first TTFT with warmup / without warmup", round(warm["first_ttft_s"] / cold["first_ttft_s"], 3),
               "<= 1 (warmup helps)", warm["first_ttft_s"] <= cold["first_ttft_s"]),
    ]
    print_targets(result["targets"])
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
