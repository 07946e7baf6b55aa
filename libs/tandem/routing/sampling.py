"""Validation of proto SamplingParams for the gRPC Router API (the HTTP API validates its
OpenAI fields in openai_protocol and produces already-valid params)."""
from __future__ import annotations

import math

from tandem.routing.grammar_check import check_structured
from tandem.v1 import common_pb2


def check_sampling(sp: common_pb2.SamplingParams, prompt_tokens: int, context_length: int) -> common_pb2.SamplingParams:
    """Return a copy with defaults filled in (max_tokens 0 -> rest of the context, top_p 0 -> 1);
    raise ValueError naming the bad field."""
    out = common_pb2.SamplingParams()
    out.CopyFrom(sp)
    if prompt_tokens <= 0:
        raise ValueError("prompt is empty")
    if prompt_tokens >= context_length:
        raise ValueError(f"prompt has {prompt_tokens} tokens; the model's context length is {context_length}")
    if out.max_tokens < 0:
        raise ValueError(f"max_tokens={out.max_tokens}: must be > 0 (0 = up to the context length)")
    if out.max_tokens == 0:
        out.max_tokens = context_length - prompt_tokens
    if prompt_tokens + out.max_tokens > context_length:
        raise ValueError(f"prompt ({prompt_tokens}) + max_tokens ({out.max_tokens}) exceeds the context length "
                         f"{context_length}")
    if not math.isfinite(out.temperature) or out.temperature < 0:  # NaN passes a plain `< 0`
        raise ValueError(f"temperature={out.temperature}: must be a finite number >= 0")
    if out.top_p == 0:
        out.top_p = 1.0
    if not 0 < out.top_p <= 1:
        raise ValueError(f"top_p={out.top_p}: must be in (0, 1]")
    if out.top_k < -1:
        raise ValueError(f"top_k={out.top_k}: must be -1 or 0 (off) or >= 1")
    if not 0 <= out.min_p <= 1:
        raise ValueError(f"min_p={out.min_p}: must be in [0, 1]")
    if out.min_tokens < 0 or out.min_tokens > out.max_tokens:
        raise ValueError(f"min_tokens={out.min_tokens}: must be in [0, max_tokens={out.max_tokens}]")
    if any(not s for s in out.stop):
        raise ValueError("stop strings must be non-empty")
    if not 0 <= out.top_logprobs <= 20:
        raise ValueError(f"top_logprobs={out.top_logprobs}: must be in [0, 20]")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(out, name) <= 2:
            raise ValueError(f"{name}={getattr(out, name)}: must be in [-2, 2]")
    if out.repetition_penalty == 0:
        out.repetition_penalty = 1.0
    if not 0 < out.repetition_penalty <= 10:
        raise ValueError(f"repetition_penalty={out.repetition_penalty}: must be in (0, 10] (0 = off)")
    for tid, v in out.logit_bias.items():
        if tid < 0 or not -100 <= v <= 100:
            raise ValueError(f"logit_bias {tid}: {v}: ids must be >= 0 and values in [-100, 100]")
    if out.HasField("prompt_logprobs") and not 0 <= out.prompt_logprobs <= 20:
        raise ValueError(f"prompt_logprobs={out.prompt_logprobs}: must be in [0, 20]")
    if out.HasField("structured"):
        check_structured(out.structured)
    return out
