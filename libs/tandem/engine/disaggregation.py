"""The engine's PD entry points (split out of engine.py, methods unchanged): prefill-only
requests hold their pages until ``release``; decode reserves pages for a prompt whose KV
comes from outside (``allocate_external``) and starts decoding it once it arrived
(``activate_external``). Mixed into :class:`tandem.engine.engine.EngineCore`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .kv_pool import OutOfPages
from .request import Mode, Status
from .sampling_params import SamplingParams


@dataclass
class PrefillResult:
    """A prefill-only request is done: its KV sits in these pages until release()."""

    rid: str
    page_indices: list
    num_tokens: int
    first_token_id: int
    first_token_logprob: float
    cached_tokens: int
    top_logprobs: list = field(default_factory=list)


@dataclass
class ExternalAllocation:
    """Pages (and an aux slot) reserved for a prompt whose KV will be written from outside."""

    rid: str
    page_indices: list
    aux_slot: int
    num_tokens: int


class DisaggregationMixin:
    def release(self, rid: str, cache: bool = True) -> None:
        """Free a finished prefill-only request's pages (into the prefix cache when cache)."""
        req = self.requests.pop(rid, None)
        if req is None or req.status != Status.HELD:
            raise ValueError(f"release({rid!r}): no held prefill-only request with this id")
        # Only the prompt's KV is valid (the first output token was never computed).
        req.num_computed = len(req.prompt_ids)
        self.scheduler.release(req, cache=cache and not self.cache.disabled)
        req.status = Status.FINISHED
        # A prefill-only request ends here, not in _finish: count it and its prefix-cache hits the same way.
        self._stats.num_requests_total += 1
        self._stats.cached_tokens_total += req.cached_tokens

    def allocate_external(self, prompt, sampling: SamplingParams | None = None,
                          rid: str | None = None) -> ExternalAllocation:
        """Reserve pages for a prompt whose KV will be written from outside (decode side of PD).

        Raises OutOfPages when the pool cannot hold it now (retry later or reject).
        """
        if sampling is not None and sampling.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: the prompt must be prefilled where it is decoded (local prefill)")
        self._compile(sampling)
        req = self._new_request(prompt, sampling, rid, Mode.EXTERNAL)
        n = self.scheduler.pages_for(len(req.prompt_ids))
        pages = self.scheduler.alloc_pages(n)
        if pages is None:
            raise OutOfPages(f"need {n} pages, {self.scheduler.available_pages} available")
        aux = self.pool.alloc_aux()
        if aux is None:
            self.pool.free(pages)
            raise OutOfPages("no free aux slot")
        req.pages, req.aux_slot, req.status = pages, aux, Status.EXTERNAL_WAIT
        self.requests[req.rid] = req
        self._stats.prompt_tokens_total += len(req.prompt_ids)
        return ExternalAllocation(req.rid, list(pages), aux, len(req.prompt_ids))

    def activate_external(self, rid: str, first_token_id: int, first_token_logprob: float | None = None,
                          cached_tokens: int = 0, first_token_top: list | None = None) -> None:
        """The KV of rid's prompt is in its pages: join the running batch with its first token
        (which KV transfer delivered in the request's aux slot)."""
        req = self.requests.get(rid)
        if req is None or req.status != Status.EXTERNAL_WAIT:
            raise ValueError(f"activate_external({rid!r}): no pre-allocated request with this id")
        if not 0 <= first_token_id < self.model_config.vocab_size:
            raise ValueError(f"first_token_id={first_token_id}: outside the vocabulary")
        self.pool.free_aux(req.aux_slot)
        req.aux_slot = None
        req.num_computed = len(req.prompt_ids)
        req.cached_tokens = cached_tokens
        self.scheduler.cache_prompt(req)
        req.status = Status.RUNNING
        req.admit_seq = self.scheduler.next_admit_seq()
        self.scheduler.running.append(req)
        req.first_token_time = time.monotonic()
        lp = [] if first_token_logprob is None or not req.sampling.logprobs else [first_token_logprob]
        top = [list(first_token_top)] if first_token_top and req.sampling.top_logprobs else []
        self._accept_token(req, first_token_id, lp, top)
