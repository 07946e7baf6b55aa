"""The engine's owner: one thread that applies commands and steps the engine.

Nothing else touches the engine. Request handlers, the PD transfer loops, EPLB and the
control plane hand the loop *commands* (``call(fn)`` with ``fn(engine)``, and the typed
wrappers below); the loop applies every queued command between two steps, on its own
thread, in the order they were queued, and resolves each command's Future. Outputs reach
their request's :class:`RequestStream`. Between steps is also where the next work on the
engine loop (overlap scheduling: prepare batch N+1 while the GPU runs batch N) will put
its own bookkeeping, so commands never race a step.

Everything else that rides on the loop thread is a :class:`LoopHook` (one mechanism):
``poll()`` every iteration, ``before_step()`` / ``after_step(stats)`` around each step. A
hook must be quick and must not block on the loop (it runs on it).

A snapshot of the engine's stats is published after every iteration that changed
anything (:attr:`EngineLoop.stats`), so load reports never touch the engine either.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from tandem.engine import EngineCore, EngineStats, ExternalAllocation, HeldForMove, StepOutput
from tandem.sampling import SamplingParams
from tandem.worker.loop_thread import LoopThread

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class EngineInfo:
    """What workers may know about the engine without touching it (fixed at start)."""

    page_size: int
    num_pages: int
    context_length: int
    chunked_prefill_size: int
    device: str
    dtype: object
    vocab_size: int


class LoopHook:
    """Work that rides on the engine loop thread; override what you need."""

    def poll(self) -> None:
        """Every loop iteration, after the commands, whether or not the engine has work."""

    def before_step(self) -> None:
        """Right before each engine step."""

    def after_step(self, stats: EngineStats) -> None:
        """Right after each engine step, with the stats it left."""


@dataclass(frozen=True)
class _StreamEnd:
    error: BaseException


class RequestStream:
    """Outputs of one request, in order, ending with the finished one.

    Iterating blocks; ``poll(timeout)`` returns None when nothing arrived in time (``0``:
    never waits). ``cancel()`` aborts the request in the engine (its pages are freed) and
    ends the stream. ``on_output`` (optional) is called on the loop thread after each output
    is queued, e.g. to wake a poll loop.
    """

    def __init__(self, loop: EngineLoop, rid: str, on_output: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.rid = rid
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._on_output = on_output
        self.finished = False

    def deliver(self, out: StepOutput | _StreamEnd) -> None:
        """Loop thread: queue an output (or the end of the stream)."""
        self._q.put(out)
        if self._on_output is not None:
            self._on_output()

    def poll(self, timeout: float | None = None) -> StepOutput | None:
        if self.finished:
            return None
        try:
            out = self._q.get(timeout=timeout) if timeout != 0 else self._q.get_nowait()
        except queue.Empty:
            return None
        if isinstance(out, _StreamEnd):
            self.finished = True
            raise out.error
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


class EngineLoop(LoopThread):
    def __init__(self, engine: EngineCore, name: str = "engine") -> None:
        super().__init__(f"{name}-loop")
        self.engine = engine  # the loop's alone: hand it commands, never call it
        self.name = name
        self.info = EngineInfo(engine.page_size, engine.pool.num_pages, engine.context_length,
                               engine.chunked_prefill_size, engine.device, engine.dtype,
                               engine.model_config.vocab_size)
        self._streams: dict[str, RequestStream] = {}
        self._streams_lock = threading.Lock()
        self._commands: queue.SimpleQueue[tuple[Callable[[EngineCore], Any], Future]] = queue.SimpleQueue()
        self._hooks: list[LoopHook] = []
        self._stats = engine.stats()
        # The LoRA adapters the engine holds, {name: path} (a snapshot for other threads: GetLoad,
        # ListLoras), replaced after each load/unload; lora_enabled: --enable-lora.
        self.loras: dict[str, str] = engine.list_loras()
        self.lora_enabled = engine.lora is not None
        self.steps = 0
        self._paused = threading.Event()

    def add_hook(self, hook: LoopHook) -> None:
        """Add a hook (before start)."""
        self._hooks.append(hook)

    @property
    def stats(self) -> EngineStats:
        """The engine's stats as of the loop's last iteration that changed anything."""
        return self._stats

    # ---- pausing ---------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop stepping the engine (commands still apply: requests may be added or aborted)
        until ``resume()``. A drain pauses while it aborts every request, so no step runs for
        requests about to leave."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()
        self._wake.set()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    # ---- commands --------------------------------------------------------------------------
    def call(self, fn: Callable[[EngineCore], T]) -> Future[T]:
        """Run ``fn(engine)`` on the loop thread between two steps; its result (or exception)
        resolves the returned Future."""
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError(f"{self.name} loop stopped"))
            return fut
        self._commands.put((fn, fut))
        self._wake.set()
        return fut

    def validate(self, prompt_ids: list[int], sampling: SamplingParams, output_ids: list[int] = (),
                 lora_name: str | None = None) -> None:
        """Raise ValueError if this request could never run here (on the caller's thread:
        it reads only the engine's fixed configuration), UnknownLoraError for an adapter the
        engine does not hold."""
        self.engine.validate_request(prompt_ids, sampling, output_ids, lora_name)

    def validate_embedding(self, inputs: list[list[int]], dimensions: int | None) -> None:
        """Raise ValueError naming the input if this embedding batch could never run here (on the
        caller's thread: it reads only the engine's fixed configuration)."""
        self.engine.validate_embedding(inputs, dimensions)

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, rid: str, mode: str = "normal",
               on_output: Callable[[], None] | None = None, output_ids: list[int] = (),
               lora_name: str | None = None) -> RequestStream:
        """Queue a request; its outputs arrive on the returned stream (a prefill-only request's
        include the pages each chunk made final). Check it first with ``validate``: what the
        engine refuses when it is added ends the stream with that ValueError. Raises ValueError
        at once for an id in use. ``output_ids``: a migrated request's tokens so far
        (``EngineCore.add_request``)."""
        stream = self._open(rid, on_output)

        def add(engine: EngineCore) -> None:
            try:
                engine.add_request(prompt_ids, sampling, rid=rid, mode=mode, output_ids=output_ids,
                                   lora_name=lora_name)
            except BaseException as exc:
                self._close(rid)
                stream.deliver(_StreamEnd(exc))

        self.call(add)
        return stream

    def allocate_external(self, prompt_ids: list[int], sampling: SamplingParams, rid: str,
                          reuse_prefix: bool = False, output_ids: list[int] = (),
                          lora_name: str | None = None) -> Future[ExternalAllocation]:
        """Reserve pages and an aux slot for a prompt whose KV comes from outside (OutOfPages
        when the pool cannot hold it now, or no LoRA slot is free for its adapter); ``reuse_prefix``:
        share what the prefix cache holds; ``output_ids``: a request moved here with its tokens so far."""
        return self.call(lambda engine: engine.allocate_external(prompt_ids, sampling, rid=rid,
                                                                 reuse_prefix=reuse_prefix, output_ids=output_ids,
                                                                 lora_name=lora_name))

    def hold_for_move(self, rids: list[str]) -> Future[dict[str, HeldForMove]]:
        """Stop these requests where they are decoding and keep their pages for other workers to
        fetch (``EngineCore.hold_for_move``), all between the same two steps; the Future gives
        those held (a request not decoding, or finished meanwhile, is left as it is)."""
        def hold(engine: EngineCore) -> dict[str, HeldForMove]:
            held = {}
            for rid in rids:
                try:
                    h = engine.hold_for_move(rid)
                except ValueError:
                    continue
                if h is not None:
                    held[rid] = h
            return held

        return self.call(hold)

    def export_held(self, rid: str, on_output: Callable[[], None] | None = None) -> RequestStream:
        """A request held for a move, as a prefill-only request's stream: one output with its KV's
        pages, final, and its last token (``EngineCore.export_held``); ``release`` or ``abort``
        frees the pages afterwards. An id not held ends the stream with ValueError."""
        stream = RequestStream(self, rid, on_output)

        def export(engine: EngineCore) -> None:
            try:
                stream.deliver(engine.export_held(rid))
            except BaseException as exc:
                stream.deliver(_StreamEnd(exc))

        self.call(export)
        return stream

    def cached_prefix_tokens(self, prompt_ids: list[int], lora_name: str | None = None, timeout: float = 30.0) -> int:
        """Leading tokens of the prompt that the prefix cache holds now (under adapter ``lora_name``)."""
        return self.call(lambda engine: engine.cached_prefix_tokens(prompt_ids, lora_name)).result(timeout)

    def activate_external(self, rid: str, first_token_id: int, logprob: float | None,
                          cached_tokens: int, top: list | None = None) -> Future[RequestStream]:
        """Start decoding a request whose prompt KV was written into its pages from outside
        (``top``: the first token's top logprobs, [(token_id, logprob)]); the Future gives its
        output stream."""
        def activate(engine: EngineCore) -> RequestStream:
            stream = self._open(rid)
            try:
                engine.activate_external(rid, first_token_id, logprob, cached_tokens, top)
            except BaseException:
                self._close(rid)
                raise
            return stream

        return self.call(activate)

    def release(self, rid: str, cache: bool = True) -> Future[None]:
        """Free a finished prefill-only request's pages (into the prefix cache when cache)."""
        return self.call(lambda engine: engine.release(rid, cache=cache))

    def abort(self, rid: str, reason: str = "abort") -> Future[bool]:
        """Stop a request in any state and free its pages."""
        return self.call(lambda engine: engine.abort(rid, reason))

    def subscribe_kv_events(self, fn: Callable[[list], None]) -> None:
        """fn(events) on the loop thread for every prefix-cache change."""
        self.call(lambda engine: engine.subscribe_kv_events(fn))

    @property
    def lora_names(self) -> list[str]:
        return sorted(self.loras)

    def load_lora(self, name: str, path: str) -> Future[dict[str, str]]:
        """Load LoRA adapter ``name`` from ``path`` between two steps; the Future gives every adapter
        held now ({name: path}) or raises LoraAdapterError (LoraExistsError for a name in use)."""
        def load(engine: EngineCore) -> dict[str, str]:
            engine.load_lora(name, path)
            self.loras = engine.list_loras()
            return self.loras

        return self.call(load)

    def unload_lora(self, name: str) -> Future[dict[str, str]]:
        """Unload LoRA adapter ``name``; the Future gives the adapters left, or raises
        UnknownLoraError, or LoraInUseError while requests use it."""
        def unload(engine: EngineCore) -> dict[str, str]:
            engine.unload_lora(name)
            self.loras = engine.list_loras()
            return self.loras

        return self.call(unload)

    def kv_snapshot(self, timeout: float = 30.0) -> list:
        """Every block the prefix cache holds now, as BlockStored events."""
        return self.call(lambda engine: engine.kv_snapshot()).result(timeout)

    @property
    def num_streams(self) -> int:
        with self._streams_lock:
            return len(self._streams)

    def _open(self, rid: str, on_output: Callable[[], None] | None = None) -> RequestStream:
        stream = RequestStream(self, rid, on_output)
        with self._streams_lock:
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in use")
            self._streams[rid] = stream
        return stream

    def _close(self, rid: str) -> None:
        with self._streams_lock:
            self._streams.pop(rid, None)

    # ---- the loop ------------------------------------------------------------------------
    def _apply_commands(self) -> bool:
        applied = False
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return applied
            applied = True
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self.engine))
            except BaseException as exc:
                fut.set_exception(exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            changed = self._apply_commands()
            # A remote-prefilled request's first token leaves now, not after the next forward pass.
            self._deliver(self.engine.take_activated())
            for hook in self._hooks:
                hook.poll()
            if self._paused.is_set() or not self.engine.has_work():
                if changed:
                    self._stats = self.engine.stats()
                self._wake.wait(0.05)
                continue
            for hook in self._hooks:
                hook.before_step()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # keep serving: fail what was in flight, not the process
                log.exception("%s step failed; failing in-flight requests", self.name)
                self._fail_all(exc)
                continue
            self.steps += 1
            self._stats = stats = self.engine.stats()
            for hook in self._hooks:
                hook.after_step(stats)
            self._deliver(outputs)
        self._fail_all(RuntimeError(f"{self.name} loop stopped"))
        self._apply_commands_after_stop()

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            with self._streams_lock:
                stream = self._streams.get(out.rid)
                if out.finished:
                    self._streams.pop(out.rid, None)
            if stream is not None:
                stream.deliver(out)

    def _apply_commands_after_stop(self) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError(f"{self.name} loop stopped"))

    def _fail_all(self, exc: BaseException) -> None:
        with self._streams_lock:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            self.engine.abort(s.rid, "abort")
            s.deliver(_StreamEnd(exc))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
