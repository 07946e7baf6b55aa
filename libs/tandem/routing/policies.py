"""Routing policies: pick the decode (or aggregated) worker for a request.

A policy sees a `WorkerView` per healthy worker: the last `GetLoad` snapshot plus what the
router itself tracks (requests and KV blocks it has in flight on that worker, which is fresher
than any polled load).

kv_aware follows Dynamo's KV router: for each worker,
    cost = kv_overlap_weight * (blocks the worker would have to prefill) + active blocks
where blocks to prefill = request blocks - blocks of the request's prefix already cached on
that worker (from the `KvIndex`; a block the worker holds only in its HiCache host tier counts
as kv_host_hit_weight of one), and active blocks = KV blocks of the router's in-flight
requests on that worker. The cheapest worker wins; ties go to the worker with fewer in-flight
requests, then fewer cached blocks (more room, so new prefixes spread), then round robin.
"""
from __future__ import annotations

import itertools
import math
import random as _random
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from tandem.routing.kv_index import KvIndex

POLICIES = ("round_robin", "random", "least_loaded", "kv_aware")


@dataclass
class WorkerView:
    worker_id: str
    # Requests and KV blocks this router has in flight on the worker.
    active_requests: int = 0
    active_blocks: int = 0
    # Last GetLoad snapshot (None until the first poll).
    num_waiting_reqs: int = 0
    num_running_reqs: int = 0
    free_pages: int = 0
    total_pages: int = 0


@dataclass
class Decision:
    worker_id: str
    # kv_aware only: request blocks, and how many leading ones the chosen worker holds.
    request_blocks: int = 0
    overlap_blocks: int = 0
    cost: float | None = None
    # kv_aware only: time spent hashing the prompt's blocks and looking them up, in ms.
    hash_ms: float = 0.0
    match_ms: float = 0.0


class Policy(ABC):
    name: str = ""

    @abstractmethod
    def choose(self, workers: Sequence[WorkerView], token_ids: Sequence[int], lora: str | None = None) -> Decision:
        """Pick one of `workers` (non-empty) for a request with prompt `token_ids` under LoRA
        adapter `lora` (None: the base model; every worker given holds it)."""


class _Rotating(Policy):
    """Workers in a stable order (by id, so the rotation holds while workers come and go) and a
    rotating start: ``ordered(workers)`` -> (workers, start)."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def ordered(self, workers: Sequence[WorkerView]) -> tuple[list[WorkerView], int]:
        ordered = sorted(workers, key=lambda w: w.worker_id)
        return ordered, next(self._counter) % len(ordered)


class RoundRobinPolicy(_Rotating):
    name = "round_robin"

    def choose(self, workers, token_ids, lora=None):
        ordered, start = self.ordered(workers)
        return Decision(ordered[start].worker_id)


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = _random.Random(seed)

    def choose(self, workers, token_ids, lora=None):
        return Decision(self._rng.choice(list(workers)).worker_id)


class LeastLoadedPolicy(_Rotating):
    """Fewest waiting requests (GetLoad), then fewest router in-flight requests, then most free pages."""

    name = "least_loaded"

    def choose(self, workers, token_ids, lora=None):
        ordered, start = self.ordered(workers)
        n = len(ordered)
        best = min(range(n), key=lambda i: (
            ordered[i].num_waiting_reqs, ordered[i].active_requests, -ordered[i].free_pages, (i - start) % n))
        return Decision(ordered[best].worker_id)


class KvAwarePolicy(_Rotating):
    name = "kv_aware"

    def __init__(self, index: KvIndex, overlap_weight: float = 1.0, default_block_size: int = 16,
                 host_hit_weight: float = 0.5) -> None:
        super().__init__()
        self.index = index
        self.overlap_weight = overlap_weight
        # A block a worker holds only in its host tier (HiCache) saves this fraction of a device block.
        self.host_hit_weight = host_hit_weight
        # Used for load accounting until the first KV event tells the real block size.
        self.default_block_size = default_block_size

    @property
    def block_size(self) -> int:
        return self.index.block_size or self.default_block_size

    def request_blocks(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def choose(self, workers, token_ids, lora=None):
        t0 = time.perf_counter()
        keys = self.index.request_keys(token_ids, lora)
        t1 = time.perf_counter()
        overlaps = self.index.match_tiers(keys) if keys else {}
        t2 = time.perf_counter()
        n_blocks = self.request_blocks(len(token_ids))
        ordered, start = self.ordered(workers)
        n = len(ordered)
        best_key = None
        best = None
        for i, w in enumerate(ordered):
            device, reachable = overlaps.get(w.worker_id, (0, 0))
            overlap = reachable
            saved = device + self.host_hit_weight * (reachable - device)
            cost = self.overlap_weight * (n_blocks - saved) + w.active_blocks
            key = (cost, w.active_requests, self.index.num_blocks(w.worker_id), (i - start) % n)
            if best_key is None or key < best_key:
                best_key, best = key, Decision(w.worker_id, n_blocks, overlap, cost)
        best.hash_ms, best.match_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        return best


def make_policy(name: str, index: KvIndex | None = None, overlap_weight: float = 1.0,
                seed: int | None = None, host_hit_weight: float = 0.5) -> Policy:
    """Build a policy by its config name (RouterConfig.routing_policy)."""
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy(seed)
    if name == "least_loaded":
        return LeastLoadedPolicy()
    if name == "kv_aware":
        return KvAwarePolicy(index if index is not None else KvIndex(), overlap_weight,
                             host_hit_weight=host_hit_weight)
    raise ValueError(f"routing_policy={name!r}: must be one of {', '.join(POLICIES)}")
