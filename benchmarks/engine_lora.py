"""LoRA throughput (``engine_bench.py --lora``): serving with adapters against the base model.

One run, both sides, the same random prompts (greedy, every request makes exactly --output-len
tokens), each side warmed with an identical call and timed over a whole ``generate``:

* base: the engine without LoRA (``LLM(model)``, the shipped defaults), all requests base.
* lora: the engine with ``--lora-adapters`` random PEFT adapters of rank ``--lora-rank`` on every
  projection (q/k/v/o, gate/up/down; ``deploy/demo_lora.py``), ``--max-loras-per-batch`` =
  the adapter count; a batch mixes them round-robin (request i uses adapter i mod n); batch 1
  uses one adapter. Also timed: the same LoRA engine with every request on the base model.

Targets (the issue's gate, printed met or not on every run; the gate is the GPU run on the 8B
shape, rank 16, 4 adapters): mixed batch of 64 >= 0.85x base tok/s; batch 1 >= 0.9x.

    python benchmarks/engine_bench.py --lora --shape llama8b --device cuda --dtype bfloat16 \\
        --batch-sizes 1 64 --input-len 128 --output-len 64 --out benchmarks/results/gpu/engine_lora_llama8b.json
    python benchmarks/engine_bench.py --lora --batch-sizes 1 8 --input-len 16 --output-len 8   # CPU, demo model
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from tandem.engine import LLM

from benchmarks.common.engine import release_memory, run_tandem
from benchmarks.common.shapes import shape_of
from deploy.demo_lora import build_adapter

TARGETS = {64: 0.85, 1: 0.90}  # batch -> minimum lora / base tok/s


def build_adapters(model: str, n: int, rank: int, root: str) -> dict[str, str]:
    """``n`` random rank-``rank`` adapters on every projection (different seeds)."""
    return {f"lora{i}": build_adapter(model, os.path.join(root, f"lora{i}"), rank=rank, seed=100 + i, std_b=0.02)
            for i in range(n)}


def run(args, git: dict, started: str, machine: dict) -> dict:
    cuda = args.device.startswith("cuda")
    load_format = args.load_format or ("dummy" if args.shape else "auto")
    vocab = json.loads(Path(args.model, "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompts = {b: [torch.randint(10, vocab, (args.input_len,), generator=g).tolist() for _ in range(b)]
               for b in args.batch_sizes}
    root = tempfile.mkdtemp(prefix="tandem-lora-bench-")
    adapters = build_adapters(args.model, args.lora_adapters, args.lora_rank, root)
    names = list(adapters)
    rows = {b: {"batch": b, "adapters_in_batch": min(b, len(names))} for b in args.batch_sizes}

    base = LLM(args.model, device=args.device, dtype=args.dtype, load_format=load_format)
    for b in args.batch_sizes:
        rows[b]["base_tok_s"] = run_tandem(base, prompts[b], args.output_len, args.device)["tokens_per_s"]
        print(f"batch {b:3d}: base model        {rows[b]['base_tok_s']:9.1f} tok/s", flush=True)
    del base
    release_memory(cuda)

    lora = LLM(args.model, device=args.device, dtype=args.dtype, load_format=load_format,
               lora_paths=[f"{n}={p}" for n, p in adapters.items()], max_loras_per_batch=len(names),
               max_lora_rank=args.lora_rank)
    for b in args.batch_sizes:
        mix = [names[i % len(names)] for i in range(b)]
        row = rows[b]
        row["lora_tok_s"] = run_tandem(lora, prompts[b], args.output_len, args.device, lora_name=mix)["tokens_per_s"]
        row["lora_engine_base_reqs_tok_s"] = run_tandem(lora, prompts[b], args.output_len,
                                                        args.device)["tokens_per_s"]
        row["ratio"] = row["lora_tok_s"] / row["base_tok_s"]
        print(f"batch {b:3d}: {row['adapters_in_batch']} adapter(s)     {row['lora_tok_s']:9.1f} tok/s | "
              f"{row['ratio']:.3f}x base | LoRA engine, base requests {row['lora_engine_base_reqs_tok_s']:9.1f} tok/s",
              flush=True)
    if args.profile:  # the LoRA engine's batch of mixed adapters (base kernels beside LoRA's)
        from benchmarks.engine_bench import profile

        b = args.profile_batch or max(args.batch_sizes)
        profile(lora, prompts[b], args.output_len, args.device, Path(args.profile),
                lora_name=[names[i % len(names)] for i in range(b)])
    eng = lora.engine
    engine_info = {"attention_backend": eng.attention_backend, "cuda_graph_max_bs": eng.cuda_graph_max_bs,
                   "page_size": eng.page_size, "torch_threads": torch.get_num_threads()}
    gates = [{"target": f"batch {b}, {rows[b]['adapters_in_batch']} adapter(s) rank {args.lora_rank}: "
                        f">= {need:.2f}x base tok/s",
              "value": f"{rows[b]['ratio']:.3f}x", "met": rows[b]["ratio"] >= need}
             for b, need in TARGETS.items() if b in rows]
    return {"time": started, "git": git, "machine": machine,
            "device_name": torch.cuda.get_device_name(0) if cuda else machine["cpu_model"],
            "model": os.path.abspath(args.model), "shape": shape_of(args.model), "device": args.device,
            "dtype": args.dtype, "load_format": load_format, "input_len": args.input_len,
            "output_len": args.output_len, "lora_rank": args.lora_rank, "lora_adapters": len(names),
            "lora_targets": "q,k,v,o,gate,up,down", "engine": engine_info,
            "load_avg_1m_end": round(os.getloadavg()[0], 2), "rows": list(rows.values()), "gates": gates}


def write_markdown(path: Path, r: dict) -> None:
    lines = [f"# LoRA throughput: {r['shape'] or r['model']} on {r['device_name']}", "",
             f"`{r['command']}`", "",
             f"commit {r['git'].get('commit')} (dirty: {r['git'].get('dirty')}), {r['dtype']}, "
             f"input {r['input_len']} / output {r['output_len']} tokens, {r['lora_adapters']} adapters of rank "
             f"{r['lora_rank']} on {r['lora_targets']}", "",
             "| batch | adapters | base tok/s | LoRA tok/s | ratio | LoRA engine, base requests |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {x['batch']} | {x['adapters_in_batch']} | {x['base_tok_s']:.1f} | {x['lora_tok_s']:.1f} | "
              f"{x['ratio']:.3f}x | {x['lora_engine_base_reqs_tok_s']:.1f} |" for x in r["rows"]]
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {g['target']} | {g['value']} | {'yes' if g['met'] else '**no**'} |" for g in r["gates"]]
    path.write_text("\n".join(lines) + "\n")
