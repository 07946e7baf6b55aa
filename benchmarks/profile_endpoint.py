#!/usr/bin/env python3
"""Profile one serving phase alone, as Dynamo's profiler (profile_endpoint.py) does.

--phase prefill   sweeps the input length at concurrency 1 with a tiny OSL and records
                  TTFT and prefill tokens/s per worker, with a quadratic fit TTFT(ISL)
                  = a*ISL^2 + b*ISL + c that a planner can interpolate.
--phase decode    sweeps context length x batch size (concurrency) with a longer OSL,
                  after a warmup run, and records ITL and decode tokens/s per worker (batch/ITL) vs
                  KV-cache usage (batch * (context + OSL/2) / KV pool tokens).

It deploys the stack itself (--mode agg|disagg, deploy/local/stack.py) or profiles a
running endpoint (--url). Output in --out: <phase>_results.json, raw_data.npz (Dynamo's
keys), <phase>_*.png, the config snapshot, run_info.json, and per-point artifacts.

The load comes from the built-in client (benchmarks/common/loadgen.py) by default: one
aiperf run costs 5-40 s of fixed start-up on a 2-core machine, times every sweep point;
--client aiperf uses aiperf for each point instead.

    .venv/bin/python benchmarks/profile_endpoint.py --phase prefill --mode disagg
    .venv/bin/python benchmarks/profile_endpoint.py --phase decode --url http://127.0.0.1:8000/v1 --max-kv-tokens 65536
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.common import aiperf, deploy, loadgen, metrics, plots, results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/profile_endpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["prefill", "decode"], required=True)
    p.add_argument("--mode", choices=["agg", "disagg"], default="disagg", help="stack to deploy (no --url)")
    p.add_argument("--url", default=None, help="profile a running OpenAI endpoint (…/v1) instead of deploying")
    p.add_argument("--model", default=None, help="checkpoint dir (default: stack YAML's model_path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the stack YAML's engine/router/disaggregation settings, e.g. "
                        "router.health_check_interval=1.0 (repeatable; recorded in the config snapshot)")
    p.add_argument("--stack", default=str(deploy.DEFAULT_STACK))
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (disagg deploy)")
    p.add_argument("--decode", type=int, default=1,
                   help="decode workers (deploy; with --url: how many serve it, for tokens/s per worker)")
    p.add_argument("--port-base", type=int, default=22000)
    p.add_argument("--out", default=None, help="results dir (default benchmarks/runs/profile-<phase>-<timestamp>)")
    p.add_argument("--client", choices=["builtin", "aiperf"], default="builtin")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--start-timeout", type=float, default=300.0)
    g = p.add_argument_group("prefill phase")
    g.add_argument("--isl", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 1536],
                   help="input lengths to sweep")
    g.add_argument("--prefill-osl", type=int, default=5, help="output tokens per prefill request (Dynamo: 5)")
    g.add_argument("--prefill-requests", type=int, default=4, help="measured requests per input length")
    g = p.add_argument_group("decode phase")
    g.add_argument("--context", type=int, nargs="+", default=[128, 512, 1024], help="context lengths to sweep")
    g.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="batch sizes (concurrency)")
    g.add_argument("--decode-osl", type=int, default=64, help="output tokens per decode request (Dynamo: 500)")
    g.add_argument("--max-kv-tokens", type=int, default=None,
                   help="KV pool tokens of one decode worker (default: engine max_total_tokens of the stack)")
    return p


def validate(args) -> None:
    if args.phase == "prefill":
        if not args.isl or any(n < 1 for n in args.isl):
            raise ValueError(f"--isl {args.isl}: every length must be >= 1")
        if len(set(args.isl)) < 3:
            raise ValueError("--isl needs at least 3 distinct lengths for the quadratic fit")
        if args.prefill_osl < 1 or args.prefill_requests < 1:
            raise ValueError("--prefill-osl and --prefill-requests must be >= 1")
    else:
        if any(n < 1 for n in args.context) or any(b < 1 for b in args.batch):
            raise ValueError("--context and --batch values must be >= 1")
        if args.decode_osl < 2:
            raise ValueError("--decode-osl must be >= 2 (ITL needs two output tokens)")
    deploy.parse_overrides(args.overrides)
    if args.max_kv_tokens is not None and args.max_kv_tokens < 1:
        raise ValueError("--max-kv-tokens must be >= 1")


def measure(args, ctx: dict, *, isl: int, osl: int, concurrency: int, requests: int, warmup: int,
            artifact_dir: Path) -> dict:
    """One sweep point with the chosen client; normalized metrics (see metrics.read_level)."""
    kw = dict(isl=isl, osl=osl, concurrency=concurrency, request_count=requests, warmup_count=warmup)
    if args.client == "aiperf":
        cmd = aiperf.build_command(url=ctx["url"], model=ctx["model_name"], tokenizer=ctx["tokenizer"],
                                   artifact_dir=artifact_dir, seed=args.seed, **kw)
        aiperf.run(cmd, artifact_dir)
        return metrics.read_level(artifact_dir)
    return loadgen.profile(ctx["url"], ctx["model_name"], ctx["tokenizer"], artifact_dir=artifact_dir,
                           seed=args.seed, prompts=ctx["prompts"], **kw)


def quadratic_fit(x: list[float], y: list[float]) -> list[float]:
    return [float(c) for c in np.polyfit(np.asarray(x, float), np.asarray(y, float), 2)]


def profile_prefill(args, ctx: dict, out: Path) -> dict:
    isl_ok, ttft, thpt, points = [], [], [], []
    for isl in tqdm(sorted(set(args.isl)), desc="prefill ISL sweep", unit="point", file=sys.stderr):
        lvl = measure(args, ctx, isl=isl, osl=args.prefill_osl, concurrency=1, requests=args.prefill_requests,
                      warmup=1, artifact_dir=out / "artifacts" / f"prefill_isl{isl}")
        t = (lvl.get("ttft_ms") or {}).get("avg")
        points.append({"isl": isl, "ttft_ms": lvl.get("ttft_ms"), "requests_ok": lvl["requests_ok"],
                       "requests_failed": lvl["requests_failed"], "errors": lvl.get("errors")})
        if t is None:
            tqdm.write(f"isl {isl}: no successful request ({lvl.get('errors')})")
            continue
        isl_ok.append(isl)
        ttft.append(t)
        # One request at a time on one prefill worker: tokens/s per worker = ISL / TTFT.
        thpt.append(isl / (t / 1e3))
        tqdm.write(f"isl {isl}: TTFT {t:.1f} ms, {thpt[-1]:.0f} prefill tokens/s")
    if len(isl_ok) < 3:
        raise RuntimeError(f"prefill: only {len(isl_ok)} input lengths succeeded, need 3 for the fit")
    fit = quadratic_fit(isl_ok, ttft)
    np.savez(out / "raw_data.npz", prefill_isl=np.array(isl_ok), prefill_ttft=np.array(ttft),
             prefill_thpt_per_gpu=np.array(thpt), prefill_ttft_fit=np.array(fit))
    plots.prefill_plots(isl_ok, ttft, thpt, fit, out, ctx["subtitle"])
    return {"isl": isl_ok, "ttft_ms": ttft, "prefill_tokens_per_s_per_worker": thpt,
            "ttft_fit": {"coefficients": fit, "form": "ttft_ms = a*isl^2 + b*isl + c"}, "points": points}


def profile_decode(args, ctx: dict, out: Path, max_kv: int | None) -> dict:
    grid = [(c, b) for c in sorted(set(args.context)) for b in sorted(set(args.batch))]
    # Warmup run first (Dynamo does the same): first batches pay one-off costs.
    measure(args, ctx, isl=min(args.context), osl=args.decode_osl, concurrency=1, requests=1, warmup=0,
            artifact_dir=out / "artifacts" / "decode_warmup")
    points = []
    for c, b in tqdm(grid, desc="decode sweep", unit="point", file=sys.stderr):
        lvl = measure(args, ctx, isl=c, osl=args.decode_osl, concurrency=b, requests=b, warmup=0,
                      artifact_dir=out / "artifacts" / f"decode_ctx{c}_b{b}")
        itl = (lvl.get("itl_ms") or {}).get("avg")
        tps = lvl.get("output_token_throughput")
        kv_tokens = b * (c + args.decode_osl / 2)
        # Decode rate while the batch runs: b tokens every ITL (aiperf's window throughput also
        # counts the prefill of the whole batch, which dominates at short OSL; kept as output_tps_window).
        point = {"context_length": c, "batch_size": b, "kv_tokens": kv_tokens,
                 "kv_usage": kv_tokens / max_kv if max_kv else None, "itl_ms": itl,
                 "thpt_per_worker": None if not itl else b * 1e3 / itl / ctx["decode_workers"],
                 "output_tps_window": tps,
                 "requests_ok": lvl["requests_ok"], "requests_failed": lvl["requests_failed"]}
        points.append(point)
        tqdm.write(f"context {c} batch {b}: ITL {itl} ms, {point['thpt_per_worker']} tokens/s/worker")
    good = [p for p in points if p["itl_ms"] is not None]
    if not good:
        raise RuntimeError("decode: no sweep point succeeded")
    for p in good:
        if p["kv_usage"] is None:  # no pool size known: plot absolute tokens in flight
            p["kv_usage_axis"] = p["kv_tokens"]
    np.savez(out / "raw_data.npz", x_kv_usage=np.array([p["kv_usage"] or np.nan for p in good], float),
             y_context_length=np.array([p["context_length"] for p in good]),
             z_batch_size=np.array([p["batch_size"] for p in good]),
             z_itl=np.array([p["itl_ms"] for p in good]),
             z_thpt_per_gpu=np.array([p["thpt_per_worker"] for p in good], float),
             max_kv_tokens=np.array([max_kv or 0]))
    plot_points = [dict(p, kv_usage=p["kv_usage"] if p["kv_usage"] is not None else p["kv_tokens"]) for p in good]
    plots.decode_plots(plot_points, out, ctx["subtitle"] + ("" if max_kv else " (x = KV tokens in flight)"))
    return {"max_kv_tokens": max_kv, "osl": args.decode_osl, "points": points}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    info = {**results.provenance(argv), "args": vars(args)}  # read at start
    git = info["git"]
    try:
        validate(args)
        out = results.make_results_dir(args.out, prefix=f"profile-{args.phase}-")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results.write_json(out / "run_info.json", info)
    with contextlib.ExitStack() as es:
        if args.url:
            url = args.url
            model_dir = args.model or deploy.load_stack_config(Path(args.stack))["model_path"]
            decode_workers, max_kv, mode = args.decode, args.max_kv_tokens, "external"
        else:
            cfg = deploy.stack_config(args.mode, args.model, args.prefill, args.decode, args.port_base,
                                      Path(args.stack), sections=deploy.parse_overrides(args.overrides))
            t0 = time.monotonic()
            stack = es.enter_context(deploy.deployed(cfg, out / "stack", progress=lambda n, s: print(
                f"  {n}: {s}", flush=True), timeout=args.start_timeout))
            info["stack_start_s"] = round(time.monotonic() - t0, 2)
            deploy.snapshot_config(stack, out / "config")
            url, model_dir, mode = stack.openai_url, cfg["model_path"], args.mode
            decode_workers = cfg["num_decode"]
            max_kv = args.max_kv_tokens or cfg.get("engine", {}).get("max_total_tokens")
        model_name = deploy.served_model_name(url, Path(model_dir).name)
        subtitle = (f"{Path(model_dir).name}, {mode}, {info['machine']['cpu_count']} CPUs"
                    f"{', GPU ' + info['machine']['gpus'][0]['name'] if info['machine']['gpus'] else ''}, "
                    f"commit {str(git['commit'])[:8]}")
        ctx = {"url": url, "model_name": model_name, "tokenizer": model_dir, "subtitle": subtitle,
               "prompts": loadgen.PromptFactory(model_dir, args.seed) if args.client == "builtin" else None,
               "decode_workers": decode_workers}
        try:
            if args.phase == "prefill":
                res = profile_prefill(args, ctx, out)
            else:
                res = profile_decode(args, ctx, out, max_kv)
        except (RuntimeError, aiperf.AiperfError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    res = {"phase": args.phase, "mode": mode, "model": model_dir, "client": args.client,
           "git_commit": git["commit"], "git_dirty": git["dirty"], "command": info["command"],
           "machine": info["machine"], **res}
    print("targets: none set for this benchmark (it records the tables a planner interpolates)")
    results.write_json(out / f"{args.phase}_results.json", res)
    info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results.write_json(out / "run_info.json", info)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
