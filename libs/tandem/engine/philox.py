"""Counter-based random numbers (Philox4x32-10) for sampling, in plain torch.

A request's noise for vocabulary entry ``j`` at sequence position ``pos`` depends only
on (seed, pos, j): no generator state, so a seeded request draws the same numbers
whatever batch it runs in, in a CUDA graph or not, and on the prefill worker of a
disaggregated pair as on an aggregated one. The Triton sampling kernel
(``kernels/sampling.py``) computes the same function with ``tl.philox``.

Counter words: c0 = j // 4, c1 = pos (low 32 bits), c2 = pos (high 32 bits), c3 = 0;
key = the seed's two 32-bit halves; entry j takes output word j % 4.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # 32x32 -> 64-bit product from 16-bit halves, so no int64 intermediate overflows.
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_lo = a_lo * b_lo
    mid1 = a_hi * b_lo
    mid2 = a_lo * b_hi
    carry = ((lo_lo >> 16) + (mid1 & 0xFFFF) + (mid2 & 0xFFFF)) >> 16
    hi = (a_hi * b_hi + (mid1 >> 16) + (mid2 >> 16) + carry) & MASK32
    lo = (a * b) & MASK32  # low word: wraparound in int64 keeps the low 32 bits exact
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcasting)."""
    for _ in range(ROUNDS):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 strictly inside (0, 1): 23 random bits, centred."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def philox_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, vocab_size] float32 uniforms for rows (seed, position)."""
    dev = seeds.device
    seeds = seeds.to(torch.int64)
    positions = positions.to(torch.int64)
    groups = torch.arange((vocab_size + 3) // 4, device=dev, dtype=torch.int64)[None, :]
    k0 = (seeds & MASK32)[:, None]
    k1 = ((seeds >> 32) & MASK32)[:, None]
    c1 = (positions & MASK32)[:, None]
    c2 = ((positions >> 32) & MASK32)[:, None]
    zero = torch.zeros_like(groups)
    words = philox4x32(groups, c1.expand(-1, groups.shape[1]), c2.expand(-1, groups.shape[1]),
                       zero.expand(seeds.shape[0], -1), k0, k1)
    bits = torch.stack(words, dim=-1).reshape(seeds.shape[0], -1)[:, :vocab_size]
    return uniform_from_bits(bits)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """-log(-log(U)): argmax(logits / T + noise) draws a token from softmax(logits / T)."""
    return -torch.log(-torch.log(philox_uniform(seeds, positions, vocab_size)))
