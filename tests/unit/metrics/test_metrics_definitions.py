"""Metric names, types, label sets and buckets, checked against explicit lists."""
from __future__ import annotations

from prometheus_client import CollectorRegistry
from tandem.metrics import ComponentMetrics, EngineMetrics, FrontendMetrics, RouterMetrics, SchedulerStats

SG = ("engine_type", "model_name", "pp_rank", "tp_rank", "worker_id")
CO = ("dynamo_component", "dynamo_endpoint", "dynamo_namespace", "model", "worker_id")

# family name (as exposed, prometheus_client strips _total from counter families) -> (type, labels)
EXPECTED_ENGINE = {
    "sglang:num_running_reqs": ("gauge", SG),
    "sglang:num_used_tokens": ("gauge", SG),
    "sglang:token_usage": ("gauge", SG),
    "sglang:gen_throughput": ("gauge", SG),
    "sglang:num_queue_reqs": ("gauge", SG),
    "sglang:cache_hit_rate": ("gauge", SG),
    "sglang:max_total_num_tokens": ("gauge", SG),
    "sglang:num_retracted_reqs": ("gauge", SG),
    "sglang:num_prefill_prealloc_queue_reqs": ("gauge", SG),
    "sglang:num_prefill_inflight_queue_reqs": ("gauge", SG),
    "sglang:num_decode_prealloc_queue_reqs": ("gauge", SG),
    "sglang:num_decode_transfer_queue_reqs": ("gauge", SG),
    "sglang:kv_transfer_speed_gb_s": ("gauge", SG),
    "sglang:kv_transfer_latency_ms": ("gauge", SG),
    "sglang:kv_transfer_bootstrap_ms": ("gauge", SG),
    "sglang:kv_transfer_alloc_ms": ("gauge", SG),
    "sglang:kv_transfer_total_mb": ("gauge", SG),
    "sglang:utilization": ("gauge", SG),
    "sglang:engine_startup_time": ("gauge", SG),
    "sglang:engine_load_weights_time": ("gauge", SG),
    "sglang:kv_used_tokens": ("gauge", SG),
    "sglang:kv_evictable_tokens": ("gauge", SG),
    "sglang:kv_available_tokens": ("gauge", SG),
    "sglang:hicache_host_used_tokens": ("gauge", SG),
    "sglang:hicache_host_total_tokens": ("gauge", SG),
    "sglang:prefetch_occupied_ratio": ("gauge", SG),
    "sglang:prompt_tokens": ("counter", SG),
    "sglang:generation_tokens": ("counter", SG),
    "sglang:cached_tokens": ("counter", SG),
    "sglang:num_requests": ("counter", SG),
    "sglang:num_aborted_requests": ("counter", SG),
    "sglang:num_bootstrap_failed_reqs": ("counter", SG),
    "sglang:num_transfer_failed_reqs": ("counter", SG),
    "sglang:num_retracted_requests": ("counter", SG),
    "sglang:realtime_tokens": ("counter", SG + ("mode",)),
    "sglang:lora_requests": ("counter", SG + ("lora_name",)),
    "sglang:lora_prompt_tokens": ("counter", SG + ("lora_name",)),
    "sglang:lora_generation_tokens": ("counter", SG + ("lora_name",)),
    "sglang:evicted_tokens": ("counter", SG),
    "sglang:load_back_tokens": ("counter", SG),
    "sglang:prefetched_tokens": ("counter", SG),
    "sglang:backuped_tokens": ("counter", SG),
    "tandem_pd_transferred_tokens": ("counter", SG),
    "tandem_pd_decode_reused_tokens": ("counter", SG),
    "tandem_hicache_host_hit_tokens": ("counter", SG),
    "tandem_hicache_load_back_bytes": ("counter", SG),
    "tandem_hicache_backup_bytes": ("counter", SG),
    "tandem_hicache_storage_corrupt_pages": ("counter", SG),
    "sglang:time_to_first_token_seconds": ("histogram", SG),
    "sglang:inter_token_latency_seconds": ("histogram", SG),
    "sglang:e2e_request_latency_seconds": ("histogram", SG),
    "sglang:queue_time_seconds": ("histogram", SG),
    "sglang:eviction_duration_seconds": ("histogram", SG),
    "sglang:load_back_duration_seconds": ("histogram", SG),
    "sglang:eplb_balancedness": ("summary", SG + ("forward_mode",)),
    "sglang:eplb_gpu_physical_count": ("histogram", SG + ("layer",)),
}
EXPECTED_COMPONENT = {
    "dynamo_component_requests": ("counter", CO),
    "dynamo_component_request_bytes": ("counter", CO),
    "dynamo_component_response_bytes": ("counter", CO),
    "dynamo_component_inflight_requests": ("gauge", CO),
    "dynamo_component_request_duration_seconds": ("histogram", CO),
    "dynamo_component_errors": ("counter", CO + ("error_type",)),
    "dynamo_component_time_to_first_response_seconds": ("histogram", CO),
    "dynamo_component_uptime_seconds": ("gauge", CO),
    "dynamo_component_total_blocks": ("gauge", CO),
    "dynamo_component_active_blocks": ("gauge", CO),
    "dynamo_component_gpu_cache_usage_percent": ("gauge", CO),
    "dynamo_component_gpu_prefix_cache_hit_rate": ("gauge", CO),
    "dynamo_component_model_load_time_seconds": ("gauge", CO),
    "dynamo_component_kv_cache_events_applied": ("counter", CO),
    "tandem_component_drained_requests": ("counter", CO),
    "tandem_component_drained_moved_requests": ("counter", CO),
    "tandem_component_drained_moved_pages": ("counter", CO),
    "tandem_component_kv_moves_in": ("counter", CO + ("outcome",)),
    "tandem_component_kv_moved_in_pages": ("counter", CO),
}
EXPECTED_FRONTEND = {
    "dynamo_frontend_requests": ("counter", ("endpoint", "model", "request_type", "status")),
    "dynamo_frontend_inflight_requests": ("gauge", ("model",)),
    "dynamo_frontend_queued_requests": ("gauge", ("model",)),
    "dynamo_frontend_disconnected_clients": ("gauge", ("model",)),
    "dynamo_frontend_request_duration_seconds": ("histogram", ("model",)),
    "dynamo_frontend_input_sequence_tokens": ("histogram", ("model",)),
    "dynamo_frontend_output_sequence_tokens": ("histogram", ("model",)),
    "dynamo_frontend_output_tokens": ("counter", ("model",)),
    "dynamo_frontend_time_to_first_token_seconds": ("histogram", ("model",)),
    "dynamo_frontend_inter_token_latency_seconds": ("histogram", ("model",)),
    "dynamo_frontend_kv_hit_rate": ("histogram", ("model",)),
    "dynamo_frontend_cached_tokens": ("histogram", ("model",)),
    "dynamo_frontend_tokenizer_latency_ms": ("histogram", ("model", "operation")),
    "dynamo_frontend_model_context_length": ("gauge", ("model",)),
    "dynamo_frontend_model_kv_cache_block_size": ("gauge", ("model",)),
    "dynamo_frontend_model_total_kv_blocks": ("gauge", ("model",)),
    "dynamo_frontend_model_migration": ("counter", ("model", "migration_type")),
    "dynamo_frontend_model_migration_max_seq_len_exceeded": ("counter", ("model",)),
}
EXPECTED_ROUTER = {
    "dynamo_router_overhead_block_hashing_ms": ("histogram", ("model",)),
    "dynamo_router_overhead_indexer_find_matches_ms": ("histogram", ("model",)),
    "dynamo_router_overhead_scheduling_ms": ("histogram", ("model",)),
    "dynamo_router_overhead_total_ms": ("histogram", ("model",)),
    "tandem_router_decisions": ("counter", ("model", "policy", "worker_id")),
    "tandem_router_kv_overlap_blocks": ("histogram", ("model", "policy")),
    "tandem_router_retries": ("counter", ("model", "reason")),
}

TTFT = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400]
ITL = [0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080,
       0.100, 0.200, 0.400, 0.600, 0.800, 1, 2, 4, 6, 8]
E2E = TTFT + [600, 1200, 1800, 2400]


def _families(registry):
    """family name -> (type, label names seen on its samples, excluding le/quantile)."""
    out = {}
    for fam in registry.collect():
        labels = set()
        for s in fam.samples:
            labels |= set(s.labels) - {"le", "quantile"}
        out[fam.name] = (fam.type, tuple(sorted(labels)))
    return out


def _populated_registry():
    reg = CollectorRegistry()
    em = EngineMetrics(reg, model_name="m", engine_type="decode", worker_id="w")
    stats = SchedulerStats(**{f: 1 for f in (
        "num_running_reqs", "num_used_tokens", "token_usage", "gen_throughput", "num_queue_reqs", "cache_hit_rate",
        "max_total_num_tokens", "num_retracted_reqs", "num_prefill_prealloc_queue_reqs",
        "num_prefill_inflight_queue_reqs", "num_decode_prealloc_queue_reqs", "num_decode_transfer_queue_reqs",
        "kv_transfer_speed_gb_s", "kv_transfer_latency_ms", "kv_transfer_bootstrap_ms", "kv_transfer_alloc_ms",
        "kv_transfer_total_mb", "utilization", "engine_startup_time", "engine_load_weights_time", "kv_used_tokens",
        "kv_evictable_tokens", "kv_available_tokens", "hicache_host_used_tokens", "hicache_host_total_tokens",
        "prefetch_occupied_ratio")})
    stats.eplb_balancedness = {"decode": [0.9]}
    stats.eplb_gpu_physical_count = {0: [1, 2]}
    stats.eviction_duration_s = [0.001]
    stats.lora_requests = stats.lora_prompt_tokens = stats.lora_generation_tokens = {"a": 1}
    em.apply(stats)
    cm = ComponentMetrics(reg, component="decode", endpoint="generate", model="m", worker_id="w")
    cm.set_kv_stats(total_blocks=1, active_blocks=1, usage=0.5, prefix_cache_hit_rate=0.1)
    cm.set_model_load_time(1.0)
    cm.kv_events_applied()
    cm.requests_drained(2, moved=1, moved_pages=3)
    cm.kv_moved_in("moved", 3)
    try:
        with cm.track_request(request_bytes=3) as t:
            t.first_response()
            t.add_response_bytes(4)
            raise KeyError("x")
    except KeyError:
        pass
    fm = FrontendMetrics(reg, model="m")
    fm.set_model_info(context_length=1, kv_cache_block_size=1, total_kv_blocks=1)
    fm.observe_tokenizer_ms("tokenize", 0.1)
    fm.record_migration("ongoing_request")
    fm.migration_too_long()
    with fm.track_request("chat_completions", "stream") as r:
        r.set_input_tokens(3)
        r.set_cached_tokens(1, 3)
        r.on_tokens(1)
        r.on_tokens(2)
        r.client_disconnected()
    rm = RouterMetrics(reg, model="m")
    rm.observe_overhead_ms(block_hashing=1, indexer_find_matches=1, scheduling=1, total=1)
    rm.record_decision(worker_id="w", policy="kv_aware", overlap_blocks=2)
    rm.record_retry("unavailable")
    return reg


def test_every_metric_name_type_and_label_set():
    fams = _families(_populated_registry())
    expected = {**EXPECTED_ENGINE, **EXPECTED_COMPONENT, **EXPECTED_FRONTEND, **EXPECTED_ROUTER}
    want = {name: (kind, tuple(sorted(labels))) for name, (kind, labels) in expected.items()}
    assert fams == want


def _bounds(registry, family):
    for fam in registry.collect():
        if fam.name == family:
            les = []
            for s in fam.samples:
                if s.name.endswith("_bucket") and s.labels["le"] not in les:
                    les.append(s.labels["le"])
            return [float(x) for x in les if x != "+Inf"]
    raise AssertionError(f"{family} not found")


def test_histogram_buckets_are_sglang_exact():
    reg = CollectorRegistry()
    em = EngineMetrics(reg, model_name="m", engine_type="unified", worker_id="w")
    s = SchedulerStats(ttft_s=[1.0], itl_s=[0.01], e2e_s=[1.0], queue_time_s=[0.0])
    em.apply(s)
    assert _bounds(reg, "sglang:time_to_first_token_seconds") == TTFT
    assert _bounds(reg, "sglang:inter_token_latency_seconds") == ITL
    assert _bounds(reg, "sglang:e2e_request_latency_seconds") == E2E
    assert _bounds(reg, "sglang:queue_time_seconds") == [
        0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300, 400, 500, 600,
        700, 800, 900, 1000, 1200, 1400, 1600, 1800, 2000, 2500, 3000]


def test_eplb_physical_count_buckets_follow_ep_size():
    reg = CollectorRegistry()
    em = EngineMetrics(reg, model_name="m", engine_type="decode", worker_id="w")
    em.apply(SchedulerStats(eplb_gpu_physical_count={3: [4, 0, 1, 5]}))
    assert _bounds(reg, "sglang:eplb_gpu_physical_count") == [0, 1, 2, 3]
    cumulative = {s.labels["le"]: s.value for fam in reg.collect() if fam.name == "sglang:eplb_gpu_physical_count"
                  for s in fam.samples if s.name.endswith("_bucket")}
    assert cumulative == {"0.0": 4, "1.0": 4, "2.0": 5, "3.0": 10, "+Inf": 10}
