"""The router app over scripted workers whose output is a model's tool-call or reasoning text:
the parsers run on the real HTTP and gRPC paths (streamed and not, with the openai client),
and n > 1 fans out with seed + i, pinned to one worker."""
from __future__ import annotations

import json

import grpc
import pytest
from routing_fake_worker import FakeWorker
from tandem.config import RouterConfig
from tandem.router.app import build_router
from tandem.v1 import common_pb2, router_pb2

from tests.support.grpc_router import router_stub
from tests.support.waiting import wait_for
from tests.unit.routing.conftest import make_tokenizer_dir

openai = pytest.importorskip("openai")

CALL_TEXT = ('The fox checks.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
THINK_TEXT = "<think>\nThe quick brown fox.\n</think>\n\nHello world!"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time"}}]


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """The tiny tokenizer with a context long enough for a tools prompt."""
    return make_tokenizer_dir(tmp_path_factory.mktemp("tiny-long"), context_length=4096)


@pytest.fixture
def router_over(long_model_dir, hf_tokenizer):
    made = []

    def make(text, n_workers=1, **kw):
        workers = [FakeWorker(hf_tokenizer(text)["input_ids"]) for _ in range(n_workers)]
        app = build_router(RouterConfig(model_path=long_model_dir, workers=[w.address for w in workers],
                                        http_port=0, health_check_interval=0.1, **kw))
        app.start()
        made.append((app, workers))
        wait_for(lambda: len(app.core.pool.healthy()) == n_workers, what="workers healthy")
        client = openai.OpenAI(base_url=f"http://{app.http_address}/v1", api_key="x", max_retries=0)
        return app, workers, client

    yield make
    for app, workers in made:
        app.stop()
        for w in workers:
            w.stop()


def _stream_calls(stream):
    content, calls, finish = "", {}, None
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                c["name"] += tc.function.name or ""
                c["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_auto_tool_calls_are_parsed_streamed_and_not(router_over):
    app, _, client = router_over(CALL_TEXT, tool_call_parser="qwen25")
    msgs = [{"role": "user", "content": "Weather in Oslo, and the time?"}]
    out = client.chat.completions.create(model=app.model_name, messages=msgs, tools=TOOLS, max_tokens=200)
    ch = out.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "The fox checks.\n"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls] == \
        [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert len({c.id for c in ch.message.tool_calls}) == 2
    content, calls, finish = _stream_calls(client.chat.completions.create(
        model=app.model_name, messages=msgs, tools=TOOLS, max_tokens=200, stream=True))
    assert content == "The fox checks.\n" and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Oslo"}),
                                                                        ("get_time", {})]
    # tool_choice none: the same text is plain content.
    out = client.chat.completions.create(model=app.model_name, messages=msgs, tools=TOOLS, tool_choice="none",
                                         max_tokens=200)
    assert out.choices[0].message.content == CALL_TEXT and not out.choices[0].message.tool_calls


def test_tool_results_in_the_conversation_render_for_a_template_without_tools(router_over):
    app, workers, client = router_over(CALL_TEXT, tool_call_parser="qwen25")
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    client.chat.completions.create(model=app.model_name, messages=msgs, tools=TOOLS, max_tokens=5)
    prompt = app.tokenizer.decode(list(workers[0].servicer.requests[-1].input_ids), skip_special_tokens=False)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt
    assert "<tool_call>" in prompt and "<tool_response>\nsunny\n</tool_response>" in prompt


def test_reasoning_content_streamed_and_not(router_over):
    app, _, client = router_over(THINK_TEXT, reasoning_parser="qwen3")
    msgs = [{"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model=app.model_name, messages=msgs, max_tokens=200)
    msg = out.choices[0].message
    assert msg.content == "Hello world!" and msg.reasoning_content == "\nThe quick brown fox.\n"
    reasoning = content = ""
    for chunk in client.chat.completions.create(model=app.model_name, messages=msgs, max_tokens=200, stream=True):
        for ch in chunk.choices:
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            content += ch.delta.content or ""
    assert (reasoning, content) == ("\nThe quick brown fox.\n", "Hello world!")


def test_n_samples_get_seed_plus_i_on_one_worker(router_over, hf_tokenizer):
    app, workers, client = router_over("Hello world!", n_workers=2, routing_policy="round_robin")
    out = client.completions.create(model=app.model_name, prompt="x", max_tokens=50, n=3, seed=40)
    assert [c.index for c in out.choices] == [0, 1, 2] and all(c.text == "Hello world!" for c in out.choices)
    n_tokens = len(hf_tokenizer("Hello world!")["input_ids"])
    assert out.usage.completion_tokens == 3 * n_tokens and out.usage.prompt_tokens == 1
    reqs = [r for w in workers for r in w.servicer.requests]
    assert sorted(r.sampling.seed for r in reqs) == [40, 41, 42]
    # Samples 1.. ask for a local prefill: the worker holds the prompt's pages after sample 0.
    assert sorted((r.sampling.seed, r.prefill_override) for r in reqs) == [(40, ""), (41, "local"), (42, "local")]
    assert sum(1 for w in workers if w.servicer.requests) == 1  # all samples on the worker of sample 0
    texts = {}
    for chunk in client.completions.create(model=app.model_name, prompt="x", max_tokens=50, n=2, stream=True):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert texts == {0: "Hello world!", 1: "Hello world!"}
    echo = client.completions.create(model=app.model_name, prompt="The fox", max_tokens=50, echo=True)
    assert echo.choices[0].text == "The fox" + "Hello world!"


def test_grpc_generate_with_n_tools_and_reasoning(router_over):
    app, workers, _ = router_over(CALL_TEXT, tool_call_parser="hermes", reasoning_parser="deepseek-r1")
    with router_stub(app) as stub:
        req = router_pb2.RouterGenerateRequest(
            chat=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role="user", content="hi")]),
            tools=[router_pb2.Tool(name="get_weather", parameters_json='{"type": "object"}'),
                   router_pb2.Tool(name="get_time")],
            n=2, sampling=common_pb2.SamplingParams(max_tokens=200, seed=7, presence_penalty=0.5,
                                                    logit_bias={3: -100.0}))
        chunks = list(stub.Generate(req, timeout=20))
        for i in (0, 1):
            mine = [c for c in chunks if c.index == i]
            calls = [c for ck in mine for c in ck.tool_calls]
            # deepseek-r1: no </think> in this output, so all of it is reasoning and no call is parsed.
            assert "".join(c.reasoning_text for c in mine) == CALL_TEXT and not calls
            assert mine[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        sent = workers[0].servicer.requests[-2:]
        assert sorted(r.sampling.seed for r in sent) == [7, 8]
        assert all(r.sampling.presence_penalty == 0.5 and dict(r.sampling.logit_bias) == {3: -100.0}
                   for r in sent)
        bad = router_pb2.RouterGenerateRequest(text="x", tool_choice="required",
                                               sampling=common_pb2.SamplingParams(max_tokens=5))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(bad, timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tool_choice" in e.value.details()
        bad = router_pb2.RouterGenerateRequest(text="x", sampling=common_pb2.SamplingParams(
            max_tokens=5, structured=common_pb2.StructuredOutput(regex="([a-")))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(bad, timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "regex" in e.value.details()


def test_grpc_tool_calls_parsed(router_over):
    app, _, _ = router_over(CALL_TEXT, tool_call_parser="hermes")
    with router_stub(app) as stub:
        req = router_pb2.RouterGenerateRequest(
            chat=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role="user", content="hi")]),
            tools=[router_pb2.Tool(name="get_weather"), router_pb2.Tool(name="get_time")],
            sampling=common_pb2.SamplingParams(max_tokens=200))
        chunks = list(stub.Generate(req, timeout=20))
        calls = [c for ck in chunks for c in ck.tool_calls]
        assert [(c.name, json.loads(c.arguments), c.index) for c in calls] == [
            ("get_weather", {"city": "Oslo"}, 0), ("get_time", {}, 1)]
        assert "".join(c.text for c in chunks) == "The fox checks.\n"


def test_a_template_with_tool_support_renders_the_tools_itself(tmp_path):
    from tandem.routing.tokenizer import RouterTokenizer
    from tandem.routing.tool_parsers import Tool

    d = make_tokenizer_dir(tmp_path, context_length=4096)
    template = ("{% if tools %}TOOLS={% for t in tools %}{{ t['function']['name'] }};{% endfor %}"
                "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                "{% endfor %}<|assistant|>")
    (tmp_path / "chat_template.jinja").write_text(template)  # where transformers keeps the template
    tok = RouterTokenizer(d)
    assert tok.template_has_tools
    text = tok.render_chat([{"role": "user", "content": "hi"}], [Tool("get_weather"), Tool("get_time")])
    assert text.startswith("TOOLS=get_weather;get_time;") and "<tools>" not in text
