"""HiCacheController: owns the host pool, the storage tier and the copy stream; moves pages
and counts what moved. Callers (the tier-aware radix cache) decide which pages move when.

On CUDA, copies run on a dedicated stream: a backup first waits for the compute stream (the
KV must be written); a load-back records an event per layer, and the next forward pass waits
for layer i's event right before layer i (``take_layer_ready``), so the copy of later layers
overlaps the compute of earlier ones; ``join`` then orders everything after on the compute
stream behind the copies. Host buffers are pinned there. On CPU the copies are synchronous.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import HiCacheSettings
from .file_storage import FileStorage
from .host_pool import HostKVPool
from .io import device_to_host, host_to_device, raw
from .nixl_storage import NixlStorage
from .prefetch import Prefetcher
from .storage_writer import StorageWriter


@dataclass
class HiCacheCounters:
    """Totals since start (the stats reporter turns them into deltas)."""

    host_hit_tokens: int = 0  # prefix tokens served by load-back from host
    storage_hit_tokens: int = 0  # prefix tokens served from storage
    load_back_tokens: int = 0  # host or storage -> device
    load_back_bytes: int = 0
    load_back_seconds: float = 0.0
    backup_tokens: int = 0  # device -> host
    backup_bytes: int = 0
    evicted_tokens: int = 0  # left the device tier
    storage_write_tokens: int = 0
    storage_write_bytes: int = 0


class HiCacheController:
    def __init__(self, settings: HiCacheSettings, device_pool, host_pages: int, storage_namespace: str):
        self.settings, self.device_pool = settings, device_pool
        dev = device_pool.k_buffers[0].device
        self.cuda = dev.type == "cuda"
        self.host = HostKVPool(device_pool.num_layers, host_pages, device_pool.page_size, device_pool.num_kv_heads,
                               device_pool.head_dim, device_pool.dtype, settings.mem_layout, pin_memory=self.cuda)
        storage_cls = {"file": FileStorage, "nixl": NixlStorage}.get(settings.storage_backend)
        self.storage = storage_cls(settings.storage_dir, storage_namespace) if storage_cls else None
        self.prefetcher = (Prefetcher(self.fetch, settings.prefetch_policy, settings.prefetch_timeout_s)
                           if self.storage is not None else None)
        self.writer = (StorageWriter(self.storage.put, self._count_storage_write)
                       if self.storage is not None else None)
        self.copy_stream = torch.cuda.Stream(device=dev) if self.cuda else None
        self._layer_events: list | None = None  # per-layer events of the latest load-back (CUDA)
        self.counters = HiCacheCounters()
        self.page_size = device_pool.page_size
        self.page_shape = (2, device_pool.num_layers, device_pool.page_size, device_pool.num_kv_heads,
                           device_pool.head_dim)

    # ---- device <-> host -------------------------------------------------------------------
    def backup(self, device_pages: list[int]) -> list[int] | None:
        """Copy device pages to newly allocated host pages; None when the host pool is full."""
        host_pages = self.host.alloc(len(device_pages))
        if host_pages is None:
            return None
        if self.copy_stream is not None:
            self.copy_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.copy_stream):
                device_to_host(self.settings.io_backend, self.device_pool, self.host, device_pages, host_pages)
        else:
            device_to_host(self.settings.io_backend, self.device_pool, self.host, device_pages, host_pages)
        c = self.counters
        c.backup_tokens += len(device_pages) * self.page_size
        c.backup_bytes += len(device_pages) * self.host.bytes_per_page
        return host_pages

    def load_back(self, host_pages: list[int], device_pages: list[int]) -> None:
        """Copy host pages into device pages (the next forward pass sees them)."""
        t0 = time.perf_counter()
        if self.copy_stream is not None:
            events = [torch.cuda.Event() for _ in range(self.device_pool.num_layers)]
            self.copy_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.copy_stream):
                host_to_device(self.settings.io_backend, self.host, self.device_pool, host_pages, device_pages,
                               layer_done=lambda i: events[i].record(self.copy_stream))
            # Copy-stream order: layer i of this load done implies every earlier load done.
            self._layer_events = events
        else:
            host_to_device(self.settings.io_backend, self.host, self.device_pool, host_pages, device_pages)
        self._count_load(len(host_pages), time.perf_counter() - t0)

    def take_layer_ready(self):
        """For the next forward pass: ``ready(i)`` makes the compute stream wait for layer i of
        the pending load-backs; None when nothing is pending (always on CPU)."""
        events, self._layer_events = self._layer_events, None
        if events is None:
            return None
        stream = torch.cuda.current_stream()
        return lambda i: stream.wait_event(events[i])

    def join(self) -> None:
        """Order all later compute-stream work after every copy issued so far (no host wait)."""
        if self.copy_stream is not None:
            torch.cuda.current_stream().wait_stream(self.copy_stream)

    def _count_load(self, n_pages: int, seconds: float) -> None:
        c = self.counters
        c.load_back_tokens += n_pages * self.page_size
        c.load_back_bytes += n_pages * self.host.bytes_per_page
        c.load_back_seconds += seconds

    # ---- storage ---------------------------------------------------------------------------
    def store(self, key: int, tokens, host_page: int) -> None:
        """Queue a host page's write to storage under its block hash (no-op without storage)."""
        if self.writer is not None:
            self.writer.submit(key, tokens, self.host.page_data(host_page).clone())

    def _count_storage_write(self, nbytes: int) -> None:
        """On the writer thread, after a page was written (0 bytes: it was there already)."""
        if nbytes:
            self.counters.storage_write_tokens += self.page_size
            self.counters.storage_write_bytes += nbytes

    def flush_storage(self) -> None:
        """Wait for every queued storage write (tests, benchmarks, shutdown)."""
        if self.writer is not None:
            self.writer.flush()

    def fetch(self, key: int, tokens) -> torch.Tensor | None:
        """A page's ``[2, layers, page_size, heads, dim]`` data from storage, or None (miss).
        Runs on the prefetch thread."""
        return self.storage.get(key, tokens, self.page_shape, self.host.dtype)

    def prefetched(self, chain: list) -> list | None:
        """Storage pages of chain ([(key, tokens)]) ready now, or None while the prefetch policy
        says to wait (see ``prefetch``)."""
        if self.prefetcher is None:
            return []
        return self.prefetcher.poll(chain, self.storage.exists)

    def wait_prefetch(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for a storage read that admission waits on (False at once if none)."""
        return self.prefetcher is not None and self.prefetcher.wait(timeout_s)

    @property
    def storage_corrupt_pages(self) -> int:
        return self.storage.num_corrupt if self.storage is not None else 0

    def load_from_storage(self, pages_data: list[torch.Tensor], device_pages: list[int]) -> None:
        """Copy pages fetched from storage into device pages."""
        t0 = time.perf_counter()
        self.join()  # the compute stream writes these pages: after any copy still in flight
        staged = torch.stack([raw(p) for p in pages_data]).to(self.device_pool.k_buffers[0].device)
        idx = torch.tensor(device_pages, dtype=torch.int64, device=staged.device)
        for layer in range(self.device_pool.num_layers):
            raw(self.device_pool.k_buffers[layer]).index_copy_(0, idx, staged[:, 0, layer])
            raw(self.device_pool.v_buffers[layer]).index_copy_(0, idx, staged[:, 1, layer])
        self._count_load(len(device_pages), time.perf_counter() - t0)
