"""A worker's prefix-cache events as numbered batches, with replay for late subscribers.

The engine calls `on_events` on its loop thread; KvEvents stream handlers call `wait`
from gRPC threads. Batches are kept in a bounded ring so a subscriber that reconnects
with `since_sequence` misses nothing recent; one asking for a snapshot gets
AllBlocksCleared plus every block the cache holds now.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from tandem.engine import radix_cache as rc
from tandem.v1 import common_pb2

_TIERS = {rc.DEVICE: common_pb2.KV_TIER_DEVICE, rc.HOST: common_pb2.KV_TIER_HOST}


def event_to_proto(ev) -> common_pb2.KvEvent:
    if isinstance(ev, rc.BlockStored):
        stored = common_pb2.BlockStored(block_hashes=ev.block_hashes, token_ids=list(ev.token_ids),
                                        block_size=ev.block_size, tier=_TIERS[ev.tier],
                                        lora_name=ev.lora_name or "")
        if ev.parent_block_hash is not None:
            stored.parent_block_hash = ev.parent_block_hash
        return common_pb2.KvEvent(stored=stored)
    if isinstance(ev, rc.BlockRemoved):
        return common_pb2.KvEvent(removed=common_pb2.BlockRemoved(block_hashes=ev.block_hashes,
                                                                  tier=_TIERS[ev.tier]))
    if isinstance(ev, rc.AllBlocksCleared):
        return common_pb2.KvEvent(cleared=common_pb2.AllBlocksCleared())
    raise TypeError(f"unknown KV event {ev!r}")


class KvEventLog:
    def __init__(self, worker_id: str, snapshot: Callable[[], list], capacity: int = 4096) -> None:
        self.worker_id = worker_id
        self._snapshot = snapshot
        self._ring: collections.deque[common_pb2.KvEventBatch] = collections.deque(maxlen=capacity)
        self._seq = 0
        self._cond = threading.Condition()

    @property
    def sequence(self) -> int:
        return self._seq

    def on_events(self, events: list) -> None:
        batch = common_pb2.KvEventBatch(timestamp=time.time(), worker_id=self.worker_id,
                                        events=[event_to_proto(e) for e in events])
        with self._cond:
            self._seq += 1
            batch.sequence = self._seq
            self._ring.append(batch)
            self._cond.notify_all()

    def snapshot_batch(self) -> common_pb2.KvEventBatch:
        """AllBlocksCleared + every stored block, numbered with the current sequence."""
        with self._cond:
            seq = self._seq
        events = [common_pb2.KvEvent(cleared=common_pb2.AllBlocksCleared())]
        events += [event_to_proto(e) for e in self._snapshot()]
        return common_pb2.KvEventBatch(sequence=seq, timestamp=time.time(), worker_id=self.worker_id, events=events)

    def since(self, sequence: int) -> list[common_pb2.KvEventBatch]:
        with self._cond:
            return [b for b in self._ring if b.sequence > sequence]

    def wait(self, sequence: int, timeout: float) -> list[common_pb2.KvEventBatch]:
        """Batches after `sequence`, waiting up to `timeout` for the first one."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > sequence, timeout)
            return [b for b in self._ring if b.sequence > sequence]

    def stream(self, since_sequence: int, snapshot: bool, is_active: Callable[[], bool]):
        """Generator for a KvEvents RPC: optional snapshot, then replay, then live batches."""
        seq = since_sequence
        if snapshot:
            first = self.snapshot_batch()
            seq = first.sequence
            yield first
        while is_active():
            for batch in self.wait(seq, timeout=0.5):
                seq = batch.sequence
                yield batch
