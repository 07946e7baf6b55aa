"""Writes pages to the storage tier on a background thread, so a backup never waits for disk.

The caller hands over a copy of the page (its host page may be reused at once). At most
``max_pending`` writes wait; beyond that ``submit`` waits for the oldest (backpressure). A
failed write (disk full, ...) is logged and counted, never raised into the engine: the page
simply is not in storage. Threads of ``concurrent.futures`` are joined at interpreter exit,
so writes still queued then are finished.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)


class StorageWriter:
    def __init__(self, put: Callable[[int, tuple, object], int], on_written: Callable[[int], None],
                 max_pending: int = 1024):
        self.put, self.on_written, self.max_pending = put, on_written, max_pending
        self.num_failed = 0
        self._pending: deque[Future] = deque()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hicache-storage-write")

    def submit(self, key: int, tokens: tuple, data) -> None:
        while self._pending and self._pending[0].done():
            self._pending.popleft()
        if len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        self._pending.append(self._thread.submit(self._write, key, tokens, data))

    def _write(self, key: int, tokens: tuple, data) -> None:
        try:
            n = self.put(key, tokens, data)
        except OSError as e:
            self.num_failed += 1
            log.warning("hicache storage: writing page %016x failed: %s", key, e)
            return
        self.on_written(n)

    def flush(self) -> None:
        """Wait until every submitted write has finished."""
        while self._pending:
            self._pending.popleft().result()
