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
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tandem.config.schemas import EngineConfig

from .kv_pool import KVPool, OutOfPages
from .loader import load_model, resolve_dtype
from .model_runner import ModelRunner
from .radix_cache import RadixCache
from .request import Mode, Request, Status
from .sampler import SamplerVariant, SamplingTensors, allow_mask
from .sampling_params import SamplingParams
from .scheduler import Scheduler

CPU_KV_BYTES_CAP = 512 << 20
log = logging.getLogger(__name__)


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


@dataclass
class EngineStats:
    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    num_held_reqs: int = 0
    num_external_reqs: int = 0
    num_used_pages: int = 0
    num_free_pages: int = 0
    num_cached_pages: int = 0
    num_evictable_pages: int = 0
    num_total_pages: int = 0
    num_used_tokens: int = 0
    token_usage: float = 0.0
    cache_hit_rate: float = 0.0
    prompt_tokens_total: int = 0
    cached_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_requests_total: int = 0
    num_retracted_total: int = 0
    gen_throughput: float = 0.0
    step_kind: str = "idle"
    step_batch_size: int = 0
    step_num_tokens: int = 0
    step_time_s: float = 0.0


def _config(model_path, config: EngineConfig | None, overrides: dict) -> EngineConfig:
    if config is not None:
        if overrides or model_path:
            data = config.model_dump()
            data.update(overrides)
            if model_path:
                data["model_path"] = model_path
            return EngineConfig(**data)
        return config
    # Services pass their whole config; keep only the engine's fields.
    fields = EngineConfig.model_fields
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise ValueError(f"unknown engine option(s) {unknown}; see tandem.config.EngineConfig")
    return EngineConfig(model_path=model_path, **overrides)


class EngineCore:
    def __init__(self, model_path: str | None = None, config: EngineConfig | None = None, **overrides):
        self.config = cfg = _config(model_path, config, overrides)
        if not cfg.model_path:
            raise ValueError("model_path is required")
        if cfg.enable_hierarchical_cache or cfg.hicache_storage_backend:
            raise ValueError("enable_hierarchical_cache / hicache_storage_backend: the host KV tier (HiCache) "
                             "is not implemented in this build; remove the flag")
        if not os.path.isdir(cfg.model_path):
            raise ValueError(f"model_path={cfg.model_path!r}: not a directory")
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device")
        self.device = device
        self.dtype = resolve_dtype(cfg.dtype, device)
        self.attention_backend = _attention_backend(cfg.attention_backend, device)
        self.model, self.model_config = load_model(cfg.model_path, self.dtype, device)
        mc = self.model_config
        self.context_length = cfg.context_length or mc.max_position_embeddings
        self.model.set_backend(self.attention_backend, self.context_length + 1)
        self.tokenizer = _load_tokenizer(cfg.model_path)
        self.eos_token_ids = set(mc.eos_token_ids) | _generation_eos(cfg.model_path)
        if self.tokenizer is not None:
            eos = _tokenizer_eos(cfg.model_path, self.tokenizer)
            if eos is not None:
                self.eos_token_ids.add(eos)

        page_size = cfg.page_size
        bytes_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * self.dtype.itemsize
        if cfg.max_total_tokens:
            total_tokens = cfg.max_total_tokens
        elif device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            budget = total * cfg.mem_fraction_static - (total - free)
            if budget <= 0:
                raise ValueError(f"mem_fraction_static={cfg.mem_fraction_static}: no memory left for the KV pool")
            total_tokens = int(budget // bytes_per_token)
        else:
            total_tokens = int(min(cfg.mem_fraction_static * _host_available_bytes(), CPU_KV_BYTES_CAP)
                               // bytes_per_token)
        num_pages = max(1, total_tokens // page_size)
        self.pool = KVPool(mc.num_layers, num_pages, page_size, mc.num_kv_heads, mc.head_dim, self.dtype,
                           device, num_aux_slots=max(64, cfg.max_running_requests * 4))
        self.cache = RadixCache(page_size, self.pool.free, disabled=cfg.disable_radix_cache)
        self.chunked_prefill_size = cfg.chunked_prefill_size or _default_chunked_prefill_size(device)
        self.scheduler = Scheduler(self.pool, self.cache, self.chunked_prefill_size, cfg.max_prefill_tokens,
                                   cfg.max_running_requests, mixed_chunk=cfg.enable_mixed_chunk)
        self.cuda_graph_max_bs = self._cuda_graph_max_bs()
        self.runner = ModelRunner(self.model, self.pool, device, self.cuda_graph_max_bs)
        self._seed_rng = random.Random(cfg.random_seed)  # seeds of requests that bring none
        self.requests: dict[str, Request] = {}
        self._pending: list[StepOutput] = []
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
        elif self.model.moe_layers():
            why = "the MoE layer syncs with the host (fused MoE comes with GPU engine part 3)"
        elif cfg.ep_size > 1:
            why = "expert parallelism all-reduces outside a graph"
        if why:
            log.warning("CUDA graphs off: %s", why)
            return 0
        return min(cfg.cuda_graph_max_bs or cfg.max_running_requests, cfg.max_running_requests)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._pending)

    def wrap_runner(self, wrap: Callable[[ModelRunner], ModelRunner]) -> None:
        """Replace the model runner by ``wrap(runner)`` (expert parallelism mirrors every
        forward pass on its followers); between steps only."""
        self.runner = wrap(self.runner)

    # ---- subscriptions -------------------------------------------------------------------------
    def subscribe_kv_events(self, fn: Callable[[list], None]) -> None:
        """fn(events) with BlockStored / BlockRemoved / AllBlocksCleared (tandem.engine.radix_cache)."""
        self.cache.subscribe(fn)

    def set_expert_recorder(self, fn: Callable[[int, torch.Tensor], None] | None) -> None:
        """fn(layer_idx, topk_ids [T, k]) for every MoE layer's routing, or None to stop."""
        for m in self.model.moe_layers():
            m.recorder = fn

    # ---- requests ------------------------------------------------------------------------------
    def tokenize(self, prompt) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return list(prompt)

    def validate_request(self, prompt_ids: list, sampling: SamplingParams) -> None:
        """Raise ValueError naming the problem if this request could never run here."""
        self._validate(list(prompt_ids), sampling)

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
        return Request(rid=rid, prompt_ids=ids, sampling=sp, mode=mode, seed=seed)

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

    def release(self, rid: str, cache: bool = True) -> None:
        """Free a finished prefill-only request's pages (into the prefix cache when cache)."""
        req = self.requests.pop(rid, None)
        if req is None or req.status != Status.HELD:
            raise ValueError(f"release({rid!r}): no held prefill-only request with this id")
        # Only the prompt's KV is valid (the first output token was never computed).
        req.num_computed = len(req.prompt_ids)
        self.scheduler.release(req, cache=cache and not self.cache.disabled)
        req.status = Status.FINISHED

    def allocate_external(self, prompt, sampling: SamplingParams | None = None,
                          rid: str | None = None) -> ExternalAllocation:
        """Reserve pages for a prompt whose KV will be written from outside (decode side of PD).

        Raises OutOfPages when the pool cannot hold it now (retry later or reject).
        """
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
                          cached_tokens: int = 0) -> None:
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
        req.status = Status.RUNNING
        req.admit_seq = self.scheduler.next_admit_seq()
        self.scheduler.running.append(req)
        req.first_token_time = time.monotonic()
        lp = [] if first_token_logprob is None or not req.sampling.logprobs else [first_token_logprob]
        self._accept_token(req, first_token_id, lp, [])

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
            if batch:
                ntok = sum(n for _, n in batch)
                logits = self.runner.forward(batch)
                for req, n in batch:
                    req.num_computed += n
                rows = [i for i, (req, _) in enumerate(batch) if req.num_uncomputed == 0]
                for req, _ in batch:
                    if req.mode == Mode.PREFILL_ONLY and req.on_chunk_done is not None:
                        self._report_chunk(req)
                if rows:
                    self._sample([batch[i][0] for i in rows], logits[rows] if len(rows) < len(batch) else logits)
            outs, self._pending = self._pending, []
            self._update_stats(kind if batch else "idle", len(batch), ntok, time.monotonic() - t0)
            return outs

    def _report_chunk(self, req: Request) -> None:
        final = min(req.num_computed, len(req.prompt_ids)) // self.page_size
        if req.num_computed >= len(req.prompt_ids):
            final = len(req.pages)  # the last partial page is final too
        if final > req.pages_reported:
            req.on_chunk_done(req.rid, req.pages[req.pages_reported:final], req.num_computed)
            req.pages_reported = final

    def _sampling_inputs(self, reqs: list) -> tuple[SamplingTensors | None, SamplerVariant]:
        """Host tensors of the batch's sampling parameters (None when every row is greedy, unmasked)."""
        sps = [r.sampling for r in reqs]
        V = self.model_config.vocab_size
        masks = []
        for req, sp in zip(reqs, sps):
            # min_tokens: forbid EOS / stop ids until enough tokens were produced.
            banned = []
            if len(req.output_ids) < sp.min_tokens:
                banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(self.eos_token_ids))
            masks.append(banned)
        variant = SamplerVariant(random=not all(sp.greedy for sp in sps),
                                 top_k_top_p=any(not sp.greedy and (0 < sp.top_k < V or sp.top_p < 1.0)
                                                 for sp in sps),
                                 masked=any(masks))
        if variant == SamplerVariant():
            return None, variant
        return SamplingTensors(
            temperatures=torch.tensor([1.0 if sp.greedy else sp.temperature for sp in sps]),
            top_ks=torch.tensor([sp.top_k if 0 < sp.top_k < V else V for sp in sps]),
            top_ps=torch.tensor([sp.top_p for sp in sps], dtype=torch.float32),
            min_ps=torch.tensor([sp.min_p for sp in sps], dtype=torch.float32),
            seeds=torch.tensor([r.seed for r in reqs], dtype=torch.int64),
            positions=torch.tensor([r.seq_len for r in reqs], dtype=torch.int64),
            greedy=torch.tensor([sp.greedy for sp in sps]),
            mask=torch.stack([allow_mask(V, b) for b in masks]) if variant.masked else None,
        ), variant

    def _sample(self, reqs: list, logits: torch.Tensor) -> None:
        tensors, variant = self._sampling_inputs(reqs)
        token_ids = self.runner.sample(logits, tensors, variant)
        want_lp = any(r.sampling.logprobs or r.sampling.top_logprobs for r in reqs)
        logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None
        tokens = token_ids.tolist()  # the step's one wait for the device
        for i, (req, tok) in enumerate(zip(reqs, tokens)):
            sp = req.sampling
            lp, top = [], []
            if logprobs is not None and sp.logprobs:
                lp = [float(logprobs[i, tok])]
            if logprobs is not None and sp.top_logprobs:
                v, ix = logprobs[i].topk(sp.top_logprobs)
                top = [list(zip(ix.tolist(), v.tolist()))]
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            self._accept_token(req, tok, lp, top)

    def _accept_token(self, req: Request, tok: int, lp: list, top: list) -> None:
        req.output_ids.append(tok)
        req.output_logprobs.extend(lp)
        req.output_top_logprobs.extend(top)
        self._stats.generation_tokens_total += 1
        self._step_tokens += 1
        if req.mode == Mode.PREFILL_ONLY:
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
        )

    # ---- stats ---------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        self._update_stats(self._stats.step_kind, self._stats.step_batch_size, self._stats.step_num_tokens,
                           self._stats.step_time_s)
        return EngineStats(**vars(self._stats))

    def _update_stats(self, kind: str, bsz: int, ntok: int, dt: float) -> None:
        s, sch, pool = self._stats, self.scheduler, self.pool
        s.num_running_reqs = len(sch.running)
        s.num_queue_reqs = len(sch.waiting)
        s.num_held_reqs = sum(1 for r in self.requests.values() if r.status == Status.HELD)
        s.num_external_reqs = sum(1 for r in self.requests.values() if r.status == Status.EXTERNAL_WAIT)
        s.num_free_pages = pool.num_free_pages
        s.num_used_pages = pool.num_used_pages
        s.num_cached_pages = self.cache.num_pages
        s.num_evictable_pages = self.cache.evictable_pages
        in_use = pool.num_used_pages - self.cache.evictable_pages
        s.num_used_tokens = in_use * pool.page_size
        s.token_usage = in_use / pool.num_pages
        s.cache_hit_rate = s.cached_tokens_total / max(1, s.prompt_tokens_total)
        s.num_retracted_total = sch.num_retracted
        now = time.monotonic()
        window = self._gen_window
        if self._step_tokens:
            window.append((now, self._step_tokens))
            self._gen_window_tokens += self._step_tokens
            self._step_tokens = 0
        while window and now - window[0][0] >= 5.0:
            self._gen_window_tokens -= window.popleft()[1]
        s.gen_throughput = self._gen_window_tokens / max(now - window[0][0], 1e-3) if window else 0.0
        s.step_kind, s.step_batch_size, s.step_num_tokens, s.step_time_s = kind, bsz, ntok, dt


def _attention_backend(requested: str | None, device: str) -> str:
    if requested is None:
        return "triton" if device.startswith("cuda") else "torch_native"
    if requested == "triton" and not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention_backend='triton' on CPU runs only through the Triton interpreter "
                         "(set TRITON_INTERPRET=1; slow, for tests); use torch_native on CPU")
    return requested


def _default_chunked_prefill_size(device: str) -> int:
    if not device.startswith("cuda"):
        return 512
    gb = torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9
    return 2048 if gb < 35 else 4096 if gb < 60 else 8192


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _load_tokenizer(path: str):
    fn = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(fn):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(fn)


def _tokenizer_eos(path: str, tok) -> int | None:
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return tok.token_to_id(eos) if isinstance(eos, str) else None


def _generation_eos(path: str) -> set:
    try:
        with open(os.path.join(path, "generation_config.json")) as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError):
        return set()
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}


__all__ = ["EngineCore", "EngineStats", "StepOutput", "PrefillResult", "ExternalAllocation", "OutOfPages"]
