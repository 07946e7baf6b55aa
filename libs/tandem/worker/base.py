"""What the prefill and the decode worker share: their engine loop, their KV-event log, and
their load report."""
from __future__ import annotations

from tandem.v1 import common_pb2
from tandem.worker.engine_loop import EngineLoop
from tandem.worker.kv_events import KvEventLog


class WorkerBase:
    def __init__(self, config, loop: EngineLoop, worker_id: str) -> None:
        self.config = config
        self.loop = loop
        self.worker_id = worker_id
        self.events = KvEventLog(worker_id, loop.kv_snapshot)
        loop.subscribe_kv_events(self.events.on_events)

    def load(self, num_inflight_transfers: int, num_prefilled_reqs: int) -> common_pb2.WorkerLoad:
        """GetLoad's answer, from the engine loop's latest stats."""
        s = self.loop.stats
        return common_pb2.WorkerLoad(
            num_running_reqs=s.num_running_reqs, num_waiting_reqs=s.num_queue_reqs, free_pages=s.num_free_pages,
            total_pages=s.num_total_pages, evictable_pages=s.num_evictable_pages,
            num_inflight_transfers=num_inflight_transfers, token_usage=s.token_usage,
            cache_hit_rate=s.cache_hit_rate, num_prefilled_reqs=num_prefilled_reqs,
            kv_event_sequence=self.events.sequence, lora_names=self.loop.lora_names)
