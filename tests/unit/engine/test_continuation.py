"""A migrated request continues on another engine (``add_request(..., output_ids=)``) exactly
as it would have gone on where it started: penalties count the tokens before the seam, a
seeded request draws at the same positions, a stop string that begins before the seam is
found, min_tokens and max_tokens count them; nothing before the seam is output again."""
from __future__ import annotations

import pytest
from tandem.engine import SamplingParams
from tandem.sampling import SamplingError

SEAM = 7


def run(llm, prompt, sp, output_ids=()):
    """(new token ids, logprobs, finish reason, stop_text_pos) of one request, stepped to the end."""
    eng = llm.engine
    rid = eng.add_request(prompt, sp, output_ids=list(output_ids))
    toks, lps, reason, pos = [], [], None, None
    while reason is None:
        for o in eng.step():
            if o.rid != rid:
                continue
            toks += o.new_token_ids
            lps += o.new_logprobs
            if o.finished:
                reason, pos = o.finish_reason, o.stop_text_pos
    return toks, lps, reason, pos


@pytest.mark.parametrize("kw", [
    dict(temperature=0, frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=1.3, min_tokens=10),
    dict(temperature=0.9, seed=1234, frequency_penalty=0.7, top_k=40),
], ids=["greedy-penalties", "seeded-penalties"])
def test_continuation_is_token_identical(dense_llm, prompts, kw):
    ids = dense_llm.tokenizer.encode(prompts[0], add_special_tokens=False).ids
    sp = SamplingParams(max_tokens=20, ignore_eos=True, logprobs=True, **kw)
    full, full_lps, reason, _ = run(dense_llm, ids, sp)
    assert reason == "length" and len(full) == 20
    rest, rest_lps, reason2, _ = run(dense_llm, ids, sp, output_ids=full[:SEAM])
    assert rest == full[SEAM:]  # max_tokens shrank by the SEAM tokens already produced
    assert reason2 == "length"
    assert rest_lps == pytest.approx(full_lps[SEAM:], abs=1e-4)


def test_continuation_without_the_seam_tokens_in_the_penalty_differs(dense_llm, prompts):
    """The check above can fail: the same tokens given as prompt (not counted as output by
    frequency/presence penalties) continue differently."""
    ids = dense_llm.tokenizer.encode(prompts[0], add_special_tokens=False).ids
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    full = run(dense_llm, ids, sp)[0]
    as_prompt = run(dense_llm, ids + full[:SEAM], SamplingParams(
        max_tokens=20 - SEAM, temperature=0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0))[0]
    assert as_prompt != full[SEAM:]


def spanning_stop(tok, ids: list, seams=range(4, 16)) -> tuple[int, str]:
    """A seam and a stop string made of the 2 characters before it and the 2 after it, found
    nowhere earlier in the text (the demo model repeats itself: not every seam has one)."""
    for seam in seams:
        before = tok.decode(ids[:seam], skip_special_tokens=True)
        after = tok.decode(ids[:seam + 2], skip_special_tokens=True)
        stop = after[len(before) - 2:len(before) + 2]
        if len(stop) == 4 and stop not in after[:len(before) + 1]:
            return seam, stop
    raise AssertionError("no seam with a stop string that spans it")


def test_stop_string_spanning_the_seam(dense_llm, prompts):
    ids = dense_llm.tokenizer.encode(prompts[0], add_special_tokens=False).ids
    pen = dict(temperature=0, ignore_eos=True, frequency_penalty=1.5, presence_penalty=1.0)
    full = run(dense_llm, ids, SamplingParams(max_tokens=24, **pen))[0]
    seam, stop = spanning_stop(dense_llm.tokenizer, full)
    sp = SamplingParams(max_tokens=24, stop=[stop], **pen)
    whole, _, reason, pos = run(dense_llm, ids, sp)
    rest, _, reason2, pos2 = run(dense_llm, ids, sp, output_ids=full[:seam])
    assert reason == reason2 == "stop"
    before = dense_llm.tokenizer.decode(full[:seam], skip_special_tokens=True)
    assert rest == whole[seam:] and pos2 == pos == len(before) - 2


def test_a_continuation_is_checked(dense_llm, prompts):
    eng = dense_llm.engine
    ids = dense_llm.tokenizer.encode(prompts[0], add_special_tokens=False).ids
    with pytest.raises(SamplingError, match="nothing is left of max_tokens") as e:
        eng.add_request(ids, SamplingParams(max_tokens=4), output_ids=[1, 2, 3, 4])
    assert e.value.param == "output_ids"
    with pytest.raises(SamplingError, match="leave no room") as e:
        eng.add_request(ids, SamplingParams(max_tokens=10 ** 6), output_ids=[1] * (eng.context_length - len(ids)))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(SamplingError) as e:
        eng.add_request(ids, SamplingParams(max_tokens=8, prompt_logprobs=1), output_ids=[1])
    assert e.value.param == "prompt_logprobs"
    with pytest.raises(ValueError, match="output_ids"):
        eng.add_request(ids, SamplingParams(max_tokens=8), output_ids=[-1])
    with pytest.raises(ValueError, match="not prefill_only"):
        eng.add_request(ids, SamplingParams(max_tokens=8), mode="prefill_only", output_ids=[1])
    assert not eng.requests
