"""The stats message the engine scheduler sends every iteration (msgpack over ZMQ).

Conventions:
- Gauges are current values; ``None`` means "not reported" and leaves the gauge untouched
  (a unified worker never reports the disaggregation queues, for instance).
- Counter fields are *deltas* since the previous message of the same sender, never totals,
  so a dropped message loses only its own increments and a restarted publisher keeps
  counting from where Prometheus last saw it (counter resets are handled by rate()).
- Latency fields are lists of samples observed since the previous message (seconds).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import msgpack

SCHEMA_VERSION = 1


@dataclass
class SchedulerStats:
    """One scheduler iteration's view of the engine. See the module docstring."""

    ts: float = field(default_factory=time.time)
    tp_rank: int = 0
    pp_rank: int = 0
    page_size: int | None = None  # lets the publisher derive Dynamo's block counts

    # Core gauges (sglang:*)
    num_running_reqs: int | None = None
    num_queue_reqs: int | None = None
    num_used_tokens: int | None = None
    max_total_num_tokens: int | None = None
    token_usage: float | None = None
    gen_throughput: float | None = None
    cache_hit_rate: float | None = None
    num_retracted_reqs: int | None = None
    utilization: float | None = None
    engine_startup_time: float | None = None
    engine_load_weights_time: float | None = None
    # KV pool breakdown (used + evictable + available = max_total_num_tokens)
    kv_used_tokens: int | None = None
    kv_evictable_tokens: int | None = None
    kv_available_tokens: int | None = None

    # Counter deltas
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0
    num_requests: int = 0  # requests finished in this interval
    num_aborted_requests: int = 0
    num_retracted_requests: int = 0
    realtime_prefill_compute_tokens: int = 0
    realtime_prefill_cache_tokens: int = 0
    realtime_decode_tokens: int = 0

    # Latency samples (seconds)
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    queue_time_s: list[float] = field(default_factory=list)

    # PD disaggregation (gauges: the latest room; counters: failed attempts)
    num_prefill_prealloc_queue_reqs: int | None = None  # prefill: waiting for decode's pages (unused: decode allocates first)
    num_prefill_inflight_queue_reqs: int | None = None  # prefill: rooms in flight
    num_decode_prealloc_queue_reqs: int | None = None  # decode: requests holding pre-allocated pages
    num_decode_transfer_queue_reqs: int | None = None  # decode: remote prefills in flight
    kv_transfer_speed_gb_s: float | None = None  # prefill: bytes / transfer time
    kv_transfer_latency_ms: float | None = None  # first chunk sent (prefill) or room confirmed (decode) -> done
    kv_transfer_bootstrap_ms: float | None = None  # decode: allocation sent -> room confirmed
    kv_transfer_alloc_ms: float | None = None  # decode: waiting for pages
    kv_transfer_total_mb: float | None = None  # decode: KV received
    num_bootstrap_failed_reqs: int = 0  # attempts that failed before prefill confirmed the room
    num_transfer_failed_reqs: int = 0  # attempts that failed later
    pd_transferred_tokens: int = 0  # decode: prompt tokens whose KV a prefill worker wrote here
    pd_decode_reused_tokens: int = 0  # decode: prompt tokens of remote prefills already in the prefix cache

    # HiCache (SGLang's fields, set by a worker with --enable-hierarchical-cache; tandem never
    # sets prefetch_occupied_ratio: its storage prefetch has no rate limit)
    hicache_host_used_tokens: int | None = None  # host tier tokens in use
    hicache_host_total_tokens: int | None = None  # host tier capacity
    prefetch_occupied_ratio: float | None = None  # storage prefetch; > 1 means rate limited
    evicted_tokens: int = 0  # left the device tier (to host, or dropped)
    load_back_tokens: int = 0  # host or storage -> device
    prefetched_tokens: int = 0  # storage -> device (prefix tokens served from storage)
    backuped_tokens: int = 0  # host -> storage
    # HiCache, tandem's own
    hicache_host_hit_tokens: int = 0  # prefix tokens served by load-back from host
    hicache_load_back_bytes: int = 0  # host or storage -> device
    hicache_backup_bytes: int = 0  # device -> host
    hicache_storage_corrupt_pages: int = 0  # storage pages that failed their checks (recomputed)
    eviction_duration_s: list[float] = field(default_factory=list)
    load_back_duration_s: list[float] = field(default_factory=list)

    # EPLB
    # LoRA adapter name -> counter delta (requests finished, prompt and generation tokens).
    lora_requests: dict[str, int] = field(default_factory=dict)
    lora_prompt_tokens: dict[str, int] = field(default_factory=dict)
    lora_generation_tokens: dict[str, int] = field(default_factory=dict)

    eplb_balancedness: dict[str, list[float]] = field(default_factory=dict)  # forward_mode -> samples
    # layer -> tokens dispatched to each EP rank (list index = rank), counts since last message
    eplb_gpu_physical_count: dict[int, list[int]] = field(default_factory=dict)

    def add_finished(self, *, e2e: float, ttft: float | None = None, queue_time: float | None = None,
                     itl: list[float] | None = None, aborted: bool = False) -> None:
        """Record one finished request's latencies (and count it as finished or aborted)."""
        if aborted:
            self.num_aborted_requests += 1
        else:
            self.num_requests += 1
        self.e2e_s.append(float(e2e))
        if ttft is not None:
            self.ttft_s.append(float(ttft))
        if queue_time is not None:
            self.queue_time_s.append(float(queue_time))
        if itl:
            self.itl_s.extend(float(x) for x in itl)

    def to_bytes(self) -> bytes:
        """msgpack encoding: a map of the fields that differ from their defaults, plus a version."""
        payload = {"v": SCHEMA_VERSION}
        for f in _FIELDS:
            value = getattr(self, f.name)
            if f.name == "ts" or value != _DEFAULTS[f.name]:
                payload[f.name] = value
        return msgpack.packb(payload, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> SchedulerStats:
        """Decode :meth:`to_bytes` output; unknown fields (from a newer sender) are ignored."""
        try:
            payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several unrelated exception types
            raise ValueError(f"stats message is not valid msgpack: {e}") from e
        if not isinstance(payload, dict):
            raise ValueError(f"stats message must be a map, got {type(payload).__name__}")
        version = payload.pop("v", None)
        if version != SCHEMA_VERSION:
            raise ValueError(f"stats message schema version {version!r}, expected {SCHEMA_VERSION}")
        known = {k: v for k, v in payload.items() if k in _NAMES}
        stats = cls(**known)
        if stats.eplb_gpu_physical_count:
            stats.eplb_gpu_physical_count = {int(k): v for k, v in stats.eplb_gpu_physical_count.items()}
        return stats


_FIELDS = dataclasses.fields(SchedulerStats)
_NAMES = frozenset(f.name for f in _FIELDS)
_DEFAULTS = {
    f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    for f in _FIELDS
}
