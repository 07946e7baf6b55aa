"""Overhead of grammar masking (structured outputs) and of penalties: decode tokens/s against
unconstrained decoding, in the same run, on the same engine, prompts and sampling.

Each mode runs the same batch (--batch requests, random prompt ids of --input-len tokens,
temperature 1, per-request seeds, --output-len tokens at most) through ``EngineCore.step``;
modes alternate for --repeats rounds so machine noise hits all of them alike. What is
compared is the time of decode steps while the whole batch runs (a structured request may
end with its grammar, so later steps of smaller batches would compare unlike with unlike),
as tokens/s = batch / step time, from the median step and from the 10th-percentile step
(noise from other processes only ever adds time, so the fast steps show the cost best on a
shared machine). Modes:

* ``free``: no constraint (the baseline; the sampler's plain random variant).
* ``json_schema``: an array of objects, strict (xgrammar, compiled once and cached): each
  step fills every row's allow-bitmask on the host from the request's matcher, copies
  ``[B, V/32]`` int32 to the device and masks the logits.
* ``regex``: a regex of the same shape (the same mask path; another grammar engine path).
* ``penalties``: frequency + presence + repetition penalties and a logit bias (the
  sampler's penalties variant: gathers ``[B, V]`` state rows on the device).

    python benchmarks/grammar_bench.py --out benchmarks/results/grammar_bench_cpu.json
    python benchmarks/grammar_bench.py --device cuda --dtype bfloat16 --model /tmp/qwen05b --batch 64 \\
        --out benchmarks/results/gpu/grammar_bench_qwen05b_h200.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "libs"))
sys.path.insert(0, str(REPO))

from tandem.engine import (  # noqa: E402
    EngineCore,
    SamplingParams,
    StructuredOutput,  # noqa: E402
)

from benchmarks.common.results import command_line, git_info, machine_info, write_json  # noqa: E402

SCHEMA = {"type": "array", "minItems": 8, "items": {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                   "name": {"type": "string", "maxLength": 12},
                   "ok": {"type": "boolean"}},
    "required": ["id", "name", "ok"]}}  # minItems: longer than --output-len, so every request runs to the end
REGEX = r'\[(\{"id":[0-9]{1,4},"name":"[a-z ]{0,12}","ok":(true|false)\},)*\{"id":[0-9]{1,4}\}\]'
MODES = ("free", "json_schema", "regex", "penalties")


def params(mode: str, seed: int, out_len: int) -> SamplingParams:
    kw = dict(max_tokens=out_len, temperature=1.0, seed=seed, ignore_eos=mode in ("free", "penalties"))
    if mode == "json_schema":
        kw["structured"] = StructuredOutput("json_schema", json.dumps(SCHEMA))
    elif mode == "regex":
        kw["structured"] = StructuredOutput("regex", REGEX)
    elif mode == "penalties":
        kw.update(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.1, logit_bias={5: -100.0})
    return SamplingParams(**kw)


def run_mode(eng: EngineCore, mode: str, prompts: list, out_len: int, device: str) -> dict:
    B = len(prompts)
    rids = {eng.add_request(p, params(mode, 1000 + i, out_len)) for i, p in enumerate(prompts)}
    full_tokens, full_time, all_tokens, steps = 0, 0.0, 0, []
    t_start = time.perf_counter()
    live = set(rids)
    while live:
        running_before = len([r for r in eng.scheduler.running if r.rid in rids])
        t0 = time.perf_counter()
        outs = eng.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        st = eng.stats()
        n = sum(len(o.new_token_ids) for o in outs if o.rid in rids)
        all_tokens += n
        if st.step_kind == "decode" and running_before == B and st.step_batch_size == B:
            full_tokens += n
            full_time += dt
            steps.append(dt)
        live -= {o.rid for o in outs if o.finished}
    total = time.perf_counter() - t_start
    return {"full_batch_tokens": full_tokens, "full_batch_s": full_time, "full_batch_step_s": steps,
            "full_batch_tok_s": full_tokens / full_time if full_time else None,
            "all_tokens": all_tokens, "total_s": total}


def versions() -> dict:
    out = {}
    for d in ("torch", "triton", "xgrammar", "transformers", "numpy"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "tandem-demo-dense"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", default=None, help="write JSON results here (and a .md next to it)")
    args = ap.parse_args(argv)
    git = git_info()  # read at start: the tree the numbers come from
    command = command_line(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    eng = EngineCore(args.model, device=args.device, dtype=args.dtype, max_running_requests=max(64, args.batch),
                     disable_radix_cache=True)
    vocab = eng.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(10, min(vocab, 8000)) for _ in range(args.input_len)] for _ in range(args.batch)]
    t0 = time.perf_counter()
    for mode in ("json_schema", "regex"):  # compile once, outside the timed runs (cached from here on)
        eng.grammars.compile(params(mode, 0, 1).structured)
    compile_s = time.perf_counter() - t0
    for mode in MODES:  # warm every path (CUDA graphs captured at start; kernels, allocator)
        run_mode(eng, mode, prompts[:2], 8, args.device)
    runs = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            runs[mode].append(run_mode(eng, mode, prompts, args.output_len, args.device))
    summary = {}
    for mode, rs in runs.items():
        steps = sorted(t for r in rs for t in r["full_batch_step_s"])
        med, p10 = steps[len(steps) // 2], steps[len(steps) // 10]
        summary[mode] = {"full_batch_steps": len(steps), "step_ms_median": med * 1e3, "step_ms_p10": p10 * 1e3,
                         "tok_s_median": args.batch / med, "tok_s_p10": args.batch / p10,
                         "mean_output_tokens": sum(r["all_tokens"] for r in rs) / (len(rs) * args.batch)}
    base = summary["free"]
    for s in summary.values():
        s["overhead_pct_median"] = (s["step_ms_median"] / base["step_ms_median"] - 1) * 100
        s["overhead_pct_p10"] = (s["step_ms_p10"] / base["step_ms_p10"] - 1) * 100
    result = {
        "benchmark": "grammar_bench", "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git,
        "machine": machine_info(), "versions": versions(), "args": vars(args),
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else machine_info()["cpu_model"],
        "cuda_graph_max_bs": eng.cuda_graph_max_bs, "vocab_size": vocab, "grammar_compile_s": compile_s,
        "summary": summary, "runs": runs,
    }
    print(json.dumps(summary, indent=2))
    result["targets"] = []
    print("targets: none set for this benchmark (it measures what grammars and penalties cost)")
    if args.out:
        out = Path(args.out)
        write_json(out, result)
        out.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def markdown(r: dict) -> str:
    a, g = r["args"], r["git"]
    lines = [
        "# Grammar-masking and penalties overhead (benchmarks/grammar_bench.py)",
        "",
        f"Machine: {r['device_name']} ({r['machine']['cpu_count']} CPUs), torch {r['versions']['torch']}, "
        f"xgrammar {r['versions']['xgrammar']}; commit {g.get('commit')} (dirty={g.get('dirty')}); "
        f"{r['started']}.",
        f"Model {a['model']} (vocab {r['vocab_size']}), {a['device']} {a['dtype']}, batch {a['batch']}, "
        f"input {a['input_len']}, output <= {a['output_len']}, {a['repeats']} alternating rounds; "
        f"CUDA graphs up to batch {r['cuda_graph_max_bs']}. Grammars compiled once in "
        f"{r['grammar_compile_s'] * 1e3:.0f} ms (cached for every request).",
        "",
        "| mode | decode steps | step ms p10 / median | tok/s p10 / median | step-time overhead p10 / median |",
        "|---|---|---|---|---|",
    ]
    for mode, s in r["summary"].items():
        lines.append(f"| {mode} | {s['full_batch_steps']} | {s['step_ms_p10']:.1f} / {s['step_ms_median']:.1f} | "
                     f"{s['tok_s_p10']:.1f} / {s['tok_s_median']:.1f} | "
                     f"{s['overhead_pct_p10']:+.1f}% / {s['overhead_pct_median']:+.1f}% |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
