from __future__ import annotations

import pytest
from tandem.config import RouterConfig
from tandem.router.grpc_api import RouterServicer
from tandem.routing import openai_protocol as oa
from tandem.routing.limits import RequestLimits
from tandem.routing.request_check import check_request
from tandem.sampling import SamplingError
from tandem.v1 import common_pb2, router_pb2

LIMITS = RequestLimits.from_config(RouterConfig())


def build_sampling(req, prompt_tokens, context_length, default_max):
    """The HTTP API's path: the request's sampling side, then the shared check (as 400s)."""
    try:
        return check_request(oa.sampling_request(req, default_max), prompt_tokens, context_length, None, LIMITS)
    except SamplingError as e:
        raise oa.invalid(e) from None


def check_sampling(sp, prompt_tokens, context_length):
    """The gRPC API's path for a text prompt with these proto sampling params."""
    _, sampling, _ = RouterServicer._convert(router_pb2.RouterGenerateRequest(text="x", sampling=sp), None)
    return check_request(sampling, prompt_tokens, context_length, None, LIMITS)


def completion(**kw):
    import json
    return oa.parse_request("completion", json.dumps({"model": "m", "prompt": "x", **kw}).encode())


def chat(**kw):
    import json
    return oa.parse_request("chat", json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                **kw}).encode())


def test_sampling_mapping():
    sp = build_sampling(completion(max_tokens=7, temperature=0, top_p=0.5, top_k=3, seed=11, stop="##",
                                      min_tokens=2, ignore_eos=True, logprobs=2), 5, 100, 16)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed, list(sp.stop)) == (7, 0, 0.5, 3, 11, ["##"])
    assert sp.min_tokens == 2 and sp.ignore_eos and sp.logprobs and sp.top_logprobs == 2
    assert build_sampling(completion(), 5, 100, 16).seed is None
    assert build_sampling(completion(), 5, 100, 16).max_tokens == 16
    assert build_sampling(chat(), 30, 100, None).max_tokens == 70  # rest of the context
    sp = build_sampling(chat(logprobs=True, top_logprobs=3, max_completion_tokens=4), 5, 100, None)
    assert sp.logprobs and sp.top_logprobs == 3 and sp.max_tokens == 4


@pytest.mark.parametrize("req,param", [
    (dict(max_tokens=96), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-5), "top_k"),
    (dict(n=0), "n"),
    (dict(n=17), "n"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias={"5": 101}), "logit_bias"),
    (dict(best_of=2), "best_of"),
    (dict(suffix="tail"), "suffix"),
    (dict(store=True), "store"),
    (dict(metadata={"a": "b"}), "metadata"),
    (dict(service_tier="flex"), "service_tier"),
    (dict(guided_json={"type": "object"}), "guided_json"),
    (dict(logprobs=50), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(seed=-1), "seed"),
    (dict(min_tokens=20, max_tokens=5), "min_tokens"),
])
def test_bad_sampling_names_the_field(req, param):
    with pytest.raises(oa.OpenAIError) as e:
        build_sampling(completion(**req), 5, 100, 16)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


def test_prompt_too_long_and_empty():
    with pytest.raises(oa.OpenAIError, match="maximum context length is 100"):
        build_sampling(completion(), 100, 100, 16)
    with pytest.raises(oa.OpenAIError, match="empty"):
        oa.single_prompt(completion(prompt=""))
    with pytest.raises(oa.OpenAIError, match="one prompt"):
        oa.single_prompt(completion(prompt=["a", "b"]))
    assert oa.single_prompt(completion(prompt=[[1, 2]])) == [1, 2]
    with pytest.raises(oa.OpenAIError, match="top_logprobs requires logprobs"):
        build_sampling(chat(top_logprobs=2), 5, 100, None)


def test_parse_errors():
    for body, code in [(b"", "invalid_json"), (b"{", "invalid_json"), (b'"str"', "invalid_type"),
                       (b'{"model": "m"}', "missing_required_parameter"),
                       (b'{"model": "m", "prompt": "x", "stream": "yes"}', "invalid_type")]:
        with pytest.raises(oa.OpenAIError) as e:
            oa.parse_request("completion", body)
        assert e.value.status == 400 and e.value.code == code
    with pytest.raises(oa.OpenAIError) as e:
        oa.parse_request("chat", b'{"model": "m", "messages": []}')
    assert e.value.param == "messages"
    with pytest.raises(oa.OpenAIError) as e:
        oa.parse_request("chat", b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}')
    assert e.value.param == "messages"


def test_error_body_shape():
    body = oa.unavailable("no workers").body()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert oa.unavailable("x").headers["Retry-After"]
    assert oa.model_not_found("x").status == 404 and oa.unauthorized().status == 401


def test_logprob_formatting():
    fmt = oa.LogprobFormatter(lambda i: f"<{i}>")
    lps = [common_pb2.PositionLogprobs(logprob=-1.0, top=[common_pb2.TokenLogprob(token_id=5, logprob=-1.0)]),
           common_pb2.PositionLogprobs(logprob=-2.0, top=[common_pb2.TokenLogprob(token_id=6, logprob=-0.1)])]
    c = fmt.completion([5, 7], lps, 1)
    assert c == {"tokens": ["<5>", "<7>"], "token_logprobs": [-1.0, -2.0],
                 "top_logprobs": [{"<5>": -1.0}, {"<6>": pytest.approx(-0.1)}], "text_offset": [0, 3]}
    ch = fmt.chat([5], lps[:1])
    assert ch[0]["token"] == "<5>" and ch[0]["top_logprobs"][0]["token"] == "<5>"
    merged = oa.merge_completion_logprobs([c, fmt.completion([8], lps[:1], 1)])
    assert merged["text_offset"] == [0, 3, 6] and len(merged["tokens"]) == 3


def test_grpc_sampling_check():
    sp = check_sampling(common_pb2.SamplingParams(), 10, 100)
    assert sp.max_tokens == 90 and sp.top_p == 1.0
    for bad, msg in [(dict(max_tokens=95), "exceeds"), (dict(top_p=2), "top_p"), (dict(temperature=-1), "temperature"),
                     (dict(stop=[""]), "stop")]:
        with pytest.raises(ValueError, match=msg):
            check_sampling(common_pb2.SamplingParams(**bad), 10, 100)
    with pytest.raises(ValueError, match="empty"):
        check_sampling(common_pb2.SamplingParams(), 0, 100)


def test_penalties_bias_and_n_map_to_the_proto():
    sp = build_sampling(completion(n=4, presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2,
                                      logit_bias={"7": -100, "9": 2.5}), 5, 100, 16)
    assert (sp.presence_penalty, sp.frequency_penalty) == (0.5, -1.0)
    assert sp.repetition_penalty == pytest.approx(1.2) and dict(sp.logit_bias) == {7: -100.0, 9: 2.5}
    assert build_sampling(completion(), 5, 100, 16).repetition_penalty == 1.0
    assert build_sampling(completion(echo=True, logprobs=2), 5, 100, 16).prompt_logprobs == 2
    assert build_sampling(completion(echo=True), 5, 100, 16).prompt_logprobs is None
    assert build_sampling(completion(logprobs=2), 5, 100, 16).prompt_logprobs is None


@pytest.mark.parametrize("req,param", [
    (dict(functions=[{"name": "f"}]), "functions"),
    (dict(function_call="auto"), "function_call"),
    (dict(audio={"voice": "x"}), "audio"),
    (dict(modalities=["text", "audio"]), "modalities"),
    (dict(prediction={"type": "content", "content": "x"}), "prediction"),
    (dict(web_search_options={}), "web_search_options"),
    (dict(reasoning_effort="low"), "reasoning_effort"),
    (dict(verbosity="low"), "verbosity"),
    (dict(prompt_cache_key="k"), "prompt_cache_key"),
])
def test_unsupported_chat_parameters_are_refused_by_name(req, param):
    with pytest.raises(oa.OpenAIError) as e:
        build_sampling(chat(**req), 5, 100, None)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


def structured(req, plan=None):
    """The grammar the HTTP API's path sends (None: free text)."""
    default_max = 16 if isinstance(req, oa.CompletionRequest) else None
    try:
        return check_request(oa.sampling_request(req, default_max, plan), 5, 100, None, LIMITS).structured
    except SamplingError as e:
        raise oa.invalid(e) from None


def test_structured_outputs_and_tools_validate():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    so = structured(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
    assert so.kind == "json_schema"
    assert structured(chat(response_format={"type": "json_object"})).kind == "json_object"
    assert structured(chat(response_format={"type": "text"})) is None
    assert structured(completion(regex="[a-z]+")).spec == "[a-z]+"
    for req, param in ((completion(regex="([a-"), "regex"), (completion(ebnf="root ::= "), "ebnf"),
                       (chat(regex="a", ebnf='root ::= "a"'), "ebnf"),
                       (chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
                        "response_format")):
        with pytest.raises(oa.OpenAIError) as e:
            structured(req)
        assert e.value.status == 400 and e.value.param == param
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    plan = oa.tool_plan(chat(tools=tools, tool_choice="required"), None)
    so = structured(chat(tools=tools), plan)
    assert plan.choice == "required" and '"minItems": 1' in so.spec
    named = oa.tool_plan(chat(tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}}), None)
    assert named.named == "get_weather"
    assert oa.tool_plan(chat(tools=tools), "qwen25").choice == "auto"
    for req, parser in ((chat(tools=tools), None),  # auto needs a parser
                        (chat(tool_choice="required"), "qwen25"),  # no tools
                        (chat(tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}), None),
                        (chat(tools=tools * 2, tool_choice="required"), None)):
        with pytest.raises(oa.OpenAIError) as e:
            oa.tool_plan(req, parser)
        assert e.value.param in ("tools", "tool_choice")
