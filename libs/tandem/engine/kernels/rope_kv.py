"""Rotary embedding fused with the write of the new K/V into the page pool.

One program per token: its query heads are rotated in place; its key heads are
rotated and stored, with the value heads, at the token's flat slot of the pool (``slot_mapping``; a negative slot writes nothing, for CUDA-graph padding).
Rotate-half convention on the first ``rot_dim`` dims, the rest passed through.

Rounding follows the torch path (``Rotary.apply``) step by step: cos/sin are rounded
to the model dtype, and each product and the sum are rounded as torch's own
element-wise ops would round them, so bf16 results match it bit for bit.

An FP8 pool (``--kv-cache-dtype``) is written quantized: the rotated key (rounded to the
model dtype, as above) and the value are divided by the layer's scale (IEEE division) and
converted by ``fp8.fp8_bits``, so the stored bytes equal ``kv_quant.quantize`` of the torch
path's K and V exactly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kv_quant import write_slots
from .fp8 import fp8_bits, fp8_pool_format


@triton.jit
def _rotate_heads(X, stride_h, heads, mask_h, offs, mask_half, c, s, ROT_HALF: tl.constexpr):
    """Rotated halves [heads, ROT_HALF] of the rows ``X + heads * stride_h``, rounded as torch would."""
    dtype = X.dtype.element_ty
    ptr = X + heads[:, None] * stride_h + offs[None, :]
    m = mask_h[:, None] & mask_half[None, :]
    x1 = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + ROT_HALF, mask=m, other=0.0).to(tl.float32)
    o1 = ((x1 * c).to(dtype).to(tl.float32) + (-x2 * s).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)).to(dtype)
    return o1, o2, m


@triton.jit
def _to_cache(x, scale, KV_FP8: tl.constexpr, E4M3: tl.constexpr, out_dtype: tl.constexpr):
    """Values as the pool stores them: FP8 bits of ``x / scale``, or ``x`` cast to the pool dtype."""
    if KV_FP8:
        return fp8_bits(tl.math.div_rn(x.to(tl.float32), scale), E4M3)
    else:
        return x.to(out_dtype)


@triton.jit
def _rope_kv_kernel(
    Q, K, V, Positions, Cos, Sin, SlotMapping, KCache, VCache, KVScale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cos, stride_cache_slot, stride_cache_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
    BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr, E4M3: tl.constexpr,
):
    """One program per token: every query head rotated in place, every kv head rotated and stored."""
    t = tl.program_id(0)
    pos = tl.load(Positions + t)
    offs = tl.arange(0, BLOCK_HALF)
    mask_half = offs < ROT_HALF
    dtype = Q.dtype.element_ty
    c = tl.load(Cos + pos * stride_cos + offs, mask=mask_half, other=0.0).to(dtype).to(tl.float32)[None, :]
    s = tl.load(Sin + pos * stride_cos + offs, mask=mask_half, other=0.0).to(dtype).to(tl.float32)[None, :]

    q = Q + t * stride_qt
    q_heads = tl.arange(0, BLOCK_H)
    o1, o2, m = _rotate_heads(q, stride_qh, q_heads, q_heads < NUM_HEADS, offs, mask_half, c, s, ROT_HALF)
    q_ptr = q + q_heads[:, None] * stride_qh + offs[None, :]
    tl.store(q_ptr, o1, mask=m)
    tl.store(q_ptr + ROT_HALF, o2, mask=m)

    slot = tl.load(SlotMapping + t).to(tl.int64)
    if slot >= 0:
        out_dtype = KCache.dtype.element_ty  # uint8 for an FP8 pool (its bytes)
        if KV_FP8:
            k_scale = tl.load(KVScale)
            v_scale = tl.load(KVScale + 1)
        else:
            k_scale = 1.0
            v_scale = 1.0
        kv_heads = tl.arange(0, BLOCK_KVH)
        mask_kvh = kv_heads < NUM_KV_HEADS
        k = K + t * stride_kt
        # (names distinct from the query's: a compiled if-block may not re-type an outer variable)
        k1, k2, mk = _rotate_heads(k, stride_kh, kv_heads, mask_kvh, offs, mask_half, c, s, ROT_HALF)
        dst_k = KCache + slot * stride_cache_slot + kv_heads[:, None] * stride_cache_head
        tl.store(dst_k + offs[None, :], _to_cache(k1, k_scale, KV_FP8, E4M3, out_dtype), mask=mk)
        tl.store(dst_k + ROT_HALF + offs[None, :], _to_cache(k2, k_scale, KV_FP8, E4M3, out_dtype), mask=mk)
        offs_rest = 2 * ROT_HALF + tl.arange(0, BLOCK_REST)
        m_rest = mask_kvh[:, None] & (offs_rest < HEAD_DIM)[None, :]
        rest = tl.load(k + kv_heads[:, None] * stride_kh + offs_rest[None, :], mask=m_rest, other=0.0)
        tl.store(dst_k + offs_rest[None, :], _to_cache(rest, k_scale, KV_FP8, E4M3, out_dtype), mask=m_rest)
        offs_d = tl.arange(0, BLOCK_D)
        m_d = mask_kvh[:, None] & (offs_d < HEAD_DIM)[None, :]
        v = tl.load(V + t * stride_vt + kv_heads[:, None] * stride_vh + offs_d[None, :], mask=m_d, other=0.0)
        dst_v = VCache + slot * stride_cache_slot + kv_heads[:, None] * stride_cache_head + offs_d[None, :]
        tl.store(dst_v, _to_cache(v, v_scale, KV_FP8, E4M3, out_dtype), mask=m_d)


def rope_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_positions, rot_dim / 2] in float32, computed as ``Rotary.cos_sin`` does."""
    positions = torch.arange(max_positions, device=inv_freq.device)
    freqs = positions[:, None].float() * inv_freq[None, :].float()
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def rope_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, kv_scale: torch.Tensor | None = None) -> None:
    """q [T, H, D] rotated in place; rotated k and v [T, KVH, D] written to the pool at slot_mapping [T].

    The last dims of q/k/v must be contiguous; token and head strides are free (views into
    a merged QKV projection work). cos/sin come from ``rope_cos_sin_cache``. An FP8 pool needs
    ``kv_scale`` = float32 (k_scale, v_scale) on the device.
    """
    T, H, D = q.shape
    kv_heads = k.shape[1]
    rot_half = cos.shape[1]
    fp8 = fp8_pool_format(k_cache, kv_scale)
    kc = k_cache.view(torch.uint8 if fp8 is not None else k_cache.dtype).view(-1, kv_heads, D)
    vc = v_cache.view(kc.dtype).view(-1, kv_heads, D)
    block_half = triton.next_power_of_2(rot_half)
    rest = D - 2 * rot_half
    _rope_kv_kernel[(T,)](
        q, k, v, positions, cos, sin, slot_mapping, kc, vc, kv_scale if fp8 is not None else kc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), kc.stride(0), kc.stride(1),
        NUM_HEADS=H, NUM_KV_HEADS=kv_heads, HEAD_DIM=D, ROT_HALF=rot_half,
        BLOCK_H=triton.next_power_of_2(H), BLOCK_KVH=triton.next_power_of_2(kv_heads), BLOCK_HALF=block_half,
        BLOCK_REST=triton.next_power_of_2(rest) if rest > 0 else 1, BLOCK_D=triton.next_power_of_2(D),
        KV_FP8=fp8 is not None, E4M3=fp8 == torch.float8_e4m3fn,
        num_warps=4, enable_fp_fusion=False,  # no FMA contraction: round each product as torch does
    )


def rope_and_write_kv_ref(q, k, v, positions, cos, sin, slot_mapping, k_cache, v_cache, kv_scale=None) -> None:
    """Torch reference with the same contract (and the torch path's rounding and quantization)."""
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
    k_scale, v_scale = (None, None) if fp8_pool_format(k_cache, kv_scale) is None else (kv_scale[0], kv_scale[1])
    write_slots(k_cache, slot_mapping[keep], apply(k)[keep], k_scale)
    write_slots(v_cache, slot_mapping[keep], v[keep], v_scale)
