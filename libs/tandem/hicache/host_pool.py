"""Host KV pool: the second tier, one buffer pinned once at start when the device is CUDA.

Two layouts (SGLang's names), each one buffer:

* ``layer_first``: ``[2, layers, num_pages, page_size, heads, head_dim]``: per layer a K and a
  V slab shaped like the device pool's, so a run of consecutive pages of one layer is contiguous.
* ``page_first``: ``[num_pages, 2, layers, page_size, heads, head_dim]``: all of a page's K and V
  are contiguous, so a page moves to storage in one piece.

Either way a page of one layer's K or V (a *chunk*: ``page_size x heads x head_dim`` elements)
is contiguous and sits at ``page * page_stride + kv * kv_stride + layer * layer_stride``
elements from the buffer's start: copies and kernels address both layouts with these three
strides. Copies treat elements as bytes of the pool's dtype (FP8 pages stay FP8).

Pinning: ``cudaHostRegister`` on a plain allocation, once (torch's pinned allocator would
round a 40 GiB pool up to 64 GiB); unregistered when the pool is released. Views of the buffer
must not outlive the pool.
"""
from __future__ import annotations

import torch

from .page_allocator import PageAllocator

LAYOUTS = ("layer_first", "page_first")


class HostKVPool(PageAllocator):
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, layout: str = "layer_first", pin_memory: bool = False):
        if layout not in LAYOUTS:
            raise ValueError(f"hicache_mem_layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
        if num_pages < 1:
            raise ValueError(f"host KV pool needs at least one page, got {num_pages}")
        super().__init__(num_pages)
        self.num_layers, self.page_size = num_layers, page_size
        self.num_kv_heads, self.head_dim, self.dtype, self.layout = num_kv_heads, head_dim, dtype, layout
        page_shape = (page_size, num_kv_heads, head_dim)
        self.chunk = page_size * num_kv_heads * head_dim  # elements of one page of one layer's K or V
        if layout == "page_first":
            self.buffer = torch.empty((num_pages, 2, num_layers, *page_shape), dtype=dtype)
            self.page_stride, self.kv_stride, self.layer_stride = 2 * num_layers * self.chunk, num_layers * self.chunk, self.chunk
            self.k_buffers = [self.buffer[:, 0, layer] for layer in range(num_layers)]
            self.v_buffers = [self.buffer[:, 1, layer] for layer in range(num_layers)]
        else:
            self.buffer = torch.empty((2, num_layers, num_pages, *page_shape), dtype=dtype)
            self.page_stride, self.kv_stride, self.layer_stride = self.chunk, num_layers * num_pages * self.chunk, \
                num_pages * self.chunk
            self.k_buffers = [self.buffer[0, layer] for layer in range(num_layers)]
            self.v_buffers = [self.buffer[1, layer] for layer in range(num_layers)]
        self.pinned = False
        if pin_memory:
            self._pin()

    def _pin(self) -> None:
        cudart = torch.cuda.cudart()
        nbytes = self.buffer.numel() * self.buffer.element_size()
        torch.cuda.check_error(cudart.cudaHostRegister(self.buffer.data_ptr(), nbytes, 0))
        self.pinned = True

    def __del__(self):
        if getattr(self, "pinned", False):
            self.pinned = False
            try:
                torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            except Exception:  # interpreter shutdown: the process unmaps everything anyway
                pass

    @property
    def bytes_per_page(self) -> int:
        return 2 * self.num_layers * self.chunk * self.dtype.itemsize

    def layer_view(self, kv: int, layer: int) -> torch.Tensor:
        """Layer ``layer``'s K (kv=0) or V (kv=1) of every page, ``[num_pages, page_size, heads, head_dim]``."""
        return (self.k_buffers if kv == 0 else self.v_buffers)[layer]

    def page_chunks(self, page: int) -> list[torch.Tensor]:
        """A page's bytes as contiguous uint8 tensors in ``[K/V, layer]`` order (what a storage file
        holds): one piece in page_first, ``2 x layers`` in layer_first. Views: reading or
        filling them reads or fills the page."""
        if self.layout == "page_first":
            return [self.buffer[page].reshape(-1).view(torch.uint8)]
        return [self.buffer[kv, layer, page].reshape(-1).view(torch.uint8)
                for kv in range(2) for layer in range(self.num_layers)]

    def page_data(self, page: int) -> torch.Tensor:
        """A page's K and V as one ``[2, layers, page_size, heads, head_dim]`` view (strided in
        layer_first)."""
        if self.layout == "page_first":
            return self.buffer[page]
        return self.buffer[:, :, page]

    def set_page_data(self, page: int, data: torch.Tensor) -> None:
        """Fill a host page from a ``[2, layers, page_size, heads, head_dim]`` tensor."""
        if self.layout == "page_first":
            self.buffer[page].copy_(data)
        else:
            self.buffer[:, :, page].copy_(data)
