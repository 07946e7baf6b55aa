"""Generate grafana/dashboards/tandem.json (run from anywhere; rewrites the file).

Keeping the dashboard as code keeps the PromQL consistent: every latency panel is
histogram_quantile over the rate of the ``_bucket`` series summed ``by (le)``.
"""
from __future__ import annotations

import json
import os

DS = {"type": "prometheus", "uid": "tandem-prometheus"}
RI = "$__rate_interval"
M = '{model_name=~"$model"}'
FM = '{model=~"$model"}'
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboards", "tandem.json")


def quantiles(metric: str, sel: str, qs=(0.5, 0.9, 0.99)) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{sel}[{RI}])))", f"p{int(q * 100)}")
            for q in qs]


# (title, unit, [(expr, legend)], stacked)
PANELS = [
    ("E2E request latency", "s", quantiles("sglang:e2e_request_latency_seconds", M), False),
    ("Time to first token (engine)", "s", quantiles("sglang:time_to_first_token_seconds", M), False),
    ("Inter-token latency (engine)", "s", quantiles("sglang:inter_token_latency_seconds", M), False),
    ("Time to first token (router)", "s", quantiles("dynamo_frontend_time_to_first_token_seconds", FM), False),
    ("Inter-token latency (router)", "s", quantiles("dynamo_frontend_inter_token_latency_seconds", FM), False),
    ("Queue time", "s", quantiles("sglang:queue_time_seconds", M), False),
    ("Generation throughput", "tokens/s (tps)", [
        (f"sum by (worker_id) (sglang:gen_throughput{M})", "{{worker_id}} gen_throughput"),
        (f"sum(rate(sglang:generation_tokens_total{M}[{RI}]))", "all workers (rate)"),
        (f"sum(rate(sglang:prompt_tokens_total{M}[{RI}]))", "prompt tokens/s"),
    ], False),
    ("Running & queued requests", "short", [
        (f"sum by (worker_id) (sglang:num_running_reqs{M})", "{{worker_id}} running"),
        (f"sum by (worker_id) (sglang:num_queue_reqs{M})", "{{worker_id}} queued"),
        (f"sum(dynamo_frontend_inflight_requests{FM})", "router inflight"),
        (f"sum(dynamo_frontend_queued_requests{FM})", "router awaiting first token"),
    ], False),
    ("Request rate", "reqps", [
        (f"sum by (status) (rate(dynamo_frontend_requests_total{FM}[{RI}]))", "router {{status}}"),
        (f"sum by (worker_id) (rate(sglang:num_requests_total{M}[{RI}]))", "{{worker_id}} finished"),
        (f"sum by (worker_id) (rate(sglang:num_aborted_requests_total{M}[{RI}]))", "{{worker_id}} aborted"),
    ], False),
    ("Prefix cache hit rate", "percentunit", [
        (f"avg by (worker_id) (sglang:cache_hit_rate{M})", "{{worker_id}} cache_hit_rate"),
        (f"sum(rate(sglang:cached_tokens_total{M}[{RI}])) / clamp_min(sum(rate(sglang:prompt_tokens_total{M}[{RI}])), 1)",
         "cached / prompt tokens"),
    ], False),
    ("KV cache usage", "percentunit", [
        (f"avg by (worker_id) (sglang:token_usage{M})", "{{worker_id}}"),
        (f"sum by (worker_id) (sglang:hicache_host_used_tokens{M}) / "
         f"clamp_min(sum by (worker_id) (sglang:hicache_host_total_tokens{M}), 1)", "{{worker_id}} host (HiCache)"),
    ], False),
    ("HiCache hit rate by tier", "percentunit", [
        (f"sum(rate(sglang:cached_tokens_total{M}[{RI}])) / clamp_min(sum(rate(sglang:prompt_tokens_total{M}[{RI}])), 1)",
         "all tiers (cached / prompt tokens)"),
        (f"sum(rate(tandem_hicache_host_hit_tokens_total{M}[{RI}])) / "
         f"clamp_min(sum(rate(sglang:prompt_tokens_total{M}[{RI}])), 1)", "host"),
        (f"sum(rate(sglang:prefetched_tokens_total{M}[{RI}])) / "
         f"clamp_min(sum(rate(sglang:prompt_tokens_total{M}[{RI}])), 1)", "storage"),
    ], False),
    ("HiCache traffic", "Bps", [
        (f"sum by (worker_id) (rate(tandem_hicache_load_back_bytes_total{M}[{RI}]))", "{{worker_id}} load-back"),
        (f"sum by (worker_id) (rate(tandem_hicache_backup_bytes_total{M}[{RI}]))", "{{worker_id}} backup to host"),
    ], False),
    ("HiCache tokens moved", "tokens/s (tps)", [
        (f"sum by (worker_id) (rate(sglang:evicted_tokens_total{M}[{RI}]))", "{{worker_id}} evicted from device"),
        (f"sum by (worker_id) (rate(sglang:load_back_tokens_total{M}[{RI}]))", "{{worker_id}} loaded back"),
        (f"sum by (worker_id) (rate(sglang:backuped_tokens_total{M}[{RI}]))", "{{worker_id}} written to storage"),
        (f"sum by (worker_id) (rate(tandem_hicache_storage_corrupt_pages_total{M}[{RI}]))",
         "{{worker_id}} corrupt storage pages/s"),
    ], False),
    ("HiCache load-back time", "s", quantiles("sglang:load_back_duration_seconds", M, (0.5, 0.99)), False),
    ("KV pool breakdown", "short", [
        (f"sum by (worker_id) (sglang:kv_used_tokens{M})", "{{worker_id}} used"),
        (f"sum by (worker_id) (sglang:kv_evictable_tokens{M})", "{{worker_id}} evictable (prefix cache)"),
        (f"sum by (worker_id) (sglang:kv_available_tokens{M})", "{{worker_id}} available"),
    ], True),
    ("KV transfer speed", "GBs", [
        (f"avg by (worker_id) (sglang:kv_transfer_speed_gb_s{M})", "{{worker_id}}"),
    ], False),
    ("KV transfer latency", "ms", [
        (f"avg by (worker_id) (sglang:kv_transfer_latency_ms{M})", "{{worker_id}} transfer"),
        (f"avg by (worker_id) (sglang:kv_transfer_bootstrap_ms{M})", "{{worker_id}} bootstrap"),
        (f"avg by (worker_id) (sglang:kv_transfer_alloc_ms{M})", "{{worker_id}} alloc wait"),
    ], False),
    ("KV transfer failures", "short", [
        (f"sum by (worker_id) (increase(sglang:num_transfer_failed_reqs_total{M}[{RI}]))", "{{worker_id}} transfer failed"),
        (f"sum by (worker_id) (increase(sglang:num_bootstrap_failed_reqs_total{M}[{RI}]))", "{{worker_id}} bootstrap failed"),
    ], False),
    ("Disaggregation queues", "short", [
        (f"sum by (worker_id) (sglang:num_prefill_prealloc_queue_reqs{M})", "{{worker_id}} prefill prealloc"),
        (f"sum by (worker_id) (sglang:num_prefill_inflight_queue_reqs{M})", "{{worker_id}} prefill inflight"),
        (f"sum by (worker_id) (sglang:num_decode_prealloc_queue_reqs{M})", "{{worker_id}} decode prealloc"),
        (f"sum by (worker_id) (sglang:num_decode_transfer_queue_reqs{M})", "{{worker_id}} decode transfer"),
    ], False),
    ("Retractions", "short", [
        (f"sum by (worker_id) (increase(sglang:num_retracted_requests_total{M}[{RI}]))", "{{worker_id}}"),
    ], False),
    ("Router decisions", "reqps", [
        (f"sum by (worker_id, policy) (rate(tandem_router_decisions_total{FM}[{RI}]))", "{{policy}} -> {{worker_id}}"),
        (f"sum by (reason) (rate(tandem_router_retries_total{FM}[{RI}]))", "retry {{reason}}"),
    ], False),
    ("Router KV overlap (blocks)", "short",
     quantiles("tandem_router_kv_overlap_blocks", FM, (0.5, 0.99)), False),
    ("Router overhead", "ms",
     quantiles("dynamo_router_overhead_total_ms", FM, (0.5, 0.99)), False),
]


def panel(pid: int, title: str, unit: str, targets, stacked: bool) -> dict:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": 12 * ((pid - 1) % 2), "y": 8 * ((pid - 1) // 2)},
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": {"stacking": {"mode": "normal" if stacked else "none"},
                                                  "fillOpacity": 30 if stacked else 5}},
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                    for i, (expr, legend) in enumerate(targets)],
    }


def dashboard() -> dict:
    return {
        "uid": "tandem-overview",
        "title": "tandem: disaggregated serving",
        "tags": ["tandem", "sglang", "dynamo"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{
            "name": "model",
            "label": "model",
            "type": "query",
            "datasource": DS,
            "query": {"query": "label_values(sglang:num_running_reqs, model_name)", "refId": "model"},
            "definition": "label_values(sglang:num_running_reqs, model_name)",
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "current": {"text": "All", "value": "$__all"},
            "refresh": 2,
        }]},
        "panels": [panel(i + 1, *p) for i, p in enumerate(PANELS)],
    }


if __name__ == "__main__":
    with open(OUT, "w") as f:
        json.dump(dashboard(), f, indent=2)
        f.write("\n")
    print(f"wrote {OUT} ({len(PANELS)} panels)")
