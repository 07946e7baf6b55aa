"""Batching, chunking, prefix cache, retraction and abort give the same tokens and leak no page."""
from __future__ import annotations

import pytest
from tandem.engine import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(dense_llm, prompts):
    """The first six prompts, each alone, radix cache flushed between runs."""
    outs = []
    for p in prompts[:6]:
        dense_llm.engine.flush_cache()
        outs.append(dense_llm.generate([p], GREEDY)[0].token_ids)
    dense_llm.engine.flush_cache()
    return outs


def test_batch_of_16_equals_alone(dense_llm, prompts, reference):
    outs = dense_llm.generate(prompts, GREEDY)
    assert len(prompts) == 16
    assert [o.token_ids for o in outs[:6]] == reference


def test_prefix_cache_hit_equals_miss(dense_llm, prompts, reference):
    eng = dense_llm.engine
    eng.flush_cache()
    first = dense_llm.generate(prompts[:4], GREEDY)
    second = dense_llm.generate(prompts[:4], GREEDY)
    assert [o.token_ids for o in first] == [o.token_ids for o in second] == reference[:4]
    assert all(o.cached_tokens == 0 for o in first)
    # every prompt with at least one full page (16 tokens) beyond its last token hits
    long_ones = [o for o in second if len(o.prompt_token_ids) > eng.page_size]
    assert long_ones and all(o.cached_tokens >= eng.page_size for o in long_ones)
    assert eng.stats().cache_hit_rate > 0


def test_shared_prefix_across_requests(dense_llm, prompts):
    """A cached system prompt is reused by a different continuation and gives the uncached tokens."""
    eng = dense_llm.engine
    system = prompts[3] + " " + prompts[7] + "\n"
    a, b = system + "First question?", system + "Second one!"
    eng.flush_cache()
    miss = dense_llm.generate([b], GREEDY)[0]
    eng.flush_cache()
    dense_llm.generate([a], GREEDY)
    hit = dense_llm.generate([b], GREEDY)[0]
    assert hit.cached_tokens > 0 and miss.cached_tokens == 0
    assert hit.token_ids == miss.token_ids


def test_chunked_prefill_equals_one_shot(demo_models, make_llm, prompts, reference):
    llm = make_llm(demo_models["dense"], chunked_prefill_size=5, disable_radix_cache=True)
    outs = llm.generate(prompts[:6], GREEDY)
    assert [o.token_ids for o in outs] == reference[:6]


def test_small_pool_queues_and_retracts(demo_models, make_llm, prompts, reference):
    """A pool too small for all 16 requests: queueing and retraction, same tokens, no crash."""
    llm = make_llm(demo_models["dense"], max_total_tokens=160, page_size=4, chunked_prefill_size=64)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs[:6]] == reference
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)
    assert llm.engine.stats().num_retracted_total > 0


def test_abort_frees_pages(dense_llm, prompts):
    eng = dense_llm.engine
    start = eng.num_available_pages
    rids = [eng.add_request(p, SamplingParams(max_tokens=50, temperature=0)) for p in prompts[:4]]
    eng.step()
    eng.step()
    assert eng.num_available_pages < start
    queued = eng.add_request(prompts[5], SamplingParams(max_tokens=5))
    for rid in rids + [queued]:
        assert eng.abort(rid)
    outs = eng.step()
    assert {o.rid for o in outs if o.finished and o.finish_reason == "abort"} == set(rids + [queued])
    assert not eng.abort(rids[0])
    assert eng.num_available_pages == start


def test_max_running_requests(demo_models, make_llm, prompts, reference):
    llm = make_llm(demo_models["dense"], max_running_requests=3)
    eng = llm.engine
    for p in prompts[:6]:
        eng.add_request(p, SamplingParams(max_tokens=4, temperature=0))
    peak = 0
    while eng.has_work():
        eng.step()
        peak = max(peak, len(eng.scheduler.running))
    assert peak == 3


@pytest.mark.parametrize("mixed", [True, False])
def test_long_prompt_delays_running_decodes_by_one_chunk_at_most(demo_models, make_llm, prompts, reference, mixed):
    """An 80-token prompt (ten chunks of 8) arrives while a request decodes: with mixed chunks the
    decode gets a token in every one of those prefill steps; without, it waits for the whole prompt.
    Either way its tokens are those it produces alone."""
    llm = make_llm(demo_models["dense"], chunked_prefill_size=8, enable_mixed_chunk=mixed, disable_radix_cache=True)
    eng = llm.engine
    rid = eng.add_request(prompts[0], GREEDY)
    produced = []

    def step():
        outs = eng.step()
        produced.extend(t for o in outs if o.rid == rid for t in o.new_token_ids)
        return outs

    while eng.stats().step_kind != "decode":
        step()
    long_prompt = eng.tokenize(" ".join(prompts[:6]))[:80]
    assert len(long_prompt) == 80
    eng.add_request(long_prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    before = len(produced)
    for _ in range(10):
        step()
        assert eng.stats().step_kind == "prefill"
    # With overlap scheduling a step's token comes out one step later: the first prefill step
    # still delivers the token of the decode step before it.
    assert len(produced) - before == (10 if mixed else int(eng.overlap_schedule))
    while eng.has_work():
        step()
    assert produced == reference[0]
