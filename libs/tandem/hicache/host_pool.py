"""Host KV pool: the second tier, in pinned memory when the device is CUDA.

Two layouts (SGLang's names):

* ``layer_first``: per layer one K and one V buffer ``[num_pages, page_size, heads, head_dim]``,
  like the device pool: a page is 2 x layers separate slices.
* ``page_first``: one buffer ``[num_pages, 2, layers, page_size, heads, head_dim]``: all of a
  page's K and V are contiguous, so a page moves (to the device or to storage) in one copy.
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
        if layout == "page_first":
            self.buffer = torch.zeros((num_pages, 2, num_layers, *page_shape), dtype=dtype, pin_memory=pin_memory)
            self.k_buffers = [self.buffer[:, 0, layer] for layer in range(num_layers)]
            self.v_buffers = [self.buffer[:, 1, layer] for layer in range(num_layers)]
        else:
            self.buffer = None
            self.k_buffers = [torch.zeros((num_pages, *page_shape), dtype=dtype, pin_memory=pin_memory)
                              for _ in range(num_layers)]
            self.v_buffers = [torch.zeros((num_pages, *page_shape), dtype=dtype, pin_memory=pin_memory)
                              for _ in range(num_layers)]

    @property
    def bytes_per_page(self) -> int:
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def page_data(self, page: int) -> torch.Tensor:
        """A page's K and V as one contiguous ``[2, layers, page_size, heads, head_dim]`` tensor
        (a view in page_first, a gathered copy in layer_first)."""
        if self.buffer is not None:
            return self.buffer[page]
        return torch.stack([torch.stack([k[page] for k in self.k_buffers]),
                            torch.stack([v[page] for v in self.v_buffers])])

    def set_page_data(self, page: int, data: torch.Tensor) -> None:
        """Fill a host page from a ``[2, layers, page_size, heads, head_dim]`` tensor."""
        if self.buffer is not None:
            self.buffer[page].copy_(data)
            return
        for layer in range(self.num_layers):
            self.k_buffers[layer][page].copy_(data[0, layer])
            self.v_buffers[layer][page].copy_(data[1, layer])
