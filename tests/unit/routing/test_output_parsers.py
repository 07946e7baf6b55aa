"""Tool-call and reasoning parsers on model outputs of each supported format, whole and
streamed in every split (so a tag or a call cut between deltas is still recognised)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tandem.routing.reasoning import ReasoningParser
from tandem.routing.tool_parsers import ForcedToolParser, Tool, forced_schema, make_parser

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "model_outputs.json").read_text())
TOOL_CASES = [(fmt, c) for fmt in ("qwen25", "hermes", "llama3") for c in FIXTURES[fmt]]


def _splits(text: str, seed: int) -> list[list[str]]:
    """The text whole, one character at a time, and in random pieces."""
    rng = random.Random(seed)
    out = [[text], list(text)]
    cuts = sorted(rng.sample(range(1, len(text)), min(6, len(text) - 1))) if len(text) > 1 else []
    out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return out


def _calls(calls):
    return [[c.name, json.loads(c.arguments)] for c in calls]


@pytest.mark.parametrize("fmt,case", TOOL_CASES, ids=[f"{f}:{c['name']}" for f, c in TOOL_CASES])
def test_tool_parsers_whole_and_streamed(fmt, case):
    content, calls = make_parser(fmt).parse(case["text"])
    assert content == case["content"] and _calls(calls) == case["calls"]
    assert len({c.id for c in calls}) == len(calls)
    for pieces in _splits(case["text"], 1):
        p = make_parser(fmt)
        got_content, got_calls = "", []
        for piece in pieces:
            c, t = p.feed(piece)
            got_content += c
            got_calls += t
        c, t = p.finish()
        assert got_content + c == case["content"] and _calls(got_calls + t) == case["calls"]


def test_hermes_streams_content_before_the_call_at_once():
    p = make_parser("qwen25")
    assert p.feed("Sure, one moment. <tool") == ("Sure, one moment. ", [])  # "<tool" held back
    c, calls = p.feed('_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
    assert c == "" and calls[0].name == "f" and calls[0].arguments == "{}"


@pytest.mark.parametrize("case", FIXTURES["reasoning"], ids=[c["name"] for c in FIXTURES["reasoning"]])
def test_reasoning_parsers_whole_and_streamed(case):
    reasoning, content = ReasoningParser(case["parser"]).parse(case["text"])
    assert (reasoning, content) == (case["reasoning"], case["content"])
    for pieces in _splits(case["text"], 2):
        p = ReasoningParser(case["parser"])
        r = c = ""
        for piece in pieces:
            dr, dc = p.feed(piece)
            r, c = r + dr, c + dc
        dr, dc = p.finish()
        assert (r + dr, c + dc) == (case["reasoning"] or "", case["content"])


def test_forced_calls_parse_required_arrays_and_named_arguments():
    tools = [Tool("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}}}), Tool("noop")]
    schema = forced_schema(tools, "required", parallel=False)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    assert forced_schema(tools, "get_weather") == tools[0].schema()
    _, calls = ForcedToolParser(None).parse('[{"name":"get_weather","parameters":{"city":"Oslo"}},{"name":"noop","parameters":{}}]')
    assert _calls(calls) == [["get_weather", {"city": "Oslo"}], ["noop", {}]]
    _, calls = ForcedToolParser("get_weather").parse('{"city":"Oslo"}')
    assert _calls(calls) == [["get_weather", {"city": "Oslo"}]]
    text, calls = ForcedToolParser("get_weather").parse('{"city":"Os')  # cut by max_tokens
    assert text == '{"city":"Os' and calls == []
