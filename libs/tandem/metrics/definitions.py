"""Every metric tandem exposes: name, type, help, labels, buckets, multiprocess mode.

Engine metrics keep SGLang's exact ``sglang:`` names and buckets (sglang/srt/metrics/
collector.py) so SGLang dashboards work unchanged; runtime metrics keep NVIDIA Dynamo's
``dynamo_frontend_*`` / ``dynamo_component_*`` / ``dynamo_router_*`` names. A few
``tandem_router_*`` metrics describe routing decisions.

Label sets (documented in README.md):
- ``sglang:*``: model_name, engine_type ("unified" | "prefill" | "decode"), tp_rank,
  pp_rank, worker_id (plus ``mode`` / ``layer`` / ``forward_mode`` where noted).
- ``dynamo_component_*``: dynamo_namespace, dynamo_component, dynamo_endpoint, model,
  worker_id (plus ``error_type`` on errors_total).
- ``dynamo_frontend_*``: model (plus endpoint, request_type, status on requests_total;
  operation on tokenizer_latency_ms).
"""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram, Summary
from tandem.metrics.registry import registration_target

SGLANG_LABELS = ("model_name", "engine_type", "tp_rank", "pp_rank", "worker_id")
ENGINE_TYPES = ("unified", "prefill", "decode")
COMPONENT_LABELS = ("dynamo_namespace", "dynamo_component", "dynamo_endpoint", "model", "worker_id")
FRONTEND_LABELS = ("model",)

# --- SGLang histogram buckets (exact copies of SGLang's defaults) ---------------------
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060,
    0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0,
)
E2E_BUCKETS = TTFT_BUCKETS + (600, 1200, 1800, 2400)
QUEUE_TIME_BUCKETS = (
    0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200,
    300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1400, 1600, 1800, 2000, 2500, 3000,
)
CACHE_IO_DURATION_BUCKETS = (
    0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01, 0.02, 0.03,
    0.04, 0.05, 0.1, 0.2, 0.5, 1.0,
)
# --- tandem's choices for the runtime histograms (Dynamo leaves them to the backend) -----
REQUEST_DURATION_BUCKETS = E2E_BUCKETS
SEQUENCE_TOKEN_BUCKETS = (
    0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072,
)
RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)
OVERLAP_BLOCK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class WeightedHistogram(Histogram):
    """prometheus_client's Histogram plus :meth:`observe_n`, the weighted observe it lacks
    (SGLang observes ITL and EPLB rank counts that way). Works for the in-process and the
    multiprocess value classes alike; children made by ``labels()`` are of this class too."""

    def observe_n(self, value: float, n: int) -> None:
        """Observe ``value`` ``n`` times, in O(1)."""
        if n <= 0:
            return
        self._raise_if_not_observable()
        self._sum.inc(value * n)
        for i, bound in enumerate(self._upper_bounds):
            if value <= bound:
                self._buckets[i].inc(n)
                break


@dataclass(frozen=True)
class MetricSpec:
    """One metric definition. ``name`` is the exposed family name (counters end in _total)."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram" | "summary"
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None
    multiprocess_mode: str = "mostrecent"  # gauges only

    def create(self, registry):
        """Build the prometheus_client metric on ``registry`` (see registration_target)."""
        reg = registration_target(registry)
        if self.kind == "counter":
            return Counter(self.name, self.help, self.labels, registry=reg)
        if self.kind == "gauge":
            return Gauge(self.name, self.help, self.labels, registry=reg,
                         multiprocess_mode=self.multiprocess_mode)
        if self.kind == "histogram":
            return WeightedHistogram(self.name, self.help, self.labels, registry=reg, buckets=self.buckets)
        if self.kind == "summary":
            return Summary(self.name, self.help, self.labels, registry=reg)
        raise ValueError(f"unknown metric kind {self.kind!r} for {self.name}")


def _g(name, help, labels=SGLANG_LABELS, mode="mostrecent"):
    return MetricSpec(name, "gauge", help, tuple(labels), multiprocess_mode=mode)


def _c(name, help, labels=SGLANG_LABELS):
    return MetricSpec(name, "counter", help, tuple(labels))


def _h(name, help, buckets, labels=SGLANG_LABELS):
    return MetricSpec(name, "histogram", help, tuple(labels), buckets=tuple(buckets))


def _keyed(prefix: str, specs: tuple[MetricSpec, ...]) -> dict[str, MetricSpec]:
    """Specs by their name without ``prefix`` (the keys the metric classes look them up by)."""
    return {spec.name.removeprefix(prefix): spec for spec in specs}


S = "sglang:"
# Gauges: field name in SchedulerStats == metric name without the prefix.
ENGINE_GAUGES = (
    _g(S + "num_running_reqs", "The number of running requests."),
    _g(S + "num_used_tokens", "The number of used tokens."),
    _g(S + "token_usage", "The token usage."),
    _g(S + "gen_throughput", "The generation throughput (token/s)."),
    _g(S + "num_queue_reqs", "The number of requests in the waiting queue."),
    _g(S + "cache_hit_rate", "The prefix cache hit rate."),
    _g(S + "max_total_num_tokens", "Maximum total number of tokens in the KV cache pool."),
    _g(S + "num_retracted_reqs", "The number of retracted requests."),
    _g(S + "num_prefill_prealloc_queue_reqs", "The number of requests in the prefill prealloc queue."),
    _g(S + "num_prefill_inflight_queue_reqs", "The number of requests in the prefill inflight queue."),
    _g(S + "num_decode_prealloc_queue_reqs", "The number of requests in the decode prealloc queue."),
    _g(S + "num_decode_transfer_queue_reqs", "The number of requests in the decode transfer queue."),
    _g(S + "kv_transfer_speed_gb_s", "The transfer speed of the KV cache in GB/s."),
    _g(S + "kv_transfer_latency_ms", "The transfer latency of the KV cache in ms."),
    _g(S + "kv_transfer_bootstrap_ms", "The bootstrap time of the KV transfer in ms."),
    _g(S + "kv_transfer_alloc_ms", "The allocation waiting time of the KV transfer in ms."),
    _g(S + "kv_transfer_total_mb", "The total size of the last KV transfer in MB."),
    _g(S + "utilization", "The utilization."),
    _g(S + "engine_startup_time", "The time taken for the engine to start up."),
    _g(S + "engine_load_weights_time", "The time taken for the engine to load weights."),
    _g(S + "kv_used_tokens", "KV pool tokens held by running requests."),
    _g(S + "kv_evictable_tokens", "KV pool tokens held only by the prefix cache (evictable)."),
    _g(S + "kv_available_tokens", "KV pool tokens free."),
    _g(S + "hicache_host_used_tokens", "Host (HiCache) KV tokens in use."),
    _g(S + "hicache_host_total_tokens", "Host (HiCache) KV pool capacity in tokens."),
    _g(S + "prefetch_occupied_ratio", "Current prefetch occupied ratio (0-1, >1 means rate limited)."),
)
# Counters: (spec, SchedulerStats delta field).
ENGINE_COUNTERS = (
    (_c(S + "prompt_tokens_total", "Number of prefill tokens processed."), "prompt_tokens"),
    (_c(S + "generation_tokens_total", "Number of generation tokens processed."), "generation_tokens"),
    (_c(S + "cached_tokens_total", "Number of cached prompt tokens."), "cached_tokens"),
    (_c(S + "num_requests_total", "Number of requests processed."), "num_requests"),
    (_c(S + "num_aborted_requests_total", "Number of requests aborted."), "num_aborted_requests"),
    (_c(S + "num_bootstrap_failed_reqs_total", "The number of bootstrap failed requests."),
     "num_bootstrap_failed_reqs"),
    (_c(S + "num_transfer_failed_reqs_total", "The number of transfer failed requests."),
     "num_transfer_failed_reqs"),
    (_c(S + "num_retracted_requests_total", "Total number of retracted requests."),
     "num_retracted_requests"),
    (_c(S + "evicted_tokens_total", "The number of tokens evicted from device to host."), "evicted_tokens"),
    (_c(S + "load_back_tokens_total", "The number of tokens loaded from host to device."), "load_back_tokens"),
    (_c(S + "prefetched_tokens_total", "Number of prefetched prompt tokens."), "prefetched_tokens"),
    (_c(S + "backuped_tokens_total", "Number of backuped tokens."), "backuped_tokens"),
    (_c("tandem_pd_transferred_tokens_total", "Decode: prompt tokens of remote prefills whose KV a prefill worker "
        "wrote here."), "pd_transferred_tokens"),
    (_c("tandem_pd_decode_reused_tokens_total", "Decode: prompt tokens of remote prefills that this worker's prefix "
        "cache already held (--disaggregation-decode-enable-radix-cache): not transferred."), "pd_decode_reused_tokens"),
    (_c("tandem_hicache_host_hit_tokens_total", "Prefix tokens served by load-back from the host KV tier."),
     "hicache_host_hit_tokens"),
    (_c("tandem_hicache_load_back_bytes_total", "KV bytes loaded back from host or storage to the device."),
     "hicache_load_back_bytes"),
    (_c("tandem_hicache_backup_bytes_total", "KV bytes copied from the device to the host tier."),
     "hicache_backup_bytes"),
    (_c("tandem_hicache_storage_corrupt_pages_total",
        "Storage pages that failed their integrity checks (a miss: recomputed)."), "hicache_storage_corrupt_pages"),
)
REALTIME_TOKENS = _c(
    S + "realtime_tokens_total",
    "Total number of tokens processed. mode: prefill_compute, prefill_cache, decode.",
    SGLANG_LABELS + ("mode",),
)
REALTIME_MODES = (  # (mode label, SchedulerStats delta field)
    ("prefill_compute", "realtime_prefill_compute_tokens"),
    ("prefill_cache", "realtime_prefill_cache_tokens"),
    ("decode", "realtime_decode_tokens"),
)
# Per LoRA adapter (--enable-lora; SGLang has none, vLLM only a running/waiting info gauge): the
# counters above, split by adapter. (spec, SchedulerStats {lora_name: delta} field).
LORA_COUNTERS = (
    (_c(S + "lora_requests_total", "Number of requests processed, by LoRA adapter.",
        SGLANG_LABELS + ("lora_name",)), "lora_requests"),
    (_c(S + "lora_prompt_tokens_total", "Number of prefill tokens processed, by LoRA adapter.",
        SGLANG_LABELS + ("lora_name",)), "lora_prompt_tokens"),
    (_c(S + "lora_generation_tokens_total", "Number of generation tokens processed, by LoRA adapter.",
        SGLANG_LABELS + ("lora_name",)), "lora_generation_tokens"),
)
# Histograms: (spec, SchedulerStats sample-list field).
ENGINE_HISTOGRAMS = (
    (_h(S + "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS),
     "ttft_s"),
    (_h(S + "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS),
     "itl_s"),
    (_h(S + "e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds",
        E2E_BUCKETS), "e2e_s"),
    (_h(S + "queue_time_seconds", "Histogram of queueing time in seconds.", QUEUE_TIME_BUCKETS),
     "queue_time_s"),
    (_h(S + "eviction_duration_seconds", "Time taken to evict memory from device to host in seconds.",
        CACHE_IO_DURATION_BUCKETS), "eviction_duration_s"),
    (_h(S + "load_back_duration_seconds", "Time taken to load memory from host to device in seconds.",
        CACHE_IO_DURATION_BUCKETS), "load_back_duration_s"),
)
EPLB_BALANCEDNESS = MetricSpec(
    S + "eplb_balancedness", "summary", "Balancedness of MoE in expert parallelism.",
    SGLANG_LABELS + ("forward_mode",),
)
EPLB_GPU_PHYSICAL_COUNT = S + "eplb_gpu_physical_count"  # histogram{layer}, buckets = range(ep_size)


def eplb_gpu_physical_count_spec(ep_size: int) -> MetricSpec:
    """Histogram of the EP rank each dispatched token went to, per layer (buckets 0..ep_size-1)."""
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    return _h(EPLB_GPU_PHYSICAL_COUNT, "The selected count of physical experts on each layer and GPU rank.",
              tuple(range(ep_size)), SGLANG_LABELS + ("layer",))


# --- Dynamo component (worker) metrics ---------------------------------------------------
D = "dynamo_component_"
COMPONENT = _keyed(D, (
    _c(D + "requests_total", "Total requests handled by this endpoint.", COMPONENT_LABELS),
    _c(D + "request_bytes_total", "Total bytes of requests received.", COMPONENT_LABELS),
    _c(D + "response_bytes_total", "Total bytes of responses sent.", COMPONENT_LABELS),
    _g(D + "inflight_requests", "Requests currently being handled.", COMPONENT_LABELS, mode="livesum"),
    _h(D + "request_duration_seconds", "Time to handle a request in seconds.", REQUEST_DURATION_BUCKETS, COMPONENT_LABELS),
    _c(D + "errors_total", "Requests that ended in an error, by error_type.", COMPONENT_LABELS + ("error_type",)),
    _h(D + "time_to_first_response_seconds", "Time from request to its first streamed response in seconds.", TTFT_BUCKETS, COMPONENT_LABELS),
    _g(D + "uptime_seconds", "Seconds since the component started.", COMPONENT_LABELS),
    _g(D + "total_blocks", "KV cache blocks (pages) in the pool.", COMPONENT_LABELS),
    _g(D + "active_blocks", "KV cache blocks (pages) in use.", COMPONENT_LABELS),
    _g(D + "gpu_cache_usage_percent", "KV cache usage as a fraction 0..1 (Dynamo's convention).", COMPONENT_LABELS),
    _g(D + "gpu_prefix_cache_hit_rate", "Prefix cache hit rate 0..1.", COMPONENT_LABELS),
    _g(D + "model_load_time_seconds", "Time taken to load the model in seconds.", COMPONENT_LABELS),
    _c(D + "kv_cache_events_applied_total", "KV cache events (stored/removed) published.", COMPONENT_LABELS),
    _c("tandem_component_drained_requests_total", "Requests a Drain handed back to their router (to be migrated "
       "to another worker).", COMPONENT_LABELS),
    _c("tandem_component_drained_moved_requests_total", "Requests a Drain handed over with their KV, which another "
       "worker fetched (--drain-timeout).", COMPONENT_LABELS),
    _c("tandem_component_drained_moved_pages_total", "KV pages of the requests a Drain handed over with their KV.",
       COMPONENT_LABELS),
    _c("tandem_component_kv_moves_in_total", "Requests moved here off a draining worker, by outcome (moved: their "
       "KV fetched, nothing recomputed; recomputed: the fetch failed, recomputed here).",
       COMPONENT_LABELS + ("outcome",)),
    _c("tandem_component_kv_moved_in_pages_total", "KV pages fetched from draining workers.", COMPONENT_LABELS),
))

# --- Dynamo frontend (router) metrics ----------------------------------------------------
F = "dynamo_frontend_"
FRONTEND = _keyed(F, (
    _c(F + "requests_total", "Total requests observed by the frontend.", ("model", "endpoint", "request_type", "status")),
    _g(F + "inflight_requests", "Inflight requests at the frontend.", FRONTEND_LABELS, mode="livesum"),
    _g(F + "queued_requests", "Requests waiting for their first token.", FRONTEND_LABELS, mode="livesum"),
    _g(F + "disconnected_clients", "Clients that disconnected before the end.", FRONTEND_LABELS, mode="livesum"),
    _h(F + "request_duration_seconds", "Request duration in seconds.", REQUEST_DURATION_BUCKETS, FRONTEND_LABELS),
    _h(F + "input_sequence_tokens", "Input sequence length in tokens.", SEQUENCE_TOKEN_BUCKETS, FRONTEND_LABELS),
    _h(F + "output_sequence_tokens", "Output sequence length in tokens.", SEQUENCE_TOKEN_BUCKETS, FRONTEND_LABELS),
    _c(F + "output_tokens_total", "Total output tokens generated.", FRONTEND_LABELS),
    _h(F + "time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS, FRONTEND_LABELS),
    _h(F + "inter_token_latency_seconds", "Inter-token latency in seconds.", ITL_BUCKETS, FRONTEND_LABELS),
    _h(F + "kv_hit_rate", "Per-request fraction of prompt tokens found in the KV cache.", RATIO_BUCKETS, FRONTEND_LABELS),
    _h(F + "cached_tokens", "Per-request prompt tokens served from the KV cache.", SEQUENCE_TOKEN_BUCKETS, FRONTEND_LABELS),
    _h(F + "tokenizer_latency_ms", "Tokenizer latency in ms, by operation.", MS_BUCKETS, FRONTEND_LABELS + ("operation",)),
    _g(F + "model_context_length", "Context length of the served model.", FRONTEND_LABELS),
    _g(F + "model_kv_cache_block_size", "KV cache block (page) size in tokens.", FRONTEND_LABELS),
    _g(F + "model_total_kv_blocks", "KV blocks over all workers of the model.", FRONTEND_LABELS),
    _c(F + "model_migration_total", "Request migrations because a worker became unavailable, by migration_type "
       "(ongoing_request: it had streamed output, continued with its tokens so far, --migration-limit; "
       "new_request: it had not, sent again, --request-retries).", FRONTEND_LABELS + ("migration_type",)),
    _c(F + "model_migration_max_seq_len_exceeded_total", "Migrations not made because the prompt and the tokens "
       "so far leave no room in the model's context (the client gets the error).", FRONTEND_LABELS),
))

# --- Router overhead and routing decisions ----------------------------------------------
ROUTER_LABELS = ("model",)
ROUTER = {
    "block_hashing": _h("dynamo_router_overhead_block_hashing_ms", "Time to hash the prompt's blocks in ms.",
                        MS_BUCKETS, ROUTER_LABELS),
    "indexer_find_matches": _h("dynamo_router_overhead_indexer_find_matches_ms",
                               "Time to find prefix matches in the KV index in ms.", MS_BUCKETS, ROUTER_LABELS),
    "scheduling": _h("dynamo_router_overhead_scheduling_ms", "Time to pick a worker in ms.",
                     MS_BUCKETS, ROUTER_LABELS),
    "total": _h("dynamo_router_overhead_total_ms", "Total routing overhead per request in ms.",
                MS_BUCKETS, ROUTER_LABELS),
    "decisions_total": _c("tandem_router_decisions_total", "Requests routed, by chosen worker and policy.",
                          ("model", "worker_id", "policy")),
    "kv_overlap_blocks": _h("tandem_router_kv_overlap_blocks",
                            "Prefix blocks the chosen worker already holds, per routed request.",
                            OVERLAP_BLOCK_BUCKETS, ("model", "policy")),
    "retries_total": _c("tandem_router_retries_total", "Requests retried on another worker, by reason.",
                        ("model", "reason")),
}


def all_specs() -> list[MetricSpec]:
    """Every statically defined metric spec (eplb_gpu_physical_count depends on ep_size)."""
    specs = list(ENGINE_GAUGES) + [s for s, _ in ENGINE_COUNTERS] + [REALTIME_TOKENS] + [s for s, _ in LORA_COUNTERS]
    specs += [s for s, _ in ENGINE_HISTOGRAMS] + [EPLB_BALANCEDNESS]
    specs += list(COMPONENT.values()) + list(FRONTEND.values()) + list(ROUTER.values())
    return specs
