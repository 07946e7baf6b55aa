"""The embedding phase of engine_bench (``engine_bench.py --embedding``): inputs/s vs transformers.

The same batch of random token-id inputs through both, each warmed with an identical call and
timed best of three (wall clock, device synchronised), in two length cases:

* ``uniform``: every input --embedding-max-len tokens (default 512), no padding anywhere;
* ``mixed``: lengths uniform in [--embedding-min-len, --embedding-max-len] (default [32, 512]).

tandem: ``EngineCore(model, is_embedding=True)`` with the engine's shipped defaults (packed passes
of --chunked-prefill-size tokens, no padding), last-token pooling + normalisation, the vectors
on the host. transformers: ``AutoModel`` with SDPA, one padded forward pass of the whole batch
(right padding, attention mask), the last real token's hidden state normalised, on the host.
transformers runs first and is freed before tandem loads, so each has the whole device.

With ``--shape`` (e.g. ``qwen3-embedding-0.6b``) both use random weights of the shape (tandem
``--load-format dummy``, transformers ``from_config``): the numbers are throughput only. On the
demo checkpoint (weights on disk) the vectors are also compared (max abs difference printed).

Targets (``--gates embedding``): uniform >= 1.1x transformers, mixed >= 2x.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tandem.engine import EngineCore

from benchmarks.common.engine import release_memory, sync, timed
from benchmarks.common.results import written_by
from benchmarks.common.shapes import hf_config, shape_of

GATES = {"uniform": 1.1, "mixed": 2.0}


def make_inputs(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> dict[str, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    mixed_lens = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return {"uniform": [torch.randint(10, vocab, (max_len,), generator=g).tolist() for _ in range(n)],
            "mixed": [torch.randint(10, vocab, (k,), generator=g).tolist() for k in mixed_lens]}


def best_of(fn, device: str, repeats: int = 3) -> float:
    fn()  # identical warm-up call
    return min(timed(fn, device) for _ in range(repeats))


def hf_embed(model, inputs: list[list[int]], device: str) -> torch.Tensor:
    """One padded SDPA forward of the batch; last real token, normalised, on the host."""
    lens = torch.tensor([len(x) for x in inputs], device=device)
    width = int(lens.max())
    ids = torch.zeros(len(inputs), width, dtype=torch.long)
    for i, x in enumerate(inputs):
        ids[i, :len(x)] = torch.tensor(x)
    ids = ids.to(device)
    mask = (torch.arange(width, device=device)[None, :] < lens[:, None]).long()
    with torch.inference_mode():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = h[torch.arange(len(inputs), device=device), lens - 1]
        return F.normalize(last.float(), dim=-1).cpu()


def run(args, git: dict, started: str, machine: dict) -> dict:
    cuda = args.device.startswith("cuda")
    load_format = "dummy" if args.shape else (args.load_format or "auto")
    dtype = getattr(torch, args.dtype)
    cfg = json.loads(Path(args.model, "config.json").read_text())
    inputs = make_inputs(args.embedding_batch, args.embedding_min_len, args.embedding_max_len, cfg["vocab_size"])
    rows = {case: {"case": case, "inputs": len(x), "tokens": sum(map(len, x)),
                   "padded_tokens": len(x) * max(map(len, x))} for case, x in inputs.items()}
    ref = {}
    if not args.no_hf:
        from transformers import AutoModel

        if load_format == "dummy":
            with torch.device(args.device):
                hf = AutoModel.from_config(hf_config(shape_of(args.model)), dtype=dtype,
                                           attn_implementation="sdpa").eval()
        else:
            hf = AutoModel.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(args.device).eval()
        for case, x in inputs.items():
            dt = best_of(lambda x=x, case=case: ref.__setitem__(case, hf_embed(hf, x, args.device)), args.device)
            rows[case].update(hf_s=dt, hf_inputs_s=len(x) / dt)
            print(f"{case:8s}: transformers (SDPA, padded batch) {len(x) / dt:9.1f} inputs/s", flush=True)
        del hf
        release_memory(cuda)

    engine = EngineCore(args.model, is_embedding=True, device=args.device, dtype=args.dtype, load_format=load_format)
    for case, x in inputs.items():
        before = engine.embedder.passes
        outs = []
        dt = best_of(lambda x=x, outs=outs: outs.append(engine.embed(x)), args.device)
        row = rows[case]
        row.update(tandem_s=dt, tandem_inputs_s=len(x) / dt, passes_per_call=(engine.embedder.passes - before) // 4)
        if "hf_inputs_s" in row:
            row["ratio"] = row["tandem_inputs_s"] / row["hf_inputs_s"]
            if load_format != "dummy":  # the same weights: the vectors must agree
                row["max_abs_diff_vs_hf"] = float((outs[-1].vectors - ref[case]).abs().max())
        print(f"{case:8s}: tandem {len(x) / dt:9.1f} inputs/s ({row['passes_per_call']} passes per call)"
              + (f" | ratio {row['ratio']:.2f}x" if "ratio" in row else "")
              + (f" | max |diff| vs transformers {row['max_abs_diff_vs_hf']:.2e}" if "max_abs_diff_vs_hf" in row
                 else ""), flush=True)
    sync(args.device)
    result = {
        "time": started, "git": git, "machine": machine,
        "device_name": torch.cuda.get_device_name(0) if cuda else machine.get("cpu_model"),
        "model": str(Path(args.model).resolve()), "shape": shape_of(args.model), "device": args.device,
        "dtype": args.dtype, "load_format": load_format, "batch": args.embedding_batch,
        "lengths": [args.embedding_min_len, args.embedding_max_len],
        "engine": {"attention_backend": engine.attention_backend, "page_size": engine.page_size,
                   "chunked_prefill_size": engine.chunked_prefill_size, "pooling": engine.embedder.pooling.method,
                   "normalize": engine.embedder.pooling.normalize, "torch_threads": torch.get_num_threads()},
        "rows": list(rows.values()), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    result["gates"] = [{"target": f"{case}: tandem >= {want}x transformers (SDPA, same batch)",
                        "value": round(rows[case]["ratio"], 2), "met": rows[case]["ratio"] >= want}
                       for case, want in GATES.items() if args.gates == "embedding" and "ratio" in rows[case]]
    return result


def write_markdown(path: Path, r: dict) -> None:
    lines = [f"# engine_bench --embedding: {Path(r['model']).name} on {r['device_name']}", "",
             written_by("benchmarks/engine_bench.py --embedding", r), "",
             f"{r['device']}/{r['dtype']}, load format {r['load_format']}, batch {r['batch']}, lengths "
             f"{r['lengths'][0]}..{r['lengths'][1]}; tandem: engine defaults ({r['engine']}); transformers: "
             "AutoModel SDPA, one padded forward of the batch. Best of 3 after an identical warm-up call.", "",
             "| case | tokens | padded tokens | tandem inputs/s | transformers inputs/s | ratio |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['case']} | {row['tokens']} | {row['padded_tokens']} | {row['tandem_inputs_s']:.1f} | "
                     f"{row.get('hf_inputs_s', float('nan')):.1f} | {row.get('ratio', float('nan')):.2f}x |")
    if r["gates"]:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {g['target']} | {g['value']} | {'yes' if g['met'] else '**no**'} |" for g in r["gates"]]
    path.write_text("\n".join(lines) + "\n")
