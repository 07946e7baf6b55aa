"""Global KV prefix index: which worker holds which prefix blocks.

Fed by every worker's `Decode.KvEvents` stream (BlockStored / BlockRemoved /
AllBlocksCleared). The index keys blocks by the router's own chained hash of the block
tokens (`block_hash.hash_block`), computed from the token ids the events carry, and keeps a
per-worker map from the worker's block hash to that key. So the router never depends on the
worker's hash function: equal keys mean equal token prefixes, whatever the engine hashes.
(When the engine uses `tandem.routing.block_hash` too, both hashes coincide.)

Matching a request walks its block keys from the start and counts, per worker, how many
leading blocks that worker holds: the reusable prefix length in blocks, as in Dynamo's
KV router.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from tandem.routing.block_hash import block_hashes, hash_block

log = logging.getLogger(__name__)


class KvIndexError(ValueError):
    """An event cannot be applied (unknown parent, block size mismatch, bad lengths)."""


class _WorkerBlocks:
    __slots__ = ("by_ext", "refs")

    def __init__(self) -> None:
        self.by_ext: dict[int, int] = {}  # worker's block hash -> router key
        self.refs: dict[int, int] = {}  # router key -> number of worker hashes mapping to it


class KvIndex:
    def __init__(self, block_size: int | None = None) -> None:
        # Block size of the indexed workers; learnt from the first event when not given.
        self.block_size = block_size
        self._holders: dict[int, set[str]] = {}
        self._workers: dict[str, _WorkerBlocks] = {}
        self._last_sequence: dict[str, int] = {}
        self.events_applied = 0
        self.events_rejected = 0

    # ---- events -------------------------------------------------------------------

    def apply_batch(self, worker_id: str, batch) -> bool:
        """Apply a `KvEventBatch`. Returns False when its sequence number shows a gap (the
        caller should resubscribe with a snapshot); the batch is still applied."""
        last = self._last_sequence.get(worker_id)
        in_order = last is None or batch.sequence == last + 1
        self._last_sequence[worker_id] = batch.sequence
        for ev in batch.events:
            kind = ev.WhichOneof("event")
            try:
                if kind == "stored":
                    s = ev.stored
                    self.store(worker_id, list(s.block_hashes), list(s.token_ids), s.block_size,
                               s.parent_block_hash if s.HasField("parent_block_hash") else None)
                elif kind == "removed":
                    self.remove(worker_id, list(ev.removed.block_hashes))
                elif kind == "cleared":
                    self.clear(worker_id)
                self.events_applied += 1
            except KvIndexError as e:
                self.events_rejected += 1
                log.warning("kv event from %s rejected: %s", worker_id, e)
        return in_order

    def store(self, worker_id: str, hashes: Sequence[int], token_ids: Sequence[int], block_size: int,
              parent: int | None = None) -> None:
        """Blocks `hashes` (worker's hashes, prefix order) were cached; `token_ids` are their tokens."""
        if block_size <= 0:
            raise KvIndexError(f"block_size={block_size}: must be > 0")
        if self.block_size is None:
            self.block_size = block_size
        elif block_size != self.block_size:
            raise KvIndexError(f"block_size={block_size} differs from the index's {self.block_size}; "
                               "all workers behind one router must use the same page size")
        if len(token_ids) != block_size * len(hashes):
            raise KvIndexError(f"{len(token_ids)} token ids for {len(hashes)} blocks of {block_size}")
        w = self._workers.setdefault(worker_id, _WorkerBlocks())
        if parent is None:
            parent_key = None
        else:
            parent_key = w.by_ext.get(parent)
            if parent_key is None:
                raise KvIndexError(f"parent block {parent:#x} unknown for worker {worker_id}")
        for i, ext in enumerate(hashes):
            key = hash_block(parent_key, token_ids[i * block_size:(i + 1) * block_size])
            old = w.by_ext.get(ext)
            if old is not None:
                if old == key:
                    parent_key = key
                    continue
                self._unref(worker_id, w, old)
            w.by_ext[ext] = key
            n = w.refs.get(key, 0)
            w.refs[key] = n + 1
            if n == 0:
                self._holders.setdefault(key, set()).add(worker_id)
            parent_key = key

    def remove(self, worker_id: str, hashes: Iterable[int]) -> None:
        w = self._workers.get(worker_id)
        if w is None:
            return
        for ext in hashes:
            key = w.by_ext.pop(ext, None)
            if key is not None:
                self._unref(worker_id, w, key)

    def clear(self, worker_id: str) -> None:
        """Forget every block of a worker (AllBlocksCleared, stream lost)."""
        w = self._workers.pop(worker_id, None)
        if w is None:
            return
        for key in w.refs:
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del self._holders[key]

    def remove_worker(self, worker_id: str) -> None:
        self.clear(worker_id)
        self._last_sequence.pop(worker_id, None)

    def reset_sequence(self, worker_id: str) -> None:
        """Forget the last sequence number (a new subscription starts a new numbering check)."""
        self._last_sequence.pop(worker_id, None)

    def _unref(self, worker_id: str, w: _WorkerBlocks, key: int) -> None:
        n = w.refs[key] - 1
        if n:
            w.refs[key] = n
            return
        del w.refs[key]
        holders = self._holders[key]
        holders.discard(worker_id)
        if not holders:
            del self._holders[key]

    # ---- queries ------------------------------------------------------------------

    def request_keys(self, token_ids: Sequence[int]) -> list[int]:
        """Router keys of a request's full blocks (empty until the block size is known)."""
        if self.block_size is None:
            return []
        return block_hashes(token_ids, self.block_size)

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """Per worker, the number of leading blocks of `keys` it holds (workers with 0 omitted)."""
        scores: dict[str, int] = {}
        active: set[str] | None = None
        depth = 0
        for key in keys:
            holders = self._holders.get(key)
            if not holders:
                break
            if active is None:
                active = set(holders)
            else:
                dropped = active - holders
                if dropped:
                    for wid in dropped:
                        scores[wid] = depth
                    active -= dropped
                    if not active:
                        break
            depth += 1
        for wid in active or ():
            scores[wid] = depth
        return scores

    def num_blocks(self, worker_id: str | None = None) -> int:
        """Blocks indexed for one worker, or distinct blocks over all workers."""
        if worker_id is None:
            return len(self._holders)
        w = self._workers.get(worker_id)
        return len(w.refs) if w else 0

    def workers(self) -> list[str]:
        return list(self._workers)
