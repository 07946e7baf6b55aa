"""The engine's step loop on its own thread, and per-request output streams.

gRPC handler threads submit work and read a `RequestStream`; only the loop thread
steps the engine. The profiler and step hooks ride on the same thread so what they
see is exactly what the engine did.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from tandem.engine.engine import EngineCore, StepOutput
from tandem.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_END = object()


class RequestStream:
    """Outputs of one request, in order, ending with the finished one.

    Iterating blocks; `poll(timeout)` returns None when nothing arrived in time.
    `cancel()` aborts the request in the engine (its pages are freed) and ends the stream.
    """

    def __init__(self, loop: EngineLoop, rid: str) -> None:
        self.loop = loop
        self.rid = rid
        self._q: queue.Queue = queue.Queue()
        self.finished = False

    def _put(self, out) -> None:
        self._q.put(out)

    def poll(self, timeout: float | None = None) -> StepOutput | None:
        if self.finished:
            return None
        try:
            out = self._q.get(timeout=timeout)
        except queue.Empty:
            return None
        if out is _END:
            self.finished = True
            return None
        if isinstance(out, BaseException):
            self.finished = True
            raise out
        if out.finished:
            self.finished = True
        return out

    def __iter__(self) -> Iterator[StepOutput]:
        while not self.finished:
            out = self.poll()
            if out is not None:
                yield out

    def cancel(self, reason: str = "abort") -> None:
        if not self.finished:
            self.loop.abort(self.rid, reason)


class EngineLoop:
    def __init__(self, engine: EngineCore, name: str = "engine") -> None:
        self.engine = engine
        self.name = name
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle_hooks: list[Callable[[], None]] = []
        self._before_step_hooks: list[Callable[[], None]] = []
        self._after_step_hooks: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name=f"{name}-loop", daemon=True)
        self.steps = 0

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def add_poll_hook(self, fn: Callable[[], None]) -> None:
        """fn() on the loop thread before every step and when idle (e.g. the profiler's start)."""
        self._idle_hooks.append(fn)

    def add_before_step_hook(self, fn: Callable[[], None]) -> None:
        """fn() on the loop thread right before every engine step (never while idle)."""
        self._before_step_hooks.append(fn)

    def add_after_step_hook(self, fn: Callable[[], None]) -> None:
        """fn() on the loop thread after every engine step."""
        self._after_step_hooks.append(fn)

    def wake(self) -> None:
        self._wake.set()

    # ---- requests ------------------------------------------------------------------------
    def _open(self, rid: str) -> RequestStream:
        stream = RequestStream(self, rid)
        with self._lock:
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in use")
            self._streams[rid] = stream
        return stream

    def _close(self, rid: str) -> None:
        with self._lock:
            self._streams.pop(rid, None)

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, rid: str, mode: str = "normal",
               on_prefill_done=None, on_chunk_done=None) -> RequestStream:
        """Queue a request; its outputs arrive on the returned stream."""
        stream = self._open(rid)
        try:
            self.engine.add_request(prompt_ids, sampling, rid=rid, mode=mode, on_prefill_done=on_prefill_done,
                                    on_chunk_done=on_chunk_done)
        except BaseException:
            self._close(rid)
            raise
        self._wake.set()
        return stream

    def activate_external(self, rid: str, first_token_id: int, logprob: float | None,
                          cached_tokens: int, top: list | None = None) -> RequestStream:
        """Start decoding a request whose prompt KV was written into its pages from outside
        (``top``: the first token's top logprobs, [(token_id, logprob)])."""
        stream = self._open(rid)
        try:
            self.engine.activate_external(rid, first_token_id, logprob, cached_tokens, top)
        except BaseException:
            self._close(rid)
            raise
        self._wake.set()
        return stream

    def abort(self, rid: str, reason: str = "abort") -> bool:
        found = self.engine.abort(rid, reason)
        self._wake.set()
        return found

    @property
    def num_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    # ---- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            for hook in self._idle_hooks:
                hook()
            if not self.engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            for hook in self._before_step_hooks:
                hook()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # keep serving: fail what was in flight, not the process
                log.exception("%s step failed; failing in-flight requests", self.name)
                self._fail_all(exc)
                continue
            self.steps += 1
            for hook in self._after_step_hooks:
                hook()
            for out in outputs:
                with self._lock:
                    stream = self._streams.get(out.rid)
                    if out.finished:
                        self._streams.pop(out.rid, None)
                if stream is not None:
                    stream._put(out)
        self._fail_all(RuntimeError("engine loop stopped"))

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            self.engine.abort(s.rid, "abort")
            s._put(exc)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
