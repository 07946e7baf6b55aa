"""Worker metrics, profiling and warmup through real processes."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

from tests.support.clients import generate, sampling
from tests.support.procs import start_service
from tests.support.waiting import wait_for

MODEL = "models/tandem-demo-dense"
ENGINE = ["--model-path", MODEL, "--max-total-tokens", "4096"]

SGLANG_METRICS = [
    "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:num_used_tokens", "sglang:token_usage",
    "sglang:gen_throughput", "sglang:cache_hit_rate", "sglang:max_total_num_tokens",
    "sglang:prompt_tokens_total", "sglang:generation_tokens_total", "sglang:num_requests_total",
    "sglang:time_to_first_token_seconds_bucket", "sglang:inter_token_latency_seconds_bucket",
    "sglang:e2e_request_latency_seconds_bucket", "sglang:engine_load_weights_time",
]
DYNAMO_METRICS = [
    "dynamo_component_requests_total", "dynamo_component_request_duration_seconds_bucket",
    "dynamo_component_inflight_requests", "dynamo_component_model_load_time_seconds",
]


def scrape(system_address: str) -> dict[str, dict[str, float]]:
    """name -> {labels: value} from a /metrics page."""
    with urllib.request.urlopen(f"http://{system_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? ([-+\d.eEinfNa]+)$", line)
        if m:
            out.setdefault(m.group(1), {})[m.group(2) or ""] = float(m.group(3))
    return out


def total(metrics, name: str) -> float:
    return sum(metrics.get(name, {}).values())


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def worker():
    svc = start_service("tandem.decode", *ENGINE)
    yield svc
    svc.stop()


def test_metric_names_labels_and_counters_for_a_known_request(worker):
    before = scrape(worker.system_address)
    for name in SGLANG_METRICS + DYNAMO_METRICS:
        assert name in before, f"{name} missing from /metrics"
    labels = next(iter(before["sglang:num_running_reqs"]))
    for key in ("model_name=", "engine_type=\"unified\"", "tp_rank=", "worker_id="):
        assert key in labels, labels
    assert 'dynamo_component="decode"' in next(iter(before["dynamo_component_requests_total"]))

    prompt = list(range(40, 77))  # 37 tokens
    tokens, last = generate(worker.grpc_address, prompt, sampling(max_tokens=9, ignore_eos=True))
    assert len(tokens) == 9

    def moved():
        after = scrape(worker.system_address)
        return after if total(after, "sglang:num_requests_total") > total(before, "sglang:num_requests_total") else None

    after = wait_for(moved, timeout=15, what="the request's counters on /metrics")
    delta = lambda name: total(after, name) - total(before, name)  # noqa: E731
    assert delta("sglang:prompt_tokens_total") == 37
    assert delta("sglang:generation_tokens_total") == 9
    assert delta("sglang:num_requests_total") == 1
    assert delta("sglang:time_to_first_token_seconds_count") == 1
    assert delta("sglang:inter_token_latency_seconds_count") == 8
    assert delta("dynamo_component_requests_total") == 1
    assert total(after, "sglang:max_total_num_tokens") == 4096


def test_profile_a_few_decode_steps_writes_a_chrome_trace_with_the_forward(worker, tmp_path):
    base = f"http://{worker.system_address}"
    code, body = post(f"{base}/engine/start_profile", {"output_dir": str(tmp_path), "num_steps": 4,
                                                       "activities": ["CPU"]})
    assert code == 200, body
    assert post(f"{base}/engine/start_profile", {"num_steps": 1})[0] == 409  # one at a time
    generate(worker.grpc_address, list(range(30, 60)), sampling(max_tokens=8, ignore_eos=True))
    code, body = post(f"{base}/engine/stop_profile", {})
    assert code == 200, body
    trace = json.loads(open(body["trace_path"]).read())
    names = [e.get("name", "") for e in trace["traceEvents"]]
    assert names.count("tandem.model_forward") == 4
    assert any(n.startswith("aten::") for n in names)


def test_bad_profile_requests_get_clear_errors(worker):
    base = f"http://{worker.system_address}"
    code, body = post(f"{base}/engine/start_profile", {"num_steps": -1})
    assert code == 400 and "num_steps" in body["error"]
    code, body = post(f"{base}/engine/start_profile", {"activities": ["GPU"]})
    assert code == 400 and "activities" in body["error"]
    code, body = post(f"{base}/engine/stop_profile", {})
    assert code in (200, 409)


def test_prefill_warmup_runs_once_on_the_leader_before_serving():
    leader = start_service("tandem.prefill", *ENGINE)
    follower = start_service("tandem.prefill", *ENGINE, "--node-rank", "1")
    skipped = start_service("tandem.prefill", *ENGINE, "--skip-warmup")
    try:
        log = leader.log()
        assert log.count("prefill warmup (4 tokens): prefilled") == 1  # Dynamo's request, once
        assert log.count("prefill warmup (512 tokens): prefilled") == 1  # one full prefill chunk
        assert log.index("warmup done") < log.index("ready (SERVING)")
        assert "warmup" not in follower.log()
        assert "prefill warmup" not in skipped.log()
    finally:
        for s in (leader, follower, skipped):
            s.stop()
