"""Fused MoE experts: the routed (and folded shared) experts of a layer in two or three kernels,
no host sync, computing ``tandem.engine.moe_math``'s ``expert_rows`` (+ ``combine``).

The ``N = T * KS`` (token, entry) pairs come from the routing kernel with their local slot
(``slots [T, KS]``; the slot count = not on this rank) and weight. Two schedules:

* ``tokens`` (decode, small T): one program per (entry, column tile) for the up projection,
  SiLU-and-mul in its epilogue (``act [N, inter]``); one program per (token, column tile) for the
  down projection that walks the token's KS entries **in order**, applies each routing weight and
  sums them: the combine is fused, in a fixed order, without atomics. The grid runs all entries
  of one column tile together, so an expert hit by several tokens is read from HBM once and
  then from L2. No alignment step.
* ``blocks`` (larger T): entries grouped by slot and padded to ``BLOCK_M`` (``moe_align``); one
  program per (block, column tile) multiplies ``BLOCK_M`` rows by one expert's weights with
  ``tl.dot``, SiLU-and-mul fused into the up projection, the weight into the down projection
  (rows ``[N, H]``); a combine kernel sums each token's rows in order (float32, rounded once).

Both are deterministic (fixed reduction order, no atomics): a row's result does not depend on
which other rows share its block. With expert parallelism (``combine=False``) the rows of every
entry come back (zero where the slot is elsewhere) for the all-reduce, and ``combine`` runs after.

Rounding follows the torch path: each GEMM's output is rounded to the model dtype, SiLU-and-mul
as ``F.silu(gate) * up``, the weight (in the model dtype) applied and rounded again.

Launch configurations come from ``configs/fused_moe_<device>.json`` (written by
``benchmarks/tune_fused_moe.py`` on that device) by shape and the nearest tuned batch size;
without one, ``default_config``.
"""
from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

from . import moe_align

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


# ---------------------------------------------------------------------------------- tokens
@triton.jit
def _silu_and_mul(acc_g, acc_u, dtype: tl.constexpr):
    """SiLU(gate) * up from float32 GEMM results, rounded as ``F.silu(gate) * up`` on ``dtype`` values."""
    g = acc_g.to(dtype).to(tl.float32)
    u = acc_u.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return (act * u).to(dtype)


@triton.jit
def _up_tokens_kernel(X, W13, Act, Slots, H, inter, stride_x, stride_we, stride_wn, stride_act,
                      KS: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.program_id(0)
    n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(Slots + e)
    if slot < NUM_SLOTS:
        dtype = Act.dtype.element_ty
        t = e // KS
        n_mask = n_offs < inter
        w_base = W13 + slot.to(tl.int64) * stride_we
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < H
            xk = tl.load(X + t.to(tl.int64) * stride_x + k, mask=k_mask, other=0.0).to(tl.float32)
            m = n_mask[:, None] & k_mask[None, :]
            wg = tl.load(w_base + n_offs[:, None] * stride_wn + k[None, :], mask=m, other=0.0).to(tl.float32)
            wu = tl.load(w_base + (inter + n_offs)[:, None] * stride_wn + k[None, :], mask=m, other=0.0).to(tl.float32)
            acc_g += wg * xk[None, :]
            acc_u += wu * xk[None, :]
        act = _silu_and_mul(tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1), dtype)
        tl.store(Act + e.to(tl.int64) * stride_act + n_offs, act, mask=n_mask)


@triton.jit
def _down_tokens_kernel(Act, W2, Out, Slots, Weights, H, inter, stride_act, stride_we, stride_wn, stride_out,
                        KS: tl.constexpr, NUM_SLOTS: tl.constexpr, FUSE_COMBINE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """FUSE_COMBINE: program (token, tile) sums the token's KS entries in order into Out [T, H];
    else program (entry, tile) writes the entry's weighted row (zero when not here) into Out [N, H]."""
    pid = tl.program_id(0)
    n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < H
    dtype = Out.dtype.element_ty
    total = tl.zeros([BLOCK_N], tl.float32)
    for j in range(KS if FUSE_COMBINE else 1):
        e = pid * KS + j if FUSE_COMBINE else pid
        slot = tl.load(Slots + e)
        if slot < NUM_SLOTS:
            w_base = W2 + slot.to(tl.int64) * stride_we
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for k0 in range(0, inter, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_mask = k < inter
                a = tl.load(Act + e.to(tl.int64) * stride_act + k, mask=k_mask, other=0.0).to(tl.float32)
                w = tl.load(w_base + n_offs[:, None] * stride_wn + k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                            other=0.0).to(tl.float32)
                acc += w * a[None, :]
            r = tl.sum(acc, axis=1).to(dtype).to(tl.float32)
            wt = tl.load(Weights + e).to(dtype).to(tl.float32)
            total += (r * wt).to(dtype).to(tl.float32)
    tl.store(Out + pid.to(tl.int64) * stride_out + n_offs, total.to(dtype), mask=n_mask)


# ---------------------------------------------------------------------------------- blocks
@triton.jit
def _up_blocks_kernel(X, W13, Act, SortedIds, BlockSlot, num_entries, H, inter, stride_x, stride_we, stride_wn,
                      stride_act, KS: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.load(BlockSlot + pid_m)
    if slot < NUM_SLOTS:
        dtype = Act.dtype.element_ty
        entries = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        m_mask = entries < num_entries
        rows = (entries // KS).to(tl.int64)
        n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n_offs < inter
        w_base = W13 + slot.to(tl.int64) * stride_we
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < H
            a = tl.load(X + rows[:, None] * stride_x + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            bm = k_mask[:, None] & n_mask[None, :]
            bg = tl.load(w_base + n_offs[None, :] * stride_wn + k[:, None], mask=bm, other=0.0)
            bu = tl.load(w_base + (inter + n_offs)[None, :] * stride_wn + k[:, None], mask=bm, other=0.0)
            if IEEE:
                acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")
                acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(a, bg, acc_g)
                acc_u = tl.dot(a, bu, acc_u)
        tl.store(Act + entries.to(tl.int64)[:, None] * stride_act + n_offs[None, :], _silu_and_mul(acc_g, acc_u, dtype),
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_blocks_kernel(Act, W2, Rows, SortedIds, BlockSlot, Weights, num_entries, H, inter, stride_act, stride_we,
                        stride_wn, stride_rows, NUM_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.load(BlockSlot + pid_m)
    if slot < NUM_SLOTS:
        dtype = Rows.dtype.element_ty
        entries = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        m_mask = entries < num_entries
        e64 = entries.to(tl.int64)
        n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n_offs < H
        w_base = W2 + slot.to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < inter
            a = tl.load(Act + e64[:, None] * stride_act + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_base + n_offs[None, :] * stride_wn + k[:, None], mask=k_mask[:, None] & n_mask[None, :],
                        other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        wt = tl.load(Weights + entries, mask=m_mask, other=0.0).to(dtype).to(tl.float32)
        out = (acc.to(dtype).to(tl.float32) * wt[:, None]).to(dtype)
        tl.store(Rows + e64[:, None] * stride_rows + n_offs[None, :], out, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _combine_kernel(Rows, Out, H, stride_rows, stride_out, KS: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    acc = tl.zeros([BLOCK], tl.float32)
    for j in range(KS):
        acc += tl.load(Rows + (t * KS + j).to(tl.int64) * stride_rows + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + t.to(tl.int64) * stride_out + offs, acc.to(Out.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------- configs
def default_config(T: int, KS: int, H: int, inter: int, interpreter: bool = False) -> dict:
    """Untuned launch parameters: the token schedule for decode-sized batches. Under the Triton
    interpreter (CPU tests) every program costs the same, so few, large tiles."""
    if interpreter:
        up = {"BLOCK_N": min(128, triton.next_power_of_2(inter)), "BLOCK_K": min(256, triton.next_power_of_2(H)),
              "num_warps": 4, "num_stages": 1}
        down = {"BLOCK_N": min(128, triton.next_power_of_2(H)), "BLOCK_K": min(256, triton.next_power_of_2(inter)),
                "num_warps": 4, "num_stages": 1}
        if T <= 8:
            return {"mode": "tokens", "up": up, "down": down}
        return {"mode": "blocks", "BLOCK_M": 16, "up": dict(up, BLOCK_K=64), "down": dict(down, BLOCK_K=64)}
    if T <= 8:
        return {"mode": "tokens", "up": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
                "down": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}}
    block_m = 16 if T <= 64 else 32 if T <= 256 else 64
    return {"mode": "blocks", "BLOCK_M": block_m,
            "up": {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
            "down": {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}}


def shape_key(KS: int, H: int, inter: int, dtype: torch.dtype) -> str:
    return f"KS{KS}_H{H}_I{inter}_{str(dtype).replace('torch.', '')}"


def device_key(device: torch.device) -> str:
    return _device_key(device.type, device.index)


@functools.cache
def _device_key(kind: str, index: int | None) -> str:
    if kind != "cuda":
        return kind
    return torch.cuda.get_device_name(index).replace(" ", "_")


def config_path(dev_key: str) -> str:
    return os.path.join(CONFIG_DIR, f"fused_moe_{dev_key}.json")


@functools.cache
def _tuned(dev_key: str) -> dict:
    path = config_path(dev_key)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)["configs"]


def get_config(T: int, KS: int, H: int, inter: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The tuned configuration for this shape at the nearest tuned batch size at or above ``T``;
    ``default_config`` for an untuned shape or a batch larger than any tuned (prefill)."""
    table = _tuned(device_key(device)).get(shape_key(KS, H, inter, dtype))
    at = min((int(b) for b in table or {} if int(b) >= T), default=None)
    if at is None:
        return default_config(T, KS, H, inter, interpreter=device.type == "cpu")
    return table[str(at)]


# ---------------------------------------------------------------------------------- entry points
def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                  combine: bool = True, config: dict | None = None) -> torch.Tensor:
    """x [T, H]; w13 [S, 2I, H]; w2 [S, H, inter]; slots [T, KS] int32 (S = not here); weights [T, KS] float32.

    Returns the combined output ``[T, H]`` (``combine``), else every entry's weighted row
    ``[T, KS, H]`` (zero where the slot is not here)."""
    T, KS = slots.shape
    num_slots, two_i, H = w13.shape
    inter = two_i // 2
    n = T * KS
    dev = x.device
    cfg = config or get_config(T, KS, H, inter, x.dtype, dev)
    slots = slots.reshape(-1)
    weights = weights.reshape(-1)
    ieee = x.dtype == torch.float32
    if cfg["mode"] == "tokens":
        act = torch.empty((n, inter), dtype=x.dtype, device=dev)
        up, down = cfg["up"], cfg["down"]
        if n:
            _up_tokens_kernel[(n, triton.cdiv(inter, up["BLOCK_N"]))](
                x, w13, act, slots, H, inter, x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
                KS=KS, NUM_SLOTS=num_slots, BLOCK_N=up["BLOCK_N"], BLOCK_K=up["BLOCK_K"],
                num_warps=up["num_warps"], num_stages=up["num_stages"])
        # "split_down": one program per (entry, tile) and the combine kernel after (more programs
        # for the down projection of few tokens); else the token's entries are summed in the kernel.
        fuse = combine and not cfg.get("split_down", False)
        out = torch.empty((T, H) if fuse else (n, H), dtype=x.dtype, device=dev)
        if out.shape[0]:
            _down_tokens_kernel[(out.shape[0], triton.cdiv(H, down["BLOCK_N"]))](
                act, w2, out, slots, weights, H, inter, act.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
                KS=KS, NUM_SLOTS=num_slots, FUSE_COMBINE=fuse, BLOCK_N=down["BLOCK_N"],
                BLOCK_K=down["BLOCK_K"], num_warps=down["num_warps"], num_stages=down["num_stages"])
        if fuse:
            return out
        rows = out.view(T, KS, H)
        return combine_rows(rows) if combine else rows
    block_m = cfg["BLOCK_M"]
    sorted_ids, block_slot = moe_align.align(slots, num_slots, block_m)
    num_blocks = block_slot.shape[0]
    act = torch.empty((n, inter), dtype=x.dtype, device=dev)
    up, down = cfg["up"], cfg["down"]
    if num_blocks:
        _up_blocks_kernel[(num_blocks, triton.cdiv(inter, up["BLOCK_N"]))](
            x, w13, act, sorted_ids, block_slot, n, H, inter, x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
            KS=KS, NUM_SLOTS=num_slots, BLOCK_M=block_m, BLOCK_N=up["BLOCK_N"], BLOCK_K=up["BLOCK_K"], IEEE=ieee,
            num_warps=up["num_warps"], num_stages=up["num_stages"])
    # Rows of entries that are not here stay zero (expert parallelism reduces them).
    rows = torch.zeros((n, H), dtype=x.dtype, device=dev)
    if num_blocks:
        _down_blocks_kernel[(num_blocks, triton.cdiv(H, down["BLOCK_N"]))](
            act, w2, rows, sorted_ids, block_slot, weights, n, H, inter, act.stride(0), w2.stride(0), w2.stride(1),
            rows.stride(0), NUM_SLOTS=num_slots, BLOCK_M=block_m, BLOCK_N=down["BLOCK_N"], BLOCK_K=down["BLOCK_K"],
            IEEE=ieee, num_warps=down["num_warps"], num_stages=down["num_stages"])
    rows = rows.view(T, KS, H)
    return combine_rows(rows) if combine else rows


COMBINE_BLOCK = 1024


def combine_rows(rows: torch.Tensor) -> torch.Tensor:
    """[T, KS, H] -> [T, H]: each token's rows summed in order (float32), rounded once."""
    T, KS, H = rows.shape
    rows2 = rows.reshape(T * KS, H)
    out = torch.empty((T, H), dtype=rows.dtype, device=rows.device)
    if T:
        _combine_kernel[(T, triton.cdiv(H, COMBINE_BLOCK))](rows2, out, H, rows2.stride(0), out.stride(0), KS=KS,
                                                           BLOCK=COMBINE_BLOCK, num_warps=4)
    return out
