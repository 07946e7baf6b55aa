"""Mapping between tandem.v1 messages and engine types."""
from __future__ import annotations

from tandem.engine.engine import StepOutput
from tandem.engine.sampling_params import SamplingParams, StructuredOutput
from tandem.routing.grammar_check import kind_and_spec
from tandem.v1 import common_pb2

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """Proto zero values mean defaults (see common.proto); validation is the engine's."""
    if p.max_tokens <= 0:
        raise ValueError(f"max_tokens={p.max_tokens}: must be > 0")
    return SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p if p.top_p else 1.0,
        top_k=p.top_k if p.top_k > 0 else -1,  # the one place the proto's "off" (0 or -1) becomes the engine's -1
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
    )


def structured_from_proto(p: common_pb2.StructuredOutput) -> StructuredOutput:
    return StructuredOutput(*kind_and_spec(p))


def structured_to_proto(so: StructuredOutput) -> common_pb2.StructuredOutput:
    if so.kind == "json_object":
        return common_pb2.StructuredOutput(json_object=True)
    return common_pb2.StructuredOutput(**{so.kind: so.spec})


def sampling_to_proto(sp: SamplingParams) -> common_pb2.SamplingParams:
    """The inverse of sampling_from_proto (decode forwards a request to a prefill worker)."""
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
    return p


def position_logprobs(logprob: float | None, top: list | None) -> common_pb2.PositionLogprobs:
    return common_pb2.PositionLogprobs(
        logprob=logprob if logprob is not None else 0.0,
        top=[common_pb2.TokenLogprob(token_id=int(t), logprob=float(lp)) for t, lp in (top or [])],
    )


def chunk_from_output(out: StepOutput, request_id: str, want_logprobs: bool) -> common_pb2.TokenChunk:
    chunk = common_pb2.TokenChunk(request_id=request_id, token_ids=out.new_token_ids)
    if want_logprobs and out.new_token_ids:
        tops = out.new_top_logprobs or [None] * len(out.new_token_ids)
        lps = out.new_logprobs or [None] * len(out.new_token_ids)
        chunk.logprobs.extend(position_logprobs(lp, top) for lp, top in zip(lps, tops))
    if out.prompt_logprobs:
        chunk.prompt_logprobs.extend(position_logprobs(lp, top) for lp, top in out.prompt_logprobs)
    if out.finished:
        reason = "error" if out.error else out.finish_reason
        chunk.finish_reason = FINISH_REASONS.get(reason, common_pb2.FINISH_REASON_ABORT)
        chunk.usage.CopyFrom(common_pb2.Usage(prompt_tokens=out.num_prompt_tokens,
                                              completion_tokens=out.num_output_tokens,
                                              cached_tokens=out.cached_tokens))
        if out.error:
            chunk.error.CopyFrom(common_pb2.ErrorDetail(code="engine_error", message=out.error))
    return chunk
