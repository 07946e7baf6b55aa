"""Batch-invariant GEMM (``--enable-deterministic-inference``): ``y = x @ w.T (+ bias)`` whose every
output row is computed by the same arithmetic whatever the number of rows.

cuBLAS picks its kernel, tile and split-K by the shape, the row count ``M`` included, so a row's
reduction order (and its last bits in bf16) depends on the batch it rides in. Here the launch
configuration is a function of the weight's shape ``(N, K)``, its dtype and the device's
multiprocessor count only (``gemm_config``), never of ``M``:

* tiles of ``BLOCK_M x BLOCK_N`` outputs, ``BLOCK_K`` columns a step, accumulated in float32 by
  ``tl.dot`` in the order k = 0, BLOCK_K, 2 BLOCK_K, ...; a row's result does not depend on the
  other rows of its tile (each is its own dot product, the padding rows are zeros);
* ``SPLIT_K`` fixed by ``(N, K)``: when the weight has too few column tiles to fill the device at
  decode sizes, the K range is cut into ``SPLIT_K`` fixed slices whose float32 partial sums are
  added in slice order by a second kernel (``_split_sum_kernel``): no atomics, one order.

Float32 operands (the MoE router, float32 models, the CPU tests) multiply in IEEE precision (no
TF32). An operand in another dtype than the weight's is converted to it in registers (the router:
bf16 activations times a float32 weight, as ``F.linear(x.float(), w)``). The result is rounded to
``out_dtype`` (default: the activations' dtype) once, after the bias.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class InvariantGemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


SPLIT_SUM_BLOCK = 1024
MAX_SPLIT_K = 8


@triton.jit
def _gemm_kernel(A, B, C, Bias, M, N, K, k_per_split,
                 stride_am, stride_bn, stride_cs, stride_cm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    """Program (tile, split): the float32 sum over columns [split * k_per_split, +k_per_split) of one
    output tile; rounded into C (SPLIT False) or stored as a float32 partial at C[split] (SPLIT True)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n  # GROUP_M row tiles walk the column tiles together (L2 reuse of the weight)
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptr = A + offs_m.to(tl.int64)[:, None] * stride_am
    b_ptr = B + offs_n.to(tl.int64)[None, :] * stride_bn
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = k0 + offs_k < k_end
        a = tl.load(a_ptr + (k0 + offs_k)[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + (k0 + offs_k)[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a = a.to(b.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        tl.store(C + split * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], acc,
                 mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty),
                 mask=out_mask)


@triton.jit
def _split_sum_kernel(P, Bias, C, N, stride_ps, stride_pm, stride_cm, SPLIT_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``m``: the SPLIT_K partial sums added in slice order (float32), the bias, one rounding."""
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.load(P + m * stride_pm + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT_K):
        acc += tl.load(P + s * stride_ps + m * stride_pm + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(Bias + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(C + m * stride_cm + offs, acc.to(C.dtype.element_ty), mask=mask)


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@functools.cache
def gemm_config(N: int, K: int, dtype: torch.dtype, num_sms: int, interpreter: bool = False) -> InvariantGemmConfig:
    """The one launch configuration of an ``N x K`` weight on this device: a function of the weight's
    shape and dtype and the multiprocessor count, never of the number of rows (the invariance rests
    on it). Sized for decode batches (up to 64 rows: one row tile; the weight streamed once by
    enough programs to fill the device), which is where the engine spends its steps; prefill runs
    the same tiles, row tile after row tile."""
    if interpreter:  # the Triton interpreter runs programs one after another, in Python: few, wide tiles
        return InvariantGemmConfig(16, min(512, triton.next_power_of_2(N)), min(512, triton.next_power_of_2(K)), 1,
                                   4, 1)
    fp32 = dtype == torch.float32
    block_k = 32 if fp32 else 128
    block_n = 64 if fp32 or N <= 8192 else 128
    tiles = triton.cdiv(N, block_n)
    split = 1
    # Too few column tiles for the device: cut K into fixed slices (each at least two BLOCK_K steps).
    while tiles * split < num_sms and split < MAX_SPLIT_K and K >= 4 * split * block_k:
        split *= 2
    return InvariantGemmConfig(64, block_n, block_k, split, 4, 3 if fp32 else 4)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def config_for(x: torch.Tensor, weight: torch.Tensor) -> InvariantGemmConfig:
    N, K = weight.shape
    return gemm_config(N, K, weight.dtype, _num_sms(weight.device), weight.device.type != "cuda")


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, config: InvariantGemmConfig | None = None) -> torch.Tensor:
    """``x [..., K] @ weight [N, K].T (+ bias [N])`` -> ``[..., N]`` in ``out_dtype`` (default x's dtype),
    batch-invariant. ``config`` overrides ``gemm_config`` (tests, benchmarks)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    M, K = x2.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"matmul: x has {K} columns, the weight {weight.shape[1]}")
    cfg = config or config_for(x2, weight)
    out = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if M:
        split = cfg.split_k
        k_per_split = triton.cdiv(triton.cdiv(K, split), cfg.block_k) * cfg.block_k
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
        target = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else out
        ieee = weight.dtype == torch.float32
        _gemm_kernel[grid](
            x2, weight, target, bias if bias is not None else weight, M, N, K, k_per_split,
            x2.stride(0), weight.stride(0), target.stride(0) if split > 1 else 0, target.stride(-2),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8, SPLIT=split > 1,
            HAS_BIAS=bias is not None, IEEE=ieee, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if split > 1:
            _split_sum_kernel[(M, triton.cdiv(N, SPLIT_SUM_BLOCK))](
                target, bias if bias is not None else target, out, N, target.stride(0), target.stride(1),
                out.stride(0), SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=SPLIT_SUM_BLOCK, num_warps=4,
            )
    return out.view(*shape[:-1], N)


def matmul_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The definition: float32 product of the operands (converted to the weight's dtype), + bias, rounded once."""
    y = x.to(weight.dtype).float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)
