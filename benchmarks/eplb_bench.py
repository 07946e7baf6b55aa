"""EPLB benchmark: balancedness of expert placements on skewed loads, and expert moves.

Loads are Zipf-skewed synthetic token counts (several skews; a random expert order per
layer, tokens sampled multinomially) or a recorder dump (``--recorded FILE``, json/pt,
its ``logical_count``). For each load it reports balancedness (mean GPU load / max GPU
load, averaged over layers; 1.0 = perfect):

* ``before``: the trivial placement (round-robin replicas) with the same slot count;
* ``hierarchical`` (when groups divide over nodes) and ``global`` rebalancing;
* ``move_aware``: the load drifts (a share of experts change rank, new samples); starting
  from the plan made for the previous load, each move budget is compared with fresh
  ``auto`` and ``global`` plans, counting expert weight copies (slots whose expert
  changes). Move-aware local search balances over all GPUs (it does not keep groups
  node-local), so ``global from scratch`` is its like-for-like reference.

Writes ``benchmarks/results/eplb_<tag>.json`` / ``.md`` and a PNG of balancedness vs
redundant experts per rank. Example::

    .venv/bin/python benchmarks/eplb_bench.py
    .venv/bin/python benchmarks/eplb_bench.py --recorded /tmp/dump.json --gpus 4
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.eplb import balancedness, choose_algorithm, count_moves, rebalance_experts, rebalance_move_aware  # noqa: E402
from tandem.eplb.algorithms import rebalance_global  # noqa: E402
from tandem.eplb.move_aware import refine_placement  # noqa: E402
from tandem.eplb.recorder import load_dump  # noqa: E402

from benchmarks.common.results import provenance, write_json  # noqa: E402


def zipf_load(layers: int, experts: int, skew: float, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """[layers, experts] token counts: expert of rank r gets p ∝ 1 / r**skew."""
    out = torch.empty(layers, experts, dtype=torch.float64)
    for layer in range(layers):
        order = torch.randperm(experts, generator=gen)
        p = 1.0 / (order + 1).double() ** skew
        out[layer] = torch.bincount(torch.multinomial(p / p.sum(), tokens, replacement=True, generator=gen),
                                    minlength=experts).double()
    return out


def drift(load: torch.Tensor, share: float, skew: float, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """The next window: ``share`` of the experts swap popularity, then resample."""
    layers, experts = load.shape
    out = torch.empty_like(load)
    for layer in range(layers):
        rank = torch.argsort(torch.argsort(load[layer], descending=True, stable=True), stable=True)
        moved = torch.randperm(experts, generator=gen)[: max(2, int(share * experts))]
        rank[moved] = rank[moved[torch.randperm(len(moved), generator=gen)]]
        p = 1.0 / (rank + 1).double() ** skew
        out[layer] = torch.bincount(torch.multinomial(p / p.sum(), tokens, replacement=True, generator=gen),
                                    minlength=experts).double()
    return out


def trivial(layers: int, physical: int, logical: int) -> torch.Tensor:
    return (torch.arange(physical) % logical).repeat(layers, 1)


def placement_rows(name: str, load: torch.Tensor, args, redundant_per_rank: list[int]) -> list[dict]:
    layers, experts = load.shape
    rows = []
    for r in redundant_per_rank:
        physical = experts + r * args.gpus
        if physical % args.gpus:
            continue
        row = {"load": name, "redundant_per_rank": r, "physical": physical,
               "before": balancedness(load, trivial(layers, physical, experts), args.gpus)}
        if choose_algorithm(args.groups, args.nodes) == "hierarchical":
            t = time.perf_counter()
            p, _, _ = rebalance_experts(load, physical, args.groups, args.nodes, args.gpus)
            row["hierarchical"] = balancedness(load, p, args.gpus)
            row["hierarchical_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        p, _, _ = rebalance_global(load, physical, args.gpus)
        row["global"] = balancedness(load, p, args.gpus)
        row["global_ms"] = (time.perf_counter() - t) * 1e3
        row["global_refined"] = balancedness(load, refine_placement(load, p, args.gpus), args.gpus)
        rows.append(row)
    return rows


def move_rows(name: str, load: torch.Tensor, next_load: torch.Tensor, args) -> list[dict]:
    layers, experts = load.shape
    physical = experts + args.move_redundant_per_rank * args.gpus
    old, _, _ = rebalance_experts(load, physical, args.groups, args.nodes, args.gpus)
    fresh, _, _ = rebalance_experts(next_load, physical, args.groups, args.nodes, args.gpus)
    rows = [
        {"load": name, "mode": "keep old plan", "budget": 0, "moves_per_layer": 0.0,
         "balancedness": balancedness(next_load, old, args.gpus)},
        {"load": name, "mode": choose_algorithm(args.groups, args.nodes) + " from scratch", "budget": None,
         "moves_per_layer": float(count_moves(old, fresh).double().mean()),
         "balancedness": balancedness(next_load, fresh, args.gpus)},
    ]
    if choose_algorithm(args.groups, args.nodes) == "hierarchical":  # also the node-agnostic policy
        glob, _, _ = rebalance_global(next_load, physical, args.gpus)
        rows.append({"load": name, "mode": "global from scratch", "budget": None,
                     "moves_per_layer": float(count_moves(old, glob).double().mean()),
                     "balancedness": balancedness(next_load, glob, args.gpus)})
    for budget in args.max_moves + [None]:
        t = time.perf_counter()
        res = rebalance_move_aware(next_load, old, args.gpus, budget, args.groups, args.nodes)
        rows.append({"load": name, "mode": "move_aware", "budget": budget,
                     "moves_per_layer": float(res.moves.double().mean()),
                     "balancedness": res.balancedness_after, "ms": (time.perf_counter() - t) * 1e3})
    return rows


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--groups", type=int, default=8, help="expert groups (n_group)")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=8, help="EP ranks")
    ap.add_argument("--skews", type=float, nargs="+", default=[0.6, 1.0, 1.4])
    ap.add_argument("--tokens", type=int, default=200_000, help="routed tokens x topk per layer")
    ap.add_argument("--redundant-per-rank", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--move-redundant-per-rank", type=int, default=1)
    ap.add_argument("--max-moves", type=int, nargs="+", default=[0, 2, 4, 8, 16])
    ap.add_argument("--drift", type=float, default=0.25, help="share of experts changing popularity")
    ap.add_argument("--recorded", help="recorder dump (json/pt) to use as the load instead of Zipf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--tag", default=None, help="result file tag (default: synthetic or recorded)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    started = provenance(argv)
    gen = torch.Generator().manual_seed(args.seed)

    loads: list[tuple[str, torch.Tensor, float]] = []
    if args.recorded:
        d = load_dump(args.recorded)
        cnt = torch.as_tensor(d["logical_count"]).double()
        if cnt.dim() == 3:
            cnt = cnt.sum(0)
        if cnt.sum() <= 0:
            print(f"{args.recorded}: the recorded load is empty", file=sys.stderr)
            return 1
        args.layers, args.experts = cnt.shape
        if args.experts % args.groups:
            args.groups = 1
        loads.append((f"recorded:{os.path.basename(args.recorded)}", cnt, 1.0))
    else:
        for s in args.skews:
            loads.append((f"zipf s={s}", zipf_load(args.layers, args.experts, s, args.tokens, gen), s))

    place, moves = [], []
    for name, load, skew in loads:
        place += placement_rows(name, load, args, args.redundant_per_rank)
        if args.recorded:
            # drift for a recorded load: another sample from the same distribution
            p = load / load.sum(1, keepdim=True)
            nxt = torch.stack([torch.bincount(torch.multinomial(p[i], int(load[i].sum()), True, generator=gen),
                                              minlength=args.experts).double() for i in range(args.layers)])
        else:
            nxt = drift(load, args.drift, skew, args.tokens, gen)
        moves += move_rows(name, load, nxt, args)

    title = (f"EPLB: {args.layers} layers x {args.experts} experts, {args.groups} groups, "
             f"{args.nodes} nodes, {args.gpus} GPUs")
    t1 = table(place, ["load", "redundant_per_rank", "physical", "before", "hierarchical", "global",
                       "global_refined", "hierarchical_ms", "global_ms"])
    t2 = table(moves, ["load", "mode", "budget", "moves_per_layer", "balancedness", "ms"])
    slots = args.experts + args.move_redundant_per_rank * args.gpus
    text = (f"## {title}\n\nBalancedness (mean/max GPU load) before and after rebalancing:\n\n{t1}\n\n"
            f"Load drift ({int(args.drift * 100)}% of experts change popularity) from the previous plan, "
            f"{slots} slots per layer; moves = expert weight copies per layer:\n\n{t2}\n")
    print(text)

    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or ("recorded" if args.recorded else "synthetic")
    base = os.path.join(args.out, f"eplb_{tag}")
    # No numeric target was set for this benchmark: it compares placements, and says so.
    meta = {**started, "title": title, "args": vars(args), "targets": []}
    print("targets: none set for this benchmark (a comparison of placement algorithms)")
    write_json(Path(base + ".json"), {"meta": meta, "placement": place, "moves": moves})
    with open(base + ".md", "w") as f:
        f.write(text)
    if not args.no_plot:
        plot(place, moves, base + ".png", title)
    print(f"wrote {base}.json, {base}.md" + ("" if args.no_plot else f", {base}.png"))
    return 0


def plot(place: list[dict], moves: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["load"] for r in place):
        rs = [r for r in place if r["load"] == name]
        x = [r["redundant_per_rank"] for r in rs]
        line = a.plot(x, [r["global"] for r in rs], marker="o", label=f"{name} global")[0]
        a.plot(x, [r["global_refined"] for r in rs], marker="^", ls="-.", color=line.get_color(),
               label=f"{name} global + refine")
        if "hierarchical" in rs[0]:
            a.plot(x, [r["hierarchical"] for r in rs], marker="s", ls="--", color=line.get_color(),
                   label=f"{name} hierarchical")
        a.plot(x, [r["before"] for r in rs], ls=":", color=line.get_color(), alpha=0.6, label=f"{name} before")
    a.axhline(0.95, color="grey", lw=0.8)
    a.set_xlabel("redundant experts per rank")
    a.set_ylabel("balancedness (mean / max GPU load)")
    a.set_ylim(0, 1.02)
    a.legend(fontsize=7)
    a.set_title("balancedness vs redundant experts")
    for name in dict.fromkeys(r["load"] for r in moves):
        rs = [r for r in moves if r["load"] == name and r["mode"] == "move_aware"]
        line = b.plot([r["moves_per_layer"] for r in rs], [r["balancedness"] for r in rs], marker="o",
                      label=f"{name} move-aware")[0]
        for r, m in zip([r for r in moves if r["load"] == name and r["mode"].endswith("from scratch")], "xD",
                        strict=False):
            b.scatter([r["moves_per_layer"]], [r["balancedness"]], marker=m, s=50, color=line.get_color(),
                      label=f"{name} {r['mode']}")
    b.set_xlabel("expert copies per layer")
    b.set_ylabel("balancedness after drift")
    b.legend(fontsize=7)
    b.set_title("move-aware: balance vs moves")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
