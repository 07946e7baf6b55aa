"""EPLB on a running engine: plans applied in place between two forward passes.

The MoE layers got the ``ExpertDispatcher`` (and the optional recorder) at construction; this
object owns what changes when a plan arrives, all *in place* so a captured CUDA graph keeps
its addresses and nothing is re-captured:

* each layer's routed expert weights ``w13 [local slots, 2I, H]`` / ``w2 [local slots, H, I]``:
  the slots whose expert changes get ``copy_``-ed rows (gathered first, so a slot can be both a
  destination and a source);
* the dispatcher's tables (``ExpertDispatcher.set_location``);
* the recorder's placement (stat_approx folds physical counts with it).

::

    eplb = EplbRuntime(dispatcher, weights, recorder, store)   # by the engine, after loading
    eplb.submit(location, version)    # any thread (the planner client); ValueError on a bad shape
    eplb.apply_pending()              # the engine's thread, between forward passes
    eplb.end_pass()                   # the engine's thread, after each forward pass: the recorder folds

A copy's source is a slot of this rank holding the expert in the old placement (device to
device); with expert parallelism an expert may have no slot here: its weights come from the
``store`` (every logical expert's weights on the host, or regenerated for dummy weights).
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from .dispatch import ExpertDispatcher
from .placement import ExpertLocation, diff
from .recorder import ExpertDistributionRecorder

__all__ = ["EplbRuntime", "ExpertStore"]

# (moe layer, logical expert) -> (w13 row [2I, H], w2 row [H, I]) on any device
ExpertStore = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


class EplbRuntime:
    def __init__(self, dispatcher: ExpertDispatcher, weights: list[tuple[torch.Tensor, torch.Tensor]],
                 recorder: ExpertDistributionRecorder | None = None, store: ExpertStore | None = None):
        if len(weights) != dispatcher.num_layers:
            raise ValueError(f"placement has {dispatcher.num_layers} layers, the model has {len(weights)} MoE layers")
        for i, (w13, w2) in enumerate(weights):
            if w13.shape[0] != dispatcher.num_local or w2.shape[0] != dispatcher.num_local:
                raise ValueError(f"MoE layer {i} holds {w13.shape[0]} routed slots, the placement gives this rank "
                                 f"{dispatcher.num_local}")
        self.dispatcher = dispatcher
        self.weights = weights
        self.recorder = recorder
        self.store = store
        self._pending: tuple[ExpertLocation, int | None] | None = None  # placement, plan version
        self._lock = threading.Lock()
        self.version = 0
        self.moves_applied = 0
        if recorder is not None:
            recorder.set_physical_to_logical(dispatcher.location.physical_to_logical)

    @property
    def location(self) -> ExpertLocation:
        return self.dispatcher.location

    # ------------------------------------------------------------------ per pass
    def end_pass(self) -> None:
        """After each forward pass (the engine's thread): the recorder folds the pass's counters."""
        if self.recorder is not None:
            self.recorder.end_pass()

    # ------------------------------------------------------------------ plans
    def submit(self, location: ExpertLocation, version: int | None = None) -> None:
        """Queue a new placement (any thread). Raises ValueError for a wrong shape."""
        old = self.location
        if (location.num_layers, location.num_logical, location.num_physical, location.ep_size) != (
                old.num_layers, old.num_logical, old.num_physical, old.ep_size):
            raise ValueError(f"plan {location!r} does not match the running placement {old!r}")
        with self._lock:
            self._pending = (location, version)

    @property
    def has_pending(self) -> bool:
        with self._lock:
            return self._pending is not None

    def take_pending(self) -> tuple[ExpertLocation | None, int | None]:
        """The queued placement and its version (None, None when there is none); clears it."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending if pending is not None else (None, None)

    def apply_pending(self) -> int:
        """Apply a queued placement (between forward passes). Returns the slot copies over all ranks."""
        new, version = self.take_pending()
        if new is None:
            return 0
        return self._apply(new, version)

    def set_location(self, location: ExpertLocation) -> int:
        """Apply ``location`` now (EP followers, between passes)."""
        self.submit(location)
        return self.apply_pending()

    def _apply(self, new: ExpertLocation, version: int | None) -> int:
        old = self.location
        d = self.dispatcher
        start, n = d.local_start, d.num_local
        copies = diff(old, new)
        with torch.no_grad():
            for i, (w13, w2) in enumerate(self.weights):
                mine = [c for c in copies if c.layer == i and start <= c.slot < start + n]
                if mine:
                    self._copy_layer(i, w13, w2, old, mine)
        d.set_location(new)
        if self.recorder is not None:
            self.recorder.set_physical_to_logical(new.physical_to_logical)
        self.version = version if version is not None else self.version + 1
        self.moves_applied += len(copies)
        return len(copies)

    def _copy_layer(self, layer: int, w13: torch.Tensor, w2: torch.Tensor, old: ExpertLocation, copies: list) -> None:
        """Every new weight is gathered before any slot is written (a slot may be a source too)."""
        start, n = self.dispatcher.local_start, self.dispatcher.num_local
        local_of = {}  # logical expert -> a local slot holding it in the old placement
        for s, e in enumerate(old.physical_to_logical[layer, start:start + n].tolist()):
            local_of.setdefault(e, s)
        dst = torch.tensor([c.slot - start for c in copies], device=w13.device)
        if all(c.logical in local_of for c in copies):
            src = torch.tensor([local_of[c.logical] for c in copies], device=w13.device)
            new13, new2 = w13.index_select(0, src), w2.index_select(0, src)
        else:
            if self.store is None:
                missing = next(c.logical for c in copies if c.logical not in local_of)
                raise RuntimeError(f"MoE layer {layer}: expert {missing} has no slot on this rank and there is no "
                                   "expert store to copy it from")
            rows = [self._source(layer, c.logical, local_of, w13, w2) for c in copies]
            new13 = torch.stack([r[0].to(w13.device, w13.dtype) for r in rows])
            new2 = torch.stack([r[1].to(w2.device, w2.dtype) for r in rows])
        w13.index_copy_(0, dst, new13)
        w2.index_copy_(0, dst, new2)

    def _source(self, layer: int, logical: int, local_of: dict, w13: torch.Tensor, w2: torch.Tensor):
        s = local_of.get(logical)
        if s is not None:
            return w13[s].clone(), w2[s].clone()
        return self.store(layer, logical)
