"""Fault injection for failure tests: a worker that dies at a chosen point, not after a sleep.

``TANDEM_FAULT_EXIT_AFTER_TOKENS=N`` (decode and aggregated workers): the process exits at once
(``os._exit``, no shutdown: what a crash or a SIGKILL looks like to its peers) as soon as one
request's N-th generated token has been handed to the transport. Unset (the default) does
nothing. Tests of request migration use it to kill a worker mid-stream deterministically.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV_EXIT_AFTER_TOKENS = "TANDEM_FAULT_EXIT_AFTER_TOKENS"
FAULT_EXIT_CODE = 86


class TokenFault:
    """Exit the process once a request has streamed ``exit_after_tokens`` tokens (None: never)."""

    def __init__(self, exit_after_tokens: int | None) -> None:
        if exit_after_tokens is not None and exit_after_tokens < 1:
            raise ValueError(f"{ENV_EXIT_AFTER_TOKENS}={exit_after_tokens}: must be >= 1")
        self.exit_after_tokens = exit_after_tokens

    @classmethod
    def from_env(cls) -> TokenFault:
        raw = os.environ.get(ENV_EXIT_AFTER_TOKENS, "").strip()
        if not raw:
            return cls(None)
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{ENV_EXIT_AFTER_TOKENS}={raw!r}: must be an integer >= 1") from None
        log.warning("fault injection: this worker exits after a request's %d-th token (%s)", n, ENV_EXIT_AFTER_TOKENS)
        return cls(n)

    def streamed(self, num_tokens: int) -> None:
        """A request has now streamed ``num_tokens`` tokens in all."""
        if self.exit_after_tokens is not None and num_tokens >= self.exit_after_tokens:
            log.error("fault injection: exiting after %d tokens of a request (%s)", num_tokens, ENV_EXIT_AFTER_TOKENS)
            logging.shutdown()
            os._exit(FAULT_EXIT_CODE)
