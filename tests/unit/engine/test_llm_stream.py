"""LLM.generate_stream: many streams at once, some cut short, one refused, and every engine
call (add, abort, step) made from one thread, never the event loop's."""
from __future__ import annotations

import asyncio
import threading

import pytest
from tandem.engine import SamplingParams


def test_concurrent_streams_and_aborts_drive_the_engine_from_one_thread(dense_llm, prompts, monkeypatch):
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = [o.token_ids for o in dense_llm.generate(prompts[:6], sp)]
    eng = dense_llm.engine
    calls: list[tuple[str, int]] = []
    for name in ("add_request", "abort", "step"):
        def traced(*a, _name=name, _fn=getattr(eng, name), **kw):
            calls.append((_name, threading.get_ident()))
            return _fn(*a, **kw)
        monkeypatch.setattr(eng, name, traced)

    async def full(prompt):
        outs = [out async for out in dense_llm.generate_stream(prompt, sp)]
        return outs[-1]

    async def cut(prompt, after):
        stream = dense_llm.generate_stream(prompt, sp)
        for _ in range(after):
            last = await stream.__anext__()
        await stream.aclose()  # aborts the request
        return last

    async def refused():
        with pytest.raises(ValueError, match="top_p"):
            async for _ in dense_llm.generate_stream(prompts[0], SamplingParams(top_p=2.0)):
                pass

    async def run():
        outs = await asyncio.gather(full(prompts[0]), cut(prompts[1], 2), full(prompts[2]), cut(prompts[3], 1),
                                    refused(), full(prompts[4]), cut(prompts[5], 3))
        return threading.get_ident(), outs

    loop_thread, outs = asyncio.run(run())
    full_outs = [outs[0], outs[2], outs[5]]
    assert [o.token_ids for o in full_outs] == [ref[0], ref[2], ref[4]]
    assert all(o.finished and o.finish_reason == "length" for o in full_outs)
    for o, want in ((outs[1], ref[1]), (outs[3], ref[3]), (outs[6], ref[5])):
        assert not o.finished and 0 < len(o.token_ids) < len(want) and o.token_ids == want[:len(o.token_ids)]
    names = {n for n, _ in calls}
    assert names == {"add_request", "abort", "step"}, names
    threads = {t for _, t in calls}
    assert len(threads) == 1 and loop_thread not in threads, calls[:5]
    assert not eng.requests
    monkeypatch.undo()
    assert [o.token_ids for o in dense_llm.generate(prompts[:2], sp)] == ref[:2]  # the driver is gone
