"""The router's one check of a request, the same for the HTTP and the gRPC API.

Each API converts its request into a :class:`SamplingRequest` (its own field names and
defaults: OpenAI JSON in ``openai_protocol``, the proto in ``sampling``); ``check_request``
then fills in the default max_tokens, runs the one validation of ``tandem.sampling`` (the
same the workers and the engine run), the server's limits (``limits``, each a flag) and the
grammar check, and returns the SamplingParams the worker gets. A bad request raises
SamplingError naming the API's own parameter: HTTP answers 400 with it, gRPC
INVALID_ARGUMENT, with the same message.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tandem.routing.grammar_check import check_structured
from tandem.routing.limits import RequestLimits
from tandem.sampling import (
    SamplingError,
    SamplingParams,
    StructuredOutput,
    check_fits_context,
    check_prompt,
    rest_of_context,
)


@dataclass
class SamplingRequest:
    """An API request's sampling side, converted to the engine's terms but not checked yet."""

    sampling: SamplingParams  # max_tokens: whatever the client sent (ignored when not max_tokens_given)
    n: int = 1
    max_tokens_given: bool = True
    default_max_tokens: int | None = None  # max_tokens when not given, capped to the context (None: the rest of it)
    structured: list = field(default_factory=list)  # [(the API's parameter, StructuredOutput)]: at most one
    echo: bool = False  # the prompt comes back first; with logprobs, its logprobs too
    names: dict = field(default_factory=dict)  # a SamplingParams field -> the API's parameter, for errors


def check_request(req: SamplingRequest, prompt_tokens: int, context_length: int, vocab_size: int | None,
                  limits: RequestLimits) -> SamplingParams:
    """The SamplingParams to send, or SamplingError naming the API's parameter."""
    try:
        return _check(req, prompt_tokens, context_length, vocab_size, limits)
    except SamplingError as e:
        name = req.names.get(e.param, e.param)
        if name == e.param:
            raise
        raise SamplingError(name, str(e), e.code) from None


def _check(req: SamplingRequest, prompt_tokens: int, context_length: int, vocab_size: int | None,
           limits: RequestLimits) -> SamplingParams:
    limits.check_n(req.n)
    check_prompt(prompt_tokens, context_length)
    sp = req.sampling
    if not req.max_tokens_given:
        room = rest_of_context(prompt_tokens, context_length)
        sp.max_tokens = room if req.default_max_tokens is None else min(req.default_max_tokens, room)
    sp.validate(vocab_size)
    check_fits_context(prompt_tokens, sp, context_length)
    limits.check(prompt_tokens, sp, req.max_tokens_given)
    if req.echo and sp.logprobs and sp.prompt_logprobs is None:
        sp.prompt_logprobs = sp.top_logprobs  # echo + logprobs: the prompt's too, as OpenAI returns them
    sp.structured = _one_grammar(req.structured) if req.structured else sp.structured
    return sp


def _one_grammar(found: list) -> StructuredOutput:
    if len(found) > 1:
        names = [n for n, _ in found]
        raise SamplingError(names[-1], f"{' and '.join(names)} both constrain the output: use one")
    param, so = found[0]
    try:
        check_structured(so)
    except ValueError as e:
        raise SamplingError(param, f"{param}: {e}", "invalid_grammar") from None
    return so
