from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tandem.routing.detokenizer import TextStream
from tandem.sampling import IncrementalDetokenizer, StopStrings

TEXTS = ["Hello world! 🦊🦊 漢字 ünïcödé", "émojis 🦊 and 漢字.", "plain ascii text", "ß∂ƒ©˙∆˚¬…æ 日本語のテキスト"]


def chunked(ids, rng):
    i = 0
    while i < len(ids):
        n = rng.randint(1, 3)
        yield ids[i:i + n]
        i += n


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode_and_no_partial_chars(hf_tokenizer, text):
    ids = hf_tokenizer(text)["input_ids"]
    # byte-level BPE splits multi-byte characters over tokens
    assert any("\ufffd" in hf_tokenizer.decode([i]) for i in ids) or text.isascii()
    for seed in range(5):
        d = IncrementalDetokenizer(hf_tokenizer)
        deltas = [d.add(c) for c in chunked(ids, random.Random(seed))] + [d.flush()]
        assert "".join(deltas) == text
        assert not any("\ufffd" in x for x in deltas)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=399), min_size=1, max_size=40))
def test_random_ids_concatenate_to_full_decode(hf_tokenizer, ids):
    d = IncrementalDetokenizer(hf_tokenizer)
    out = "".join(d.add([i]) for i in ids) + d.flush()
    assert out == hf_tokenizer.decode(ids, skip_special_tokens=True)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc🦊", max_size=30), st.lists(st.text(alphabet="abc🦊", min_size=1, max_size=4),
                                                         min_size=1, max_size=3), st.randoms())
def test_stop_matcher_equals_cut_at_first_stop(text, stops, rng):
    """The engine's incremental check (each piece searched with the last len(stop) - 1
    characters before it) finds what a search of the whole text finds."""
    m = StopStrings(stops)
    i = 0
    while i < len(text) and m.matched is None:
        n = rng.randint(1, 4)
        m.feed(text[i:i + n])
        i += n
    out = text if m.pos is None else text[:m.pos]
    # reference: the first stop to complete when the text is read one character at a time
    ends = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if ends:
        _, start, _ = min(ends)
        assert out == text[:start]
        assert m.matched in stops and text.find(m.matched) == start
    else:
        assert out == text and m.matched is None


def test_text_stream_stop_on_multibyte(hf_tokenizer):
    """The worker's check finds the stop in its text; the router's stream cuts its own text there."""
    ids = hf_tokenizer("Hello world! 🦊 tail")["input_ids"]
    detok, stops = IncrementalDetokenizer(hf_tokenizer), StopStrings(["🦊"])  # what the worker runs
    ts = TextStream(hf_tokenizer, stop=["🦊"])
    out = ""
    for i in ids:
        if stops.feed(detok.add([i])):  # the worker's last chunk: this token, and where the stop begins
            out += ts.finish([i], stops.pos)
            break
        out += ts.push([i])
    assert out == "Hello world! " and stops.matched == "🦊"
    assert ts.finish() == ""


def test_text_stream_holds_prefix_of_stop_until_resolved(hf_tokenizer):
    ts = TextStream(hf_tokenizer, stop=[" STOP here"])
    ids = hf_tokenizer("Stop strings. STOP")["input_ids"]
    out = "".join(ts.push([i]) for i in ids)
    assert out == "Stop strings."  # " STOP" could still become " STOP here": held
    out += ts.finish()
    assert out == "Stop strings. STOP"


def test_empty_stop_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings([""])
    with pytest.raises(ValueError, match="non-empty"):
        TextStream(None, stop=[""])
