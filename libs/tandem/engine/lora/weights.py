"""The adapters' device side: static slot buffers per projection, and the per-pass batch.

``LoraWeights`` is handed to the model at construction, like the linear factory: each LoRA-capable
projection asks it for a :class:`LoraDelta` by the same name the linear gets
(``layers.3.self_attn.qkv_proj``), and adds ``delta(x, y, fb.lora)`` to the base output
(``y = base(x) + B @ A @ x``): the base linear classes (plain, FP8, sharded) are untouched.
Buffers never move or grow (``max_loras_per_batch`` slots of ``max_lora_rank`` per part), so CUDA
graphs captured over them stay valid while adapters are written into slots between steps.
Importing this module does not import triton (``kernels`` loads when a projection first runs on
it): a Triton kernel is defined at import, and the interpreter's switch must be set by then.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import LoraAdapter


@dataclass
class LoraBatch:
    """Which adapter slot each request of a forward pass uses: one segment per request (its
    contiguous rows of the flat token batch); slot -1 is the base model."""

    seg_starts: torch.Tensor  # [S] int32 (device) first row of each segment
    seg_lens: torch.Tensor  # [S] int32 (device) rows of each segment
    seg_slots: torch.Tensor  # [S] int32 (device) adapter slot of each segment, -1 = none
    max_len: int  # the longest segment (host int: sizes the kernels' grid)
    use_triton: bool  # the Triton kernels; else the torch path over ``groups``
    groups: list | None = None  # torch path: [(slot, rows int64 device tensor)] of the slots in use
    row_slots: torch.Tensor | None = None  # [T] (device) each row's slot, -1 = none (the stacked form's input)


def lora_batch(slots: list[int], lens: list[int], device, use_triton: bool) -> LoraBatch | None:
    """The LoraBatch of requests with these slots and new-token counts (None: no adapter in it)."""
    if all(s < 0 for s in slots):
        return None
    starts, at = [], 0
    for n in lens:
        starts.append(at)
        at += n
    S = len(slots)
    row_slots = [s for s, n in zip(slots, lens) for _ in range(n)]
    vec = torch.tensor([*starts, *lens, *slots, *row_slots], dtype=torch.int32).to(device)  # one copy
    groups = None
    if not use_triton:
        by_slot: dict = {}
        for s, st, n in zip(slots, starts, lens):
            if s >= 0:
                by_slot.setdefault(s, []).extend(range(st, st + n))
        groups = [(s, torch.tensor(rows, dtype=torch.long, device=device)) for s, rows in by_slot.items()]
    return LoraBatch(vec[:S], vec[S:2 * S], vec[2 * S:3 * S], max(lens), use_triton, groups, vec[3 * S:])


class LoraDelta:
    """The LoRA term of one projection over every slot: ``A [slots, parts * max_rank, in]`` and
    ``B [slots, out, parts * max_rank]`` (block diagonal: part p's output rows read only part p's
    rank columns; the scaling is folded into B).

    Two forms. *Stacked* (:meth:`stack`, for a plain or batch-invariant base linear of the
    adapters' dtype): A's rows are appended to the base weight, so the base GEMM also computes
    ``x @ A^T`` of every slot as extra output columns (~1% more bytes) and one kernel per projection
    adds each row's ``xa @ B[slot]^T`` (``kernels.expand_stacked``): one launch where SGMV takes two,
    which is most of LoRA's cost at decode. *Beside* (an FP8 base, whose weight cannot take bf16
    rows): the SGMV shrink + expand add to the base output (:meth:`__call__`)."""

    def __init__(self, name: str, in_features: int, parts: tuple, num_slots: int, max_rank: int, dtype, device,
                 block_m: int | None = None, k_chunk: int | None = None, linear: nn.Module | None = None):
        self.name, self.parts, self.max_rank, self.block_m = name, tuple(parts), max_rank, block_m
        self.k_chunk = k_chunk  # shrink's K per program (None: by the launch's segment count)
        self.linear = linear  # the base projection (stacked into by :meth:`stack`)
        R = len(parts) * max_rank
        self.a = torch.zeros((num_slots, R, in_features), dtype=dtype, device=device)
        self.b = torch.zeros((num_slots, sum(parts), R), dtype=dtype, device=device)
        self.stacked: torch.Tensor | None = None  # [out + slots * R, in]: the base weight, then every slot's A
        self.stacked_bias: torch.Tensor | None = None
        self._matmul = None

    def stack(self) -> bool:
        """Move A into extra rows of the base linear's weight (after the weights are loaded; the linear
        keeps a view of its own rows). False, leaving the beside form, when the base cannot take them."""
        lin = self.linear
        if not isinstance(lin, nn.Linear) or lin.weight.dtype != self.a.dtype or lin.weight.device != self.a.device:
            return False
        from tandem.engine.batch_invariant import InvariantLinear

        S, R, K = self.a.shape
        N = lin.weight.shape[0]
        big = torch.empty((N + S * R, K), dtype=self.a.dtype, device=self.a.device)
        big[:N].copy_(lin.weight.detach())
        big[N:].copy_(self.a.reshape(S * R, K))
        lin.weight = nn.Parameter(big[:N], requires_grad=False)
        if lin.bias is not None:
            bias = torch.zeros(N + S * R, dtype=lin.bias.dtype, device=lin.bias.device)
            bias[:N].copy_(lin.bias.detach())
            lin.bias = nn.Parameter(bias[:N], requires_grad=False)
            self.stacked_bias = bias
        self.stacked, self.a = big, big[N:].view(S, R, K)
        if isinstance(lin, InvariantLinear):
            from tandem.engine.kernels.invariant_gemm import matmul

            self._matmul = matmul
        else:
            self._matmul = F.linear
        return True

    def _check_torch_path(self) -> None:
        if self.block_m is not None:
            raise RuntimeError(f"{self.name}: deterministic LoRA runs the Triton kernels only (the torch path's "
                               "matmuls depend on the batch)")

    def write(self, slot: int, parts: dict | None) -> None:
        """Slot ``slot`` holds ``parts`` {part: (A [r, in], B [out_p, r])} (None: zeros)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for p, (a, b) in (parts or {}).items():
            if b.shape[0] != self.parts[p] or a.shape[1] != self.a.shape[2]:
                raise ValueError(f"{self.name} part {p}: adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not "
                                 f"fit the model's [{self.parts[p]}, {self.a.shape[2]}] projection")
            r, r0, o0 = a.shape[0], p * self.max_rank, sum(self.parts[:p])
            self.a[slot, r0:r0 + r].copy_(a)
            self.b[slot, o0:o0 + b.shape[0], r0:r0 + r].copy_(b)

    def project(self, x: torch.Tensor, batch: LoraBatch | None) -> torch.Tensor:
        """The projection with each row's adapter: ``linear(x) + x @ A[slot]^T @ B[slot]^T`` (rows of base
        requests: ``linear(x)``)."""
        if batch is None:
            return self.linear(x)
        if self.stacked is None:
            return self(x, self.linear(x), batch)
        if not batch.use_triton:
            self._check_torch_path()
        ys = self._matmul(x, self.stacked, self.stacked_bias)
        n = self.b.shape[1]
        if batch.use_triton:
            from . import kernels

            return kernels.expand_stacked(ys, n, self.b, batch.row_slots, block_m=self.block_m)
        R = self.b.shape[2]
        y = ys[:, :n].contiguous()
        for slot, rows in batch.groups:
            xa = ys[:, n + slot * R: n + (slot + 1) * R].index_select(0, rows)
            y.index_add_(0, rows, xa @ self.b[slot].T)
        return y

    def __call__(self, x: torch.Tensor, y: torch.Tensor, batch: LoraBatch | None) -> torch.Tensor:
        """The beside form: ``y + x @ A[slot]^T @ B[slot]^T`` per row (rows of base requests unchanged), in
        place (SGMV shrink + expand)."""
        if batch is None:
            return y
        if batch.use_triton:
            from . import kernels

            xa = kernels.shrink(x, self.a, batch.seg_starts, batch.seg_lens, batch.seg_slots, batch.max_len,
                                block_m=self.block_m, k_chunk=self.k_chunk)
            return kernels.expand(xa, self.b, y, batch.seg_starts, batch.seg_lens, batch.seg_slots, batch.max_len,
                                  block_m=self.block_m)
        self._check_torch_path()
        for slot, rows in batch.groups:
            xs = x.index_select(0, rows)
            y.index_add_(0, rows, (xs @ self.a[slot].T) @ self.b[slot].T)
        return y


class LoraWeights:
    """Every projection's :class:`LoraDelta`, created as the model asks for them (``__call__``
    has the model's factory signature: ``(name, in_features, out parts) -> LoraDelta``)."""

    def __init__(self, num_slots: int, max_rank: int, dtype, device, deterministic: bool = False):
        """``deterministic`` (--enable-deterministic-inference): every projection's kernels run one
        fixed row tile (``kernels.INVARIANT_BLOCK_M``) and one split of K (``kernels.K_PER_SPLIT``), so a
        row's delta does not depend on its batch."""
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        if deterministic:
            from . import kernels

            self.block_m, self.k_chunk = kernels.INVARIANT_BLOCK_M, kernels.K_PER_SPLIT
        else:
            self.block_m, self.k_chunk = None, None
        self.deltas: dict[str, LoraDelta] = {}

    def __call__(self, name: str, in_features: int, parts: tuple, linear: nn.Module | None = None) -> LoraDelta:
        if name in self.deltas:
            raise ValueError(f"LoRA projection {name!r} requested twice")
        # An explicit device: the model is built under torch.device("meta"), these buffers are real.
        d = LoraDelta(name, in_features, parts, self.num_slots, self.max_rank, self.dtype, torch.device(self.device),
                      self.block_m, self.k_chunk, linear)
        self.deltas[name] = d
        return d

    def stack(self) -> int:
        """Once the model's weights are loaded: every projection whose base linear can take A's rows
        switches to the stacked form (:class:`LoraDelta`); returns how many did."""
        return sum(d.stack() for d in self.deltas.values())

    def check(self, adapter: LoraAdapter) -> None:
        """Raise if the adapter targets a projection the model has no LoRA for (a MoE layer's MLP)."""
        for layer, proj in adapter.weights:
            if f"layers.{layer}.{proj}" not in self.deltas:
                raise ValueError(f"adapter {adapter.name!r}: layer {layer} {proj} cannot take LoRA in this model "
                                 "(MoE experts are not supported)")

    def write(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Fill ``slot`` with ``adapter``'s weights (None: clear it); between forward passes only."""
        if adapter is not None:
            self.check(adapter)
        for name, delta in self.deltas.items():
            layer, proj = name.split(".", 2)[1:]
            delta.write(slot, None if adapter is None else adapter.weights.get((int(layer), proj)))
