"""The engine's stats: counters the scheduler and the engine bump as things happen
(:class:`StatsCollector`), gauges read from the engine's parts when a snapshot is taken, and a
5-second generation-throughput window (one entry a step, so stats cost O(1) per step)."""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from .request import Status


@dataclass
class EngineStats:
    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    num_held_reqs: int = 0
    num_external_reqs: int = 0
    num_used_pages: int = 0
    num_free_pages: int = 0
    num_cached_pages: int = 0
    num_evictable_pages: int = 0
    num_total_pages: int = 0
    num_used_tokens: int = 0
    token_usage: float = 0.0
    cache_hit_rate: float = 0.0
    prompt_tokens_total: int = 0
    cached_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_requests_total: int = 0
    num_retracted_total: int = 0
    gen_throughput: float = 0.0
    step_kind: str = "idle"
    step_batch_size: int = 0
    step_num_tokens: int = 0
    step_time_s: float = 0.0
    # HiCache (None / 0 without it): host pool gauges and totals since start
    hicache_host_used_pages: int | None = None
    hicache_host_total_pages: int | None = None
    hicache_host_hit_tokens_total: int = 0
    hicache_storage_hit_tokens_total: int = 0
    hicache_load_back_tokens_total: int = 0
    hicache_load_back_bytes_total: int = 0
    hicache_load_back_seconds_total: float = 0.0
    hicache_backup_tokens_total: int = 0
    hicache_backup_bytes_total: int = 0
    hicache_evicted_tokens_total: int = 0
    hicache_storage_write_tokens_total: int = 0
    hicache_storage_corrupt_pages_total: int = 0
    # LoRA (--enable-lora), totals since start by adapter name (requests without one are not in them)
    lora_requests_total: dict = field(default_factory=dict)  # requests finished
    lora_prompt_tokens_total: dict = field(default_factory=dict)
    lora_generation_tokens_total: dict = field(default_factory=dict)


class StatsCollector:
    """Owns the engine's :class:`EngineStats`: the scheduler reports tokens and finished
    requests, the engine added requests and each step; ``snapshot`` adds the gauges."""

    def __init__(self, num_total_pages: int) -> None:
        self._s = EngineStats(num_total_pages=num_total_pages)
        # (time, tokens) per step over the last 5 s.
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._window_tokens = 0
        self._step_tokens = 0

    # ---- events --------------------------------------------------------------------------
    def request_added(self, num_prompt_tokens: int, lora: str | None = None) -> None:
        self._s.prompt_tokens_total += num_prompt_tokens
        if lora is not None:
            _bump(self._s.lora_prompt_tokens_total, lora, num_prompt_tokens)

    def token_generated(self, lora: str | None = None) -> None:
        self._s.generation_tokens_total += 1
        self._step_tokens += 1
        if lora is not None:
            _bump(self._s.lora_generation_tokens_total, lora, 1)

    def request_finished(self, cached_tokens: int, lora: str | None = None) -> None:
        """A request ended (finished, aborted, or a prefill-only one released)."""
        self._s.num_requests_total += 1
        self._s.cached_tokens_total += cached_tokens
        if lora is not None:
            _bump(self._s.lora_requests_total, lora, 1)

    def step_done(self, kind: str, batch_size: int, num_tokens: int, seconds: float) -> None:
        s = self._s
        s.step_kind, s.step_batch_size, s.step_num_tokens, s.step_time_s = kind, batch_size, num_tokens, seconds
        if self._step_tokens:
            self._window.append((time.monotonic(), self._step_tokens))
            self._window_tokens += self._step_tokens
            self._step_tokens = 0

    # ---- reading -------------------------------------------------------------------------
    def snapshot(self, scheduler, pool, cache, hicache) -> EngineStats:
        """A copy of the stats with the gauges read now from the engine's parts."""
        s = self._s
        s.num_running_reqs = len(scheduler.running)
        s.num_queue_reqs = len(scheduler.waiting)
        s.num_held_reqs = sum(1 for r in scheduler.requests.values() if r.status == Status.HELD)
        s.num_external_reqs = sum(1 for r in scheduler.requests.values() if r.status == Status.EXTERNAL_WAIT)
        s.num_free_pages = pool.num_free_pages
        s.num_used_pages = pool.num_used_pages
        s.num_cached_pages = cache.num_pages
        s.num_evictable_pages = cache.evictable_pages
        in_use = pool.num_used_pages - cache.evictable_pages
        s.num_used_tokens = in_use * pool.page_size
        s.token_usage = in_use / pool.num_pages
        s.cache_hit_rate = s.cached_tokens_total / max(1, s.prompt_tokens_total)
        s.num_retracted_total = scheduler.num_retracted
        now = time.monotonic()
        window = self._window
        while window and now - window[0][0] >= 5.0:
            self._window_tokens -= window.popleft()[1]
        s.gen_throughput = self._window_tokens / max(now - window[0][0], 1e-3) if window else 0.0
        if hicache is not None:
            _hicache_gauges(s, hicache)
        return EngineStats(**{k: dict(v) if isinstance(v, dict) else v for k, v in vars(s).items()})


def _bump(totals: dict, key: str, n: int) -> None:
    totals[key] = totals.get(key, 0) + n


def _hicache_gauges(s: EngineStats, ctl) -> None:
    c = ctl.counters
    s.hicache_host_used_pages, s.hicache_host_total_pages = ctl.host.num_used_pages, ctl.host.num_pages
    s.hicache_host_hit_tokens_total, s.hicache_storage_hit_tokens_total = c.host_hit_tokens, c.storage_hit_tokens
    s.hicache_load_back_tokens_total, s.hicache_load_back_bytes_total = c.load_back_tokens, c.load_back_bytes
    s.hicache_load_back_seconds_total = c.load_back_seconds
    s.hicache_backup_tokens_total, s.hicache_backup_bytes_total = c.backup_tokens, c.backup_bytes
    s.hicache_evicted_tokens_total = c.evicted_tokens
    s.hicache_storage_write_tokens_total = c.storage_write_tokens
    s.hicache_storage_corrupt_pages_total = ctl.storage_corrupt_pages
