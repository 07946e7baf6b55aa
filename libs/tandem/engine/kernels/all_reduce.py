"""One-shot all-reduce over peer-to-peer device buffers (the custom all-reduce's kernel).

Every rank owns a *staging buffer* (its input, copied in before the kernel) and a *signal
buffer* (int32 words, zeroed once), and holds pointers to every rank's two buffers (CUDA IPC,
``tandem.engine.custom_all_reduce``). One launch, per program (block) ``b``:

1. start barrier: write this call's value into slot ``[rank]`` of block ``b``'s flags in every
   rank's signal buffer (release, system scope), then wait until every rank's value is in this
   rank's own slots (acquire): every rank's input is staged;
2. read block ``b``'s share of every rank's staging buffer and sum it in float32 **in rank order
   0, 1, ..., world-1**, whatever this rank is: every rank writes bitwise the same result;
3. end barrier, as 1 with the next value: no rank stages its next input while a peer still reads
   this one.

The values come from a per-block counter in this rank's signal buffer (two per call), read and
advanced by the kernel itself, so a launch captured in a CUDA graph counts on at every replay.
The counters move in step on every rank as long as every rank launches the same sequence of
grids (TP ranks run the same batches). Flags are double-buffered by the value's parity (vLLM's
scheme): a rank that leaves a barrier first can write the next barrier's flags without
overwriting ones a slower peer still waits for. A wait gives up after ``max_spin`` polls (a peer
that died must not hang the GPU): the kernel then sets this rank's status word, skips the sum,
and the host reads the failure with ``status``.

Signal buffer layout (int32 words): ``[0, MAX_BLOCKS)`` the per-block counters,
``STATUS_WORD`` the status (0: healthy), ``[FLAGS, FLAGS + 2 * MAX_BLOCKS * MAX_RANKS)`` the
flags ``[parity][block][source rank]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_RANKS = 8
MAX_BLOCKS = 64
STATUS_WORD = MAX_BLOCKS
FLAGS = 2 * MAX_BLOCKS
SIGNAL_WORDS = FLAGS + 2 * MAX_BLOCKS * MAX_RANKS
BLOCK = 1024  # elements per program and step
MAX_GRID = 32  # programs per launch (each loops over its share)
DEFAULT_MAX_SPIN = 1 << 26  # polls before a barrier gives up (tens of seconds on a GPU)

__all__ = ["MAX_RANKS", "SIGNAL_WORDS", "STATUS_WORD", "all_reduce_launch", "flag_index", "grid_size"]


def flag_index(parity: int, block: int, source: int) -> int:
    """Word of the flag that rank ``source`` writes for ``block`` with a value of ``parity``."""
    return FLAGS + (parity * MAX_BLOCKS + block) * MAX_RANKS + source


def grid_size(numel: int) -> int:
    return max(1, min(triton.cdiv(numel, BLOCK), MAX_GRID))


@triton.jit
def _pick(q, p0, p1, p2, p3, p4, p5, p6, p7):
    """Per lane ``q``: the pointer of rank ``q`` (lanes >= the world size are masked by the caller)."""
    return tl.where(q == 0, p0, tl.where(q == 1, p1, tl.where(q == 2, p2, tl.where(q == 3, p3, tl.where(
        q == 4, p4, tl.where(q == 5, p5, tl.where(q == 6, p6, p7)))))))


@triton.jit
def _barrier(me, s0, s1, s2, s3, s4, s5, s6, s7, rank, block, value,
             WORLD: tl.constexpr, MAX_SPIN: tl.constexpr, NUM_BLOCKS: tl.constexpr, NUM_RANKS: tl.constexpr,
             FLAG_BASE: tl.constexpr):
    """Tell every rank this block reached ``value``, wait until every rank told this one; returns
    how many ranks were still missing when the wait gave up (0: all arrived)."""
    q = tl.arange(0, NUM_RANKS)
    live = q < WORLD
    slots = FLAG_BASE + ((value % 2) * NUM_BLOCKS + block) * NUM_RANKS
    peers = _pick(q, s0, s1, s2, s3, s4, s5, s6, s7)
    tl.atomic_xchg(peers + slots + rank, tl.zeros([NUM_RANKS], tl.int32) + value, mask=live,
                   sem="release", scope="sys")
    missing = tl.sum(live.to(tl.int32), 0)
    spins = 0
    while (missing > 0) & (spins < MAX_SPIN):
        seen = tl.atomic_add(me + slots + q, tl.zeros([NUM_RANKS], tl.int32), mask=live, sem="acquire", scope="sys")
        missing = tl.sum((live & (seen != value)).to(tl.int32), 0)
        spins += 1
    tl.debug_barrier()
    return missing


@triton.jit(do_not_specialize=["rank"])
def _one_shot_kernel(out, b0, b1, b2, b3, b4, b5, b6, b7, me, s0, s1, s2, s3, s4, s5, s6, s7, n, rank,
                     WORLD: tl.constexpr, BLOCK_SIZE: tl.constexpr, MAX_SPIN: tl.constexpr,
                     NUM_BLOCKS: tl.constexpr, NUM_RANKS: tl.constexpr, FLAG_BASE: tl.constexpr,
                     STATUS: tl.constexpr):
    block = tl.program_id(0)
    count = tl.load(me + block)  # this block's counter: only this block of this rank touches it
    missing = _barrier(me, s0, s1, s2, s3, s4, s5, s6, s7, rank, block, count + 1,
                       WORLD, MAX_SPIN, NUM_BLOCKS, NUM_RANKS, FLAG_BASE)
    if missing == 0:
        for i in range(block, tl.cdiv(n, BLOCK_SIZE), tl.num_programs(0)):
            offs = i * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
            m = offs < n
            acc = tl.load(b0 + offs, mask=m, other=0.0).to(tl.float32)  # rank order, on every rank
            for q in tl.static_range(1, WORLD):
                acc += tl.load(_pick(q, b0, b1, b2, b3, b4, b5, b6, b7) + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(out + offs, acc.to(out.dtype.element_ty), mask=m)
    tl.debug_barrier()  # every read of the peers' buffers is done before the end barrier's release
    missing += _barrier(me, s0, s1, s2, s3, s4, s5, s6, s7, rank, block, count + 2,
                        WORLD, MAX_SPIN, NUM_BLOCKS, NUM_RANKS, FLAG_BASE)
    tl.store(me + block, count + 2)
    if missing > 0:
        tl.atomic_xchg(me + STATUS, 1, sem="relaxed", scope="gpu")


def all_reduce_launch(out: torch.Tensor, staged: list[torch.Tensor], signals: list[torch.Tensor], rank: int,
                      max_spin: int = DEFAULT_MAX_SPIN) -> torch.Tensor:
    """Sum ``staged`` (every rank's staging buffer viewed as ``out``'s dtype, ``out.numel()`` of it
    holding that rank's input) into ``out`` (contiguous) in rank order; ``signals`` every rank's
    signal buffer (``SIGNAL_WORDS`` int32). Returns ``out``."""
    world = len(staged)
    if not 1 <= world <= MAX_RANKS or len(signals) != world:
        raise ValueError(f"{world} staging and {len(signals)} signal buffers: need the same number, 1..{MAX_RANKS}")
    n = out.numel()
    bufs = staged + [staged[0]] * (MAX_RANKS - world)  # unused pointer arguments
    sigs = signals + [signals[0]] * (MAX_RANKS - world)
    _one_shot_kernel[(grid_size(n),)](out, *bufs, signals[rank], *sigs, n, rank, WORLD=world, BLOCK_SIZE=BLOCK,
                                      MAX_SPIN=max_spin, NUM_BLOCKS=MAX_BLOCKS, NUM_RANKS=MAX_RANKS,
                                      FLAG_BASE=FLAGS, STATUS=STATUS_WORD, num_warps=4)
    return out
