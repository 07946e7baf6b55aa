"""Paged decode attention (one query token per request), flash-decoding style.

K/V are read straight from the page pool through each request's page table: token
``t`` of request ``b`` lives in slot ``page_table[b, t // page_size] * page_size +
t % page_size`` of the pool viewed as ``[num_slots, kv_heads, head_dim]``.

Stage 1 splits each request's context into ``num_splits`` ranges (split-K) and runs
one program per (request, kv head, split): all query heads that share the kv head
(GQA) are processed together as the rows of one ``tl.dot``. Stage 2 merges the
splits by their log-sum-exp. Rows with ``seq_len == 0`` (padding of a CUDA-graph
bucket) produce zeros. Nothing here synchronises with the host.

An FP8 pool is read as bytes and converted to the query's dtype in registers; the layer's
key scale multiplies the scores and its value scale the output (``paged.kv_scales``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import dequantized_pool, fp8_pool_format
from .paged import dot, key_block, kv_scales, softmax_step

BLOCK_N = 64  # context tokens per inner iteration (and the granularity of a split)


@triton.jit
def _decode_partial_kernel(
    Q, K, V, PageTable, SeqLens, PartialOut, PartialLse, Out, KVScale,
    sm_scale,
    stride_qb, stride_qh,
    stride_k_slot, stride_k_head,
    stride_v_slot, stride_v_head,
    stride_pt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_out_b, stride_out_h,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    seq_len = tl.load(SeqLens + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    qk_scale, v_scale = kv_scales(KVScale, sm_scale, KV_FP8)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n, mask_n, slot, kv_mask, k = key_block(PageTable, b * stride_pt, K, stride_k_slot,
                                                     kv_head * stride_k_head, n0, end, offs_d, mask_d, PAGE_SIZE,
                                                     BLOCK_N)
        qk = dot(q, tl.trans(k.to(q.dtype)), IEEE)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
        m_i, l_i, acc = softmax_step(qk, m_i, l_i, acc, V, slot, stride_v_slot, kv_head * stride_v_head, offs_d,
                                     kv_mask, False, IEEE, q.dtype)
    # An empty split (short context, or a padding row) stores zeros and lse = -inf.
    empty = l_i == 0.0
    out = acc * v_scale / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    mask_out = mask_h[:, None] & mask_d[None, :]
    if NUM_SPLITS == 1:  # nothing to merge: the final output directly
        tl.store(Out + b * stride_out_b + heads[:, None] * stride_out_h + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mask_out)
    else:
        tl.store(PartialOut + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
                 out, mask=mask_out)
        tl.store(PartialLse + b * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


@triton.jit
def _decode_merge_kernel(
    PartialOut, PartialLse, Out,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_out_b, stride_out_h,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(PartialLse + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    parts = tl.load(PartialOut + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * stride_out_b + h * stride_out_h + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           page_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int, out: torch.Tensor | None = None,
                           kv_scale: torch.Tensor | None = None, block_n: int = BLOCK_N) -> torch.Tensor:
    """q [B, H, D]; k_cache/v_cache [num_pages, page_size, kv_heads, D]; page_table [B, >= pages]
    (int32 or int64); seq_lens [B] context length including the new token. Returns [B, H, D].
    An FP8 pool needs ``kv_scale`` = float32 (k_scale, v_scale) on the device. ``block_n``:
    context tokens per inner iteration (a power of two; benchmarks compare choices with it)."""
    B, H, D = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    group = H // kv_heads
    fp8 = fp8_pool_format(k_cache, kv_scale) is not None
    k = k_cache.view(-1, kv_heads, D)
    v = v_cache.view(-1, kv_heads, D)
    splits = max(num_splits, 1)
    partial = torch.empty((B, H, splits, D) if splits > 1 else (1, 1, 1, 1), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, H, splits) if splits > 1 else (1, 1, 1), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q) if out is None else out
    block_d = triton.next_power_of_2(D)
    _decode_partial_kernel[(B, kv_heads, num_splits)](
        q, k, v, page_table, seq_lens, partial, lse, out, kv_scale if fp8 else seq_lens, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), page_table.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        PAGE_SIZE=page_size, GROUP=group, HEAD_DIM=D, NUM_SPLITS=num_splits,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, KV_FP8=fp8, num_warps=4, num_stages=2,
    )
    if num_splits == 1:
        return out
    _decode_merge_kernel[(B, H)](
        partial, lse, out, partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        num_warps=4,
    )
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, page_table, seq_lens, scale, kv_scale=None) -> torch.Tensor:
    """The torch reference: gather each request's context through its page table (dequantized
    with ``kv_scale`` when FP8), softmax in float32."""
    B, H, D = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    k, v = dequantized_pool(k_cache, v_cache, kv_scale)
    out = torch.zeros_like(q)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        t = torch.arange(n, device=q.device)
        slots = page_table[b, t // page_size].long() * page_size + t % page_size
        kb = k[slots].float().repeat_interleave(H // kv_heads, dim=1)  # [n, H, D]
        vb = v[slots].float().repeat_interleave(H // kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), kb) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), vb).to(q.dtype)
    return out
