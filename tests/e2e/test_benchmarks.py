"""The benchmark suite end to end on the real stack: perf.py deploys agg (and, slow, agg +
disagg), runs AIPerf over concurrency 1 2 with a few tiny requests, and writes summary,
config snapshot, raw outputs and plots; profile_endpoint.py profiles prefill (and, slow,
decode). Nothing is mocked: the router, workers and engine are the real services."""
from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import metrics

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
PNG = b"\x89PNG\r\n\x1a\n"
PERF_PLOTS = ("ttft_vs_concurrency.png", "itl_vs_concurrency.png", "throughput_vs_concurrency.png", "pareto.png")


def free_port_base(span: int = 220) -> int:
    """A base with `span` free ports above it (perf.py uses base..base+160 for two modes). Random,
    and below the kernel's ephemeral range (32768+), from which port-0 servers and client
    connections draw: the suite runs two test files at once."""
    for base in random.sample(range(20000, 32700 - span, 250), 40):
        socks = []
        try:
            for p in range(base, base + span):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (our run dir): must be none after a run."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (d / "stat").read_text().split()[2]
            except OSError:
                continue
            if text in cmd and state != "Z":
                found.append(int(d.name))
    return found


def run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a benchmark script; however this test ends (its own timeout, pytest-timeout's signal, a
    failure), the script is asked to stop (SIGTERM: it stops the stacks it started) before the
    test returns, so no stack outlives it."""
    proc = subprocess.Popen([PY, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


def check_perf_run(out: Path, modes: list[str], conc: list[int], per_c: int) -> list[dict]:
    summary = json.loads((out / "summary.json").read_text())
    assert {"run", "fields", "rows"} <= set(summary)
    assert summary["run"]["git_commit"] and summary["run"]["machine"]["cpu_count"] >= 1
    rows = summary["rows"]
    assert [(r["mode"], r["concurrency"]) for r in rows] == [(m, c) for m in modes for c in conc]
    for r in rows:
        assert set(metrics.SUMMARY_FIELDS) <= set(r)
        assert r["client"] == "aiperf", "aiperf itself must have run (no fallback)"
        assert r["requests_failed"] == 0 and r["requests_ok"] == per_c * r["concurrency"]
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
        assert r["output_token_throughput_tps"] > 0 and r["tokens_per_s_per_user"] > 0
        assert r["tokens_per_s_per_worker"] == pytest.approx(r["output_token_throughput_tps"] / r["num_workers"])
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == metrics.SUMMARY_FIELDS and len(csv_lines) == len(rows) + 1
    for name in PERF_PLOTS:
        assert (out / name).read_bytes()[:8] == PNG, name
    info = json.loads((out / "run_info.json").read_text())
    assert info["git"]["commit"] and info["machine"]["cpu_model"] and info["finished"]
    for mode in modes:
        conf = out / f"config_{mode}"
        assert (conf / "router.yaml").is_file() and (conf / "decode-0.yaml").is_file()
        assert json.loads((conf / "stack.json").read_text())["mode"] == mode
        assert (conf / "prefill-0.yaml").is_file() == (mode == "disagg")
        for c in conc:
            raw = out / f"artifacts_{mode}" / f"-concurrency{c}"
            assert (raw / "profile_export_aiperf.json").is_file() and (raw / "profile_export.jsonl").is_file()
        assert processes_mentioning(str(out / f"stack_{mode}")) == [], "stack processes left behind"
    return rows


def test_perf_agg_tiny_sweep(tmp_path):
    out = tmp_path / "perf"
    run(["benchmarks/perf.py", "--mode", "agg", "--concurrency", "1", "2", "--isl", "32", "--osl", "8",
         "--requests-per-level", "2x", "--warmup-per-level", "1", "--port-base", str(free_port_base()),
         "--no-fallback", "--unique-prompts", "--agg-workers", "1", "--out", str(out)], timeout=300)
    rows = check_perf_run(out, ["agg"], [1, 2], per_c=2)
    for r in rows:  # every prompt differs from its first page on: the workers counted no prefix-cache hit
        assert r["prompts"] == "unique" and r["cached_tokens"] == 0
        assert r["prompt_tokens"] >= 32 * (1 + 2 * r["concurrency"])  # 1 warmup + 2xC requests, 32 tokens each
        assert r["num_workers"] == 1 and r["threads_total"] == 1


def test_profile_prefill_tiny(tmp_path):
    out = tmp_path / "prof"
    run(["benchmarks/profile_endpoint.py", "--phase", "prefill", "--mode", "agg", "--isl", "16", "64", "160",
         "--prefill-requests", "2", "--port-base", str(free_port_base()), "--out", str(out)], timeout=300)
    res = json.loads((out / "prefill_results.json").read_text())
    assert {"phase", "isl", "ttft_ms", "prefill_tokens_per_s_per_worker", "ttft_fit", "points"} <= set(res)
    assert res["isl"] == [16, 64, 160] and all(t > 0 for t in res["ttft_ms"])
    assert all(p["requests_failed"] == 0 for p in res["points"])
    assert len(res["ttft_fit"]["coefficients"]) == 3
    raw = np.load(out / "raw_data.npz")
    assert {"prefill_isl", "prefill_ttft", "prefill_thpt_per_gpu"} <= set(raw.files)
    for name in ("prefill_ttft.png", "prefill_throughput.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert (out / "config" / "stack.json").is_file()
    assert processes_mentioning(str(out / "stack")) == []


@pytest.mark.slow
def test_perf_both_modes_tiny_sweep(tmp_path):
    out = tmp_path / "perf"
    run(["benchmarks/perf.py", "--mode", "both", "--concurrency", "1", "2", "--isl", "32", "--osl", "8",
         "--requests-per-level", "2x", "--warmup-per-level", "1", "--port-base", str(free_port_base()),
         "--no-fallback", "--out", str(out)], timeout=600)
    rows = check_perf_run(out, ["agg", "disagg"], [1, 2], per_c=2)
    assert {r["num_workers"] for r in rows} == {2}  # agg gets as many workers as disagg's prefill + decode
    assert all(r["cached_tokens"] is not None and r["prompt_tokens"] > 0 for r in rows)
    assert json.loads((out / "summary.json").read_text())["run"]["like_for_like"] is True


@pytest.mark.slow
def test_profile_decode_disagg(tmp_path):
    out = tmp_path / "prof"
    run(["benchmarks/profile_endpoint.py", "--phase", "decode", "--mode", "disagg", "--context", "32", "128",
         "--batch", "1", "4", "--decode-osl", "8", "--port-base", str(free_port_base()), "--out", str(out)],
        timeout=600)
    res = json.loads((out / "decode_results.json").read_text())
    assert res["max_kv_tokens"] and len(res["points"]) == 4
    for p in res["points"]:
        assert p["requests_failed"] == 0 and p["itl_ms"] > 0 and 0 < p["kv_usage"] < 1
    raw = np.load(out / "raw_data.npz")
    assert {"x_kv_usage", "y_context_length", "z_itl", "z_thpt_per_gpu", "max_kv_tokens"} <= set(raw.files)
    for name in ("decode_itl.png", "decode_throughput.png"):
        assert (out / name).read_bytes()[:8] == PNG
