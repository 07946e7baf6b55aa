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


# --enable-deterministic-inference: every launch uses this row tile, whatever the batch's longest
# segment (a row's reductions run over K / R in fixed blocks either way; the fixed tile leaves the
# compiled dot nothing to vary with the batch). 16 is the decode tile, so decode steps and CUDA
# graphs run as without the flag.
INVARIANT_BLOCK_M = 16


def _block_m(max_len: int) -> int:
    return 16 if max_len <= 16 else 32 if max_len <= 32 else 64


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


# Split-K of shrink: K is cut in chunks of K_PER_SPLIT (fixed by K alone, so a row's sums run in the
# same order whatever its batch: --enable-deterministic-inference keeps holding).
K_PER_SPLIT = 512


def num_splits(K: int) -> int:
    return triton.cdiv(K, K_PER_SPLIT)


def shrink(x: torch.Tensor, a: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor,
           seg_slots: torch.Tensor, max_len: int, out: torch.Tensor | None = None,
           block_m: int | None = None) -> torch.Tensor:
    """``x [T, K]``, ``a [slots, R, K]`` -> ``[P, T, R]`` float32: the split-K partial sums of ``x @ A^T``
    (``P = num_splits(K)``; their sum is the product; rows of base segments undefined). :func:`expand`
    takes them as they are. ``block_m``: the row tile (default: by ``max_len``; ``INVARIANT_BLOCK_M``
    in deterministic mode)."""
    T, K = x.shape
    R = a.shape[1]
    if x.stride(1) != 1 or a.stride(2) != 1:
        raise ValueError("lora shrink: x and A need a unit last stride")
    P = num_splits(K)
    if out is None:
        out = torch.empty((P, T, R), dtype=torch.float32, device=x.device)
    S = seg_slots.shape[0]
    if T == 0 or S == 0:
        return out
    bm, br = block_m or _block_m(max_len), _block(R)
    grid = (triton.cdiv(max_len, bm), triton.cdiv(R, br), S * P)
    _shrink_kernel[grid](x, a, out, seg_starts, seg_lens, seg_slots, K, R, x.stride(0), a.stride(0), a.stride(1),
                         out.stride(0), out.stride(1), SPLITS=P, K_PER_SPLIT=K_PER_SPLIT, BLOCK_M=bm, BLOCK_R=br,
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
