"""Counters move by exactly the reported deltas; gauges follow; runtime helpers count right."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from tandem.metrics import ComponentMetrics, EngineMetrics, FrontendMetrics, RouterMetrics, SchedulerStats

L = {"model_name": "demo", "engine_type": "prefill", "tp_rank": "0", "pp_rank": "0", "worker_id": "p0"}


def val(reg, name, **labels):
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


@pytest.fixture
def reg():
    return CollectorRegistry()


def test_counters_move_by_deltas_and_gauges_follow(reg):
    em = EngineMetrics(reg, model_name="demo", engine_type="prefill", worker_id="p0")
    s1 = SchedulerStats(num_running_reqs=4, num_queue_reqs=2, token_usage=0.25, prompt_tokens=100,
                        generation_tokens=7, cached_tokens=30, realtime_prefill_compute_tokens=70,
                        realtime_prefill_cache_tokens=30, num_bootstrap_failed_reqs=1)
    s1.add_finished(e2e=2.5, ttft=0.5, queue_time=0.05, itl=[0.01, 0.03])
    s1.add_finished(e2e=0.3, aborted=True)
    em.apply(s1)
    s2 = SchedulerStats(num_running_reqs=1, prompt_tokens=5, num_transfer_failed_reqs=2)
    em.apply(SchedulerStats.from_bytes(s2.to_bytes()))  # through the wire format too

    assert val(reg, "sglang:prompt_tokens_total", **L) == 105
    assert val(reg, "sglang:generation_tokens_total", **L) == 7
    assert val(reg, "sglang:cached_tokens_total", **L) == 30
    assert val(reg, "sglang:num_requests_total", **L) == 1
    assert val(reg, "sglang:num_aborted_requests_total", **L) == 1
    assert val(reg, "sglang:num_bootstrap_failed_reqs_total", **L) == 1
    assert val(reg, "sglang:num_transfer_failed_reqs_total", **L) == 2
    assert val(reg, "sglang:realtime_tokens_total", **L, mode="prefill_compute") == 70
    assert val(reg, "sglang:realtime_tokens_total", **L, mode="prefill_cache") == 30
    assert val(reg, "sglang:realtime_tokens_total", **L, mode="decode") == 0
    # gauges: latest value; None leaves the previous one
    assert val(reg, "sglang:num_running_reqs", **L) == 1
    assert val(reg, "sglang:num_queue_reqs", **L) == 2
    assert val(reg, "sglang:token_usage", **L) == 0.25
    assert reg.get_sample_value("sglang:kv_transfer_speed_gb_s", L) is None  # never reported
    # histograms
    assert val(reg, "sglang:e2e_request_latency_seconds_count", **L) == 2
    assert val(reg, "sglang:e2e_request_latency_seconds_sum", **L) == pytest.approx(2.8)
    assert val(reg, "sglang:e2e_request_latency_seconds_bucket", **L, le="0.4") == 1
    assert val(reg, "sglang:time_to_first_token_seconds_count", **L) == 1
    assert val(reg, "sglang:inter_token_latency_seconds_count", **L) == 2
    assert val(reg, "sglang:inter_token_latency_seconds_bucket", **L, le="0.01") == 1
    assert val(reg, "sglang:queue_time_seconds_bucket", **L, le="0.1") == 1


def test_bad_stats_change_nothing(reg):
    em = EngineMetrics(reg, model_name="demo", engine_type="prefill", worker_id="p0")
    with pytest.raises(ValueError, match="generation_tokens"):
        em.apply(SchedulerStats(num_running_reqs=9, prompt_tokens=5, generation_tokens=-1))
    assert reg.get_sample_value("sglang:num_running_reqs", L) is None
    assert val(reg, "sglang:prompt_tokens_total", **L) == 0


def test_engine_metrics_rejects_bad_identity(reg):
    with pytest.raises(ValueError, match="engine_type"):
        EngineMetrics(reg, model_name="demo", engine_type="agg", worker_id="w")
    with pytest.raises(ValueError, match="model_name"):
        EngineMetrics(reg, model_name="", engine_type="decode", worker_id="w")


def test_stats_wire_format():
    s = SchedulerStats(num_running_reqs=3, eplb_gpu_physical_count={2: [1, 2]}, eplb_balancedness={"decode": [0.5]})
    back = SchedulerStats.from_bytes(s.to_bytes())
    assert back == s
    with pytest.raises(ValueError, match="msgpack"):
        SchedulerStats.from_bytes(b"\xc1")
    with pytest.raises(ValueError, match="schema version"):
        import msgpack
        SchedulerStats.from_bytes(msgpack.packb({"v": 99}))
    import msgpack
    # unknown fields from a newer sender are ignored
    assert SchedulerStats.from_bytes(msgpack.packb({"v": 1, "num_queue_reqs": 4, "future": 1})).num_queue_reqs == 4


def test_component_metrics_requests_errors_inflight_and_kv(reg):
    cm = ComponentMetrics(reg, component="decode", endpoint="generate", model="demo", worker_id="d0")
    lab = {"dynamo_namespace": "tandem", "dynamo_component": "decode", "dynamo_endpoint": "generate",
           "model": "demo", "worker_id": "d0"}
    with cm.track_request(request_bytes=10) as t:
        assert val(reg, "dynamo_component_inflight_requests", **lab) == 1
        t.first_response()
        t.first_response()
        t.add_response_bytes(5)
        t.add_response_bytes(6)
    with pytest.raises(TimeoutError):
        with cm.track_request():
            raise TimeoutError()
    with cm.track_request() as t:
        t.set_error("CANCELLED")
    with cm.track_request(endpoint="get_load"):
        pass
    assert val(reg, "dynamo_component_requests_total", **lab) == 3
    assert val(reg, "dynamo_component_requests_total", **{**lab, "dynamo_endpoint": "get_load"}) == 1
    assert val(reg, "dynamo_component_request_bytes_total", **lab) == 10
    assert val(reg, "dynamo_component_response_bytes_total", **lab) == 11
    assert val(reg, "dynamo_component_inflight_requests", **lab) == 0
    assert val(reg, "dynamo_component_request_duration_seconds_count", **lab) == 3
    assert val(reg, "dynamo_component_time_to_first_response_seconds_count", **lab) == 1
    assert val(reg, "dynamo_component_errors_total", **lab, error_type="TimeoutError") == 1
    assert val(reg, "dynamo_component_errors_total", **lab, error_type="CANCELLED") == 1
    assert val(reg, "dynamo_component_uptime_seconds", **lab) >= 0
    cm.apply_engine_stats(SchedulerStats(page_size=16, max_total_num_tokens=1600, num_used_tokens=33,
                                         token_usage=0.02, cache_hit_rate=0.4))
    assert val(reg, "dynamo_component_total_blocks", **lab) == 100
    assert val(reg, "dynamo_component_active_blocks", **lab) == 3
    assert val(reg, "dynamo_component_gpu_cache_usage_percent", **lab) == 0.02
    assert val(reg, "dynamo_component_gpu_prefix_cache_hit_rate", **lab) == 0.4


def test_frontend_metrics_request_lifecycle(reg):
    fm = FrontendMetrics(reg, model="demo")
    m = {"model": "demo"}
    with fm.track_request("chat_completions", "stream") as r:
        assert val(reg, "dynamo_frontend_inflight_requests", **m) == 1
        assert val(reg, "dynamo_frontend_queued_requests", **m) == 1
        r.set_input_tokens(40)
        r.set_cached_tokens(30, 40)
        r.on_tokens(1)
        assert val(reg, "dynamo_frontend_queued_requests", **m) == 0
        r.on_tokens(3)
    with pytest.raises(RuntimeError):
        with fm.track_request("completions", "unary"):
            raise RuntimeError("boom")
    assert val(reg, "dynamo_frontend_requests_total", model="demo", endpoint="chat_completions",
               request_type="stream", status="success") == 1
    assert val(reg, "dynamo_frontend_requests_total", model="demo", endpoint="completions",
               request_type="unary", status="error") == 1
    assert val(reg, "dynamo_frontend_inflight_requests", **m) == 0
    assert val(reg, "dynamo_frontend_queued_requests", **m) == 0
    assert val(reg, "dynamo_frontend_output_tokens_total", **m) == 4
    assert val(reg, "dynamo_frontend_time_to_first_token_seconds_count", **m) == 1
    assert val(reg, "dynamo_frontend_inter_token_latency_seconds_count", **m) == 3
    assert val(reg, "dynamo_frontend_output_sequence_tokens_sum", **m) == 4
    assert val(reg, "dynamo_frontend_input_sequence_tokens_sum", **m) == 40
    assert val(reg, "dynamo_frontend_kv_hit_rate_sum", **m) == 0.75
    assert val(reg, "dynamo_frontend_cached_tokens_sum", **m) == 30
    with pytest.raises(ValueError, match="request_type"):
        with fm.track_request("completions", "batch"):
            pass


def test_router_metrics(reg):
    rm = RouterMetrics(reg, model="demo")
    rm.record_decision(worker_id="d0", policy="kv_aware", overlap_blocks=5)
    rm.record_decision(worker_id="d0", policy="kv_aware", overlap_blocks=0)
    rm.record_decision(worker_id="d1", policy="round_robin")
    rm.observe_overhead_ms(total=0.3, scheduling=0.1)
    assert val(reg, "tandem_router_decisions_total", model="demo", worker_id="d0", policy="kv_aware") == 2
    assert val(reg, "tandem_router_decisions_total", model="demo", worker_id="d1", policy="round_robin") == 1
    assert val(reg, "tandem_router_kv_overlap_blocks_sum", model="demo", policy="kv_aware") == 5
    assert val(reg, "dynamo_router_overhead_total_ms_count", model="demo") == 1
    assert reg.get_sample_value("dynamo_router_overhead_block_hashing_ms_count", {"model": "demo"}) is None
