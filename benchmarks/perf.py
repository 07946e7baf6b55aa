#!/usr/bin/env python3
"""Agg vs disagg performance sweep with AIPerf, as Dynamo's benchmarks/llm/perf.sh does.

For each mode (agg: aggregated decode workers; disagg: prefill + decode workers), deploy
the local stack (deploy/local/stack.py, its own ports and run dir), run `aiperf profile`
against the router's OpenAI endpoint at each concurrency level (chat, streaming,
synthetic ISL tokens with stddev 0, OSL forced with max_tokens/min_tokens/ignore_eos,
10*C requests after 2*C warmup, seed 100), stop the stack, then write:

    <out>/run_info.json            command, args, git commit, machine, timings
    <out>/config_<mode>/           every service's config YAML + effective stack config
    <out>/artifacts_<mode>/-concurrency<C>/   AIPerf's raw outputs (Dynamo's layout)
    <out>/summary.csv, summary.json           TTFT/ITL p50/p99, throughputs per mode x concurrency
    <out>/*.png                    TTFT and ITL vs concurrency, throughput, Pareto view

With ``--turns N`` it runs the multi-turn PD workload instead (benchmarks/common/multiturn.py):
``--chats`` conversations of N turns on a disaggregated stack, with and without decode-side
prefix reuse (``--decode-reuse both``: two stacks, ``--rounds`` alternating rounds, medians),
and writes <out>/multiturn.json and .md: KV tokens transferred and prefill-computed tokens for
turns >= 2 with reuse vs without, TTFT both ways, machine and load average.

Examples:
    .venv/bin/python benchmarks/perf.py                       # full default sweep, both modes
    .venv/bin/python benchmarks/perf.py --turns 3 --set disaggregation.max_local_prefill_length=256
    .venv/bin/python benchmarks/perf.py --mode agg --concurrency 1 2 --isl 64 --osl 8
    .venv/bin/python benchmarks/perf.py --compare benchmarks/runs/A benchmarks/runs/B
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks.common import aiperf, deploy, loadgen, metrics, plots, results, worker_metrics
from benchmarks.common import multiturn as multiturn_lib

DEFAULT_CONCURRENCY = [1, 2, 4, 8, 16, 32]


def parse_count(text: str) -> tuple[int, bool]:
    """'10x' -> (10, per-concurrency multiplier); '20' -> (20, absolute)."""
    t = text.strip().lower()
    per_c = t.endswith("x")
    try:
        n = int(t[:-1] if per_c else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer (e.g. 20) or a multiple of C (e.g. 10x)") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return n, per_c


def level_count(spec: tuple[int, bool], concurrency: int) -> int:
    n, per_c = spec
    return n * concurrency if per_c else n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/perf.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["agg", "disagg", "both"], default="both")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (disagg)")
    p.add_argument("--decode", type=int, default=1, help="decode workers (disagg)")
    p.add_argument("--agg-workers", type=int, default=None,
                   help="aggregated workers (agg); default --prefill + --decode, so that both modes get the "
                        "same worker processes and torch threads in total (like for like)")
    p.add_argument("--unique-prompts", action="store_true",
                   help="cache-free prompts: every request of the run (warmup included) gets its own random "
                        "prompt of exactly ISL tokens, so no two share a prefix page (aiperf reads them from a "
                        "file); without it aiperf's synthetic prompts repeat across levels and hit the prefix "
                        "cache. The hit tokens per level are reported either way")
    p.add_argument("--concurrency", type=int, nargs="+", default=DEFAULT_CONCURRENCY)
    p.add_argument("--isl", type=int, default=512, help="input tokens per request (Dynamo uses 3000 on GPUs)")
    p.add_argument("--osl", type=int, default=64, help="output tokens per request (Dynamo uses 150)")
    p.add_argument("--requests-per-level", type=parse_count, default=(10, True),
                   help="requests per level: N, or Nx for N*concurrency (default 10x)")
    p.add_argument("--warmup-per-level", type=parse_count, default=(2, True),
                   help="warmup requests per level: N or Nx (default 2x)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the stack YAML's model_path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the stack YAML's engine/router/disaggregation settings, e.g. "
                        "router.health_check_interval=1.0 (repeatable; recorded in the config snapshot)")
    p.add_argument("--stack", default=str(deploy.DEFAULT_STACK), help="stack YAML (deploy/local/stack.yaml)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/runs/<timestamp>)")
    p.add_argument("--port-base", type=int, default=21000, help="first port; disagg uses port-base+100")
    p.add_argument("--client", choices=["aiperf", "builtin"], default="aiperf",
                   help="load generator (builtin: benchmarks/common/loadgen.py)")
    p.add_argument("--no-fallback", action="store_true",
                   help="fail a level when aiperf fails instead of re-running it with the builtin client")
    p.add_argument("--url", default=None,
                   help="benchmark a running OpenAI endpoint (…/v1) instead of deploying; needs one --mode "
                        "(the label) and --num-workers")
    p.add_argument("--num-workers", type=int, default=None, help="workers behind --url (for tokens/s/worker)")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--with-prometheus", action="store_true", help="also start Prometheus with each stack")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a stack to become healthy")
    p.add_argument("--level-timeout", type=float, default=3600.0, help="seconds for one aiperf run")
    p.add_argument("--compare", nargs=2, metavar=("DIR1", "DIR2"), help="plot two results dirs side by side")
    t = p.add_argument_group("multi-turn PD workload (--turns)")
    t.add_argument("--turns", type=int, default=None,
                   help="run the multi-turn PD workload with this many turns per chat (>= 2) instead of the sweep; "
                        "turn k+1's prompt is turn k's prompt + its answer + a new user message")
    t.add_argument("--chats", type=int, default=4, help="conversations run side by side (--turns)")
    t.add_argument("--turn-isl", type=int, default=32, help="tokens of each new user message after turn 1 (--turns)")
    t.add_argument("--decode-reuse", choices=["both", "on", "off"], default="both",
                   help="--disaggregation-decode-enable-radix-cache on the decode workers: both = one stack each, "
                        "compared (--turns)")
    t.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds per arm, fresh prompts each round; medians are reported (--turns)")
    return p


def validate(args) -> None:
    if not args.compare:
        if any(c < 1 for c in args.concurrency):
            raise ValueError(f"--concurrency {args.concurrency}: every level must be >= 1")
        if args.isl < 1 or args.osl < 1:
            raise ValueError(f"--isl {args.isl} --osl {args.osl}: both must be >= 1")
        if args.osl < 2:
            raise ValueError("--osl must be >= 2 (ITL needs two output tokens)")
        if args.requests_per_level[0] < 1:
            raise ValueError("--requests-per-level must be >= 1")
        deploy.parse_overrides(args.overrides)
        if args.url and args.mode == "both":
            raise ValueError("--url benchmarks one running stack: give --mode agg or --mode disagg as its label")
        if args.url and not args.num_workers:
            raise ValueError("--url needs --num-workers (prefill+decode workers behind it)")
        if args.url and args.agg_workers is not None:
            raise ValueError("--agg-workers deploys that many workers; with --url give --num-workers instead")
        if args.agg_workers is not None and not 1 <= args.agg_workers <= deploy.MAX_WORKERS_PER_KIND:
            raise ValueError(f"--agg-workers {args.agg_workers}: must be in [1, {deploy.MAX_WORKERS_PER_KIND}]")
        if args.turns is not None:
            if args.turns < 2:
                raise ValueError(f"--turns {args.turns}: must be >= 2 (turns >= 2 are what is measured)")
            if args.mode == "agg" or args.url:
                raise ValueError("--turns runs disaggregated stacks of its own: no --mode agg, no --url")
            for name in ("chats", "turn_isl", "rounds"):
                if getattr(args, name) < 1:
                    raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
            if "disaggregation_decode_enable_radix_cache" in deploy.parse_overrides(args.overrides).get(
                    "disaggregation", {}):
                raise ValueError("--turns sets disaggregation_decode_enable_radix_cache itself: use --decode-reuse")


def modes_of(args) -> list[str]:
    return ["agg", "disagg"] if args.mode == "both" else [args.mode]


def agg_workers(args) -> int:
    return args.agg_workers if args.agg_workers is not None else args.prefill + args.decode


def resources_of(cfg: dict) -> dict:
    """Worker processes and torch threads one deployment gets (what a fair comparison equalizes)."""
    threads = int(cfg.get("engine", {}).get("torch_num_threads") or 0) or None
    if cfg["mode"] == "disagg":
        layout, workers = f"{cfg['num_prefill']} prefill + {cfg['num_decode']} decode", cfg["num_prefill"] + cfg["num_decode"]
    else:
        layout, workers = f"{cfg['num_decode']} aggregated", cfg["num_decode"]
    total = None if threads is None else workers * threads
    return {"layout": layout, "workers": workers, "threads_per_worker": threads, "threads_total": total,
            "text": f"{layout} ({workers} x {threads} torch threads = {total})"}


def like_for_like(resources: dict[str, dict]) -> bool | None:
    """Whether agg and disagg got the same workers and threads in total (None: one mode only)."""
    if len(resources) < 2:
        return None
    keys = ("workers", "threads_total")
    return len({tuple(r[k] for k in keys) for r in resources.values()}) == 1


def run_level(args, *, url: str, model_name: str, tokenizer: str, concurrency: int, artifact_dir: Path,
              log, prompts: loadgen.PromptFactory | None = None) -> dict:
    """One concurrency level with aiperf (or the builtin client); returns normalized metrics.
    `prompts` (--unique-prompts): one factory for the whole sweep, so no prompt repeats."""
    n_req = level_count(args.requests_per_level, concurrency)
    n_warm = level_count(args.warmup_per_level, concurrency)
    kw = dict(isl=args.isl, osl=args.osl, concurrency=concurrency, request_count=n_req, warmup_count=n_warm)
    if args.client == "aiperf":
        inputs = None
        if prompts is not None:
            inputs = aiperf.write_inputs(artifact_dir.parent / f"inputs-concurrency{concurrency}.jsonl",
                                         [prompts.make(args.isl) for _ in range(n_warm + n_req)])
        cmd = aiperf.build_command(url=url, model=model_name, tokenizer=tokenizer, artifact_dir=artifact_dir,
                                   seed=args.seed, input_file=inputs, **kw)
        (artifact_dir.parent).mkdir(parents=True, exist_ok=True)
        try:
            aiperf.run(cmd, artifact_dir, timeout=args.level_timeout)
            return metrics.read_level(artifact_dir)
        except aiperf.AiperfError as e:
            log(f"aiperf failed at concurrency {concurrency}: {e}")
            if args.no_fallback:
                raise
            log("re-running this level with the builtin load generator (--no-fallback to fail instead)")
    loadgen.profile(url, model_name, tokenizer, artifact_dir=artifact_dir, seed=args.seed, prompts=prompts, **kw)
    return metrics.read_level(artifact_dir)


def sweep_mode(args, mode: str, index: int, out: Path, bar: tqdm, info: dict) -> list[dict]:
    log = tqdm.write
    rows = []
    hit_workers: dict[str, str] = {}
    if args.url:
        url, n_workers = args.url, args.num_workers
        tokenizer = args.model or deploy.load_stack_config(Path(args.stack))["model_path"]
        resources = {"layout": "external", "workers": n_workers, "threads_per_worker": None, "threads_total": None,
                     "text": f"{n_workers} workers behind {args.url} (threads unknown)"}
        stack_cm = None
    else:
        n_decode = args.decode if mode == "disagg" else agg_workers(args)
        cfg = deploy.stack_config(mode, args.model, args.prefill, n_decode, args.port_base + 100 * index,
                                  Path(args.stack), sections=deploy.parse_overrides(args.overrides))
        n_workers, tokenizer = deploy.num_workers(cfg), cfg["model_path"]
        resources = resources_of(cfg)
    info["resources"][mode] = resources
    log(f"[{mode}] resources: {resources['text']}")
    if not args.url:
        bar.set_postfix_str(f"deploying {mode}")
        t0 = time.monotonic()
        stack_cm = deploy.deployed(cfg, out / f"stack_{mode}", progress=lambda n, s: log(f"  [{mode}] {n}: {s}"),
                                   with_prometheus=args.with_prometheus, timeout=args.start_timeout)
        stack = stack_cm.__enter__()
        info["stack_start_s"][mode] = round(time.monotonic() - t0, 2)
        log(f"[{mode}] stack healthy in {info['stack_start_s'][mode]} s: {stack.openai_url}")
        deploy.snapshot_config(stack, out / f"config_{mode}")
        url = stack.openai_url
        hit_workers = worker_metrics.prefill_workers(stack.specs, mode)
    try:
        model_name = deploy.served_model_name(url, Path(tokenizer).name)
        prompts = loadgen.PromptFactory(tokenizer, args.seed) if args.unique_prompts else None
        for c in args.concurrency:
            bar.set_postfix_str(f"{mode} c={c}")
            before = worker_metrics.snapshot(hit_workers)
            level = run_level(args, url=url, model_name=model_name, tokenizer=tokenizer, concurrency=c,
                              artifact_dir=out / f"artifacts_{mode}" / f"-concurrency{c}", log=log, prompts=prompts)
            level["load_avg_1m"] = round(os.getloadavg()[0], 2)
            if hit_workers:
                level.update(worker_metrics.cache_hits(before, worker_metrics.snapshot(hit_workers)))
            level["prompts"] = "unique" if args.unique_prompts else f"{args.client} synthetic"
            row = metrics.summary_row(level, mode=mode, concurrency=c, num_workers=n_workers, isl=args.isl,
                                      osl=args.osl, resources=resources)
            rows.append(row)
            log(f"[{mode}] c={c}: TTFT p50 {row['ttft_p50_ms']} ms, ITL p50 {row['itl_p50_ms']} ms, "
                f"{row['output_token_throughput_tps']} tok/s, ok {row['requests_ok']} failed {row['requests_failed']} "
                f"(warmup failed {row['warmup_failed']}), prefix-cache hits {row['cached_tokens']} of "
                f"{row['prompt_tokens']} prompt tokens")
            bar.update(1)
    finally:
        if stack_cm is not None:
            bar.set_postfix_str(f"stopping {mode}")
            stack_cm.__exit__(None, None, None)
    return rows


def write_summary(out: Path, rows: list[dict], run: dict) -> None:
    results.write_csv(out / "summary.csv", rows, metrics.SUMMARY_FIELDS)
    results.write_json(out / "summary.json", {"run": run, "fields": metrics.SUMMARY_FIELDS, "rows": rows})


def subtitle_of(run: dict) -> str:
    m = run.get("machine", {})
    return (f"{Path(run.get('model', '?')).name}, ISL {run.get('isl')} / OSL {run.get('osl')}, "
            f"{m.get('cpu_count')} CPU{'s' if m.get('cpu_count', 0) != 1 else ''}"
            f"{', GPU ' + m['gpus'][0]['name'] if m.get('gpus') else ''}, commit {str(run.get('git_commit'))[:8]}")


def groups_of(rows: list[dict], prefix: str = "") -> list[plots.Group]:
    modes = [m for m in ("agg", "disagg") if any(r["mode"] == m for r in rows)]
    return [(f"{prefix}{m}", [r for r in rows if r["mode"] == m]) for m in modes]


def sweep(args, argv: list[str] | None = None) -> int:
    info = {**results.provenance(argv), "args": vars(args), "stack_start_s": {}, "resources": {},
            "failed_modes": {}}
    git = info["git"]
    out = results.make_results_dir(args.out)
    results.write_json(out / "run_info.json", info)
    modes = modes_of(args)
    print(f"results -> {out}", flush=True)
    rows: list[dict] = []
    with tqdm(total=len(modes) * len(args.concurrency), desc="perf sweep", unit="level", file=sys.stderr) as bar:
        for i, mode in enumerate(modes):
            try:
                rows += sweep_mode(args, mode, i, out, bar, info)
            except (RuntimeError, TimeoutError, ValueError, aiperf.AiperfError) as e:
                tqdm.write(f"[{mode}] FAILED: {e}")
                info["failed_modes"][mode] = str(e)[-3000:]
    info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info["like_for_like"] = like_for_like(info["resources"])
    results.write_json(out / "run_info.json", info)
    model = args.model or deploy.load_stack_config(Path(args.stack))["model_path"]
    run = {"git_commit": git["commit"], "git_dirty": git["dirty"], "machine": info["machine"], "model": model,
           "isl": args.isl, "osl": args.osl, "concurrency": args.concurrency, "modes": modes,
           "prefill": args.prefill, "decode": args.decode, "agg_workers": agg_workers(args), "client": args.client,
           "unique_prompts": args.unique_prompts, "overrides": args.overrides, "command": info["command"],
           "resources": info["resources"], "like_for_like": info["like_for_like"],
           "stack_start_s": info["stack_start_s"], "failed_modes": info["failed_modes"]}
    write_summary(out, rows, run)
    if rows:
        plots.perf_plots(groups_of(rows), out, subtitle_of(run))
    print_table(rows)
    print_resources(info["resources"], info["like_for_like"])
    print(f"results in {out}")
    return 1 if info["failed_modes"] or not rows else 0


def multiturn(args, argv: list[str] | None = None) -> int:
    """The multi-turn PD workload, with and without decode-side prefix reuse (alternating rounds)."""
    info = {**results.provenance(argv), "args": vars(args)}
    out = results.make_results_dir(args.out, prefix="turns-")
    arms = {"both": ["on", "off"], "on": ["on"], "off": ["off"]}[args.decode_reuse]
    print(f"results -> {out}", flush=True)
    stacks, specs = {}, {}
    try:
        for i, arm in enumerate(arms):
            sections = deploy.parse_overrides(args.overrides)
            sections.setdefault("disaggregation", {})["disaggregation_decode_enable_radix_cache"] = arm == "on"
            cfg = deploy.stack_config("disagg", args.model, args.prefill, args.decode, args.port_base + 100 * i,
                                      Path(args.stack), sections=sections)
            stacks[arm] = deploy.deployed(cfg, out / f"stack_reuse_{arm}", timeout=args.start_timeout,
                                          progress=lambda n, st, a=arm: print(f"  [reuse {a}] {n}: {st}", flush=True))
            specs[arm] = stacks[arm].__enter__()
            deploy.snapshot_config(specs[arm], out / f"config_reuse_{arm}")
        info["resources"] = resources_of(cfg)
        rounds = []
        for r in range(args.rounds):
            row = {"round": r + 1}
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                stack = specs[arm]
                url = stack.openai_url
                tokenizer = cfg["model_path"]
                # The same conversations for both arms of a round; new ones each round (no cache carry-over).
                prompts = loadgen.PromptFactory(tokenizer, args.seed + r)
                res = asyncio.run(multiturn_lib.run_chats(
                    url, deploy.served_model_name(url, Path(tokenizer).name), prompts, chats=args.chats,
                    turns=args.turns, isl=args.isl, turn_isl=args.turn_isl, osl=args.osl,
                    decodes={s.name: s.system for s in stack.specs if s.kind == "decode"},
                    prefills={s.name: s.system for s in stack.specs if s.kind == "prefill"},
                    timeout=args.level_timeout))
                res["load_avg_1m"] = round(os.getloadavg()[0], 2)
                row[arm] = res
                print(f"round {r + 1} reuse {arm}: transferred {res['transferred_tokens']} reused "
                      f"{res['reused_tokens']} prefill-computed {res['prefill_computed_tokens']} tokens (turns >= 2), "
                      f"TTFT p50 turn 1 {res['ttft_first_turn_p50_ms']} ms, later {res['ttft_later_turns_p50_ms']} ms, "
                      f"failed turns {res['turns_failed']}, load {res['load_avg_1m']}", flush=True)
            if len(arms) == 2:
                row["answers_identical"] = row["on"]["answers"] == row["off"]["answers"]
            rounds.append(row)
    finally:
        for cm in stacks.values():
            cm.__exit__(None, None, None)
    summary = multiturn_summary(rounds, arms)
    info.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), rounds=rounds, summary=summary,
                targets=multiturn_targets(summary), load_avg_1m=round(os.getloadavg()[0], 2))
    for row in rounds:  # the answers were compared above; the file keeps their count only
        for arm in arms:
            row[arm]["answers"] = len(row[arm]["answers"])
    results.print_targets(info["targets"])
    results.write_results(out / "multiturn.json", info, write_multiturn_md)
    failed = any(row[a]["turns_failed"] for row in rounds for a in arms)
    return 1 if failed else 0


MULTITURN_KEYS = ("transferred_tokens", "reused_tokens", "prefill_computed_tokens", "decode_computed_tokens",
                  "ttft_first_turn_p50_ms", "ttft_later_turns_p50_ms", "load_avg_1m")


def multiturn_summary(rounds: list[dict], arms: list[str]) -> dict:
    """Per arm the median over rounds of each measure; with both arms, the medians of the per-round
    ratios reuse on / reuse off."""
    def median(xs):
        xs = [x for x in xs if x is not None]
        return round(statistics.median(xs), 4) if xs else None

    out = {arm: {k: median([row[arm][k] for row in rounds]) for k in MULTITURN_KEYS} for arm in arms}
    if len(arms) == 2:
        def ratio(row, k):
            off = row["off"][k]
            return row["on"][k] / off if off else None
        out["ratio_on_off"] = {k: median([ratio(row, k) for row in rounds])
                               for k in ("transferred_tokens", "prefill_computed_tokens", "ttft_later_turns_p50_ms")}
        out["answers_identical_all_rounds"] = all(row["answers_identical"] for row in rounds)
    return out


def multiturn_targets(summary: dict) -> list[dict]:
    ratios = summary.get("ratio_on_off")
    if ratios is None:
        return []
    t, p = ratios["transferred_tokens"], ratios["prefill_computed_tokens"]
    return [results.target("KV tokens transferred, turns >= 2, reuse on / off", t, "<= 0.3",
                           None if t is None else t <= 0.3),
            results.target("prefill-computed tokens, turns >= 2, reuse on / off", p, "<= 0.5",
                           None if p is None else p <= 0.5)]


def write_multiturn_md(path: Path, r: dict) -> None:
    s = r["summary"]
    lines = [f"# perf.py --turns {r['args']['turns']} ({r['machine']['cpu_model']}, {r['machine']['cpu_count']} CPUs)",
             "", results.written_by("benchmarks/perf.py", r), "",
             f"{r['args']['chats']} chats x {r['args']['turns']} turns, turn 1 {r['args']['isl']} tokens, answers "
             f"{r['args']['osl']} tokens, new user messages {r['args']['turn_isl']} tokens; {r['args']['rounds']} "
             f"alternating rounds, medians; overrides {r['args']['overrides']}. Counters for turns >= 2.", "",
             "| reuse | " + " | ".join(MULTITURN_KEYS) + " |", "|---" * (len(MULTITURN_KEYS) + 1) + "|"]
    for arm in ("on", "off"):
        if arm in s:
            lines.append(f"| {arm} | " + " | ".join(str(s[arm][k]) for k in MULTITURN_KEYS) + " |")
    if "ratio_on_off" in s:
        lines += ["", f"Ratios on/off (median of rounds): {s['ratio_on_off']}; answers identical in every round: "
                      f"{s['answers_identical_all_rounds']}"]
    lines += ["", "Targets:"] + results.target_items(r["targets"])
    path.write_text("\n".join(lines) + "\n")


def print_table(rows: list[dict]) -> None:
    cols = [("mode", "mode", "{}"), ("C", "concurrency", "{}"), ("TTFT p50", "ttft_p50_ms", "{:.1f}"),
            ("TTFT p99", "ttft_p99_ms", "{:.1f}"), ("ITL p50", "itl_p50_ms", "{:.2f}"),
            ("ITL p99", "itl_p99_ms", "{:.2f}"), ("req/s", "request_throughput_rps", "{:.2f}"),
            ("tok/s", "output_token_throughput_tps", "{:.1f}"), ("tok/s/user", "tokens_per_s_per_user", "{:.1f}"),
            ("tok/s/worker", "tokens_per_s_per_worker", "{:.1f}"), ("fail", "requests_failed", "{}"),
            ("warmup fail", "warmup_failed", "{}"), ("workers", "num_workers", "{}"), ("threads", "threads_total", "{}"),
            ("cached tok", "cached_tokens", "{}"), ("prompt tok", "prompt_tokens", "{}")]
    print(" | ".join(h for h, _, _ in cols))
    for r in rows:
        print(" | ".join("-" if r.get(k) is None else f.format(r[k]) for _, k, f in cols))


def print_resources(resources: dict[str, dict], fair: bool | None) -> None:
    for mode, r in resources.items():
        print(f"{mode}: {r['text']}")
    if fair is False:
        print("NOTE: the modes did not get the same workers and threads in total: not a like-for-like comparison")


def compare(args) -> int:
    runs = []
    for d in args.compare:
        path = Path(d) / "summary.json"
        if not path.is_file():
            raise ValueError(f"--compare {d}: no summary.json there")
        runs.append((Path(d).name, json.loads(path.read_text())))
    out = results.make_results_dir(args.out, prefix="compare-")
    groups, rows = [], []
    for name, data in runs:
        groups += groups_of(data["rows"], prefix=f"{name} ")
        rows += [dict(r, run=name) for r in data["rows"]]
    subtitle = " vs ".join(f"{n} ({subtitle_of(d['run'])})" for n, d in runs)
    plots.perf_plots(groups, out, subtitle)
    results.write_csv(out / "compare.csv", rows, ["run"] + metrics.SUMMARY_FIELDS)
    results.write_json(out / "compare.json", {"runs": [{"name": n, "run": d["run"]} for n, d in runs],
                                              "rows": rows})
    print(f"comparison in {out}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        if args.compare:
            return compare(args)
        return multiturn(args, argv) if args.turns else sweep(args, argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _exit_on_sigterm(signum, _frame):
    """SIGTERM (a killed parent, a test's timeout) unwinds like Ctrl-C: every stack this run started
    is stopped by its ``finally`` (the stacks run in sessions of their own: a group kill misses them)."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
