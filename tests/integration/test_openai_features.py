"""OpenAI features end to end: the real router with the official `openai` client in front of
real workers on the dense demo model, aggregated (one worker) and disaggregated (prefill +
decode over NIXL; every prompt is prefilled remotely, so the prefill worker samples the
first token under the grammar / penalties and decode the rest).

n samples (distinct seeds, prompt pages shared), penalties and logit bias, echo and
logprobs, JSON-schema outputs that always validate, grammar-forced tool calls and parsed
auto tool calls, the reasoning parser, the same through gRPC Router.Generate, and 400s
naming what is refused."""
from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from tandem.config import RouterConfig
from tandem.router.app import build_router
from tandem.v1 import common_pb2, router_pb2

from tests.integration.router_support import need_demo_model, start_many
from tests.support.clients import load, pages_in_use
from tests.support.grpc_router import router_stub
from tests.support.structured import PERSON_SCHEMA as SCHEMA
from tests.support.structured import validate_person as _validate
from tests.support.waiting import wait_for

openai = pytest.importorskip("openai")

PAGE = 16
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"]}}}
LONG_PROMPT = ("The GNU General Public License is a free, copyleft license for software and other kinds of works. "
               "The licenses for most software and other practical works are designed to take away your freedom "
               "to share and change the works. ") * 12


class Stack:
    def __init__(self, mode: str):
        model = need_demo_model()
        common = ["--model-path", model, "--log-level", "warning", "--page-size", str(PAGE),
                  "--max-total-tokens", "16384"]
        if mode == "agg":
            (self.decode,) = start_many([("tandem.decode", [*common, "--disaggregation-mode", "null"])])
            self.procs = [self.decode]
        else:
            nixl = [*common, "--disaggregation-transfer-backend", "nixl"]
            (self.prefill,) = start_many([("tandem.prefill", nixl)])
            (self.decode,) = start_many([("tandem.decode", [*nixl, "--disaggregation-mode", "decode",
                                                            "--prefill-addresses", self.prefill.grpc_address])])
            self.procs = [self.prefill, self.decode]
        self.mode = mode
        self.routers = []
        self.app = self.router(tool_call_parser="qwen25")
        self.client = openai.OpenAI(base_url=f"http://{self.app.http_address}/v1", api_key="none", max_retries=0)
        self.model = self.app.model_name

    def router(self, **kw):
        app = build_router(RouterConfig(model_path=need_demo_model(), workers=[self.decode.grpc_address],
                                        http_port=0, health_check_interval=0.2, **kw))
        app.start()
        self.routers.append(app)
        wait_for(lambda: len(app.core.pool.healthy()) == 1, timeout=30, what="worker healthy")
        return app

    def stop(self):
        for app in self.routers:
            app.stop()
        for p in self.procs:
            p.stop()


@pytest.fixture(scope="module", params=["agg", "disagg"])
def stack(request):
    s = Stack(request.param)
    yield s
    s.stop()


def test_n_samples_differ_by_seed_and_share_the_prompt_pages(stack):
    c = stack.client
    ids = stack.app.tokenizer.encode(LONG_PROMPT)
    prompt_pages = len(ids) // PAGE
    out_pages = 60 // PAGE + 2  # outputs plus the prompt's partial tail page, per sample
    peak = [0]
    running = threading.Event()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if load(stack.decode.grpc_address).num_running_reqs == 4:
                running.set()
                peak[0] = max(peak[0], pages_in_use(stack.decode.grpc_address))
            stop.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        out = c.completions.create(model=stack.model, prompt=LONG_PROMPT, n=4, max_tokens=60, temperature=1.0,
                                   seed=1234, extra_body={"ignore_eos": True})
    finally:
        stop.set()
        watcher.join()
    texts = [ch.text for ch in out.choices]
    assert [ch.index for ch in out.choices] == [0, 1, 2, 3] and len(set(texts)) == 4
    assert out.usage.completion_tokens == 240 and out.usage.prompt_tokens == len(ids)
    # Sample i is the request with seed 1234 + i: the same text when asked alone.
    alone = c.completions.create(model=stack.model, prompt=LONG_PROMPT, max_tokens=60, temperature=1.0,
                                 seed=1236, extra_body={"ignore_eos": True})
    assert alone.choices[0].text == texts[2]
    # KV usage grew by the outputs only: one copy of the prompt's pages for the four samples.
    assert running.is_set(), "never saw the 4 samples running together"
    assert peak[0] <= prompt_pages + 4 * out_pages, (peak[0], prompt_pages)
    assert peak[0] < 2 * prompt_pages
    wait_for(lambda: pages_in_use(stack.decode.grpc_address) == 0, timeout=20, what="pages released")


def test_logit_bias_bans_and_forces_and_penalties_reduce_repeats(stack):
    c = stack.client
    prompt = "Permission is hereby granted, free of charge, to any person obtaining a copy"
    base = dict(model=stack.model, prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    ref = c.completions.create(**base, logprobs=1)
    ref_tokens = ref.choices[0].logprobs.tokens
    tok = stack.app.tokenizer
    ref_ids = tok.encode(ref.choices[0].text)
    banned = sorted(set(ref_ids))[:5]
    out = c.completions.create(**base, logit_bias={str(t): -100 for t in banned})
    assert not set(tok.encode(out.choices[0].text)) & set(banned)
    forced = c.completions.create(model=stack.model, prompt=prompt, max_tokens=6, temperature=0.8, seed=1,
                                  logit_bias={"1234": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tok.decode([1234] * 6)
    repeats = len(ref_tokens) - len(set(ref_tokens))
    assert repeats > 5, "the demo model's greedy output repeats itself; the test relies on it"
    for kw in (dict(frequency_penalty=2.0), dict(presence_penalty=2.0), dict(extra_body={"ignore_eos": True,
                                                                                          "repetition_penalty": 3.0})):
        args = {**base, **kw}
        pen = c.completions.create(**args, logprobs=1).choices[0].logprobs.tokens
        assert len(pen) - len(set(pen)) < repeats, kw


def test_echo_and_logprobs_as_openai_returns_them(stack):
    c = stack.client
    out = c.completions.create(model=stack.model, prompt="def __init__(self):", max_tokens=5, temperature=0,
                               echo=True)
    plain = c.completions.create(model=stack.model, prompt="def __init__(self):", max_tokens=5, temperature=0)
    assert out.choices[0].text == "def __init__(self):" + plain.choices[0].text
    lp = c.completions.create(model=stack.model, prompt="def __init__(self):", max_tokens=5, temperature=0,
                              logprobs=3).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(t) == 3 and max(t.values()) == pytest.approx(v, abs=1e-4) for t, v in
               zip(lp.top_logprobs, lp.token_logprobs))  # greedy: the sampled token is the most likely
    # echo + logprobs: the prompt's tokens first, the first with null logprob and alternatives.
    both = c.completions.create(model=stack.model, prompt="def __init__(self):", max_tokens=5, temperature=0,
                                echo=True, logprobs=3).choices[0]
    n_prompt = len(stack.app.tokenizer.encode("def __init__(self):"))
    blp = both.logprobs
    assert both.text == out.choices[0].text and len(blp.tokens) == n_prompt + 5
    assert blp.token_logprobs[0] is None and blp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in blp.token_logprobs[1:])
    assert blp.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert "".join(blp.tokens[:n_prompt]) == "def __init__(self):"
    assert blp.text_offset == sorted(blp.text_offset) and blp.text_offset[n_prompt] == len("def __init__(self):")
    assert all(len(t) == 3 for t in blp.top_logprobs[1:])
    streamed = [ch.logprobs for chunk in c.completions.create(
        model=stack.model, prompt="def __init__(self):", max_tokens=5, temperature=0, echo=True, logprobs=3,
        stream=True) for ch in chunk.choices if ch.logprobs]
    assert [t for p in streamed for t in p.tokens] == blp.tokens
    chat = c.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in content)


def test_json_schema_outputs_always_parse_and_validate(stack):
    c = stack.client
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}

    def one(i):
        out = c.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": f"Person {i}?"}],
                                        response_format=fmt, max_tokens=150, temperature=1.0, seed=i)
        return out.choices[0]

    with ThreadPoolExecutor(10) as pool:
        choices = list(pool.map(one, range(50)))
    objs = []
    for ch in choices:
        assert ch.finish_reason == "stop", ch.message.content
        objs.append(json.loads(ch.message.content))
        _validate(objs[-1])
    assert len({json.dumps(o) for o in objs}) > 10  # sampled, not one answer 50 times
    obj = c.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "JSON please"}],
                                    response_format={"type": "json_object"}, max_tokens=80, temperature=0)
    assert obj.choices[0].message.content.startswith("{")


def _tool_calls_from_stream(stream):
    calls, finish, content = {}, None, ""
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                cur = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                cur["name"] += tc.function.name or ""
                cur["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


def test_forced_tool_calls_required_and_named_streamed_and_not(stack):
    c = stack.client
    msgs = [{"role": "user", "content": "What is the weather in Oslo?"}]
    for seed in range(3):
        # parallel_tool_calls=False: exactly one call (a random model would not stop adding calls).
        out = c.chat.completions.create(model=stack.model, messages=msgs, tools=[WEATHER, TIME],
                                        tool_choice="required", parallel_tool_calls=False, max_tokens=150,
                                        temperature=1.0, seed=seed)
        ch = out.choices[0]
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1, ch.message.content
        for call in ch.message.tool_calls:
            args = json.loads(call.function.arguments)
            assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
            if call.function.name == "get_weather":
                assert args["unit"] in ("celsius", "fahrenheit") and len(args["city"]) <= 16
            else:
                assert args["zone"] in ("utc", "local")
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = c.chat.completions.create(model=stack.model, messages=msgs, tools=[WEATHER, TIME], tool_choice=named,
                                    max_tokens=150, temperature=0.7, seed=3)
    ch = out.choices[0]
    assert ch.finish_reason == "stop" and [t.function.name for t in ch.message.tool_calls] == ["get_weather"]
    assert set(json.loads(ch.message.tool_calls[0].function.arguments)) == {"city", "unit"}
    calls, finish, content = _tool_calls_from_stream(c.chat.completions.create(
        model=stack.model, messages=msgs, tools=[WEATHER, TIME], tool_choice=named, max_tokens=150,
        temperature=0.7, seed=3, stream=True))
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == \
        [("get_weather", json.loads(ch.message.tool_calls[0].function.arguments))]
    assert content == "" and finish == "stop"
    calls, finish, _ = _tool_calls_from_stream(c.chat.completions.create(
        model=stack.model, messages=msgs, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
        max_tokens=150, temperature=1.0, seed=0, stream=True))
    assert len(calls) == 1 and finish == "tool_calls"


def test_auto_tool_call_parsed_from_real_model_output(stack):
    """The demo model will not call tools on its own: a regex makes it write a Qwen-format call,
    which the router's qwen25 parser (tool_choice auto) turns into tool_calls, streamed and not."""
    c = stack.client
    regex = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,10}", "unit": "celsius"\}\}\n</tool_call>'
    kw = dict(model=stack.model, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER, TIME],
              max_tokens=200, temperature=0.8, seed=5, extra_body={"regex": regex})
    ch = c.chat.completions.create(**kw).choices[0]
    assert ch.finish_reason == "tool_calls" and not ch.message.content
    (call,) = ch.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and re.fullmatch("[a-z]{1,10}", args["city"])
    calls, finish, content = _tool_calls_from_stream(c.chat.completions.create(**kw, stream=True))
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == [("get_weather", args)]
    assert finish == "tool_calls" and content == ""


def test_reasoning_parser_end_to_end(stack):
    app = stack.router(reasoning_parser="deepseek-r1")
    c = openai.OpenAI(base_url=f"http://{app.http_address}/v1", api_key="none", max_retries=0)
    kw = dict(model=stack.model, messages=[{"role": "user", "content": "Think first."}], max_tokens=60,
              temperature=0.8, seed=2, extra_body={"regex": r"[a-z ]{3,20}</think>\n\n[a-z]{2,12}\."})
    msg = c.chat.completions.create(**kw).choices[0].message
    assert re.fullmatch("[a-z ]{3,20}", msg.reasoning_content) and re.fullmatch(r"[a-z]{2,12}\.", msg.content)
    reasoning = content = ""
    for chunk in c.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            content += ch.delta.content or ""
    assert (reasoning, content) == (msg.reasoning_content, msg.content)


def test_grpc_router_generate_takes_the_same_parameters(stack):
    with router_stub(stack.app) as stub:
        req = router_pb2.RouterGenerateRequest(
            text="Once upon a time", n=2, echo=True,
            sampling=common_pb2.SamplingParams(
                max_tokens=150, temperature=1.0, seed=9, frequency_penalty=1.0, logit_bias={1234: -100},
                structured=common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))))
        chunks = list(stub.Generate(req, timeout=120))
        for i in (0, 1):
            text = "".join(c.text for c in chunks if c.index == i)
            assert text.startswith("Once upon a time")
            _validate(json.loads(text[len("Once upon a time"):]))
            assert 1234 not in [t for c in chunks if c.index == i for t in c.token_ids]
        tools = router_pb2.RouterGenerateRequest(
            chat=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role="user", content="Time?")]),
            tools=[router_pb2.Tool(name="get_time", parameters_json=json.dumps(TIME["function"]["parameters"]))],
            tool_choice="get_time", sampling=common_pb2.SamplingParams(max_tokens=40, temperature=0))
        calls = [c for ck in stub.Generate(tools, timeout=120) for c in ck.tool_calls]
        assert [c.name for c in calls] == ["get_time"] and json.loads(calls[0].arguments)["zone"] in ("utc",
                                                                                                     "local")


def test_unsupported_parameters_answer_400_naming_them(stack):
    c = stack.client
    msgs = [{"role": "user", "content": "hi"}]
    for kw, param in ((dict(extra_body={"audio": {"voice": "alloy", "format": "wav"}}), "audio"),
                      (dict(reasoning_effort="high"), "reasoning_effort"),
                      (dict(store=True), "store"),
                      (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                          "type": "object", "properties": {"a": {"type": "nonsense"}}}}}), "response_format")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=stack.model, messages=msgs, max_tokens=2, **kw)
        assert e.value.body["param"] == param and param in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=stack.model, prompt="x", max_tokens=2, best_of=3)
    assert e.value.body["param"] == "best_of"
