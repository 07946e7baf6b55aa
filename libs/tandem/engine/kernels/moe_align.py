"""Token-to-slot alignment for the blocked MoE GEMMs (SGLang's ``moe_align_block_size``).

The ``N = T * KS`` (token, entry) pairs are grouped by the expert slot that computes them, each
group padded to ``BLOCK_M`` rows, so one GEMM program multiplies ``BLOCK_M`` rows by one expert's
weights. Shapes are static (a CUDA graph holds them): ``P = ceil((N + slots * (BLOCK_M - 1)) /
BLOCK_M) * BLOCK_M`` rows at most, one slot per block of rows.

Outputs: ``sorted_ids [P]`` int32 (entry index; ``N`` = padding row) and ``block_slot [P /
BLOCK_M]`` int32 (the block's slot; ``num_slots`` = nothing to do). Entry ids ``>= num_slots``
(on another EP rank) are left out. Within a slot, entries keep their order (stable), with no
atomics: the result is a function of the input only.

``align`` runs one Triton program (counts, padded offsets, block table, scatter: the whole job in
one kernel, chunk by chunk) up to ``KERNEL_MAX_ENTRIES`` entries, the decode sizes a CUDA graph
captures; larger batches (prefill, eager) take ``align_ref``, the same result from torch ops
spread over the device. ``align_ref`` is also the kernel's reference in the tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KERNEL_MAX_ENTRIES = 4096


def max_padded(n: int, num_slots: int, block_m: int) -> int:
    return -(-(n + num_slots * (block_m - 1)) // block_m) * block_m


@triton.jit
def _align_kernel(Slots, SortedIds, BlockSlot, n, num_rows,
                  NUM_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
                  CHUNK_P: tl.constexpr):
    e_offs = tl.arange(0, BLOCK_E)
    real = e_offs < NUM_SLOTS
    counts = tl.zeros([BLOCK_E], tl.int32)
    for c0 in range(0, n, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(Slots + offs, mask=offs < n, other=NUM_SLOTS)
        onehot = ((ids[:, None] == e_offs[None, :]) & real[None, :]).to(tl.int32)
        counts += tl.sum(onehot, axis=0)
    padded = tl.where(real, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    num_blocks = num_rows // BLOCK_M
    for b0 in range(0, num_blocks, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        start = blocks * BLOCK_M  # a block's slot: how many slots end at or before its first row
        slot = tl.sum(((ends[None, :] <= start[:, None]) & real[None, :]).to(tl.int32), axis=1)
        tl.store(BlockSlot + blocks, tl.where(start < total, slot, NUM_SLOTS), mask=blocks < num_blocks)
    for r0 in range(0, num_rows, CHUNK_P):
        rows = r0 + tl.arange(0, CHUNK_P)
        tl.store(SortedIds + rows, tl.zeros([CHUNK_P], tl.int32) + n, mask=rows < num_rows)
    tl.debug_barrier()  # the padding is written before any entry lands on it
    running = ends - padded  # each slot's next free row
    for c0 in range(0, n, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(Slots + offs, mask=offs < n, other=NUM_SLOTS)
        onehot = ((ids[:, None] == e_offs[None, :]) & real[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - onehot  # same-slot entries earlier in this chunk
        dest = tl.sum(onehot * (before + running[None, :]), axis=1)
        tl.store(SortedIds + dest, offs, mask=(offs < n) & (ids < NUM_SLOTS))
        running += tl.sum(onehot, axis=0)


def align(slots: torch.Tensor, num_slots: int, block_m: int):
    """slots: ``[N]`` int32 slot per entry (``>= num_slots``: not here). Returns (sorted_ids,
    block_slot), both int32; see the module docstring."""
    n = slots.numel()
    if n > KERNEL_MAX_ENTRIES:
        return align_ref(slots, num_slots, block_m)
    rows = max_padded(n, num_slots, block_m)
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=slots.device)
    block_slot = torch.empty(rows // block_m, dtype=torch.int32, device=slots.device)
    block_e = triton.next_power_of_2(num_slots)
    chunk = max(8, 4096 // block_e)
    _align_kernel[(1,)](slots, sorted_ids, block_slot, n, rows, NUM_SLOTS=num_slots, BLOCK_M=block_m,
                        BLOCK_E=block_e, CHUNK=chunk, CHUNK_P=1024, num_warps=4)
    return sorted_ids, block_slot


def align_ref(slots: torch.Tensor, num_slots: int, block_m: int):
    """``align`` from torch ops (graph-safe: no host sync, static shapes)."""
    ids = slots.reshape(-1).long()
    n = ids.shape[0]
    dev = ids.device
    rows = max_padded(n, num_slots, block_m)
    ids = ids.clamp(max=num_slots)
    # Not torch.bincount: on CUDA it reads the maximum back to size its output (a host sync).
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, ids, torch.ones_like(ids))[:num_slots]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(ids, stable=True)
    slot_sorted = ids[order]
    valid = slot_sorted < num_slots
    slot_c = slot_sorted.clamp(max=num_slots - 1)
    rank = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[slot_c]
    dest = torch.where(valid, (padded_end - padded)[slot_c] + rank, rows)  # rows: a dump slot
    sorted_ids = torch.full((rows + 1,), n, dtype=torch.int64, device=dev)
    sorted_ids.scatter_(0, dest, order)
    block_starts = torch.arange(0, rows, block_m, device=dev)
    block_slot = torch.searchsorted(padded_end, block_starts, right=True).clamp(max=num_slots)
    return sorted_ids[:rows].to(torch.int32), block_slot.to(torch.int32)
