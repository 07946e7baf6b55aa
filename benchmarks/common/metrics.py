"""Flatten per-level metrics (aiperf's or the built-in client's) into summary rows."""
from __future__ import annotations

from pathlib import Path

from benchmarks.common import aiperf, loadgen

SUMMARY_FIELDS = [
    "mode", "concurrency", "num_workers", "threads_total", "resources", "isl", "osl", "client", "prompts",
    "prompt_tokens", "cached_tokens", "cache_hit_ratio", "requests_ok", "requests_failed",
    "warmup_failed", "ttft_p50_ms", "ttft_p99_ms", "ttft_avg_ms", "itl_p50_ms", "itl_p99_ms", "itl_avg_ms",
    "request_latency_p50_ms", "request_throughput_rps", "output_token_throughput_tps",
    "tokens_per_s_per_user", "tokens_per_s_per_worker", "benchmark_duration_s", "load_avg_1m",
]


def read_level(artifact_dir: Path) -> dict:
    """The normalized metrics of one level, from whichever client wrote the directory."""
    artifact_dir = Path(artifact_dir)
    if (artifact_dir / aiperf.EXPORT_JSON).exists():
        return aiperf.read_export(artifact_dir)
    if (artifact_dir / loadgen.EXPORT_JSON).exists():
        return loadgen.read_export(artifact_dir)
    raise FileNotFoundError(f"{artifact_dir}: no {aiperf.EXPORT_JSON} or {loadgen.EXPORT_JSON}")


def _get(stats: dict | None, key: str):
    return None if not stats else stats.get(key)


def summary_row(level: dict, *, mode: str, concurrency: int, num_workers: int, isl: int, osl: int,
                resources: dict | None = None) -> dict:
    """One summary.csv row. tokens/s/user is the mean per-request decode rate (1/ITL);
    tokens/s/worker divides output token throughput by prefill+decode workers (GPU-equivalents).
    `resources` (perf.resources_of) says what the deployment ran on; prompt/cached tokens are the
    prefix-cache hits the workers counted during the level (None when not read)."""
    if num_workers < 1:
        raise ValueError(f"num_workers {num_workers}: must be >= 1")
    out_tps = level.get("output_token_throughput")
    return {
        "mode": mode, "concurrency": concurrency, "num_workers": num_workers,
        "threads_total": (resources or {}).get("threads_total"), "resources": (resources or {}).get("text"),
        "isl": isl, "osl": osl, "client": level.get("client"), "prompts": level.get("prompts"),
        "prompt_tokens": level.get("prompt_tokens"), "cached_tokens": level.get("cached_tokens"),
        "cache_hit_ratio": level.get("cache_hit_ratio"),
        "requests_ok": level.get("requests_ok"), "requests_failed": level.get("requests_failed"),
        "warmup_failed": level.get("warmup_failed"),
        "ttft_p50_ms": _get(level.get("ttft_ms"), "p50"), "ttft_p99_ms": _get(level.get("ttft_ms"), "p99"),
        "ttft_avg_ms": _get(level.get("ttft_ms"), "avg"),
        "itl_p50_ms": _get(level.get("itl_ms"), "p50"), "itl_p99_ms": _get(level.get("itl_ms"), "p99"),
        "itl_avg_ms": _get(level.get("itl_ms"), "avg"),
        "request_latency_p50_ms": _get(level.get("request_latency_ms"), "p50"),
        "request_throughput_rps": level.get("request_throughput"),
        "output_token_throughput_tps": out_tps,
        "tokens_per_s_per_user": _get(level.get("output_tps_per_user"), "avg"),
        "tokens_per_s_per_worker": None if out_tps is None else out_tps / num_workers,
        "benchmark_duration_s": level.get("benchmark_duration_s"),
        # 1-minute load average when the level ended: other work on the machine skews the numbers.
        "load_avg_1m": level.get("load_avg_1m"),
    }


def series(rows: list[dict], mode: str, key: str) -> tuple[list[int], list[float]]:
    """(concurrency, value) of one mode, sorted by concurrency, rows without the value skipped."""
    pts = sorted((r["concurrency"], r[key]) for r in rows if r["mode"] == mode and r.get(key) is not None)
    return [p[0] for p in pts], [p[1] for p in pts]
