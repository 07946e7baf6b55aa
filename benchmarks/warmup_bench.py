"""First-request TTFT with and without prefill warmup, against steady-state TTFT.

For each setting a fresh prefill + decode pair is started (disaggregated, NIXL), the
first request's TTFT is measured, then the median TTFT of the next requests (steady
state). Goal: with warmup, first TTFT <= 1.5x steady state, judged on the median of ``--rounds``
(each round a fresh pair of each setting, the order alternating).

    .venv/bin/python benchmarks/warmup_bench.py [--model DIR] [--steady 10] [--isl 256] [--rounds 3]
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

from benchmarks.common.engine import spread  # noqa: E402
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
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds (each: a fresh pair without warmup and one with, the order alternating); "
                         "every ratio is the median over the rounds, with its min..max")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/warmup_bench.json"))
    args = ap.parse_args(argv)
    result = {**provenance(argv), "args": vars(args)}
    # Both settings in every round, so the cold and the warm first request meet the same machine.
    runs = []
    for r in range(args.rounds):
        pair = {}
        for warmup in ((False, True) if r % 2 == 0 else (True, False)):
            pair[warmup] = run(args.model, warmup=warmup, isl=args.isl, steady=args.steady)
        steady = statistics.median([pair[False]["steady_ttft_s"], pair[True]["steady_ttft_s"]])
        runs.append({"round": r, "runs": [pair[False], pair[True]], "steady_ttft_s": steady,
                     "ratio_no_warmup": pair[False]["first_ttft_s"] / steady,
                     "ratio_with_warmup": pair[True]["first_ttft_s"] / steady,
                     "warm_over_cold": pair[True]["first_ttft_s"] / pair[False]["first_ttft_s"]})
        print(f"round {r}: first TTFT no warmup {pair[False]['first_ttft_s'] * 1e3:.1f} ms, with warmup "
              f"{pair[True]['first_ttft_s'] * 1e3:.1f} ms, steady {steady * 1e3:.1f} ms", flush=True)
    summary = {k: spread([x[k] for x in runs]) for k in ("ratio_no_warmup", "ratio_with_warmup", "warm_over_cold",
                                                          "steady_ttft_s")}
    print(f"{'first TTFT / steady':<28}{'median':>10}{'min':>10}{'max':>10}")
    for name, key in (("no warmup", "ratio_no_warmup"), ("with warmup", "ratio_with_warmup")):
        v = summary[key]
        print(f"{name:<28}{v['median']:>10.2f}{v['min']:>10.2f}{v['max']:>10.2f}")
    ratio, gain = summary["ratio_with_warmup"], summary["warm_over_cold"]
    result.update({"isl": args.isl, "rounds": runs, "summary": summary,
                   "steady_ttft_s": summary["steady_ttft_s"]["median"],
                   "ratio_no_warmup": summary["ratio_no_warmup"]["median"], "ratio_with_warmup": ratio["median"],
                   "load_avg_1m": round(os.getloadavg()[0], 2)})
    over = f" ({ratio['min']:.3f}..{ratio['max']:.3f} over {len(runs)} rounds)" if len(runs) > 1 else ""
    result["targets"] = [
        target("first TTFT with warmup / steady TTFT", f"{ratio['median']:.3f}{over}", "<= 1.5 (median)",
               ratio["median"] <= 1.5),
        target("first TTFT with warmup / without warmup", round(gain["median"], 3), "<= 1 (warmup helps)",
               gain["median"] <= 1),
    ]
    print_targets(result["targets"])
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
