"""EngineCore: requests in, one step at a time, results out as values.

One step is a flow of data (as in nano-vllm and vLLM v1): ``Scheduler.schedule`` picks the
batch -> ``ModelRunner.forward`` computes its logits -> ``Scheduler.update_from_output``
accepts the tokens read back from the device and advances the batch -> ``SampleLauncher``
samples the batch's next tokens. What happened leaves ``step()`` as :class:`StepOutput`
values only (tokens, finishes, a prefill-only request's pages now final, its prefill done);
nothing is called back. The parts next door: config merge and device defaults
(``engine_config``), KV pool sizing (``pool_sizing``), tokenizer and EOS ids (``tokenizer``),
stop checks (``stopping``), the PD entry points (``disaggregation.PdRequests``), stats
(``stats.StatsCollector``).

One owner: an EngineCore is not thread-safe. One thread calls everything on it (in a
worker, the EngineLoop's thread, which turns every other thread's wish into a command;
offline, the caller of ``LLM.generate``, or ``LLM``'s own driver thread for
``generate_stream``). Only ``validate_request``, which reads nothing but the fixed
configuration, may be called from elsewhere. KV-event subscribers run inside ``step()``:
they must be quick and must not call back into the engine (hand work to a queue instead).
"""
from __future__ import annotations

import itertools
import logging
import os
import random
import time
import uuid
from collections.abc import Callable

import torch
from tandem.config.schemas import EngineConfig
from tandem.sampling import SamplingParams, check_continuation, check_prompt

from .disaggregation import ExternalAllocation, HeldForMove, PdRequests
from .embedding import Embedder, EmbeddingOutput
from .engine_config import attention_backend, default_chunked_prefill_size, merge_config, resolve_device
from .grammar import GrammarBackend
from .hicache_setup import build_prefix_cache
from .kv_pool import KVPool, OutOfPages
from .kv_quant import kv_cache_spec
from .loader import load_model, resolve_dtype
from .lora import UnknownLoraError, lora_manager, lora_weights
from .model_runner import ModelRunner
from .moe_hooks import expert_hooks, tp_of
from .outputs import StepOutput
from .pool_sizing import kv_pool_pages
from .pooling import resolve_pooling
from .request import Mode, Request, Status
from .sample_launcher import SampleLauncher, prompt_logprobs
from .scheduler import ScheduledBatch, Scheduler
from .stats import EngineStats, StatsCollector
from .stopping import StopChecker
from .tokenizer import eos_token_ids, load_tokenizer

log = logging.getLogger(__name__)
# Longest an idle step blocks on a storage prefetch that a waiting request needs: short, so a
# command (a new request, an abort) arriving meanwhile is taken within this time.
PREFETCH_WAIT_S = 0.01


class EngineCore:
    """The engine: requests, scheduling, one forward pass per ``step()``."""

    def __init__(self, model_path: str | None = None, config: EngineConfig | None = None, parallel=None,
                 **overrides):
        """``parallel``: this process's ``ParallelGroup`` (rank 0) when ``tp_size`` or ``ep_size`` > 1
        (``tandem.engine.parallel.start_parallel`` builds both): the engine is built for its ranks,
        every forward pass mirrored on the followers (``ParallelFollower``, which must be starting)."""
        cfg = merge_config(model_path, config, overrides)
        if cfg.is_embedding and not cfg.disable_radix_cache:
            cfg = cfg.model_copy(update={"disable_radix_cache": True})  # embeddings keep no KV to reuse
        self.config = cfg
        if not cfg.model_path:
            raise ValueError("model_path is required")
        if not os.path.isdir(cfg.model_path):
            raise ValueError(f"model_path={cfg.model_path!r}: not a directory")
        self.device = device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, device)
        deterministic = cfg.enable_deterministic_inference
        self.attention_backend = attention_backend(cfg.attention_backend, device, deterministic)
        hooks = expert_hooks(cfg, device, parallel)
        lora = lora_weights(cfg, self.dtype, device)  # --enable-lora: the adapters' slot buffers
        self.model, self.model_config = load_model(cfg.model_path, self.dtype, device, hooks, cfg.load_format,
                                                   cfg.quantization, cfg.fp8_gemm_backend, deterministic,
                                                   tp=tp_of(cfg, parallel), lora=lora)
        if lora is not None:
            lora.stack()  # A's rows into the loaded base weights, where they can take them
        self.lora = lora_manager(cfg, lora, self.model_config.num_layers)
        # EPLB: plans applied in place between steps, the recorder folded after each (None: dense or no EPLB).
        self.eplb = hooks.runtime(self.model)
        mc = self.model_config
        self.context_length = cfg.context_length or mc.max_position_embeddings
        self.model.set_backend(self.attention_backend, self.context_length + 1, deterministic)
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
        self.stats_collector = StatsCollector(num_total_pages=num_pages)
        self.stop_checker = StopChecker(self.eos_token_ids, self.context_length, self.tokenizer)
        self.scheduler = Scheduler(self.pool, self.cache, self.chunked_prefill_size, cfg.max_prefill_tokens,
                                   cfg.max_running_requests, self.stop_checker, self.stats_collector,
                                   mixed_chunk=cfg.enable_mixed_chunk, cache_every_chunk=self.hicache is not None,
                                   lora=self.lora)
        self.pd = PdRequests(self.scheduler, self.pool, mc.vocab_size)
        self.cuda_graph_max_bs = self._cuda_graph_max_bs()
        # Built for several ranks: the followers are told what to build (the same model shard and a
        # pool like this one) before the runner exists, whose every forward pass then runs on them
        # too (``mirror``, tandem.engine.forward_mirror; its CUDA graphs are captured while the
        # followers capture theirs). None with one rank.
        self.mirror = None
        if parallel is not None and parallel.size > 1:
            self.mirror = parallel.lead(config=cfg, model=self.model, model_config=mc, pool=self.pool, eplb=self.eplb,
                                        attention_backend=self.attention_backend,
                                        max_positions=self.context_length + 1,
                                        cuda_graph_max_bs=self.cuda_graph_max_bs)
        # Penalty rows: one per running request with penalties or logit bias (decode may run
        # more than max_running_requests when prefilled requests arrive from outside).
        self.runner = ModelRunner(self.model, self.pool, device, self.cuda_graph_max_bs,
                                  penalty_rows=2 * cfg.max_running_requests, mirror=self.mirror)
        self.sample_launcher = SampleLauncher(mc.vocab_size, self.eos_token_ids)
        self.grammars = GrammarBackend(cfg.model_path, mc.vocab_size, sorted(self.eos_token_ids))
        self._seed_rng = random.Random(cfg.random_seed)  # seeds of requests that bring none
        self._pending: list[StepOutput] = []  # outputs of calls between steps (abort)
        self._activated: list[StepOutput] = []  # first tokens of requests activated between steps
        # Overlap scheduling: step N+1 is scheduled and launched before step N's sampled tokens
        # are read back (the next forward pass reads them on the device). With TP ranks the mirror
        # sends those tokens to the followers on the device (``share_future``); expert parallelism
        # (host dispatch per batch) always waits.
        self.overlap_schedule = not cfg.disable_overlap_schedule and (self.mirror is None or cfg.ep_size <= 1)
        self._rid_counter = itertools.count()
        # --is-embedding: embedding passes instead of generation (``embed``); None otherwise.
        self.embedder = None
        if cfg.is_embedding:
            normalize = None if cfg.embedding_normalize == "auto" else cfg.embedding_normalize == "on"
            pooling = resolve_pooling(cfg.model_path, cfg.pooling, normalize)
            log.info("embeddings: %s pooling, %snormalised (%s)", pooling.method, "" if pooling.normalize else "not ",
                     pooling.source)
            self.embedder = Embedder(self.runner, self.pool, pooling, self.chunked_prefill_size, self.context_length,
                                     mc.vocab_size, mc.hidden_size)

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
        if not self.device.startswith("cuda") or cfg.disable_cuda_graph or cfg.is_embedding:
            return 0  # (an embedding worker never decodes)
        why = None
        if self.attention_backend != "triton":
            why = "the torch_native backend's decode shapes depend on the context length"
        elif cfg.ep_size > 1:
            why = "expert parallelism dispatches on the host per batch (TP alone captures its all-reduces)"
        elif cfg.world_size > 1 and self.model.expert_recorder is not None:
            why = "the expert recorder's graph variants exist on the leader only (the ranks' captures would differ)"
        if why:
            log.warning("CUDA graphs off: %s", why)
            return 0
        return min(cfg.cuda_graph_max_bs or cfg.max_running_requests, cfg.max_running_requests)

    def has_work(self) -> bool:
        sch = self.scheduler
        return bool(sch.waiting or sch.running or self._pending or self._activated or self.sample_launcher.in_flight)

    @property
    def requests(self) -> dict[str, Request]:
        """Every live request by id (read only: change requests through the engine's methods)."""
        return self.scheduler.requests

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

    def validate_request(self, prompt_ids: list, sampling: SamplingParams, output_ids: list = (),
                         lora_name: str | None = None) -> None:
        """Raise ValueError naming the problem if this request could never run here (a grammar
        that does not compile included: it is compiled here, once, and cached); UnknownLoraError
        when ``lora_name`` is not loaded (a LookupError: services answer NOT_FOUND)."""
        self._validate(list(prompt_ids), sampling, list(output_ids))
        self._check_lora(lora_name)
        self._compile(sampling)

    def cached_prefix_tokens(self, prompt_ids: list, lora_name: str | None = None) -> int:
        """Leading tokens of the prompt that the prefix cache holds now for LoRA adapter
        ``lora_name`` (None: the base model): what such a request would share instead of computing."""
        return self.scheduler.cached_prefix_tokens(list(prompt_ids), lora_name)

    # ---- LoRA adapters (--enable-lora) ---------------------------------------------------------
    def _check_lora(self, lora_name: str | None) -> None:
        if lora_name is None:
            return
        if self.lora is None or not self.lora.has(lora_name):
            raise UnknownLoraError(lora_name)

    def load_lora(self, name: str, path: str) -> None:
        """Register adapter ``name`` from the PEFT folder ``path`` (read and checked now)."""
        if self.lora is None:
            raise ValueError("load_lora: this engine serves no LoRA adapters (start it with --enable-lora)")
        self.lora.load(name, path)

    def unload_lora(self, name: str) -> None:
        """Forget adapter ``name`` (refused while a request uses it); its cached KV goes with the
        prefix cache's normal eviction (no later request can match it)."""
        if self.lora is None:
            raise UnknownLoraError(name)
        self.lora.unload(name)

    def list_loras(self) -> dict[str, str]:
        """{adapter name: path} of every loaded adapter."""
        return {} if self.lora is None else {n: self.lora.paths[n] for n in self.lora.names()}

    def _compile(self, sp: SamplingParams | None) -> None:
        """Compile the request's grammar (cached by the backend; validate_request runs it on the
        caller's thread, so the engine loop seldom compiles)."""
        if sp is not None and sp.structured is not None:
            sp.structured.validate()
            self.grammars.compile(sp.structured)

    def kv_snapshot(self) -> list:
        """Every block the prefix cache holds, as BlockStored events (for a new KV-event subscriber)."""
        return self.cache.snapshot()

    def validate_embedding(self, inputs: list[list[int]], dimensions: int | None = None) -> None:
        """ValueError naming the field (``input[i]``, ``dimensions``) if this batch could never be
        embedded here; reads only the fixed configuration (any thread, like ``validate_request``)."""
        if self.embedder is None:
            raise ValueError("this engine generates; embeddings need --is-embedding")
        self.embedder.validate(inputs, dimensions)

    def embed(self, inputs: list[list[int]], dimensions: int | None = None) -> EmbeddingOutput:
        """--is-embedding: one pooled vector per input (``Embedder``), returned; between steps only.
        ValueError naming the field for a batch that cannot run."""
        if self.embedder is None:
            raise ValueError("this engine generates; embeddings need --is-embedding")
        t0 = time.perf_counter()
        out = self.embedder.embed(inputs, dimensions)
        sc = self.stats_collector  # each input counts as a request of its prompt tokens (SGLang's counters)
        for n in out.num_tokens:
            sc.request_added(n)
            sc.request_finished(0)
        sc.step_done("prefill", len(inputs), out.prompt_tokens, time.perf_counter() - t0)
        return out

    def _validate(self, ids: list, sp: SamplingParams, output_ids: list = ()) -> None:
        """The request's one validation (``tandem.sampling``) plus what only the engine knows;
        ``output_ids``: a continued request's tokens generated elsewhere (``check_continuation``)."""
        if self.embedder is not None:
            raise ValueError("this engine serves embeddings (--is-embedding): no generation")
        check_prompt(len(ids), self.context_length)
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in output_ids):
            raise ValueError(f"output_ids: token ids must be integers in [0, {vocab})")
        sp.validate(vocab)
        check_continuation(len(ids), len(output_ids), sp, self.context_length)
        n = len(ids) + len(output_ids)
        if self.scheduler.pages_for(n + 1) > self.pool.num_pages:
            raise ValueError(
                f"prompt has {n} tokens but the KV pool holds only "
                f"{self.pool.num_pages * self.page_size} tokens (raise --max-total-tokens)"
            )

    def _new_request(self, prompt, sp: SamplingParams | None, rid: str | None, mode: Mode,
                     output_ids: list = (), lora_name: str | None = None) -> Request:
        sp = sp or SamplingParams()
        self._compile(sp)
        ids = self.tokenize(prompt)
        output_ids = list(output_ids)
        if output_ids and mode == Mode.PREFILL_ONLY:
            raise ValueError("output_ids: a continued request is prefilled where it is decoded (not prefill_only)")
        self._validate(ids, sp, output_ids)
        self._check_lora(lora_name)
        rid = rid if rid is not None else f"req-{next(self._rid_counter)}-{uuid.uuid4().hex[:8]}"
        if rid in self.scheduler.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seed = sp.seed if sp.seed is not None else self._seed_rng.getrandbits(63)
        req = Request(rid=rid, prompt_ids=ids, sampling=sp, mode=mode, seed=seed, lora_name=lora_name)
        if sp.structured is not None:
            req.grammar = self.grammars.new_state(sp.structured)
            for i, tok in enumerate(output_ids):
                if not req.grammar.accept(tok):
                    raise ValueError(f"output_ids[{i}]={tok} is not allowed by the request's grammar")
        req.output_ids = output_ids
        self.stop_checker.start(req)
        return req

    def add_request(self, prompt, sampling: SamplingParams | None = None, rid: str | None = None,
                    mode: Mode | str = Mode.NORMAL, output_ids: list = (), lora_name: str | None = None) -> str:
        """Queue a request (a string or token ids), under LoRA adapter ``lora_name`` (None: the base
        model); return its id.

        ``output_ids``: the tokens a migrated request already generated on another worker; it
        continues after them exactly as it would have there (max_tokens, min_tokens, penalties,
        the seeded draw's position, stop strings and the grammar all see them); its outputs
        carry only new tokens. It is prefilled here (prompt and output_ids).

        mode "normal": prefill + decode here. mode "prefill_only": prefill (chunked), sample the
        first token, then keep the pages: its outputs list the pages each chunk made final
        (``StepOutput.pages_final``) and end with the first token (finish_reason
        "prefill_done"). Call release(rid) afterwards.
        """
        mode = Mode(mode)
        if mode == Mode.EXTERNAL:
            raise ValueError("use allocate_external() for requests whose KV comes from outside")
        if mode == Mode.PREFILL_ONLY and sampling is not None and sampling.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: the prompt must be prefilled where it is decoded (local prefill)")
        req = self._new_request(prompt, sampling, rid, mode, output_ids, lora_name)
        self.scheduler.add(req)
        return req.rid

    def abort(self, rid: str, reason: str = "abort") -> bool:
        """Stop a request in any state and free its pages; False if unknown or already finished.
        Its last output (finish_reason "abort") comes with the next step."""
        req = self.scheduler.requests.get(rid)
        if req is None:
            return False
        if req.status == Status.HELD:
            self.pd.release(rid, cache=False)
            return True
        self.scheduler.finish(req, "abort")
        self.sample_launcher.free(self.runner, rid)
        self._pending.append(self.scheduler.output(req, [], [], []))
        return True

    def flush_cache(self) -> bool:
        """Evict every unreferenced cached page; True when the cache is now empty."""
        return self.cache.reset()

    # ---- disaggregation (tandem.engine.disaggregation) -----------------------------------------
    def release(self, rid: str, cache: bool = True) -> None:
        """Free a finished prefill-only request's pages (into the prefix cache when cache)."""
        self.pd.release(rid, cache)

    def allocate_external(self, prompt, sampling: SamplingParams | None = None,
                          rid: str | None = None, reuse_prefix: bool = False,
                          output_ids: list = (), lora_name: str | None = None) -> ExternalAllocation:
        """Reserve pages for a prompt whose KV will be written from outside (decode side of PD).
        ``reuse_prefix``: share the prompt's leading pages that the prefix cache holds; only the
        rest is written (``ExternalAllocation.num_cached_tokens``). ``output_ids``: a request moved
        off another worker, with its tokens so far (``add_request``): the KV of the prompt and
        of all of them but the last is written.

        Raises OutOfPages when the pool cannot hold it now (retry later or reject).
        """
        if sampling is not None and sampling.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: the prompt must be prefilled where it is decoded (local prefill)")
        return self.pd.allocate(self._new_request(prompt, sampling, rid, Mode.EXTERNAL, output_ids, lora_name),
                                reuse_prefix)

    def activate_external(self, rid: str, first_token_id: int, first_token_logprob: float | None = None,
                          cached_tokens: int = 0, first_token_top: list | None = None) -> None:
        """The KV of rid's prompt is in its pages: join the running batch with its first token
        (which KV transfer delivered in the request's aux slot); its output comes with
        ``take_activated()`` (the engine loop calls it before the next step), else with the next step.
        A moved request continues from its last token (which ``first_token_id`` must be): no output."""
        out = self.pd.activate(rid, first_token_id, first_token_logprob, cached_tokens, first_token_top)
        if out is not None:
            self._activated.append(out)

    def take_activated(self) -> list[StepOutput]:
        """The first-token outputs of the requests activated since the last step: they need no
        forward pass, so they can leave before the next step instead of after it (TTFT)."""
        out, self._activated = self._activated, []
        return out

    def hold_for_move(self, rid: str) -> HeldForMove | None:
        """Drain by moving KV: stop decoding ``rid`` and keep its pages for another worker to
        fetch (``export_held``, then ``release``; an abort frees them). Its stream's last output
        (next step) has finish_reason "moved". None when it finished meanwhile (its last token was
        being sampled); ValueError when it is not decoding (prefilling, waiting, never sampled)."""
        if self.sample_launcher.in_flight:  # its token being sampled: read it back first (it may finish)
            self._pending += self._drop_finished(
                self.scheduler.update_from_output(ScheduledBatch("idle"), self.sample_launcher.resolve(self.runner)))
        req = self.scheduler.requests.get(rid)
        if req is None or req.finished:
            return None
        held = self.pd.hold(req)
        self.sample_launcher.free(self.runner, rid)
        out = self.scheduler.output(req, [], [], [])
        out.finished, out.finish_reason = True, "moved"
        self._pending.append(out)
        return held

    def export_held(self, rid: str) -> StepOutput:
        """A request held for a move, as its sender reports it: its KV's pages, final, and its last
        token (``PdRequests.export``)."""
        return self.pd.export(rid)

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one scheduling step (at most one forward pass); return per-request outputs."""
        with torch.inference_mode():
            t0 = time.monotonic()
            batch = self.scheduler.schedule()
            logits, prompt_lps = self._forward(batch)
            outputs, self._pending = self.take_activated() + self._pending, []
            # The previous step's tokens: the device produced them before this forward pass, so
            # this waits for their copy only (a request may finish here, e.g. on a stop token).
            outputs += self._drop_finished(
                self.scheduler.update_from_output(batch, self.sample_launcher.resolve(self.runner), prompt_lps))
            rows = batch.rows_to_sample()
            if rows:
                outputs += self._drop_finished(self._sample([batch.items[i][0] for i in rows],
                                                            logits[rows] if len(rows) < len(batch.items) else logits))
            self.stats_collector.step_done(batch.kind if batch.items else "idle", len(batch.items),
                                           batch.num_tokens, time.monotonic() - t0)
            return outputs

    def _forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, dict | None]:
        """The batch's logits [B, vocab] at each request's last new token (None when nothing
        runs), and {row: prompt logprobs} of the rows that asked for them. HiCache: load-backs
        issued by schedule() travel with the forward pass as per-layer waits (CUDA)."""
        hicache = self.hicache
        if not batch.items:
            if hicache is not None:
                hicache.join()
                if not self.sample_launcher.in_flight and self.scheduler.waiting:
                    hicache.wait_prefetch(PREFETCH_WAIT_S)  # nothing to run: do not spin
            return None, None
        layer_ready = hicache.take_layer_ready() if hicache is not None else None
        want = [req.wants_prompt_logprobs for req, _ in batch.items]
        prompt_lps = None
        if any(want):
            logits, rows = self.runner.forward(batch.items, want, layer_ready=layer_ready)
            prompt_lps = {i: prompt_logprobs(batch.items[i][0], r) for i, r in rows.items()}
        else:
            logits = self.runner.forward(batch.items, layer_ready=layer_ready)
        if hicache is not None:
            hicache.join()
        return logits, prompt_lps

    def _drop_finished(self, outputs: list[StepOutput]) -> list[StepOutput]:
        """Free the sampler state (penalty rows) of the requests these outputs finish."""
        for out in outputs:
            if out.finished:
                self.sample_launcher.free(self.runner, out.rid)
        return outputs

    def _sample(self, reqs: list, logits: torch.Tensor) -> list[StepOutput]:
        """Launch sampling of ``reqs``; read the tokens back now unless the next step may run
        first (overlap). The outputs of requests that could not be sampled or were resolved."""
        launcher, runner = self.sample_launcher, self.runner
        outputs = [self.scheduler.finish_with_error(
            req, f"all {runner.penalties.num_rows} penalty rows are in use (requests with penalties or "
                 "logit_bias running at once); retry later") for req in launcher.launch(runner, reqs, logits)]
        # A grammar's next mask needs this token; a prefill-only request hands its first token over now.
        if launcher.in_flight and (not self.overlap_schedule or any(
                r.status != Status.FINISHED and (r.grammar is not None or r.mode == Mode.PREFILL_ONLY)
                for r in reqs)):
            outputs += self.scheduler.update_from_output(ScheduledBatch("idle"), launcher.resolve(runner))
        return outputs

    # ---- stats ---------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters and gauges."""
        return self.stats_collector.snapshot(self.scheduler, self.pool, self.cache, self.hicache)


__all__ = ["EngineCore", "EngineStats", "StepOutput", "ExternalAllocation", "HeldForMove", "OutOfPages"]
