"""OpenAI's embeddings API (``POST /v1/embeddings``): the request's checks and the response body.

A request's ``input`` is a string, a list of strings, a list of token ids, or a list of lists of
token ids; it becomes a list of ``tandem.v1.EmbedInput`` (text is tokenized by the embedding
worker, with its model's tokenizer). The checks here are the one rule for both APIs (HTTP and
gRPC ``Router.Embed``): each failure names the field (``input[3]``, ``dimensions``,
``encoding_format``) as OpenAI's ``param``.

``encoding_format`` ``base64`` returns each vector as the base64 of its float32 little-endian
bytes, as OpenAI does (the official Python client asks for it by default and decodes it).
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import numpy as np
from tandem.v1 import common_pb2

# OpenAI's limit on inputs per request.
MAX_INPUTS = 2048
ENCODING_FORMATS = ("float", "base64")
_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}


class EmbeddingInputError(ValueError):
    """A bad embeddings request: ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class EmbeddingRequest:
    """A parsed /v1/embeddings body (inputs already checked)."""

    model: str
    inputs: list[common_pb2.EmbedInput]
    dimensions: int | None = None
    encoding_format: str = "float"


def text_input(text: str) -> common_pb2.EmbedInput:
    return common_pb2.EmbedInput(text=text)


def token_input(ids: list[int]) -> common_pb2.EmbedInput:
    return common_pb2.EmbedInput(token_ids=common_pb2.TokenSequence(ids=ids))


def check_inputs(inputs: list[common_pb2.EmbedInput]) -> None:
    """The inputs' one check (both APIs): 1..MAX_INPUTS inputs, each a non-empty text or a
    non-empty list of token ids >= 0. EmbeddingInputError naming the input."""
    if not inputs:
        raise EmbeddingInputError("input", "at least one input is required")
    if len(inputs) > MAX_INPUTS:
        raise EmbeddingInputError("input", f"{len(inputs)} inputs; at most {MAX_INPUTS} per request")
    for i, x in enumerate(inputs):
        kind = x.WhichOneof("input")
        if kind is None:
            raise EmbeddingInputError(f"input[{i}]", "set text or token_ids")
        if kind == "text" and not x.text:
            raise EmbeddingInputError(f"input[{i}]", "empty string")
        if kind == "token_ids":
            if not x.token_ids.ids:
                raise EmbeddingInputError(f"input[{i}]", "empty list of token ids")
            if min(x.token_ids.ids) < 0:
                raise EmbeddingInputError(f"input[{i}]", "token ids must be >= 0")


def check_dimensions(dimensions: int | None) -> int | None:
    if dimensions is None:
        return None
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
        raise EmbeddingInputError("dimensions", f"must be an integer >= 1, got {dimensions!r}")
    return dimensions


def _is_token_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _inputs_of(raw) -> list[common_pb2.EmbedInput]:
    """OpenAI's four input shapes -> EmbedInputs; EmbeddingInputError naming the element."""
    if isinstance(raw, str):
        return [text_input(raw)]
    if not isinstance(raw, list):
        raise EmbeddingInputError("input", "must be a string, a list of strings, a list of token ids or a list "
                                  f"of lists of token ids, got {type(raw).__name__}")
    if not raw:
        raise EmbeddingInputError("input", "at least one input is required")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
        if any(t > 2**31 - 1 for t in raw):
            raise EmbeddingInputError("input", "token ids must be < 2^31")
        return [token_input(raw)]  # one input of token ids
    out = []
    for i, v in enumerate(raw):
        if isinstance(v, str):
            out.append(text_input(v))
        elif _is_token_list(v):
            if any(t > 2**31 - 1 for t in v):
                raise EmbeddingInputError(f"input[{i}]", "token ids must be < 2^31")
            out.append(token_input(v))
        else:
            raise EmbeddingInputError(f"input[{i}]", "must be a string or a list of integer token ids, got "
                                      f"{type(v).__name__}")
    return out


def parse_request(body: bytes) -> EmbeddingRequest:
    """The request in a /v1/embeddings body; EmbeddingInputError naming the field."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise EmbeddingInputError("body", f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise EmbeddingInputError("body", "must be a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise EmbeddingInputError(unknown[0], f"unknown field (accepted: {', '.join(sorted(_FIELDS))})")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise EmbeddingInputError("model", "required (a model name)")
    if "input" not in data:
        raise EmbeddingInputError("input", "required")
    fmt = data.get("encoding_format")
    fmt = "float" if fmt is None else fmt
    if fmt not in ENCODING_FORMATS:
        raise EmbeddingInputError("encoding_format", f"{fmt!r}: allowed are {', '.join(ENCODING_FORMATS)}")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise EmbeddingInputError("user", "must be a string")
    inputs = _inputs_of(data["input"])
    check_inputs(inputs)
    return EmbeddingRequest(model, inputs, check_dimensions(data.get("dimensions")), fmt)


def encode_vector(values, encoding_format: str):
    """One vector as OpenAI returns it: a list of floats, or base64 of float32 little-endian bytes."""
    if encoding_format == "base64":
        arr = np.asarray(values, dtype="<f4")
        return base64.b64encode(arr.tobytes()).decode("ascii")
    return list(values)


def response_body(embeddings, model: str, prompt_tokens: int, encoding_format: str) -> dict:
    """OpenAI's embeddings response: ``embeddings`` are tandem.v1.Embedding, in input order."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_vector(e.values, encoding_format)}
                 for i, e in enumerate(embeddings)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }

