"""Turns engine step stats and finished-request latencies into SchedulerStats messages
sent over ZMQ to the service's metrics publisher (SGLang's scheduler -> collector path).

`on_step` runs on the engine loop thread; `record_request` on gRPC threads. Sending
never blocks: a stalled publisher only costs dropped messages.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from tandem.engine.engine import EngineStats
from tandem.metrics import SchedulerStats, StatsSender


class StatsReporter:
    def __init__(self, endpoint: str, page_size: int, extra: Callable[[EngineStats], dict] | None = None,
                 idle_interval_s: float = 1.0) -> None:
        self.sender = StatsSender(endpoint)
        self.page_size = page_size
        # extra(stats) -> more SchedulerStats fields (the disaggregation gauges of a worker)
        self.extra = extra or (lambda _stats: {})
        self.idle_interval_s = idle_interval_s
        self._lock = threading.Lock()
        self._finished: list[dict] = []
        self._prev: EngineStats | None = None
        self._last_sent = 0.0
        self.startup: dict = {}

    def record_request(self, *, ttft: float | None, itl: list[float], e2e: float, queue_time: float | None = None,
                       aborted: bool = False) -> None:
        with self._lock:
            self._finished.append(dict(ttft=ttft, itl=itl, e2e=e2e, queue_time=queue_time, aborted=aborted))

    def on_step(self, s: EngineStats) -> None:
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
        if s.step_kind in ("prefill", "mixed"):
            msg.realtime_prefill_compute_tokens = s.step_num_tokens
        elif s.step_kind == "decode":
            msg.realtime_decode_tokens = s.step_num_tokens
        for k, v in self.startup.items():  # gauges: resent so a dropped first message loses nothing
            setattr(msg, k, v)
        with self._lock:
            finished, self._finished = self._finished, []
        for f in finished:
            msg.add_finished(e2e=f["e2e"], ttft=f["ttft"], queue_time=f["queue_time"], itl=f["itl"],
                             aborted=f["aborted"])
        for k, v in self.extra(s).items():
            setattr(msg, k, v)
        self._prev = dataclasses.replace(s)  # the engine hands its live object: keep a snapshot
        self._last_sent = time.monotonic()
        self.sender.send(msg)

    def maybe_idle_report(self, stats: Callable[[], EngineStats]) -> None:
        """From the idle loop: keep gauges fresh when no step has run for a while."""
        if time.monotonic() - self._last_sent >= self.idle_interval_s:
            self.on_step(stats())

    def close(self) -> None:
        self.sender.close()
