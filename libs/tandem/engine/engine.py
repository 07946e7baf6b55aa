"""EngineCore: the step loop one thread drives, plus the disaggregation entry points.

One owner: an EngineCore is not thread-safe. One thread calls everything on it (in a
worker, the EngineLoop's thread, which turns every other thread's wish into a command;
offline, the caller of ``LLM.generate``). Only ``validate_request``, which reads nothing
but the fixed configuration, may be called from elsewhere. Callbacks (``on_prefill_done``,
``on_chunk_done``, KV-event subscribers) run inside ``step()``: they must be quick and
must not call back into the engine (hand work to a queue instead).
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tandem.config.schemas import EngineConfig

from .disaggregation import DisaggregationMixin, ExternalAllocation, PrefillResult
from .engine_config import attention_backend, default_chunked_prefill_size, merge_config, resolve_device
from .grammar import GrammarBackend
from .hicache_setup import build_prefix_cache
from .kv_pool import KVPool, OutOfPages
from .kv_quant import kv_cache_spec
from .loader import load_model, resolve_dtype
from .model_runner import ModelRunner
from .moe_hooks import expert_hooks, tp_of
from .pool_sizing import kv_pool_pages
from .request import Mode, Request, Status
from .sampler import SamplerVariant, SamplingTensors, allow_mask, mask_words
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .stats import EngineStats, EngineStatsMixin
from .tokenizer import eos_token_ids, load_tokenizer

log = logging.getLogger(__name__)
# Longest an idle step blocks on a storage prefetch that a waiting request needs: short, so a
# command (a new request, an abort) arriving meanwhile is taken within this time.
PREFETCH_WAIT_S = 0.01


@dataclass
class StepOutput:
    """What one request produced in one step."""

    rid: str
    new_token_ids: list
    new_logprobs: list = field(default_factory=list)  # per new token (when logprobs requested)
    new_top_logprobs: list = field(default_factory=list)  # per new token: [(token_id, logprob)]
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | prefill_done
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    stop_text_pos: int | None = None  # finished by a stop string: output text ends here
    prompt_logprobs: list = field(default_factory=list)  # with the first token: [(logprob, top)] of prompt 1..L-1


@dataclass
class _Launched:
    """One step's sampling, launched on the device: its results reach the host through
    non-blocking copies (``event`` marks their end on CUDA) and are read by ``_resolve``."""

    reqs: list
    tokens: torch.Tensor  # [B] host
    logprobs: torch.Tensor | None  # [B] host: logprob of each sampled token
    top_ids: torch.Tensor | None  # [B, K] host, K = the largest top_logprobs asked
    top_vals: torch.Tensor | None
    event: object = None  # torch.cuda.Event on CUDA


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class EngineCore(DisaggregationMixin, EngineStatsMixin):
    """The engine: requests, scheduling, one forward pass per ``step()``. What is not the step
    loop lives next door: config merge and device defaults (``engine_config``), KV pool sizing
    (``pool_sizing``), tokenizer and EOS ids (``tokenizer``), the PD entry points
    (``disaggregation``), stats (``stats``)."""

    def __init__(self, model_path: str | None = None, config: EngineConfig | None = None, parallel=None,
                 **overrides):
        """``parallel``: this process's ``ParallelGroup`` (rank 0) when ``tp_size`` or ``ep_size`` > 1
        (``tandem.engine.parallel.start_parallel`` builds both)."""
        self.config = cfg = merge_config(model_path, config, overrides)
        if not cfg.model_path:
            raise ValueError("model_path is required")
        if not os.path.isdir(cfg.model_path):
            raise ValueError(f"model_path={cfg.model_path!r}: not a directory")
        self.device = device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, device)
        self.attention_backend = attention_backend(cfg.attention_backend, device)
        hooks = expert_hooks(cfg, device, parallel)
        self.model, self.model_config = load_model(cfg.model_path, self.dtype, device, hooks, cfg.load_format,
                                                   cfg.quantization, cfg.fp8_gemm_backend, tp_of(cfg, parallel))
        # EPLB: plans applied in place between steps, the recorder folded after each (None: dense or no EPLB).
        self.eplb = hooks.runtime(self.model)
        mc = self.model_config
        self.context_length = cfg.context_length or mc.max_position_embeddings
        self.model.set_backend(self.attention_backend, self.context_length + 1)
        self.tokenizer = load_tokenizer(cfg.model_path)
        self.eos_token_ids = eos_token_ids(cfg.model_path, mc, self.tokenizer)

        page_size = cfg.page_size
        kv = kv_cache_spec(cfg, self.model, self.dtype, device, self.tokenizer)  # --kv-cache-dtype, its scales
        kv_heads = self.model.kv_heads_per_rank  # this rank's heads (all of them without TP)
        num_pages = kv_pool_pages(cfg, mc, kv.dtype, device, kv_heads)
        self.pool = KVPool(mc.num_layers, num_pages, page_size, kv_heads, mc.head_dim, kv.dtype,
                           device, num_aux_slots=max(64, cfg.max_running_requests * 4),
                           k_scales=kv.k_scales or None, v_scales=kv.v_scales or None)
        self.cache, self.hicache = build_prefix_cache(cfg, self.pool)
        self.chunked_prefill_size = cfg.chunked_prefill_size or default_chunked_prefill_size(device)
        self.scheduler = Scheduler(self.pool, self.cache, self.chunked_prefill_size, cfg.max_prefill_tokens,
                                   cfg.max_running_requests, mixed_chunk=cfg.enable_mixed_chunk)
        self.cuda_graph_max_bs = self._cuda_graph_max_bs()
        # Penalty rows: one per running request with penalties or logit bias (decode may run
        # more than max_running_requests when prefilled requests arrive from outside).
        self.runner = ModelRunner(self.model, self.pool, device, self.cuda_graph_max_bs,
                                  penalty_rows=2 * cfg.max_running_requests)
        self.grammars = GrammarBackend(cfg.model_path, mc.vocab_size, sorted(self.eos_token_ids))
        self._seed_rng = random.Random(cfg.random_seed)  # seeds of requests that bring none
        self.requests: dict[str, Request] = {}
        self._pending: list[StepOutput] = []
        # Overlap scheduling: step N+1 is scheduled and launched before step N's sampled tokens
        # are read back (the next forward pass reads them on the device). With several ranks the
        # leader sends host token ids to its followers, so it always waits.
        self.overlap_schedule = not cfg.disable_overlap_schedule and cfg.world_size == 1
        self._inflight: _Launched | None = None
        self._stats = EngineStats(num_total_pages=num_pages)
        self._rid_counter = itertools.count()
        # (time, tokens) per step over the last 5 s: one entry a step, so stats cost O(1) per step.
        self._gen_window: collections.deque[tuple[float, int]] = collections.deque()
        self._gen_window_tokens = 0
        self._step_tokens = 0

    # ---- info ------------------------------------------------------------------------------
    @property
    def page_size(self) -> int:
        return self.pool.page_size

    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free_pages

    @property
    def num_available_pages(self) -> int:
        """Free pages plus evictable cached pages: equals num_total_pages when nothing is in use."""
        return self.scheduler.available_pages

    def _cuda_graph_max_bs(self) -> int:
        """0 when decode runs eagerly; otherwise the largest batch captured as a CUDA graph."""
        cfg = self.config
        if not self.device.startswith("cuda") or cfg.disable_cuda_graph:
            return 0
        why = None
        if self.attention_backend != "triton":
            why = "the torch_native backend's decode shapes depend on the context length"
        elif cfg.world_size > 1:
            why = "with several ranks the followers run eagerly (a captured collective would not match them)"
        if why:
            log.warning("CUDA graphs off: %s", why)
            return 0
        return min(cfg.cuda_graph_max_bs or cfg.max_running_requests, cfg.max_running_requests)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._pending or self._inflight)

    def wrap_runner(self, wrap: Callable[[ModelRunner], ModelRunner]) -> None:
        """Replace the model runner by ``wrap(runner)`` (expert parallelism mirrors every
        forward pass on its followers); between steps only."""
        self.runner = wrap(self.runner)

    # ---- subscriptions -------------------------------------------------------------------------
    def subscribe_kv_events(self, fn: Callable[[list], None]) -> None:
        """fn(events) with BlockStored / BlockRemoved / AllBlocksCleared (tandem.engine.radix_cache)."""
        self.cache.subscribe(fn)

    # ---- requests ------------------------------------------------------------------------------
    def tokenize(self, prompt) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return list(prompt)

    def validate_request(self, prompt_ids: list, sampling: SamplingParams) -> None:
        """Raise ValueError naming the problem if this request could never run here (a grammar
        that does not compile included: it is compiled here, once, and cached)."""
        self._validate(list(prompt_ids), sampling)
        self._compile(sampling)

    def cached_prefix_tokens(self, prompt_ids: list) -> int:
        """Leading tokens of the prompt that the prefix cache holds now: what a request with this
        prompt would share instead of computing."""
        return self.scheduler.cached_prefix_tokens(list(prompt_ids))

    def _compile(self, sp: SamplingParams | None) -> None:
        """Compile the request's grammar (cached by the backend; validate_request runs it on the
        caller's thread, so the engine loop seldom compiles)."""
        if sp is not None and sp.structured is not None:
            sp.structured.validate()
            self.grammars.compile(sp.structured)

    def kv_snapshot(self) -> list:
        """Every block the prefix cache holds, as BlockStored events (for a new KV-event subscriber)."""
        return self.cache.snapshot()

    def _validate(self, ids: list, sp: SamplingParams) -> None:
        if len(ids) == 0:
            raise ValueError("empty prompt: at least one token is required")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.context_length:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the context length is {self.context_length} "
                "(prompt + at least one output token must fit)"
            )
        sp.validate(vocab)
        if self.scheduler.pages_for(len(ids) + 1) > self.pool.num_pages:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the KV pool holds only "
                f"{self.pool.num_pages * self.page_size} tokens (raise --max-total-tokens)"
            )

    def _new_request(self, prompt, sp, rid, mode) -> Request:
        sp = sp or SamplingParams()
        ids = self.tokenize(prompt)
        self._validate(ids, sp)
        rid = rid if rid is not None else f"req-{next(self._rid_counter)}-{uuid.uuid4().hex[:8]}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seed = sp.seed if sp.seed is not None else self._seed_rng.getrandbits(63)
        req = Request(rid=rid, prompt_ids=ids, sampling=sp, mode=mode, seed=seed)
        if sp.structured is not None:
            req.grammar = self.grammars.new_state(sp.structured)
        return req

    def add_request(self, prompt, sampling: SamplingParams | None = None, rid: str | None = None,
                    mode: Mode | str = Mode.NORMAL, on_prefill_done: Callable[[PrefillResult], None] | None = None,
                    on_chunk_done: Callable[[str, list, int], None] | None = None) -> str:
        """Queue a request (a string or token ids); return its id.

        mode "normal": prefill + decode here. mode "prefill_only": prefill (chunked),
        sample the first token, then keep the pages and call on_prefill_done(PrefillResult);
        on_chunk_done(rid, newly_final_page_indices, num_computed_tokens) fires after each
        chunk with the pages whose KV is complete. Call release(rid) afterwards.
        """
        mode = Mode(mode)
        if mode == Mode.EXTERNAL:
            raise ValueError("use allocate_external() for requests whose KV comes from outside")
        if mode == Mode.PREFILL_ONLY and sampling is not None and sampling.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: the prompt must be prefilled where it is decoded (local prefill)")
        self._compile(sampling)
        req = self._new_request(prompt, sampling, rid, mode)
        req.on_prefill_done, req.on_chunk_done = on_prefill_done, on_chunk_done
        self.requests[req.rid] = req
        self.scheduler.waiting.append(req)
        self._stats.prompt_tokens_total += len(req.prompt_ids)
        return req.rid

    def abort(self, rid: str, reason: str = "abort") -> bool:
        """Stop a request in any state and free its pages; False if unknown or already finished."""
        req = self.requests.get(rid)
        if req is None:
            return False
        if req.status == Status.HELD:
            self.release(rid, cache=False)
            return True
        self._finish(req, "abort", cache=True)
        self._pending.append(self._output(req, [], [], []))
        return True

    def flush_cache(self) -> bool:
        """Evict every unreferenced cached page; True when the cache is now empty."""
        return self.cache.reset()

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one scheduling step (at most one forward pass); return per-request outputs."""
        with torch.inference_mode():
            t0 = time.monotonic()
            kind, batch = self.scheduler.schedule()
            ntok = 0
            if kind == "stuck":
                req = batch[0][0]
                self._finish(req, "abort", cache=True)
                out = self._output(req, [], [], [])
                out.error = "KV pool too small for this request's context"
                self._pending.append(out)
                batch = []
            if self.hicache is not None:  # load-backs issued by schedule(): per-layer waits (CUDA)
                self.runner.layer_ready = self.hicache.take_layer_ready() if batch else None
                if not batch:
                    self.hicache.join()
                    if self._inflight is None and self.scheduler.waiting:
                        self.hicache.wait_prefetch(PREFETCH_WAIT_S)  # nothing to run: do not spin
            if batch:
                ntok = sum(n for _, n in batch)
                want = [req.wants_prompt_logprobs for req, _ in batch]
                if any(want):
                    logits, rows = self.runner.forward(batch, want)
                    for i, r in rows.items():
                        self._gather_prompt_logprobs(batch[i][0], r)
                else:
                    logits = self.runner.forward(batch)
                if self.hicache is not None:
                    self.hicache.join()
            # The previous step's tokens: the device produced them before this forward pass, so
            # this waits for their copy only (a request may finish here, e.g. on a stop token).
            self._resolve_inflight()
            if batch:
                live = [req.status != Status.FINISHED for req, _ in batch]
                for (req, n), alive in zip(batch, live):
                    if alive:
                        req.num_computed += n
                rows = [i for i, (req, _) in enumerate(batch) if live[i] and req.num_uncomputed == 0]
                for (req, _), alive in zip(batch, live):
                    if alive and req.mode == Mode.PREFILL_ONLY and req.on_chunk_done is not None:
                        self._report_chunk(req)
                self._cache_prefilled_pages(batch, live)
                if rows:
                    launched = self._launch_sample([batch[i][0] for i in rows],
                                                   logits[rows] if len(rows) < len(batch) else logits)
                    if launched is not None:
                        self._inflight = launched
                        if not self.overlap_schedule or any(
                                r.grammar is not None or r.mode == Mode.PREFILL_ONLY for r in launched.reqs):
                            # A grammar's next mask needs this token; a prefill-only request hands
                            # its first token over now.
                            self._resolve_inflight()
            outs, self._pending = self._pending, []
            self._update_stats(kind if batch else "idle", len(batch), ntok, time.monotonic() - t0)
            return outs

    def _cache_prefilled_pages(self, batch: list, live: list) -> None:
        """Full prompt pages go to the prefix cache (shared from then on) once computed: after the
        prompt's last chunk; with HiCache after every chunk, so that write-through backs a long
        prompt up chunk by chunk while the next chunk computes."""
        every_chunk = self.hicache is not None
        for (req, _), alive in zip(batch, live):
            if alive and req.mode == Mode.NORMAL and not req.output_ids and (every_chunk or req.num_uncomputed == 0):
                self.scheduler.cache_prompt(req)

    def _gather_prompt_logprobs(self, req: Request, rows: torch.Tensor) -> None:
        """rows[j]: logits after token num_computed + j, i.e. the distribution of the next prompt token."""
        start, L = req.num_computed, len(req.prompt_ids)
        n = min(rows.shape[0], L - 1 - start)
        if n <= 0 or len(req.prompt_logprobs) != start:
            return
        lp = torch.log_softmax(rows[:n].float(), dim=-1)
        targets = torch.tensor(req.prompt_ids[start + 1:start + 1 + n], device=lp.device)
        vals = lp.gather(1, targets[:, None])[:, 0].tolist()
        k = req.sampling.prompt_logprobs
        tops = [[]] * n
        if k:
            v, ix = lp.topk(k, dim=-1)
            tops = [list(zip(a, b)) for a, b in zip(ix.tolist(), v.tolist())]
        req.prompt_logprobs.extend(zip(vals, tops))

    def _report_chunk(self, req: Request) -> None:
        final = min(req.num_computed, len(req.prompt_ids)) // self.page_size
        if req.num_computed >= len(req.prompt_ids):
            final = len(req.pages)  # the last partial page is final too
        if final > req.pages_reported:
            req.on_chunk_done(req.rid, req.pages[req.pages_reported:final], req.num_computed)
            req.pages_reported = final

    def _sampling_inputs(self, reqs: list) -> tuple[SamplingTensors | None, SamplerVariant]:
        """Host tensors of the batch's sampling parameters (None when every row is greedy, unmasked).

        Masks: a grammar row gets its matcher's allow-bitmask for the next token (the previous
        token was accepted in ``_accept_token``); min_tokens forbids EOS / stop ids until enough
        tokens were produced (unless that would leave a grammar row nothing to choose).
        """
        sps = [r.sampling for r in reqs]
        V = self.model_config.vocab_size
        banned_rows = []
        for req, sp in zip(reqs, sps):
            banned = []
            if len(req.output_ids) < sp.min_tokens:
                banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(self.eos_token_ids))
            banned_rows.append(banned)
        penalties = any(r.penalty_row is not None for r in reqs)
        grammar = any(r.grammar is not None for r in reqs)
        variant = SamplerVariant(random=not all(sp.greedy for sp in sps),
                                 top_k_top_p=any(not sp.greedy and (0 < sp.top_k < V or sp.top_p < 1.0)
                                                 for sp in sps),
                                 masked=any(banned_rows) or grammar or penalties, penalties=penalties)
        if variant == SamplerVariant():
            return None, variant
        mask = None
        if variant.masked:
            mask = torch.full((len(reqs), mask_words(V)), -1, dtype=torch.int32)
            for i, (req, banned) in enumerate(zip(reqs, banned_rows)):
                if req.grammar is not None:
                    req.grammar.fill(mask, i)
                if banned:
                    row = mask[i] & allow_mask(V, banned)
                    if req.grammar is None or bool(row.any()):
                        mask[i] = row
        return SamplingTensors(
            temperatures=torch.tensor([1.0 if sp.greedy else sp.temperature for sp in sps]),
            top_ks=torch.tensor([sp.top_k if 0 < sp.top_k < V else V for sp in sps]),
            top_ps=torch.tensor([sp.top_p for sp in sps], dtype=torch.float32),
            min_ps=torch.tensor([sp.min_p for sp in sps], dtype=torch.float32),
            seeds=torch.tensor([r.seed for r in reqs], dtype=torch.int64),
            positions=torch.tensor([r.seq_len for r in reqs], dtype=torch.int64),
            greedy=torch.tensor([sp.greedy for sp in sps]),
            mask=mask,
            penalty_rows=torch.tensor([self.runner.penalties.neutral_row if r.penalty_row is None else r.penalty_row
                                       for r in reqs], dtype=torch.int64) if penalties else None,
        ), variant

    def _penalty_rows(self, reqs: list, logits: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Give every request with penalties / logit bias its PenaltyState row (filled from its
        prompt and outputs so far). A request that finds none free ends with an error."""
        state = self.runner.penalties
        keep = []
        for i, req in enumerate(reqs):
            sp = req.sampling
            if sp.penalized and req.penalty_row is None:
                req.penalty_row = state.alloc(req.prompt_ids, req.output_ids, sp.presence_penalty,
                                              sp.frequency_penalty, sp.repetition_penalty, sp.logit_bias)
                if req.penalty_row is None:
                    self._finish(req, "abort", cache=True)
                    out = self._output(req, [], [], [])
                    out.error = (f"all {state.num_rows} penalty rows are in use (requests with penalties or "
                                 "logit_bias running at once); retry later")
                    self._pending.append(out)
                    continue
            keep.append(i)
        if len(keep) == len(reqs):
            return reqs, logits
        return [reqs[i] for i in keep], logits[keep]

    def _free_sampling_state(self, req: Request) -> None:
        if req.penalty_row is not None:
            self.runner.penalties.free(req.penalty_row)
            req.penalty_row = None

    def _launch_sample(self, reqs: list, logits: torch.Tensor) -> _Launched | None:
        """Sample every row on the device and start copying the results to the host. Until
        ``_resolve`` reads them, each request's next token is a placeholder in ``output_ids``
        (-(row + 1)) that the next forward pass resolves on the device."""
        reqs, logits = self._penalty_rows(reqs, logits)
        if not reqs:
            return None
        tensors, variant = self._sampling_inputs(reqs)
        token_ids = self.runner.sample(logits, tensors, variant)
        if variant.penalties:  # count the new tokens on the device (no host sync)
            idx = [i for i, r in enumerate(reqs) if r.penalty_row is not None]
            dev = token_ids.device
            self.runner.penalties.record(torch.tensor([reqs[i].penalty_row for i in idx], device=dev),
                                         token_ids[torch.tensor(idx, device=dev)])
        lp = top_ids = top_vals = None
        k = max(r.sampling.top_logprobs or 0 for r in reqs)
        if k or any(r.sampling.logprobs for r in reqs):
            logprobs = torch.log_softmax(logits, dim=-1)
            lp = logprobs.gather(1, token_ids[:, None].long())[:, 0]
            if k:
                top_vals, top_ids = logprobs.topk(k, dim=-1)
        launched = _Launched(reqs, _to_host(token_ids), _to_host(lp), _to_host(top_ids), _to_host(top_vals))
        if token_ids.device.type == "cuda":
            launched.event = torch.cuda.Event()
            launched.event.record()
        self.runner.publish_future(token_ids)
        for i, req in enumerate(reqs):
            req.output_ids.append(-(i + 1))
            req.num_pending = 1
        return launched

    def _resolve_inflight(self) -> None:
        """Read back the launched step's tokens and accept them (stop checks, outputs)."""
        launched, self._inflight = self._inflight, None
        if launched is None:
            return
        if launched.event is not None:
            launched.event.synchronize()
        tokens = launched.tokens.tolist()
        lps = launched.logprobs.tolist() if launched.logprobs is not None else None
        top_ids = launched.top_ids.tolist() if launched.top_ids is not None else None
        top_vals = launched.top_vals.tolist() if launched.top_vals is not None else None
        now = time.monotonic()
        for i, (req, tok) in enumerate(zip(launched.reqs, tokens)):
            if req.status == Status.FINISHED:
                continue  # aborted while its token was sampled: _finish dropped the placeholder
            req.output_ids.pop()
            req.num_pending = 0
            sp = req.sampling
            lp = [lps[i]] if lps is not None and sp.logprobs else []
            top = [list(zip(top_ids[i][:sp.top_logprobs], top_vals[i][:sp.top_logprobs]))] \
                if top_ids is not None and sp.top_logprobs else []
            if req.first_token_time is None:
                req.first_token_time = now
            self._accept_token(req, tok, lp, top)

    def _accept_token(self, req: Request, tok: int, lp: list, top: list) -> None:
        req.output_ids.append(tok)
        req.output_logprobs.extend(lp)
        req.output_top_logprobs.extend(top)
        self._stats.generation_tokens_total += 1
        self._step_tokens += 1
        if req.grammar is not None and not req.grammar.accept(tok):
            # Only a first token sampled elsewhere (PD) could get here: never continue off-grammar.
            self._finish(req, "abort", cache=True)
            out = self._output(req, [tok], lp, top)
            out.error = f"token {tok} is not allowed by the request's grammar"
            self._pending.append(out)
            return
        if req.mode == Mode.PREFILL_ONLY:
            self._free_sampling_state(req)
            self.scheduler.remove(req)
            req.status = Status.HELD
            if req.on_prefill_done is not None:
                n_pages = self.scheduler.pages_for(len(req.prompt_ids))
                req.on_prefill_done(PrefillResult(
                    rid=req.rid, page_indices=list(req.pages[:n_pages]), num_tokens=len(req.prompt_ids),
                    first_token_id=tok, first_token_logprob=lp[0] if lp else float("nan"),
                    cached_tokens=req.cached_tokens, top_logprobs=top[0] if top else [],
                ))
            out = self._output(req, [tok], lp, top)
            out.finished, out.finish_reason = True, "prefill_done"
            self._pending.append(out)
            return
        reason = self._check_stop(req, tok)
        if reason is not None:
            self._finish(req, reason, cache=True)
        self._pending.append(self._output(req, [tok], lp, top))

    def _check_stop(self, req: Request, tok: int) -> str | None:
        sp = req.sampling
        n = len(req.output_ids)
        if req.grammar is not None and req.grammar.terminated:
            return "stop"  # the grammar is complete and its stop token was sampled
        if n >= sp.min_tokens:
            if tok in sp.stop_token_ids or (not sp.ignore_eos and tok in self.eos_token_ids):
                return "stop"
            if sp.stop and self.tokenizer is not None:
                text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
                window = max(len(s) for s in sp.stop) + 16
                hits = [p for p in (text.find(s, max(0, len(text) - window)) for s in sp.stop) if p >= 0]
                if hits:
                    req.stop_text_pos = min(hits)
                    return "stop"
        if n >= sp.max_tokens:
            return "length"
        if req.seq_len >= self.context_length:
            return "length"
        return None

    def _finish(self, req: Request, reason: str, cache: bool) -> None:
        status = req.status
        if status == Status.FINISHED:
            return
        req.status = Status.FINISHED
        req.finish_reason = reason
        if req.num_pending:  # a token still being sampled is not part of the output
            req.output_ids.pop()
            req.num_pending = 0
        self._free_sampling_state(req)
        self.scheduler.remove(req)
        if status == Status.EXTERNAL_WAIT:
            self.scheduler.release(req, cache=False)  # KV may be half-written: never cache it
        else:
            self.scheduler.release(req, cache=cache and not self.cache.disabled)
        if req.aux_slot is not None:
            self.pool.free_aux(req.aux_slot)
            req.aux_slot = None
        self.requests.pop(req.rid, None)
        self._stats.num_requests_total += 1
        self._stats.cached_tokens_total += req.cached_tokens

    def _output(self, req: Request, toks: list, lp: list, top: list) -> StepOutput:
        return StepOutput(
            rid=req.rid, new_token_ids=toks, new_logprobs=lp, new_top_logprobs=top,
            finished=req.status == Status.FINISHED, finish_reason=req.finish_reason,
            num_prompt_tokens=len(req.prompt_ids), num_output_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens, stop_text_pos=req.stop_text_pos,
            prompt_logprobs=list(req.prompt_logprobs) if req.sampling.prompt_logprobs is not None and toks
            and len(req.output_ids) == len(toks) else [],
        )

    # ---- stats ---------------------------------------------------------------------------------
__all__ = ["EngineCore", "EngineStats", "StepOutput", "PrefillResult", "ExternalAllocation", "OutOfPages"]
