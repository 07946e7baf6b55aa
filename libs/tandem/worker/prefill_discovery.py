"""Decode's view of the prefill workers registered in etcd (--prefill-discovery etcd).

Workers with role "prefill" serving this model feed ``RemotePrefill.set_addresses`` from a
watcher thread, so prefill workers can be added and removed (scaled) while decode serves.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence

from tandem.routing.discovery import ClientTls, EtcdWatcher

log = logging.getLogger(__name__)


class PrefillDiscovery:
    def __init__(self, set_addresses: Callable[[Sequence[str]], None], endpoint: str, prefix: str,
                 model: str, tls: ClientTls | None = None) -> None:
        self.set_addresses = set_addresses
        self.model = model
        self.synced = threading.Event()
        self._watcher = EtcdWatcher(endpoint, prefix, self.on_change, tls=tls)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, name="prefill-discovery", daemon=True)

    def on_change(self, infos) -> None:
        """The watcher's callback with every registered worker (``WorkerInfo`` by id)."""
        prefills = sorted((i for i in infos.values() if i.role == "prefill" and i.model in ("", self.model)),
                          key=lambda i: i.worker_id)
        self.set_addresses([i.address for i in prefills])
        self.synced.set()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._watcher.run())
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            self._loop.close()

    def start(self, wait_s: float = 10.0) -> None:
        """Start watching; wait up to ``wait_s`` for the first view (etcd may not be up yet)."""
        self._thread.start()
        if not self.synced.wait(wait_s):
            log.warning("prefill discovery: no answer from etcd in %.0fs; prefill workers join once it answers",
                        wait_s)

    def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # the loop already ended
                pass
        self._thread.join(5)
