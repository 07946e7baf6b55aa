"""tandem.v1.SamplingParams <-> tandem.sampling.SamplingParams: the one mapping between the
proto and the parameters the router and the engine check (``SamplingParams.validate``).

Proto zero values mean defaults (see common.proto): top_p 0 is 1, top_k 0 (or -1) is off
(the engine's -1), repetition_penalty 0 is 1, an unset skip_special_tokens is true, and
top_logprobs > 0 implies logprobs. max_tokens is taken as it is: 0 means "not set" to the
router's gRPC API (which then fills in the rest of the context), and is refused by a worker.
No range is checked here.
"""
from __future__ import annotations

from tandem.sampling import SamplingError, SamplingParams, StructuredOutput
from tandem.v1 import common_pb2


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p if p.top_p else 1.0,
        top_k=p.top_k if p.top_k else -1,
        min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
        logprobs=p.logprobs or p.top_logprobs > 0,
        top_logprobs=p.top_logprobs,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty or 1.0,
        logit_bias=dict(p.logit_bias),
        structured=structured_from_proto(p.structured) if p.HasField("structured") else None,
        prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
        skip_special_tokens=p.skip_special_tokens if p.HasField("skip_special_tokens") else True,
    )


def sampling_to_proto(sp: SamplingParams) -> common_pb2.SamplingParams:
    """The inverse of sampling_from_proto (the router calls a worker, decode a prefill worker)."""
    p = common_pb2.SamplingParams(
        temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
        max_tokens=sp.max_tokens, stop=sp.stop, stop_token_ids=sp.stop_token_ids, ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs, top_logprobs=sp.top_logprobs, min_tokens=sp.min_tokens,
        presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty, logit_bias=sp.logit_bias)
    if sp.seed is not None:
        p.seed = sp.seed
    if sp.structured is not None:
        p.structured.CopyFrom(structured_to_proto(sp.structured))
    if sp.prompt_logprobs is not None:
        p.prompt_logprobs = sp.prompt_logprobs
    if not sp.skip_special_tokens:
        p.skip_special_tokens = False
    return p


def structured_from_proto(p: common_pb2.StructuredOutput) -> StructuredOutput:
    """ValueError when it names no kind, or json_object is false."""
    kind = p.WhichOneof("kind")
    if kind is None:
        raise SamplingError("structured", "structured: set one of json_schema, json_object, regex, ebnf")
    if kind == "json_object":
        if not p.json_object:
            raise SamplingError("structured", "structured.json_object must be true when set")
        return StructuredOutput(kind)
    return StructuredOutput(kind, getattr(p, kind))


def structured_to_proto(so: StructuredOutput) -> common_pb2.StructuredOutput:
    if so.kind == "json_object":
        return common_pb2.StructuredOutput(json_object=True)
    return common_pb2.StructuredOutput(**{so.kind: so.spec})
