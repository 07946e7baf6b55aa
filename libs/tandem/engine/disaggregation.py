"""The engine's PD side, a component the engine owns (:class:`PdRequests`): decode reserves
pages for a prompt whose KV comes from outside (``allocate``) and starts decoding it once it
arrived (``activate``); a prefill-only request holds its pages after its prefill until
``release``. It works through the scheduler's public interface."""
from __future__ import annotations

import time
from dataclasses import dataclass

from .kv_pool import KVPool, OutOfPages
from .outputs import StepOutput
from .request import Request, Status
from .scheduler import Scheduler


@dataclass
class ExternalAllocation:
    """Pages (and an aux slot) reserved for a prompt whose KV will be written from outside."""

    rid: str
    page_indices: list  # the pages to be written: those after the cached prefix
    aux_slot: int
    num_tokens: int
    num_cached_tokens: int = 0  # leading prompt tokens already in this pool (prefix cache): not written


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
        if reuse_prefix and not cache.disabled:
            matched, node = cache.match_prefix(req.prompt_ids[: len(req.prompt_ids) - 1], req.lora_name)
        cache.lock(node)
        n = self.scheduler.pages_for(len(req.prompt_ids)) - len(matched)
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
        return ExternalAllocation(req.rid, list(pages), aux, len(req.prompt_ids),
                                  len(matched) * self.scheduler.page_size)

    def activate(self, rid: str, first_token_id: int, first_token_logprob: float | None = None,
                 cached_tokens: int = 0, first_token_top: list | None = None) -> StepOutput:
        """The KV of rid's prompt is in its pages: join the running batch with its first token
        (which KV transfer delivered in the request's aux slot); that token's output."""
        req = self.scheduler.requests.get(rid)
        if req is None or req.status != Status.EXTERNAL_WAIT:
            raise ValueError(f"activate_external({rid!r}): no pre-allocated request with this id")
        if not 0 <= first_token_id < self.vocab_size:
            raise ValueError(f"first_token_id={first_token_id}: outside the vocabulary")
        self.pool.free_aux(req.aux_slot)
        req.aux_slot = None
        req.num_computed = len(req.prompt_ids)
        req.cached_tokens = cached_tokens
        self.scheduler.cache_prompt(req)
        self.scheduler.join_running(req)
        req.first_token_time = time.monotonic()
        lp = [] if first_token_logprob is None or not req.sampling.logprobs else [first_token_logprob]
        top = [list(first_token_top)] if first_token_top and req.sampling.top_logprobs else []
        return self.scheduler.accept_token(req, first_token_id, lp, top)
