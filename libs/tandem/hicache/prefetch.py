"""Storage prefetch: the pages of a prefix chain are read from storage straight into host pool
pages (pinned: the load-back to the device then moves them like any host page) by a pool of
reader threads, all pages of a chain at once, while the request waits;
``--hicache-storage-prefetch-policy`` says how long admission waits for them.

* ``best_effort``: never wait; use the pages read so far (the rest is computed).
* ``wait_complete``: wait until the read stops (all pages read, or the first miss).
* ``timeout``: wait at most ``--hicache-storage-prefetch-timeout`` seconds, then as best_effort.

Host pages are reserved on the caller's (the scheduler's) thread when a read starts. The
pages of the read prefix go to the caller; the others come back through ``reclaim`` once no
reader thread touches them any more (a read cannot be stopped mid-page).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")
MAX_JOBS = 64  # reads at once; beyond, the oldest is dropped (its request left)
MAX_IDLE_POLLS = 1024  # a read nobody asked about for this many scheduling steps is dropped


def _read_ok(f: Future) -> bool:
    """A finished read that filled its page (a read that raised counts as a miss)."""
    return not f.cancelled() and f.exception() is None and bool(f.result())


class PrefetchJob:
    """Reads ``chain`` ([(key, parent, tokens)]) into ``host_pages`` (one each), in parallel;
    the pages past the first miss are not read."""

    def __init__(self, chain: list, host_pages: list):
        self.chain, self.host_pages = chain, host_pages
        self.futures: list[Future] = []
        self.settled = threading.Event()  # the read prefix can no longer grow
        self.started = time.monotonic()
        self.idle_polls = 0

    def start(self, threads: ThreadPoolExecutor, read: Callable) -> None:
        for (key, parent, tokens), hp in zip(self.chain, self.host_pages):
            self.futures.append(threads.submit(read, key, parent, tokens, hp))
        for f in self.futures:
            f.add_done_callback(self._on_done)

    def _on_done(self, f: Future) -> None:
        if not _read_ok(f) and not f.cancelled():
            self.cancel()  # a miss: the chain stops here, later pages are of no use
        if self.is_settled():
            self.settled.set()

    def ready(self) -> int:
        """Leading pages read and checked."""
        n = 0
        for f in self.futures:
            if not f.done() or not _read_ok(f):
                break
            n += 1
        return n

    def is_settled(self) -> bool:
        n = self.ready()
        return n == len(self.futures) or self.futures[n].done()

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()  # those not started yet

    def finished(self) -> bool:
        return all(f.done() for f in self.futures)


class Prefetcher:
    def __init__(self, read: Callable[[int, int, tuple, int], bool], policy: str, timeout_s: float,
                 threads: int = 4):
        if policy not in PREFETCH_POLICIES:
            raise ValueError(f"hicache_storage_prefetch_policy={policy!r}: expected one of "
                             f"{', '.join(PREFETCH_POLICIES)}")
        self.read, self.policy, self.timeout_s = read, policy, timeout_s
        self._jobs: OrderedDict[int, PrefetchJob] = OrderedDict()
        self._draining: list[tuple[PrefetchJob, int]] = []  # (job, pages handed out)
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hicache-prefetch")

    def poll(self, first: int, chain: Callable[[], list], exists: Callable[[int], bool],
             reserve: Callable[[int], list]) -> list | None:
        """The pages read so far of the chain that starts with page ``first``, as
        [(key, tokens, host page)] (possibly []), when admission may go on now; None: wait. The
        caller owns the returned host pages.

        The first call for a chain starts its read when storage holds its first page: the whole
        chain (``chain()``: [(key, parent key, tokens)]) into ``reserve(n)`` host pages (fewer
        when the host pool is short: a shorter read)."""
        job = self._jobs.get(first)
        if job is None:
            if not exists(first):
                return []
            pages_chain = chain()
            pages = reserve(len(pages_chain))
            if not pages:
                return []
            job = self._jobs[first] = PrefetchJob(pages_chain[:len(pages)], pages)
            job.start(self._threads, self.read)
            while len(self._jobs) > MAX_JOBS:
                self._drop(self._jobs.popitem(last=False)[1], 0)
        job.idle_polls = 0
        if not job.is_settled():
            waited = time.monotonic() - job.started
            if self.policy == "wait_complete" or (self.policy == "timeout" and waited < self.timeout_s):
                return None
        del self._jobs[first]
        n = job.ready()
        self._drop(job, n)
        return [(key, tokens, hp) for (key, _, tokens), hp in zip(job.chain[:n], job.host_pages[:n])]

    def _drop(self, job: PrefetchJob, handed_out: int) -> None:
        job.cancel()
        if handed_out < len(job.host_pages):
            self._draining.append((job, handed_out))

    def tick(self) -> None:
        """One scheduling step passed: drop reads nobody polled for long (their request left)."""
        for first, job in list(self._jobs.items()):
            job.idle_polls += 1
            if job.idle_polls > MAX_IDLE_POLLS:
                del self._jobs[first]
                self._drop(job, 0)

    def reclaim(self) -> list:
        """Host pages of dropped reads that no reader thread touches any more: the caller frees them."""
        out, keep = [], []
        for job, n in self._draining:
            if job.finished():
                out.extend(job.host_pages[n:])
            else:
                keep.append((job, n))
        self._draining = keep
        return out

    @property
    def busy(self) -> bool:
        """Reads running or host pages not reclaimed yet."""
        return bool(self._jobs or self._draining)

    def drain(self) -> list:
        """Drop every read, wait for the reader threads, return every reserved host page."""
        for job in list(self._jobs.values()):
            self._drop(job, 0)
        self._jobs.clear()
        for job, _ in self._draining:
            for f in job.futures:
                if not f.cancelled():
                    f.exception()  # waits
        return self.reclaim()

    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` until the oldest unsettled read settles (True), or return
        False at once when no read is running. The engine calls this when a request waits for
        its prefix and nothing else can run: an engine loop that kept polling instead would hold
        the GIL, and the reader threads, which need it between system calls, would wait up to
        the interpreter's switch interval (5 ms) each time (on an H200: 14.5 s for a 2k prefix)."""
        job = next((j for j in self._jobs.values() if not j.settled.is_set()), None)
        return job is not None and job.settled.wait(timeout_s)

    def close(self) -> None:
        for job in self._jobs.values():
            job.cancel()
        self._threads.shutdown(wait=False)
