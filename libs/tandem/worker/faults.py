"""Fault injection for failure tests: a worker that dies at a chosen point, not after a sleep.

``TANDEM_FAULT_EXIT_AFTER_TOKENS=N`` (decode and aggregated workers): the process exits at once
(``os._exit``, no shutdown: what a crash or a SIGKILL looks like to its peers) as soon as one
request's N-th generated token has been handed to the transport. Unset (the default) does
nothing. Tests of request migration use it to kill a worker mid-stream deterministically.

``TANDEM_FAULT_PAUSE_AFTER_TOKENS=N`` (decode and aggregated workers): the engine stops stepping
while every request in flight has streamed at least N tokens (a new request resumes it until it
has too), until a Drain. Drain tests use it so that the requests are still in flight, mid-stream,
when the drain starts, however fast or slow the machine is.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV_EXIT_AFTER_TOKENS = "TANDEM_FAULT_EXIT_AFTER_TOKENS"
ENV_PAUSE_AFTER_TOKENS = "TANDEM_FAULT_PAUSE_AFTER_TOKENS"
FAULT_EXIT_CODE = 86


def _env_tokens(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: must be an integer >= 1") from None
    if n < 1:
        raise ValueError(f"{name}={n}: must be >= 1")
    log.warning("fault injection: %s=%d", name, n)
    return n


class TokenFault:
    """Faults keyed on the tokens a request has streamed: exit the process once one request has
    streamed ``exit_after_tokens``; say the engine should pause while every request in flight has
    streamed ``pause_after_tokens`` (None: never)."""

    def __init__(self, exit_after_tokens: int | None = None, pause_after_tokens: int | None = None) -> None:
        self.exit_after_tokens = exit_after_tokens
        self.pause_after_tokens = pause_after_tokens

    @classmethod
    def from_env(cls) -> TokenFault:
        return cls(_env_tokens(ENV_EXIT_AFTER_TOKENS), _env_tokens(ENV_PAUSE_AFTER_TOKENS))

    def streamed(self, num_tokens: int) -> None:
        """A request has now streamed ``num_tokens`` tokens in all."""
        if self.exit_after_tokens is not None and num_tokens >= self.exit_after_tokens:
            log.error("fault injection: exiting after %d tokens of a request (%s)", num_tokens, ENV_EXIT_AFTER_TOKENS)
            logging.shutdown()
            os._exit(FAULT_EXIT_CODE)

    def should_pause(self, streamed: list[int]) -> bool:
        """Whether the engine should be paused, given what each request in flight has streamed."""
        return self.pause_after_tokens is not None and bool(streamed) and min(streamed) >= self.pause_after_tokens
