"""Activation quantization to FP8 E4M3, per token or per token and group of columns.

One program per (row, group of ``group`` columns): the group's amax gives the scale
``max(amax, EPS) / 448`` and every value becomes ``e4m3(clamp(x * (448 / max(amax, EPS))))``
(IEEE-rounded divisions, as the torch definition in ``tandem.engine.quantization.fp8``). ``group`` = K is per-token
quantization (the row read twice, in chunks); a static scale (calibrated ``input_scale``)
skips the amax. Scales come out float32 ``[M, groups]`` for the GEMMs of ``fp8_gemm``.

Triton's interpreter casts float32 to e4m3 with a wrong rounding (a mantissa carry is lost:
31.05 -> 16 instead of 32); the CPU tests therefore use inputs whose quotients are exact
e4m3 values, and the rounding itself is checked on the GPU (``gpu_engine_check.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from tandem.engine.quantization.fp8 import EPS, FP8_DTYPE, FP8_MAX, quantize_row_groups, quantize_rows, quantize_static


@triton.jit
def _quant_kernel(X, Q, S, Static, K, group, stride_xm, stride_qm, stride_sm,
                  STATIC: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    start = g * group
    x_row = X + row * stride_xm
    q_row = Q + row * stride_qm
    if STATIC:
        s = tl.load(Static).to(tl.float32)
        inv = tl.math.div_rn(1.0, s)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for off in range(0, group, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = (idx < group) & (start + idx < K)
            x = tl.load(x_row + start + idx, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        top = tl.maximum(tl.max(amax, axis=0), EPS)
        s = tl.math.div_rn(top, FP8_MAX)
        inv = tl.math.div_rn(FP8_MAX, top)
    for off in range(0, group, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = (idx < group) & (start + idx < K)
        x = tl.load(x_row + start + idx, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(x * inv, -FP8_MAX, FP8_MAX)
        tl.store(q_row + start + idx, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + row * stride_sm + g, s)


def quantize_activations(x: torch.Tensor, group: int | None = None,
                         static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scales [M, ceil(K / group)] float32); ``group`` None: per token
    ([M, 1]); ``static_scale`` (0-d / [1] float32): that scale for every row ([M, 1])."""
    M, K = x.shape
    if static_scale is not None or group is None or group >= K:
        group = K
    groups = triton.cdiv(K, group)
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((M, groups), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    block = min(triton.next_power_of_2(group), 2048)
    _quant_kernel[(M, groups)](
        x, q, s, static_scale if static_scale is not None else s, K, group, x.stride(0), q.stride(0), s.stride(0),
        STATIC=static_scale is not None, BLOCK=block, FP8_MAX=FP8_MAX, EPS=EPS, num_warps=4 if block <= 1024 else 8,
    )
    return q, s


def quantize_activations_ref(x: torch.Tensor, group: int | None = None,
                             static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if static_scale is not None:
        return quantize_static(x, static_scale)
    if group is None or group >= x.shape[1]:
        return quantize_rows(x)
    return quantize_row_groups(x, group)
