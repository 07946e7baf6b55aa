"""Offline API in the style of ``vllm.LLM`` / ``sglang.Engine``.

    from tandem.engine import LLM, SamplingParams
    llm = LLM("models/tandem-demo-dense", page_size=16)
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason

Keyword arguments are tandem.config.EngineConfig fields.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .engine import EngineCore
from .sampling_params import SamplingParams


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


class LLM:
    def __init__(self, model_path: str, **config):
        self.engine = EngineCore(model_path, **config)
        self.tokenizer = self.engine.tokenizer
        self._queues: dict = {}
        self._loop_task: asyncio.Task | None = None

    def _text(self, out: RequestOutput, sp: SamplingParams, stop_pos: int | None) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        if stop_pos is not None:
            text = text[:stop_pos]
        return text

    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; results in prompt order."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        if single:
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sps = [sampling_params or SamplingParams()] * len(prompts)
        else:
            sps = list(sampling_params)
            if len(sps) != len(prompts):
                raise ValueError(f"got {len(sps)} sampling params for {len(prompts)} prompts")
        eng = self.engine
        rids, results, stop_pos = [], {}, {}
        try:
            for p, sp in zip(prompts, sps):
                rid = eng.add_request(p, sp)
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

    # ---- async streaming -----------------------------------------------------------------
    async def generate_stream(self, prompt, sampling_params: SamplingParams | None = None
                              ) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput after every step that gave this request tokens (deltas in
        ``token_ids``/``text`` are cumulative: each yield is the whole output so far)."""
        sp = sampling_params or SamplingParams()
        eng = self.engine
        rid = eng.add_request(prompt, sp)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._drive())
        out = RequestOutput(rid, list(eng.requests[rid].prompt_ids))
        try:
            while True:
                o = await q.get()
                out.add(o)
                out.text = self._text(out, sp, o.stop_text_pos)
                yield out
                if o.finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not out.finished:
                eng.abort(rid)

    async def _drive(self):
        eng = self.engine
        while self._queues:
            outs = await asyncio.to_thread(eng.step)
            for o in outs:
                q = self._queues.get(o.rid)
                if q is not None:
                    q.put_nowait(o)
            if not outs and not eng.has_work():
                await asyncio.sleep(0.001)
