"""Wire EPLB (placement, dispatch, recorder, plan application) into the engine's MoE layers.

The engine's ``MoE`` module (``tandem.engine.model.MoE``) keeps its expert weights in
stacked tensors indexed by *physical slot* (``w13 [slots, 2*inter, hidden]``,
``w2 [slots, hidden, inter]``), a ``physical_to_logical`` buffer, and a
``dispatch(layer_idx, logical_ids) -> physical_ids`` hook. This module drives those:

    hook = EplbEngineHook(model, location, dispatch_algorithm="static",
                          recorder=recorder, ep_rank=None, seed=0)
    hook.install()                 # once, after loading weights: lays out the slots
    # engine loop, per forward pass:
    hook.on_forward_start(); logits = model(...); hook.on_forward_end()
    # planner thread (WatchPlans): hook.submit(plan_location)
    # engine loop, between forward passes:
    hook.apply_pending()           # copies expert weights into the new slots

What the engine must provide (and does as of its first MoE commit): every MoE module
has ``layer_idx``, ``w13``, ``w2``, ``physical_to_logical`` and a ``dispatch`` attribute
called with the decoder layer index and the ``[tokens, k]`` logical top-k ids. MoE
layers are numbered 0.. in model order for placements and the recorder.

Plans are applied out of place (``w[src]`` gather into a new tensor, then swapped in),
so a slot can be both overwritten and a copy source; a plan of the wrong shape raises
``ValueError`` in ``submit`` and the old placement stays. Dispatch only ever picks a
slot holding the same logical expert's weights, so outputs do not depend on the
placement (up to the float summation order of a token's k expert outputs).
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from .placement import ExpertLocation, diff
from .recorder import ExpertDistributionRecorder

__all__ = ["EplbEngineHook", "find_moe_layers"]


def find_moe_layers(model: nn.Module) -> list[nn.Module]:
    """MoE modules in model order (those with stacked expert weights and a dispatch hook)."""
    return [
        m for m in model.modules()
        if all(hasattr(m, a) for a in ("w13", "w2", "physical_to_logical", "dispatch", "layer_idx"))
    ]


class EplbEngineHook:
    def __init__(
        self,
        model: nn.Module,
        location: ExpertLocation,
        dispatch_algorithm: str = "static",
        recorder: ExpertDistributionRecorder | None = None,
        ep_rank: int | None = None,
        seed: int = 0,
    ):
        self.layers = find_moe_layers(model)
        if not self.layers:
            raise ValueError("model has no MoE layers to place experts for")
        if location.num_layers != len(self.layers):
            raise ValueError(f"placement has {location.num_layers} layers, the model has {len(self.layers)} MoE layers")
        self.moe_index = {m.layer_idx: i for i, m in enumerate(self.layers)}
        self.location = location
        self.dispatch_algorithm = dispatch_algorithm
        self.recorder = recorder
        self.ep_rank = ep_rank
        self.generator = torch.Generator().manual_seed(seed)
        self._pending: tuple[ExpertLocation, int | None] | None = None  # placement, plan version
        self._lock = threading.Lock()
        self.version = 0
        self.moves_applied = 0

    # ------------------------------------------------------------------ setup
    def install(self) -> None:
        """Lay the checkpoint's experts (one slot per logical expert, identity) out into
        ``location``'s slots and set the dispatch hook on every MoE layer."""
        for i, m in enumerate(self.layers):
            current = m.physical_to_logical.long().cpu()
            if current.numel() != self.location.num_logical or not torch.equal(
                current, torch.arange(self.location.num_logical)
            ):
                raise ValueError(f"MoE layer {m.layer_idx}: install() expects the checkpoint layout (identity)")
            # slot s takes the weights of logical expert p2l[s], which sits in slot p2l[s] now
            self._relayout(m, self.location.physical_to_logical[i])
            self._set_buffer(m, self.location.physical_to_logical[i])
            m.dispatch = self._dispatch
        if self.recorder is not None:
            self.recorder.set_physical_to_logical(self.location.physical_to_logical)

    @staticmethod
    def _relayout(m: nn.Module, src: torch.Tensor) -> None:
        with torch.no_grad():
            idx = src.to(m.w13.device)
            m.w13.data = m.w13.data.index_select(0, idx)
            m.w2.data = m.w2.data.index_select(0, idx)

    def _set_buffer(self, m: nn.Module, p2l: torch.Tensor) -> None:
        m.physical_to_logical = p2l.to(m.physical_to_logical.device)

    # ------------------------------------------------------------------ per pass
    def on_forward_start(self) -> None:
        if self.recorder is not None:
            self.recorder.on_forward_start()

    def on_forward_end(self) -> None:
        if self.recorder is not None:
            self.recorder.on_forward_end()

    def _dispatch(self, layer_idx: int, logical_ids: torch.Tensor) -> torch.Tensor:
        i = self.moe_index[layer_idx]
        phys = self.location.dispatch(
            i, logical_ids, self.dispatch_algorithm, rank=self.ep_rank, generator=self.generator
        )
        if self.recorder is not None:
            self.recorder.record(i, logical_ids, phys)
        return phys

    # ------------------------------------------------------------------ plans
    def submit(self, location: ExpertLocation, version: int | None = None) -> None:
        """Queue a new placement (any thread). Raises ValueError for a wrong shape."""
        old = self.location
        if (location.num_layers, location.num_logical, location.num_physical, location.ep_size) != (
            old.num_layers, old.num_logical, old.num_physical, old.ep_size
        ):
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
        """Apply a queued placement (call between forward passes). Returns the copies made."""
        new, version = self.take_pending()
        if new is None:
            return 0
        copies = diff(self.location, new)
        for i, m in enumerate(self.layers):
            src = torch.arange(new.num_physical)
            for c in copies:
                if c.layer == i:
                    src[c.slot] = c.src_slot
            if (src != torch.arange(new.num_physical)).any():
                self._relayout(m, src)
            self._set_buffer(m, new.physical_to_logical[i])
        return self._applied(new, version, len(copies))

    def _applied(self, new: ExpertLocation, version: int | None, num_copies: int) -> int:
        """Bookkeeping once ``new``'s weights are in place (shared with the EP hook)."""
        self.location = new
        if self.recorder is not None:
            self.recorder.set_physical_to_logical(new.physical_to_logical)
        self.version = version if version is not None else self.version + 1
        self.moves_applied += num_copies
        return num_copies
