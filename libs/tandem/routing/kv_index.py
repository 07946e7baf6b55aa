"""Global KV prefix index: which worker holds which prefix blocks.

Fed by every worker's `Decode.KvEvents` stream (BlockStored / BlockRemoved /
AllBlocksCleared). The index keys blocks by the router's own chained hash of the block
tokens (`block_hash.hash_block`), computed from the token ids the events carry, and keeps a
per-worker map from the worker's block hash to that key. So the router never depends on the
worker's hash function: equal keys mean equal token prefixes, whatever the engine hashes.
(When the engine uses `tandem.routing.block_hash` too, both hashes coincide.)

Matching a request walks its block keys from the start and counts, per worker, how many
leading blocks that worker holds: the reusable prefix length in blocks, as in Dynamo's
KV router. Blocks are indexed per tier (``DEVICE``; ``HOST`` for HiCache workers, whose
blocks need a load-back copy): ``match`` counts device blocks, ``match_tiers`` also the
blocks that follow in the host tier.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from tandem.routing.block_hash import block_hashes, hash_block, lora_root_hash

log = logging.getLogger(__name__)


class KvIndexError(ValueError):
    """An event cannot be applied (unknown parent, block size mismatch, bad lengths)."""


DEVICE, HOST = 0, 1  # tandem.v1 KvTier values
TIERS = (DEVICE, HOST)


class _WorkerBlocks:
    __slots__ = ("by_ext", "held", "refs")

    def __init__(self) -> None:
        self.by_ext: dict[int, int] = {}  # worker's block hash -> router key (while any tier holds it)
        self.held: dict[int, set[int]] = {t: set() for t in TIERS}  # tier -> worker hashes held there
        self.refs: dict[int, dict[int, int]] = {t: {} for t in TIERS}  # tier -> router key -> worker hashes


class KvIndex:
    def __init__(self, block_size: int | None = None) -> None:
        # Block size of the indexed workers; learnt from the first event when not given.
        self.block_size = block_size
        self._holders: dict[int, set[str]] = {}  # device tier: router key -> workers
        self._host_holders: dict[int, set[str]] = {}
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
        for ev in batch.events:
            kind = ev.WhichOneof("event")
            try:
                if kind == "stored":
                    s = ev.stored
                    self.store(worker_id, list(s.block_hashes), list(s.token_ids), s.block_size,
                               s.parent_block_hash if s.HasField("parent_block_hash") else None, tier=s.tier,
                               lora=s.lora_name or None)
                elif kind == "removed":
                    self.remove(worker_id, list(ev.removed.block_hashes), tier=ev.removed.tier)
                elif kind == "cleared":
                    self.clear(worker_id)
                self.events_applied += 1
            except KvIndexError as e:
                self.events_rejected += 1
                log.warning("kv event from %s rejected: %s", worker_id, e)
        # Recorded after the events are applied: a reader that sees this sequence sees its blocks.
        self._last_sequence[worker_id] = batch.sequence
        return in_order

    def last_sequence(self, worker_id: str) -> int:
        """Sequence number of the last batch applied from ``worker_id`` (0: none yet). Compare
        with the worker's ``WorkerLoad.kv_event_sequence`` to know whether the index caught up."""
        return self._last_sequence.get(worker_id, 0)

    def _tier_holders(self, tier: int) -> dict[int, set[str]]:
        if tier not in TIERS:
            raise KvIndexError(f"unknown KV tier {tier}")
        return self._holders if tier == DEVICE else self._host_holders

    def store(self, worker_id: str, hashes: Sequence[int], token_ids: Sequence[int], block_size: int,
              parent: int | None = None, tier: int = DEVICE, lora: str | None = None) -> None:
        """Blocks `hashes` (worker's hashes, prefix order) were cached in `tier`; `token_ids` are their tokens;
        `lora`: the LoRA adapter they were computed under (keys of a first block chain on its root hash)."""
        holders = self._tier_holders(tier)
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
            parent_key = lora_root_hash(lora)
        else:
            parent_key = w.by_ext.get(parent)
            if parent_key is None:
                raise KvIndexError(f"parent block {parent:#x} unknown for worker {worker_id}")
        held, refs = w.held[tier], w.refs[tier]
        for i, ext in enumerate(hashes):
            key = hash_block(parent_key, token_ids[i * block_size:(i + 1) * block_size])
            old = w.by_ext.get(ext)
            if old is not None and old != key:  # the worker reused a hash for other tokens
                for t in TIERS:
                    if ext in w.held[t]:
                        w.held[t].discard(ext)
                        self._unref(worker_id, w, t, old)
            elif ext in held:
                parent_key = key
                continue
            w.by_ext[ext] = key
            held.add(ext)
            n = refs.get(key, 0)
            refs[key] = n + 1
            if n == 0:
                holders.setdefault(key, set()).add(worker_id)
            parent_key = key

    def remove(self, worker_id: str, hashes: Iterable[int], tier: int = DEVICE) -> None:
        """Blocks left `tier` (they may still be held in another one)."""
        w = self._workers.get(worker_id)
        if w is None:
            return
        held = w.held[tier]
        for ext in hashes:
            if ext not in held:
                continue
            held.discard(ext)
            key = w.by_ext[ext]
            if not any(ext in w.held[t] for t in TIERS):
                del w.by_ext[ext]
            self._unref(worker_id, w, tier, key)

    def clear(self, worker_id: str) -> None:
        """Forget every block of a worker (AllBlocksCleared, stream lost)."""
        w = self._workers.pop(worker_id, None)
        if w is None:
            return
        for tier in TIERS:
            holders_of = self._tier_holders(tier)
            for key in w.refs[tier]:
                holders = holders_of.get(key)
                if holders is not None:
                    holders.discard(worker_id)
                    if not holders:
                        del holders_of[key]

    def remove_worker(self, worker_id: str) -> None:
        self.clear(worker_id)
        self._last_sequence.pop(worker_id, None)

    def reset_sequence(self, worker_id: str) -> None:
        """Forget the last sequence number (a new subscription starts a new numbering check)."""
        self._last_sequence.pop(worker_id, None)

    def _unref(self, worker_id: str, w: _WorkerBlocks, tier: int, key: int) -> None:
        refs = w.refs[tier]
        n = refs[key] - 1
        if n:
            refs[key] = n
            return
        del refs[key]
        holders_of = self._tier_holders(tier)
        holders = holders_of[key]
        holders.discard(worker_id)
        if not holders:
            del holders_of[key]

    # ---- queries ------------------------------------------------------------------

    def request_keys(self, token_ids: Sequence[int], lora: str | None = None) -> list[int]:
        """Router keys of a request's full blocks under LoRA adapter `lora` (None: the base model;
        empty until the block size is known)."""
        if self.block_size is None:
            return []
        return block_hashes(token_ids, self.block_size, lora_root_hash(lora))

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """Per worker, the number of leading blocks of `keys` it holds on the device (workers
        with 0 omitted)."""
        return self._match(keys, self._holders.get)

    def match_tiers(self, keys: Sequence[int]) -> dict[str, tuple[int, int]]:
        """Per worker, (leading blocks on the device, leading blocks on the device or the host)."""
        if not self._host_holders:
            return {w: (d, d) for w, d in self.match(keys).items()}

        def either(key):
            return (self._holders.get(key) or set()) | (self._host_holders.get(key) or set())

        device = self.match(keys)
        return {w: (device.get(w, 0), d) for w, d in self._match(keys, either).items()}

    @staticmethod
    def _match(keys: Sequence[int], holders_of) -> dict[str, int]:
        scores: dict[str, int] = {}
        active: set[str] | None = None
        depth = 0
        for key in keys:
            holders = holders_of(key)
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

    def num_blocks(self, worker_id: str | None = None, tier: int = DEVICE) -> int:
        """Blocks indexed in a tier for one worker, or distinct blocks over all workers."""
        if worker_id is None:
            return len(self._tier_holders(tier))
        w = self._workers.get(worker_id)
        return len(w.refs[tier]) if w else 0

    def workers(self) -> list[str]:
        return list(self._workers)
