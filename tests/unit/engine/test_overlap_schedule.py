"""Overlap scheduling: step N+1 is scheduled and launched before step N's tokens are read back
(placeholders in ``output_ids``, resolved on the device by the next forward pass). Outputs must be
those of the engine that waits for every step (``--disable-overlap-schedule``): tokens, logprobs,
finish reasons, stop strings, cancels, retraction under a small pool, penalties and grammars."""
from __future__ import annotations

import pytest
from tandem.engine import SamplingParams
from tandem.engine.request import Status


def sampling_mix(prompts: list[str]) -> list[SamplingParams]:
    """A batch that exercises every path of the sampler and of the stop checks."""
    kinds = [
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.8, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, logprobs=True, top_logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.7, top_k=5, presence_penalty=0.8, frequency_penalty=0.3,
                       seed=3, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.0, stop=[",,,", " \n"]),  # the demo model says these: stops early
        SamplingParams(max_tokens=7, temperature=1.0, seed=11, min_tokens=3),
    ]
    return [kinds[i % len(kinds)] for i in range(len(prompts))]


def run(llm, prompts, sps):
    return [(o.token_ids, o.logprobs, o.top_logprobs, o.finish_reason, o.text)
            for o in llm.generate(prompts, sps)]


@pytest.fixture(scope="module")
def engines(demo_models, make_llm):
    on = make_llm(demo_models["dense"], disable_radix_cache=False)
    off = make_llm(demo_models["dense"], disable_overlap_schedule=True)
    assert on.engine.overlap_schedule and not off.engine.overlap_schedule
    return on, off


def test_overlap_equals_waiting_for_every_step(engines, prompts):
    on, off = engines
    batch = (prompts * 2)[:12]
    sps = sampling_mix(batch)
    want = run(off, batch, sps)
    assert any(r[3] == "stop" for r in want), "the stop-string request must stop early"
    assert run(on, batch, sps) == want
    assert run(on, batch, sps) == want  # again, with the prefix cache warm


def test_small_pool_retracts_with_tokens_in_flight(demo_models, make_llm, prompts):
    """A pool too small for the batch retracts requests whose next token is still a placeholder."""
    sps = sampling_mix(prompts)
    small_pool = dict(max_total_tokens=160, page_size=4, chunked_prefill_size=64)
    want = run(make_llm(demo_models["dense"], disable_overlap_schedule=True, **small_pool), prompts, sps)
    small = make_llm(demo_models["dense"], **small_pool)
    got = run(small, prompts, sps)
    # Retraction happens at other steps than without overlap, so batches differ and logprobs
    # may differ in float32 rounding; tokens, reasons and texts may not.
    assert [(r[0], r[3], r[4]) for r in got] == [(r[0], r[3], r[4]) for r in want]
    for g, w in zip(got, want):
        assert g[1] == pytest.approx(w[1], abs=1e-4)
    assert small.engine.scheduler.num_retracted > 0


def test_abort_while_a_token_is_in_flight(engines, prompts):
    on, _ = engines
    eng = on.engine
    sp = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    keep, drop = eng.add_request(prompts[0], sp), eng.add_request(prompts[1], sp)
    got = {keep: [], drop: []}
    while not (eng.requests.get(drop) and eng.requests[drop].num_pending):
        for o in eng.step():
            got[o.rid].extend(o.new_token_ids)
    req = eng.requests[drop]
    assert req.output_ids[-1] < 0 and req.status == Status.RUNNING  # a placeholder, not a token
    assert eng.abort(drop)
    assert all(t >= 0 for t in req.output_ids), "the placeholder never reaches the output"
    finals = {}
    while eng.has_work():
        for o in eng.step():
            got[o.rid].extend(o.new_token_ids)
            if o.finished:
                finals[o.rid] = o
    assert finals[drop].finish_reason == "abort" and finals[drop].num_output_tokens == len(got[drop])
    assert finals[keep].finish_reason == "length" and len(got[keep]) == 50
    assert all(t >= 0 for t in got[keep] + got[drop])


def test_grammar_requests_wait_for_their_tokens(engines):
    """A grammar's next mask needs the token just sampled: such steps resolve at once."""
    on, off = engines
    from tandem.engine import StructuredOutput

    sp = SamplingParams(max_tokens=40, temperature=0.0,
                        structured=StructuredOutput("regex", r"(ab|ba){3,6}c"))
    want = run(off, ["hello", "world"], [sp, sp])
    assert run(on, ["hello", "world"], [sp, sp]) == want
    assert all(r[4].endswith("c") for r in want)
