"""Turns engine step stats and finished-request latencies into SchedulerStats messages
sent over ZMQ to the service's metrics publisher (SGLang's scheduler -> collector path).

A hook on the engine loop (``after_step`` sends each step's stats, ``poll`` keeps the
gauges fresh while idle). What the worker knows beyond the engine (its PD transfers, its
finished requests) it hands in through :meth:`set_gauges`, :meth:`add_counts` and
:meth:`record_request`, from any thread; the reporter never calls up into the worker.
Sending never blocks: a stalled publisher only costs dropped messages.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from tandem.engine import EngineStats
from tandem.metrics import SchedulerStats, StatsSender
from tandem.worker.engine_loop import LoopHook


class StatsReporter(LoopHook):
    def __init__(self, endpoint: str, page_size: int, stats: Callable[[], EngineStats],
                 idle_interval_s: float = 1.0) -> None:
        self.sender = StatsSender(endpoint)
        self.page_size = page_size
        self.stats = stats  # the loop's latest snapshot, for idle reports
        self.idle_interval_s = idle_interval_s
        self._lock = threading.Lock()
        self._finished: list[dict] = []
        self._gauges: dict = {}
        self._counts: dict[str, int] = {}
        self._prev: EngineStats | None = None
        self._last_sent = 0.0
        self.startup: dict = {}

    # ---- from the worker (any thread) ----------------------------------------------------
    def record_request(self, *, ttft: float | None, itl: list[float], e2e: float, queue_time: float | None = None,
                       aborted: bool = False) -> None:
        with self._lock:
            self._finished.append(dict(ttft=ttft, itl=itl, e2e=e2e, queue_time=queue_time, aborted=aborted))

    def set_gauges(self, **fields) -> None:
        """SchedulerStats gauge fields, sent with every message until set again."""
        with self._lock:
            self._gauges.update(fields)

    def add_counts(self, **fields: int) -> None:
        """SchedulerStats counter increments, sent once with the next message."""
        with self._lock:
            for k, v in fields.items():
                self._counts[k] = self._counts.get(k, 0) + v

    # ---- on the engine loop ----------------------------------------------------------------
    def after_step(self, stats: EngineStats) -> None:
        self._send(stats)

    def poll(self) -> None:
        """Keep gauges fresh when no step has run for a while."""
        if time.monotonic() - self._last_sent >= self.idle_interval_s:
            self._send(self.stats())

    def _send(self, s: EngineStats) -> None:
        prev = self._prev or EngineStats(num_total_pages=s.num_total_pages)
        total_tokens = s.num_total_pages * self.page_size
        msg = SchedulerStats(
            page_size=self.page_size,
            num_running_reqs=s.num_running_reqs, num_queue_reqs=s.num_queue_reqs,
            num_used_tokens=s.num_used_tokens, max_total_num_tokens=total_tokens, token_usage=s.token_usage,
            gen_throughput=s.gen_throughput, cache_hit_rate=s.cache_hit_rate, num_retracted_reqs=0,
            utilization=1.0 if s.step_kind != "idle" else 0.0,
            kv_used_tokens=s.num_used_tokens, kv_evictable_tokens=s.num_evictable_pages * self.page_size,
            kv_available_tokens=(s.num_free_pages + s.num_evictable_pages) * self.page_size,
            prompt_tokens=s.prompt_tokens_total - prev.prompt_tokens_total,
            generation_tokens=s.generation_tokens_total - prev.generation_tokens_total,
            cached_tokens=s.cached_tokens_total - prev.cached_tokens_total,
            num_retracted_requests=s.num_retracted_total - prev.num_retracted_total,
        )
        if s.hicache_host_total_pages is not None:
            self._hicache_fields(msg, s, prev)
        for field in ("lora_requests", "lora_prompt_tokens", "lora_generation_tokens"):  # per adapter
            now, before = getattr(s, f"{field}_total"), getattr(prev, f"{field}_total")
            setattr(msg, field, {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)})
        if s.step_kind in ("prefill", "mixed"):
            msg.realtime_prefill_compute_tokens = s.step_num_tokens
        elif s.step_kind == "decode":
            msg.realtime_decode_tokens = s.step_num_tokens
        for k, v in self.startup.items():  # gauges: resent so a dropped first message loses nothing
            setattr(msg, k, v)
        with self._lock:
            finished, self._finished = self._finished, []
            gauges, counts, self._counts = dict(self._gauges), self._counts, {}
        for f in finished:
            msg.add_finished(e2e=f["e2e"], ttft=f["ttft"], queue_time=f["queue_time"], itl=f["itl"],
                             aborted=f["aborted"])
        for k, v in [*gauges.items(), *counts.items()]:
            setattr(msg, k, v)
        self._prev = dataclasses.replace(s)
        self._last_sent = time.monotonic()
        self.sender.send(msg)

    def _hicache_fields(self, msg: SchedulerStats, s: EngineStats, prev: EngineStats) -> None:
        """HiCache gauges, and counters as deltas; the load-back time since the last message is
        one load_back_duration sample."""
        msg.hicache_host_used_tokens = s.hicache_host_used_pages * self.page_size
        msg.hicache_host_total_tokens = s.hicache_host_total_pages * self.page_size
        msg.evicted_tokens = s.hicache_evicted_tokens_total - prev.hicache_evicted_tokens_total
        msg.load_back_tokens = s.hicache_load_back_tokens_total - prev.hicache_load_back_tokens_total
        msg.prefetched_tokens = s.hicache_storage_hit_tokens_total - prev.hicache_storage_hit_tokens_total
        msg.backuped_tokens = s.hicache_storage_write_tokens_total - prev.hicache_storage_write_tokens_total
        msg.hicache_host_hit_tokens = s.hicache_host_hit_tokens_total - prev.hicache_host_hit_tokens_total
        msg.hicache_load_back_bytes = s.hicache_load_back_bytes_total - prev.hicache_load_back_bytes_total
        msg.hicache_backup_bytes = s.hicache_backup_bytes_total - prev.hicache_backup_bytes_total
        msg.hicache_storage_corrupt_pages = (s.hicache_storage_corrupt_pages_total
                                             - prev.hicache_storage_corrupt_pages_total)
        load_s = s.hicache_load_back_seconds_total - prev.hicache_load_back_seconds_total
        if load_s > 0:
            msg.load_back_duration_s.append(load_s)

    def close(self) -> None:
        self.sender.close()
