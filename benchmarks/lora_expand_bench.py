"""The stacked LoRA form's expand kernel (``tandem.engine.lora.kernels.expand_stacked``) at the
Llama-3-8B projection shapes: its launch configurations against each other and against the copy
it replaces (the base columns written out contiguous, the least any expand must do).

Each projection of an 8B layer with 4 rank-``R`` adapter slots (``qkv``: N 6144, 3 parts;
``o``: 4096; ``gate_up``: 28672, 2 parts; ``down``: 4096), each decode batch (rows take slots
round-robin, as ``engine_bench.py --lora`` mixes its adapters): 32 launches (one per layer, on
32 different inputs) are captured in a CUDA graph and replayed; time per launch = replay time / 32,
median of 20 replays. Candidates: ``BLOCK_N`` x ``num_warps`` x the row tile. The engine's
configuration (``STACKED_BLOCK_N``, ``STACKED_WARPS``, the row tile by ``T``; 16 beside it) is marked; the script
prints per batch the sum over the four projections for each candidate and the best.

    python benchmarks/lora_expand_bench.py --out benchmarks/results/gpu/lora_expand_h100.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "libs"))
sys.path.insert(0, str(REPO))

from tandem.engine.lora import kernels as K  # noqa: E402

from benchmarks.common.results import (  # noqa: E402
    print_targets,
    provenance,
    target,
    target_items,
    write_results,
    written_by,
)

SHAPES = {"qkv": (6144, 3), "o": (4096, 1), "gate_up": (28672, 2), "down": (4096, 1)}  # N, parts
LAYERS = 32


def graph_us(launches) -> float:
    """Microseconds a launch of ``launches()`` (``LAYERS`` launches): run once (compile), captured in a
    CUDA graph, median of 20 replays."""
    launches()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launches()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / LAYERS)
    return sorted(times)[len(times) // 2]


def time_config(N: int, R: int, slots: int, T: int, cfg: tuple, g: torch.Generator) -> float:
    """Microseconds a launch: ``LAYERS`` launches in one CUDA graph, median of 20 replays."""
    block_n, warps, block_m = cfg
    dev = "cuda"
    ys = [torch.randn(T, N + slots * R, generator=g, device=dev).to(torch.bfloat16) for _ in range(LAYERS)]
    bs = [(torch.randn(slots, N, R, generator=g, device=dev) * 0.05).to(torch.bfloat16) for _ in range(LAYERS)]
    row_slots = torch.tensor([t % slots for t in range(T)], dtype=torch.int32, device=dev)

    def launches():
        for y, b in zip(ys, bs):
            K.expand_stacked(y, N, b, row_slots, block_m=block_m, block_n=block_n, num_warps=warps)

    return graph_us(launches)


def time_copy(N: int, R: int, slots: int, T: int, g: torch.Generator) -> float:
    """The same, for copying ``ys[:, :N]`` into a contiguous ``[T, N]`` alone (no adapter)."""
    ys = [torch.randn(T, N + slots * R, generator=g, device="cuda").to(torch.bfloat16) for _ in range(LAYERS)]
    outs = [torch.empty(T, N, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]

    def launches():
        for y, o in zip(ys, outs):
            o.copy_(y[:, :N])

    return graph_us(launches)


def write_markdown(path: Path, r: dict) -> None:
    lines = [f"# LoRA stacked expand at the 8B shapes ({r['device_name']})", "", written_by("lora_expand_bench.py", r),
             "", f"{r['slots']} slots of rank {r['rank']}; us a launch (graph of {LAYERS}, median of 20).", "",
             "| batch | config (BLOCK_N, warps, row tile) | " + " | ".join(SHAPES) + " | sum |", "|---|---|"
             + "---|" * (len(SHAPES) + 1)]
    for row in r["rows"]:
        mark = " (engine)" if row["engine"] else ""
        lines.append(f"| {row['batch']} | {row['config']}{mark} | " + " | ".join(f"{row['us'][s]:.2f}" for s in SHAPES)
                     + f" | {row['sum_us']:.2f} |")
    for row in r["copy"]:
        lines.append(f"| {row['batch']} | copy only | " + " | ".join(f"{row['us'][s]:.2f}" for s in SHAPES)
                     + f" | {row['sum_us']:.2f} |")
    lines += ["", "Targets:", ""] + target_items(r["targets"])
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--out", default=None, help="write JSON results here (and a .md next to it)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("lora_expand_bench needs a CUDA GPU")
        return 2
    prov = provenance(argv)
    t0 = time.time()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, copies, targets = [], [], []
    for T in args.batch_sizes:
        engine_cfg = (K.STACKED_BLOCK_N, K.STACKED_WARPS, K._block_m(T))
        tiles = sorted({K._block_m(T), 16} if T > 16 else {16})
        cands = [(bn, w, bm) for bn in (32, 64, 128) for w in (2, 4, 8) for bm in tiles]
        for cfg in cands:
            us = {s: time_config(n, parts * args.rank, args.slots, T, cfg, g) for s, (n, parts) in SHAPES.items()}
            rows.append({"batch": T, "config": list(cfg), "engine": cfg == engine_cfg, "us": us,
                         "sum_us": sum(us.values())})
            print(f"batch {T:3d} {cfg}: " + ", ".join(f"{s} {v:.2f}" for s, v in us.items())
                  + f" | sum {sum(us.values()):.2f} us" + (" (engine)" if cfg == engine_cfg else ""), flush=True)
        us = {s: time_copy(n, parts * args.rank, args.slots, T, g) for s, (n, parts) in SHAPES.items()}
        copies.append({"batch": T, "us": us, "sum_us": sum(us.values())})
        mine = [r for r in rows if r["batch"] == T]
        best = min(mine, key=lambda r: r["sum_us"])
        eng = next(r for r in mine if r["engine"])
        print(f"batch {T}: best {best['config']} {best['sum_us']:.2f} us a layer; engine {eng['config']} "
              f"{eng['sum_us']:.2f}; copy only {copies[-1]['sum_us']:.2f}")
        targets.append(target(f"batch {T}: engine's expand config within 10% of the best candidate (sum over a layer)",
                              round(eng["sum_us"] / best["sum_us"], 3), "<= 1.10x the best", eng["sum_us"] <= 1.1
                              * best["sum_us"]))
    print_targets(targets)
    result = {**prov, "device_name": torch.cuda.get_device_name(0), "seconds": round(time.time() - t0, 1),
              "rank": args.rank, "slots": args.slots, "rows": rows, "copy": copies, "targets": targets}
    if args.out:
        write_results(args.out, result, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
