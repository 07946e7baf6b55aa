"""Offline API in the style of ``vllm.LLM`` / ``sglang.Engine``.

    from tandem.engine import LLM, SamplingParams
    llm = LLM("models/tandem-demo-dense", page_size=16)
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason

Keyword arguments are tandem.config.EngineConfig fields.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from tandem.sampling import SamplingParams

from .engine import EngineCore

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.05  # the driver's longest sleep while its streams wait for nothing


@dataclass
class RequestOutput:
    rid: str
    prompt_token_ids: list
    token_ids: list = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    cached_tokens: int = 0
    finished: bool = False
    prompt_logprobs: list = field(default_factory=list)  # [(logprob, top)] of prompt tokens 1..L-1

    def add(self, o) -> None:
        """Append one step's output (a StepOutput of this request)."""
        self.token_ids.extend(o.new_token_ids)
        self.logprobs.extend(o.new_logprobs)
        self.top_logprobs.extend(o.new_top_logprobs)
        self.prompt_logprobs.extend(o.prompt_logprobs)
        self.cached_tokens = o.cached_tokens
        if o.finished:
            self.finished, self.finish_reason = True, o.finish_reason


class _StreamDriver:
    """The one thread that drives the engine for ``generate_stream``: callers hand it commands
    (as the workers' EngineLoop does), which it applies between two steps; each step's outputs
    go to their stream's asyncio queue. It runs while it has streams or commands, then ends
    (``LLM`` starts a new one when needed)."""

    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards the decision to end against a new command
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # the thread's own
        self.running = True  # False once the thread decided to end: it takes no more commands
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)  # started by the first command

    @property
    def has_streams(self) -> bool:
        return bool(self._streams)

    # ---- commands (any thread) -------------------------------------------------------------
    def submit(self, prompt, sp: SamplingParams, loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> Future | None:
        """Add a request whose outputs go to ``q`` on ``loop``; the Future gives (rid, prompt ids)."""
        def add():
            rid = self.engine.add_request(prompt, sp)
            self._streams[rid] = (loop, q)
            return rid, list(self.engine.requests[rid].prompt_ids)

        return self._call(add)

    def abort(self, rid: str) -> Future | None:
        def stop():
            self._streams.pop(rid, None)
            return self.engine.abort(rid)

        return self._call(stop)

    def _call(self, fn: Callable[[], object]) -> Future | None:
        """Queue ``fn`` for the thread; its Future, or None when this driver has ended."""
        with self._lock:
            if not self.running:
                return None
            fut: Future = Future()
            self._commands.put((fn, fut))
            if self._thread.ident is None:
                self._thread.start()
        self._wake.set()
        return fut

    def join(self) -> None:
        if self._thread.ident is not None:
            self._thread.join()

    # ---- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while True:
            self._wake.clear()
            with self._lock:
                if self._commands.empty() and not self._streams:
                    self.running = False
                    return
            while not self._commands.empty():
                fn, fut = self._commands.get()
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)
            if not self._streams:
                continue
            if not eng.has_work():
                self._wake.wait(_IDLE_WAIT_S)
                continue
            try:
                outputs = eng.step()
            except Exception as exc:  # fail the streams, not the thread
                log.exception("engine step failed; failing the open streams")
                for rid in list(self._streams):
                    eng.abort(rid)
                    self._deliver(rid, exc)
                continue
            for o in outputs:
                self._deliver(o.rid, o)

    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is None:
            return
        if isinstance(item, BaseException) or item.finished:
            del self._streams[rid]
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody reads this stream any more
            self._streams.pop(rid, None)
            self.engine.abort(rid)


class LLM:
    def __init__(self, model_path: str | None = None, engine: EngineCore | None = None, **config):
        """Build the engine of ``model_path`` with ``config``, or drive ``engine`` built elsewhere (a
        parallel leader's: ``tandem.engine.parallel.start_parallel(config).engine``)."""
        if (engine is None) == (model_path is None):
            raise ValueError("LLM needs a model_path or an engine (not both)")
        if engine is not None and config:
            raise ValueError(f"LLM(engine=...) takes no engine options, got {sorted(config)}")
        self.engine = engine if engine is not None else EngineCore(model_path, **config)
        self.tokenizer = self.engine.tokenizer
        self._driver: _StreamDriver | None = None
        self._driver_lock = threading.Lock()

    def _text(self, out: RequestOutput, sp: SamplingParams, stop_pos: int | None) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(out.token_ids, skip_special_tokens=sp.skip_special_tokens)
        if stop_pos is not None:
            text = text[:stop_pos]
        return text

    def generate(self, prompts, sampling_params=None, lora_name=None) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion on this thread; results in
        prompt order. Not while ``generate_stream`` requests are running. ``lora_name``: the LoRA
        adapter of every prompt, or a list with one per prompt (None: the base model)."""
        self._await_driver()
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        if single:
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sps = [sampling_params or SamplingParams()] * len(prompts)
        else:
            sps = list(sampling_params)
            if len(sps) != len(prompts):
                raise ValueError(f"got {len(sps)} sampling params for {len(prompts)} prompts")
        loras = list(lora_name) if isinstance(lora_name, (list, tuple)) else [lora_name] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} lora names for {len(prompts)} prompts")
        eng = self.engine
        rids, results, stop_pos = [], {}, {}
        try:
            for p, sp, lora in zip(prompts, sps, loras):
                rid = eng.add_request(p, sp, lora_name=lora)
                rids.append(rid)
                results[rid] = RequestOutput(rid, list(eng.requests[rid].prompt_ids))
            pending = len(rids)
            while pending:
                for o in eng.step():
                    r = results.get(o.rid)
                    if r is None:
                        continue
                    r.add(o)
                    if o.finished:
                        stop_pos[o.rid] = o.stop_text_pos
                        pending -= 1
        except BaseException:
            for rid in rids:
                eng.abort(rid)
            eng.step()  # drain the abort outputs
            raise
        outs = [results[rid] for rid in rids]
        for o, sp in zip(outs, sps):
            o.text = self._text(o, sp, stop_pos.get(o.rid))
        return outs

    def _await_driver(self) -> None:
        """Wait until no stream driver runs (one without streams ends at once)."""
        while True:
            with self._driver_lock:
                d = self._driver
                if d is None:
                    return
                if d.has_streams:
                    raise RuntimeError("generate() while generate_stream() requests are running: use one at a time")
            d.join()
            with self._driver_lock:
                if self._driver is d:
                    self._driver = None

    def _on_driver(self, command: Callable[[_StreamDriver], Future | None]) -> Future:
        """Hand a command to the running stream driver (a new one when none runs)."""
        with self._driver_lock:
            while True:
                if self._driver is None or not self._driver.running:
                    self._driver = _StreamDriver(self.engine)
                fut = command(self._driver)
                if fut is not None:
                    return fut

    # ---- async streaming -----------------------------------------------------------------
    async def generate_stream(self, prompt, sampling_params: SamplingParams | None = None
                              ) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput after every step that gave this request tokens (deltas in
        ``token_ids``/``text`` are cumulative: each yield is the whole output so far).

        One driver thread makes every engine call (requests, steps, aborts), however many
        streams run at once; closing the iterator early aborts the request."""
        sp = sampling_params or SamplingParams()
        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        rid, prompt_ids = await asyncio.wrap_future(self._on_driver(lambda d: d.submit(prompt, sp, loop, q)))
        out = RequestOutput(rid, prompt_ids)
        try:
            while True:
                o = await q.get()
                if isinstance(o, BaseException):
                    raise o
                out.add(o)
                out.text = self._text(out, sp, o.stop_text_pos)
                yield out
                if o.finished:
                    return
        finally:
            if not out.finished:
                await asyncio.wrap_future(self._on_driver(lambda d: d.abort(rid)))
