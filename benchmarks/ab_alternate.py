"""A/B of one benchmark command in two source trees, alternating on one machine: is this tree at
least ``--target`` x as fast as the base (e.g. the commit before a change)?

Each round runs the command once in each tree, each run a fresh subprocess whose working
directory is that tree and whose PYTHONPATH starts with that tree's ``libs/``, ``services/*``,
``gen/python`` and root (entries of either tree inherited from the caller's PYTHONPATH are
dropped, so a side never imports the other's code). The order alternates (base first in even
rounds, this tree first in odd ones), so a machine that warms up or slows down over time
favours neither side. The metric is read from the JSON the command writes to ``{out}`` (a
fresh path per run) or, if the command has no ``{out}``, from the last line of its stdout that
is a JSON object; ``--metric`` is a dotted path into it (list items by index), with ``:lower``
when lower is better. Each side's median is compared; the ratio is oriented so that > 1 means
this tree is better. Results (both trees' commits and dirty flags, machine, package versions,
the command, every round) go to ``--out`` as JSON plus a Markdown summary.

    # on this machine: the base tree, a copy of main's commit, inside the tree so it travels
    python benchmarks/ab_alternate.py --export-base main --base-dir ab-base
    # on the GPU machine (the base's git state travels in ab-base/.git-state.json)
    python benchmarks/ab_alternate.py --base-dir ab-base --rounds 5 --metric rows.0.tandem_tok_s \\
        --out benchmarks/results/gpu/ab_engine_bench.json -- \\
        python benchmarks/engine_bench.py --model /tmp/qwen05b --no-hf --batch-sizes 64 --out {out}

Placeholders in the command: ``{out}`` (the run's JSON path), ``{tree}`` (the side's root),
``{side}`` (``base`` or ``current``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common.results import REPO, command_line, git_info, machine_info, write_json  # noqa: E402

SIDES = ("base", "current")


def tree_state(tree: Path, current: bool) -> dict:
    """Commit and dirty flag of a tree: its .git-state.json (written where it was made, e.g. by
    ``--export-base`` or build-support/git-state.sh) when present; else, for this tree, what
    ``git_info`` says (TANDEM_GIT_STATE first), for the base what git says there."""
    state = tree / ".git-state.json"
    if state.is_file():
        return {**json.loads(state.read_text()), "source": str(state)}
    if current:
        return git_info(tree)

    def git(*args: str) -> str | None:
        r = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != tree.resolve():  # not a checkout of its own (a copy inside another)
        return {"commit": None, "dirty": None, "source": "unknown: no .git-state.json and no checkout of its own"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status), "source": "git"}


def side_env(tree: Path, other: Path, base_env: dict) -> dict:
    """The environment of a run in ``tree``: its own code first on PYTHONPATH, nothing of ``other``."""
    own = [tree / "libs", *sorted(p for p in (tree / "services").glob("*") if p.is_dir()), tree / "gen" / "python",
           tree]
    trees = (tree.resolve(), other.resolve())
    inherited = [p for p in base_env.get("PYTHONPATH", "").split(os.pathsep)
                 if p and not any(Path(p).resolve().is_relative_to(t) for t in trees)]
    env = {**base_env, "PYTHONPATH": os.pathsep.join([*map(str, own), *inherited])}
    state = tree / ".git-state.json"
    if state.is_file():
        env["TANDEM_GIT_STATE"] = str(state)
    else:
        env.pop("TANDEM_GIT_STATE", None)
    return env


def metric_value(doc, path: str) -> float:
    """The number at dotted ``path`` in a JSON document (list items by index)."""
    node = doc
    for key in path.split("."):
        if isinstance(node, list):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            raise KeyError(f"metric {path!r}: no {key!r} in the command's JSON")
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise ValueError(f"metric {path!r} is {node!r}, not a number")
    return float(node)


def last_json_line(stdout: str):
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError("the command wrote no {out} file and printed no JSON object line")


def run_once(command: list[str], side: str, tree: Path, other: Path, workdir: Path, index: int,
             timeout: float | None) -> tuple[dict, float]:
    """One run of the command in ``tree``: (its JSON document, wall seconds)."""
    out = workdir / f"{side}_{index}.json"
    args = [a.replace("{out}", str(out)).replace("{tree}", str(tree)).replace("{side}", side) for a in command]
    t0 = time.monotonic()
    r = subprocess.run(args, cwd=tree, env=side_env(tree, other, dict(os.environ)), capture_output=True, text=True,
                       timeout=timeout)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{side} run {index + 1} failed ({r.returncode}): {shlex.join(args)}\n"
                           f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    uses_file = any("{out}" in a for a in command)
    return (json.loads(out.read_text()) if uses_file else last_json_line(r.stdout)), wall


def parse_metrics(specs: list[str]) -> list[tuple[str, bool]]:
    """[(path, higher_is_better)] from ``PATH`` or ``PATH:lower``."""
    out = []
    for spec in specs:
        path, _, direction = spec.partition(":")
        if direction not in ("", "higher", "lower"):
            raise SystemExit(f"--metric {spec!r}: the suffix must be :higher or :lower")
        out.append((path, direction != "lower"))
    return out


def compare(rounds: list[dict], metrics: list[tuple[str, bool]], target: float) -> tuple[dict, list[dict]]:
    """Per metric: each side's median and spread, and the ratio (> 1: this tree is better)."""
    summary, targets = {}, []
    for path, higher in metrics:
        med = {s: statistics.median(r[s]["metrics"][path] for r in rounds) for s in SIDES}
        spread = {s: max(r[s]["metrics"][path] for r in rounds) / max(min(r[s]["metrics"][path] for r in rounds),
                                                                        1e-12) for s in SIDES}
        ratio = (med["current"] / med["base"] if higher else med["base"] / med["current"]) \
            if med["base"] and med["current"] else float("nan")
        summary[path] = {"higher_is_better": higher, "median": med, "spread": spread, "ratio": ratio}
        targets.append({"name": f"{path}: this tree >= {target} x base ({'higher' if higher else 'lower'} is better)",
                        "value": round(ratio, 4), "met": ratio >= target})
    return summary, targets


def export_base(commit: str, dest: Path) -> None:
    """Write ``commit``'s tracked files into ``dest`` (git archive) with its .git-state.json."""
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"--base-dir {dest}: exists and is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    full = subprocess.run(["git", "rev-parse", commit], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", full], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / ".git-state.json").write_text(json.dumps({"commit": full, "branch": commit, "dirty": False}) + "\n")
    print(f"{dest}: {commit} ({full[:10]}), {len(archive) / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 usage="%(prog)s --base-dir DIR [options] -- COMMAND ...")
    ap.add_argument("--base-dir", required=True, help="the base source tree (e.g. a copy of the commit before)")
    ap.add_argument("--export-base", metavar="COMMIT", help="write COMMIT's tree into --base-dir and exit")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each side (default 5)")
    ap.add_argument("--metric", action="append", default=[],
                    help="dotted path of a number in the command's JSON, e.g. rows.0.tandem_tok_s; "
                         "append :lower when lower is better (repeatable)")
    ap.add_argument("--target", type=float, default=0.97, help="ratio each metric must reach (default 0.97)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds one run may take")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ab_alternate.json"))
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the benchmark command, after --")
    a = ap.parse_args(argv)
    base = Path(a.base_dir).resolve()
    if a.export_base:
        export_base(a.export_base, base)
        return 0
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        ap.error("no command: give it after --")
    if not a.metric:
        ap.error("--metric is required")
    if not base.is_dir():
        ap.error(f"--base-dir {base}: not a directory")
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    metrics = parse_metrics(a.metric)
    trees = {"base": base, "current": REPO.resolve()}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    states = {s: tree_state(t, s == "current") for s, t in trees.items()}
    print(f"A/B {shlex.join(command)}\n  base    {base} ({states['base'].get('commit')})\n  current "
          f"{trees['current']} ({states['current'].get('commit')}{', dirty' if states['current'].get('dirty') else ''})"
          f"\n  {a.rounds} alternating rounds", flush=True)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="ab-alternate-") as tmp:
        for i in range(a.rounds):
            order = SIDES if i % 2 == 0 else SIDES[::-1]
            row = {"order": list(order)}
            for side in order:
                other = trees["current" if side == "base" else "base"]
                doc, wall = run_once(command, side, trees[side], other, Path(tmp), i, a.timeout)
                row[side] = {"metrics": {p: metric_value(doc, p) for p, _ in metrics}, "wall_s": round(wall, 3)}
            rounds.append(row)
            print(f"  round {i + 1}/{a.rounds} ({order[0]} first): " + "; ".join(
                f"{p} base {row['base']['metrics'][p]:.4g} current {row['current']['metrics'][p]:.4g}"
                for p, _ in metrics), flush=True)
    summary, targets = compare(rounds, metrics, a.target)
    result = {"time": started, "command": command_line(argv), "benchmark_command": command,
              "trees": {s: {"path": str(trees[s]), **states[s]} for s in SIDES}, "machine": machine_info(),
              "rounds": rounds, "summary": summary, "target": a.target, "targets": targets}
    out = Path(a.out)
    write_json(out, result)
    lines = [f"# A/B, alternating ({started})", "", f"`{shlex.join(command)}`, {a.rounds} rounds on "
             f"{result['machine'].get('cpu_model')}"
             + "".join(f", {g['name']}" for g in result["machine"].get("gpus", [])[:1]) + ".", "",
             f"- base: `{states['base'].get('commit')}` ({base})",
             f"- current: `{states['current'].get('commit')}`{' (dirty)' if states['current'].get('dirty') else ''}",
             "", "| metric | base median | current median | ratio (> 1: current better) | spread base / current |",
             "|---|---|---|---|---|"]
    for p, s in summary.items():
        lines.append(f"| {p} | {s['median']['base']:.4g} | {s['median']['current']:.4g} | {s['ratio']:.3f} | "
                     f"{s['spread']['base']:.2f}x / {s['spread']['current']:.2f}x |")
    lines += ["", *(f"- {t['name']}: {t['value']} — {'met' if t['met'] else 'NOT MET'}" for t in targets)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(targets):]))
    print(f"results in {out}")
    return 0 if all(t["met"] for t in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
