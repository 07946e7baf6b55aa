"""FP8 decode throughput of engine_bench (``engine_bench.py --quantization fp8``): the same requests
through the engine in bf16 (``--compare-bf16``), with ``--quantization fp8`` on ``--model`` (online
quantization of a bf16 checkpoint, or an FP8 checkpoint as it is), and on each
``--fp8-checkpoint`` (e.g. the block-scaled layout built by ``benchmarks/common/fp8_checkpoint.py``
from the same random weights), one after the other in one run, each engine freed before the next.

Per variant: tok/s of whole ``generate`` calls per batch size (as engine_bench), the batch-1 decode
step, and the roofline of the bytes a decode step actually reads: every weight once (FP8 weights
and their scales, lm_head and norms in bf16), the embedding table only for the batch's rows (all
of it when tied to lm_head); KV-cache reads are left out (at 128 + 64 tokens of context they are
~0.3% of an 8B step). The kernel the engine picked per linear and batch bucket is recorded.

Gates (``--gates fp8``, the issue's): online FP8 batch 1 >= 1.4x bf16 tok/s of the same run,
batch 64 >= 1.3x; block-scaled FP8 batch 1 >= 1.3x; bf16 >= 0.97x of ``--bf16-baseline`` (an
engine_bench JSON of the same card and command; not evaluated on another card).
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from tandem.engine import LLM

from benchmarks.common.engine import decode_step_ms, read_bandwidth, run_tandem
from benchmarks.common.results import written_by
from benchmarks.common.shapes import shape_of


def layout_of(model_path: str, quantization: str | None, dtype: str) -> str:
    """The variant's name: fp8-block / fp8-per-tensor (checkpoints), fp8-online, or the unquantized dtype
    (``bf16`` for bfloat16)."""
    qc = json.loads(Path(model_path, "config.json").read_text()).get("quantization_config")
    if qc:
        return "fp8-block" if qc.get("weight_block_size") else "fp8-per-tensor"
    return "fp8-online" if quantization else ("bf16" if dtype == "bfloat16" else dtype)


def decode_bytes_read(model, batch: int = 1) -> int:
    """Bytes of weights one decode step of ``batch`` requests reads."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    emb = model.embed_tokens.weight
    if model.lm_head is not None:  # untied: only the batch's rows of the embedding table are read
        total -= emb.numel() * emb.element_size() - batch * emb.shape[1] * emb.element_size()
    return total


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def run(args, git: dict, started: str, machine: dict) -> dict:
    from tandem.engine.quantization.gemm import choices

    device, cuda = args.device, args.device.startswith("cuda")
    vocab = json.loads(Path(args.model, "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)  # engine_bench's prompts: same seed, same order
    prompts = {b: [torch.randint(10, vocab, (args.input_len,), generator=g).tolist() for _ in range(b)]
               for b in args.batch_sizes}
    bandwidth = read_bandwidth(device)
    variants = []
    if args.compare_bf16:
        variants.append((args.model, None))
    variants.append((args.model, "fp8"))
    variants += [(path, None) for path in args.fp8_checkpoint]
    results = []
    for path, quantization in variants:
        name = layout_of(path, quantization, args.dtype)
        seen = len(choices())
        llm = LLM(path, device=device, dtype=args.dtype, quantization=quantization)
        eng = llm.engine
        rows = []
        for b in args.batch_sizes:
            t = run_tandem(llm, prompts[b], args.output_len, device)
            rows.append({"batch": b, "tok_s": t["tokens_per_s"], "seconds": t["seconds"]})
            print(f"{name:15s} batch {b:3d}: {t['tokens_per_s']:9.1f} tok/s", flush=True)
        step = decode_step_ms(llm, args.input_len, device)
        nbytes = decode_bytes_read(eng.model)
        roof = nbytes / bandwidth * 1e3 if bandwidth else None
        print(f"{name:15s} batch-1 step {step:.3f} ms" + (f"; reads {nbytes / 1e9:.2f} GB -> roofline {roof:.3f} ms "
                                                          f"({step / roof:.2f}x)" if roof else ""), flush=True)
        results.append({"variant": name, "model": str(Path(path).resolve()), "quantization": quantization,
                        "rows": rows, "decode_step_ms_batch1": step, "bytes_read_per_step": nbytes,
                        "roofline_ms": roof, "cuda_graph_max_bs": eng.cuda_graph_max_bs,
                        "kernels": choices()[seen:]})
        del llm, eng
        _free(cuda)
    if args.compare_bf16:  # ratios to the unquantized run (the first)
        base = {row["batch"]: row["tok_s"] for row in results[0]["rows"]}
        for r in results:
            for row in r["rows"]:
                row["vs_unquantized"] = round(row["tok_s"] / base[row["batch"]], 3)
    result = {
        "time": started, "git": git, "machine": machine, "phase": "fp8",
        "device_name": torch.cuda.get_device_name(0) if cuda else machine.get("cpu_model"),
        "shape": shape_of(args.model), "device": device, "dtype": args.dtype, "input_len": args.input_len,
        "output_len": args.output_len, "read_bandwidth_Bps": bandwidth, "variants": results,
    }
    result["gates"] = gates(result, args.gates, args.bf16_baseline)
    return result


def gates(r: dict, which: str | None, baseline_path: str | None) -> list[dict]:
    if which != "fp8":
        return []
    by = {v["variant"]: {row["batch"]: row for row in v["rows"]} for v in r["variants"]}
    out = []

    def ratio(variant, batch, want):
        row = by.get(variant, {}).get(batch)
        if row is None or "vs_unquantized" not in row:
            out.append({"target": f"{variant} batch {batch} >= {want}x bf16 tok/s (same run)", "value": None,
                        "met": None})
            return
        out.append({"target": f"{variant} batch {batch} >= {want}x bf16 tok/s (same run)",
                    "value": row["vs_unquantized"], "met": row["vs_unquantized"] >= want})

    ratio("fp8-online", 1, 1.4)
    ratio("fp8-online", 64, 1.3)
    ratio("fp8-block", 1, 1.3)
    if baseline_path and "bf16" in by:
        base = json.loads(Path(baseline_path).read_text())
        same_card = base.get("device_name") == r["device_name"]
        for row in base.get("rows", []):
            b, ours = row["batch"], by["bf16"].get(row["batch"])
            if ours is None or "tandem_tok_s" not in row:
                continue
            value = round(ours["tok_s"] / row["tandem_tok_s"], 3)
            out.append({"target": f"bf16 batch {b} >= 0.97x {Path(baseline_path).name} "
                                  f"({row['tandem_tok_s']:.1f} tok/s on {base.get('device_name')})",
                        "value": value if same_card else f"{value} (other card: not compared)",
                        "met": (value >= 0.97) if same_card else None})
    return out


def write_markdown(path: Path, r: dict) -> None:
    lines = [f"# engine_bench --quantization fp8: {r['shape'] or 'model'} on {r['device_name']}", "",
             written_by("benchmarks/engine_bench.py", r), "",
             f"{r['device']}/{r['dtype']}, prompt {r['input_len']}, output {r['output_len']}; each variant the "
             "engine's shipped defaults, warmed with an identical call, alone on the device, one after the other.", "",
             "| variant | batch | tok/s | vs the unquantized run |", "|---|---|---|---|"]
    for v in r["variants"]:
        for row in v["rows"]:
            lines.append(f"| {v['variant']} | {row['batch']} | {row['tok_s']:.1f} | "
                         f"{row.get('vs_unquantized', '')} |")
    lines += ["", "| variant | batch-1 step (ms) | bytes read per step (GB) | roofline (ms) | step / roofline |",
              "|---|---|---|---|---|"]
    for v in r["variants"]:
        roof = v["roofline_ms"]
        lines.append(f"| {v['variant']} | {v['decode_step_ms_batch1']:.3f} | {v['bytes_read_per_step'] / 1e9:.2f} | "
                     + (f"{roof:.3f} | {v['decode_step_ms_batch1'] / roof:.2f}x |" if roof else "| |"))
    if r["read_bandwidth_Bps"]:
        lines.append(f"\nRoofline = bytes read / {r['read_bandwidth_Bps'] / 1e12:.2f} TB/s HBM read bandwidth "
                     "measured in this run.")
    if r["gates"]:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {g['target']} | {g['value']} | {g['met']} |" for g in r["gates"]]
    path.write_text("\n".join(lines) + "\n")
