"""Results directories and their provenance: git commit, machine description, JSON/CSV."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNS_DIR = REPO / "benchmarks" / "runs"
# Versions recorded with every result: what the numbers depend on.
PACKAGES = ("torch", "triton", "transformers", "aiperf", "httpx", "nixl", "numpy", "grpcio", "protobuf",
            "xgrammar", "uvicorn", "fastapi", "tokenizers")


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def make_results_dir(out: str | os.PathLike | None, prefix: str = "") -> Path:
    """`out` as given, or benchmarks/runs/<prefix><timestamp>; created, must be empty or new."""
    path = Path(out) if out else RUNS_DIR / f"{prefix}{timestamp()}"
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"--out {path}: directory exists and is not empty; pick a new one")
    path.mkdir(parents=True, exist_ok=True)
    return path


def git_info(repo: Path = REPO) -> dict:
    """Commit, branch and whether the work tree had local changes (None where git is unavailable).

    ``TANDEM_GIT_STATE=FILE`` (written by build-support/git-state.sh before the tree is copied
    to another machine, the GPU device) takes precedence: the copy's own .git may be stale there
    (seen on the device tool: it reported the session's first commit, dirty)."""
    state_file = os.environ.get("TANDEM_GIT_STATE")
    if state_file:
        state = json.loads(Path(state_file).read_text())
        return {**state, "source": f"{state_file} (recorded before the tree was copied)"}

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": None if status is None else bool(status)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gpus() -> list[dict]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                    "sms": p.multi_processor_count, "driver": _nvidia_driver(), "cuda": torch.version.cuda})
    return out


def _nvidia_driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def machine_info() -> dict:
    """What the numbers were measured on."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_gib": _mem_total_gib(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 min: other work skews the numbers
        "gpus": _gpus(),
        "python": sys.version.split()[0],
        "packages": {d: _version(d) for d in PACKAGES},
    }


def command_line(argv: list[str] | None = None) -> str:
    """The full command line as a shell would run it: interpreter, script and arguments."""
    args = sys.argv if argv is None else [sys.argv[0], *argv]
    return " ".join(shlex.quote(a) for a in [sys.executable, *args])


def provenance(argv: list[str] | None = None) -> dict:
    """What every results file starts with, read when the script starts (before any code the
    run itself might change): full command line, git commit and dirty flag, machine, package
    versions, start time. ``argv`` is the argument list given to ``main(argv)`` if not sys.argv."""
    return {"command": command_line(argv), "git": git_info(), "machine": machine_info(),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}


def target(name: str, value, goal: str, met: bool | None) -> dict:
    """One target a script checks: its name, the measured value, the goal as text, whether it is met
    (None: not measured in this run)."""
    return {"target": name, "value": value, "goal": goal, "met": met}


def _target_line(t: dict) -> str:
    verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
    return f"{t['target']}: {t['value']} (goal {t['goal']}): {verdict}"


def print_targets(targets: list[dict]) -> None:
    """Print every target and whether it is met, one a line."""
    print("targets:")
    for t in targets:
        print(f"  {_target_line(t)}")


def target_items(targets: list[dict]) -> list[str]:
    """Every target and whether it is met, as markdown list items (a results .md's lines)."""
    return [f"- {_target_line(t)}" for t in targets]


def written_by(script: str, r: dict) -> str:
    """The provenance sentence a results .md starts with: script, time, commit, dirty flag, command."""
    gi = r.get("git") or {}
    when = r.get("time") or r.get("started")
    return (f"Written by `{script}` at {when}, commit `{gi.get('commit')}` (dirty: {gi.get('dirty')}). "
            f"Command: `{r.get('command')}`")


def write_results(path: str | os.PathLike, result: dict, write_markdown=None) -> None:
    """``result`` as JSON at ``path`` and, with ``write_markdown(md_path, result)``, a .md beside it."""
    out = Path(path)
    write_json(out, result)
    if write_markdown is not None:
        write_markdown(out.with_suffix(".md"), result)
    print(f"wrote {out}" + (f" and {out.with_suffix('.md')}" if write_markdown is not None else ""))


def write_json(path: Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in fields})
    return path


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v

