"""Triton device functions both paged attention kernels use (inlined into each kernel)."""
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
