"""Writes pages to the storage tier on background threads, so a backup never waits for disk.

The writer reads the page where it lies (the pinned host pool): the caller keeps that host
page from being freed or reused until the page's future is done. Nothing here blocks the
caller: the number of writes waiting is bounded by the host pool, whose pages they hold. A
failed write (disk full, ...) is logged and counted, never raised into the engine: the page
simply is not in storage (its future's result is -1).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)


class StorageWriter:
    def __init__(self, write: Callable[..., int], threads: int = 1):
        self.write = write
        self.num_failed = 0
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hicache-storage-write")

    def submit(self, key: int, parent: int | None, tokens: tuple, chunks: list) -> Future:
        """Write a page; the future's result is the bytes written (0: it was there), or -1."""
        return self._threads.submit(self._write, key, parent, tokens, chunks)

    def _write(self, key: int, parent: int | None, tokens: tuple, chunks: list) -> int:
        try:
            return self.write(key, parent, tokens, chunks)
        except OSError as e:
            self.num_failed += 1
            log.warning("hicache storage: writing page %016x failed: %s", key, e)
            return -1

    def close(self) -> None:
        """Finish the writes submitted so far."""
        self._threads.shutdown(wait=True)
