"""Expert-distribution recorder: which experts the router picks, per MoE layer.

Counting happens on the device, inside the forward pass, into static counters a CUDA graph
increments by address (the triton backend's routing kernel adds to them; the torch path
calls ``record``); nothing reads them back per layer. Between forward passes the host folds
the pass's counters into its window (``end_pass``: device copies, no host sync) and zeroes
them for the next pass::

    row = recorder.counter(layer)        # the layer's device counters (logical, or physical for stat_approx):
                                         # the routing (kernel or its torch twin) adds 1 per routed entry
    recorder.record_tokens(layer, ids, positions, valid)  # per_token mode only: the ids themselves
    recorder.end_pass()                  # once per forward pass, between steps

Counts of a pass are kept only while recording is on (``start()``/``stop()``); a pass that
ran while it was off is dropped at ``end_pass``, so the layers may count unconditionally.
Rows of a CUDA graph's padding (``valid`` False) are never counted.

Modes (``--expert-distribution-recorder-mode``):

* ``per_token``: every token's top-k logical ids, with its position, per layer and pass. It
  copies ids to the host inside the forward pass, which a graph cannot do: decode runs
  eagerly while it records (``graph_safe`` is False).
* ``per_pass``: logical counts ``[layers, experts]`` of each forward pass (copied to the host
  at ``end_pass``).
* ``stat``: sliding window (circular buffer, ``buffer_size`` passes) of per-pass logical
  counts ``[buffer, layers, experts]``, on the device.
* ``stat_approx``: the same window, counted from the dispatched *physical* ids
  (``[layers, physical]``) and folded to logical experts with the placement once per pass.

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
        L, E = num_layers, num_logical_experts
        # The device counters: allocated once, zeroed in place (graphs hold their addresses).
        self._cur = torch.zeros(L, E, dtype=torch.int32, device=self.device)
        self._cur_phys = (torch.zeros(L, self._p2l.size(1), dtype=torch.int32, device=self.device)
                          if mode == "stat_approx" else None)
        self.reset()

    @property
    def counts_physical(self) -> bool:
        """True when ``counter`` rows count physical slots (stat_approx), else logical experts."""
        return self._cur_phys is not None

    @property
    def graph_safe(self) -> bool:
        """Whether recording can run inside a CUDA graph (all modes but per_token)."""
        return self.mode != "per_token"

    def counter(self, layer: int) -> torch.Tensor:
        """The device counters (int32) the routing of MoE layer ``layer`` adds to."""
        return self._cur_phys[layer] if self._cur_phys is not None else self._cur[layer]

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
            self._cur.zero_()
            if self._cur_phys is not None:
                self._cur_phys.zero_()
            self._cur_tokens: list[dict] = []
            self._records: list[dict] = []
            self._window = torch.zeros(self.buffer_size, L, E, dtype=torch.int64, device=self.device)
            self._window_phys = (
                torch.zeros(self.buffer_size, L, self._p2l.size(1), dtype=torch.int64, device=self.device)
                if self._cur_phys is not None else None
            )
            self._delta = torch.zeros(L, E, dtype=torch.int64, device=self.device)
            self._delta_passes = 0

    def set_physical_to_logical(self, physical_to_logical: torch.Tensor) -> None:
        """Tell the recorder the current placement (after a rebalance). For stat_approx the
        window is folded with the placement at pass end, so earlier passes keep their
        logical counts; the number of physical slots is fixed."""
        p2l = torch.as_tensor(physical_to_logical).long().to(self.device)
        if p2l.dim() != 2 or p2l.size(0) != self.num_layers:
            raise ValueError(f"physical_to_logical must be [{self.num_layers}, physical], got {tuple(p2l.shape)}")
        if p2l.numel() and (p2l.min() < 0 or p2l.max() >= self.num_logical):
            raise ValueError(f"physical_to_logical has expert ids outside [0, {self.num_logical})")
        with self._lock:
            if self._p2l is not None and self._p2l.shape != p2l.shape:
                raise ValueError(f"physical_to_logical has {p2l.size(1)} slots per layer, the recorder counts "
                                 f"{self._p2l.size(1)}")
            self._p2l = p2l

    # ------------------------------------------------------------------ engine hooks
    def record_tokens(self, layer_idx: int, topk_logical_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      valid: torch.Tensor | None = None) -> None:
        """per_token mode: keep one layer's ``[tokens, k]`` logical ids (host copies, inside the
        forward pass: not graph-safe) with their positions (default: the token index); rows with
        ``valid`` False are padding and left out. The counts come from ``counter`` as in every mode."""
        if self.mode != "per_token":
            return
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx {layer_idx} out of range [0, {self.num_layers})")
        tokens = topk_logical_ids.size(0)
        pos = torch.arange(tokens) if positions is None else positions.reshape(-1).cpu()
        ids_host = topk_logical_ids.detach().cpu().long()
        if valid is not None:
            keep = valid.reshape(-1).cpu()
            pos, ids_host = pos[keep], ids_host[keep]
        self._cur_tokens.append({"layer": layer_idx, "positions": pos.long(), "topk_ids": ids_host})

    def end_pass(self) -> None:
        """Fold the pass that just ran into the window (between steps: device copies, no host sync
        except per_pass's records) and zero the counters for the next one."""
        with self._lock:
            if self._recording:
                cur = self._cur.long()
                if self._cur_phys is not None:  # fold physical counts into logical ones
                    cur = cur.scatter_add(1, self._p2l, self._cur_phys.long())
                pass_id = self.num_forward_passes
                self.num_forward_passes += 1
                self._delta += cur
                self._delta_passes += 1
                if self.mode in ("stat", "stat_approx"):
                    slot = pass_id % self.buffer_size
                    self._window[slot].copy_(cur)
                    if self._window_phys is not None:
                        self._window_phys[slot].copy_(self._cur_phys)
                elif self.mode == "per_pass":
                    self._records.append({"forward_pass_id": pass_id, "logical_count": cur.cpu()})
                else:
                    for rec in self._cur_tokens:
                        self._records.append({"forward_pass_id": pass_id, **rec})
            self._cur_tokens = []
            self._cur.zero_()
            if self._cur_phys is not None:
                self._cur_phys.zero_()

    def discard_pass(self) -> None:
        """Zero the counters without folding them (runs that were no real pass: graph capture)."""
        with self._lock:
            self._cur_tokens = []
            self._cur.zero_()
            if self._cur_phys is not None:
                self._cur_phys.zero_()

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

    def last_pass_counts(self) -> torch.Tensor | None:
        """Logical counts ``[layers, experts]`` of the newest folded pass (stat modes; a device copy,
        no host sync), None before the first one."""
        with self._lock:
            if self.mode not in ("stat", "stat_approx") or not self.num_forward_passes:
                return None
            return self._window[(self.num_forward_passes - 1) % self.buffer_size].clone()

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
