"""Expert-distribution recorder: which experts the router picks, per MoE layer.

The engine calls, around every forward pass::

    recorder.on_forward_start()
    recorder.record(layer_idx, topk_logical_ids, topk_physical_ids)  # each MoE layer
    recorder.on_forward_end()

``record`` is a no-op unless recording was started (``start()``), so the hooks can stay
in the model permanently. Counting stays on the ids' device (no host sync per layer);
tensors move to the host only at the end of a pass (``per_token``/``per_pass``) or at
dump time (``stat``/``stat_approx``).

Modes (``--expert-distribution-recorder-mode``):

* ``per_token``: every token's top-k logical ids, with its position, per layer and pass.
* ``per_pass``: logical counts ``[layers, experts]`` of each forward pass.
* ``stat``: sliding window (circular buffer, ``buffer_size`` passes) of per-pass
  logical counts ``[buffer, layers, experts]``.
* ``stat_approx``: the same window, counted from the dispatched *physical* ids
  (``[layers, physical]`` bincount) and folded to logical experts with the placement
  once per pass. Cheaper where the dispatcher already has per-slot counts.

Dump format (``dump(path, fmt)``; ``fmt`` "json" or "pt", same keys; ``.pt`` holds
tensors where JSON holds nested lists)::

    {
      "mode": "stat",                      # the recorder mode
      "num_layers": L, "num_logical_experts": E, "num_physical_experts": P or null,
      "num_forward_passes": N,              # passes recorded since start/reset
      "logical_count": [[...] * E] * L,     # all modes: total load in the window/records;
                                            # loadable by --init-expert-location
      # stat / stat_approx:
      "buffer_size": B,
      "logical_count_per_pass": [n][L][E],  # oldest first, n = min(N, B)
      # stat_approx only:
      "physical_count": [L][P],             # window total per physical slot
      # per_pass:
      "records": [{"forward_pass_id": i, "logical_count": [L][E]}, ...],
      # per_token:
      "records": [{"forward_pass_id": i, "layer": l,
                   "positions": [T], "topk_ids": [T][k]}, ...],
    }
"""
from __future__ import annotations

import json
import threading

import torch

__all__ = ["ExpertDistributionRecorder", "RECORDER_MODES"]

RECORDER_MODES = ("per_token", "per_pass", "stat", "stat_approx")


class ExpertDistributionRecorder:
    """Records router choices; see the module docstring for modes and dump format."""

    def __init__(
        self,
        mode: str,
        num_layers: int,
        num_logical_experts: int,
        buffer_size: int = 1000,
        physical_to_logical: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
    ):
        if mode not in RECORDER_MODES:
            raise ValueError(f"expert_distribution_recorder_mode={mode!r}: allowed {', '.join(RECORDER_MODES)}")
        if buffer_size < 1:
            raise ValueError(f"expert_distribution_recorder_buffer_size must be >= 1, got {buffer_size}")
        if mode == "stat_approx" and physical_to_logical is None:
            raise ValueError("stat_approx needs physical_to_logical (the expert placement)")
        self.mode = mode
        self.num_layers = num_layers
        self.num_logical = num_logical_experts
        self.buffer_size = buffer_size
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._recording = False
        self._p2l: torch.Tensor | None = None
        if physical_to_logical is not None:
            self.set_physical_to_logical(physical_to_logical)
        self.reset()

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        """Begin recording (keeps what was recorded before; call reset() to clear)."""
        self._recording = True

    def stop(self) -> None:
        self._recording = False

    @property
    def recording(self) -> bool:
        return self._recording

    def reset(self) -> None:
        with self._lock:
            L, E = self.num_layers, self.num_logical
            self.num_forward_passes = 0
            self._in_pass = False
            self._cur = torch.zeros(L, E, dtype=torch.int64, device=self.device)
            self._cur_phys = (
                torch.zeros(L, self._p2l.size(1), dtype=torch.int64, device=self.device)
                if self._p2l is not None
                else None
            )
            self._cur_tokens: list[dict] = []
            self._records: list[dict] = []
            self._window = torch.zeros(self.buffer_size, L, E, dtype=torch.int64, device=self.device)
            self._window_phys = (
                torch.zeros(self.buffer_size, L, self._p2l.size(1), dtype=torch.int64, device=self.device)
                if self._p2l is not None and self.mode == "stat_approx"
                else None
            )
            self._delta = torch.zeros(L, E, dtype=torch.int64, device=self.device)
            self._delta_passes = 0

    def set_physical_to_logical(self, physical_to_logical: torch.Tensor) -> None:
        """Tell the recorder the current placement (after a rebalance). For stat_approx the
        window is folded with the placement at pass end, so earlier passes keep their
        logical counts; only the physical-count window is cleared when its width changes."""
        p2l = torch.as_tensor(physical_to_logical).long().to(self.device)
        if p2l.dim() != 2 or p2l.size(0) != self.num_layers:
            raise ValueError(f"physical_to_logical must be [{self.num_layers}, physical], got {tuple(p2l.shape)}")
        if p2l.numel() and (p2l.min() < 0 or p2l.max() >= self.num_logical):
            raise ValueError(f"physical_to_logical has expert ids outside [0, {self.num_logical})")
        with self._lock:
            old = self._p2l
            self._p2l = p2l
            if old is not None and old.shape != p2l.shape and hasattr(self, "_window"):
                self._cur_phys = torch.zeros(self.num_layers, p2l.size(1), dtype=torch.int64, device=self.device)
                if self.mode == "stat_approx":
                    self._window_phys = torch.zeros(
                        self.buffer_size, self.num_layers, p2l.size(1), dtype=torch.int64, device=self.device
                    )

    # ------------------------------------------------------------------ engine hooks
    def on_forward_start(self) -> None:
        if not self._recording:
            return
        self._in_pass = True
        self._cur.zero_()
        if self._cur_phys is not None:
            self._cur_phys.zero_()
        self._cur_tokens = []

    def record(
        self,
        layer_idx: int,
        topk_logical_ids: torch.Tensor,
        topk_physical_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Record one MoE layer's routing: ``topk_*_ids`` are ``[tokens, k]``; ``positions``
        (``[tokens]``, per_token mode) defaults to the token index in the pass."""
        if not self._recording or not self._in_pass:
            return
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx {layer_idx} out of range [0, {self.num_layers})")
        if self.mode == "stat_approx" and topk_physical_ids is not None:
            ids = topk_physical_ids.reshape(-1).to(self.device)
            self._cur_phys[layer_idx] += torch.bincount(ids, minlength=self._cur_phys.size(1))
            return
        ids = topk_logical_ids.reshape(-1).to(self.device)
        self._cur[layer_idx] += torch.bincount(ids, minlength=self.num_logical)
        if self.mode == "per_token":
            tokens = topk_logical_ids.size(0)
            pos = torch.arange(tokens) if positions is None else positions.reshape(-1)
            self._cur_tokens.append(
                {"layer": layer_idx, "positions": pos.detach().cpu().long(), "topk_ids": topk_logical_ids.detach().cpu().long()}
            )

    def on_forward_end(self) -> None:
        if not self._recording or not self._in_pass:
            return
        with self._lock:
            self._in_pass = False
            if self.mode == "stat_approx" and self._cur_phys is not None:
                # fold physical counts into logical ones (adds to any logical-id fallback)
                self._cur.scatter_add_(1, self._p2l, self._cur_phys)
            pass_id = self.num_forward_passes
            self.num_forward_passes += 1
            self._delta += self._cur
            self._delta_passes += 1
            if self.mode in ("stat", "stat_approx"):
                slot = pass_id % self.buffer_size
                self._window[slot].copy_(self._cur)
                if self._window_phys is not None:
                    self._window_phys[slot].copy_(self._cur_phys)
            elif self.mode == "per_pass":
                self._records.append({"forward_pass_id": pass_id, "logical_count": self._cur.cpu().clone()})
            else:
                for rec in self._cur_tokens:
                    self._records.append({"forward_pass_id": pass_id, **rec})
                self._cur_tokens = []

    # ------------------------------------------------------------------ reading
    def logical_load(self) -> torch.Tensor:
        """Total logical load ``[layers, experts]`` (int64, host) over the window
        (stat modes) or over all records (per_pass / per_token)."""
        with self._lock:
            if self.mode in ("stat", "stat_approx"):
                return self._window.sum(0).cpu()
            total = torch.zeros(self.num_layers, self.num_logical, dtype=torch.int64)
            for rec in self._records:
                if self.mode == "per_pass":
                    total += rec["logical_count"]
                else:
                    total[rec["layer"]] += torch.bincount(rec["topk_ids"].reshape(-1), minlength=self.num_logical)
            return total

    def take_load_delta(self):
        """``(counts [layers, experts], num_forward_passes)`` since the previous call (for
        the planner's ReportLoad); resets the delta."""
        with self._lock:
            counts, passes = self._delta.cpu().clone(), self._delta_passes
            self._delta.zero_()
            self._delta_passes = 0
        return counts, passes

    def dump_dict(self, tensors: bool = False) -> dict:
        """The dump as a dict (tensors when ``tensors``, else nested lists)."""
        conv = (lambda t: t) if tensors else (lambda t: t.tolist())
        load = self.logical_load()
        with self._lock:
            out = {
                "mode": self.mode,
                "num_layers": self.num_layers,
                "num_logical_experts": self.num_logical,
                "num_physical_experts": None if self._p2l is None else int(self._p2l.size(1)),
                "num_forward_passes": self.num_forward_passes,
                "logical_count": conv(load),
            }
            if self.mode in ("stat", "stat_approx"):
                n = min(self.num_forward_passes, self.buffer_size)
                start = self.num_forward_passes % self.buffer_size if self.num_forward_passes > self.buffer_size else 0
                order = [(start + i) % self.buffer_size for i in range(n)]
                out["buffer_size"] = self.buffer_size
                out["logical_count_per_pass"] = conv(self._window[order].cpu())
                if self._window_phys is not None:
                    out["physical_count"] = conv(self._window_phys.sum(0).cpu())
            else:
                out["records"] = [{k: conv(v) if torch.is_tensor(v) else v for k, v in r.items()} for r in self._records]
        return out

    def dump(self, path: str, fmt: str | None = None) -> str:
        """Write the dump to ``path`` as ``fmt`` ("json" or "pt"; default from the suffix)."""
        fmt = fmt or ("pt" if path.endswith(".pt") else "json")
        if fmt not in ("json", "pt"):
            raise ValueError(f"dump format {fmt!r}: allowed json, pt")
        if fmt == "pt":
            torch.save(self.dump_dict(tensors=True), path)
        else:
            with open(path, "w") as f:
                json.dump(self.dump_dict(), f)
        return path


def load_dump(path: str) -> dict:
    """Read a recorder dump (.json or .pt) written by ``dump``."""
    if path.endswith(".pt"):
        return torch.load(path, map_location="cpu", weights_only=True)
    with open(path) as f:
        return json.load(f)
