"""The extend (prefill) attention kernel at long prompts: its tile configurations against each other
and against torch's SDPA (flash) on the same causal problem.

One request of ``--lengths`` tokens (no cached prefix: the 8k-prefill gate's case), the Llama-3-8B
attention shape by default (32 query heads, 8 KV heads, head dim 128), K/V in a paged pool of
``--page-size`` through a shuffled page table, bf16. Every ``ExtendConfig`` candidate (block of
queries, block of keys, warps, stages) and ``F.scaled_dot_product_attention(is_causal=True)`` on
contiguous [1, H, T, D] tensors (GQA expanded) run in rounds, the order rotating, each timed as
the median of ``--iters`` calls; per length the median over rounds, with TFLOP/s of the causal
attention (4 * H * D * T(T+1)/2) and the ratio to SDPA. Every candidate's output is checked
against the default configuration's (max abs diff). The engine's default is marked; the fastest
is reported, not adopted: a change of the default is a separate, measured commit
(--enable-deterministic-inference keeps the default whatever it is).

    python benchmarks/extend_attention_bench.py --out benchmarks/results/gpu/extend_attention_h100.json
    TRITON_INTERPRET=1 python benchmarks/extend_attention_bench.py --device cpu --dtype float32 \\
        --lengths 96 --heads 4 --kv-heads 2 --head-dim 32 --iters 1 --rounds 1     # a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "libs"))
sys.path.insert(0, str(REPO))

from benchmarks.common.engine import alternate_rounds, spread, sync  # noqa: E402
from benchmarks.common.results import print_targets, provenance, target, write_json  # noqa: E402

CANDIDATES = {  # name -> (block_m, block_n, num_warps, num_stages)
    "default": None,
    "m128_n64_w8_s3": (128, 64, 8, 3),
    "m128_n32_w4_s3": (128, 32, 4, 3),
    "m64_n32_w4_s3": (64, 32, 4, 3),
    "m128_n128_w8_s2": (128, 128, 8, 2),
}


def problem(T: int, H: int, KVH: int, D: int, page: int, dtype, device: str, g: torch.Generator) -> dict:
    pages = -(-T // page)
    k = torch.randn(T, KVH, D, generator=g).to(dtype).to(device)
    v = torch.randn(T, KVH, D, generator=g).to(dtype).to(device)
    q = torch.randn(T, H, D, generator=g).to(dtype).to(device)
    table = torch.randperm(pages, generator=g).to(torch.int32)
    kc = torch.zeros(pages, page, KVH, D, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    slots = (table.long()[torch.arange(T) // page] * page + torch.arange(T) % page).to(device)
    kc.view(-1, KVH, D)[slots], vc.view(-1, KVH, D)[slots] = k, v
    zero = torch.zeros(1, dtype=torch.long, device=device)
    lens = torch.full((1,), T, dtype=torch.long, device=device)
    return {"q": q, "k": k, "v": v, "kc": kc, "vc": vc, "table": table[None].to(device), "q_start": zero,
            "q_lens": lens, "seq_lens": lens}


def timed_median(fn, device: str, iters: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = {**provenance(argv), "args": vars(args)}
    from tandem.engine.kernels.extend_attention import DEFAULT_CONFIG, ExtendConfig, extend_attention

    configs = {name: DEFAULT_CONFIG if c is None else ExtendConfig(*c) for name, c in CANDIDATES.items()}
    dtype, device = getattr(torch, args.dtype), args.device
    H, KVH, D = args.heads, args.kv_heads, args.head_dim
    g = torch.Generator().manual_seed(0)
    scale = D**-0.5
    rows = []
    for T in args.lengths:
        p = problem(T, H, KVH, D, args.page_size, dtype, device, g)

        def run(config, p=p, T=T):
            return extend_attention(p["q"], p["kc"], p["vc"], p["table"], p["q_start"], p["q_lens"], p["seq_lens"],
                                    T, scale, config=config)

        qt = p["q"].transpose(0, 1)[None]  # [1, H, T, D]
        kt = p["k"].repeat_interleave(H // KVH, 1).transpose(0, 1)[None]
        vt = p["v"].repeat_interleave(H // KVH, 1).transpose(0, 1)[None]

        def sdpa(qt=qt, kt=kt, vt=vt):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)

        want = run(DEFAULT_CONFIG).float()
        diffs = {name: (run(c).float() - want).abs().max().item() for name, c in configs.items()}
        diffs["sdpa"] = (sdpa()[0].transpose(0, 1).float() - want).abs().max().item()
        sides = {name: (lambda c=c: timed_median(lambda: run(c), device, args.iters)) for name, c in configs.items()}
        sides["sdpa"] = lambda: timed_median(sdpa, device, args.iters)
        times = {name: spread(v) for name, v in alternate_rounds(sides, args.rounds).items()}
        flops = 4 * H * D * T * (T + 1) / 2
        row = {"tokens": T, "flops": flops, "max_diff_vs_default": diffs,
               "ms": {name: t["median"] * 1e3 for name, t in times.items()}, "rounds": times}
        best = min(configs, key=lambda name: times[name]["median"])
        row.update(fastest=best, fastest_config=configs[best]._asdict(),
                   default_over_sdpa=times["default"]["median"] / times["sdpa"]["median"],
                   fastest_over_sdpa=times[best]["median"] / times["sdpa"]["median"])
        print(f"prompt {T}: " + ", ".join(f"{name} {t['median'] * 1e3:.3f} ms "
                                          f"({flops / t['median'] / 1e12:.1f} TFLOP/s)" for name, t in times.items())
              + f"; fastest kernel config {best}", flush=True)
        rows.append(row)
    result["rows"] = rows
    result["targets"] = [target(f"prompt {r['tokens']}: extend kernel (default tiles) time / SDPA flash",
                                round(r["default_over_sdpa"], 3), "<= 1 (informational: the gate is whole-model TTFT)",
                                r["default_over_sdpa"] <= 1) for r in rows]
    print_targets(result["targets"])
    if args.out:
        write_json(Path(args.out), result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
