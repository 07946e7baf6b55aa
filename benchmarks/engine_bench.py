"""Engine throughput: tandem vs transformers `generate`, and decode against the memory roofline.

One run, one machine, the same requests for both (random prompt ids, fixed lengths,
greedy, every request produces exactly --output-len tokens), each side warmed with an
identical call first and then timed over whole `generate` calls (wall clock):

* tandem: ``LLM(model, device=..., dtype=...)`` with the engine's shipped defaults (no
  other option is passed); all requests of a batch submitted at once.
* transformers: one batched ``generate`` of the same batch with the static cache
  (``cache_implementation="static"``), on CPU as on CUDA (``--hf-mode sequential``: one
  request at a time, which is not a like-for-like comparison).
  transformers runs first and is freed before tandem loads, so each has the whole device.

Roofline: weight bytes / HBM read bandwidth measured in the same run (a read-only sum over
a large buffer); a decode step cannot be faster. The batch-1 decode step is the median
engine step (wall clock, host work included). Targets (``--gates``) are printed met or not.

    python benchmarks/engine_bench.py                                    # CPU, demo dense model, batch 16
    python benchmarks/engine_bench.py --build qwen05b /tmp/qwen05b       # random-weight checkpoints:
    python benchmarks/engine_bench.py --build llama8b /tmp/llama8b       #   Qwen2-0.5B / Llama-3-8B shapes
    python benchmarks/engine_bench.py --build llama8b_32k /tmp/llama8b_32k  # 32k positions, Llama-3.1 rope
    python benchmarks/engine_bench.py --model /tmp/qwen05b --device cuda --dtype bfloat16 \\
        --batch-sizes 1 16 64 --gates gpu-part1 --out benchmarks/results/gpu/engine_bench_qwen05b_h200.json
    python benchmarks/engine_bench.py --phase prefill --model /tmp/llama8b --device cuda --dtype bfloat16 \\
        --gates gpu-part2 --out benchmarks/results/gpu/engine_prefill_llama8b_h200.json
    python benchmarks/engine_bench.py --shape qwen3moe-30b-a3b --device cuda --dtype bfloat16 \\
        --batch-sizes 1 64 --output-len 32 --gates gpu-moe --out benchmarks/results/gpu/engine_bench_qwen3moe_h100.json
    python benchmarks/engine_bench.py --tp-size 2 --out benchmarks/results/engine_tp2_cpu.json   # engine_tp.py

``--shape NAME`` runs a shape of ``benchmarks/common/shapes.py`` without its weights: tandem with
``--load-format dummy`` (random weights made on the device from config.json alone) and transformers
built by ``from_config`` on the device. A MoE model also gets ``benchmarks/common/moe.py``'s
section: the roofline of the bytes a step reads (non-expert weights + the distinct experts hit,
coverage measured with the recorder), decode steps at every batch size, and EPLB with
``--ep-num-redundant-experts 4`` (recorder on vs off, graph replays vs eager steps, a plan applied
between replays); ``--gates gpu-moe`` evaluates the MoE targets.

    python benchmarks/engine_bench.py --embedding --shape qwen3-embedding-0.6b --device cuda --dtype bfloat16 \\
        --embedding-batch 128 --gates embedding --out benchmarks/results/gpu/engine_embedding_qwen3emb06b.json

    python benchmarks/engine_bench.py --model /tmp/llama8b --device cuda --dtype bfloat16 --batch-sizes 1 64 \\
        --output-len 64 --quantization fp8 --compare-bf16 --fp8-checkpoint /tmp/llama8b-fp8-block --gates fp8 \\
        --out benchmarks/results/gpu/engine_fp8_llama8b.json           # engine_fp8.py

``--lora`` measures LoRA adapters against the base model (``engine_lora.py``; its targets: a batch
of 64 mixing 4 rank-16 adapters >= 0.85x base tok/s, batch 1 >= 0.9x):

    python benchmarks/engine_bench.py --lora --shape llama8b --device cuda --dtype bfloat16 --batch-sizes 1 64 \\
        --input-len 128 --output-len 64 --out benchmarks/results/gpu/engine_lora_llama8b.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "libs"))
sys.path.insert(0, str(REPO))

from tandem.engine import LLM, SamplingParams  # noqa: E402

from benchmarks.common.engine import (  # noqa: E402
    alternate_rounds,
    decode_step_ms,
    read_bandwidth,
    release_memory,
    round_ratios,
    run_tandem,
    spread,
    sync,
    timed,
)
from benchmarks.common.results import command_line, git_info, machine_info, write_json, write_results, written_by  # noqa: E402
from benchmarks.common.shapes import SHAPES, build_checkpoint, shape_of, write_config_dir  # noqa: E402


def run_hf(model, prompts: list, out_len: int, device: str, mode: str) -> dict:
    groups = [prompts] if mode == "batched" else [[p] for p in prompts]
    extra = {"cache_implementation": "static"} if mode == "batched" else {}

    def call():
        n = 0
        with torch.inference_mode():
            for g in groups:
                ids = torch.tensor(g, device=device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len,
                                     min_new_tokens=out_len, do_sample=False, pad_token_id=0, **extra)
                n += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        return n

    call()  # identical warm-up call (includes any compile the static cache triggers)
    counts = []
    dt = timed(lambda: counts.append(call()), device)
    return {"seconds": dt, "output_tokens": counts[0], "tokens_per_s": counts[0] / dt}


def profile(llm: LLM, prompts: list, out_len: int, device: str, out_dir: Path, lora_name=None) -> None:
    """Where one whole generate call spends its time: host (cProfile) and device (torch profiler).
    ``lora_name``: each request's adapter (``--lora``)."""
    import cProfile
    import io
    import pstats

    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    eng = llm.engine
    eng.flush_cache()
    names = lora_name if isinstance(lora_name, list) else [lora_name] * len(prompts)
    for p, name in zip(prompts, names):
        eng.add_request(p, sp, lora_name=name)
    phases: dict[str, list] = {}
    while eng.has_work():
        sync(device)
        t0 = time.perf_counter()
        eng.step()
        sync(device)
        phases.setdefault(eng.stats().step_kind, []).append((time.perf_counter() - t0) * 1e3)
    steps = {k: {"steps": len(v), "total_ms": round(sum(v), 2), "median_ms": round(sorted(v)[len(v) // 2], 3)}
             for k, v in phases.items()}
    print(f"engine steps of one batch-{len(prompts)} generate: {steps}")
    llm.engine.flush_cache()
    prof = cProfile.Profile()
    prof.enable()
    llm.generate(prompts, sp, lora_name=lora_name)
    sync(device)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue()[:6000])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    llm.engine.flush_cache()
    with torch.profiler.profile(activities=activities) as tp:
        llm.generate(prompts, sp, lora_name=lora_name)
        sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = tp.key_averages().table(sort_by=key, row_limit=30)
    out = out_dir / f"profile{'_lora' if lora_name else ''}_b{len(prompts)}.txt"
    out.write_text(f"engine steps (wall clock, synchronised): {steps}\n\nhost (cProfile, one generate call)\n{text.getvalue()}\n\ndevice (torch profiler)\n{table}\n")
    print(table)
    print(f"wrote {out}")


def _rounds(row: dict, key: str) -> str:
    """`` (min..max over N rounds)`` of a measured ratio, when it was measured in several rounds."""
    r = row.get(f"{key}_rounds")
    return f" ({r['min']:.2f}..{r['max']:.2f} over {r['rounds']} rounds)" if r and r["rounds"] > 1 else ""


def deterministic_gates(result: dict) -> list[dict]:
    """--enable-deterministic-inference's cost: its decode step <= 1.3x the default's at batch 1 and 64."""
    return [{"target": f"batch {r['batch']}: --enable-deterministic-inference decode step <= 1.3x the default",
             "value": f"{r['deterministic_step_ratio']:.2f}x{_rounds(r, 'deterministic_step_ratio')}",
             "met": r["deterministic_step_ratio"] <= 1.3}
            for r in result["rows"] if "deterministic_step_ratio" in r and r["batch"] in (1, 64)]


def evaluate_gates(result: dict, gates: str | None) -> list[dict]:
    """The issue's targets for this model's rows; each {target, value, met}."""
    if gates == "deterministic":
        return deterministic_gates(result)
    if gates != "gpu-part1":
        return []
    rows = {r["batch"]: r for r in result["rows"]}
    bound_ms = result["roofline_ms"]
    shape = result["shape"]
    out = []
    if shape == "llama8b" and 1 in rows:
        want = 1e3 / (1.3 * bound_ms)
        out.append({"target": f"batch 1 decode >= 1/(1.3 x roofline) = {want:.0f} tok/s",
                    "value": round(rows[1]["tandem_tok_s"], 1), "met": rows[1]["tandem_tok_s"] >= want})
    if shape == "qwen05b":
        want = 6 * bound_ms
        out.append({"target": f"batch 1 decode step <= 6 x roofline = {want:.3f} ms",
                    "value": round(result["decode_step_ms_batch1"], 3), "met": result["decode_step_ms_batch1"] <= want})
    if shape == "qwen05b" and "overlap_speedup" in rows.get(1, {}):
        out.append({"target": "batch 1 tok/s with overlap >= 1.3x --disable-overlap-schedule",
                    "value": f"{rows[1]['overlap_speedup']:.2f}{_rounds(rows[1], 'overlap_speedup')}",
                    "met": rows[1]["overlap_speedup"] >= 1.3})
    if 64 in rows and "hf_tok_s" in rows[64]:
        r = rows[64]
        out.append({"target": "batch 64 >= 2x transformers static cache",
                    "value": f"{r['ratio']:.2f}{_rounds(r, 'ratio')}", "met": r["ratio"] >= 2.0})
    return out


def write_markdown(path: Path, r: dict) -> None:
    lines = [f"# engine_bench: {Path(r['model']).name} on {r['device_name']}", "",
             written_by("benchmarks/engine_bench.py", r), "",
             f"{r['device']}/{r['dtype']}, prompt {r['input_len']}, output {r['output_len']}, weights "
             f"{r['weight_bytes'] / 1e9:.2f} GB; tandem with the engine's shipped defaults "
             f"(attention backend {r['engine']['attention_backend']}, CUDA graphs up to batch "
             f"{r['engine']['cuda_graph_max_bs']}, page size {r['engine']['page_size']}); transformers "
             f"{r['hf_mode']}{' (static cache)' if r['hf_mode'] == 'batched' else ''}, each side warmed with an "
             "identical call, "
             + (f"all loaded at once, {r['rounds']} rounds alternating the order; every value the median over "
                "the rounds (min..max in the JSON)" if r.get("rounds", 1) > 1 else "one after the other")
             + ("; alone on the device." if r["device"].startswith("cuda") else
                f" on a CPU other processes may share (load average {r['machine'].get('load_avg')} at the start, "
                f"{r.get('load_avg_1m_end')} at the end)."),
             "",
             "| batch | tandem tok/s | transformers tok/s | tandem / transformers |", "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['batch']} | {row['tandem_tok_s']:.1f} | {row.get('hf_tok_s', float('nan')):.1f} | "
                     f"{row.get('ratio', float('nan')):.2f}x |")
    for row in r["rows"]:
        if "deterministic_step_ratio" in row:
            lines.append(f"\n--enable-deterministic-inference at batch {row['batch']}: "
                         f"{row['deterministic_tok_s']:.1f} tok/s; decode step {row['deterministic_step_ms']['median']:.3f}"
                         f" ms vs {row['default_step_ms']['median']:.3f} ms ({row['deterministic_step_ratio']:.2f}x).")
        if "overlap_speedup" in row:
            lines.append(f"\nBatch {row['batch']}: overlap scheduling {row['overlap_speedup']:.2f}x "
                         f"--disable-overlap-schedule ({row['no_overlap_tok_s']:.1f} tok/s).")
    lines += ["", f"Batch-1 decode step {r['decode_step_ms_batch1']:.3f} ms (median engine step)."]
    if r["roofline_ms"] is not None:
        lines[-1] += (f" Roofline {r['roofline_ms']:.3f} ms = weights / {r['read_bandwidth_Bps'] / 1e12:.2f} TB/s "
                      f"HBM read bandwidth measured in this run ({r['decode_step_ms_batch1'] / r['roofline_ms']:.2f}x).")
    if r.get("moe"):
        from benchmarks.common.moe import moe_markdown

        lines += moe_markdown(r)
    if r["gates"]:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {g['target']} | {g['value']} | {'yes' if g['met'] else '**no**'} |" for g in r["gates"]]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "tandem-demo-dense"))
    ap.add_argument("--build", nargs=2, metavar=("SHAPE", "DIR"), help=f"build a checkpoint: SHAPE in {list(SHAPES)}")
    ap.add_argument("--shape", choices=list(SHAPES), default=None,
                    help="run a shape without its weights: --load-format dummy, transformers from_config")
    ap.add_argument("--load-format", choices=["auto", "dummy"], default=None,
                    help="tandem's --load-format (default: dummy with --shape, else auto)")
    ap.add_argument("--no-tokenizer", action="store_true", help="--build without the demo tokenizer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-mode", choices=["sequential", "batched"], default=None,
                    help="transformers: one static-cache batch of the same requests as tandem's (default: like "
                         "for like), or one request at a time (sequential)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--hf-batch-sizes", type=int, nargs="+", default=None,
                    help="run the transformers baseline at these of --batch-sizes only (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--phase", choices=["decode", "prefill"], default="decode",
                    help="decode: whole generate calls vs transformers and the roofline (default); "
                         "prefill: TTFT and MFU by prompt length, and a cached shared prefix (engine_prefill.py)")
    ap.add_argument("--prefill-lengths", type=int, nargs="+", default=[2048, 8192], help="--phase prefill prompts")
    ap.add_argument("--prefix-tokens", type=int, nargs=2, default=[7168, 1024], metavar=("SHARED", "NEW"),
                    help="--phase prefill: shared prefix and new tokens of the prefix-cache case")
    ap.add_argument("--overlap-ab", action="store_true",
                    help="also run every batch size with --disable-overlap-schedule and report the speedup")
    ap.add_argument("--deterministic", action="store_true",
                    help="also run every batch size with --enable-deterministic-inference: tok/s and the decode "
                         "step time against the default engine's (its cost)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every side (transformers, tandem, --overlap-ab, --deterministic) this many "
                         "times, alternating the order each round, all loaded at once; values and ratios are the "
                         "median over the rounds, with their min..max (a gate is judged on the median)")
    ap.add_argument("--quantization", choices=["fp8"], default=None,
                    help="FP8 decode (engine_fp8.py): --model with --quantization fp8, then each --fp8-checkpoint; "
                         "tok/s, batch-1 step and the roofline of the bytes read; no transformers baseline")
    ap.add_argument("--compare-bf16", action="store_true", help="--quantization: also run --model in bf16, first")
    ap.add_argument("--fp8-checkpoint", nargs="*", default=[], metavar="DIR",
                    help="--quantization: FP8 checkpoints of the same weights to run too (benchmarks/common/"
                         "fp8_checkpoint.py writes them)")
    ap.add_argument("--bf16-baseline", default=None, metavar="JSON",
                    help="--gates fp8: an engine_bench JSON of the same card and command; bf16 must stay >= 0.97x")
    ap.add_argument("--tp-size", "--tensor-parallel-size", type=int, default=1,
                    help="> 1: TP 1 vs TP N decode tok/s in one run (engine_tp.py; one process per rank, gloo on "
                         "CPU, NCCL on CUDA), with a TP N == TP 1 token check; no transformers baseline")
    ap.add_argument("--embedding", action="store_true",
                    help="embeddings (engine_embedding.py): inputs/s of --is-embedding passes vs transformers AutoModel "
                         "(SDPA, one padded batch), uniform and mixed lengths (default model: the demo embedding "
                         "checkpoint)")
    ap.add_argument("--embedding-batch", type=int, default=64, help="--embedding: inputs per call")
    ap.add_argument("--embedding-min-len", type=int, default=32, help="--embedding: shortest mixed input")
    ap.add_argument("--embedding-max-len", type=int, default=512, help="--embedding: uniform length, longest mixed")
    ap.add_argument("--gates", choices=["gpu-part1", "gpu-part2", "gpu-moe", "fp8", "deterministic", "embedding"], default=None,
                    help="evaluate the issue's targets")
    ap.add_argument("--lora", action="store_true",
                    help="LoRA adapters vs the base model (engine_lora.py), instead of tandem vs transformers")
    ap.add_argument("--lora-rank", type=int, default=16, help="--lora: rank of every adapter")
    ap.add_argument("--lora-adapters", type=int, default=4, help="--lora: adapters mixed in a batch")
    ap.add_argument("--out", default=None, help="write JSON results here (and a .md next to it)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also profile one generate call (host cProfile + torch profiler) into DIR")
    ap.add_argument("--profile-batch", type=int, default=None, help="batch size to profile (default: the largest)")
    args = ap.parse_args(argv)
    if args.lora and (args.embedding or args.deterministic or args.quantization):
        ap.error("--lora: measured alone (not with --embedding, --deterministic or --quantization)")

    if args.build:
        build_checkpoint(*args.build, with_tokenizer=not args.no_tokenizer, repo=REPO)
        return 0
    if args.shape:  # a config.json alone: random weights on the device, nothing read
        import tempfile

        args.model = write_config_dir(args.shape, tempfile.mkdtemp(prefix=f"tandem-{args.shape}-"))
    load_format = args.load_format or ("dummy" if args.shape else "auto")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    git = git_info()  # read at start: the tree the numbers come from
    command = command_line(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quantization:
        from benchmarks.engine_fp8 import run as run_fp8
        from benchmarks.engine_fp8 import write_markdown as fp8_markdown

        result = run_fp8(args, git, started, machine_info())
        result["command"] = command
        for gate in result["gates"]:
            print(f"target: {gate['target']}: {gate['value']} -> "
                  f"{'not measured' if gate['met'] is None else 'MET' if gate['met'] else 'NOT MET'}")
        if args.out:
            write_results(args.out, result, fp8_markdown)
        return 0
    if args.lora:
        from benchmarks.engine_lora import run as run_lora
        from benchmarks.engine_lora import write_markdown as lora_markdown

        if not os.path.isdir(args.model):
            from deploy.demo_models import build_all

            build_all(str(REPO / "models"))
        result = run_lora(args, git, started, machine_info())
        result["command"] = command
        for gate in result["gates"]:
            print(f"target: {gate['target']}: {gate['value']} -> {'MET' if gate['met'] else 'NOT MET'}")
        if args.out:
            write_results(args.out, result, lora_markdown)
        return 0
    if args.embedding:
        from benchmarks.engine_embedding import run as run_embedding
        from benchmarks.engine_embedding import write_markdown as embedding_markdown

        if args.model == ap.get_default("model") and not args.shape:
            from deploy.demo_models import EMBED_SPEC, build_all

            args.model = build_all(str(REPO / "models"))[EMBED_SPEC["name"]]
        result = run_embedding(args, git, started, machine_info())
        result["command"] = command
        for gate in result["gates"]:
            print(f"target: {gate['target']}: {gate['value']} -> {'MET' if gate['met'] else 'NOT MET'}")
        if not result["gates"]:
            print("targets: none evaluated (--gates embedding holds the GPU targets)")
        if args.out:
            write_results(args.out, result, embedding_markdown)
            print(f"wrote {args.out}")
        return 0
    if args.tp_size > 1:
        from benchmarks.engine_tp import run as run_tp
        from benchmarks.engine_tp import write_markdown as tp_markdown

        if not os.path.isdir(args.model):
            from deploy.demo_models import build_all

            build_all(str(REPO / "models"))
        result = run_tp(args, git, started, machine_info(), load_format)
        result["command"] = command
        if args.out:
            write_results(args.out, result, tp_markdown)
        return 0
    if args.phase == "prefill":
        from benchmarks.engine_prefill import run as run_prefill

        result = run_prefill(args, git, started, machine_info())
        result["command"] = command
        for gate in result["gates"]:
            print(f"target: {gate['target']}: {gate['value']} -> {'MET' if gate['met'] else 'NOT MET'}")
        if args.out:
            write_json(Path(args.out), result)
            print(f"wrote {args.out}")
        return 0
    if not os.path.isdir(args.model):
        from deploy.demo_models import build_all

        build_all(str(REPO / "models"))
    cuda = args.device.startswith("cuda")
    hf_mode = args.hf_mode or "batched"
    g = torch.Generator().manual_seed(0)
    vocab = __import__("json").loads(Path(args.model, "config.json").read_text())["vocab_size"]
    prompts = {b: [torch.randint(10, vocab, (args.input_len,), generator=g).tolist() for _ in range(b)]
               for b in args.batch_sizes}
    bandwidth = read_bandwidth(args.device)

    rows = {b: {"batch": b} for b in args.batch_sizes}
    rounds = args.rounds
    # Engines and models that stay loaded side by side (rounds alternate between them) get one fixed
    # KV pool each, sized for the largest batch, instead of a share of whatever memory is free.
    together = rounds > 1 or args.overlap_ab or args.deterministic
    pool = {"max_total_tokens": max(16384, 2 * max(args.batch_sizes) * (args.input_len + args.output_len))} \
        if together else {}
    hf, hf_batches = None, []
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, args.dtype)
        if load_format == "dummy":  # no weights on disk: transformers' own random init, on the device
            from benchmarks.common.shapes import hf_config

            with torch.device(args.device):
                hf = AutoModelForCausalLM.from_config(hf_config(shape_of(args.model)), dtype=dtype).eval()
        else:
            hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
        hf_batches = [b for b in args.batch_sizes if args.hf_batch_sizes is None or b in args.hf_batch_sizes]
        if rounds == 1:  # one round: transformers first, freed before tandem loads (each has the whole device)
            for b in hf_batches:
                h = run_hf(hf, prompts[b], args.output_len, args.device, hf_mode)
                rows[b].update(hf_tok_s=h["tokens_per_s"], hf_s=h["seconds"])
                print(f"batch {b:3d}: transformers ({hf_mode}) {h['tokens_per_s']:9.1f} tok/s", flush=True)
            hf = None
            release_memory(cuda)

    llm = LLM(args.model, device=args.device, dtype=args.dtype, load_format=load_format, **pool)
    eng = llm.engine
    weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    is_moe = bool(eng.model.moe_layers())
    # The variants compared with the shipped defaults, loaded next to them: each round runs every side.
    variants = {}
    if args.overlap_ab:  # the same engine waiting for every step's tokens
        variants["no_overlap"] = LLM(args.model, device=args.device, dtype=args.dtype, load_format=load_format,
                                     disable_overlap_schedule=True, **pool)
    if args.deterministic:  # --enable-deterministic-inference: its cost
        variants["deterministic"] = LLM(args.model, device=args.device, dtype=args.dtype, load_format=load_format,
                                        enable_deterministic_inference=True, **pool)
    label = {"no_overlap": "--disable-overlap-schedule", "deterministic": "--enable-deterministic-inference"}
    for b in args.batch_sizes:
        sides = {"tandem": lambda b=b: run_tandem(llm, prompts[b], args.output_len, args.device)["tokens_per_s"]}
        if hf is not None and b in hf_batches:
            sides["hf"] = lambda b=b: run_hf(hf, prompts[b], args.output_len, args.device, hf_mode)["tokens_per_s"]
        for name, other in variants.items():
            sides[name] = lambda b=b, other=other: run_tandem(other, prompts[b], args.output_len,
                                                              args.device)["tokens_per_s"]
        tok_s = alternate_rounds(sides, rounds)
        row = rows[b]
        row.update(tandem_tok_s=spread(tok_s["tandem"])["median"], tandem_tok_s_rounds=spread(tok_s["tandem"]))
        if "hf" in tok_s:
            ratio = round_ratios(tok_s["tandem"], tok_s["hf"])
            row.update(hf_tok_s=spread(tok_s["hf"])["median"], hf_tok_s_rounds=spread(tok_s["hf"]),
                       ratio=ratio["median"], ratio_rounds=ratio)
        line = f"batch {b:3d}: tandem {row['tandem_tok_s']:9.1f} tok/s"
        if "ratio" in row:
            line += (f" | transformers ({hf_mode}) {row['hf_tok_s']:9.1f} tok/s | ratio {row['ratio']:.2f}x "
                     f"(rounds {ratio['min']:.2f}..{ratio['max']:.2f}, median of {rounds})")
        if "no_overlap" in tok_s:
            speedup = round_ratios(tok_s["tandem"], tok_s["no_overlap"])
            row.update(no_overlap_tok_s=spread(tok_s["no_overlap"])["median"], overlap_speedup=speedup["median"],
                       overlap_speedup_rounds=speedup)
            line += (f" | {label['no_overlap']} {row['no_overlap_tok_s']:9.1f} tok/s, overlap speedup "
                     f"{speedup['median']:.2f}x ({speedup['min']:.2f}..{speedup['max']:.2f})")
        if "deterministic" in tok_s:
            det = variants["deterministic"]
            steps_ms = alternate_rounds({
                "tandem": lambda b=b: decode_step_ms(llm, args.input_len, args.device, steps=args.output_len, batch=b),
                "deterministic": lambda b=b, det=det: decode_step_ms(det, args.input_len, args.device,
                                                                     steps=args.output_len, batch=b)}, rounds)
            cost = round_ratios(steps_ms["deterministic"], steps_ms["tandem"])
            row.update(deterministic_tok_s=spread(tok_s["deterministic"])["median"],
                       deterministic_tok_s_rounds=spread(tok_s["deterministic"]),
                       deterministic_step_ms=spread(steps_ms["deterministic"]),
                       default_step_ms=spread(steps_ms["tandem"]),
                       deterministic_step_ratio=cost["median"], deterministic_step_ratio_rounds=cost)
            line += (f" | {label['deterministic']} {row['deterministic_tok_s']:9.1f} tok/s, decode step "
                     f"{cost['median']:.2f}x the default ({cost['min']:.2f}..{cost['max']:.2f})")
        print(line, flush=True)
    hf = None
    variants.clear()  # the default engine stays for the step, profile and MoE sections
    release_memory(cuda)
    step = decode_step_ms(llm, args.input_len, args.device)
    steps, served = {1: step}, {}
    if is_moe:  # the MoE roofline gates hold for every batch size
        from benchmarks.common.moe import pipelined_step_ms, weights_read

        moe_weights = weights_read(eng.model)
        steps.update({b: decode_step_ms(llm, args.input_len, args.device, steps=args.output_len, batch=b)
                      for b in args.batch_sizes if b != 1})
        served = {b: pipelined_step_ms(eng, prompts[b], args.output_len, args.device) for b in args.batch_sizes}
        print(f"decode step, synchronised (host + device): {', '.join(f'batch {b}: {ms:.3f} ms' for b, ms in steps.items())}"
              f"; as served (overlap): {', '.join(f'batch {b}: {ms:.3f} ms' for b, ms in served.items())}")
    engine_info = {"attention_backend": eng.attention_backend, "cuda_graph_max_bs": eng.cuda_graph_max_bs,
                   "page_size": eng.page_size, "chunked_prefill_size": eng.chunked_prefill_size,
                   "torch_threads": torch.get_num_threads()}
    if args.profile:
        b = args.profile_batch or max(args.batch_sizes)
        profile(llm, prompts[b], args.output_len, args.device, Path(args.profile))
    moe = None
    if is_moe:  # after the default engine is gone: an EPLB engine, on the same prompts
        from benchmarks.common.moe import eplb_section

        del llm, eng
        release_memory(cuda)
        moe = {"weights": moe_weights, "formula": "bytes = non_expert_bytes + moe_layers x coverage x expert_bytes "
                                                  "(coverage: distinct experts per MoE layer per decode step)",
               "eplb": eplb_section(args.model, args.device, args.dtype, load_format, prompts, args.output_len,
                                    moe_weights, bandwidth)}
    roofline_ms = weight_bytes / bandwidth * 1e3 if bandwidth else None
    print(f"batch-1 decode step: {step:.3f} ms" + (f"; roofline {roofline_ms:.3f} ms ({step / roofline_ms:.2f}x) at "
                                                    f"{bandwidth / 1e12:.2f} TB/s read" if roofline_ms else ""))
    result = {
        "time": started, "command": command,
        "git": git, "machine": machine_info(),
        "device_name": torch.cuda.get_device_name(0) if cuda else machine_info()["cpu_model"],
        "model": os.path.abspath(args.model), "shape": shape_of(args.model), "device": args.device,
        "dtype": args.dtype, "input_len": args.input_len, "output_len": args.output_len, "hf_mode": hf_mode,
        "rounds": rounds,
        "engine": engine_info,
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "rows": list(rows.values()), "decode_step_ms_batch1": step, "weight_bytes": weight_bytes,
        "read_bandwidth_Bps": bandwidth, "roofline_ms": roofline_ms, "load_format": load_format,
    }
    if moe is not None:
        from benchmarks.common.moe import moe_gates

        result.update(decode_step_ms=steps, decode_step_ms_pipelined=served, moe=moe)
    result["gates"] = moe_gates(result) if args.gates == "gpu-moe" else evaluate_gates(result, args.gates)
    if not result["gates"]:
        print("targets: none evaluated (--gates gpu-part1 holds the GPU targets; none is set for this CPU run)")
    for gate in result["gates"]:
        print(f"target: {gate['target']}: {gate['value']} -> {'MET' if gate['met'] else 'NOT MET'}")
    if args.out:
        out = Path(args.out)
        write_json(out, result)
        write_markdown(out.with_suffix(".md"), result)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
