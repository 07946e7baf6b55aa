"""Segmented LoRA matmuls (punica / S-LoRA "SGMV"): a batch mixes adapters and the base model.

The flat token batch is cut into segments (one per request, rows contiguous); segment ``s``
covers rows ``[seg_starts[s], seg_starts[s] + seg_lens[s])`` and uses adapter slot
``seg_slots[s]`` (-1: the base model, nothing added). Every slot's weights sit in one static
buffer per projection (``A [slots, R, K]``, ``B [slots, N, R]``), so a CUDA graph captured
over these buffers and the segment vectors replays for any mix of adapters.

* ``shrink``: ``xa[rows] = x[rows] @ A[slot]^T`` ([T, K] -> [T, R]) as split-K partial sums
  ``[P, T, R]`` (float32); rows of base segments are left unwritten (``expand`` skips them too).
* ``expand``: ``y[rows] += xa[rows] @ B[slot]^T`` ([T, R] -> adds into [T, N]) in place, adding
  shrink's partials in a fixed order first.

``R`` is ``parts * max_rank`` (a merged projection stacks its parts' ranks; its ``B`` is block
diagonal) and an adapter of lower rank is zero-padded, so mixed ranks share one launch. Each
function has a torch reference (``*_ref``) that the interpreter tests compare against.

* ``expand_stacked``: the stacked form (``weights.LoraDelta.stack``), where the base GEMM already
  computed every slot's ``x @ A^T`` as extra output columns: one launch adds each row's
  ``xa @ B[slot]^T`` to the base columns and writes them out contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from tandem.engine.kernels.paged import dot


@triton.jit
def _shrink_kernel(X, W, Out, SegStart, SegLen, SegSlot, K, R, stride_x, stride_ws, stride_wr, stride_op, stride_o,
                   SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    # Split-K: program (m, r, seg * SPLITS + p) sums K in [p * K_PER_SPLIT, (p + 1) * K_PER_SPLIT) into
    # the partial Out[p]; expand adds the partials in order. One program over all of K (4096-14336
    # for 8B shapes) read its segment's A alone at decode, tens of microseconds a launch.
    pid_m, pid_r, pid_sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seg, part = pid_sp // SPLITS, pid_sp % SPLITS
    slot = tl.load(SegSlot + seg)
    length = tl.load(SegLen + seg)
    if slot < 0 or pid_m * BLOCK_M >= length:
        return
    start = tl.load(SegStart + seg)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok, r_ok = rm < length, rr < R
    rows = (start + rm).to(tl.int64)
    w_base = W + slot.to(tl.int64) * stride_ws
    k_lo = part * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        kk = k_lo + k0 + rk
        k_ok = kk < K
        x = tl.load(X + rows[:, None] * stride_x + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + rr[None, :] * stride_wr + kk[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc += dot(x, w, IEEE)
    tl.store(Out + part * stride_op + rows[:, None] * stride_o + rr[None, :], acc.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(XA, W, Y, SegStart, SegLen, SegSlot, N, R, stride_xp, stride_xa, stride_ws, stride_wn, stride_y,
                   PARTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   IEEE: tl.constexpr):
    pid_m, pid_n, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(SegSlot + seg)
    length = tl.load(SegLen + seg)
    if slot < 0 or pid_m * BLOCK_M >= length:
        return
    start = tl.load(SegStart + seg)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok, n_ok = rm < length, rn < N
    rows = (start + rm).to(tl.int64)
    w_base = W + slot.to(tl.int64) * stride_ws
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        xa_mask = m_ok[:, None] & r_ok[None, :]
        xa_ptrs = XA + rows[:, None] * stride_xa + (r0 + rr)[None, :]
        xa = tl.load(xa_ptrs, mask=xa_mask, other=0.0).to(tl.float32)
        for p in range(1, PARTS):  # shrink's split-K partials, added in a fixed order
            xa += tl.load(xa_ptrs + p * stride_xp, mask=xa_mask, other=0.0).to(tl.float32)
        xa = xa.to(W.dtype.element_ty)  # the intermediate in the weights' dtype, as the reference rounds it
        w = tl.load(w_base + rn[None, :] * stride_wn + (r0 + rr)[:, None], mask=n_ok[None, :] & r_ok[:, None],
                    other=0.0)
        acc += dot(xa, w, IEEE)
    mask = m_ok[:, None] & n_ok[None, :]
    y_ptrs = Y + rows[:, None] * stride_y + rn[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _expand_stacked_kernel(YS, W, Out, RowSlot, T, N, R, stride_ys, stride_ws, stride_wn, stride_o,
                           NUM_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    # Out[t, :N] = YS[t, :N] + YS[t, N + slot*R : N + (slot+1)*R] @ W[slot]^T, slot = RowSlot[t] (-1: a
    # copy). A row tile mixes slots: each slot present in the tile is one dot over its rows (the
    # others' xa masked to 0), in slot order; slots absent from the tile read nothing.
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok, n_ok = rm < T, rn < N
    rows = rm.to(tl.int64)
    slots = tl.load(RowSlot + rm, mask=m_ok, other=-1)
    mask = m_ok[:, None] & n_ok[None, :]
    acc = tl.load(YS + rows[:, None] * stride_ys + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    for slot in range(NUM_SLOTS):
        hit = slots == slot
        if tl.sum(hit.to(tl.int32), axis=0) > 0:
            for r0 in range(0, R, BLOCK_R):
                r_ok = (r0 + rr) < R
                xa = tl.load(YS + rows[:, None] * stride_ys + N + slot * R + (r0 + rr)[None, :],
                             mask=hit[:, None] & r_ok[None, :], other=0.0)
                w = tl.load(W + slot * stride_ws + rn[None, :] * stride_wn + (r0 + rr)[:, None],
                            mask=n_ok[None, :] & r_ok[:, None], other=0.0)
                acc += dot(xa.to(W.dtype.element_ty), w, IEEE)
    tl.store(Out + rows[:, None] * stride_o + rn[None, :], acc.to(Out.dtype.element_ty), mask=mask)


# --enable-deterministic-inference: every launch uses this row tile, whatever the batch's longest
# segment (a row's reductions run over K / R in fixed blocks either way; the fixed tile leaves the
# compiled dot nothing to vary with the batch). 16 is the decode tile, so decode steps and CUDA
# graphs run as without the flag.
INVARIANT_BLOCK_M = 16


def _block_m(max_len: int) -> int:
    return 16 if max_len <= 16 else 32 if max_len <= 32 else 64


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


# Split-K of shrink: K is cut in chunks of ``k_per_split``. Few segments (decode at a small batch)
# need many chunks to fill the GPU; many segments already do, and their partials cost more than the
# parallelism gains. Measured on one H100 (8B shape, rank 16, 2026-12-07; batch 1 / batch 64 of 4
# adapters, tok/s vs the base model): 128: 0.775x / 0.497x; 256: 0.831x / 0.627x; 512: 0.787x /
# 0.678x; 1024: 0.793x / 0.717x. --enable-deterministic-inference uses K_PER_SPLIT whatever the batch
# (a row's sums then run in the same order in every batch).
K_PER_SPLIT = 512


def k_per_split(num_segments: int) -> int:
    """The chunk of K a shrink program sums, by the launch's segment count (see above)."""
    return 256 if num_segments <= 8 else 512 if num_segments <= 32 else 1024


def num_splits(K: int, k_chunk: int = K_PER_SPLIT) -> int:
    return triton.cdiv(K, k_chunk)


def shrink(x: torch.Tensor, a: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor,
           seg_slots: torch.Tensor, max_len: int, out: torch.Tensor | None = None,
           block_m: int | None = None, k_chunk: int | None = None) -> torch.Tensor:
    """``x [T, K]``, ``a [slots, R, K]`` -> ``[P, T, R]`` float32: the split-K partial sums of ``x @ A^T``
    (``P = num_splits(K, k_chunk)``; their sum is the product; rows of base segments undefined).
    :func:`expand` takes them as they are. ``block_m``: the row tile (default: by ``max_len``;
    ``INVARIANT_BLOCK_M`` in deterministic mode); ``k_chunk``: K per program (default: by the
    segment count, :func:`k_per_split`; ``K_PER_SPLIT`` in deterministic mode)."""
    T, K = x.shape
    R = a.shape[1]
    if x.stride(1) != 1 or a.stride(2) != 1:
        raise ValueError("lora shrink: x and A need a unit last stride")
    S = seg_slots.shape[0]
    k_chunk = k_chunk or k_per_split(S)
    P = num_splits(K, k_chunk)
    if out is None:
        out = torch.empty((P, T, R), dtype=torch.float32, device=x.device)
    if T == 0 or S == 0:
        return out
    bm, br = block_m or _block_m(max_len), _block(R)
    grid = (triton.cdiv(max_len, bm), triton.cdiv(R, br), S * P)
    _shrink_kernel[grid](x, a, out, seg_starts, seg_lens, seg_slots, K, R, x.stride(0), a.stride(0), a.stride(1),
                         out.stride(0), out.stride(1), SPLITS=P, K_PER_SPLIT=k_chunk, BLOCK_M=bm, BLOCK_R=br,
                         BLOCK_K=64, IEEE=x.dtype == torch.float32, num_warps=4)
    return out


def expand(xa: torch.Tensor, b: torch.Tensor, y: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor,
           seg_slots: torch.Tensor, max_len: int, block_m: int | None = None) -> torch.Tensor:
    """``y [T, N] += xa [T, R] @ b[slot]^T`` per segment (``b [slots, N, R]``), in place; returns ``y``.
    ``xa`` may be shrink's partials ``[P, T, R]``: added in order, then rounded to B's dtype.
    ``block_m``: as for :func:`shrink`."""
    N, R = b.shape[1], b.shape[2]
    parts = xa.unsqueeze(0) if xa.dim() == 2 else xa
    if y.stride(1) != 1 or b.stride(2) != 1 or parts.stride(2) != 1:
        raise ValueError("lora expand: y, xa and B need a unit last stride")
    S = seg_slots.shape[0]
    if y.shape[0] == 0 or S == 0:
        return y
    bm, bn, br = block_m or _block_m(max_len), 64, _block(R, hi=32)
    grid = (triton.cdiv(max_len, bm), triton.cdiv(N, bn), S)
    _expand_kernel[grid](parts, b, y, seg_starts, seg_lens, seg_slots, N, R, parts.stride(0), parts.stride(1),
                         b.stride(0), b.stride(1), y.stride(0), PARTS=parts.shape[0], BLOCK_M=bm, BLOCK_N=bn,
                         BLOCK_R=br, IEEE=b.dtype == torch.float32, num_warps=4)
    return y


# The stacked expand's column tile and warps (benchmarks/lora_expand_bench.py times the candidates).
STACKED_BLOCK_N = 64
STACKED_WARPS = 4


def expand_stacked(ys: torch.Tensor, n: int, b: torch.Tensor, row_slots: torch.Tensor,
                   block_m: int | None = None, block_n: int = STACKED_BLOCK_N,
                   num_warps: int = STACKED_WARPS) -> torch.Tensor:
    """The stacked form (the base GEMM computed ``x @ A^T`` of every slot as extra output columns):
    ``ys [T, N + slots * R]`` -> a new ``[T, N]``: ``ys[:, :N] + ys[t, N + s*R : N + (s+1)*R] @ b[s]^T`` for
    each row ``t`` of slot ``s = row_slots[t]`` (``b [slots, N, R]``; rows of slot -1 copied).
    ``block_m``: the row tile (default: by T; ``INVARIANT_BLOCK_M`` in deterministic mode); ``block_n``,
    ``num_warps``: the column tile and warps of a program (a row's sums do not depend on them)."""
    T = ys.shape[0]
    S, N, R = b.shape
    if N != n or ys.shape[1] != n + S * R:
        raise ValueError(f"lora expand_stacked: ys {tuple(ys.shape)} is not [T, {n} + {S} * {R}]")
    if ys.stride(1) != 1 or b.stride(2) != 1:
        raise ValueError("lora expand_stacked: ys and B need a unit last stride")
    out = torch.empty((T, n), dtype=ys.dtype, device=ys.device)
    if T == 0:
        return out
    bm, br = block_m or _block_m(T), _block(R)
    grid = (triton.cdiv(T, bm), triton.cdiv(n, block_n))
    _expand_stacked_kernel[grid](ys, b, out, row_slots, T, n, R, ys.stride(0), b.stride(0), b.stride(1), out.stride(0),
                                 NUM_SLOTS=S, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_R=br, IEEE=b.dtype == torch.float32,
                                 num_warps=num_warps)
    return out


def expand_stacked_ref(ys: torch.Tensor, n: int, b: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
    R = b.shape[2]
    out = ys[:, :n].clone()
    for t, s in enumerate(row_slots.tolist()):
        if s >= 0:
            xa = ys[t, n + s * R: n + (s + 1) * R]
            out[t] = (ys[t, :n].float() + xa.float() @ b[s].float().T).to(ys.dtype)
    return out


def _segments(seg_starts, seg_lens, seg_slots):
    for s, n, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist()):
        if slot >= 0 and n > 0:
            yield s, n, slot


def shrink_ref(x, a, seg_starts, seg_lens, seg_slots) -> torch.Tensor:
    out = torch.zeros((x.shape[0], a.shape[1]), dtype=x.dtype, device=x.device)
    for s, n, slot in _segments(seg_starts, seg_lens, seg_slots):
        out[s:s + n] = (x[s:s + n].float() @ a[slot].float().T).to(x.dtype)
    return out


def expand_ref(xa, b, y, seg_starts, seg_lens, seg_slots) -> torch.Tensor:
    for s, n, slot in _segments(seg_starts, seg_lens, seg_slots):
        y[s:s + n] = (y[s:s + n].float() + xa[s:s + n].float() @ b[slot].float().T).to(y.dtype)
    return y
