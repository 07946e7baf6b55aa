"""Rotary embedding fused with the write of the new K/V into the page pool.

One program per (token, head): query heads are rotated in place; key heads are
rotated and stored, with the matching value head, at the token's flat slot of the
pool (``slot_mapping``; a negative slot writes nothing, for CUDA-graph padding).
Rotate-half convention on the first ``rot_dim`` dims, the rest passed through.

Rounding follows the torch path (``Rotary.apply``) step by step: cos/sin are rounded
to the model dtype, and each product and the sum are rounded as torch's own
element-wise ops would round them, so bf16 results match it bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(X, offs, mask_half, c, s, ROT_HALF: tl.constexpr):
    dtype = X.dtype.element_ty
    x1 = tl.load(X + offs, mask=mask_half, other=0.0).to(tl.float32)
    x2 = tl.load(X + ROT_HALF + offs, mask=mask_half, other=0.0).to(tl.float32)
    o1 = ((x1 * c).to(dtype).to(tl.float32) + (-x2 * s).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)).to(dtype)
    return o1, o2


@triton.jit
def _rope_kv_kernel(
    Q, K, V, Positions, Cos, Sin, SlotMapping, KCache, VCache,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cos, stride_cache_slot, stride_cache_head,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    dtype = Q.dtype.element_ty
    pos = tl.load(Positions + t)
    offs = tl.arange(0, BLOCK_HALF)
    mask_half = offs < ROT_HALF
    c = tl.load(Cos + pos * stride_cos + offs, mask=mask_half, other=0.0).to(dtype).to(tl.float32)
    s = tl.load(Sin + pos * stride_cos + offs, mask=mask_half, other=0.0).to(dtype).to(tl.float32)
    offs_rest = 2 * ROT_HALF + tl.arange(0, BLOCK_REST)
    mask_rest = offs_rest < HEAD_DIM
    if h < NUM_HEADS:
        q = Q + t * stride_qt + h * stride_qh
        o1, o2 = _rotate(q, offs, mask_half, c, s, ROT_HALF)
        tl.store(q + offs, o1, mask=mask_half)
        tl.store(q + ROT_HALF + offs, o2, mask=mask_half)
    else:
        kh = h - NUM_HEADS
        slot = tl.load(SlotMapping + t).to(tl.int64)
        if slot >= 0:
            k = K + t * stride_kt + kh * stride_kh
            o1, o2 = _rotate(k, offs, mask_half, c, s, ROT_HALF)
            dst_k = KCache + slot * stride_cache_slot + kh * stride_cache_head
            dst_v = VCache + slot * stride_cache_slot + kh * stride_cache_head
            out_dtype = KCache.dtype.element_ty
            tl.store(dst_k + offs, o1.to(out_dtype), mask=mask_half)
            tl.store(dst_k + ROT_HALF + offs, o2.to(out_dtype), mask=mask_half)
            rest = tl.load(k + offs_rest, mask=mask_rest, other=0.0)
            tl.store(dst_k + offs_rest, rest.to(out_dtype), mask=mask_rest)
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < HEAD_DIM
            v = tl.load(V + t * stride_vt + kh * stride_vh + offs_d, mask=mask_d, other=0.0)
            tl.store(dst_v + offs_d, v.to(out_dtype), mask=mask_d)


def rope_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_positions, rot_dim / 2] in float32, computed as ``Rotary.cos_sin`` does."""
    positions = torch.arange(max_positions, device=inv_freq.device)
    freqs = positions[:, None].float() * inv_freq[None, :].float()
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def rope_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """q [T, H, D] rotated in place; rotated k and v [T, KVH, D] written to the pool at slot_mapping [T].

    The last dims of q/k/v must be contiguous; token and head strides are free (views into
    a merged QKV projection work). cos/sin come from ``rope_cos_sin_cache``.
    """
    T, H, D = q.shape
    kv_heads = k.shape[1]
    rot_half = cos.shape[1]
    kc = k_cache.view(-1, kv_heads, D)
    vc = v_cache.view(-1, kv_heads, D)
    block_half = triton.next_power_of_2(rot_half)
    rest = D - 2 * rot_half
    _rope_kv_kernel[(T, H + kv_heads)](
        q, k, v, positions, cos, sin, slot_mapping, kc, vc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), kc.stride(0), kc.stride(1),
        NUM_HEADS=H, HEAD_DIM=D, ROT_HALF=rot_half, BLOCK_HALF=block_half,
        BLOCK_REST=triton.next_power_of_2(rest) if rest > 0 else 1,
        BLOCK_D=triton.next_power_of_2(D), num_warps=1,
    )


def rope_and_write_kv_ref(q, k, v, positions, cos, sin, slot_mapping, k_cache, v_cache) -> None:
    """Torch reference with the same contract (and the torch path's rounding)."""
    dtype = q.dtype
    c = torch.cat([cos, cos], -1)[positions].to(dtype)[:, None, :]
    s = torch.cat([sin, sin], -1)[positions].to(dtype)[:, None, :]
    rot = 2 * cos.shape[1]
    half = rot // 2

    def apply(x):
        r, rest = x[..., :rot], x[..., rot:]
        rotated = torch.cat((-r[..., half:], r[..., :half]), dim=-1)
        return torch.cat((r * c + rotated * s, rest), dim=-1)

    q.copy_(apply(q))
    keep = slot_mapping >= 0
    kv_heads, D = k.shape[1], k.shape[2]
    k_cache.view(-1, kv_heads, D)[slot_mapping[keep]] = apply(k)[keep].to(k_cache.dtype)
    v_cache.view(-1, kv_heads, D)[slot_mapping[keep]] = v[keep].to(v_cache.dtype)
