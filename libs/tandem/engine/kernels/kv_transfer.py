"""HiCache page transfer between the device KV pool and the host KV pool, all layers per launch.

The idea of SGLang's ``transfer_kv_all_layer`` / ``transfer_kv_per_layer``: the GPU's own
threads read and write the pinned host pool (mapped into the device's address space), so a
set of N scattered pages moves in one launch instead of ``2 x layers x runs`` DMA copies, and
nothing is staged or gathered on the host. Program ``(i, j)`` moves page pair i's chunk of
(K/V, layer) j: ``page_size x heads x head_dim`` contiguous elements on both sides.

* device side: per layer one K and one V buffer (``KVPool``), addressed as one base pointer
  plus a table of per-buffer offsets in 16-byte units (the compiler then knows each chunk is
  16-byte aligned and issues 128-bit loads and stores);
* host side: one buffer, either layout, addressed by its page / K-V / layer strides
  (``HostKVPool``).

Elements move as 32-bit words where the chunk allows (16- or 8-bit otherwise): any KV dtype,
FP8 included. ``TritonCopier`` is the ``kernel`` io backend on CUDA; its reference is
``tandem.hicache.io.IndexedCopier`` (one indexed copy per layer and K/V), which the tests
compare it with under the Triton interpreter, and the CPU engine uses.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from tandem.hicache.io import IndexedCopier, PageMove

_ALIGN_BYTES = 16
_WORD = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


@triton.jit
def _kv_transfer_kernel(Dev, DevOffsets, Host, DevPages, HostPages, layer_start, num_layers_here, chunk,
                        host_page_stride, host_kv_stride, host_layer_stride,
                        NUM_LAYERS: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr, TO_HOST: tl.constexpr):
    i = tl.program_id(0)
    j = tl.program_id(1)
    kv = j // num_layers_here
    layer = layer_start + j % num_layers_here
    dev_page = tl.load(DevPages + i)
    host_page = tl.load(HostPages + i)
    dev = Dev + tl.load(DevOffsets + kv * NUM_LAYERS + layer) * ALIGN + dev_page * chunk
    host = Host + host_page * host_page_stride + kv.to(tl.int64) * host_kv_stride + layer.to(tl.int64) * host_layer_stride
    for start in range(0, chunk, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < chunk
        if TO_HOST:
            tl.store(host + offs, tl.load(dev + offs, mask=mask), mask=mask)
        else:
            tl.store(dev + offs, tl.load(host + offs, mask=mask), mask=mask)


def _words(t: torch.Tensor, word: int) -> torch.Tensor:
    """A contiguous tensor's memory as a flat tensor of ``word``-byte integers."""
    return t.reshape(-1).view(torch.uint8).view(_WORD[word])


class TritonCopier:
    """The ``kernel`` io backend: ``to_host`` moves pages of every layer in one launch,
    ``to_device`` one layer's (the controller records an event after each layer)."""

    def __init__(self, device_pool, host_pool, block_words: int = 2048, num_warps: int = 4):
        item = device_pool.dtype.itemsize
        if host_pool.dtype.itemsize != item:
            raise ValueError(f"host pool dtype {host_pool.dtype} != device pool dtype {device_pool.dtype}")
        chunk_bytes = host_pool.chunk * item
        bufs = list(device_pool.k_buffers) + list(device_pool.v_buffers)
        base = min(bufs, key=lambda b: b.data_ptr())
        deltas = [b.data_ptr() - base.data_ptr() for b in bufs]
        aligned = math.gcd(chunk_bytes, base.data_ptr(), host_pool.buffer.data_ptr(), *deltas)
        word = next(w for w in (4, 2, 1) if aligned % w == 0)
        unit = _ALIGN_BYTES if aligned % _ALIGN_BYTES == 0 else word
        self.device = base.device
        self.num_layers = device_pool.num_layers
        self.dev_base = _words(base, word)
        self.dev_offsets = torch.tensor([d // unit for d in deltas], dtype=torch.int64, device=self.device)
        self.align = unit // word
        self.host_words = _words(host_pool.buffer, word)
        self.chunk = chunk_bytes // word
        # Every host stride is a multiple of a chunk, so of a word.
        self.strides = tuple(s * item // word for s in (host_pool.page_stride, host_pool.kv_stride,
                                                        host_pool.layer_stride))
        self.block = min(block_words, triton.next_power_of_2(self.chunk))
        self.num_warps = num_warps

    def _launch(self, move: PageMove, layer_start: int, num_layers: int, to_host: bool) -> None:
        if not len(move):
            return
        dev_idx, host_idx = move.index(self.device)
        grid = (len(move), 2 * num_layers)
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            _kv_transfer_kernel[grid](
                self.dev_base, self.dev_offsets, self.host_words, dev_idx, host_idx, layer_start, num_layers,
                self.chunk, *self.strides, NUM_LAYERS=self.num_layers, ALIGN=self.align, BLOCK=self.block,
                TO_HOST=to_host, num_warps=self.num_warps)

    def to_host(self, move: PageMove) -> None:
        self._launch(move, 0, self.num_layers, to_host=True)

    def to_device(self, move: PageMove, layer: int) -> None:
        self._launch(move, layer, 1, to_host=False)


kv_transfer_ref = IndexedCopier
