"""Tensor-parallel decode throughput of engine_bench (``engine_bench.py --tp-size N``): the same requests
through a one-rank engine and an N-rank one (``--tp-size N``: one process per rank, gloo on CPU, NCCL
on CUDA with NVLink multicast off), one after the other in one run, each freed before the next.

Per side: tok/s of whole ``generate`` calls per batch size (engine_bench's prompts: random ids, fixed
lengths, greedy, every request makes exactly ``--output-len`` tokens), the engine's settings (overlap
scheduling and CUDA graphs as the engine chose them, recorded per side), and a correctness check on
the demo prompts (TP N tokens == TP 1 tokens, largest logprob difference). No target on CPU (the issue's gate prints the numbers); on GPUs the multi-GPU issue sets
them.

    python benchmarks/engine_bench.py --tp-size 2 --out benchmarks/results/engine_tp2_cpu.json
    python benchmarks/engine_bench.py --tp-size 2 --shape llama8b --device cuda --dtype bfloat16 \\
        --batch-sizes 1 64 --output-len 64 --out benchmarks/results/gpu/engine_tp2_llama8b_h100.json
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.common.results import written_by
from benchmarks.common.tp import LOGPROB_TOL, compare_tp

CHECK_PROMPTS = ["The license", "def main(argv=None):", "Hello world, this is a test of", "import os\nimport sys\n"]


def run(args, git: dict, started: str, machine: dict, load_format: str) -> dict:
    vocab = json.loads(Path(args.model, "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)  # engine_bench's prompts: same seed, same order
    prompts = {b: [torch.randint(10, vocab, (args.input_len,), generator=g).tolist() for _ in range(b)]
               for b in args.batch_sizes}
    has_tokenizer = Path(args.model, "tokenizer.json").exists()
    check = CHECK_PROMPTS if has_tokenizer else [p[:16] for p in prompts[args.batch_sizes[0]]][:4]
    r = compare_tp(args.model, args.device, args.dtype, args.tp_size, check, 16, prompts, args.output_len,
                   load_format, args.threads)
    rows = []
    for b in args.batch_sizes:
        one, many = r["sides"]["1"]["tok_s"][b], r["sides"][str(args.tp_size)]["tok_s"][b]
        rows.append({"batch": b, "tp1_tok_s": one, "tpn_tok_s": many, "ratio": many / one})
        print(f"batch {b:3d}: TP 1 {one:9.1f} tok/s | TP {args.tp_size} {many:9.1f} tok/s | {many / one:.2f}x")
    m = r["match"]
    exact = args.dtype == "float32" and load_format == "auto"  # dummy weights differ per rank by design
    gates = []
    if exact:
        ok = m["tokens_equal"] == m["requests"] and m["max_logprob_diff"] <= LOGPROB_TOL
        gates.append({"target": f"float32: TP {args.tp_size} tokens == TP 1, logprobs within {LOGPROB_TOL:g}",
                      "value": f"{m['tokens_equal']}/{m['requests']}, {m['max_logprob_diff']:.2e}", "met": ok})
    for gate in gates:
        print(f"target: {gate['target']}: {gate['value']} -> {'MET' if gate['met'] else 'NOT MET'}")
    if not exact:
        print(f"tokens: {m['tokens_equal']}/{m['requests']} equal (not a target in {args.dtype}"
              f"{' with dummy weights' if load_format == 'dummy' else ''}); tok/s: no target on this run")
    return {"time": started, "git": git, "machine": machine, "model": str(Path(args.model).resolve()),
            "device": args.device, "dtype": args.dtype, "load_format": load_format,
            "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else machine["cpu_model"],
            "input_len": args.input_len, "output_len": args.output_len, "tp_size": args.tp_size,
            "torch": torch.__version__, "rows": rows, "match": m, "sides": r["sides"], "gates": gates}


def write_markdown(path: Path, r: dict) -> None:
    n = r["tp_size"]
    lines = [f"# engine_bench --tp-size {n}: {Path(r['model']).name} on {r['device_name']}", "",
             written_by("benchmarks/engine_bench.py", r), "",
             f"{r['device']}/{r['dtype']} ({r['load_format']} weights), prompt {r['input_len']}, output "
             f"{r['output_len']}, torch {r['torch']}; TP 1 with the shipped defaults, then TP {n} (one process "
             "per rank), one after the other, each alone"
             + ("." if r["device"].startswith("cuda") else
                f", on a CPU other processes may share (load average {r['machine'].get('load_avg')} at the start)."),
             "",
             f"| batch | TP 1 tok/s | TP {n} tok/s | TP {n} / TP 1 |", "|---|---|---|---|"]
    lines += [f"| {x['batch']} | {x['tp1_tok_s']:.1f} | {x['tpn_tok_s']:.1f} | {x['ratio']:.2f}x |" for x in r["rows"]]
    s1, sn = r["sides"]["1"]["engine"], r["sides"][str(n)]["engine"]
    lines += ["", f"Rank 0 holds {sn['param_bytes_rank0'] / 1e6:.1f} MB of parameters (TP 1: "
                  f"{s1['param_bytes_rank0'] / 1e6:.1f} MB) and {sn['kv_heads_per_rank']} KV head(s) per layer "
                  f"(TP 1: {s1['kv_heads_per_rank']}).",
              f"Correctness on the check prompts: tokens equal {r['match']['tokens_equal']}/{r['match']['requests']}, "
              f"largest logprob difference {r['match']['max_logprob_diff']:.2e}."]
    if r["gates"]:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {g['target']} | {g['value']} | {'yes' if g['met'] else '**no**'} |" for g in r["gates"]]
    path.write_text("\n".join(lines) + "\n")
