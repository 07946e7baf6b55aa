"""Concurrency admission of the router: at most --max-concurrent-requests in flight, and at most
--max-concurrent-requests-per-key per client key (its bearer token, or its address without
one). Over the limit a request is refused at once with RESOURCE_EXHAUSTED (HTTP 429 with
Retry-After) instead of queueing without bound. Runs on the router's loop (no locks)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import grpc


class Overloaded(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = grpc.StatusCode.RESOURCE_EXHAUSTED
        self.message = message


class Admission:
    def __init__(self, max_total: int = 0, max_per_key: int = 0) -> None:
        self.max_total = max_total  # 0 = unlimited
        self.max_per_key = max_per_key
        self.in_flight = 0
        self.per_key: Counter[str] = Counter()
        self.refused = 0

    def admit(self, key: str) -> Callable[[], None]:
        """Take a slot for `key`; returns the function that gives it back. Raises Overloaded."""
        if self.max_total and self.in_flight >= self.max_total:
            self.refused += 1
            raise Overloaded(f"router overloaded: {self.in_flight} requests in flight "
                             f"(--max-concurrent-requests {self.max_total}); retry later")
        if self.max_per_key and self.per_key[key] >= self.max_per_key:
            self.refused += 1
            raise Overloaded(f"too many concurrent requests for this client: {self.per_key[key]} in flight "
                             f"(--max-concurrent-requests-per-key {self.max_per_key}); retry later")
        self.in_flight += 1
        self.per_key[key] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.in_flight -= 1
            self.per_key[key] -= 1
            if not self.per_key[key]:
                del self.per_key[key]

        return release
