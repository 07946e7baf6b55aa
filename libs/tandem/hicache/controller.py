"""HiCacheController: owns the host pool, the storage tier and the copy streams; issues page
moves and reports, when polled, the ones that finished. Callers (the tier-aware radix cache)
decide which pages move when, and keep the pages of a move from being freed or reused until
``poll`` reports it done (each move carries the caller's ``tag`` back).

On CUDA (``CudaCopies``) nothing here makes the host wait for the device:

* a backup (device -> host) runs on the write stream, after the compute stream's work queued
  so far (the KV must be written), and records an event;
* a load-back (host -> device) runs on the load stream, one layer at a time, recording an
  event per layer: the next forward pass waits for layer i's event right before layer i
  (``take_layer_ready``), so the copy of later layers overlaps the compute of earlier ones;
* ``poll`` asks the events (``Event.query``); when a backup is done, its pages' storage
  writes start on the writer threads, straight from the pinned host pages.

Host memory is pinned once, at start. On CPU (``SyncCopies``) copies run at once and are done
when issued.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .config import STORAGE_READ_THREADS, STORAGE_WRITE_THREADS, HiCacheSettings
from .file_storage import FileStorage
from .host_pool import HostKVPool
from .io import CopierFactory, PageMove, default_copier
from .nixl_storage import NixlStorage
from .prefetch import Prefetcher
from .storage_writer import StorageWriter

BACKUP, LOAD, STORE = "backup", "load", "store"  # kinds of finished moves that poll() reports


@dataclass
class HiCacheCounters:
    """Totals since start (the stats reporter turns them into deltas)."""

    host_hit_tokens: int = 0  # prefix tokens served by load-back from host
    storage_hit_tokens: int = 0  # prefix tokens served from storage
    load_back_tokens: int = 0  # host or storage -> device
    load_back_bytes: int = 0
    load_back_seconds: float = 0.0  # host time spent issuing load-backs (the copies run on a stream)
    backup_tokens: int = 0  # device -> host
    backup_bytes: int = 0
    backup_skipped_pages: int = 0  # pages a write policy wanted on host that found no host page
    evicted_tokens: int = 0  # left the device tier
    storage_write_tokens: int = 0
    storage_write_bytes: int = 0


class _Done:
    """A move that was done when issued (CPU)."""

    @staticmethod
    def done() -> bool:
        return True

    @staticmethod
    def wait() -> None:
        pass


DONE = _Done()


class _EventDone:
    def __init__(self, event):
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()


class SyncCopies:
    """CPU: copies run when issued."""

    def backup(self, copy: Callable[[], None]):
        copy()
        return DONE

    def load(self, copy_layer: Callable[[int], None], num_layers: int):
        for layer in range(num_layers):
            copy_layer(layer)
        return DONE, None

    def layer_waits(self, events):
        return None

    def join(self, events) -> None:
        pass

    def synchronize(self) -> None:
        pass


class CudaCopies:
    """CUDA: backups on the write stream, load-backs on the load stream (a load-back never
    queues behind a backup), events for completion."""

    def __init__(self, device):
        self.write_stream = torch.cuda.Stream(device=device)
        self.load_stream = torch.cuda.Stream(device=device)

    def backup(self, copy: Callable[[], None]):
        stream = self.write_stream
        stream.wait_stream(torch.cuda.current_stream(stream.device))  # after the KV is computed
        with torch.cuda.stream(stream):
            copy()
            event = torch.cuda.Event()
            event.record(stream)
        return _EventDone(event)

    def load(self, copy_layer: Callable[[int], None], num_layers: int):
        stream = self.load_stream
        stream.wait_stream(torch.cuda.current_stream(stream.device))  # the pages' last readers first
        events = []
        with torch.cuda.stream(stream):
            for layer in range(num_layers):
                copy_layer(layer)
                events.append(torch.cuda.Event())
                events[-1].record(stream)
        return _EventDone(events[-1]), events

    def layer_waits(self, events):
        stream = torch.cuda.current_stream(self.load_stream.device)
        return lambda i: stream.wait_event(events[i])

    def join(self, events) -> None:
        torch.cuda.current_stream(self.load_stream.device).wait_event(events[-1])

    def synchronize(self) -> None:
        self.write_stream.synchronize()
        self.load_stream.synchronize()


@dataclass
class StoreRequest:
    """A backed-up page to write to storage; ``tag`` comes back with its STORE report."""

    key: int
    parent: int | None
    tokens: tuple
    tag: object


@dataclass
class _Move:
    kind: str
    done: object  # .done() / .wait()
    tag: object
    host_pages: list
    store: list = field(default_factory=list)


class HiCacheController:
    def __init__(self, settings: HiCacheSettings, device_pool, host_pages: int, storage_namespace: str,
                 copier: CopierFactory | None = None):
        self.settings, self.device_pool = settings, device_pool
        dev = device_pool.k_buffers[0].device
        self.cuda = dev.type == "cuda"
        self.host = HostKVPool(device_pool.num_layers, host_pages, device_pool.page_size, device_pool.num_kv_heads,
                               device_pool.head_dim, device_pool.dtype, settings.mem_layout, pin_memory=self.cuda)
        make = copier or (lambda d, h: default_copier(settings.io_backend, d, h))
        self.copier = make(device_pool, self.host)
        self.copies = CudaCopies(dev) if self.cuda else SyncCopies()
        storage_cls = {"file": FileStorage, "nixl": NixlStorage}.get(settings.storage_backend)
        self.storage = (storage_cls(settings.storage_dir, storage_namespace, settings.storage_max_bytes)
                        if storage_cls else None)
        threads = os.cpu_count() or 1
        self.prefetcher = (Prefetcher(self._read_page, settings.prefetch_policy, settings.prefetch_timeout_s,
                                      min(STORAGE_READ_THREADS, threads)) if self.storage is not None else None)
        self.writer = (StorageWriter(self.storage.write, min(STORAGE_WRITE_THREADS, threads))
                       if self.storage is not None else None)
        self.counters = HiCacheCounters()
        self.page_size = device_pool.page_size
        self._moves: list[_Move] = []  # issued, not known to be done
        self._writes: list[tuple[Future, object]] = []  # storage writes running: (future, tag)
        self._finished: list[tuple[str, object]] = []  # reported by the next poll()
        self._layer_events = None  # per-layer events of load-backs no forward pass waited on yet
        self._unjoined = None  # events of the latest load-back, until join()
        if self.cuda:
            self._warm_up()

    def _warm_up(self) -> None:
        """Run every copy shape once at start (free page 0 both sides), so that no request waits
        for a kernel to compile at its first backup or load-back."""
        move = PageMove([0], [0])
        self.copier.to_host(move)
        for layer in range(self.device_pool.num_layers):
            self.copier.to_device(move, layer)
        torch.cuda.synchronize()

    # ---- device <-> host -------------------------------------------------------------------
    def backup(self, device_pages: list[int], host_pages: list[int], tag, store: list[StoreRequest] = ()):
        """Copy device pages into host pages (all layers), then write ``store`` (one request per
        page, or none) to storage. Until poll() reports (BACKUP, tag), the caller keeps both
        sides' pages; until it reports (STORE, request.tag), the host page. Returns the copy's
        completion (``wait()`` blocks until it is done)."""
        move = PageMove(device_pages, host_pages)
        done = self.copies.backup(lambda: self.copier.to_host(move))
        self._moves.append(_Move(BACKUP, done, tag, host_pages, list(store) if self.writer is not None else []))
        c = self.counters
        c.backup_tokens += len(device_pages) * self.page_size
        c.backup_bytes += len(device_pages) * self.host.bytes_per_page
        return done

    def load_back(self, host_pages: list[int], device_pages: list[int], tag) -> None:
        """Copy host pages into device pages, layer by layer; the next forward pass waits for
        each layer's pages (``take_layer_ready``). Until poll() reports (LOAD, tag), the caller
        keeps both sides' pages."""
        t0 = time.perf_counter()
        move = PageMove(device_pages, host_pages)
        done, events = self.copies.load(lambda layer: self.copier.to_device(move, layer), self.device_pool.num_layers)
        if events is not None:
            self._layer_events = self._unjoined = events  # later loads finish after earlier ones (one stream)
        self._moves.append(_Move(LOAD, done, tag, host_pages))
        c = self.counters
        c.load_back_tokens += len(host_pages) * self.page_size
        c.load_back_bytes += len(host_pages) * self.host.bytes_per_page
        c.load_back_seconds += time.perf_counter() - t0

    def take_layer_ready(self):
        """For the next forward pass: ``ready(i)`` makes the compute stream wait for layer i of
        the pending load-backs; None when nothing is pending (always on CPU)."""
        events, self._layer_events = self._layer_events, None
        return self.copies.layer_waits(events) if events is not None else None

    def join(self) -> None:
        """Order all later compute-stream work after every load-back issued so far (no host wait;
        backups are not waited for: their pages stay protected until they are done)."""
        if self._unjoined is not None:
            self.copies.join(self._unjoined)
            self._unjoined = None

    def poll(self) -> list[tuple[str, object]]:
        """Moves finished since the last poll: [(BACKUP | LOAD | STORE, tag)]. Never waits."""
        self._advance()
        out, self._finished = self._finished, []
        return out

    def _advance(self) -> None:
        pending = []
        for m in self._moves:
            if not m.done.done():
                pending.append(m)
                continue
            self._finished.append((m.kind, m.tag))
            for req, hp in zip(m.store, m.host_pages):
                self._writes.append((self.writer.submit(req.key, req.parent, req.tokens, self.host.page_chunks(hp)),
                                     req.tag))
        self._moves = pending
        running = []
        for f, tag in self._writes:
            if not f.done():
                running.append((f, tag))
                continue
            n = f.result()
            if n > 0:
                self.counters.storage_write_tokens += self.page_size
                self.counters.storage_write_bytes += n
            self._finished.append((STORE, tag))
        self._writes = running

    @property
    def busy(self) -> bool:
        """Copies or storage writes not reported finished yet."""
        return bool(self._moves or self._writes or self._finished)

    def synchronize(self) -> None:
        """Wait until every copy issued so far is done (tests, benchmarks, shutdown); the next
        poll reports them."""
        self.copies.synchronize()
        for m in self._moves:
            m.done.wait()
        self._advance()

    def flush_storage(self) -> None:
        """Wait for every copy and every storage write issued so far (its backup included)."""
        self.synchronize()
        for f, _ in self._writes:
            f.result()
        self._advance()

    # ---- storage ---------------------------------------------------------------------------
    def _read_page(self, key: int, parent: int | None, tokens, host_page: int) -> bool:
        """On a reader thread: a stored page into a host page reserved for it."""
        return self.storage.read_into(key, parent, tokens, self.host.page_chunks(host_page))

    def prefetched(self, first: int, chain: Callable[[], list], reserve: Callable[[int], list]) -> list | None:
        """Storage pages of the chain starting with page ``first`` read into host pages so far,
        as [(key, tokens, host page)], or None while the prefetch policy says to wait. The first
        call for a chain starts its read (``chain()``: [(key, parent key, tokens)]) into
        ``reserve(n)`` host pages."""
        if self.prefetcher is None:
            return []
        return self.prefetcher.poll(first, chain, self.storage.exists, reserve)

    def prefetch_step(self) -> list:
        """Once per scheduling step: host pages of dropped storage reads, now free to reuse."""
        if self.prefetcher is None:
            return []
        self.prefetcher.tick()
        return self.prefetcher.reclaim()

    def drain_prefetch(self) -> list:
        """Drop every storage read (waiting for the readers); their host pages, to free."""
        return self.prefetcher.drain() if self.prefetcher is not None else []

    def wait_prefetch(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for a storage read that admission waits on (False at once if none)."""
        return self.prefetcher is not None and self.prefetcher.wait(timeout_s)

    @property
    def storage_corrupt_pages(self) -> int:
        return self.storage.num_corrupt if self.storage is not None else 0
