"""Per-request sampling parameters (field names as in vLLM / SGLang / OpenAI)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 1024


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar the output must follow (compiled with xgrammar, see ``grammar.py``).

    kind ``json_object`` (any JSON object; spec unused), ``json_schema`` (spec: the schema as
    JSON text; strict: no properties beyond the schema's), ``regex`` or ``ebnf`` (spec: the
    pattern / grammar, SGLang's request fields of the same names).
    """

    kind: str
    spec: str = ""

    KINDS = ("json_object", "json_schema", "regex", "ebnf")

    def validate(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"structured output kind={self.kind!r}: allowed {list(self.KINDS)}")
        if self.kind != "json_object" and not self.spec:
            raise ValueError(f"structured output {self.kind}: empty {self.kind}")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except ValueError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("json_schema must be a JSON object")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. ``seed`` gives the request its own random stream, so
    the same seed yields the same tokens whether the request runs alone or in a batch.
    ``logprobs`` returns the chosen token's logprob; ``top_logprobs`` (n > 0) also the
    n most likely tokens. Stop strings are not included in the returned text.

    Penalties follow OpenAI / vLLM: ``presence_penalty`` and ``frequency_penalty`` (in
    [-2, 2]) subtract ``presence * (count > 0) + frequency * count`` from a token's logit,
    counting the tokens generated so far; ``repetition_penalty`` (> 0, 1 = off) divides a
    positive logit (multiplies a negative one) of every token seen in the prompt or the
    output. ``logit_bias`` adds a value in [-100, 100] to a token's logit. All of them apply
    before temperature, also to greedy requests; logprobs stay the model's own.
    ``structured`` constrains the output to a grammar (``StructuredOutput``).
    ``prompt_logprobs`` (vLLM's name; k in [0, 20]) returns the logprob of every prompt token
    after the first, with its k most likely alternatives: the prompt is then computed in full
    (no prefix-cache match) and only where it is prefilled locally.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict = field(default_factory=dict)
    structured: StructuredOutput | None = None
    prompt_logprobs: int | None = None  # logprob of every prompt token after the first (+ this many top)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def validate(self, vocab_size: int | None = None) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be an integer > 0")
        if not math.isfinite(self.temperature) or self.temperature < 0:  # NaN passes a plain `< 0`
            raise ValueError(f"temperature={self.temperature}: must be a finite number >= 0")
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
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs={self.prompt_logprobs}: must be in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: stop strings must be non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise ValueError(f"{name}={v}: must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be in (0, 10]")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries: at most {MAX_LOGIT_BIAS_ENTRIES}")
        bad_bias = [v for v in self.logit_bias.values() if not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS]
        if bad_bias:
            raise ValueError(f"logit_bias value {bad_bias[0]}: must be in [-100, 100]")
        if self.structured is not None:
            self.structured.validate()
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"stop_token_ids={bad}: outside the vocabulary [0, {vocab_size})")
            bad = [t for t in self.logit_bias if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"logit_bias token {bad[0]}: outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether the sampler's penalties path (penalties or logit bias) is needed."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)
