"""Tune the fused MoE kernels' launch configurations on this GPU, per shape and batch size.

For each shape (``benchmarks/common/shapes.py``) and batch size T: uniform random routing of T
tokens (top-k distinct experts each, plus the folded shared expert's chunks), bf16 weights of the
shape, and a coordinate search over small candidate sets: for each schedule that fits T
(``tokens`` up to T=64, with the down projection fused with the combine or split from it;
``blocks`` from T=4), the up projection's parameters with the down projection's fixed, then the
down projection's with the best up; the fastest schedule wins.
Each candidate is timed with ``triton.testing.do_bench`` (median, L2 flushed between runs) over
the whole ``fused_experts`` call. The untuned default is timed too.

Writes the winners to ``libs/tandem/engine/kernels/configs/fused_moe_<device>.json`` (merged with
what is there; ``fused_moe.get_config`` reads it: check it in) and the timings, with the bandwidth
each reaches on the distinct experts' bytes, to ``--out``.

    python benchmarks/tune_fused_moe.py --shapes qwen2moe-a2.7b qwen3moe-30b-a3b --batch-sizes 1 4 16 64 \\
        --out benchmarks/results/gpu/tune_fused_moe_h100.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "libs"))
sys.path.insert(0, str(REPO))

from tandem.engine.kernels import fused_moe  # noqa: E402

from benchmarks.common.results import command_line, git_info, machine_info, write_json  # noqa: E402
from benchmarks.common.shapes import SHAPES  # noqa: E402


def _cfg(bn, bk, warps, stages):
    return {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


TOKENS = [_cfg(8, 256, 4, 3), _cfg(16, 256, 4, 3), _cfg(16, 512, 4, 3), _cfg(32, 256, 4, 3), _cfg(16, 256, 8, 3),
          _cfg(32, 512, 8, 3), _cfg(16, 128, 2, 4), _cfg(8, 512, 4, 3), _cfg(8, 128, 2, 4)]
BLOCKS = [_cfg(64, 64, 4, 3), _cfg(128, 64, 4, 3), _cfg(64, 128, 4, 3), _cfg(32, 128, 4, 4), _cfg(128, 128, 8, 3),
          _cfg(64, 64, 4, 4)]


def moe_shape(name: str) -> dict:
    s = SHAPES[name]
    inter = s["moe_intermediate_size"]
    shared = s.get("shared_expert_intermediate_size", 0) or 0
    S = shared // inter if shared and shared % inter == 0 else 0
    return {"E": s["num_experts"], "k": s["num_experts_per_tok"], "S": S, "H": s["hidden_size"], "inter": inter}


def routing(T: int, shape: dict, g: torch.Generator, dev: str):
    """Slots [T, KS] (top-k distinct experts uniformly, then the S shared chunks) and weights."""
    E, k, S = shape["E"], shape["k"], shape["S"]
    ids = torch.rand(T, E, generator=g, device=dev).topk(k, dim=1).indices.sort(dim=1).values
    shared = torch.arange(E, E + S, device=dev).expand(T, S)
    slots = torch.cat([ids, shared], dim=1).to(torch.int32)
    return slots, torch.rand(slots.shape, generator=g, device=dev)


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def tune_shape(name: str, batch_sizes: list, dev: str) -> tuple[dict, list]:
    shape = moe_shape(name)
    E, S, H, inter = shape["E"], shape["S"], shape["H"], shape["inter"]
    KS = shape["k"] + S
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = (torch.randn(E + S, 2 * inter, H, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(E + S, H, inter, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * 2
    table, rows = {}, []
    for T in batch_sizes:
        x = torch.randn(T, H, generator=g, device=dev).to(torch.bfloat16)
        slots, weights = routing(T, shape, g, dev)
        distinct = int(torch.unique(slots).numel())

        def run(cfg, x=x, slots=slots, weights=weights):
            return bench(lambda: fused_moe.fused_experts(x, w13, w2, slots, weights, True, cfg))

        default = fused_moe.default_config(T, KS, H, inter)
        default_ms = run(default)
        best = (default_ms, default)
        for mode, cands in (("tokens", TOKENS), ("blocks", BLOCKS)):
            if (mode == "tokens" and T > 64) or (mode == "blocks" and T < 4):
                continue
            base = dict(fused_moe.default_config(1 if mode == "tokens" else max(T, 9), KS, H, inter))
            up = min(cands, key=lambda c: run(dict(base, up=c)))
            splits = (False, True) if mode == "tokens" else (False,)
            down_ms, down, split = min(((run(dict(base, up=up, down=c, split_down=sp)), c, sp)
                                        for c in cands for sp in splits), key=lambda r: r[0])
            if down_ms < best[0]:
                best = (down_ms, dict(base, up=up, down=down, split_down=split))
        ms, cfg = best
        table[str(T)] = cfg
        gbps = distinct * expert_bytes / (ms * 1e-3) / 1e9
        rows.append({"shape": name, "batch": T, "distinct_slots": distinct, "bytes": distinct * expert_bytes,
                     "default_ms": round(default_ms, 4), "tuned_ms": round(ms, 4), "tuned_GBps": round(gbps, 1),
                     "config": cfg})
        print(f"{name} T={T:3d}: {distinct} slots hit, default {default_ms:.4f} ms -> tuned {ms:.4f} ms "
              f"({gbps:.0f} GB/s) {cfg['mode']} {cfg.get('BLOCK_M', '')} up {cfg['up']} down {cfg['down']}", flush=True)
    return {fused_moe.shape_key(KS, H, inter, torch.bfloat16): table}, rows


def write_config(path: str, device_name: str, triton_version: str, written_by: str, commit: str | None,
                 started: str, configs: dict) -> None:
    """Merge ``configs`` {shape_key: {batch: config}} into the device's config file."""
    old = json.loads(Path(path).read_text())["configs"] if os.path.isfile(path) else {}
    for shape_key, table in configs.items():
        old.setdefault(shape_key, {}).update(table)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Path(path).write_text(json.dumps({"device": device_name, "triton": triton_version, "written_by": written_by,
                                      "commit": commit, "time": started, "configs": old},
                                     indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


def write_from_results(results: Path, command: str) -> int:
    """The config file a tuning run wrote on its device, rebuilt from the rows of its results JSON
    (each row: shape, batch and the winning config; the shape key from ``SHAPES``)."""
    r = json.loads(results.read_text())
    configs: dict = {}
    for row in r["rows"]:
        m = moe_shape(row["shape"])
        key = fused_moe.shape_key(m["k"] + m["S"], m["H"], m["inter"], torch.bfloat16)
        configs.setdefault(key, {})[str(row["batch"])] = row["config"]
    name = r["device_name"]
    triton_version = r["machine"]["packages"].get("triton")
    write_config(fused_moe.config_path(name.replace(" ", "_")), name, triton_version,
                 f"{command} (from: {r['command']})", r["git"].get("commit"), r["time"], configs)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    moe_shapes = [n for n, s in SHAPES.items() if s.get("num_experts")]
    ap.add_argument("--shapes", nargs="+", choices=moe_shapes, default=moe_shapes)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--out", default=None, help="write the timings here (JSON)")
    ap.add_argument("--from-results", default=None, metavar="JSON",
                    help="write the config file of the device a tuning run was made on from that run's results JSON "
                         "(its --out), without a GPU: when the config file itself did not come back from the device")
    args = ap.parse_args(argv)
    if args.from_results:
        return write_from_results(Path(args.from_results), command_line(argv))
    if not torch.cuda.is_available():
        raise SystemExit("tune_fused_moe needs a CUDA device")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    git, command = git_info(), command_line(argv)
    dev = "cuda"
    configs, rows = {}, []
    for name in args.shapes:
        c, r = tune_shape(name, args.batch_sizes, dev)
        configs.update(c)
        rows += r
        torch.cuda.empty_cache()
    import triton

    path = fused_moe.config_path(fused_moe.device_key(torch.device(dev)))
    write_config(path, torch.cuda.get_device_name(0), triton.__version__, command, git.get("commit"), started, configs)
    if args.out:
        write_json(Path(args.out), {"time": started, "command": command, "git": git, "machine": machine_info(),
                                    "device_name": torch.cuda.get_device_name(0), "rows": rows, "config_file": path})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
