"""Engine throughput: tandem (continuous batching, paged KV) vs transformers `generate`.

One run, same machine, same requests (random prompt ids, fixed lengths, greedy,
ignore_eos so every request produces exactly --output-len tokens):

* tandem: all requests of a batch submitted at once to ``LLM.generate``.
* transformers: ``--hf-mode sequential`` runs them one by one (the CPU baseline of
  the issue); ``batched`` runs them as one ``generate`` batch (the GPU comparison).

Also prints the batch-1 decode step time against the weight-bytes / HBM-bandwidth
bound (meaningful on GPU). Examples::

    python benchmarks/engine_bench.py                                   # CPU, demo dense model, batch 16
    python benchmarks/engine_bench.py --build-qwen05b models/qwen05b    # build the ~0.5B bf16 checkpoint
    python benchmarks/engine_bench.py --model models/qwen05b --device cuda --dtype bfloat16 \
        --batch-sizes 1 16 64 --hf-mode batched
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "libs"))

from tandem.engine import LLM, SamplingParams  # noqa: E402


def build_qwen05b(out: str, seed: int = 0) -> str:
    """A Qwen2-0.5B-shaped checkpoint (494M params, bf16, random weights) + the demo tokenizer."""
    from tandem.engine.demo_models import build_all
    from transformers import AutoModelForCausalLM, Qwen2Config

    if os.path.isfile(os.path.join(out, "config.json")):
        print(f"{out}: exists")
        return out
    demo = build_all(os.path.join(REPO, "models"))["tandem-demo-dense"]
    cfg = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        eos_token_id=2, bos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(demo, name), "rb") as src, open(os.path.join(out, name), "wb") as dst:
            dst.write(src.read())
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: built {n / 1e6:.0f}M params (bf16)")
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def bench_tandem(llm: LLM, prompts: list, out_len: int, device: str) -> dict:
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.engine.flush_cache()
    sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    sync(device)
    dt = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    return {"seconds": dt, "output_tokens": n, "tokens_per_s": n / dt}


def bench_hf(model, prompts: list, out_len: int, device: str, mode: str) -> dict:
    groups = [prompts] if mode == "batched" else [[p] for p in prompts]
    sync(device)
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for g in groups:
            ids = torch.tensor(g, device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len,
                                 min_new_tokens=out_len, do_sample=False, pad_token_id=0)
            n += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    sync(device)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "output_tokens": n, "tokens_per_s": n / dt}


def decode_step_time(llm: LLM, in_len: int, device: str, steps: int = 32) -> float:
    eng = llm.engine
    eng.flush_cache()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, eng.model_config.vocab_size, (in_len,), generator=g).tolist()
    rid = eng.add_request(prompt, SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
    times = []
    done = False
    while not done:
        sync(device)
        t0 = time.perf_counter()
        outs = eng.step()
        sync(device)
        if eng.stats().step_kind == "decode":
            times.append(time.perf_counter() - t0)
        done = any(o.rid == rid and o.finished for o in outs)
    times = sorted(times[2:])  # drop warm-up steps
    return times[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(REPO, "models", "tandem-demo-dense"))
    ap.add_argument("--build-qwen05b", metavar="DIR", help="build a ~0.5B Qwen2-shaped bf16 checkpoint into DIR")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=None, help="default 16 on CPU, 128 on CUDA")
    ap.add_argument("--hf-mode", choices=["sequential", "batched"], default=None,
                    help="transformers baseline: one by one (CPU default) or one batch (CUDA default)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="HBM bytes/s for the bound (H100 SXM)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", default=None, help="write JSON results here (and a .md next to it)")
    args = ap.parse_args(argv)

    if args.build_qwen05b:
        build_qwen05b(args.build_qwen05b)
        if args.model == ap.get_default("model"):
            return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.model):
        from tandem.engine.demo_models import build_all

        build_all(os.path.join(REPO, "models"))
    cuda = args.device.startswith("cuda")
    page_size = args.page_size or (128 if cuda else 16)
    hf_mode = args.hf_mode or ("batched" if cuda else "sequential")
    max_b = max(args.batch_sizes)
    total_tokens = max_b * (args.input_len + args.output_len) + 4 * page_size * max_b
    llm = LLM(args.model, device=args.device, dtype=args.dtype, page_size=page_size,
              max_total_tokens=total_tokens, max_running_requests=max(max_b, 1),
              chunked_prefill_size=max(2048, args.input_len), max_prefill_tokens=max(8192, args.input_len))
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=llm.engine.dtype).to(args.device).eval()

    g = torch.Generator().manual_seed(0)
    vocab = llm.engine.model_config.vocab_size
    # warm-up (allocator, kernels) for both
    warm = [torch.randint(10, vocab, (args.input_len,), generator=g).tolist() for _ in range(2)]
    bench_tandem(llm, warm, 4, args.device)
    if hf is not None:
        bench_hf(hf, warm[:1], 4, args.device, "sequential")

    rows = []
    for b in args.batch_sizes:
        prompts = [torch.randint(10, vocab, (args.input_len,), generator=g).tolist() for _ in range(b)]
        t = bench_tandem(llm, prompts, args.output_len, args.device)
        row = {"batch": b, "tandem_tok_s": t["tokens_per_s"], "tandem_s": t["seconds"]}
        if hf is not None:
            h = bench_hf(hf, prompts, args.output_len, args.device, hf_mode)
            row.update(hf_tok_s=h["tokens_per_s"], hf_s=h["seconds"], ratio=t["tokens_per_s"] / h["tokens_per_s"])
        rows.append(row)
        print(f"batch {b:3d}: tandem {t['tokens_per_s']:9.1f} tok/s"
              + (f" | transformers ({hf_mode}) {row['hf_tok_s']:9.1f} tok/s | ratio {row['ratio']:.2f}x"
                 if hf is not None else ""), flush=True)

    step = decode_step_time(llm, args.input_len, args.device)
    bound = weight_bytes / args.bandwidth
    print(f"batch-1 decode step: {step * 1e3:.2f} ms; weights {weight_bytes / 1e6:.1f} MB / "
          f"{args.bandwidth:.3g} B/s = {bound * 1e3:.3f} ms bound ({bound / step * 100:.1f}% of bound)")
    result = {
        "machine": machine(), "model": os.path.abspath(args.model), "device": args.device, "dtype": args.dtype,
        "input_len": args.input_len, "output_len": args.output_len, "page_size": page_size,
        "hf_mode": hf_mode, "rows": rows, "decode_step_ms_batch1": step * 1e3,
        "weight_bytes": weight_bytes, "bandwidth_Bps": args.bandwidth, "bound_ms": bound * 1e3,
        "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        md = os.path.splitext(args.out)[0] + ".md"
        with open(md, "w") as f:
            f.write(f"# engine_bench ({result['time']}, commit {result['git_commit']})\n\n")
            f.write(f"Machine: {result['machine']}  \nModel: `{args.model}` ({weight_bytes / 1e6:.1f} MB weights), "
                    f"{args.device}/{args.dtype}, prompt {args.input_len}, output {args.output_len}, "
                    f"page size {page_size}\n\n")
            f.write(f"| batch | tandem tok/s | transformers ({hf_mode}) tok/s | ratio |\n|---|---|---|---|\n")
            for r in rows:
                f.write(f"| {r['batch']} | {r['tandem_tok_s']:.1f} | {r.get('hf_tok_s', float('nan')):.1f} | "
                        f"{r.get('ratio', float('nan')):.2f}x |\n")
            f.write(f"\nBatch-1 decode step: {step * 1e3:.2f} ms; weight-bytes/bandwidth bound "
                    f"{bound * 1e3:.3f} ms at {args.bandwidth:.3g} B/s.\n")
        print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
