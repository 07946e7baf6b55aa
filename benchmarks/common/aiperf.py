"""Run `aiperf profile` as Dynamo's perf.sh does, and read its exports.

One call = one concurrency level: chat endpoint, streaming, synthetic prompts of exactly
ISL tokens (stddev 0), OSL output tokens forced with max_tokens/min_tokens/ignore_eos,
request count and warmup count per level, fixed random seed, own artifact directory.

Offline note: aiperf 0.13 with HF_HUB_OFFLINE=1 resolves every tokenizer name through the
HF cache (snapshot_download(local_files_only=True)), so a local directory fails with
"Tokenizer '<dir>' (revision 'main') is not present in the HuggingFace cache". Without the
offline variables an absolute local directory is loaded straight from disk (no network),
so the runner removes them from aiperf's environment and passes an absolute path.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

EXPORT_JSON = "profile_export_aiperf.json"
RECORDS_JSONL = "profile_export.jsonl"  # one record per request, warmup included
NO_CONTENT = "response without content"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


class AiperfError(RuntimeError):
    """aiperf exited without producing its summary export."""


def aiperf_binary() -> str:
    """The aiperf CLI next to this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).with_name("aiperf")
    if here.exists():
        return str(here)
    found = shutil.which("aiperf")
    if not found:
        raise AiperfError("aiperf not found (pip install aiperf)")
    return found


def build_command(*, url: str, model: str, tokenizer: str, isl: int, osl: int, concurrency: int,
                  request_count: int, warmup_count: int, artifact_dir: Path, seed: int = 100,
                  input_file: Path | None = None, extra_args: list[str] | None = None) -> list[str]:
    """The `aiperf profile` argv for one concurrency level (Dynamo perf.sh flags). With
    `input_file` (see write_inputs) the prompts come from that file, one line per request in
    order, instead of aiperf's synthetic generator."""
    base_url = url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[: -len("/v1")]  # aiperf appends /v1/chat/completions itself
    cmd = [
        aiperf_binary(), "profile",
        "--model", model, "--tokenizer", str(Path(tokenizer).resolve()) if Path(tokenizer).exists() else tokenizer,
        "--url", base_url, "--endpoint-type", "chat", "--streaming",
        *(["--custom-dataset-type", "single_turn", "--input-file", str(Path(input_file).resolve()),
           "--dataset-sampling-strategy", "sequential"] if input_file else
          ["--synthetic-input-tokens-mean", str(isl), "--synthetic-input-tokens-stddev", "0"]),
        "--output-tokens-mean", str(osl), "--output-tokens-stddev", "0",
        "--extra-inputs", f"max_tokens:{osl}", "--extra-inputs", f"min_tokens:{osl}",
        "--extra-inputs", "ignore_eos:true",
        "--concurrency", str(concurrency), "--request-count", str(request_count),
        "--warmup-request-count", str(warmup_count), "--random-seed", str(seed),
        "--artifact-dir", str(artifact_dir),
        # Headless, and nothing that probes services this stack does not run (DCGM, /metrics on the
        # OpenAI port): those only add CPU load and warnings on the machine under test.
        "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry",
    ]
    return cmd + list(extra_args or [])


def write_inputs(path: Path, prompts: list[str]) -> Path:
    """aiperf's single_turn dataset: one {"text": prompt} line per request, sent in order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    return path


def run(cmd: list[str], artifact_dir: Path, timeout: float | None = None) -> Path:
    """Run aiperf; return the summary JSON path or raise AiperfError with its output tail."""
    artifact_dir = Path(artifact_dir)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    log = artifact_dir / "aiperf_stdout.log"
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AiperfError(f"aiperf timed out after {timeout}s (log: {log})") from e
    export = artifact_dir / EXPORT_JSON
    if proc.returncode != 0 or not export.exists():
        tail = log.read_text(errors="replace")[-2500:]
        raise AiperfError(f"aiperf exited with code {proc.returncode} (log: {log}); output tail:\n{tail}")
    return export


_STATS = ("avg", "p50", "p90", "p99", "min", "max")


def _stats(d: dict | None) -> dict | None:
    if not d:
        return None
    return {k: d[k] for k in _STATS if k in d}


def _scalar(d: dict | None) -> float | None:
    return None if not d else d.get("avg")


def record_failure(record: dict) -> str | None:
    """Why one of aiperf's per-request records failed; None when it returned content. A
    response without any output token is a failure even when aiperf raised no error for it."""
    err = record.get("error")
    if err:
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    tokens = ((record.get("metrics") or {}).get("output_token_count") or {}).get("value") or 0
    return None if tokens > 0 else NO_CONTENT


def count_records(path: Path) -> dict[str, dict]:
    """Per phase kind ("warmup", "profiling"): {"ok", "failed", "errors": {message: count}}."""
    phases: dict[str, dict] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        kind = (record.get("metadata") or {}).get("benchmark_phase", "profiling")
        phase = phases.setdefault(kind, {"ok": 0, "failed": 0, "errors": {}})
        why = record_failure(record)
        if why is None:
            phase["ok"] += 1
        else:
            phase["failed"] += 1
            phase["errors"][why] = phase["errors"].get(why, 0) + 1
    return phases


def _counts_from_summary(artifact_dir: Path, data: dict) -> tuple[int, int, int, list]:
    """(ok, failed, warmup_failed, errors) from the summary and phase manifest, for exports
    without per-request records."""
    ok = _scalar(data.get("request_count"))
    failed = warmup_failed = 0
    errors = []
    manifest = artifact_dir / "phase_manifest.json"
    if manifest.exists():
        for ph in json.loads(manifest.read_text()).get("phases", []):
            if ph.get("phase_kind") == "profiling":
                ok = ph.get("successful_request_count", ok)
                failed = ph.get("error_request_count", 0) or 0
            elif ph.get("phase_kind") == "warmup":
                warmup_failed = ph.get("error_request_count", 0) or 0
    for e in data.get("error_summary") or []:
        det = e.get("error_details") or {}
        errors.append({"count": e.get("count"), "message": str(det.get("message", det))[:300]})
    if not failed and errors:
        failed = sum(e["count"] or 0 for e in errors)
    return int(ok or 0), int(failed), int(warmup_failed), errors


def read_export(artifact_dir: Path) -> dict:
    """Normalize aiperf's profile_export_aiperf.json (+ its per-request records, or the phase
    manifest) into level metrics.

    Keys: ttft_ms, itl_ms, request_latency_ms, output_tps_per_user (percentile dicts),
    request_throughput, output_token_throughput, input_token_throughput, isl_avg, osl_avg,
    benchmark_duration_s, requests_ok, requests_failed, warmup_failed, errors (list of
    {count, message}). Counts come from the per-request records when aiperf wrote them, so
    that a request without content counts as failed whatever aiperf made of it.
    """
    artifact_dir = Path(artifact_dir)
    data = json.loads((artifact_dir / EXPORT_JSON).read_text())
    if (artifact_dir / RECORDS_JSONL).exists():
        phases = count_records(artifact_dir / RECORDS_JSONL)
        profiling = phases.get("profiling", {"ok": 0, "failed": 0, "errors": {}})
        ok, failed = profiling["ok"], profiling["failed"]
        warmup_failed = phases.get("warmup", {}).get("failed", 0)
        errors = [{"count": c, "message": m} for m, c in profiling["errors"].items()]
    else:
        ok, failed, warmup_failed, errors = _counts_from_summary(artifact_dir, data)
    return {
        "client": "aiperf",
        "ttft_ms": _stats(data.get("time_to_first_token")),
        "itl_ms": _stats(data.get("inter_token_latency")),
        "request_latency_ms": _stats(data.get("request_latency")),
        "output_tps_per_user": _stats(data.get("output_token_throughput_per_user")),
        "request_throughput": _scalar(data.get("request_throughput")),
        "output_token_throughput": _scalar(data.get("output_token_throughput")),
        "input_token_throughput": _scalar(data.get("input_token_throughput")),
        "isl_avg": _scalar(data.get("input_sequence_length")),
        "osl_avg": _scalar(data.get("output_sequence_length")),
        "benchmark_duration_s": _scalar(data.get("benchmark_duration")),
        "requests_ok": ok,
        "requests_failed": failed,
        "warmup_failed": warmup_failed,
        "errors": errors,
    }
