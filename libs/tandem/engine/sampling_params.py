"""Per-request sampling parameters (field names as in vLLM / SGLang)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. ``seed`` gives the request its own random stream, so
    the same seed yields the same tokens whether the request runs alone or in a batch.
    ``logprobs`` returns the chosen token's logprob; ``top_logprobs`` (n > 0) also the
    n most likely tokens. Stop strings are not included in the returned text.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list = field(default_factory=list)
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    def validate(self, vocab_size: int | None = None) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be an integer > 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k}: must be -1 (off) or >= 1")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p={self.min_p}: must be in [0, 1]")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens}: must be in [0, max_tokens={self.max_tokens}]")
        if self.top_logprobs < 0 or self.top_logprobs > 20:
            raise ValueError(f"top_logprobs={self.top_logprobs}: must be in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: stop strings must be non-empty strings")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"stop_token_ids={bad}: outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
