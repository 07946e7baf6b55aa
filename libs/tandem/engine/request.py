"""Request state inside the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tandem.sampling import IncrementalDetokenizer, SamplingParams, StopStrings


class Mode(enum.StrEnum):
    NORMAL = "normal"  # local prefill + decode (aggregated)
    PREFILL_ONLY = "prefill_only"  # prefill, sample the first token, hold the pages
    EXTERNAL = "external"  # KV filled from outside; decode after activate()


class Status(enum.StrEnum):
    WAITING = "waiting"  # queued for (re)prefill
    RUNNING = "running"  # in the running batch (prefilling in chunks or decoding)
    HELD = "held"  # prefill-only request done, pages kept until release()
    EXTERNAL_WAIT = "external_wait"  # pages allocated, waiting for its KV and first token
    FINISHED = "finished"


@dataclass
class Request:
    rid: str
    prompt_ids: list
    sampling: SamplingParams
    mode: Mode = Mode.NORMAL
    status: Status = Status.WAITING
    output_ids: list = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    pages: list = field(default_factory=list)  # page table: pages[i] holds tokens [i*ps, (i+1)*ps)
    num_computed: int = 0  # tokens whose KV is in pages
    num_tree_pages: int = 0  # leading pages owned by the radix cache (matched prefix)
    tree_node: object = None  # last matched radix node (locked while we hold it)
    cached_tokens: int = 0
    finish_reason: str | None = None
    seed: int = 0  # keys the request's counter-based sampling noise (tandem.engine.philox)
    aux_slot: int | None = None
    pages_reported: int = 0  # prefill-only: pages already reported final (StepOutput.pages_final)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    admit_seq: int = 0
    grammar: object = None  # GrammarState of a structured-output request (tandem.engine.grammar)
    # Stop strings: the output text so far (decoded incrementally) and the search over it.
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopStrings | None = None
    prompt_logprobs: list = field(default_factory=list)  # [(logprob, top)] of prompt tokens 1..L-1
    num_pending: int = 0  # 1 while output_ids ends with a placeholder for a token being sampled
    lora_name: str | None = None  # the LoRA adapter it runs under (None: the base model); part of its cache keys
    lora_slot: int = -1  # the device slot holding its adapter while it runs (-1: none)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    @property
    def all_ids(self) -> list:
        return self.prompt_ids + self.output_ids

    def token_at(self, i: int) -> int:
        """all_ids[i] without building all_ids."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token_in_flight(self) -> bool:
        """Its token being sampled is its last (max_tokens reached): nothing more to schedule."""
        return self.num_pending > 0 and len(self.output_ids) >= self.sampling.max_tokens

    @property
    def num_uncomputed(self) -> int:
        return self.seq_len - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
