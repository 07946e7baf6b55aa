"""Triton device functions both paged attention kernels use (inlined into each kernel).

FP8 pools: keys and values are converted to the query's dtype as they are loaded (exact), and
the per-layer scales are folded into scalars by the kernels: the key scale into the softmax
scale, the value scale into the final normalisation (``kv_scales``)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_slots(PageTable, row, offs_n, mask_n, PAGE_SIZE: tl.constexpr):
    """Pool slots of context tokens ``offs_n`` of the request whose page table starts at ``row``."""
    page = tl.load(PageTable + row + offs_n // PAGE_SIZE, mask=mask_n, other=0)
    return page.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE


@triton.jit
def load_slots(Pool, slot, stride_slot, head, offs_d, mask):
    """``[len(slot), len(offs_d)]`` of the pool viewed as ``[num_slots, kv_heads, head_dim]``
    (``head``: the kv head's offset)."""
    return tl.load(Pool + slot[:, None] * stride_slot + head + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``tl.dot``, in IEEE precision when asked (float32 pools: no TF32 rounding)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def key_block(PageTable, row, K, stride_k_slot, k_head, n0, end, offs_d, mask_d, PAGE_SIZE: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Context tokens ``n0 .. n0 + BLOCK_N`` (those below ``end``) of one request: their
    positions, mask, pool slots, K/V mask and keys."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < end
    slot = paged_slots(PageTable, row, offs_n, mask_n, PAGE_SIZE)
    kv_mask = mask_n[:, None] & mask_d[None, :]
    return offs_n, mask_n, slot, kv_mask, load_slots(K, slot, stride_k_slot, k_head, offs_d, kv_mask)


@triton.jit
def softmax_step(qk, m_i, l_i, acc, V, slot, stride_v_slot, v_head, offs_d, kv_mask, ROWS_MAY_BE_EMPTY: tl.constexpr,
                 IEEE: tl.constexpr, CDT: tl.constexpr):
    """One online-softmax step over a block of scores ``qk`` (masked keys at -inf): the new
    running max, denominator and output. ``ROWS_MAY_BE_EMPTY``: a row may have seen no key yet
    (its max stays -inf), so exponentiate against 0 instead. Values are read as ``CDT`` (the
    query's dtype; FP8 values convert exactly, their scale is the caller's to apply)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if ROWS_MAY_BE_EMPTY:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    alpha = tl.exp(m_i - m_ref)
    p = tl.exp(qk - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_slots(V, slot, stride_v_slot, v_head, offs_d, kv_mask).to(CDT)
    acc = acc * alpha[:, None] + dot(p.to(CDT), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def kv_scales(KVScale, sm_scale, KV_FP8: tl.constexpr):
    """(score scale, output scale) of a layer: ``sm_scale * k_scale`` and ``v_scale`` for an FP8
    pool, ``sm_scale`` and 1 otherwise."""
    if KV_FP8:
        return sm_scale * tl.load(KVScale), tl.load(KVScale + 1)
    else:
        return sm_scale, 1.0
