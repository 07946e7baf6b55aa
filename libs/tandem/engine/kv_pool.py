"""Paged KV pool: per layer one contiguous K and one V buffer, a page allocator,
and a small aux (metadata) buffer that KV transfer writes the first token into.

Layout: ``k_buffers[layer]`` and ``v_buffers[layer]`` are ``[num_pages, page_size,
num_kv_heads, head_dim]``; page ``p`` of a layer starts at ``base + p * bytes_per_page``.
The aux buffer is ``[num_aux_slots, AUX_SLOT_BYTES]`` uint8 (rows written by KV transfer).

An FP8 pool (``--kv-cache-dtype fp8_e4m3|fp8_e5m2``, see ``kv_quant``) holds one byte per
element and per-layer dequantization scales: ``kv_scales[layer] = (k_scale, v_scale)``, float32
on the pool's device, read by the attention kernels (so CUDA graphs see later updates too).
"""
from __future__ import annotations

import torch
from tandem.hicache.page_allocator import PageAllocator

from .kv_quant import is_fp8

# One aux slot per pre-allocated request: the metadata row (the first token of each sample, its
# logprob and top logprobs) that prefill writes next to the KV pages. Its format belongs to the KV
# transfer library (tandem.transfer.aux); the engine only owns the slots. 192 bytes hold one sample
# with the API's 20 top logprobs (16 + 8 + 20 * 8 = 184), or up to 22 samples without them.
AUX_SLOT_BYTES = 192


class OutOfPages(RuntimeError):
    """Raised by callers that need pages the pool cannot give (the scheduler never lets it escape)."""


class KVPool(PageAllocator):
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str, num_aux_slots: int = 256, k_scales=None, v_scales=None):
        if num_pages < 1:
            raise ValueError(f"KV pool needs at least one page, got num_pages={num_pages}")
        if (k_scales is not None or v_scales is not None) and not is_fp8(dtype):
            raise ValueError(f"KV scales are for an FP8 pool, not {dtype}")
        super().__init__(num_pages)
        self.num_layers, self.page_size = num_layers, page_size
        self.num_kv_heads, self.head_dim, self.dtype, self.device = num_kv_heads, head_dim, dtype, device
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.kv_scales = torch.ones((num_layers, 2), dtype=torch.float32, device=device)
        if is_fp8(dtype):
            self.set_scales([1.0] * num_layers if k_scales is None else k_scales,
                            [1.0] * num_layers if v_scales is None else v_scales)
        # Aux rows stay on the host: they are tiny and read by Python.
        self.aux = torch.zeros((num_aux_slots, AUX_SLOT_BYTES), dtype=torch.uint8)
        self._free_aux = list(range(num_aux_slots - 1, -1, -1))

    @property
    def is_fp8(self) -> bool:
        return is_fp8(self.dtype)

    def set_scales(self, k_scales, v_scales) -> None:
        """Per-layer dequantization scales of an FP8 pool (updated in place)."""
        if len(k_scales) != self.num_layers or len(v_scales) != self.num_layers:
            raise ValueError(f"{len(k_scales)} K and {len(v_scales)} V scales for {self.num_layers} layers")
        self.kv_scales.copy_(torch.tensor([list(k_scales), list(v_scales)], dtype=torch.float32).T)

    def scales(self) -> tuple[list, list]:
        """(K scales, V scales) per layer as host floats; empty for a pool that is not FP8."""
        if not self.is_fp8:
            return [], []
        host = self.kv_scales.cpu()
        return host[:, 0].tolist(), host[:, 1].tolist()

    # ---- aux slots ---------------------------------------------------------------------
    @property
    def num_free_aux(self) -> int:
        return len(self._free_aux)

    def alloc_aux(self) -> int | None:
        if not self._free_aux:
            return None
        slot = self._free_aux.pop()
        self.aux[slot].zero_()
        return slot

    def free_aux(self, slot: int) -> None:
        self.aux[slot].zero_()
        self._free_aux.append(slot)
