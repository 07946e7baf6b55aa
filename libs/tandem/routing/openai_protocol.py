"""OpenAI API mapping: request validation, sampling params, response and SSE chunk bodies,
and the error shape {"error": {"message", "type", "param", "code"}}.

Requests are parsed with strict pydantic models straight from the raw JSON body, so
malformed JSON and wrong types (a string for max_tokens, a number for model) are rejected
with 400 and the offending field named. Fields OpenAI defines but tandem cannot honour
(n > 1, echo, penalties) are refused rather than silently ignored; unknown extra fields are
ignored, as vLLM and SGLang do. Extra sampling fields as in vLLM/SGLang: top_k, min_p,
min_tokens, ignore_eos, stop_token_ids, skip_special_tokens.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tandem.v1 import common_pb2

MAX_TOP_LOGPROBS = 20


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


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{model}' does not exist.", "invalid_request_error", "model",
                       "model_not_found")


def unavailable(message: str, retry_after: int = 1) -> OpenAIError:
    return OpenAIError(503, message, "service_unavailable_error", None, "service_unavailable",
                       {"Retry-After": str(retry_after)})


# ---- requests -----------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


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
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    user: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

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


def build_sampling(req: _SamplingFields, prompt_tokens: int, context_length: int,
                   default_max_tokens: int | None) -> common_pb2.SamplingParams:
    """Validate sampling fields against the prompt and model; return the proto SamplingParams."""
    if req.n not in (None, 1):
        raise bad_request(f"n={req.n}: only n=1 is supported.", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if v not in (None, 0, 0.0):
            raise bad_request(f"{name}={v}: penalties are not supported (use 0).", param=name)
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise bad_request("echo=true is not supported.", param="echo")
        if req.best_of not in (None, 1):
            raise bad_request(f"best_of={req.best_of}: only 1 is supported.", param="best_of")
        if req.suffix:
            raise bad_request("suffix is not supported.", param="suffix")
    if prompt_tokens <= 0:
        raise bad_request("The prompt is empty.", param="prompt", code="empty_prompt")
    if prompt_tokens >= context_length:
        raise bad_request(
            f"This model's maximum context length is {context_length} tokens, but the prompt has "
            f"{prompt_tokens} tokens.", param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded")
    max_tokens = req.max_tokens
    max_param = "max_tokens"
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens if default_max_tokens is not None else context_length - prompt_tokens
        max_tokens = min(max_tokens, context_length - prompt_tokens)
    if max_tokens < 1:
        raise bad_request(f"{max_param}={max_tokens}: must be at least 1.", param=max_param)
    if prompt_tokens + max_tokens > context_length:
        raise bad_request(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
            f"completion). Please reduce the prompt or {max_param}.", param=max_param,
            code="context_length_exceeded")
    temperature = 1.0 if req.temperature is None else req.temperature
    if temperature < 0:
        raise bad_request(f"temperature={temperature}: must be >= 0.", param="temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise bad_request(f"top_p={top_p}: must be in (0, 1].", param="top_p")
    top_k = req.top_k or 0  # 0 and -1 both mean off in tandem.v1; the worker maps them for the engine
    if top_k < -1:
        raise bad_request(f"top_k={top_k}: must be -1 or 0 (off) or >= 1.", param="top_k")
    min_p = req.min_p or 0.0
    if not 0 <= min_p <= 1:
        raise bad_request(f"min_p={min_p}: must be in [0, 1].", param="min_p")
    min_tokens = req.min_tokens or 0
    if min_tokens < 0 or min_tokens > max_tokens:
        raise bad_request(f"min_tokens={min_tokens}: must be in [0, max_tokens={max_tokens}].", param="min_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise bad_request("stop strings must be non-empty.", param="stop")
    stop_ids = list(req.stop_token_ids or [])
    if any(i < 0 for i in stop_ids):
        raise bad_request("stop_token_ids must be >= 0.", param="stop_token_ids")
    want_logprobs, top_n = False, 0
    if isinstance(req, CompletionRequest) and req.logprobs is not None:
        if not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request(f"logprobs={req.logprobs}: must be in [0, {MAX_TOP_LOGPROBS}].", param="logprobs")
        want_logprobs, top_n = True, req.logprobs
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None:
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise bad_request(f"top_logprobs={req.top_logprobs}: must be in [0, {MAX_TOP_LOGPROBS}].",
                                  param="top_logprobs")
            if not req.logprobs:
                raise bad_request("top_logprobs requires logprobs=true.", param="top_logprobs")
        want_logprobs, top_n = bool(req.logprobs), (req.top_logprobs or 0)
    sp = common_pb2.SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, max_tokens=max_tokens,
        stop=stop, stop_token_ids=stop_ids, ignore_eos=bool(req.ignore_eos), logprobs=want_logprobs,
        top_logprobs=top_n, min_tokens=min_tokens,
    )
    if req.seed is not None:
        if not 0 <= req.seed < 2 ** 64:
            raise bad_request(f"seed={req.seed}: must be in [0, 2**64).", param="seed")
        sp.seed = req.seed
    return sp


# ---- responses ----------------------------------------------------------------------

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}


def finish_reason_name(reason: int) -> str | None:
    return _FINISH.get(reason)


def new_request_id(kind: Literal["completion", "chat"]) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


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

    def completion(self, token_ids: Sequence[int], logprobs: Sequence, top_n: int) -> dict:
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


def completion_body(rid: str, model: str, created: int, text: str, finish: str | None,
                    usage: dict, logprobs: dict | None) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        "usage": usage,
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None,
                     logprobs: dict | None = None) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }


def chat_body(rid: str, model: str, created: int, text: str, finish: str | None, usage: dict,
              logprobs: list[dict] | None) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": {"content": logprobs} if logprobs is not None else None,
            "finish_reason": finish,
        }],
        "usage": usage,
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None,
               logprobs: list[dict] | None = None) -> dict:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{
            "index": 0, "delta": delta,
            "logprobs": {"content": logprobs} if logprobs is not None else None,
            "finish_reason": finish,
        }],
    }


def usage_chunk(rid: str, model: str, created: int, kind: Literal["completion", "chat"], usage: dict) -> dict:
    return {
        "id": rid, "object": "text_completion" if kind == "completion" else "chat.completion.chunk",
        "created": created, "model": model, "choices": [], "usage": usage,
    }


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "tandem"}]}
