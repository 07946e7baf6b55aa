"""Logical -> physical expert dispatch as device table lookups (graph-safe, no host round trip).

``ExpertDispatcher`` holds an ``ExpertLocation``'s maps as device tensors of fixed shape, so a
captured CUDA graph reads them by address: a new placement is copied *into* them
(``set_location``), never swapped. Every MoE layer gets the dispatcher at construction.

The three algorithms (``--ep-dispatch-algorithm``), one rule each, written once here
(``dispatch_ids``) for the host reference (``ExpertLocation.dispatch``) and the device path, and
fused into the triton backend's routing kernel (``tandem.engine.kernels.moe_routing``):

* ``static``: replica ``row % replica_count`` (``row`` = the token's index in the batch);
* ``dynamic``: the ``j``-th entry of the batch routed to an expert (in token order) takes
  replica ``j % replica_count``, so each expert's tokens split evenly over its replicas;
* ``random``: replica ``hash(seed, layer, row, position, expert) % replica_count``: uniform,
  seeded, the same on every EP rank, a fresh draw at every position.

Expert parallelism: slots ``[local_start, local_start + num_local)`` live on this rank;
``all_reduce`` (or None on one rank) sums the per-entry expert outputs of every rank.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .placement import ExpertLocation

__all__ = ["ExpertDispatcher", "dispatch_ids", "replica_hash", "DISPATCH_ALGORITHMS", "MASK32"]

DISPATCH_ALGORITHMS = ("static", "dynamic", "random")

MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27: a 32-bit value times it stays below 2**59 in int64


def _mix32(h: torch.Tensor) -> torch.Tensor:
    h = (((h >> 16) ^ h) * _MIX) & MASK32
    h = (((h >> 16) ^ h) * _MIX) & MASK32
    return (h >> 16) ^ h


def replica_hash(seed: int, layer: int, rows: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The ``random`` draw: a 32-bit hash of (seed, layer, row, position, expert), int64 in [0, 2**32)."""
    h = _mix32(torch.full_like(ids, seed & MASK32))
    h = _mix32(h ^ layer)
    h = _mix32(h ^ (positions & MASK32))
    h = _mix32(h ^ rows)
    return _mix32(h ^ ids)


def dispatch_ids(log2phy: torch.Tensor, logcnt: torch.Tensor, ids: torch.Tensor, algorithm: str, layer: int = 0,
                 seed: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Physical slots ``[T, k]`` (int64) of the logical ``ids [T, k]`` for one layer's tables
    (``log2phy [E, R]`` slot of each replica, ``logcnt [E]`` replicas); device ops only."""
    if algorithm not in DISPATCH_ALGORITHMS:
        raise ValueError(f"ep_dispatch_algorithm={algorithm!r}: allowed {', '.join(DISPATCH_ALGORITHMS)}")
    ids = ids.long()
    T, k = ids.shape
    cnt = logcnt.long()[ids]
    rows = torch.arange(T, device=ids.device)[:, None].expand(T, k)
    if algorithm == "static":
        rep = rows % cnt
    elif algorithm == "random":
        pos = rows if positions is None else positions.long().view(T, 1).expand(T, k)
        rep = replica_hash(seed, layer, rows, pos, ids) % cnt
    else:  # dynamic: rank of each entry among the batch's entries of its expert, in token order
        flat = ids.reshape(-1)
        n = flat.numel()
        order = torch.argsort(flat * n + torch.arange(n, device=ids.device))
        sorted_ids = flat[order]
        first = torch.searchsorted(sorted_ids, sorted_ids)
        occurrence = torch.empty_like(flat)
        occurrence[order] = torch.arange(n, device=ids.device) - first
        rep = occurrence.view(T, k) % cnt
    return log2phy.long()[ids, rep]


class ExpertDispatcher:
    """Device tables of the running placement, for every MoE layer (see the module docstring)."""

    def __init__(self, location: ExpertLocation, algorithm: str = "static", device: str | torch.device = "cpu",
                 seed: int = 0, rank: int = 0, all_reduce: Callable[[torch.Tensor], None] | None = None):
        if algorithm not in DISPATCH_ALGORITHMS:
            raise ValueError(f"ep_dispatch_algorithm={algorithm!r}: allowed {', '.join(DISPATCH_ALGORITHMS)}")
        if not 0 <= rank < location.ep_size:
            raise ValueError(f"EP rank {rank} is outside the placement's {location.ep_size} ranks")
        self.algorithm = algorithm
        self.seed = seed & MASK32
        self.rank = rank
        self.all_reduce = all_reduce if location.ep_size > 1 else None
        self.device = torch.device(device)
        L, E, P = location.num_layers, location.num_logical, location.num_physical
        # Fixed shapes: any placement of P slots gives an expert at most P - E + 1 replicas.
        self.max_replicas = P - E + 1
        self.log2phy = torch.zeros(L, E, self.max_replicas, dtype=torch.int32, device=self.device)
        self.logcnt = torch.zeros(L, E, dtype=torch.int32, device=self.device)
        self.physical_to_logical = torch.zeros(L, P, dtype=torch.int64, device=self.device)
        slots = location.slots_of_rank(rank)
        self.local_start, self.num_local = slots.start, len(slots)
        self.location = location
        self._write_tables(location)

    @property
    def num_layers(self) -> int:
        return self.location.num_layers

    @property
    def num_logical(self) -> int:
        return self.location.num_logical

    @property
    def num_physical(self) -> int:
        return self.location.num_physical

    @property
    def ep_size(self) -> int:
        return self.location.ep_size

    def _write_tables(self, location: ExpertLocation) -> None:
        l2p = location.logical_to_physical.clamp(min=0).to(torch.int32)
        self.log2phy.zero_()
        self.log2phy[:, :, : l2p.shape[2]].copy_(l2p)
        self.logcnt.copy_(location.logical_count.to(torch.int32))
        self.physical_to_logical.copy_(location.physical_to_logical)

    def set_location(self, location: ExpertLocation) -> None:
        """Copy a new placement of the same shape into the tables (in place: graphs keep reading them)."""
        old = self.location
        if (location.num_layers, location.num_logical, location.num_physical, location.ep_size) != (
                old.num_layers, old.num_logical, old.num_physical, old.ep_size):
            raise ValueError(f"plan {location!r} does not match the running placement {old!r}")
        self._write_tables(location)
        self.location = location

    def local_experts(self, layer: int) -> torch.Tensor:
        """Logical expert held by each of this rank's slots in ``layer`` (host, int64)."""
        return self.location.physical_to_logical[layer, self.local_start:self.local_start + self.num_local]

    def dispatch(self, layer: int, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Physical slots of the logical ``ids [T, k]`` (device ops, no host sync)."""
        return dispatch_ids(self.log2phy[layer], self.logcnt[layer], ids, self.algorithm, layer, self.seed, positions)
