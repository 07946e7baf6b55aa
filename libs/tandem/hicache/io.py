"""Page copies between the device KV pool and the host pool (``--hicache-io-backend``).

A copier moves a ``PageMove`` (device pages <-> host pages, pairwise) either for every layer at
once (``to_host``: a backup) or one layer at a time (``to_device``: a load-back, so that layer
i of the next forward pass waits only for layer i's pages). It only issues copies: the
controller picks the stream (on CUDA a copy stream, into host memory pinned at start) and
records the events that say when they are done.

* ``direct``: ``copy_`` of each run of consecutive pages (consecutive on both sides and
  contiguous in memory) per layer and K/V: DMA on CUDA, no SM used. A freshly computed prompt
  is one run; a fragmented pool, or the page_first layout (a page's layers are contiguous, a
  layer's pages are not), costs one copy per page per layer and K/V.
* ``kernel``: on CUDA, the Triton transfer kernel (``tandem.engine.kernels.kv_transfer``,
  given to the controller by the engine): one launch per direction moves any set of pages
  over all layers (a load-back: one launch per layer). On CPU, ``IndexedCopier``: one indexed
  copy per layer and K/V (the kernel's reference).

Copies are dtype-agnostic: elements move as integers of the pool's element size.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

IO_BACKENDS = ("direct", "kernel")
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_words(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the element's size (indexed copies work for every dtype)."""
    return t.view(_WORDS[t.element_size()])


@dataclass
class PageMove:
    """device_pages[i] <-> host_pages[i]."""

    device_pages: list
    host_pages: list
    _tensors: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.device_pages)

    def index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(device pages, host pages) as int64 tensors on ``device``, made once per move; on CUDA
        through pinned memory and a non-blocking copy (the host never waits for a stream)."""
        key = str(device)
        if key not in self._tensors:
            both = torch.tensor([self.device_pages, self.host_pages], dtype=torch.int64)
            if torch.device(device).type == "cuda":
                both = both.pin_memory().to(device, non_blocking=True)
            self._tensors[key] = (both[0], both[1])
        return self._tensors[key]


class PageCopier(Protocol):
    def to_host(self, move: PageMove) -> None: ...

    def to_device(self, move: PageMove, layer: int) -> None: ...


def page_runs(move: PageMove, host_contiguous: bool) -> list[tuple[int, int, int]]:
    """(device start, host start, length) of runs of pages consecutive on both sides; length 1
    each where consecutive host pages of a layer are not adjacent in memory."""
    runs: list[list[int]] = []
    for d, h in zip(move.device_pages, move.host_pages):
        last = runs[-1] if runs else None
        if host_contiguous and last is not None and d == last[0] + last[2] and h == last[1] + last[2]:
            last[2] += 1
        else:
            runs.append([d, h, 1])
    return [tuple(r) for r in runs]


class _PoolPair:
    def __init__(self, device_pool, host_pool):
        if device_pool.dtype.itemsize != host_pool.dtype.itemsize:
            raise ValueError(f"host pool dtype {host_pool.dtype} != device pool dtype {device_pool.dtype}")
        self.device_pool, self.host = device_pool, host_pool
        self.device = device_pool.k_buffers[0].device
        self.num_layers = device_pool.num_layers

    def _pairs(self, layer: int):
        """(device buffer, host view) of a layer's K and V, as integer words."""
        return ((as_words(self.device_pool.k_buffers[layer]), as_words(self.host.layer_view(0, layer))),
                (as_words(self.device_pool.v_buffers[layer]), as_words(self.host.layer_view(1, layer))))


class DirectCopier(_PoolPair):
    def __init__(self, device_pool, host_pool):
        super().__init__(device_pool, host_pool)
        self.non_blocking = self.device.type == "cuda"

    def _copy(self, move: PageMove, layers, to_host: bool) -> None:
        runs = page_runs(move, host_contiguous=self.host.page_stride == self.host.chunk)
        for layer in layers:
            for dev, host in self._pairs(layer):
                for d, h, n in runs:
                    src, dst = (dev[d:d + n], host[h:h + n]) if to_host else (host[h:h + n], dev[d:d + n])
                    dst.copy_(src, non_blocking=self.non_blocking)

    def to_host(self, move: PageMove) -> None:
        self._copy(move, range(self.num_layers), to_host=True)

    def to_device(self, move: PageMove, layer: int) -> None:
        self._copy(move, (layer,), to_host=False)


class IndexedCopier(_PoolPair):
    """One indexed copy per layer and K/V; device and host pool on the same device (CPU). It is
    also the reference the Triton transfer kernel is tested against."""

    def _copy(self, move: PageMove, layers, to_host: bool) -> None:
        dev_idx, host_idx = move.index(self.device)
        for layer in layers:
            for dev, host in self._pairs(layer):
                if to_host:
                    host.index_copy_(0, host_idx, dev.index_select(0, dev_idx))
                else:
                    dev.index_copy_(0, dev_idx, host.index_select(0, host_idx))

    def to_host(self, move: PageMove) -> None:
        self._copy(move, range(self.num_layers), to_host=True)

    def to_device(self, move: PageMove, layer: int) -> None:
        self._copy(move, (layer,), to_host=False)


CopierFactory = Callable[[object, object], PageCopier]


def default_copier(backend: str, device_pool, host_pool) -> PageCopier:
    """The copier for a backend without the engine's kernels: ``kernel`` maps to the indexed
    copies (the CPU path; the engine passes the Triton kernel on CUDA)."""
    if backend not in IO_BACKENDS:
        raise ValueError(f"hicache_io_backend={backend!r}: expected one of {', '.join(IO_BACKENDS)}")
    return (DirectCopier if backend == "direct" else IndexedCopier)(device_pool, host_pool)
