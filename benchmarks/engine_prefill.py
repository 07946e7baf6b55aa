"""The prefill phase of engine_bench (``engine_bench.py --phase prefill``): TTFT and MFU.

For each prompt length (default 2k and 8k): TTFT of one request through tandem (a whole
``generate`` with one output token, prefix cache flushed) and through ``transformers``
(one forward pass with SDPA, the logits of the last token), each warmed with an identical
call, best of three (``--rounds N``: both loaded, N rounds alternating the order, each a best of
three; the gate is judged on the median of the per-round ratios). MFU = (2*N*T + 2*L*H*D*sum(c_i)) / (TTFT * peak), where N counts the
non-embedding parameters, T the prompt tokens, L the layers, H*D the attention width and
c_i = i + 1 the keys token i attends to; every term is printed. Then the prefix cache: a
request that shares a 7k-token prefix with an earlier one and brings 1k new tokens,
against the same request with the cache flushed.
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch
from tandem.engine import LLM, SamplingParams

from benchmarks.common.engine import alternate_rounds, round_ratios, spread, sync, timed
from benchmarks.common.shapes import shape_of

PEAK_BF16 = {"H200": 989e12, "H100": 989e12}


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def best_of(fn, device: str, repeats: int = 3) -> float:
    fn()  # identical warm-up call
    return min(timed(fn, device) for _ in range(repeats))


def flops_terms(cfg: dict, tokens: int, non_embedding_params: int) -> dict:
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    keys = tokens * (tokens + 1) // 2  # sum over i of c_i, causal
    dense = 2 * non_embedding_params * tokens
    attention = 2 * layers * heads * head_dim * keys
    return {"N": non_embedding_params, "T": tokens, "L": layers, "HD": heads * head_dim, "sum_c": keys,
            "dense_flops": dense, "attention_flops": attention, "total_flops": dense + attention}


def run(args, git: dict, started: str, machine: dict) -> dict:
    device = args.device
    cfg = json.loads(Path(args.model, "config.json").read_text())
    vocab = cfg["vocab_size"]
    g = torch.Generator().manual_seed(0)
    lengths = args.prefill_lengths
    prompts = {n: torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths}
    rows = {n: {"tokens": n} for n in lengths}
    rounds = args.rounds
    hf = None

    def hf_ttft(n):
        ids = torch.tensor([prompts[n]], device=device)
        with torch.inference_mode():
            return best_of(lambda: hf(ids, logits_to_keep=1), device)

    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                  attn_implementation="sdpa").to(device).eval()
        if rounds == 1:  # one round: transformers first, freed before tandem loads
            for n in lengths:
                rows[n]["hf_ttft_s"] = hf_ttft(n)
                print(f"prompt {n}: transformers (SDPA) TTFT {rows[n]['hf_ttft_s'] * 1e3:.1f} ms", flush=True)
            hf = None
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    # An n-token prompt plus its one output token needs a context of n + 1: with a model whose
    # max_position_embeddings is exactly 8192 the 8k row would be refused, so the context is
    # raised to fit (SGLang's --context-length does the same) and recorded in the results.
    longest = max(max(lengths), sum(args.prefix_tokens))  # the prefix case: shared + new tokens
    context_length = max(cfg.get("max_position_embeddings", 0), longest + 1)
    # With transformers loaded next to it (--rounds > 1), a fixed KV pool: the longest case twice.
    pool = {"max_total_tokens": max(16384, 2 * (longest + 1))} if hf is not None else {}
    llm = LLM(args.model, device=device, dtype=args.dtype, context_length=context_length, **pool)
    eng = llm.engine
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    embed = sum(p.numel() for name, p in eng.model.named_parameters() if "embed_tokens" in name or "lm_head" in name)
    non_embedding = sum(p.numel() for p in eng.model.parameters()) - embed
    peak = peak_flops(device)

    def ttft(prompt, flush=True):
        def call():
            if flush:
                eng.flush_cache()
            llm.generate([prompt], one)
        return call

    for n in lengths:
        row = rows[n]
        if hf is not None:  # --rounds > 1: transformers and tandem alternate, each round best of three
            sides = alternate_rounds({"hf": lambda n=n: hf_ttft(n),
                                      "tandem": lambda n=n: best_of(ttft(prompts[n]), device)}, rounds)
            ratio = round_ratios(sides["tandem"], sides["hf"])
            row.update(hf_ttft_s=spread(sides["hf"])["median"], hf_ttft_s_rounds=spread(sides["hf"]),
                       tandem_ttft_s=spread(sides["tandem"])["median"], tandem_ttft_s_rounds=spread(sides["tandem"]),
                       ttft_ratio=ratio["median"], ttft_ratio_rounds=ratio)
            print(f"prompt {n}: transformers (SDPA) TTFT {row['hf_ttft_s'] * 1e3:.1f} ms, tandem / transformers "
                  f"{ratio['median']:.3f} ({ratio['min']:.3f}..{ratio['max']:.3f} over {rounds} rounds)", flush=True)
        else:
            row["tandem_ttft_s"] = best_of(ttft(prompts[n]), device)
        row.update(flops_terms(cfg, n, non_embedding))
        row["tflops_per_s"] = row["total_flops"] / row["tandem_ttft_s"] / 1e12
        if peak:
            row["mfu"] = row["total_flops"] / (row["tandem_ttft_s"] * peak)
        print(f"prompt {n}: tandem TTFT {row['tandem_ttft_s'] * 1e3:.1f} ms; 2*N*T = 2*{non_embedding}*{n} = "
              f"{row['dense_flops']:.4g}, 2*L*H*D*sum(c) = 2*{row['L']}*{row['HD']}*{row['sum_c']} = "
              f"{row['attention_flops']:.4g}, {row['tflops_per_s']:.1f} TFLOP/s"
              + (f", MFU {row['mfu'] * 100:.1f}% of {peak / 1e12:.0f} TFLOPS" if peak else ""), flush=True)

    prefix_len, new_len = args.prefix_tokens
    base = torch.randint(10, vocab, (prefix_len + 2 * new_len,), generator=g).tolist()
    first = base[:prefix_len + new_len]
    second = base[:prefix_len] + base[prefix_len + new_len:]
    uncached = best_of(ttft(second), device)

    def cached_call():
        eng.flush_cache()
        llm.generate([first], one)  # puts the shared prefix in the cache
        sync(device)
        t0 = time.perf_counter()
        llm.generate([second], one)
        sync(device)
        return time.perf_counter() - t0

    cached_call()
    cached = min(cached_call() for _ in range(3))
    prefix = {"prefix_tokens": prefix_len, "new_tokens": new_len, "uncached_ttft_s": uncached,
              "cached_ttft_s": cached, "ratio": cached / uncached}
    print(f"shared {prefix_len}-token prefix + {new_len} new: TTFT {cached * 1e3:.1f} ms cached vs "
          f"{uncached * 1e3:.1f} ms uncached ({prefix['ratio']:.2f}x)")
    result = {"time": started, "git": git, "machine": machine, "phase": "prefill", "model": args.model,
              "rounds": rounds,
              "shape": shape_of(args.model), "device": device, "dtype": args.dtype,
              "engine": {"attention_backend": eng.attention_backend, "chunked_prefill_size": eng.chunked_prefill_size,
                         "page_size": eng.page_size, "context_length": eng.context_length},
              "peak_flops": peak, "rows": list(rows.values()), "prefix_cache": prefix}
    result["gates"] = gates(result) if args.gates == "gpu-part2" else []
    return result


def gates(r: dict) -> list[dict]:
    out = []
    rows = {row["tokens"]: row for row in r["rows"]}
    if 8192 in rows and "mfu" in rows[8192]:
        out.append({"target": "MFU at an 8k prompt >= 45%", "value": round(rows[8192]["mfu"], 3),
                    "met": rows[8192]["mfu"] >= 0.45})
    for n in (2048, 8192):
        row = rows.get(n, {})
        if "ttft_ratio" in row:  # --rounds > 1: the median of the per-round ratios
            rr = row["ttft_ratio_rounds"]
            out.append({"target": f"TTFT at {n} <= transformers (SDPA)", "value":
                        f"{row['tandem_ttft_s'] * 1e3:.1f} vs {row['hf_ttft_s'] * 1e3:.1f} ms, ratio "
                        f"{row['ttft_ratio']:.3f} ({rr['min']:.3f}..{rr['max']:.3f} over {rr['rounds']} rounds)",
                        "met": row["ttft_ratio"] <= 1.0})
        elif "hf_ttft_s" in row:
            out.append({"target": f"TTFT at {n} <= transformers (SDPA)", "value":
                        f"{row['tandem_ttft_s'] * 1e3:.1f} vs {row['hf_ttft_s'] * 1e3:.1f} ms",
                        "met": row["tandem_ttft_s"] <= row["hf_ttft_s"]})
    p = r["prefix_cache"]
    out.append({"target": "cached 7k prefix + 1k new: TTFT <= 0.2x uncached", "value": round(p["ratio"], 3),
                "met": p["ratio"] <= 0.2})
    return out
