"""Gumbel-max sampling in one pass over the vocabulary.

``gumbel_argmax(scores, seeds, positions)`` returns, per row, the first index of the
maximum of ``scores + gumbel(seed, position, j)``, with the Philox noise of
``tandem.engine.philox`` generated in registers (never materialised). ``scores`` are
the temperature-scaled logits with masked entries at -inf. One program per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
INT32_MAX = 2**31 - 1


@triton.jit
def _gumbel_argmax_kernel(Scores, Seeds, Positions, Out, stride_s, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    seed = tl.load(Seeds + row).to(tl.int64)
    pos = tl.load(Positions + row).to(tl.int64)
    c1 = tl.full([BLOCK], 0, tl.uint32) + (pos & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.full([BLOCK], 0, tl.uint32) + ((pos >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.full([BLOCK], 0, tl.uint32)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 2147483647, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        s = tl.load(Scores + row * stride_s + offs, mask=mask, other=float("-inf")).to(tl.float32)
        r0, r1, r2, r3 = tl.philox_impl((offs // 4).to(tl.uint32), c1, c2, c3, k0, k1)
        lane = offs % 4
        bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
        u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2 ** -23
        g = s - tl.log(-tl.log(u))
        g = tl.where(mask, g, float("-inf"))
        better = g > best
        best = tl.where(better, g, best)
        best_idx = tl.where(better, offs, best_idx)
    top = tl.max(best, 0)
    idx = tl.min(tl.where(best == top, best_idx, 2147483647), 0)
    tl.store(Out + row, idx.to(tl.int64))


def gumbel_argmax(scores: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """scores [B, V] float32; seeds, positions [B] int64. Returns token ids [B] int64."""
    B, V = scores.shape
    out = torch.empty(B, dtype=torch.int64, device=scores.device)
    _gumbel_argmax_kernel[(B,)](scores, seeds, positions, out, scores.stride(0), V, BLOCK=BLOCK, num_warps=4)
    return out


def gumbel_argmax_ref(scores, seeds, positions) -> torch.Tensor:
    from tandem.engine.philox import gumbel_noise

    return (scores + gumbel_noise(seeds, positions, scores.shape[1])).argmax(dim=-1)
