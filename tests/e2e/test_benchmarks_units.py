"""Fast checks of the benchmark suite's pieces that need no running stack: AIPerf export
parsing, the built-in client's metric definitions, summary rows, plots, argument handling."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from benchmarks import perf
from benchmarks.common import aiperf, deploy, loadgen, metrics, multiturn, plots, results, worker_metrics
from deploy.local.stack import plan_stack

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "tandem-demo-dense"
PNG = b"\x89PNG\r\n\x1a\n"


def _stats(avg, p50, p99):
    return {"unit": "ms", "avg": avg, "p50": p50, "p90": p99, "p99": p99, "min": p50, "max": p99}


def write_aiperf_export(d: Path, *, ttft=(30.0, 29.0, 40.0), itl=(5.0, 4.5, 7.0), rps=10.0, otps=80.0,
                        per_user=150.0, ok=10, failed=0) -> Path:
    """The subset of aiperf 0.13's profile_export_aiperf.json + phase_manifest.json we read."""
    d.mkdir(parents=True, exist_ok=True)
    data = {
        "schema_version": "1", "time_to_first_token": _stats(*ttft), "inter_token_latency": _stats(*itl),
        "request_latency": _stats(70.0, 68.0, 90.0),
        "output_token_throughput_per_user": dict(_stats(per_user, per_user, per_user), unit="tokens/sec/user"),
        "request_throughput": {"unit": "requests/sec", "avg": rps},
        "output_token_throughput": {"unit": "tokens/sec", "avg": otps},
        "input_token_throughput": {"unit": "tokens/sec", "avg": otps * 8},
        "input_sequence_length": {"unit": "tokens", "avg": 64.0}, "output_sequence_length": {"unit": "tokens", "avg": 8.0},
        "benchmark_duration": {"unit": "sec", "avg": 1.0}, "request_count": {"unit": "requests", "avg": float(ok)},
        "error_summary": ([{"error_details": {"code": 500, "type": "x", "message": "boom"}, "count": failed}]
                          if failed else []),
    }
    (d / aiperf.EXPORT_JSON).write_text(json.dumps(data))
    manifest = {"phases": [{"phase_kind": "warmup", "successful_request_count": 2, "error_request_count": 0},
                           {"phase_kind": "profiling", "successful_request_count": ok, "error_request_count": failed}]}
    (d / "phase_manifest.json").write_text(json.dumps(manifest))
    return d


def test_aiperf_export_to_summary_row(tmp_path):
    d = write_aiperf_export(tmp_path / "-concurrency2", ok=9, failed=1)
    level = metrics.read_level(d)
    assert level["client"] == "aiperf"
    assert level["requests_ok"] == 9 and level["requests_failed"] == 1
    assert level["errors"] == [{"count": 1, "message": "boom"}]
    row = metrics.summary_row(level, mode="disagg", concurrency=2, num_workers=2, isl=64, osl=8)
    assert set(row) == set(metrics.SUMMARY_FIELDS)
    assert (row["ttft_p50_ms"], row["ttft_p99_ms"], row["itl_p50_ms"], row["itl_p99_ms"]) == (29.0, 40.0, 4.5, 7.0)
    assert row["request_throughput_rps"] == 10.0 and row["output_token_throughput_tps"] == 80.0
    assert row["tokens_per_s_per_worker"] == 40.0 and row["tokens_per_s_per_user"] == 150.0
    with pytest.raises(ValueError, match="num_workers"):
        metrics.summary_row(level, mode="agg", concurrency=1, num_workers=0, isl=1, osl=2)


def test_aiperf_records_count_a_response_without_content_as_failed(tmp_path):
    d = write_aiperf_export(tmp_path / "-concurrency2", ok=3, failed=0)  # aiperf's summary says: no failure

    def record(phase, tokens=8, error=None):
        r = {"metadata": {"benchmark_phase": phase}, "metrics": {"output_token_count": {"value": tokens}}}
        return {**r, "error": error} if error else r

    records = [record("warmup"), record("warmup", tokens=0), record("profiling"), record("profiling"),
               record("profiling", tokens=0), record("profiling", 0, {"type": "x", "message": "HTTP 503"})]
    (d / aiperf.RECORDS_JSONL).write_text("\n".join(json.dumps(r) for r in records) + "\n")
    level = aiperf.read_export(d)
    assert (level["requests_ok"], level["requests_failed"], level["warmup_failed"]) == (2, 2, 1)
    assert sorted(e["message"] for e in level["errors"]) == ["HTTP 503", aiperf.NO_CONTENT]


def _sse_stream(*chunks) -> httpx.MockTransport:
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.MockTransport(lambda _req: httpx.Response(200, text=body,
                                                           headers={"content-type": "text/event-stream"}))


def test_builtin_client_counts_a_stream_without_content_as_failed():
    async def one(transport):
        async with httpx.AsyncClient(transport=transport) as client:
            return await loadgen.one_request(client, "http://x/v1", "m", "hi", 4, 2, warmup=False)

    empty = asyncio.run(one(_sse_stream({"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                                        {"choices": [{"delta": {}, "finish_reason": "abort"}]})))
    assert empty.error == "no content chunk received"
    full = asyncio.run(one(_sse_stream({"choices": [{"delta": {"content": "a"}}]},
                                       {"choices": [{"delta": {"content": "b"}, "finish_reason": "length"}]})))
    assert full.error is None and full.chunks == 2
    s = loadgen.summarize([empty, full, loadgen.RequestRecord(start=0.0, end=0.1, error="HTTP 503", warmup=True)])
    assert (s["requests_ok"], s["requests_failed"], s["warmup_failed"]) == (1, 1, 1)


def test_builtin_summary_uses_aiperf_definitions():
    # Two requests of 5 output tokens: TTFT 0.1 s and 0.2 s, then 4 more tokens over 0.4 s / 0.8 s.
    recs = [loadgen.RequestRecord(start=0.0, end=0.5, ttft_s=0.1, output_tokens=5, input_tokens=16),
            loadgen.RequestRecord(start=0.0, end=1.0, ttft_s=0.2, output_tokens=5, input_tokens=16),
            loadgen.RequestRecord(start=0.5, end=0.6, error="HTTP 503: busy")]
    s = loadgen.summarize(recs)
    assert s["requests_ok"] == 2 and s["requests_failed"] == 1
    assert s["errors"] == [{"count": 1, "message": "HTTP 503: busy"}]
    assert s["ttft_ms"]["avg"] == pytest.approx(150.0)
    assert s["itl_ms"]["min"] == pytest.approx(100.0) and s["itl_ms"]["max"] == pytest.approx(200.0)
    assert s["output_tps_per_user"]["avg"] == pytest.approx((10.0 + 5.0) / 2)
    assert s["request_throughput"] == pytest.approx(2.0)  # 2 ok over a 1.0 s window
    assert s["output_token_throughput"] == pytest.approx(10.0)


def test_prompt_factory_exact_lengths():
    pf = loadgen.PromptFactory(MODEL, seed=1)
    for n in (1, 7, 64, 700):
        texts = {pf.make(n) for _ in range(3)}
        assert len(texts) == 3  # different per request: no prefix-cache hits
        assert all(pf.count(t) == n for t in texts)
    with pytest.raises(ValueError, match="tokenizer.json"):
        loadgen.PromptFactory(REPO)


def test_aiperf_command_matches_dynamo_perf_sh(tmp_path):
    cmd = aiperf.build_command(url="http://127.0.0.1:9/v1", model="m", tokenizer=str(MODEL), isl=3000, osl=150,
                               concurrency=4, request_count=40, warmup_count=8, artifact_dir=tmp_path)
    s = " ".join(cmd)
    for frag in ("--endpoint-type chat", "--streaming", "--synthetic-input-tokens-mean 3000",
                 "--synthetic-input-tokens-stddev 0", "--output-tokens-mean 150", "--extra-inputs max_tokens:150",
                 "--extra-inputs min_tokens:150", "--extra-inputs ignore_eos:true", "--concurrency 4",
                 "--request-count 40", "--warmup-request-count 8", "--random-seed 100",
                 f"--tokenizer {MODEL}", "--url http://127.0.0.1:9 "):
        assert frag in s, frag


def test_aiperf_failure_is_reported_with_output(tmp_path):
    with pytest.raises(aiperf.AiperfError, match="code 3"):
        aiperf.run([sys.executable, "-c", "print('no tokenizer'); raise SystemExit(3)"], tmp_path)
    assert "no tokenizer" in (tmp_path / "aiperf_stdout.log").read_text()


def test_pareto_frontier():
    xs, ys = plots.pareto_frontier([1, 2, 3, 2.5, 0.5], [10, 8, 3, 2, 11])
    assert list(zip(xs, ys, strict=True)) == [(0.5, 11), (1, 10), (2, 8), (3, 3)]


def test_counts_and_validation():
    assert perf.parse_count("10x") == (10, True) and perf.parse_count("7") == (7, False)
    assert perf.level_count((10, True), 4) == 40 and perf.level_count((7, False), 4) == 7
    for bad in ("x", "-1", "ten"):
        with pytest.raises(Exception, match="must be|expected"):
            perf.parse_count(bad)
    with pytest.raises(ValueError, match="port-base"):
        deploy.port_layout(80)
    with pytest.raises(ValueError, match="--prefill"):
        deploy.stack_config("disagg", None, 0, 1, 30000)
    assert perf.main(["--concurrency", "0"]) == 2
    assert perf.main(["--url", "http://x/v1", "--mode", "both"]) == 2


def test_stack_config_ports_and_workers():
    cfg = deploy.stack_config("disagg", str(MODEL), 2, 1, 30000)
    assert cfg["ports"]["router_http"] == 30000 and cfg["ports"]["decode_grpc"] == 30030
    assert deploy.num_workers(cfg) == 3
    assert deploy.num_workers(deploy.stack_config("agg", str(MODEL), 2, 1, 30000)) == 1


def _fake_run(d: Path, scale: float) -> Path:
    rows = []
    for mode, workers in (("agg", 1), ("disagg", 2)):
        for c in (1, 2, 4):
            lvl = aiperf.read_export(write_aiperf_export(d / f"artifacts_{mode}" / f"-concurrency{c}",
                                                         ttft=(10.0 * c, 9.0 * c, 12.0 * c), rps=scale * c,
                                                         otps=scale * 8 * c, per_user=100.0 / c))
            rows.append(metrics.summary_row(lvl, mode=mode, concurrency=c, num_workers=workers, isl=64, osl=8))
    perf.write_summary(d, rows, {"git_commit": "abc", "machine": {"cpu_count": 2, "gpus": []}, "model": "m",
                                 "isl": 64, "osl": 8})
    return d


def test_plots_and_compare(tmp_path):
    a, b = _fake_run(tmp_path / "A", 1.0), _fake_run(tmp_path / "B", 2.0)
    rows = json.loads((a / "summary.json").read_text())["rows"]
    paths = plots.perf_plots(perf.groups_of(rows), a, "test")
    assert [p.name for p in paths] == ["ttft_vs_concurrency.png", "itl_vs_concurrency.png",
                                       "throughput_vs_concurrency.png", "pareto.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)
    assert (a / "summary.csv").read_text().splitlines()[0].split(",") == metrics.SUMMARY_FIELDS
    out = tmp_path / "cmp"
    assert perf.main(["--compare", str(a), str(b), "--out", str(out)]) == 0
    assert all((out / p.name).read_bytes()[:8] == PNG for p in paths)
    cmp_rows = json.loads((out / "compare.json").read_text())["rows"]
    assert {r["run"] for r in cmp_rows} == {"A", "B"} and len(cmp_rows) == 12
    assert perf.main(["--compare", str(a), str(tmp_path / "missing")]) == 2


def test_perf_sh_wrapper_passes_arguments():
    r = subprocess.run([str(REPO / "benchmarks" / "perf.sh"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--compare" in r.stdout


def test_stack_overrides():
    assert deploy.parse_overrides(["router.health_check_interval=1.0", "engine.page_size=32"]) == {
        "router": {"health_check_interval": 1.0}, "engine": {"page_size": 32}}
    for bad in ("router.x", "x=1", "ports.router_http=1"):
        with pytest.raises(ValueError, match="--set"):
            deploy.parse_overrides([bad])
    cfg = deploy.stack_config("agg", str(MODEL), 1, 1, 30000, sections={"router": {"health_check_interval": 1.0}})
    assert cfg["router"]["health_check_interval"] == 1.0 and cfg["router"]["routing_policy"] == "round_robin"
    assert perf.main(["--set", "bogus"]) == 2


def test_like_for_like_resources():
    agg = deploy.stack_config("agg", str(MODEL), 1, 3, 30000, sections={"engine": {"torch_num_threads": 2}})
    dis = deploy.stack_config("disagg", str(MODEL), 1, 3, 30000, sections={"engine": {"torch_num_threads": 2}})
    ra, rd = perf.resources_of(agg), perf.resources_of(dis)
    assert (ra["workers"], ra["threads_total"], rd["workers"], rd["threads_total"]) == (3, 6, 4, 8)
    assert "1 prefill + 3 decode" in rd["text"] and "3 aggregated" in ra["text"]
    assert perf.like_for_like({"agg": ra, "disagg": rd}) is False
    assert perf.like_for_like({"agg": perf.resources_of(deploy.stack_config("agg", str(MODEL), 1, 4, 30000,
                                                                             sections={"engine": {"torch_num_threads": 2}})),
                               "disagg": rd}) is True
    assert perf.like_for_like({"agg": ra}) is None
    args = perf.build_parser().parse_args(["--prefill", "2", "--decode", "3"])
    assert perf.agg_workers(args) == 5  # the default: as many workers as disagg's prefill + decode
    assert perf.main(["--agg-workers", "0"]) == 2
    assert perf.main(["--url", "http://x/v1", "--mode", "agg", "--num-workers", "2", "--agg-workers", "2"]) == 2


def test_cache_hits_from_worker_counters():
    page = ("# HELP sglang:cached_tokens_total Number of cached prompt tokens.\n"
            "# TYPE sglang:cached_tokens_total counter\n"
            'sglang:cached_tokens_total{model_name="m",engine_type="unified"} 48.0\n'
            'sglang:prompt_tokens_total{model_name="m",engine_type="unified"} 300.0\n'
            'sglang:prompt_tokens_created{model_name="m"} 1.7e9\n'
            'sglang:cached_tokens_total_bogus 5.0\n')
    assert worker_metrics.parse_counters(page) == {"prompt_tokens": 300.0, "cached_tokens": 48.0}
    before = {"a": {"prompt_tokens": 100.0, "cached_tokens": 16.0}, "b": {"prompt_tokens": 0.0, "cached_tokens": 0.0}}
    after = {"a": {"prompt_tokens": 300.0, "cached_tokens": 48.0}, "b": {"prompt_tokens": 200.0, "cached_tokens": 32.0}}
    assert worker_metrics.cache_hits(before, after) == {"prompt_tokens": 400, "cached_tokens": 64,
                                                        "cache_hit_ratio": 0.16}
    assert worker_metrics.cache_hits(before, before)["cache_hit_ratio"] is None
    specs = plan_stack(deploy.stack_config("disagg", str(MODEL), 1, 2, 30000))
    assert worker_metrics.prefill_workers(specs, "disagg") == {"prefill-0": "127.0.0.1:30020"}
    specs = plan_stack(deploy.stack_config("agg", str(MODEL), 1, 2, 30000))
    assert sorted(worker_metrics.prefill_workers(specs, "agg")) == ["decode-0", "decode-1"]


def test_unique_prompts_go_to_aiperf_as_a_file(tmp_path):
    pf = loadgen.PromptFactory(MODEL, seed=1)
    prompts = [pf.make(40) for _ in range(6)]
    assert len({p[:40] for p in prompts}) == 6  # every prompt starts differently: no shared prefix page
    path = aiperf.write_inputs(tmp_path / "inputs.jsonl", prompts)
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == prompts
    cmd = " ".join(aiperf.build_command(url="http://127.0.0.1:9/v1", model="m", tokenizer=str(MODEL), isl=40, osl=8,
                                        concurrency=2, request_count=4, warmup_count=2, artifact_dir=tmp_path,
                                        input_file=path))
    assert f"--custom-dataset-type single_turn --input-file {path.resolve()} --dataset-sampling-strategy sequential" in cmd
    assert "--synthetic-input-tokens-mean" not in cmd and "--extra-inputs max_tokens:8" in cmd


def test_provenance_and_targets(capsys):
    info = results.provenance(["--n", "3"])
    assert info["command"].endswith("--n 3") and info["command"].startswith(sys.executable)
    assert {"commit", "dirty"} <= set(info["git"]) and info["machine"]["packages"]["grpcio"]
    results.print_targets([results.target("x (ms)", 2.6, "<= 1", False), results.target("y", 5, ">= 2", True),
                           results.target("z", None, ">= 2", None)])
    out = capsys.readouterr().out
    assert "x (ms): 2.6 (goal <= 1): NOT met" in out and "y: 5 (goal >= 2): met" in out and "not measured" in out


def test_turns_validation_and_summary():
    """perf.py --turns: the arguments it refuses, and the medians, ratios and targets of its rounds."""
    assert perf.main(["--turns", "1"]) == 2
    assert perf.main(["--turns", "3", "--mode", "agg"]) == 2
    assert perf.main(["--turns", "3", "--set", "disaggregation.disaggregation_decode_enable_radix_cache=true"]) == 2
    assert perf.main(["--turns", "3", "--chats", "0"]) == 2

    def arm(transferred, computed, ttft):
        return {"transferred_tokens": transferred, "reused_tokens": 0, "prefill_computed_tokens": computed,
                "decode_computed_tokens": 0, "ttft_first_turn_p50_ms": 100.0, "ttft_later_turns_p50_ms": ttft,
                "load_avg_1m": 1.0}

    rounds = [{"on": arm(100, 400, 50.0), "off": arm(1000, 800, 100.0), "answers_identical": True},
              {"on": arm(300, 800, 90.0), "off": arm(1000, 800, 100.0), "answers_identical": True},
              {"on": arm(200, 100, 20.0), "off": arm(1000, 1000, 40.0), "answers_identical": False}]
    s = perf.multiturn_summary(rounds, ["on", "off"])
    assert s["on"]["transferred_tokens"] == 200 and s["off"]["prefill_computed_tokens"] == 800
    # Ratios per round (0.1, 0.3, 0.2; 0.5, 1.0, 0.1), then their median.
    assert s["ratio_on_off"]["transferred_tokens"] == 0.2 and s["ratio_on_off"]["prefill_computed_tokens"] == 0.5
    assert s["answers_identical_all_rounds"] is False
    targets = perf.multiturn_targets(s)
    assert [t["met"] for t in targets] == [True, True]
    rounds[0]["on"]["transferred_tokens"] = rounds[2]["on"]["transferred_tokens"] = 400
    assert [t["met"] for t in perf.multiturn_targets(perf.multiturn_summary(rounds, ["on", "off"]))] == [False, True]
    assert perf.multiturn_targets(perf.multiturn_summary(rounds[:1], ["on"])) == []


def test_counters_of_the_multiturn_workload():
    page = ('tandem_pd_transferred_tokens_total{model_name="m"} 96.0\n'
            'tandem_pd_decode_reused_tokens_total{model_name="m"} 512.0\n'
            'sglang:prompt_tokens_total{model_name="m"} 700.0\n')
    assert worker_metrics.parse_counters(page, multiturn.DECODE_COUNTERS) == {
        "transferred": 96.0, "reused": 512.0, "prompt_tokens": 700.0, "cached_tokens": 0.0}
