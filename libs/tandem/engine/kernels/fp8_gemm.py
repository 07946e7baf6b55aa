"""FP8 E4M3 GEMMs with float32 scales: ``y = (q_x * s_x) @ (q_w * s_w).T`` (+ bias), rounded to
the activations' dtype.

Three kernels, each for both weight layouts (``group_n`` x ``group_k`` blocks of one scale:
1 x K per channel, 128 x 128 block-scaled):

* ``fp8_gemm``: activations already quantized (``fp8_quant.quantize_activations``); tiles of
  BLOCK_M x BLOCK_N, BLOCK_K columns a step (one activation group and one weight block column
  a step, so each step's product is scaled and added in float32: Hopper's FP8 tensor-core
  accumulation is not kept across steps, as DeepSeek-V3's GEMMs do). For prefill and large
  decode batches; the per-channel layout also has ``torch._scaled_mm``.
* ``fp8_gemm_small_m``: decode batches of a few rows. The activations come in unquantized;
  each program quantizes its rows itself (per token: an amax pass over the row first, in wide
  strides; per 128-column group: the step's tile; static: the calibrated scale), so a linear
  layer is one launch, and each program streams a narrow BLOCK_N slice of the weight: many
  programs, the weight read once at full bandwidth. Quantizing costs a multiply per value (the
  divisions are per row or group), so redoing it in every program stays cheap.
* ``fp8_gemv``: the same for one row (batch-1 decode) on the CUDA cores: no tensor-core tile
  padded to 16 rows, each weight value converted once; the loop pipelined or unrolled so that
  several weight tiles are in flight per program.

Their torch definition is ``tandem.engine.quantization.fp8.fp8_linear_ref``. Configurations are
picked on the GPU by measurement (``tandem.engine.quantization.gemm``).
Under Triton's interpreter an e4m3 ``tl.dot`` is exact (float32 products of exact values), but
its float32 -> e4m3 cast rounds wrongly (see ``fp8_quant``): the CPU tests use activations
whose quotients are exact e4m3 values.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from tandem.engine.quantization.fp8 import EPS, FP8_MAX


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    unroll: int = 1  # fp8_gemv: main-loop iterations unrolled (num_stages: its loop's pipeline depth)


@triton.jit
def _tile(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows and columns of output tile (pid_m, pid_n), and which of them exist."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _store_tile(Y, acc, offs_m, offs_n, mask_m, mask_n, stride_ym, Bias, HAS_BIAS: tl.constexpr):
    """acc (+ bias) rounded to Y's dtype into rows offs_m, columns offs_n."""
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _fp8_gemm_kernel(A, B, C, AS, BS, Bias, M, N, K,
                     stride_am, stride_bn, stride_cm, stride_as_m, stride_as_k, stride_bs_n, stride_bs_k,
                     GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIZZLE: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = SWIZZLE * num_n  # programs of SWIZZLE row blocks walk the columns together (L2 reuse)
    first_m = (pid // per_group) * SWIZZLE
    rows = tl.minimum(num_m - first_m, SWIZZLE)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    offs_m, offs_n, mask_m, mask_n = _tile(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptr = A + offs_m.to(tl.int64)[:, None] * stride_am
    b_ptr = B + offs_n.to(tl.int64)[None, :] * stride_bn
    as_ptr = AS + offs_m * stride_as_m
    bs_ptr = BS + (offs_n // GROUP_N) * stride_bs_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        a = tl.load(a_ptr + (k0 + offs_k)[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + (k0 + offs_k)[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a_s = tl.load(as_ptr + (k0 // GROUP_K) * stride_as_k, mask=mask_m, other=0.0)
        b_s = tl.load(bs_ptr + (k0 // GROUP_K) * stride_bs_k, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    _store_tile(C, acc, offs_m, offs_n, mask_m, mask_n, stride_cm, Bias, HAS_BIAS)


@triton.jit
def _scales(amax, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    """(dequantisation scale, its inverse) of groups with absolute maximum ``amax``."""
    top = tl.maximum(amax, EPS)
    return tl.math.div_rn(top, FP8_MAX), tl.math.div_rn(tl.zeros_like(top) + FP8_MAX, top)


@triton.jit
def _row_scales(x_ptr, mask_m, K, Static, ACT: tl.constexpr, BLOCK_M: tl.constexpr, PRE_K: tl.constexpr,
                FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    """Per-row (scale, inverse) [BLOCK_M]: ACT 0 from the rows' amax (a first pass over the L2-resident
    activations in wide strides, unrolled so that several loads are in flight); ACT 2 the static scale."""
    if ACT == 0:
        offs = tl.arange(0, PRE_K)
        amax = tl.zeros([BLOCK_M], tl.float32)
        for k0 in tl.range(0, K, PRE_K, loop_unroll_factor=4):
            x = tl.load(x_ptr + (k0 + offs)[None, :], mask=mask_m[:, None] & (k0 + offs < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1).to(tl.float32))
        scale, inv = _scales(amax, FP8_MAX, EPS)
    else:
        scale = tl.zeros([BLOCK_M], tl.float32) + tl.load(Static).to(tl.float32)
        inv = tl.math.div_rn(tl.zeros([BLOCK_M], tl.float32) + 1.0, scale)
    return scale, inv


@triton.jit
def _fp8_gemm_small_m_kernel(X, W, WS, Static, Bias, Y, M, N, K,
                             stride_xm, stride_wn, stride_ym, stride_ws_n, stride_ws_k,
                             ACT: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRE_K: tl.constexpr,
                             FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    # ACT: 0 dynamic per token, 1 dynamic per token and GROUP_K columns (BLOCK_K == GROUP_K), 2 static.
    offs_m, offs_n, mask_m, mask_n = _tile(0, tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptr = X + offs_m.to(tl.int64)[:, None] * stride_xm
    w_ptr = W + offs_n.to(tl.int64)[None, :] * stride_wn
    ws_ptr = WS + (offs_n // GROUP_N) * stride_ws_n
    if ACT != 1:
        row_scale, row_inv = _row_scales(x_ptr, mask_m, K, Static, ACT, BLOCK_M, PRE_K, FP8_MAX, EPS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        x = tl.load(x_ptr + (k0 + offs_k)[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        if ACT == 1:
            s, inv = _scales(tl.max(tl.abs(x), axis=1), FP8_MAX, EPS)
        else:
            s, inv = row_scale, row_inv
        xq = tl.clamp(x * inv[:, None], -FP8_MAX, FP8_MAX).to(W.dtype.element_ty)
        w = tl.load(w_ptr + (k0 + offs_k)[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        w_s = tl.load(ws_ptr + (k0 // GROUP_K) * stride_ws_k, mask=mask_n, other=0.0)
        acc += tl.dot(xq, w) * s[:, None] * w_s[None, :]
    _store_tile(Y, acc, offs_m, offs_n, mask_m, mask_n, stride_ym, Bias, HAS_BIAS)


@triton.jit
def _fp8_gemv_kernel(X, W, WS, Static, Bias, Y, N, K, stride_wn, stride_ws_n, stride_ws_k,
                     ACT: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRE_K: tl.constexpr, STAGES: tl.constexpr,
                     UNROLL: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    # One row (batch 1) on the CUDA cores, as a [1, BLOCK_K] tile: each weight value converted once.
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    row = tl.arange(0, 1) < 1
    w_ptr = W + offs_n.to(tl.int64)[:, None] * stride_wn
    ws_ptr = WS + (offs_n // GROUP_N) * stride_ws_n
    if ACT != 1:
        row_scale, row_inv = _row_scales(X + tl.zeros([1, 1], tl.int64), row, K, Static, ACT, 1, PRE_K,
                                         FP8_MAX, EPS)
    acc = tl.zeros([BLOCK_N], tl.float32)
    # No dot here, so the kernel's num_stages would pipeline nothing: the loop's own num_stages (weight tiles
    # in flight) and unrolling (independent loads issued together) keep HBM busy instead.
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES, loop_unroll_factor=UNROLL):
        mask_k = k0 + offs_k < K
        x = tl.load(X + (k0 + offs_k)[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
        if ACT == 1:
            s, inv = _scales(tl.max(tl.abs(x), axis=1), FP8_MAX, EPS)
        else:
            s, inv = row_scale, row_inv
        xq = tl.clamp(x * inv[:, None], -FP8_MAX, FP8_MAX).to(W.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + (k0 + offs_k)[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        w_s = tl.load(ws_ptr + (k0 // GROUP_K) * stride_ws_k, mask=mask_n, other=0.0)
        acc += tl.sum(w.to(tl.float32) * xq, axis=1) * s * w_s
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(Y + offs_n, acc.to(Y.dtype.element_ty), mask=mask_n)


def _weight_scale_strides(weight_scale: torch.Tensor) -> tuple[int, int]:
    """(stride over row groups, stride over column groups) of a [N] (per-channel) or [Nb, Kb] scale."""
    if weight_scale.dim() == 1:
        return weight_scale.stride(0), 0
    return weight_scale.stride(0), weight_scale.stride(1)


def fp8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             group_n: int, group_k: int | None, out_dtype: torch.dtype, config: GemmConfig,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """xq [M, K] e4m3 with x_scale [M, 1] (per token) or [M, ceil(K / group_k)]; weight [N, K] e4m3 with
    weight_scale [N] (group_n 1, group_k None) or [ceil(N / group_n), ceil(K / group_k)]. -> [M, N]."""
    M, K = xq.shape
    N = weight.shape[0]
    if group_k is not None and group_k % config.block_k:
        raise ValueError(f"block_k={config.block_k} must divide the scale group of {group_k} columns")
    y = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if M == 0:
        return y
    ws_n, ws_k = _weight_scale_strides(weight_scale)
    as_k = x_scale.stride(1) if x_scale.shape[1] > 1 else 0
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),)
    _fp8_gemm_kernel[grid](
        xq, weight, y, x_scale, weight_scale, bias if bias is not None else y, M, N, K,
        xq.stride(0), weight.stride(0), y.stride(0), x_scale.stride(0), as_k, ws_n, ws_k,
        GROUP_N=group_n, GROUP_K=group_k or config.block_k, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SWIZZLE=8,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


def fp8_gemm_small_m(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group_n: int,
                     group_k: int | None, config: GemmConfig, input_scale: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp32, M <= config.block_m) quantized inside the kernel: per token, per
    ``group_k`` columns when the weight is block-scaled, or with the static ``input_scale``. -> [M, N]."""
    M, K = x.shape
    N = weight.shape[0]
    if M > config.block_m:
        raise ValueError(f"fp8_gemm_small_m: {M} rows > block_m={config.block_m}")
    if group_k is not None and input_scale is None and config.block_k != group_k:
        raise ValueError(f"block_k={config.block_k} must equal the activation group of {group_k} columns")
    if group_k is not None and group_k % config.block_k:
        raise ValueError(f"block_k={config.block_k} must divide the weight block of {group_k} columns")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    act = 2 if input_scale is not None else (0 if group_k is None else 1)
    ws_n, ws_k = _weight_scale_strides(weight_scale)
    _fp8_gemm_small_m_kernel[(triton.cdiv(N, config.block_n),)](
        x, weight, weight_scale, input_scale if input_scale is not None else weight_scale,
        bias if bias is not None else y, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0), ws_n, ws_k,
        ACT=act, GROUP_N=group_n, GROUP_K=group_k or config.block_k, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        PRE_K=min(triton.next_power_of_2(K), 4096 // config.block_m), FP8_MAX=FP8_MAX, EPS=EPS,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y



def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group_n: int, group_k: int | None,
             config: GemmConfig, input_scale: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """``fp8_gemm_small_m`` for one row on the CUDA cores."""
    M, K = x.shape
    N = weight.shape[0]
    if M != 1:
        raise ValueError(f"fp8_gemv: one row, not {M}")
    if group_k is not None and input_scale is None and config.block_k != group_k:
        raise ValueError(f"block_k={config.block_k} must equal the activation group of {group_k} columns")
    if group_k is not None and group_k % config.block_k:
        raise ValueError(f"block_k={config.block_k} must divide the weight block of {group_k} columns")
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    act = 2 if input_scale is not None else (0 if group_k is None else 1)
    ws_n, ws_k = _weight_scale_strides(weight_scale)
    _fp8_gemv_kernel[(triton.cdiv(N, config.block_n),)](
        x, weight, weight_scale, input_scale if input_scale is not None else weight_scale,
        bias if bias is not None else y, y, N, K, weight.stride(0), ws_n, ws_k,
        ACT=act, GROUP_N=group_n, GROUP_K=group_k or config.block_k, HAS_BIAS=bias is not None,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, PRE_K=min(triton.next_power_of_2(K), 4096),
        STAGES=config.num_stages, UNROLL=config.unroll, FP8_MAX=FP8_MAX, EPS=EPS, num_warps=config.num_warps,
    )
    return y
