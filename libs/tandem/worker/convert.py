"""Engine outputs as tandem.v1 messages (sampling parameters: ``tandem.routing.sampling``)."""
from __future__ import annotations

from tandem.engine import StepOutput
from tandem.v1 import common_pb2

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}


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
        if out.stop_text_pos is not None:
            chunk.stop_text_pos = out.stop_text_pos
            chunk.matched_stop = out.matched_stop or ""
        if out.error:
            chunk.error.CopyFrom(common_pb2.ErrorDetail(code="engine_error", message=out.error))
    return chunk
