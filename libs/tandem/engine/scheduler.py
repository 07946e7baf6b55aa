"""Continuous batching with chunked prefill, admission by free pages, and retraction.

Each step is either a *prefill* step (continue chunked prompts, then admit waiting
requests while the token budget and the pages last; with ``mixed_chunk`` every running
request ready to decode joins it too) or, when no prefill work can run, a *decode*
step over every running request with exactly one uncomputed token.
When a decode step cannot get a page, the most recently admitted request is
retracted: its pages go to the radix cache (or back to the pool) and it waits to be
recomputed from its prompt plus the tokens it already produced. Nothing crashes
for lack of pages; a request that cannot fit even alone ends with reason "abort".
"""
from __future__ import annotations

import itertools
from collections import deque

from .kv_pool import KVPool
from .radix_cache import RadixCache
from .request import Mode, Request, Status


class Scheduler:
    def __init__(self, pool: KVPool, cache: RadixCache, chunked_prefill_size: int,
                 max_prefill_tokens: int, max_running_requests: int, mixed_chunk: bool = False):
        self.pool, self.cache = pool, cache
        self.page_size = pool.page_size
        self.prefill_budget = min(chunked_prefill_size, max_prefill_tokens)
        self.max_running = max_running_requests
        self.mixed_chunk = mixed_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._admit_seq = itertools.count()
        self.num_retracted = 0

    # ---- pages -------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return (num_tokens + self.page_size - 1) // self.page_size

    @property
    def available_pages(self) -> int:
        """Pages obtainable now: free ones plus unlocked ones in the prefix cache."""
        return self.pool.num_free_pages + self.cache.evictable_pages

    def alloc_pages(self, n: int) -> list[int] | None:
        short = n - self.pool.num_free_pages
        if short > 0:
            self.cache.evict(short)
        return self.pool.alloc(n)

    def ensure_pages(self, req: Request, num_tokens: int) -> bool:
        """Grow req's page table to cover num_tokens tokens; False (nothing changed) if no pages."""
        need = self.pages_for(num_tokens) - len(req.pages)
        if need <= 0:
            return True
        pages = self.alloc_pages(need)
        if pages is None:
            return False
        req.pages.extend(pages)
        return True

    def release(self, req: Request, cache: bool = True) -> None:
        """Give a request's pages back: full pages to the prefix cache (when cache), the rest freed."""
        if cache:
            self.cache.insert(req.all_ids[: req.num_computed], req.pages, req.num_tree_pages)
        else:
            self.pool.free(req.pages[req.num_tree_pages:])
        if req.tree_node is not None:
            self.cache.unlock(req.tree_node)
        req.pages, req.num_tree_pages, req.tree_node = [], 0, None

    def cache_prompt(self, req: Request) -> None:
        """Put the full pages of req's prefilled prompt into the prefix cache while it keeps
        running, so parallel samples (n > 1) and other requests with the same prompt share them."""
        if self.cache.disabled:
            return
        n_full = min(len(req.prompt_ids), req.num_computed) // self.page_size
        if n_full <= req.num_tree_pages:
            return
        pages, node = self.cache.insert_live(req.prompt_ids[: n_full * self.page_size], req.pages[:n_full],
                                             req.num_tree_pages)
        self.cache.lock(node)
        if req.tree_node is not None:
            self.cache.unlock(req.tree_node)
        req.pages[:n_full] = pages
        req.num_tree_pages, req.tree_node = n_full, node

    def cached_prefix_tokens(self, token_ids: list) -> int:
        """How many leading tokens of a prompt the prefix cache holds (what admission would match)."""
        pages, _ = self.cache.match_prefix(token_ids[: len(token_ids) - 1])
        return len(pages) * self.page_size

    # ---- admission -----------------------------------------------------------------------
    def next_admit_seq(self) -> int:
        """Admission order of a request joining the running batch from outside the queue."""
        return next(self._admit_seq)

    def _try_admit(self, req: Request) -> bool:
        # Match at most seq_len - 1 tokens: the last token must be computed to get logits; none
        # when the prompt's logprobs are wanted (every prompt token's logits are computed).
        if req.wants_prompt_logprobs:
            pages, node = [], self.cache.root
        else:
            pages, node, ready = self.cache.match_and_load(req.all_ids[: req.seq_len - 1])
            if not ready:
                return False  # its prefix is being read from storage (HiCache prefetch policy)
        self.cache.lock(node)
        need = self.pages_for(req.seq_len + 1) - len(pages)
        # Keep one page of headroom per running request for its next decode page.
        if need + len(self.running) > self.available_pages and self.running:
            self.cache.unlock(node)
            return False
        if need > self.available_pages:
            self.cache.unlock(node)
            return False
        req.pages = list(pages)
        req.num_tree_pages = len(pages)
        req.tree_node = node
        req.num_computed = len(pages) * self.page_size
        if req.num_computed > req.cached_tokens and not req.output_ids:
            req.cached_tokens = req.num_computed
        req.status = Status.RUNNING
        req.admit_seq = next(self._admit_seq)
        return True

    def schedule(self) -> tuple[str, list]:
        """Return ("prefill" | "decode" | "idle", [(req, num_new_tokens)])."""
        self.cache.poll()
        while True:
            kind, batch = self._schedule_once()
            if batch or not self.running:
                return kind, batch
            if any(r.last_token_in_flight for r in self.running):
                return "idle", []  # it finishes once its token is read back, freeing its pages
            # Running requests exist but none could get pages: free some and retry.
            victim = self._victim()
            if len(self.running) == 1:
                own = len(victim.pages) - victim.num_tree_pages
                if self.pool.num_used_pages - self.cache.num_pages > own or self.cache.io_pending:
                    return "idle", []  # held / pre-allocated pages, or pages in a copy, will come back: wait
                return "stuck", [(victim, 0)]
            self.retract(victim)

    def _ready_to_decode(self) -> list[Request]:
        return [r for r in self.running
                if r.num_uncomputed == 1 and r.status == Status.RUNNING and not r.last_token_in_flight]

    def _schedule_once(self) -> tuple[str, list]:
        budget = self.prefill_budget
        batch = []
        decodes = self._ready_to_decode() if self.mixed_chunk else []
        if decodes:
            budget = max(1, budget - len(decodes))  # the decodes ride along in this step's token budget
        for req in self.running:
            if req.num_uncomputed > 1 and budget > 0:
                n = min(req.num_uncomputed, budget)
                if not self.ensure_pages(req, req.num_computed + n):
                    break
                batch.append((req, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            if not self._try_admit(req):
                break
            self.waiting.popleft()
            self.running.append(req)
            n = min(req.num_uncomputed, budget)
            if not self.ensure_pages(req, req.num_computed + n):  # cannot happen after admission check
                self.retract(req)
                break
            batch.append((req, n))
            budget -= n
        if batch:
            # Mixed chunk: running decodes join the prefill step, so a long prompt delays them
            # by one chunk at most instead of stalling them until its last chunk.
            for req in sorted(decodes, key=lambda r: r.admit_seq):
                if self.ensure_pages(req, req.seq_len):
                    batch.append((req, 1))
            return "prefill", batch
        decode = []
        for req in sorted(self.running, key=lambda r: r.admit_seq):
            if req.num_uncomputed != 1 or req.status != Status.RUNNING or req.last_token_in_flight:
                continue
            while not self.ensure_pages(req, req.seq_len):
                victim = self._victim()
                if victim is req:
                    break
                self.retract(victim)
                decode = [(r, n) for r, n in decode if r is not victim]
            else:
                decode.append((req, 1))
                continue
            break  # req itself is the youngest and got no page: leave the rest for later
        return ("decode" if decode else "idle"), decode

    def _victim(self) -> Request:
        """The request to preempt: the youngest, sparing prefill-only requests whose pages are
        already being transferred (their page indices must not change)."""
        spare = [r for r in self.running if not (r.mode == Mode.PREFILL_ONLY and r.pages_reported)]
        return max(spare or self.running, key=lambda r: r.admit_seq)

    def retract(self, req: Request) -> None:
        """Preempt a running request: keep its tokens, drop its KV, queue it first."""
        self.running.remove(req)
        self.release(req, cache=True)
        req.num_computed = 0
        req.pages_reported = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_retracted += 1

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
