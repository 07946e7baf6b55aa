"""Storage prefetch: pages of a prefix chain are read from storage on a background thread while
the request waits; ``--hicache-storage-prefetch-policy`` says how long admission waits for them.

* ``best_effort``: never wait; use the pages read so far (the rest is computed).
* ``wait_complete``: wait until the read stops (all pages read, or the first miss).
* ``timeout``: wait at most ``--hicache-storage-prefetch-timeout`` seconds, then as best_effort.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")
MAX_JOBS = 64  # reads waiting to be taken; the oldest are dropped beyond this (their requests left)


class PrefetchJob:
    """Reads ``chain`` ([(key, tokens)]) in order until the first miss; ``pages`` grows as it goes."""

    def __init__(self, chain: list):
        self.chain = chain
        self.pages: list = []  # page tensors, a prefix of chain
        self.done = threading.Event()
        self.cancelled = False
        self.started = time.monotonic()

    def run(self, fetch) -> None:
        try:
            for key, toks in self.chain:
                if self.cancelled:
                    break
                data = fetch(key, toks)
                if data is None:
                    break
                self.pages.append(data)
        finally:
            self.done.set()


class Prefetcher:
    def __init__(self, fetch, policy: str, timeout_s: float):
        if policy not in PREFETCH_POLICIES:
            raise ValueError(f"hicache_storage_prefetch_policy={policy!r}: expected one of "
                             f"{', '.join(PREFETCH_POLICIES)}")
        self.fetch, self.policy, self.timeout_s = fetch, policy, timeout_s
        self._jobs: OrderedDict[int, PrefetchJob] = OrderedDict()
        self._threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hicache-prefetch")

    def poll(self, chain: list, exists) -> list | None:
        """Pages of chain read so far when admission may go on now (possibly []), or None: wait.

        The first call for a chain starts its read (when storage holds its first page).
        """
        if not chain:
            return []
        first = chain[0][0]
        job = self._jobs.get(first)
        if job is None:
            if not exists(first):
                return []
            job = self._jobs[first] = PrefetchJob(chain)
            while len(self._jobs) > MAX_JOBS:
                self._jobs.popitem(last=False)[1].cancelled = True
            self._threads.submit(job.run, self.fetch)
        if not job.done.is_set():
            waited = time.monotonic() - job.started
            if self.policy == "wait_complete" or (self.policy == "timeout" and waited < self.timeout_s):
                return None
            job.cancelled = True
        del self._jobs[first]
        return list(job.pages)

    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` until the oldest unfinished read is done (True), or return
        False at once when no read is running. The engine calls this when a request waits for
        its prefix and nothing else can run: an engine loop that kept polling instead would hold
        the GIL, and the prefetch thread, which needs it between reads, would wait up to the
        interpreter's switch interval (5 ms) for every read (on an H200: 14.5 s for a 2k prefix)."""
        job = next((j for j in self._jobs.values() if not j.done.is_set()), None)
        return job is not None and job.done.wait(timeout_s)

    def close(self) -> None:
        for job in self._jobs.values():
            job.cancelled = True
        self._threads.shutdown(wait=False)
