"""OpenAI API mapping: request validation, sampling params, response and SSE chunk bodies,
and the error shape {"error": {"message", "type", "param", "code"}}.

Requests are parsed with strict pydantic models straight from the raw JSON body, so
malformed JSON and wrong types (a string for max_tokens, a number for model) are rejected
with 400 and the offending field named. Every OpenAI parameter either works or is refused
with a 400 naming it (``REFUSED`` lists the refused ones and why); unknown extra fields are
ignored, as vLLM and SGLang do, except other servers' structured-output spellings, which
are refused with the name to use. Extra fields as in vLLM/SGLang: top_k, min_p,
min_tokens, ignore_eos, stop_token_ids, skip_special_tokens, repetition_penalty, and
SGLang's regex / ebnf.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tandem.routing.request_check import SamplingRequest
from tandem.routing.tool_parsers import Tool, check_tool_name, forced_schema
from tandem.sampling import SamplingError, SamplingParams, StructuredOutput
from tandem.v1 import common_pb2


class OpenAIError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def unauthorized() -> OpenAIError:
    return OpenAIError(401, "Incorrect or missing API key: pass it as 'Authorization: Bearer <key>'.",
                       "invalid_request_error", None, "invalid_api_key")


def model_not_found(model: str, detail: str = "") -> OpenAIError:
    return OpenAIError(404, f"The model '{model}' does not exist." + (f" ({detail})" if detail else ""),
                       "invalid_request_error", "model", "model_not_found")


def invalid(e: SamplingError) -> OpenAIError:
    """A request the shared check refused (``tandem.routing.request_check``), as OpenAI's 400."""
    return bad_request(str(e), param=e.param, code=e.code)


def unavailable(message: str, retry_after: int = 1) -> OpenAIError:
    return OpenAIError(503, message, "service_unavailable_error", None, "service_unavailable",
                       {"Retry-After": str(retry_after)})


# ---- requests -----------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ToolDef(_Strict):
    """One of the request's ``tools``: a function the model may call."""

    type: Literal["function"]
    function: FunctionDef

    def tool(self) -> Tool:
        """The tool, checked (its name, a parameters schema of type object); OpenAIError(400) naming it."""
        f = self.function
        try:
            check_tool_name(f.name)
        except ValueError as e:
            raise bad_request(str(e) + ".", param="tools") from None
        if f.parameters is not None and f.parameters.get("type", "object") != "object":
            raise bad_request(f"tool {f.name}: parameters must be a JSON schema of type object.", param="tools")
        return Tool(f.name, f.description or "", f.parameters)


class ToolChoiceFunction(_Strict):
    """The tool a named tool_choice forces."""

    name: str


class NamedToolChoice(_Strict):
    """tool_choice ``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: ToolChoiceFunction


class _SamplingFields(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    user: str | None = None  # end-user id for abuse monitoring: nothing to do with it here
    response_format: ResponseFormat | None = None
    regex: str | None = None
    ebnf: str | None = None
    # Other fields are kept untyped (extra="allow"), so that the ones REFUSABLE names are refused
    # by name (see REFUSED), not answered with a type error; the rest are ignored.
    model_config = ConfigDict(strict=True, extra="allow")
    REFUSABLE: ClassVar[frozenset[str]] = frozenset({
        "store", "metadata", "service_tier", "prompt_cache_key", "guided_json", "guided_regex", "guided_grammar",
        "guided_choice"})


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    REFUSABLE: ClassVar[frozenset[str]] = _SamplingFields.REFUSABLE | {"best_of", "suffix"}


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class CalledFunction(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessageIn(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    REFUSABLE: ClassVar[frozenset[str]] = _SamplingFields.REFUSABLE | {
        "functions", "function_call", "audio", "modalities", "prediction", "web_search_options", "reasoning_effort", "verbosity"}


# OpenAI parameters tandem does not honour, refused when set to anything but their default.
REFUSED = {
    "store": (lambda v: v not in (None, False), "storing completions is not supported"),
    "metadata": (lambda v: v not in (None, {}), "metadata is only for stored completions, which are not supported"),
    "service_tier": (lambda v: v not in (None, "auto", "default"), "only the default service tier exists"),
    "prompt_cache_key": (lambda v: v is not None,
                         "not used: every request's prefix is cached automatically; remove it"),
    "functions": (lambda v: v is not None, "the deprecated functions API is not supported: use tools"),
    "function_call": (lambda v: v is not None, "the deprecated function_call is not supported: use tool_choice"),
    "audio": (lambda v: v is not None, "audio output is not supported"),
    "modalities": (lambda v: v not in (None, ["text"]), "only text output is supported"),
    "prediction": (lambda v: v is not None, "predicted outputs are not supported"),
    "web_search_options": (lambda v: v is not None, "web search is not supported"),
    "reasoning_effort": (lambda v: v is not None, "reasoning effort cannot be set for these models"),
    "verbosity": (lambda v: v is not None, "verbosity cannot be set for these models"),
    "best_of": (lambda v: v not in (None, 1), "only best_of=1 is supported (use n for several samples)"),
    "suffix": (lambda v: bool(v), "suffix (insertion) is not supported"),
    "guided_json": (lambda v: v is not None, "use response_format json_schema"),
    "guided_regex": (lambda v: v is not None, "use regex"),
    "guided_grammar": (lambda v: v is not None, "use ebnf"),
    "guided_choice": (lambda v: v is not None, "use regex with alternatives"),
}


def check_refused(req: _SamplingFields) -> None:
    for name in sorted(type(req).REFUSABLE):
        is_set, why = REFUSED[name]
        v = getattr(req, name, None)
        if is_set(v):
            raise bad_request(f"{name}: {why}.", param=name, code="unsupported_parameter")


class ToolPlan(BaseModel):
    """What a chat request's tools mean for rendering, decoding and parsing."""

    tools: list = []  # list[Tool]
    choice: str = "none"  # none | auto | required | named
    named: str | None = None
    parallel: bool = True


def tool_plan(req: ChatCompletionRequest, parser: str | None) -> ToolPlan:
    """Validate tools / tool_choice; raise OpenAIError(400) naming the field."""
    if not req.tools:
        if req.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice requires tools.", param="tool_choice")
        return ToolPlan()
    tools = [t.tool() for t in req.tools]
    if len({t.name for t in tools}) != len(tools):
        raise bad_request("tools: function names must be unique.", param="tools")
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    parallel = req.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in {t.name for t in tools}:
            raise bad_request(f"tool_choice names {name!r}, which is not in tools.", param="tool_choice")
        return ToolPlan(tools=tools, choice="named", named=name, parallel=parallel)
    if choice == "auto" and parser is None:
        raise bad_request("tool_choice 'auto' (the default with tools) needs the router's --tool-call-parser; "
                          "use tool_choice 'required' or a named function, or start the router with a parser.",
                          param="tool_choice")
    return ToolPlan(tools=tools, choice=choice, parallel=parallel)


def structured_output(req: _SamplingFields, plan: ToolPlan | None = None) -> list[tuple[str, StructuredOutput]]:
    """The grammars a request asks for (response_format, regex, ebnf, forced tool calls), each
    with the parameter that asked: at most one is allowed (``request_check`` says so)."""
    found = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", StructuredOutput("json_object")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema.", param="response_format")
        found.append(("response_format", StructuredOutput("json_schema", json.dumps(rf.json_schema.schema_))))
    if req.regex is not None:
        found.append(("regex", StructuredOutput("regex", req.regex)))
    if req.ebnf is not None:
        found.append(("ebnf", StructuredOutput("ebnf", req.ebnf)))
    if plan is not None and plan.choice in ("required", "named"):
        schema = forced_schema(plan.tools, plan.named or "required", plan.parallel)
        found.append(("tool_choice", StructuredOutput("json_schema", json.dumps(schema))))
    return found


def _format_validation_error(e: ValidationError) -> OpenAIError:
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
        return bad_request(f"Malformed JSON body: {err.get('msg')}", code="invalid_json")
    loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith(("function-", "union[")))
    # Union errors list every branch; the top-level field is what the caller needs.
    param = loc.split(".")[0] if loc else None
    if not loc:
        return bad_request(f"Request body must be a JSON object: {err.get('msg')}.", code="invalid_type")
    if err.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{loc}'.", param=param, code="missing_required_parameter")
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 80 else type(value).__name__
    return bad_request(f"Invalid value for '{loc}': {err.get('msg')} (got {shown}).", param=param,
                       code="invalid_type")


def parse_request(kind: Literal["completion", "chat"], body: bytes):
    """Parse and type-check a raw JSON body; raise OpenAIError(400) naming the bad field."""
    cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
    if not body or not body.strip():
        raise bad_request("Request body is empty; expected a JSON object.", code="invalid_json")
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        raise _format_validation_error(e) from None


def single_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request (a list of one prompt is accepted)."""
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise bad_request(f"Only one prompt per request is supported (got {len(p)}).", param="prompt")
        p = p[0]
    if isinstance(p, str) and not p:
        raise bad_request("The prompt is empty.", param="prompt", code="empty_prompt")
    if isinstance(p, list) and not p:
        raise bad_request("The prompt is empty.", param="prompt", code="empty_prompt")
    return p


def sampling_request(req: _SamplingFields, default_max_tokens: int | None,
                     plan: ToolPlan | None = None) -> SamplingRequest:
    """The request's sampling fields in the engine's terms (``request_check`` checks them);
    raise OpenAIError(400) naming the field for what only the OpenAI shape can get wrong."""
    check_refused(req)
    bias = {}
    for k, v in (req.logit_bias or {}).items():
        try:
            bias[int(k)] = v
        except ValueError:
            raise bad_request(f"logit_bias key {k!r}: must be a token id.", param="logit_bias") from None
    names = {"prompt": "messages"} if isinstance(req, ChatCompletionRequest) else {}
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens, names["max_tokens"] = req.max_completion_tokens, "max_completion_tokens"
    want_logprobs, top_n = False, 0
    if isinstance(req, CompletionRequest) and req.logprobs is not None:
        want_logprobs, top_n = True, req.logprobs  # completions: logprobs=k is the top-k count
        names["top_logprobs"] = "logprobs"
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs=true.", param="top_logprobs")
        want_logprobs, top_n = bool(req.logprobs), (req.top_logprobs or 0)
    sp = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 0,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k if req.top_k else -1,  # 0 and -1 both mean off
        min_p=req.min_p or 0.0, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
        ignore_eos=bool(req.ignore_eos), min_tokens=req.min_tokens or 0, logprobs=want_logprobs,
        top_logprobs=top_n, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty, logit_bias=bias,
        skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens)
    return SamplingRequest(sp, n=1 if req.n is None else req.n, max_tokens_given=max_tokens is not None,
                           default_max_tokens=default_max_tokens, structured=structured_output(req, plan),
                           echo=bool(getattr(req, "echo", False)), names=names)


# ---- responses ----------------------------------------------------------------------

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}


def finish_reason_name(reason: int) -> str | None:
    return _FINISH.get(reason)


def new_request_id(kind: Literal["completion", "chat", "embedding"]) -> str:
    return {"completion": "cmpl-", "chat": "chatcmpl-", "embedding": "embd-"}[kind] + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class LogprobFormatter:
    """Turns per-token `PositionLogprobs` into OpenAI's completion or chat logprobs bodies."""

    def __init__(self, token_text) -> None:
        self.token_text = token_text  # id -> str
        self._offset = 0  # text_offset for completions

    def prompt(self, token_ids: Sequence[int], logprobs: Sequence, top_n: int) -> dict:
        """The echoed prompt's part of completion logprobs: the first token has none (null)."""
        rest = self.completion(token_ids[1:], logprobs, top_n, offset_from=self.token_text(token_ids[0]))
        rest["tokens"].insert(0, self.token_text(token_ids[0]))
        rest["token_logprobs"].insert(0, None)
        rest["text_offset"].insert(0, 0)
        if top_n:
            rest["top_logprobs"].insert(0, None)
        return rest

    def completion(self, token_ids: Sequence[int], logprobs: Sequence, top_n: int, offset_from: str = "") -> dict:
        self._offset += len(offset_from)
        tokens, lps, tops, offsets = [], [], [], []
        for tid, lp in zip(token_ids, logprobs, strict=False):
            s = self.token_text(tid)
            tokens.append(s)
            lps.append(lp.logprob)
            offsets.append(self._offset)
            self._offset += len(s)
            if top_n:
                tops.append({self.token_text(t.token_id): t.logprob for t in lp.top})
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops if top_n else None,
                "text_offset": offsets}

    def chat(self, token_ids: Sequence[int], logprobs: Sequence) -> list[dict]:
        out = []
        for tid, lp in zip(token_ids, logprobs, strict=False):
            s = self.token_text(tid)
            out.append({
                "token": s, "logprob": lp.logprob, "bytes": list(s.encode()),
                "top_logprobs": [
                    {"token": (ts := self.token_text(t.token_id)), "logprob": t.logprob, "bytes": list(ts.encode())}
                    for t in lp.top
                ],
            })
        return out


def merge_completion_logprobs(parts: list[dict]) -> dict | None:
    if not parts:
        return None
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    has_top = any(p["top_logprobs"] is not None for p in parts)
    for p in parts:
        out["tokens"] += p["tokens"]
        out["token_logprobs"] += p["token_logprobs"]
        out["text_offset"] += p["text_offset"]
        if has_top:
            out["top_logprobs"] += p["top_logprobs"] or []
    if not has_top:
        out["top_logprobs"] = None
    return out


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_body(rid: str, model: str, created: int, choices: list[dict], usage: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish: str | None,
                     logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [completion_choice(index, text, finish, logprobs)]}


def tool_calls_body(calls: Sequence, start: int = 0) -> list[dict]:
    """ToolCall objects (tandem.routing.tool_parsers) as OpenAI's message.tool_calls."""
    return [{"index": start + i, "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls)]


def chat_choice(index: int, content: str | None, finish: str | None, logprobs: list[dict] | None,
                reasoning: str | None = None, tool_calls: Sequence = ()) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in tool_calls_body(tool_calls)]
    return {"index": index, "message": message,
            "logprobs": {"content": logprobs} if logprobs is not None else None, "finish_reason": finish}


def chat_body(rid: str, model: str, created: int, choices: list[dict], usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish: str | None,
               logprobs: list[dict] | None = None) -> dict:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{
            "index": index, "delta": delta,
            "logprobs": {"content": logprobs} if logprobs is not None else None,
            "finish_reason": finish,
        }],
    }


def usage_chunk(rid: str, model: str, created: int, kind: Literal["completion", "chat"], usage: dict) -> dict:
    return {
        "id": rid, "object": "text_completion" if kind == "completion" else "chat.completion.chunk",
        "created": created, "model": model, "choices": [], "usage": usage,
    }


def models_body(models: list[str] | str, created: int, extra: Sequence[str] = ()) -> dict:
    """/v1/models: ``models`` first (the base model and its LoRA adapters, ``base:adapter``), then
    the ``extra`` models (embedding models the workers serve)."""
    models = [models] if isinstance(models, str) else list(models)
    names = models + [m for m in extra if m not in models]
    return {"object": "list",
            "data": [{"id": m, "object": "model", "created": created, "owned_by": "tandem"} for m in names]}
