"""FP8 KV cache on one device: pool capacity and the long-context decode step, bf16 KV vs FP8 KV.

One run, one machine, one checkpoint (its weights in --dtype for both sides). Rounds alternate:
each round builds an engine with ``--kv-cache-dtype auto`` (the KV cache in --dtype), measures
it and frees it, then the same with ``--kv-cache-dtype fp8_e4m3`` (each engine alone on the
device, the engine's shipped defaults otherwise: --mem-fraction-static, page size, CUDA graphs
up to --batch). Per engine:

* pool: the tokens its KV pool holds (pages x page size);
* decode step: --batch requests whose prompts of --context tokens arrive as PD delivers them
  (``allocate_external``, their K/V pages written with random values as KV transfer would
  write them, ``activate_external``: no prefill is run), then --steps decode steps; the median
  engine step (wall clock, synchronised before and after, host work included) is the round's value.
  The FP8 engine keeps scale 1.0 (the random checkpoint has no scales): speed does not depend on it.

Then paged decode attention alone (the kernel, one layer, the same shape, bf16 and FP8 pools),
timed with CUDA events, with the K/V bytes it reads per second: where the step's time goes.

Targets (issue 31, ``--gates``): pool tokens FP8 / bf16 >= 1.9; decode step FP8 / bf16 <= 0.75,
the median of the rounds' medians for each side.

    python benchmarks/engine_bench.py --build llama8b_32k /tmp/llama8b_32k --no-tokenizer
    python benchmarks/kv_cache_bench.py --model /tmp/llama8b_32k --device cuda --dtype bfloat16 \\
        --gates --out benchmarks/results/gpu/kv_cache_llama8b_32k_h100.json
    python benchmarks/kv_cache_bench.py --context 480 --batch 2 --steps 6 --rounds 1   # CPU, demo model
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "libs"))
sys.path.insert(0, str(REPO))

from tandem.engine import LLM, SamplingParams, kv_quant  # noqa: E402

from benchmarks.common.results import command_line, git_info, machine_info, write_json, written_by  # noqa: E402
from benchmarks.common.shapes import shape_of  # noqa: E402

KV_SIDES = ("auto", "fp8_e4m3")
POOL_RATIO_TARGET = 1.9
STEP_RATIO_TARGET = 0.75
PATTERN_PAGES = 64  # random K/V pages, repeated over every allocated page


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def fill_pages(pool, pages: list[int], seed: int) -> None:
    """Random K/V values in ``pages`` of every layer, stored as the pool stores them (FP8 pools:
    quantized with the layer's scales), as KV transfer would have written them."""
    dev = pool.k_buffers[0].device
    g = torch.Generator(device=dev).manual_seed(seed)
    shape = (PATTERN_PAGES, pool.page_size, pool.num_kv_heads, pool.head_dim)
    idx = torch.tensor(pages, device=dev)
    pick = torch.arange(len(pages), device=dev) % PATTERN_PAGES
    k_scales, v_scales = pool.scales()
    for layer in range(pool.num_layers):
        for which, buffers in enumerate((pool.k_buffers, pool.v_buffers)):
            values = torch.randn(shape, generator=g, device=dev)
            if pool.is_fp8:
                scale = (k_scales, v_scales)[which][layer]
                values = kv_quant.quantize(values, scale, pool.dtype)
            else:
                values = values.to(pool.dtype)
            kv_quant.raw(buffers[layer])[idx] = kv_quant.raw(values)[pick]


def decode_steps_ms(llm: LLM, batch: int, context: int, steps: int, device: str, seed: int) -> list[float]:
    """Engine step times (ms) of ``steps`` decode steps of ``batch`` requests at ``context`` tokens."""
    eng = llm.engine
    g = torch.Generator().manual_seed(seed)
    vocab = eng.model_config.vocab_size
    prompt_len = context - steps - 2
    sp = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    rids, pages = [], []
    for _ in range(batch):
        alloc = eng.allocate_external(torch.randint(10, vocab, (prompt_len,), generator=g).tolist(), sp)
        rids.append(alloc.rid)
        pages += alloc.page_indices
    fill_pages(eng.pool, pages, seed)
    sync(device)
    for rid in rids:
        eng.activate_external(rid, first_token_id=int(torch.randint(10, vocab, (1,), generator=g)))
    times = []
    while eng.has_work():
        sync(device)
        t0 = time.perf_counter()
        eng.step()
        sync(device)
        if eng.stats().step_kind == "decode":
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def engine_round(args, kv: str, seed: int) -> dict:
    kw = dict(device=args.device, dtype=args.dtype, kv_cache_dtype=kv, cuda_graph_max_bs=args.batch,
              max_running_requests=max(args.batch, 8))
    if args.max_total_tokens:
        kw["max_total_tokens"] = args.max_total_tokens
    t0 = time.perf_counter()
    llm = LLM(args.model, **kw)
    load_s = time.perf_counter() - t0
    pool = llm.engine.pool
    tokens = pool.num_pages * pool.page_size
    times = decode_steps_ms(llm, args.batch, args.context, args.steps, args.device, seed)
    warm = times[2:]  # the first steps after activation also copy the new requests' state
    row = {"kv_cache_dtype": kv, "pool_dtype": str(pool.dtype).removeprefix("torch."), "pool_tokens": tokens,
           "page_size": pool.page_size, "decode_step_ms_median": statistics.median(warm),
           "decode_step_ms_min": min(warm), "steps_timed": len(warm), "engine_load_s": round(load_s, 1),
           "cuda_graph_max_bs": llm.engine.cuda_graph_max_bs, "attention_backend": llm.engine.attention_backend}
    del llm, pool
    release(args.device)
    return row


def kernel_rows(args, heads: int, kv_heads: int, head_dim: int, page_size: int) -> list[dict]:
    """Paged decode attention alone, one layer: bf16 vs FP8 pool, time and K/V read bandwidth."""
    from tandem.engine.kernels import decode_attention, default_num_splits

    dev = args.device
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    B, C = args.batch, args.context
    pages_per = -(-C // page_size)
    table = torch.arange(B * pages_per, device=dev, dtype=torch.int32).view(B, pages_per)
    seq = torch.full((B,), C, device=dev, dtype=torch.int32)
    q = torch.randn(B, heads, head_dim, device=dev, dtype=torch.bfloat16)
    splits = default_num_splits(B, kv_heads, sms)
    rows = []
    # The engine's choice (decode_attention.BLOCK_N context tokens per iteration), and for FP8
    # pools twice as many (the same bytes per iteration as bf16): data for the next tuning step.
    variants = [(torch.bfloat16, decode_attention.BLOCK_N), (torch.float8_e4m3fn, decode_attention.BLOCK_N),
                (torch.float8_e4m3fn, 2 * decode_attention.BLOCK_N)]
    for kv_dtype, block_n in variants:
        shape = (B * pages_per, page_size, kv_heads, head_dim)
        kc = torch.randn(shape, device=dev, dtype=torch.bfloat16).to(kv_dtype)
        vc = torch.randn(shape, device=dev, dtype=torch.bfloat16).to(kv_dtype)
        scale = torch.ones(2, device=dev) if kv_dtype != torch.bfloat16 else None

        def run(kc=kc, vc=vc, scale=scale, block_n=block_n):
            decode_attention.paged_decode_attention(q, kc, vc, table, seq, head_dim**-0.5, splits, kv_scale=scale,
                                                    block_n=block_n)

        for _ in range(3):
            run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            run()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 20
        nbytes = 2 * B * C * kv_heads * head_dim * kc.element_size()
        rows.append({"kv_dtype": str(kv_dtype).removeprefix("torch."), "block_n": block_n, "ms": round(ms, 4),
                     "kv_bytes": nbytes, "gb_per_s": round(nbytes / ms / 1e6, 1), "splits": splits,
                     "engine_default": block_n == decode_attention.BLOCK_N})
        print(f"paged decode attention, one layer, batch {B} x {C} tokens, {rows[-1]['kv_dtype']}, block_n {block_n}: "
              f"{ms:.3f} ms, {rows[-1]['gb_per_s']} GB/s of K/V", flush=True)
        del kc, vc
        release(dev)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "tandem-demo-dense"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="weights (and the KV cache of the auto side)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768, help="tokens of context per request during decode")
    ap.add_argument("--steps", type=int, default=40, help="decode steps per engine (the first 2 are not timed)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (auto, fp8_e4m3)")
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="pool size for both sides (default: the engine's own sizing, which the pool gate reads)")
    ap.add_argument("--gates", action="store_true", help="evaluate issue 31's targets")
    ap.add_argument("--out", default=None, help="write JSON results here (and a .md next to it)")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    git = git_info()  # read at start: the tree the numbers come from
    command = command_line(argv)
    if not Path(args.model, "config.json").is_file():
        from deploy.demo_models import build_all

        build_all(str(REPO / "models"))
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    rounds = []
    for r in range(args.rounds):
        pair = {}
        for kv in KV_SIDES:
            pair[kv] = engine_round(args, kv, seed=r)
            print(f"round {r + 1}: {kv:9s} pool {pair[kv]['pool_tokens']} tokens, decode step "
                  f"{pair[kv]['decode_step_ms_median']:.3f} ms (median of {pair[kv]['steps_timed']})", flush=True)
        rounds.append(pair)
    median = {kv: statistics.median(p[kv]["decode_step_ms_median"] for p in rounds) for kv in KV_SIDES}
    pool_ratio = rounds[0]["fp8_e4m3"]["pool_tokens"] / rounds[0]["auto"]["pool_tokens"]
    step_ratio = median["fp8_e4m3"] / median["auto"]
    print(f"pool tokens fp8 / {args.dtype}: {pool_ratio:.3f}; decode step fp8 / {args.dtype}: {step_ratio:.3f} "
          f"({median['fp8_e4m3']:.3f} / {median['auto']:.3f} ms, median of {args.rounds} rounds)")
    kernels = []
    if cuda:
        from tandem.engine.model_config import ModelConfig

        mc = ModelConfig.from_dir(args.model)
        kernels = kernel_rows(args, mc.num_heads, mc.num_kv_heads, mc.head_dim, rounds[0]["auto"]["page_size"])
    gates = []
    if args.gates:
        gates = [{"target": f"pool tokens fp8_e4m3 / bf16 KV >= {POOL_RATIO_TARGET}", "value": round(pool_ratio, 3),
                  "met": pool_ratio >= POOL_RATIO_TARGET},
                 {"target": f"decode step at {args.context} context, batch {args.batch}: fp8_e4m3 / bf16 KV <= "
                            f"{STEP_RATIO_TARGET} (median of {args.rounds} alternating rounds)",
                  "value": round(step_ratio, 3), "met": step_ratio <= STEP_RATIO_TARGET}]
        for g in gates:
            print(f"target: {g['target']}: {g['value']} -> {'MET' if g['met'] else 'NOT MET'}")
    else:
        print("targets: none evaluated (--gates evaluates issue 31's, meant for the 32k Llama-3-8B shape on a GPU)")
    if args.out:
        result = {"time": started, "command": command, "git": git, "machine": machine_info(),
                  "device_name": torch.cuda.get_device_name(0) if cuda else machine_info()["cpu_model"],
                  "model": str(Path(args.model).resolve()), "shape": shape_of(args.model), "device": args.device,
                  "dtype": args.dtype, "batch": args.batch, "context": args.context, "steps": args.steps,
                  "rounds": rounds, "median_step_ms": median, "pool_ratio": pool_ratio, "step_ratio": step_ratio,
                  "kernel": kernels, "gates": gates}
        out = Path(args.out)
        write_json(out, result)
        write_markdown(out.with_suffix(".md"), result)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def write_markdown(path: Path, r: dict) -> None:
    lines = [f"# kv_cache_bench: {Path(r['model']).name} on {r['device_name']}", "", written_by("benchmarks/kv_cache_bench.py", r), "",
             f"Weights {r['dtype']}; decode of batch {r['batch']} at {r['context']} tokens of context, "
             f"{r['steps']} steps per engine; {len(r['rounds'])} alternating rounds, one engine at a time.", "",
             "| round | KV cache | pool tokens | decode step median (ms) |", "|---|---|---|---|"]
    for i, pair in enumerate(r["rounds"]):
        for kv, row in pair.items():
            lines.append(f"| {i + 1} | {kv} ({row['pool_dtype']}) | {row['pool_tokens']} | "
                         f"{row['decode_step_ms_median']:.3f} |")
    lines += ["", f"Pool tokens FP8 / {r['dtype']}: {r['pool_ratio']:.3f}; decode step FP8 / {r['dtype']}: "
              f"{r['step_ratio']:.3f} (medians of the rounds)."]
    if r["kernel"]:
        lines += ["", "| paged decode attention, one layer | block_n | ms | K/V GB/s |", "|---|---|---|---|"]
        lines += [f"| {k['kv_dtype']}{' (engine)' if k['engine_default'] else ''} | {k['block_n']} | {k['ms']} | "
                  f"{k['gb_per_s']} |" for k in r["kernel"]]
    if r["gates"]:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {g['target']} | {g['value']} | {'yes' if g['met'] else '**no**'} |" for g in r["gates"]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
