"""A remote-prefilled request's first token (delivered by KV transfer in its aux slot) leaves the
engine loop as soon as the request is activated, not after the next forward pass (a decode step
of the whole batch would otherwise sit in the disaggregated TTFT)."""
from __future__ import annotations

import os

import pytest
from tandem.engine import EngineCore
from tandem.sampling import SamplingParams
from tandem.worker.engine_loop import EngineLoop

from deploy.demo_models import build_all

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def loop():
    path = build_all(os.path.join(REPO, "models"), log=lambda *_: None)["tandem-demo-dense"]
    loop = EngineLoop(EngineCore(path, device="cpu", dtype="float32", max_total_tokens=1024), "activation-test")
    loop.start()
    yield loop
    loop.stop()


def test_first_token_of_an_activated_request_needs_no_step(loop):
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    alloc = loop.allocate_external(list(range(20, 60)), sp, "remote-1").result(30)
    loop.pause()  # no step runs from here on: only commands apply
    try:
        steps = loop.steps
        stream = loop.activate_external(alloc.rid, first_token_id=77, logprob=None, cached_tokens=0).result(30)
        first = stream.poll(timeout=30)
        assert first is not None and first.new_token_ids == [77]
        assert loop.steps == steps
    finally:
        loop.resume()
    rest = []
    while not stream.finished:
        out = stream.poll(timeout=30)
        assert out is not None
        rest += out.new_token_ids
    assert len(rest) == 2  # the other two tokens come from decode steps
