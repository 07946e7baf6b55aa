"""What flows out of a step: the sampled tokens read back from the device (into
``Scheduler.update_from_output``) and the per-request results (out of ``EngineCore.step``)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SampledTokens:
    """One launched sampling step, on the host: row i is ``reqs[i]``'s new token."""

    reqs: list
    tokens: list  # [B] token ids
    logprobs: list | None = None  # [B] logprob of each sampled token (when some row asked)
    top_ids: list | None = None  # [B][K], K = the largest top_logprobs asked
    top_vals: list | None = None


@dataclass
class StepOutput:
    """What one request produced in one step. A request may get more than one in a step (a
    prefill-only request: its last chunk's pages, then its first token); they come in order.

    ``pages_final`` (prefill-only requests): pages whose KV became complete in this step, in
    page-table order; after the last chunk every page of the prompt has been listed once
    (the last, partial page too). ``num_computed_tokens``: prompt tokens whose KV is computed.
    ``finish_reason`` "prefill_done" (``prefill_done``): the first token is sampled and the
    pages stay held until ``EngineCore.release``.
    """

    rid: str
    new_token_ids: list
    new_logprobs: list = field(default_factory=list)  # per new token (when logprobs requested)
    new_top_logprobs: list = field(default_factory=list)  # per new token: [(token_id, logprob)]
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | prefill_done
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    stop_text_pos: int | None = None  # finished by a stop string: the output text ends here
    matched_stop: str | None = None  # finished by a stop string: which one
    prompt_logprobs: list = field(default_factory=list)  # with the first token: [(logprob, top)] of prompt 1..L-1
    pages_final: list = field(default_factory=list)
    num_computed_tokens: int = 0

    @property
    def prefill_done(self) -> bool:
        return self.finish_reason == "prefill_done"
