"""Extend (prefill) attention over a paged KV pool, for ragged and mixed batches.

Request ``b`` brings ``q_lens[b]`` new tokens (flattened at ``q_start[b]`` in ``q``) on top
of a cached prefix; its context is ``seq_lens[b]`` tokens, the new ones last, and every
key and value (prefix and new, already written by the rotary + K/V kernel) is read through
the page table. A query at position ``p`` attends to keys ``0..p``: full over the prefix,
causal over the new tokens. Decode requests are extends of one token, so a mixed batch
(prefill chunks + decodes) is one launch. No padding to the longest request: one program
per (request, query head, block of BLOCK_M new tokens), the blocks with the most keys issued
first; blocks past a request's end do nothing. An FP8 pool is dequantized in registers, as in paged decode attention.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .fp8 import dequantized_pool, fp8_pool_format
from .paged import dot, key_block, kv_scales, softmax_step

BLOCK_M = 64
BLOCK_N = 64


class ExtendConfig(NamedTuple):
    """A launch configuration of the extend kernel. The default is the engine's (and the only one
    --enable-deterministic-inference may use: a row's sums follow the tiles); others are for
    ``benchmarks/extend_attention_bench.py`` to compare."""

    block_m: int = BLOCK_M
    block_n: int = BLOCK_N
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_CONFIG = ExtendConfig()


@triton.jit
def _extend_attention_kernel(
    Q, K, V, Out, PageTable, QStart, QLens, SeqLens, KVScale,
    sm_scale,
    stride_qt, stride_qh,
    stride_k_slot, stride_k_head,
    stride_v_slot, stride_v_head,
    stride_pt, stride_ot, stride_oh,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    KV_FP8: tl.constexpr, ROWS_OF_ONE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    # Heaviest blocks first: a causal block's keys grow with its index, and the grid's last
    # dimension is issued slowest, so the long blocks start first and the short ones fill the tail.
    m_block = tl.num_programs(2) - 1 - tl.program_id(2)
    kv_head = h // GROUP
    if ROWS_OF_ONE:  # a decode batch: request b's one new token is row b (no q_start / q_lens tensors)
        q_len = 1
        q_start = b
    else:
        q_len = tl.load(QLens + b)
        q_start = tl.load(QStart + b)
    seq_len = tl.load(SeqLens + b)
    prefix = seq_len - q_len
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < q_len
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q_pos = prefix + offs_m
    # Keys this block can see: up to its last query's position (nothing for an empty block).
    end = tl.where(m_block * BLOCK_M < q_len, tl.minimum(seq_len, prefix + (m_block + 1) * BLOCK_M), 0)

    qk_scale, v_scale = kv_scales(KVScale, sm_scale, KV_FP8)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, end, BLOCK_N):
        offs_n, mask_n, slot, kv_mask, k = key_block(PageTable, b * stride_pt, K, stride_k_slot,
                                                     kv_head * stride_k_head, n0, end, offs_d, mask_d, PAGE_SIZE,
                                                     BLOCK_N)
        qk = dot(q, tl.trans(k.to(q.dtype)), IEEE)
        visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        # Causal rows may see nothing yet in this block.
        m_i, l_i, acc = softmax_step(qk, m_i, l_i, acc, V, slot, stride_v_slot, kv_head * stride_v_head, offs_d,
                                     kv_mask, True, IEEE, q.dtype)
    out = acc * v_scale / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                     q_start: torch.Tensor, q_lens: torch.Tensor, seq_lens: torch.Tensor, max_q_len: int,
                     scale: float, kv_scale: torch.Tensor | None = None,
                     config: ExtendConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """q [T, H, D] new tokens of all requests (rotated); k_cache/v_cache [num_pages, page_size, kv_heads, D]
    holding every context token; page_table [B, >= pages]; q_start, q_lens, seq_lens [B] (q_start and q_lens
    None: one new token per request, row b of ``q`` being request b's, as in a decode batch). Returns [T, H, D].
    An FP8 pool needs ``kv_scale`` = float32 (k_scale, v_scale) on the device. ``config``: the tiles and
    warps (block sizes powers of two, at least 16)."""
    T, H, D = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    B = seq_lens.shape[0]
    fp8 = fp8_pool_format(k_cache, kv_scale) is not None
    k = k_cache.view(-1, kv_heads, D)
    v = v_cache.view(-1, kv_heads, D)
    out = torch.empty_like(q)
    grid = (B, H, triton.cdiv(max(max_q_len, 1), config.block_m))
    rows_of_one = q_start is None
    _extend_attention_kernel[grid](
        q, k, v, out, page_table, seq_lens if rows_of_one else q_start, seq_lens if rows_of_one else q_lens, seq_lens,
        kv_scale if fp8 else seq_lens, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), page_table.stride(0),
        out.stride(0), out.stride(1),
        PAGE_SIZE=page_size, GROUP=H // kv_heads, HEAD_DIM=D, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_D=triton.next_power_of_2(D), IEEE=q.dtype == torch.float32, KV_FP8=fp8, num_warps=config.num_warps,
        num_stages=config.num_stages, ROWS_OF_ONE=rows_of_one,
    )
    return out


def extend_attention_ref(q, k_cache, v_cache, page_table, q_start, q_lens, seq_lens, scale,
                         kv_scale=None) -> torch.Tensor:
    """Torch reference: each request's context gathered through its page table (dequantized with
    ``kv_scale`` when FP8), causal softmax in float32."""
    T, H, D = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    k, v = dequantized_pool(k_cache, v_cache, kv_scale)
    out = torch.zeros_like(q)
    for b in range(q_lens.shape[0]):
        n, L, s = int(q_lens[b]), int(seq_lens[b]), int(q_start[b])
        if n == 0:
            continue
        t = torch.arange(L, device=page_table.device)
        slots = page_table[b, t // page_size].long() * page_size + t % page_size
        kb = k[slots].float().repeat_interleave(H // kv_heads, dim=1)  # [L, H, D]
        vb = v[slots].float().repeat_interleave(H // kv_heads, dim=1)
        scores = torch.einsum("nhd,lhd->hnl", q[s:s + n].float(), kb) * scale
        q_pos = (L - n) + torch.arange(n, device=page_table.device)
        scores = scores.masked_fill(t[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[s:s + n] = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), vb).to(q.dtype)
    return out
