"""The engine's stats: one EngineStats updated every step, a 5-second generation-throughput
window (split out of engine.py, methods unchanged). Mixed into EngineCore."""
from __future__ import annotations

import time
from dataclasses import dataclass

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


class EngineStatsMixin:
    def stats(self) -> EngineStats:
        self._update_stats(self._stats.step_kind, self._stats.step_batch_size, self._stats.step_num_tokens,
                           self._stats.step_time_s)
        return EngineStats(**vars(self._stats))

    def _update_stats(self, kind: str, bsz: int, ntok: int, dt: float) -> None:
        s, sch, pool = self._stats, self.scheduler, self.pool
        s.num_running_reqs = len(sch.running)
        s.num_queue_reqs = len(sch.waiting)
        s.num_held_reqs = sum(1 for r in self.requests.values() if r.status == Status.HELD)
        s.num_external_reqs = sum(1 for r in self.requests.values() if r.status == Status.EXTERNAL_WAIT)
        s.num_free_pages = pool.num_free_pages
        s.num_used_pages = pool.num_used_pages
        s.num_cached_pages = self.cache.num_pages
        s.num_evictable_pages = self.cache.evictable_pages
        in_use = pool.num_used_pages - self.cache.evictable_pages
        s.num_used_tokens = in_use * pool.page_size
        s.token_usage = in_use / pool.num_pages
        s.cache_hit_rate = s.cached_tokens_total / max(1, s.prompt_tokens_total)
        s.num_retracted_total = sch.num_retracted
        now = time.monotonic()
        window = self._gen_window
        if self._step_tokens:
            window.append((now, self._step_tokens))
            self._gen_window_tokens += self._step_tokens
            self._step_tokens = 0
        while window and now - window[0][0] >= 5.0:
            self._gen_window_tokens -= window.popleft()[1]
        s.gen_throughput = self._gen_window_tokens / max(now - window[0][0], 1e-3) if window else 0.0
        s.step_kind, s.step_batch_size, s.step_num_tokens, s.step_time_s = kind, bsz, ntok, dt
        if self.hicache is not None:
            self._update_hicache_stats(s, self.hicache)

    @staticmethod
    def _update_hicache_stats(s: EngineStats, ctl) -> None:
        c = ctl.counters
        s.hicache_host_used_pages, s.hicache_host_total_pages = ctl.host.num_used_pages, ctl.host.num_pages
        s.hicache_host_hit_tokens_total, s.hicache_storage_hit_tokens_total = c.host_hit_tokens, c.storage_hit_tokens
        s.hicache_load_back_tokens_total, s.hicache_load_back_bytes_total = c.load_back_tokens, c.load_back_bytes
        s.hicache_load_back_seconds_total = c.load_back_seconds
        s.hicache_backup_tokens_total, s.hicache_backup_bytes_total = c.backup_tokens, c.backup_bytes
        s.hicache_evicted_tokens_total = c.evicted_tokens
        s.hicache_storage_write_tokens_total = c.storage_write_tokens
        s.hicache_storage_corrupt_pages_total = ctl.storage_corrupt_pages
