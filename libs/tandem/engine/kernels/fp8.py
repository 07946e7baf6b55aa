"""FP8 conversion for the KV write: float32 to the bits of an FP8 value, with integer ops.

Why not ``x.to(tl.float8e4nv)``: on the GPU that cast rounds to nearest even and saturates
(``cvt.rn.satfinite``), but Triton's interpreter (3.9) converts by truncating bit fields (no
carry out of the mantissa, no saturation), so a kernel using it cannot be checked on CPU.
This conversion is the same arithmetic everywhere: round to nearest even, subnormals
included, saturated at the format's largest finite value (no inf or NaN is ever stored),
bit for bit what ``torch``'s ``x.clamp(-max, max).to(float8)`` gives
(``tests/unit/engine/test_kv_fp8.py`` checks every rounding case). Reading FP8 back
(``.to(tl.float32)`` / ``.to(tl.bfloat16)``) is exact in the interpreter and on the GPU.

Formats (``E4M3``: OCP ``float8_e4m3fn``, no infinities; otherwise ``float8_e5m2``):
mantissa bits, exponent bias, largest finite value, smallest normal, and the scale that
turns a subnormal into its integer mantissa.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Magic number: adding then subtracting 2^23 rounds a float32 in [0, 2^22) to an integer,
# half to even (IEEE addition), on the GPU and in numpy alike.
_ROUND = tl.constexpr(8388608.0)


@triton.jit
def _fp8_bits(x, MAN: tl.constexpr, BIAS: tl.constexpr, MAX: tl.constexpr, MIN_NORMAL: tl.constexpr,
              SUB_SCALE: tl.constexpr):
    xi = x.to(tl.int32, bitcast=True)
    sign = (xi >> 24) & 0x80  # bit 31 -> bit 7 (arithmetic shift keeps it in the low byte)
    a = tl.minimum(tl.abs(x), MAX)
    ai = a.to(tl.int32, bitcast=True)
    # Normal range: round the float32 exponent+mantissa word to MAN mantissa bits (a carry
    # into the exponent is the right answer), then move the exponent to the FP8 bias.
    normal = ((ai + ((1 << (22 - MAN)) - 1) + ((ai >> (23 - MAN)) & 1)) >> (23 - MAN)) - ((127 - BIAS) << MAN)
    # Below the smallest normal: multiples of the subnormal step; the integer is the bit pattern
    # (a result of 2^MAN is exactly the smallest normal's encoding).
    sub = ((tl.minimum(a, MIN_NORMAL) * SUB_SCALE + _ROUND) - _ROUND).to(tl.int32)
    bits = tl.where(a < MIN_NORMAL, sub, normal)
    return (bits | sign).to(tl.uint8)


@triton.jit
def fp8_bits(x, E4M3: tl.constexpr):
    """float32 ``x`` -> uint8 bits of the nearest FP8 value (e4m3fn when ``E4M3``, else e5m2)."""
    if E4M3:
        return _fp8_bits(x, 3, 7, 448.0, 0.015625, 512.0)
    else:
        return _fp8_bits(x, 2, 15, 57344.0, 0.00006103515625, 65536.0)


def fp8_pool_format(k_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> torch.dtype | None:
    """The pool's FP8 dtype (None when it is not FP8); an FP8 pool must come with its scales."""
    if k_cache.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return None
    if kv_scale is None or kv_scale.dtype != torch.float32 or kv_scale.numel() != 2:
        raise ValueError(f"a {k_cache.dtype} KV pool needs kv_scale = float32 (k_scale, v_scale)")
    return k_cache.dtype


def dequantized_pool(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_scale: torch.Tensor | None):
    """For the kernels' torch references: K and V as ``[num_slots, kv_heads, head_dim]``,
    dequantized to float32 when the pool is FP8 (as they are, otherwise)."""
    kv_heads, dim = k_cache.shape[2], k_cache.shape[3]
    k, v = k_cache.reshape(-1, kv_heads, dim), v_cache.reshape(-1, kv_heads, dim)
    if fp8_pool_format(k_cache, kv_scale) is None:
        return k, v
    return k.float() * kv_scale[0], v.float() * kv_scale[1]
