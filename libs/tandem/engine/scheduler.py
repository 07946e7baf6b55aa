"""Continuous batching with chunked prefill, admission by free pages, and retraction.

Each step is either a *prefill* step (continue chunked prompts, then admit waiting
requests while the token budget and the pages last; with ``mixed_chunk`` every running
request ready to decode joins it too) or, when no prefill work can run, a *decode*
step over every running request with exactly one uncomputed token.
When a decode step cannot get a page, the most recently admitted request is
retracted: its pages go to the radix cache (or back to the pool) and it waits to be
recomputed from its prompt plus the tokens it already produced. Nothing crashes
for lack of pages; a request that cannot fit even alone ends with reason "abort".

After the forward pass, ``update_from_output(batch, sampled)`` is the step's one place of
results: it accepts the sampled tokens (stop checks, finishing: pages back to the cache),
advances the batch's requests, and returns what happened as :class:`StepOutput` values
(tokens, finishes, a prefill-only request's pages now final and its prefill done).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from .kv_pool import KVPool
from .outputs import SampledTokens, StepOutput
from .radix_cache import RadixCache
from .request import Mode, Request, Status
from .stats import StatsCollector
from .stopping import StopChecker


@dataclass
class ScheduledBatch:
    """What one step runs: ``items`` [(request, new tokens)] of kind prefill or decode (idle:
    none). Kind "stuck": nothing runs and ``stuck``, the only running request, can never fit."""

    kind: str
    items: list = field(default_factory=list)
    stuck: Request | None = None

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def rows_to_sample(self) -> list[int]:
        """Rows whose request is live and fully computed: their logits give its next token."""
        return [i for i, (req, _) in enumerate(self.items)
                if req.status != Status.FINISHED and req.num_uncomputed == 0]


NOTHING = ScheduledBatch("idle")


class Scheduler:
    def __init__(self, pool: KVPool, cache: RadixCache, chunked_prefill_size: int,
                 max_prefill_tokens: int, max_running_requests: int, stop: StopChecker, stats: StatsCollector,
                 mixed_chunk: bool = False, cache_every_chunk: bool = False, lora=None):
        """``cache_every_chunk``: a prompt's full pages go to the prefix cache after every prefill
        chunk (HiCache: write-through backs a long prompt up chunk by chunk while the next chunk
        computes), not only after its last one. ``lora``: the ``tandem.engine.lora.LoraManager``
        (``--enable-lora``) whose device slots a request with an adapter holds while it runs."""
        self.pool, self.cache = pool, cache
        self.lora = lora
        self.cache_every_chunk = cache_every_chunk
        self.page_size = pool.page_size
        self.prefill_budget = min(chunked_prefill_size, max_prefill_tokens)
        self.max_running = max_running_requests
        self.mixed_chunk = mixed_chunk
        self.stop = stop
        self.stats = stats
        self.requests: dict[str, Request] = {}  # every live request: waiting, running, held, external
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._admit_seq = itertools.count()
        self.num_retracted = 0

    def add(self, req: Request) -> None:
        """Queue a new request (its id is unused: the engine checked)."""
        self.register(req)
        self.waiting.append(req)

    def register(self, req: Request) -> None:
        """Track a request that is not queued (its KV comes from outside: ``join_running`` later)."""
        self.requests[req.rid] = req
        self.stats.request_added(len(req.prompt_ids), req.lora_name)

    def join_running(self, req: Request) -> None:
        """A request whose prompt KV is in its pages joins the running batch to decode."""
        req.status = Status.RUNNING
        req.admit_seq = next(self._admit_seq)
        self.running.append(req)

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
            self.cache.insert(req.all_ids[: req.num_computed], req.pages, req.num_tree_pages, req.lora_name)
        else:
            self.pool.free(req.pages[req.num_tree_pages:])
        if req.tree_node is not None:
            self.cache.unlock(req.tree_node)
        req.pages, req.num_tree_pages, req.tree_node = [], 0, None
        self.release_lora(req)

    def acquire_lora(self, req: Request) -> bool:
        """Give req its adapter's device slot (pinned until ``release``); False when every slot
        serves another adapter's running requests (req waits)."""
        if req.lora_name is None or req.lora_slot >= 0:
            return True
        slot = self.lora.acquire(req.lora_name)
        if slot is None:
            return False
        req.lora_slot = slot
        return True

    def release_lora(self, req: Request) -> None:
        """Give back req's adapter slot (if it holds one)."""
        if req.lora_slot >= 0:
            self.lora.release(req.lora_slot)
            req.lora_slot = -1

    def cache_prompt(self, req: Request) -> None:
        """Put the full pages of req's prefilled prompt into the prefix cache while it keeps
        running, so parallel samples (n > 1) and other requests with the same prompt share them."""
        if self.cache.disabled:
            return
        n_full = min(len(req.prompt_ids), req.num_computed) // self.page_size
        if n_full <= req.num_tree_pages:
            return
        pages, node = self.cache.insert_live(req.prompt_ids[: n_full * self.page_size], req.pages[:n_full],
                                             req.num_tree_pages, req.lora_name)
        self.cache.lock(node)
        if req.tree_node is not None:
            self.cache.unlock(req.tree_node)
        req.pages[:n_full] = pages
        req.num_tree_pages, req.tree_node = n_full, node

    def cached_prefix_tokens(self, token_ids: list, lora: str | None = None) -> int:
        """How many leading tokens of a prompt (under LoRA adapter ``lora``) the prefix cache holds
        (what admission would match)."""
        pages, _ = self.cache.match_prefix(token_ids[: len(token_ids) - 1], lora)
        return len(pages) * self.page_size

    # ---- admission -----------------------------------------------------------------------
    def _try_admit(self, req: Request) -> bool:
        # Match at most seq_len - 1 tokens: the last token must be computed to get logits; none
        # when the prompt's logprobs are wanted (every prompt token's logits are computed).
        if req.wants_prompt_logprobs:
            pages, node = [], self.cache.root
        else:
            pages, node, ready = self.cache.match_and_load(req.all_ids[: req.seq_len - 1], req.lora_name)
            if not ready:
                return False  # its prefix is being read from storage (HiCache prefetch policy)
        self.cache.lock(node)
        if not self.acquire_lora(req):
            self.cache.unlock(node)
            return False
        need = self.pages_for(req.seq_len + 1) - len(pages)
        # Keep one page of headroom per running request for its next decode page.
        if (need + len(self.running) > self.available_pages and self.running) or need > self.available_pages:
            self.cache.unlock(node)
            self.release_lora(req)
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

    def schedule(self) -> ScheduledBatch:
        """The next step's batch: prefill, decode, idle (nothing can run now) or stuck."""
        self.cache.poll()
        while True:
            kind, batch = self._schedule_once()
            if batch or not self.running:
                return ScheduledBatch(kind, batch)
            if any(r.last_token_in_flight for r in self.running):
                return NOTHING  # it finishes once its token is read back, freeing its pages
            # Running requests exist but none could get pages: free some and retry.
            victim = self._victim()
            if len(self.running) == 1:
                own = len(victim.pages) - victim.num_tree_pages
                if self.pool.num_used_pages - self.cache.num_pages > own or self.cache.io_pending:
                    return NOTHING  # held / pre-allocated pages, or pages in a copy, will come back: wait
                return ScheduledBatch("stuck", stuck=victim)
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

    # ---- results ---------------------------------------------------------------------------
    def update_from_output(self, batch: ScheduledBatch, sampled: SampledTokens | None,
                           prompt_logprobs: dict | None = None) -> list[StepOutput]:
        """Apply one step's results; return them as outputs, in order.

        ``sampled``: tokens of an earlier launch, read back now (accepted first: a request may
        finish here). ``batch``: the step that just ran; its live requests advance by their new
        tokens, a prefill-only request reports the pages its chunk made final, a prefilled
        prompt is shared through the prefix cache. ``prompt_logprobs`` {row: [(logprob, top)]}
        of the batch's rows that asked for them.
        """
        outs: list[StepOutput] = []
        if batch.stuck is not None:
            outs.append(self.finish_with_error(batch.stuck, "KV pool too small for this request's context"))
        if sampled is not None:
            self._accept_sampled(sampled, outs)
        for i, (req, n) in enumerate(batch.items):
            if req.status == Status.FINISHED:
                continue
            if prompt_logprobs and i in prompt_logprobs:
                req.prompt_logprobs.extend(prompt_logprobs[i])
            req.num_computed += n
            if req.mode == Mode.PREFILL_ONLY:
                self._report_chunk(req, outs)
            elif req.mode == Mode.NORMAL and not req.output_ids and (req.num_uncomputed == 0
                                                                       or self.cache_every_chunk):
                self.cache_prompt(req)  # prefilled (or a chunk of it, with HiCache): share its pages now
        return outs

    def _accept_sampled(self, sampled: SampledTokens, outs: list) -> None:
        lps, top_ids, top_vals = sampled.logprobs, sampled.top_ids, sampled.top_vals
        now = time.monotonic()
        for i, (req, tok) in enumerate(zip(sampled.reqs, sampled.tokens)):
            if req.status == Status.FINISHED:
                continue  # aborted while its token was sampled: finish() dropped the placeholder
            req.output_ids.pop()
            req.num_pending = 0
            sp = req.sampling
            lp = [lps[i]] if lps is not None and sp.logprobs else []
            top = [list(zip(top_ids[i][:sp.top_logprobs], top_vals[i][:sp.top_logprobs]))] \
                if top_ids is not None and sp.top_logprobs else []
            if req.first_token_time is None:
                req.first_token_time = now
            outs.append(self.accept_token(req, tok, lp, top))

    def _report_chunk(self, req: Request, outs: list) -> None:
        final = min(req.num_computed, len(req.prompt_ids)) // self.page_size
        if req.num_computed >= len(req.prompt_ids):
            final = len(req.pages)  # the last partial page is final too
        if final > req.pages_reported:
            out = StepOutput(req.rid, [], num_prompt_tokens=len(req.prompt_ids), cached_tokens=req.cached_tokens,
                             pages_final=req.pages[req.pages_reported:final], num_computed_tokens=req.num_computed)
            req.pages_reported = final
            outs.append(out)

    def accept_token(self, req: Request, tok: int, lp: list, top: list) -> StepOutput:
        """Append a sampled token to req's output; stop checks; finishing. Its output."""
        req.output_ids.append(tok)
        req.output_logprobs.extend(lp)
        req.output_top_logprobs.extend(top)
        self.stats.token_generated(req.lora_name)
        if req.grammar is not None and not req.grammar.accept(tok):
            # Only a first token sampled elsewhere (PD) could get here: never continue off-grammar.
            self.finish(req, "abort")
            out = self.output(req, [tok], lp, top)
            out.error = f"token {tok} is not allowed by the request's grammar"
            return out
        if req.mode == Mode.PREFILL_ONLY:
            self.remove(req)
            req.status = Status.HELD
            out = self.output(req, [tok], lp, top)
            out.finished, out.finish_reason = True, "prefill_done"
            return out
        reason = self.stop.check(req, tok)
        if reason is not None:
            self.finish(req, reason)
        return self.output(req, [tok], lp, top)

    def finish(self, req: Request, reason: str, cache: bool = True) -> None:
        """End a request: its pages go back (full ones into the prefix cache when cache)."""
        status = req.status
        if status == Status.FINISHED:
            return
        req.status = Status.FINISHED
        req.finish_reason = reason
        if req.num_pending:  # a token still being sampled is not part of the output
            req.output_ids.pop()
            req.num_pending = 0
        self.remove(req)
        if status == Status.HELD:  # a prefill-only request: only its prompt's KV is valid
            req.num_computed = len(req.prompt_ids)
        if status == Status.EXTERNAL_WAIT:
            self.release(req, cache=False)  # KV may be half-written: never cache it
        else:
            self.release(req, cache=cache and not self.cache.disabled)
        if req.aux_slot is not None:
            self.pool.free_aux(req.aux_slot)
            req.aux_slot = None
        self.requests.pop(req.rid, None)
        self.stats.request_finished(req.cached_tokens, req.lora_name)

    def finish_with_error(self, req: Request, error: str) -> StepOutput:
        """End a request that cannot go on (reason abort, with the error); its output."""
        self.finish(req, "abort")
        out = self.output(req, [], [], [])
        out.error = error
        return out

    @staticmethod
    def output(req: Request, toks: list, lp: list, top: list) -> StepOutput:
        stops = req.stops
        stopped = stops is not None and stops.matched is not None and req.status == Status.FINISHED
        return StepOutput(
            rid=req.rid, new_token_ids=toks, new_logprobs=lp, new_top_logprobs=top,
            finished=req.status == Status.FINISHED, finish_reason=req.finish_reason,
            num_prompt_tokens=len(req.prompt_ids), num_output_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens, stop_text_pos=stops.pos if stopped else None,
            matched_stop=stops.matched if stopped else None,
            prompt_logprobs=list(req.prompt_logprobs) if req.sampling.prompt_logprobs is not None and toks
            and len(req.output_ids) == len(toks) else [],
        )
