"""benchmarks/ab_alternate.py with a tiny fake benchmark: each side runs in its own tree (its
libs/ first on the path, never the other's), the order alternates, medians and oriented
ratios are right, the results file names both trees' commits, and a target missed fails."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from benchmarks import ab_alternate

# The fake benchmark: reports the speed its tree's libs/ declares, and which tree it ran in.
BENCH = """
import json, os, sys
import fakelib
out = {"rows": [{"tok_s": fakelib.SPEED}], "step_ms": 1000.0 / fakelib.SPEED, "cwd": os.getcwd(),
       "lib": fakelib.__file__, "git_state": os.environ.get("TANDEM_GIT_STATE")}
dest = sys.argv[1] if len(sys.argv) > 1 else None
if dest:
    open(dest, "w").write(json.dumps(out))
else:
    print("some log line")
    print(json.dumps(out))
"""


def make_tree(root: Path, speed: float, commit: str) -> Path:
    (root / "libs").mkdir(parents=True)
    (root / "libs" / "fakelib.py").write_text(f"SPEED = {speed}\n")
    (root / "bench.py").write_text(BENCH)
    (root / ".git-state.json").write_text(json.dumps({"commit": commit, "dirty": False}))
    return root


@pytest.fixture
def trees(tmp_path, monkeypatch):
    base = make_tree(tmp_path / "base", 100.0, "b" * 40)
    current = make_tree(tmp_path / "current", 98.0, "c" * 40)
    monkeypatch.setattr(ab_alternate, "REPO", current)
    # Either tree on the caller's PYTHONPATH must not leak into the other side's runs.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(base / "libs"), str(current / "libs")]))
    return base, current


def run(base, out, *extra, command=("{out}",)):
    argv = ["--base-dir", str(base), "--rounds", "3", "--out", str(out), *extra, "--",
            sys.executable, "bench.py", *command]
    return ab_alternate.main(argv)


def test_sides_run_in_their_own_tree_alternately_and_compare_medians(trees, tmp_path):
    base, current = trees
    out = tmp_path / "res" / "ab.json"
    rc = run(base, out, "--metric", "rows.0.tok_s", "--metric", "step_ms:lower", "--target", "0.97")
    assert rc == 0
    r = json.loads(out.read_text())
    assert [row["order"][0] for row in r["rounds"]] == ["base", "current", "base"]
    assert r["trees"]["base"]["commit"] == "b" * 40 and r["trees"]["current"]["commit"] == "c" * 40
    for row in r["rounds"]:
        assert row["base"]["metrics"]["rows.0.tok_s"] == 100.0 and row["current"]["metrics"]["rows.0.tok_s"] == 98.0
    tok, step = r["summary"]["rows.0.tok_s"], r["summary"]["step_ms"]
    assert tok["median"] == {"base": 100.0, "current": 98.0} and tok["ratio"] == pytest.approx(0.98)
    assert step["ratio"] == pytest.approx(0.98)  # lower is better: base / current
    assert all(t["met"] for t in r["targets"]) and "benchmark_command" in r and r["machine"]["python"]
    assert "NOT MET" not in out.with_suffix(".md").read_text()


def test_a_missed_target_fails_and_stdout_json_is_read(trees, tmp_path):
    base, _ = trees
    out = tmp_path / "ab.json"
    assert run(base, out, "--metric", "rows.0.tok_s", "--target", "0.99", command=()) == 1
    r = json.loads(out.read_text())
    assert r["targets"][0]["met"] is False and r["summary"]["rows.0.tok_s"]["ratio"] == pytest.approx(0.98)


def test_each_run_sees_only_its_tree(trees, tmp_path, monkeypatch):
    base, current = trees
    seen = []
    real = ab_alternate.run_once

    def spy(*a, **kw):
        doc, wall = real(*a, **kw)
        seen.append((a[1], doc["cwd"], doc["lib"], doc["git_state"]))
        return doc, wall

    monkeypatch.setattr(ab_alternate, "run_once", spy)
    run(base, tmp_path / "ab.json", "--metric", "rows.0.tok_s")
    for side, cwd, lib, state in seen:
        tree = base if side == "base" else current
        assert Path(cwd) == tree and Path(lib).parent == tree / "libs" and Path(state) == tree / ".git-state.json"


def test_a_failing_command_or_missing_metric_is_an_error(trees, tmp_path):
    base, _ = trees
    with pytest.raises(KeyError, match="nope"):
        run(base, tmp_path / "ab.json", "--metric", "rows.0.nope")
    with pytest.raises(RuntimeError, match="failed"):
        ab_alternate.main(["--base-dir", str(base), "--metric", "x", "--out", str(tmp_path / "ab.json"), "--",
                           sys.executable, "-c", "raise SystemExit(3)"])
