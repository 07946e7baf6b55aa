"""The engine's PD side, a component the engine owns (:class:`PdRequests`): decode reserves
pages for a prompt whose KV comes from outside (``allocate``) and starts decoding it once it
arrived (``activate``); a prefill-only request holds its pages after its prefill until
``release``. It works through the scheduler's public interface.

Moving a request between decode workers (a drain) is the same protocol: the holder stops a
decoding request and keeps its pages (``hold``: the KV of its prompt and every output token but
the last), a prefill-only request in all but name, whose pages ``export`` lists for the
sender; the target reserves pages for those tokens (``allocate`` of a request with output_ids)
and ``activate`` continues it from its last token, which it computes first: nothing of the
prompt or the earlier output is computed again."""
from __future__ import annotations

import time
from dataclasses import dataclass

from .kv_pool import KVPool, OutOfPages
from .outputs import StepOutput
from .request import Mode, Request, Status
from .scheduler import Scheduler


@dataclass
class ExternalAllocation:
    """Pages (and an aux slot) reserved for a prompt whose KV will be written from outside."""

    rid: str
    page_indices: list  # the pages to be written: those after the cached prefix
    aux_slot: int
    num_tokens: int
    num_cached_tokens: int = 0  # leading prompt tokens already in this pool (prefix cache): not written


@dataclass
class HeldForMove:
    """A decoding request a drain stopped so that another worker fetches its KV (``PdRequests.hold``)."""

    rid: str
    kv_token_ids: list  # the tokens whose KV the pages hold, in order: the prompt and the output but its last token
    pages: list  # the pages holding them, in page-table order
    last_token_id: int  # its last output token (not computed yet: the target computes it first)
    lora_name: str | None = None  # the LoRA adapter its KV was computed under (None: the base model)


class PdRequests:
    def __init__(self, scheduler: Scheduler, pool: KVPool, vocab_size: int) -> None:
        self.scheduler, self.pool, self.vocab_size = scheduler, pool, vocab_size

    def release(self, rid: str, cache: bool = True) -> None:
        """Free a finished prefill-only request's pages (into the prefix cache when cache)."""
        req = self.scheduler.requests.get(rid)
        if req is None or req.status != Status.HELD:
            raise ValueError(f"release({rid!r}): no held prefill-only request with this id")
        self.scheduler.finish(req, "prefill_done", cache=cache)

    def allocate(self, req: Request, reuse_prefix: bool = False) -> ExternalAllocation:
        """Reserve pages and an aux slot for ``req``, a new request whose KV will be written from
        outside. Raises OutOfPages when the pool cannot hold it now (retry later or reject).

        ``reuse_prefix`` (SGLang's decode radix cache for PD): the leading full pages of the prompt
        that the prefix cache holds under the request's adapter (at most its first L - 1 tokens: at
        least one page is always written) are shared, locked until the request ends; only the pages
        after them are reserved and listed to be written."""
        if not self.scheduler.acquire_lora(req):
            raise OutOfPages(f"every LoRA slot serves other adapters' running requests (adapter {req.lora_name!r})")
        cache = self.scheduler.cache
        matched, node = [], cache.root
        num_kv = kv_tokens(req)
        if reuse_prefix and not cache.disabled:
            matched, node = cache.match_prefix(req.all_ids[: num_kv - 1], req.lora_name)
        cache.lock(node)
        n = self.scheduler.pages_for(num_kv) - len(matched)
        pages = self.scheduler.alloc_pages(n)
        aux = self.pool.alloc_aux() if pages is not None else None
        if pages is None or aux is None:
            if pages is not None:
                self.pool.free(pages)
            cache.unlock(node)
            self.scheduler.release_lora(req)
            raise OutOfPages(f"need {n} pages, {self.scheduler.available_pages} available" if pages is None
                             else "no free aux slot")
        req.pages, req.aux_slot, req.status = list(matched) + pages, aux, Status.EXTERNAL_WAIT
        req.num_tree_pages, req.tree_node = len(matched), node
        self.scheduler.register(req)
        return ExternalAllocation(req.rid, list(pages), aux, num_kv, len(matched) * self.scheduler.page_size)

    def activate(self, rid: str, first_token_id: int, first_token_logprob: float | None = None,
                 cached_tokens: int = 0, first_token_top: list | None = None) -> StepOutput | None:
        """The KV of rid's prompt is in its pages: join the running batch with its first token
        (which KV transfer delivered in the request's aux slot); that token's output. A moved
        request (one with output_ids) already has that token, its last: the sender's must be
        the same; it continues from there with no output now (None)."""
        req = self.scheduler.requests.get(rid)
        if req is None or req.status != Status.EXTERNAL_WAIT:
            raise ValueError(f"activate_external({rid!r}): no pre-allocated request with this id")
        if not 0 <= first_token_id < self.vocab_size:
            raise ValueError(f"first_token_id={first_token_id}: outside the vocabulary")
        moved = bool(req.output_ids)
        if moved and first_token_id != req.output_ids[-1]:
            raise ValueError(f"activate_external({rid!r}): the KV's sender ends with token {first_token_id}, the "
                             f"request's output with {req.output_ids[-1]}")
        self.pool.free_aux(req.aux_slot)
        req.aux_slot = None
        req.num_computed = kv_tokens(req)
        req.cached_tokens = cached_tokens
        self.scheduler.cache_prompt(req)
        self.scheduler.join_running(req)
        req.first_token_time = time.monotonic()
        if moved:
            return None
        lp = [] if first_token_logprob is None or not req.sampling.logprobs else [first_token_logprob]
        top = [list(first_token_top)] if first_token_top and req.sampling.top_logprobs else []
        return self.scheduler.accept_token(req, first_token_id, lp, top)

    def hold(self, req: Request | None) -> HeldForMove:
        """Stop a decoding request and keep its pages for another worker to fetch (status HELD,
        out of the batch; ``release`` or an abort frees them). ValueError unless it is decoding:
        running, its prompt computed, at least one token out, none being sampled."""
        if req is None or req.status != Status.RUNNING or req.mode == Mode.PREFILL_ONLY or not req.output_ids \
                or req.num_pending or req.num_uncomputed != 1:
            raise ValueError(f"hold_for_move({req.rid if req else None!r}): not a decoding request")
        self.scheduler.remove(req)
        req.status = Status.HELD
        n = kv_tokens(req)
        return HeldForMove(req.rid, req.all_ids[:n], req.pages[: self.scheduler.pages_for(n)], req.output_ids[-1],
                           req.lora_name)

    def export(self, rid: str) -> StepOutput:
        """A held request's KV as a prefill-only request's would be reported (what the sender
        writes): every page, final, and its last token; ``release`` frees them once sent."""
        req = self.scheduler.requests.get(rid)
        if req is None or req.status != Status.HELD or req.mode == Mode.PREFILL_ONLY:
            raise ValueError(f"export_held({rid!r}): no request held for a move with this id")
        n = kv_tokens(req)
        return StepOutput(rid, [req.output_ids[-1]], finished=True, finish_reason="prefill_done", num_prompt_tokens=n,
                          cached_tokens=req.cached_tokens, pages_final=req.pages[: self.scheduler.pages_for(n)],
                          num_computed_tokens=n)


def kv_tokens(req: Request) -> int:
    """Tokens of ``req`` whose KV comes from outside: its prompt; a moved request's prompt and
    output but the last token (which it computes first)."""
    return req.seq_len - 1 if req.output_ids else len(req.prompt_ids)
