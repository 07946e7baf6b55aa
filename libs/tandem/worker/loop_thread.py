"""A daemon thread that runs ``_run()`` until stopped: the engine loop and prefill's transfer
loop are both one."""
from __future__ import annotations

import threading


class LoopThread:
    """Subclasses implement ``_run()``: loop until ``self._stop`` is set, sleeping on
    ``self._wake`` (``wake()`` cuts the sleep short)."""

    def __init__(self, name: str) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        raise NotImplementedError
