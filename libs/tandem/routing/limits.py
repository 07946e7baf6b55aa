"""Admission limits of a request, each a router flag, the same for the HTTP and the gRPC API
(``request_check`` applies them to the validated SamplingParams), so both front doors refuse
the same things with the same words.

A limit exceeded raises `LimitExceeded` (a SamplingError naming the parameter and the flag):
HTTP answers 400 with `param`, gRPC INVALID_ARGUMENT.
"""
from __future__ import annotations

from dataclasses import dataclass

from tandem.sampling import SamplingError, SamplingParams


class LimitExceeded(SamplingError):
    pass


@dataclass(frozen=True)
class RequestLimits:
    """The limits a router enforces, from its config (the flags' defaults are the only ones)."""

    max_prompt_tokens: int | None  # None: the model's context length is the only bound
    max_output_tokens: int | None
    max_n: int
    max_stop_strings: int
    max_stop_string_length: int
    max_logit_bias: int

    @classmethod
    def from_config(cls, cfg) -> RequestLimits:
        return cls(cfg.max_prompt_tokens, cfg.max_output_tokens, cfg.max_n, cfg.max_stop_strings,
                   cfg.max_stop_string_length, cfg.max_logit_bias)

    def check_n(self, n: int) -> None:
        if not 1 <= n <= self.max_n:
            raise LimitExceeded("n", f"n={n}: must be in [1, {self.max_n}] samples (--max-n)")

    def check(self, prompt_tokens: int, sampling: SamplingParams, max_tokens_given: bool) -> None:
        """Raise LimitExceeded for the first limit the request exceeds. A max_tokens the client
        did not set (the default: the rest of the context) is lowered to --max-output-tokens."""
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            raise LimitExceeded("prompt", f"the prompt has {prompt_tokens} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens} (--max-prompt-tokens)")
        if self.max_output_tokens is not None and sampling.max_tokens > self.max_output_tokens:
            if max_tokens_given:
                raise LimitExceeded("max_tokens", f"max_tokens={sampling.max_tokens}: this server generates at "
                                    f"most {self.max_output_tokens} tokens per request (--max-output-tokens)")
            sampling.max_tokens = self.max_output_tokens
            sampling.min_tokens = min(sampling.min_tokens, sampling.max_tokens)
        if len(sampling.stop) > self.max_stop_strings:
            raise LimitExceeded("stop", f"{len(sampling.stop)} stop strings: at most {self.max_stop_strings} "
                                "(--max-stop-strings)")
        longest = max((len(s) for s in sampling.stop), default=0)
        if longest > self.max_stop_string_length:
            raise LimitExceeded("stop", f"a stop string of {longest} characters: at most "
                                f"{self.max_stop_string_length} (--max-stop-string-length)")
        if len(sampling.logit_bias) > self.max_logit_bias:
            raise LimitExceeded("logit_bias", f"logit_bias has {len(sampling.logit_bias)} entries: at most "
                                f"{self.max_logit_bias} (--max-logit-bias)")
