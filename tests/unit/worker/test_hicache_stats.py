"""HiCache engine stats reach SchedulerStats (gauges, deltas) and the Prometheus metrics."""
from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry
from tandem.engine import EngineStats
from tandem.metrics import EngineMetrics
from tandem.worker.stats_reporter import StatsReporter


class _Collect:
    def __init__(self):
        self.msgs = []

    def send(self, msg):
        self.msgs.append(msg)

    def close(self):
        pass


def test_hicache_stats_become_deltas_and_metrics(tmp_path):
    rep = StatsReporter(f"ipc://{tmp_path}/stats", page_size=16, stats=EngineStats)
    rep.sender.close()
    rep.sender = _Collect()
    first = EngineStats(num_total_pages=32, hicache_host_used_pages=4, hicache_host_total_pages=64,
                        hicache_host_hit_tokens_total=160, hicache_load_back_tokens_total=160,
                        hicache_load_back_bytes_total=4096, hicache_load_back_seconds_total=0.002,
                        hicache_evicted_tokens_total=320, hicache_storage_hit_tokens_total=32)
    second = dataclasses.replace(first, hicache_host_used_pages=6, hicache_host_hit_tokens_total=240,
                                 hicache_storage_corrupt_pages_total=1)
    rep.after_step(first)
    rep.after_step(second)
    a, b = rep.sender.msgs
    assert (a.hicache_host_used_tokens, a.hicache_host_total_tokens) == (64, 1024)
    assert (a.hicache_host_hit_tokens, a.load_back_tokens, a.evicted_tokens, a.prefetched_tokens) == (160, 160, 320, 32)
    assert a.load_back_duration_s == [0.002] and b.load_back_duration_s == []
    assert (b.hicache_host_hit_tokens, b.load_back_tokens, b.hicache_storage_corrupt_pages) == (80, 0, 1)
    reg = CollectorRegistry()
    em = EngineMetrics(reg, model_name="m", engine_type="unified", worker_id="w")
    em.apply(a)
    em.apply(b)
    labels = {"model_name": "m", "engine_type": "unified", "worker_id": "w", "tp_rank": "0", "pp_rank": "0"}
    assert reg.get_sample_value("tandem_hicache_host_hit_tokens_total", labels) == 240
    assert reg.get_sample_value("sglang:hicache_host_used_tokens", labels) == 96
    assert reg.get_sample_value("sglang:load_back_duration_seconds_count", labels) == 1


def test_stats_without_hicache_set_no_hicache_field(tmp_path):
    rep = StatsReporter(f"ipc://{tmp_path}/stats", page_size=16, stats=EngineStats)
    rep.sender.close()
    rep.sender = _Collect()
    rep.after_step(EngineStats(num_total_pages=32))
    (msg,) = rep.sender.msgs
    assert msg.hicache_host_total_tokens is None and msg.load_back_tokens == 0
