"""Fused MoE: the routed experts of a layer as two grouped GEMMs, with no host sync.

The ``T * k`` (token, choice) entries are grouped by the physical expert slot that EPLB's
placement picked for them, each group padded to ``BLOCK_M`` (``align_by_expert``, torch
ops with static shapes: a CUDA graph can hold it). One program per (block of BLOCK_M
entries, tile of output columns) multiplies its rows by its block's expert weights:

* GEMM 1: ``x[token] @ w13[slot].T`` -> ``[T * k, 2 * inter]`` (rows read by token, written by entry);
* SiLU-and-mul (``activation.silu_and_mul``);
* GEMM 2: ``act[entry] @ w2[slot].T * weight[entry]`` -> ``[T * k, hidden]``.

Entries whose slot lives on another expert-parallel rank (id ``num_slots``) are left out:
their output rows stay zero, as in the torch path (``MoE.expert_outputs``). Rounding
follows the torch path: each GEMM's output is rounded to the model dtype, then the routing
weight (also in the model dtype) is applied and rounded again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 64


def align_by_expert(slot_ids: torch.Tensor, num_slots: int, block_m: int = BLOCK_M):
    """slot_ids [E] int64 in [0, num_slots] (num_slots = not here). Returns (sorted_ids
    [P] entry index or E = padding, block_slot [P / block_m] slot or num_slots = nothing to do),
    with P = E + num_slots * (block_m - 1) rounded up to block_m: a static bound."""
    n = slot_ids.shape[0]
    dev = slot_ids.device
    max_padded = -(-(n + num_slots * (block_m - 1)) // block_m) * block_m
    # Not torch.bincount: on CUDA it reads the maximum back to size its output (a host sync,
    # which a CUDA graph capture forbids).
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, slot_ids, torch.ones_like(slot_ids))[:num_slots]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(slot_ids, stable=True)
    slot_sorted = slot_ids[order]
    valid = slot_sorted < num_slots
    slot_c = slot_sorted.clamp(max=num_slots - 1)
    rank = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[slot_c]
    dest = torch.where(valid, (padded_end - padded)[slot_c] + rank, max_padded)  # max_padded: a dump slot
    sorted_ids = torch.full((max_padded + 1,), n, dtype=torch.int64, device=dev)
    sorted_ids.scatter_(0, dest, order)
    block_starts = torch.arange(0, max_padded, block_m, device=dev)
    block_slot = torch.searchsorted(padded_end, block_starts, right=True)
    return sorted_ids[:max_padded], block_slot


@triton.jit
def _moe_gemm_kernel(
    A, B, C, SortedIds, BlockSlot, Weights,
    N, K, num_entries,
    stride_am, stride_be, stride_bn, stride_cm,
    ROWS_PER_TOKEN: tl.constexpr, MUL_WEIGHT: tl.constexpr, NUM_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(BlockSlot + pid_m)
    if slot < NUM_SLOTS:
        dtype = C.dtype.element_ty
        entries = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        mask_m = entries < num_entries
        a_rows = (entries // ROWS_PER_TOKEN).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b_base = B + slot.to(tl.int64) * stride_be
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(A + a_rows[:, None] * stride_am + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            b = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :],
                        other=0.0)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        out = acc.to(dtype)
        if MUL_WEIGHT:
            w = tl.load(Weights + entries, mask=mask_m, other=0.0).to(dtype).to(tl.float32)
            out = (out.to(tl.float32) * w[:, None]).to(dtype)
        tl.store(C + entries.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], out,
                 mask=mask_m[:, None] & mask_n[None, :])


def moe_gemm(a: torch.Tensor, w: torch.Tensor, sorted_ids: torch.Tensor, block_slot: torch.Tensor,
             num_entries: int, rows_per_token: int, out: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """out[entry] = a[entry // rows_per_token] @ w[slot(entry)].T (* weights[entry]) for every entry
    listed in sorted_ids; w is [num_slots, N, K]."""
    num_slots, N, K = w.shape
    grid = (block_slot.shape[0], triton.cdiv(N, BLOCK_N))
    _moe_gemm_kernel[grid](
        a, w, out, sorted_ids, block_slot, weights if weights is not None else out,
        N, K, num_entries, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        ROWS_PER_TOKEN=rows_per_token, MUL_WEIGHT=weights is not None, NUM_SLOTS=num_slots,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, IEEE=a.dtype == torch.float32, num_warps=4,
    )


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, slot_ids: torch.Tensor,
                  weights: torch.Tensor, silu_and_mul) -> torch.Tensor:
    """x [T, H]; w13 [S, 2I, H]; w2 [S, H, I]; slot_ids [T, k] local slot per entry (S = not here);
    weights [T, k]. Returns the weighted expert output of every entry, [T, k, H] (zero if not here)."""
    T, k = slot_ids.shape
    n = T * k
    sorted_ids, block_slot = align_by_expert(slot_ids.reshape(-1), w13.shape[0])
    inter = torch.empty((n, w13.shape[1]), dtype=x.dtype, device=x.device)
    moe_gemm(x, w13, sorted_ids, block_slot, n, k, inter)
    act = silu_and_mul(inter)
    out = torch.zeros((n, w2.shape[1]), dtype=x.dtype, device=x.device)
    moe_gemm(act, w2, sorted_ids, block_slot, n, 1, out, weights.reshape(-1))
    return out.view(T, k, -1)
