"""OpenAI sampling parameters in the engine: penalties, logit bias, structured output (xgrammar)
and prompt pages shared with later requests while the first one still runs."""
from __future__ import annotations

import json
import re

import pytest
from tandem.engine import SamplingParams, StructuredOutput

from tests.support.structured import PERSON_SCHEMA as SCHEMA
from tests.support.structured import validate_person as _validate


def test_logit_bias_bans_and_forces_tokens(dense_llm, prompts):
    base = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = dense_llm.generate([prompts[3]], base)[0].token_ids
    banned = sorted(set(ref))[:3]
    out = dense_llm.generate([prompts[3]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                          logit_bias={t: -100 for t in banned}))[0]
    assert not set(out.token_ids) & set(banned)
    forced = dense_llm.generate([prompts[3]], SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True,
                                                             logit_bias={1234: 100}))[0]
    assert forced.token_ids == [1234] * 8


def test_frequency_presence_and_repetition_penalties_reduce_repeats(dense_llm, prompts):
    def repeats(**kw):
        out = dense_llm.generate([prompts[0]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, **kw))[0]
        return len(out.token_ids) - len(set(out.token_ids)), out.token_ids

    plain, plain_ids = repeats()
    assert plain > 5, "the demo model's greedy output repeats itself; the test relies on it"
    for kw in (dict(frequency_penalty=2.0), dict(presence_penalty=2.0), dict(repetition_penalty=3.0)):
        n, ids = repeats(**kw)
        assert n < plain, (kw, n, plain)
        assert ids != plain_ids
    # Negative penalties encourage repeats.
    assert repeats(presence_penalty=-2.0)[0] >= plain


def test_penalized_rows_leave_their_neighbours_alone(dense_llm, prompts):
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=10, temperature=0.8, seed=5, ignore_eos=True)
    alone = [o.token_ids for o in dense_llm.generate(prompts[:2], [greedy, seeded])]
    pen = SamplingParams(max_tokens=10, temperature=0.8, seed=6, frequency_penalty=1.5, logit_bias={5: 10.0},
                         ignore_eos=True)
    mixed = dense_llm.generate(prompts[:3], [greedy, seeded, pen])
    assert [o.token_ids for o in mixed[:2]] == alone


def test_penalty_validation(dense_llm):
    for kw in (dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0),
               dict(logit_bias={1: 101}), dict(logit_bias={10**6: 1.0})):
        with pytest.raises(ValueError):
            dense_llm.generate(["x"], SamplingParams(max_tokens=2, **kw))


def test_json_schema_output_parses_and_validates(dense_llm, prompts):
    so = StructuredOutput("json_schema", json.dumps(SCHEMA))
    sps = [SamplingParams(max_tokens=120, temperature=1.0, seed=i, structured=so) for i in range(8)]
    outs = dense_llm.generate(prompts[:8], sps)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        _validate(json.loads(o.text))
    assert len({o.text for o in outs}) > 1


def test_regex_ebnf_and_json_object_in_one_batch_with_free_rows(dense_llm, prompts):
    free = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ref = dense_llm.generate([prompts[5]], free)[0].token_ids
    regex = SamplingParams(max_tokens=40, temperature=0.7, seed=1,
                           structured=StructuredOutput("regex", r"(yes|no), [a-z]{2,8}!"))
    ebnf = SamplingParams(max_tokens=40, temperature=0.7, seed=2,
                          structured=StructuredOutput("ebnf", 'root ::= "<" [0-9]+ ">" | "none"'))
    obj = SamplingParams(max_tokens=60, temperature=0, structured=StructuredOutput("json_object"))
    outs = dense_llm.generate([prompts[1], prompts[2], prompts[3], prompts[5]], [regex, ebnf, obj, free])
    assert re.fullmatch(r"(yes|no), [a-z]{2,8}!", outs[0].text) and outs[0].finish_reason == "stop"
    assert re.fullmatch(r"<[0-9]+>|none", outs[1].text) and outs[1].finish_reason == "stop"
    assert outs[2].text.startswith("{")
    if outs[2].finish_reason == "stop":
        assert isinstance(json.loads(outs[2].text), dict)
    assert outs[3].token_ids == ref


def test_grammars_compile_once_and_bad_ones_are_refused(dense_llm):
    eng = dense_llm.engine
    so = StructuredOutput("regex", "[0-9]{3}")
    before = eng.grammars.num_compiles
    for seed in range(3):
        dense_llm.generate(["x"], SamplingParams(max_tokens=8, seed=seed, structured=so))
    assert eng.grammars.num_compiles - before <= 1
    for bad in (StructuredOutput("regex", "([a-"), StructuredOutput("ebnf", "root ::= "),
                StructuredOutput("json_schema", "{not json"), StructuredOutput("xml", "x")):
        with pytest.raises(ValueError):
            dense_llm.generate(["x"], SamplingParams(max_tokens=2, structured=bad))


def test_min_tokens_still_lets_a_finished_grammar_stop(dense_llm):
    out = dense_llm.generate(["x"], SamplingParams(max_tokens=20, min_tokens=10, temperature=0,
                                                   structured=StructuredOutput("regex", "ab")))[0]
    assert out.text == "ab" and out.finish_reason == "stop"


def test_prompt_pages_are_shared_while_the_first_request_runs(dense_llm, prompts):
    eng = dense_llm.engine
    prompt = " ".join(prompts[:6])
    ids = eng.tokenize(prompt)
    full = len(ids) // eng.page_size * eng.page_size
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    outs = {}

    def step():
        for o in eng.step():
            outs.setdefault(o.rid, []).extend(o.new_token_ids)

    first = eng.add_request(ids, sp)
    while not eng.requests[first].output_ids:
        step()
    # The first request still runs, its prompt is already in the prefix cache.
    assert eng.cached_prefix_tokens(ids) == full
    used = eng.pool.num_used_pages
    second = eng.add_request(ids, SamplingParams(max_tokens=30, temperature=0.9, seed=1, ignore_eos=True))
    while not eng.requests[second].output_ids:
        step()
    assert eng.requests[second].cached_tokens == full
    # The second request added only its tail page(s), not a second copy of the prompt.
    assert eng.pool.num_used_pages - used <= 3
    while eng.requests:
        step()
    ref = dense_llm.generate([ids], sp)[0].token_ids
    assert eng.requests == {} and len(outs[second]) == 30
    assert ref == outs[first]


def test_prompt_logprobs_match_the_models_next_token_logprobs(demo_models, make_llm):
    llm = make_llm(demo_models["dense"], chunked_prefill_size=16)  # the prompt spans several chunks
    ids = llm.engine.tokenize("Permission is hereby granted, free of charge, to any person obtaining a copy of "
                              "this software and associated documentation files")
    assert len(ids) > 20
    for _ in range(2):  # the second time the prompt sits in the prefix cache: still computed in full
        out = llm.generate([ids], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
        assert len(out.prompt_logprobs) == len(ids) - 1
    for j in (0, 7, 15, 16, len(ids) - 2):  # across chunk boundaries
        forced = llm.generate([ids[:j + 1]], SamplingParams(max_tokens=1, temperature=0, logprobs=True,
                                                            logit_bias={ids[j + 1]: 100}))[0]
        assert forced.token_ids == [ids[j + 1]]
        lp, top = out.prompt_logprobs[j]
        assert abs(lp - forced.logprobs[0]) < 1e-4
        assert len(top) == 3 and top[0][1] >= lp - 1e-6 and [t for t, _ in top] == sorted(
            [t for t, _ in top], key=lambda t: -dict(top)[t])
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.engine.allocate_external(ids, SamplingParams(prompt_logprobs=0))
