"""Does the engine on CPU stay as fast as before the GPU work? (GPU engine part 1's last gate.)

Runs ``benchmarks/engine_bench.py`` of a baseline commit and of this tree alternately, round
after round, with the same arguments (no transformers run: engine against engine), each
importing its own ``libs/``; the baseline runs from a temporary ``git worktree`` of its commit.
Alternating rounds spread the load of a shared machine over both sides; the medians are
compared. Target: this tree's median tokens/s >= 0.95 x the baseline's (5 % is within the
noise of two shared cores), and the batch-1 decode step likewise no slower than 1/0.95 x.

    python benchmarks/engine_cpu_regression.py --baseline aa8eea5 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common.results import REPO, git_info, machine_info, write_json  # noqa: E402

TARGET_RATIO = 0.95


def bench_args(model: str, batch: int, threads: int, input_len: int, output_len: int) -> list[str]:
    return ["--no-hf", "--model", model, "--batch-sizes", str(batch), "--threads", str(threads),
            "--input-len", str(input_len), "--output-len", str(output_len)]


def run_side(tree: Path, args: list[str], out: Path) -> dict:
    """One engine_bench run of ``tree`` (its own libs first on the path); its results JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "libs"), str(tree / "gen" / "python")])}
    cmd = [sys.executable, str(tree / "benchmarks" / "engine_bench.py"), *args, "--out", str(out)]
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def figures(result: dict) -> dict:
    row = result["rows"][0]
    return {"tok_s": row["tandem_tok_s"], "step_ms_batch1": result.get("decode_step_ms_batch1")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="aa8eea5", help="commit before the change under test")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=str(REPO / "models" / "tandem-demo-dense"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "engine_cpu_regression.json"))
    a = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    git = git_info()
    args = bench_args(a.model, a.batch, a.threads, a.input_len, a.output_len)
    print(f"engine_bench {' '.join(args)}: baseline {a.baseline} vs this tree ({git['commit'][:7]}"
          f"{', dirty' if git['dirty'] else ''}), {a.rounds} alternating rounds")
    runs = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="tandem-baseline-") as tmp:
        base_tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), a.baseline], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for i in range(a.rounds):
                for side, tree in (("baseline", base_tree), ("current", REPO)):
                    f = figures(run_side(tree, args, Path(tmp) / f"{side}_{i}.json"))
                    runs[side].append(f)
                    print(f"  round {i + 1}/{a.rounds} {side:8s}: {f['tok_s']:7.1f} tok/s, "
                          f"batch-1 step {f['step_ms_batch1']:.1f} ms", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, capture_output=True)
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("tok_s", "step_ms_batch1")}
           for side, rs in runs.items()}
    # Rounds of one side that differ by more than 30% say the machine was busy: the medians
    # then compare the load, not the engines.
    spread = {side: max(r["tok_s"] for r in rs) / min(r["tok_s"] for r in rs) for side, rs in runs.items()}
    noisy = max(spread.values()) > 1.3
    tok_ratio = med["current"]["tok_s"] / med["baseline"]["tok_s"]
    step_ratio = med["baseline"]["step_ms_batch1"] / med["current"]["step_ms_batch1"]
    targets = [
        {"name": f"batch {a.batch} tokens/s >= {TARGET_RATIO} x baseline", "value": round(tok_ratio, 3),
         "met": tok_ratio >= TARGET_RATIO},
        {"name": f"batch-1 decode step no slower than baseline / {TARGET_RATIO}", "value": round(step_ratio, 3),
         "met": step_ratio >= TARGET_RATIO},
    ]
    result = {"time": started, "command": " ".join(sys.argv), "git": git, "baseline_commit": a.baseline,
              "machine": machine_info(), "engine_bench_args": args, "rounds": runs, "median": med,
              "round_spread": spread, "noisy": noisy, "targets": targets}
    out = Path(a.out)
    write_json(out, result)
    lines = [f"# engine CPU regression ({started}, {git['commit'][:7]}{' dirty' if git['dirty'] else ''} "
             f"vs {a.baseline})", "", f"`{' '.join(sys.argv)}`; engine_bench {' '.join(args)}; "
             f"{a.rounds} alternating rounds on {result['machine'].get('cpu_model')} "
             f"({result['machine'].get('cpu_count')} cores, shared).", "",
             "| side | median tok/s | median batch-1 step ms | rounds tok/s |", "|---|---|---|---|"]
    for side, rs in runs.items():
        lines.append(f"| {side} | {med[side]['tok_s']:.1f} | {med[side]['step_ms_batch1']:.1f} | "
                     + ", ".join(f"{r['tok_s']:.1f}" for r in rs) + " |")
    lines += ["", f"Round spread (max/min tok/s): baseline {spread['baseline']:.2f}x, current "
              f"{spread['current']:.2f}x" + (" — NOISY (> 1.3x): the machine was busy; rerun it quiet." if noisy else ""),
              "", *(f"- {t['name']}: {t['value']} — {'met' if t['met'] else 'NOT MET'}" for t in targets)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(targets) - 2:]))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
