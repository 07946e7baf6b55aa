"""Per-request sampling parameters and the one validation of a request (field names as in
vLLM / SGLang / OpenAI).

Every front door checks a request here and nowhere else: the router's HTTP and gRPC APIs
(through their one shared ``prepare``), the workers (a request that reaches one directly)
and the engine. A bad value raises :class:`SamplingError`, a ValueError whose ``param``
names the field, so each door answers the same words (HTTP 400 with ``param``, gRPC
INVALID_ARGUMENT, ValueError offline). Torch-free and proto-free: the router imports it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

MAX_LOGIT_BIAS = 100.0  # a logit_bias value is in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS] (OpenAI's range)
MAX_TOP_LOGPROBS = 20  # top_logprobs and prompt_logprobs are in [0, MAX_TOP_LOGPROBS] (OpenAI's range)


class SamplingError(ValueError):
    """A request the server can never run; ``param`` names the offending field, ``code`` (when
    set) says why in a word (OpenAI's error code, e.g. ``context_length_exceeded``)."""

    def __init__(self, param: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar the output must follow (compiled with xgrammar, see ``tandem.engine.grammar``).

    kind ``json_object`` (any JSON object; spec unused), ``json_schema`` (spec: the schema as
    JSON text; strict: no properties beyond the schema's), ``regex`` or ``ebnf`` (spec: the
    pattern / grammar, SGLang's request fields of the same names).
    """

    kind: str
    spec: str = ""

    KINDS = ("json_object", "json_schema", "regex", "ebnf")

    def validate(self) -> None:
        if self.kind not in self.KINDS:
            raise SamplingError("structured", f"structured output kind={self.kind!r}: allowed {list(self.KINDS)}")
        if self.kind != "json_object" and not self.spec:
            raise SamplingError("structured", f"{self.kind} is empty")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except ValueError as e:
                raise SamplingError("structured", f"json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise SamplingError("structured", "json_schema must be a JSON object")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. ``seed`` gives the request its own random stream, so
    the same seed yields the same tokens whether the request runs alone or in a batch.
    ``logprobs`` returns the chosen token's logprob; ``top_logprobs`` (n > 0) also the
    n most likely tokens. Stop strings are not included in the returned text; they are
    matched on the output text decoded with ``skip_special_tokens`` (vLLM's field).

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
    skip_special_tokens: bool = True  # the output text (stop strings, returned text) leaves special tokens out

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise SamplingError naming the first bad field (token ids checked against
        ``vocab_size`` when given)."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise SamplingError("max_tokens", f"max_tokens={self.max_tokens!r}: must be an integer > 0")
        if not math.isfinite(self.temperature) or self.temperature < 0:  # NaN passes a plain `< 0`
            raise SamplingError("temperature", f"temperature={self.temperature}: must be a finite number >= 0")
        if not (0.0 < self.top_p <= 1.0):
            raise SamplingError("top_p", f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise SamplingError("top_k", f"top_k={self.top_k}: must be -1 (off) or >= 1")
        if not (0.0 <= self.min_p <= 1.0):
            raise SamplingError("min_p", f"min_p={self.min_p}: must be in [0, 1]")
        if self.seed is not None and not 0 <= self.seed < 2 ** 64:
            raise SamplingError("seed", f"seed={self.seed}: must be in [0, 2**64)")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise SamplingError("min_tokens", f"min_tokens={self.min_tokens}: must be in [0, max_tokens={self.max_tokens}]")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingError("top_logprobs", f"top_logprobs={self.top_logprobs}: must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingError("prompt_logprobs",
                                f"prompt_logprobs={self.prompt_logprobs}: must be in [0, {MAX_TOP_LOGPROBS}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop", f"stop={self.stop!r}: stop strings must be non-empty strings")
        bad = [t for t in self.stop_token_ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise SamplingError("stop_token_ids", f"stop_token_ids={bad}: outside the vocabulary"
                                + (f" [0, {vocab_size})" if vocab_size is not None else " (ids are >= 0)"))
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise SamplingError(name, f"{name}={v}: must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise SamplingError("repetition_penalty", f"repetition_penalty={self.repetition_penalty}: must be in (0, 10]")
        for tid, v in self.logit_bias.items():
            if tid < 0 or (vocab_size is not None and tid >= vocab_size):
                raise SamplingError("logit_bias", f"logit_bias token {tid}: outside the vocabulary"
                                    + (f" [0, {vocab_size})" if vocab_size is not None else " (ids are >= 0)"))
            if not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
                raise SamplingError("logit_bias", f"logit_bias value {v}: must be in [-100, 100]")
        if self.structured is not None:
            self.structured.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether the sampler's penalties path (penalties or logit bias) is needed."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


def check_prompt(num_tokens: int, context_length: int) -> None:
    """The prompt's own rule: at least one token, and room for at least one output token."""
    if num_tokens <= 0:
        raise SamplingError("prompt", "empty prompt: at least one token is required")
    if num_tokens >= context_length:
        raise SamplingError("prompt", f"this model's maximum context length is {context_length} tokens, but the "
                            f"prompt has {num_tokens} (prompt + at least one output token must fit)",
                            "context_length_exceeded")


def rest_of_context(num_prompt_tokens: int, context_length: int) -> int:
    """The default max_tokens of an API request that sets none: what fits after the prompt."""
    return max(context_length - num_prompt_tokens, 1)


def check_fits_context(num_prompt_tokens: int, sp: SamplingParams, context_length: int) -> None:
    """An API request promises max_tokens: the prompt and all of them must fit the context."""
    if num_prompt_tokens + sp.max_tokens > context_length:
        raise SamplingError("max_tokens", f"this model's maximum context length is {context_length} tokens; the "
                            f"prompt ({num_prompt_tokens}) + max_tokens ({sp.max_tokens}) exceeds it: reduce the "
                            "prompt or max_tokens", "context_length_exceeded")


def check_continuation(num_prompt_tokens: int, num_output_tokens: int, sp: SamplingParams,
                       context_length: int) -> None:
    """A migrated request (its prompt plus the ``num_output_tokens`` it already generated
    elsewhere) can continue: something is left of max_tokens, no prompt logprobs are asked for
    again, and the sequence leaves room for one more token in the context. The router checks
    it before migrating, the worker when the request arrives."""
    if num_output_tokens >= sp.max_tokens:
        raise SamplingError("output_ids", f"{num_output_tokens} tokens already generated: nothing is left of "
                            f"max_tokens={sp.max_tokens}")
    if num_output_tokens and sp.prompt_logprobs is not None:
        raise SamplingError("prompt_logprobs", "a continued request (output_ids) cannot ask for prompt_logprobs "
                            "again: they came with its first chunk")
    if num_prompt_tokens + num_output_tokens >= context_length:
        raise SamplingError("output_ids", f"this model's maximum context length is {context_length} tokens, but the "
                            f"prompt ({num_prompt_tokens}) + the tokens already generated ({num_output_tokens}) "
                            "leave no room for another token", "context_length_exceeded")
