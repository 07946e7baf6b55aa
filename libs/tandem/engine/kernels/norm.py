"""RMSNorm, optionally fused with the residual add that precedes it.

``rms_norm(x, w, eps, residual)`` returns ``(norm(x + residual), x + residual)``:
the sum is written back into ``residual`` (in place) and becomes the next residual.
Rounding matches the torch path: the add and the normalised value are rounded to the
model dtype before the weight multiply, as ``h + out`` and ``RMSNorm.forward`` do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, Residual, W, Out, stride_x, stride_r, stride_o, N, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dtype = X.dtype.element_ty
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(Residual + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    y = (xf * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (w * y).to(Out.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [T, N] (rows may be strided, last dim contiguous). Without residual: norm(x).
    With residual [T, N] contiguous: (norm(x + residual), residual := x + residual)."""
    T, N = x.shape
    out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(N)
    _rms_norm_kernel[(T,)](
        x, residual if residual is not None else x, weight, out,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), N, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )
    return out if residual is None else (out, residual)


def rms_norm_ref(x, weight, eps, residual=None):
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    dtype = x.dtype
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    out = weight * y
    return out if residual is None else (out, residual)
