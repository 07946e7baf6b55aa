"""RouterCore: prepares a request (``prepare``: tokenize, the one check), picks a worker,
calls its Decode.Generate, retries once on another worker when it fails before any output,
and turns tokens into text (incremental detokenization; the worker says where a stop string
ended it). Shared by the HTTP and the gRPC front ends; runs on the router's loop.

Both front ends convert their request into a :class:`PromptInput` and a
``routing.request_check.SamplingRequest`` and call ``prepare``: one tokenization, one check
(``tandem.sampling``'s validation, the server's limits, the grammar), one Prepared.

n > 1: sample 0 goes first; once its first token arrived (its prompt is then in the
worker's prefix cache) samples 1..n-1 start on the same worker, each with seed + i, and
share the prompt's KV pages: they ask for a local prefill (``prefill_override`` "local"),
so a disaggregated decode worker computes only the uncached tail (less than a page)
instead of fetching the prompt's KV again from a prefill worker. Their deltas are merged, each tagged with its index.

Each sample's text goes through the request's output parsers: the reasoning parser
(``<think>`` -> reasoning) and then the tool-call parser (calls out of the content).

Cancellation: the worker call lives inside an async generator; when the consumer stops
early (client disconnected, gRPC cancel) the generator is closed or
cancelled and its `finally` cancels the worker's Generate call, so the worker aborts the
request and frees its pages.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from tandem.config import RouterConfig
from tandem.router.admission import Admission, Overloaded
from tandem.router.metrics import RouterMetrics
from tandem.router.workers import Worker, WorkerPool
from tandem.routing.detokenizer import TextStream
from tandem.routing.discovery import EtcdWatcher
from tandem.routing.kv_index import KvIndex
from tandem.routing.limits import RequestLimits
from tandem.routing.policies import Decision, KvAwarePolicy, make_policy
from tandem.routing.reasoning import ReasoningParser
from tandem.routing.request_check import SamplingRequest, check_request
from tandem.routing.sampling import sampling_to_proto
from tandem.routing.tokenizer import RouterTokenizer
from tandem.routing.tool_parsers import ForcedToolParser, ToolCall, make_parser
from tandem.sampling import SamplingError, SamplingParams, check_continuation
from tandem.server.auth import BearerCheck, read_secret
from tandem.server.tls import etcd_client_tls, tls_files
from tandem.v1 import common_pb2, decode_pb2

log = logging.getLogger(__name__)

# Worker failures that say nothing about the request itself: another worker may succeed.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}

# n > 1: deltas of all samples that may wait for the consumer (the client) before the samples'
# worker streams are no longer read.
MERGED_DELTAS_WAITING = 32


class RouterError(Exception):
    """A request failed; `code` is the gRPC status the gRPC API returns (HTTP maps it)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NoHealthyWorker(RouterError):
    def __init__(self, message: str = "no healthy worker available") -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


class UnknownModel(RouterError):
    """The ``model`` field names another model, or an adapter no worker holds (404 / NOT_FOUND)."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(grpc.StatusCode.NOT_FOUND, message)
        self.model = model


@dataclass
class PromptInput:
    """What a request asks the model to continue: raw text, token ids, or chat messages (with
    the tools the chat template renders). Exactly one of text, token_ids, messages."""
    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict] | None = None
    tools: list = field(default_factory=list)


@dataclass
class Prepared:
    """A tokenized, validated request."""
    request_id: str
    input_ids: list[int]
    sampling: SamplingParams
    endpoint: str = "grpc"
    started: float = field(default_factory=time.perf_counter)
    decision: Decision | None = None  # set when a worker is chosen
    n: int = 1  # samples; sample i uses seed + i
    echo_text: str = ""  # put before each sample's text (completions' echo)
    reasoning_parser: str | None = None  # split <think> text into Delta.reasoning
    tool_parser: str | None = None  # a parser name, "required" or "named:<fn>" (forced calls)
    prefill_local: bool = False  # samples 1..n-1: the worker holds the prompt's pages already
    client_key: str = ""  # who sent it (bearer token or address): the per-key concurrency limit
    lora_name: str | None = None  # the LoRA adapter (the model field's "base:adapter"); None: the base model

    def sample(self, i: int) -> Prepared:
        """The request of sample i (its own request id, seed and routing decision)."""
        sp = dataclasses.replace(self.sampling)
        if i:
            sp.seed = (sp.seed + i) % 2 ** 64
        return dataclasses.replace(self, request_id=f"{self.request_id}-{i}" if self.n > 1 else self.request_id,
                                   sampling=sp, decision=None, prefill_local=i > 0)


@dataclass
class Delta:
    """Output of one sample since its previous delta; its last one carries finish_reason and usage.

    ``text`` is content: without the reasoning (``reasoning``) and the tool calls
    (``tool_calls``, complete calls recognised in this delta) when parsers run."""
    text: str
    token_ids: list[int]
    logprobs: list
    finish_reason: int = 0
    matched_stop: str = ""
    usage: common_pb2.Usage | None = None
    index: int = 0
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)  # first delta only: PositionLogprobs of prompt 1..L-1


class OutputParsers:
    """The reasoning parser, then the tool-call parser, over one sample's text stream."""

    def __init__(self, reasoning: str | None, tools: str | None) -> None:
        self.reasoning = ReasoningParser(reasoning) if reasoning else None
        if tools is None:
            self.tools = None
        elif tools == "required" or tools.startswith("named:"):
            self.tools = ForcedToolParser(None if tools == "required" else tools[len("named:"):])
        else:
            self.tools = make_parser(tools)

    def push(self, text: str, final: bool) -> tuple[str, str, list[ToolCall]]:
        """(reasoning, content, calls) of new text; final releases everything held back."""
        reasoning, content, calls = "", text, []
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(text)
            if final:
                r2, c2 = self.reasoning.finish()
                reasoning, content = reasoning + r2, content + c2
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if final:
                c2, t2 = self.tools.finish()
                content, calls = content + c2, calls + t2
        return reasoning, content, calls


def failed_chunk(chunk: common_pb2.TokenChunk, worker_id: str) -> tuple[RouterError, bool] | None:
    """The error a worker's chunk ends the request with, and whether another worker may
    succeed; None for a chunk that is output. An abort the router did not ask for (it
    cancels the call instead) is a failure: a request never ends as an empty success."""
    if chunk.finish_reason == common_pb2.FINISH_REASON_ERROR:
        e = chunk.error
        return RouterError(grpc.StatusCode.UNAVAILABLE if e.retryable else grpc.StatusCode.INTERNAL,
                           f"worker {worker_id}: {e.code}: {e.message}"), e.retryable
    if chunk.finish_reason == common_pb2.FINISH_REASON_ABORT:
        return RouterError(grpc.StatusCode.ABORTED, f"worker {worker_id} aborted the request"), True
    return None


def static_worker_infos(addresses: list[str]) -> dict[str, common_pb2.WorkerInfo]:
    return {a: common_pb2.WorkerInfo(worker_id=a, address=a, role="agg") for a in addresses}


class RouterCore:
    def __init__(self, config: RouterConfig, tokenizer: RouterTokenizer, metrics: RouterMetrics,
                 model_name: str) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model_name = model_name
        self.api_key = BearerCheck(read_secret(config, "api_key"), "API request")
        self.limits = RequestLimits.from_config(config)
        self.tls = tls_files(config)
        self.admission = Admission(config.max_concurrent_requests, config.max_concurrent_requests_per_key)
        self.index = KvIndex() if config.routing_policy == "kv_aware" else None
        self.policy = make_policy(config.routing_policy, self.index, config.kv_overlap_weight,
                                  host_hit_weight=config.kv_host_hit_weight)
        # Embeddings need no prefix affinity: the least loaded embedding worker of the model.
        self.embed_policy = make_policy("least_loaded")
        self.pool: WorkerPool | None = None
        self._watch_task: asyncio.Task | None = None
        self.watcher: EtcdWatcher | None = None
        metrics.frontend.set_model_info(context_length=tokenizer.context_length)

    async def start(self) -> None:
        def on_health(w: Worker, ok: bool) -> None:
            self.metrics.worker_healthy.labels(self.model_name, w.worker_id).set(1 if ok else 0)

        self.pool = WorkerPool(self.config.health_check_interval, self.index, on_health, tls=self.tls,
                               max_missed_checks=self.config.health_check_failures,
                               ask_info=self.config.discovery == "static")
        if self.config.discovery == "static":
            await self.pool.set_workers(static_worker_infos(self.config.workers))
        else:
            self.watcher = EtcdWatcher(self.config.etcd_endpoint, self.config.etcd_prefix, self._on_discovery,
                                       tls=etcd_client_tls(self.config))
            self._watch_task = asyncio.create_task(self.watcher.run(), name="etcd-watch")

    async def _on_discovery(self, infos: dict[str, common_pb2.WorkerInfo]) -> None:
        # Only workers that serve tokens: aggregated or decode (prefill workers are decode's business).
        wanted = {k: v for k, v in infos.items() if v.role in ("", "agg", "decode")}
        await self.pool.set_workers(wanted)

    async def stop(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
            try:
                await self._watch_task
            except (asyncio.CancelledError, Exception):
                pass
        if self.pool:
            await self.pool.close()

    # ---- requests ------------------------------------------------------------------
    # ---- models: the base and its LoRA adapters ----------------------------------------
    def lora_names(self) -> list[str]:
        """LoRA adapters some healthy worker holds (its GetLoad answer), sorted."""
        return sorted({n for w in self.pool.healthy() if w.load is not None and not w.is_embedding
                       for n in w.load.lora_names})

    def model_ids(self) -> list[str]:
        """What the OpenAI ``model`` field may name: the base model, then ``base:adapter`` for each adapter."""
        return [self.model_name] + [f"{self.model_name}:{n}" for n in self.lora_names()]

    def resolve_model(self, model: str) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model; "" means the base
        model too). Raises UnknownModel naming it for another base or an adapter no healthy worker holds."""
        if not model or model == self.model_name:
            return None
        if model in self.embedding_models():
            raise UnknownModel(model, f"model {model!r} serves embeddings only (its workers run --is-embedding): "
                                      "use /v1/embeddings")
        base, sep, adapter = model.partition(":")
        if not sep or base != self.model_name or not adapter:
            raise UnknownModel(model, f"unknown model {model!r}; serving {self.model_name!r}")
        if adapter not in self.lora_names():
            raise UnknownModel(model, f"LoRA adapter {adapter!r} is not loaded on any worker of {self.model_name!r}")
        return adapter

    def prepare(self, prompt: PromptInput, sampling: SamplingRequest, request_id: str, endpoint: str,
                client_key: str, tool_parser: str | None = None, lora_name: str | None = None) -> Prepared:
        """The one preparation of a request, for both APIs: tokenize (a chat through the
        template), check it (``request_check``), and the Prepared to run. Raises SamplingError
        naming the API's parameter (the chat template's own errors: OpenAIError)."""
        tok, cfg = self.tokenizer, self.config
        t0 = time.perf_counter()
        if prompt.messages is not None:
            ids = tok.encode_chat(prompt.messages, prompt.tools or None, cfg.tool_call_parser or "qwen25")
            self.metrics.frontend.observe_tokenizer_ms("chat_template", (time.perf_counter() - t0) * 1e3)
        elif prompt.text is not None:
            ids = tok.encode(prompt.text)
            self.metrics.frontend.observe_tokenizer_ms("tokenize", (time.perf_counter() - t0) * 1e3)
        else:
            ids = list(prompt.token_ids or [])
            if any(i < 0 for i in ids):
                raise SamplingError("prompt", "token ids in the prompt must be >= 0")
        sp = check_request(sampling, len(ids), tok.context_length, tok.vocab_size, self.limits)
        echo = ""
        if sampling.echo:
            echo = prompt.text if prompt.text is not None else tok.decode(ids, skip_special_tokens=False)
        return Prepared(request_id, ids, sp, endpoint, n=sampling.n, echo_text=echo,
                        reasoning_parser=cfg.reasoning_parser if prompt.messages is not None else None,
                        tool_parser=tool_parser, client_key=client_key, lora_name=lora_name)

    # ---- routing ------------------------------------------------------------------

    def route(self, input_ids: list[int], exclude: set[str] = frozenset(),
              lora: str | None = None) -> tuple[Worker, Decision]:
        """The generating worker for a prompt (embedding workers never generate); one holding LoRA
        adapter ``lora`` when given."""
        candidates = [w for w in self.pool.healthy() if w.worker_id not in exclude and not w.is_embedding]
        if candidates and lora is not None:
            candidates = [w for w in candidates if w.load is not None and lora in w.load.lora_names]
            if not candidates:
                raise NoHealthyWorker(f"no healthy worker holds LoRA adapter {lora!r}")
        if not candidates:
            embedding = sum(w.is_embedding for w in self.pool.workers.values())
            if embedding and embedding == len(self.pool.workers):  # nothing here generates: no passing outage
                raise RouterError(grpc.StatusCode.NOT_FOUND,
                                  f"model {self.model_name!r} is served for embeddings only (its workers run "
                                  "--is-embedding): use /v1/embeddings")
            raise NoHealthyWorker(
                f"no healthy worker available ({len(self.pool.workers)} known, "
                f"{len(self.pool.healthy())} healthy" + (f", {embedding} serving embeddings only)" if embedding else ")"))
        t0 = time.perf_counter()
        decision = self.policy.choose([w.view() for w in candidates], input_ids, lora)
        r = self.metrics.routing
        kv = isinstance(self.policy, KvAwarePolicy)
        r.observe_overhead_ms(scheduling=(time.perf_counter() - t0) * 1e3,
                              block_hashing=decision.hash_ms if kv else None,
                              indexer_find_matches=decision.match_ms if kv else None)
        r.record_decision(worker_id=decision.worker_id, policy=self.policy.name,
                          overlap_blocks=decision.overlap_blocks if kv else None)
        if kv:
            self.metrics.indexed_blocks.labels(self.model_name).set(self.index.num_blocks())
            if self.index.block_size:
                self.metrics.frontend.set_model_info(kv_cache_block_size=self.index.block_size)
        return self.pool.workers[decision.worker_id], decision

    # ---- embeddings -----------------------------------------------------------------
    def embedding_models(self) -> list[str]:
        """Models that embedding workers serve (every known embedding worker, healthy or not)."""
        return sorted({w.info.model or self.model_name for w in self.pool.workers.values() if w.is_embedding})

    def embedding_model(self, name: str) -> str:
        """The embedding model a request names (empty: the only one); RouterError NOT_FOUND otherwise."""
        models = self.embedding_models()
        if not name and len(models) == 1:
            return models[0]
        if name in models:
            return name
        served = ", ".join(models) or "none (no worker runs with --is-embedding)"
        raise RouterError(grpc.StatusCode.NOT_FOUND, f"model {name!r} serves no embeddings; embedding models: {served}")

    async def embed(self, model: str, inputs: list, dimensions: int | None, request_id: str, endpoint: str,
                    client_key: str, timeout: float | None = None) -> common_pb2.EmbedResponse:
        """Embed ``inputs`` (checked EmbedInputs) on one embedding worker of ``model``: all of them in
        one call, which the worker batches; retried on another worker (at most ``request_retries``)
        when one fails before answering. RouterError on failure (INVALID_ARGUMENT: the worker's
        message, naming the input)."""
        try:
            release = self.admission.admit(client_key)
        except Overloaded as e:
            raise RouterError(e.code, e.message) from None
        deadline = None if timeout is None else time.monotonic() + timeout
        excluded: set[str] = set()
        request = common_pb2.EmbedRequest(request_id=request_id, inputs=inputs, dimensions=dimensions or 0)
        attempt = 0
        try:
            with self.metrics.frontend.track_request(endpoint, "unary") as fr:
                error: RouterError | None = None
                while True:
                    try:
                        worker = self._embedding_worker(model, excluded)
                    except NoHealthyWorker:
                        if error is not None:  # the retry found no other worker: the real failure
                            raise error from None
                        raise
                    worker.active_requests += 1
                    try:
                        left = None if deadline is None else max(0.001, deadline - time.monotonic())
                        response = await worker.decode.Embed(request, timeout=left)
                        break
                    except grpc.aio.AioRpcError as e:
                        code = e.code()
                        self.metrics.worker_errors.labels(self.model_name, worker.worker_id, code.name).inc()
                        if code == grpc.StatusCode.INVALID_ARGUMENT:
                            raise RouterError(code, e.details()) from None
                        if code == grpc.StatusCode.UNAVAILABLE:
                            await self.pool.check(worker)
                        error = RouterError(code, f"worker {worker.worker_id}: {e.details() or code.name}")
                        if code not in RETRYABLE or attempt >= self.config.request_retries:
                            raise error from None
                    finally:
                        worker.active_requests -= 1
                    attempt += 1
                    excluded.add(worker.worker_id)
                    self.metrics.routing.record_retry(error.code.name.lower())
                    log.warning("embed %s: %s; retrying on another worker", request_id, error.message)
                fr.set_input_tokens(response.prompt_tokens)
            self.metrics.embedding_inputs.labels(model).inc(len(inputs))
            return response
        finally:
            release()

    def _embedding_worker(self, model: str, exclude: set[str]) -> Worker:
        candidates = [w for w in self.pool.healthy() if w.is_embedding and w.worker_id not in exclude
                      and (w.info.model or self.model_name) == model]
        if not candidates:
            raise NoHealthyWorker(f"no healthy embedding worker of {model!r}")
        decision = self.embed_policy.choose([w.view() for w in candidates], [])
        self.metrics.routing.record_decision(worker_id=decision.worker_id, policy=self.embed_policy.name)
        return self.pool.workers[decision.worker_id]

    def _blocks(self, n_tokens: int) -> int:
        bs = (self.index.block_size if self.index else None) or 16
        return math.ceil(n_tokens / bs)

    async def worker_stream(self, prep: Prepared, deadline: float | None = None,
                            pin: str | None = None) -> AsyncIterator[common_pb2.TokenChunk]:
        """Raw worker chunks for a request. A worker that fails before any output: at most
        ``request_retries`` retries on other workers. One whose stream ends without a finish
        after output (``retryable``: connection lost, UNAVAILABLE, an error it calls retryable):
        at most ``migration_limit`` migrations to other workers, each sent the tokens streamed so
        far (``GenerateRequest.output_ids``), so the chunks go on with no gap and no repeat.
        A draining worker may hand the request over with its KV (``TokenChunk.move``): the next
        worker is sent where to fetch it (``GenerateRequest.kv_source``), as a migration.
        ``pin``: go to this worker first (the one holding the prompt's pages) while it is healthy."""
        excluded: set[str] = set()
        retries = migrations = 0
        produced: list[int] = []  # tokens streamed so far: a migrated request continues after them
        kv_source: common_pb2.KvMove | None = None  # where a draining worker holds the request's KV
        sampling = sampling_to_proto(prep.sampling)
        streamed = False  # any chunk went out (prompt logprobs come only once)
        last_error: RouterError | None = None
        while True:
            try:
                pinned = self.pool.workers.get(pin) if pin is not None and pin not in excluded else None
                if pinned is not None and pinned.healthy:
                    worker, decision = pinned, Decision(pinned.worker_id)
                else:
                    worker, decision = self.route(prep.input_ids + produced, excluded, prep.lora_name)
            except NoHealthyWorker:
                if last_error is not None:
                    raise last_error from None
                raise
            if not streamed:
                prep.decision = decision
                self.metrics.routing.observe_overhead_ms(total=(time.perf_counter() - prep.started) * 1e3)
            blocks = self._blocks(len(prep.input_ids) + prep.sampling.max_tokens)
            worker.active_requests += 1
            worker.active_blocks += blocks
            timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
            call = worker.decode.Generate(
                decode_pb2.GenerateRequest(request_id=prep.request_id, input_ids=prep.input_ids, sampling=sampling,
                                           prefill_override="local" if prep.prefill_local else "",
                                           output_ids=produced, lora_name=prep.lora_name or "",
                                           kv_source=kv_source),
                timeout=timeout)
            kv_source = None
            error: RouterError | None = None
            retryable = False
            try:
                async for chunk in call:
                    if chunk.HasField("move"):  # a drain hands it over with its KV: continue it elsewhere
                        kv_source = chunk.move
                        error = RouterError(grpc.StatusCode.UNAVAILABLE,
                                            f"worker {worker.worker_id} is draining; its KV waits at {kv_source.address}")
                        retryable = True
                        break
                    failure = failed_chunk(chunk, worker.worker_id)
                    if failure is not None:
                        error, retryable = failure
                        break
                    streamed = True
                    produced.extend(chunk.token_ids)
                    yield chunk
                    if chunk.finish_reason:
                        return
                else:
                    error = RouterError(grpc.StatusCode.UNAVAILABLE,
                                        f"worker {worker.worker_id} ended the stream without finishing the request")
                    retryable = True
            except grpc.aio.AioRpcError as e:
                code = e.code()
                self.metrics.worker_errors.labels(self.model_name, worker.worker_id, code.name).inc()
                if code == grpc.StatusCode.UNAVAILABLE:
                    # Ask the worker now: one that cannot be reached goes out of rotation at
                    # once; one that answers SERVING stays (the failure was this request's, e.g.
                    # its remote prefill), instead of failing every request until the next check.
                    await self.pool.check(worker)
                error = RouterError(code, f"worker {worker.worker_id}: {e.details() or code.name}")
                retryable = code in RETRYABLE
            finally:
                call.cancel()
                worker.active_requests -= 1
                worker.active_blocks -= blocks
            if kv_source is not None:
                await self.pool.check(worker)  # draining (NOT_SERVING): out of rotation at once
            if not retryable:
                raise error
            if streamed:
                if migrations >= self.config.migration_limit:
                    raise error
                sampling = self._continuation(prep, produced, error)
                migrations += 1
                self.metrics.frontend.record_migration("ongoing_request")
                log.warning("request %s: %s (%d tokens streamed); migrating it to another worker (%d of "
                            "--migration-limit %d)", prep.request_id, error.message, len(produced), migrations,
                            self.config.migration_limit)
            else:
                if retries >= self.config.request_retries:
                    raise error
                retries += 1
                self.metrics.routing.record_retry(error.code.name.lower())
                self.metrics.frontend.record_migration("new_request")
                log.warning("request %s: %s; retrying on another worker", prep.request_id, error.message)
            excluded.add(worker.worker_id)
            last_error = error

    def _continuation(self, prep: Prepared, produced: list[int], error: RouterError) -> common_pb2.SamplingParams:
        """The sampling parameters of a migrated request (prompt logprobs went out with its first
        chunk); RouterError (the worker's failure, and why it cannot move) when it cannot continue."""
        sp = dataclasses.replace(prep.sampling, prompt_logprobs=None)
        try:
            check_continuation(len(prep.input_ids), len(produced), sp, self.tokenizer.context_length)
        except SamplingError as e:
            if e.code == "context_length_exceeded":
                self.metrics.frontend.migration_too_long()
            raise RouterError(error.code, f"{error.message}; the request cannot be migrated: {e}") from None
        return sampling_to_proto(sp)

    async def run(self, prep: Prepared, timeout: float | None = None) -> AsyncIterator[Delta]:
        """Deltas of a request's samples (detokenized, stop strings applied, parsed), merged; a
        request over the concurrency limits ends at once with RESOURCE_EXHAUSTED."""
        try:
            release = self.admission.admit(prep.client_key)
        except Overloaded as e:
            raise RouterError(e.code, e.message) from None
        try:
            # aclosing: when the consumer closes this generator (a response complete, a client gone),
            # the generators below close now, in order, down to worker_stream's accounting; an
            # abandoned `async for` would leave them to the event loop's finalizer, after the
            # response may already have reached the client (and its next request been routed).
            async with contextlib.aclosing(self._run(prep, timeout)) as deltas:
                async for d in deltas:
                    yield d
        finally:
            release()

    async def _run(self, prep: Prepared, timeout: float | None) -> AsyncIterator[Delta]:
        deadline = None if timeout is None else time.monotonic() + timeout
        if prep.n <= 1:
            async with contextlib.aclosing(self._run_sample(prep.sample(0), 0, deadline)) as deltas:
                async for d in deltas:
                    yield d
            return
        if prep.sampling.seed is None:
            prep.sampling.seed = random.getrandbits(63)  # n samples: distinct and reproducible seeds
        q: asyncio.Queue = asyncio.Queue()
        # Deltas waiting for the consumer, all samples together: while the client is slow (or
        # stalled) the samples' worker streams are held back by flow control instead of queueing here.
        room = asyncio.Semaphore(MERGED_DELTAS_WAITING)
        started = asyncio.Event()
        first = prep.sample(0)
        _DONE = object()

        async def pump(i: int, sample: Prepared, pin: str | None) -> None:
            try:
                async with contextlib.aclosing(self._run_sample(sample, i, deadline, pin)) as deltas:
                    async for d in deltas:
                        started.set()
                        await room.acquire()
                        q.put_nowait(d)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put_nowait(e)
            finally:
                started.set()
                q.put_nowait(_DONE)

        tasks = [asyncio.create_task(pump(0, first, None))]
        try:
            await started.wait()
            pin = first.decision.worker_id if first.decision is not None else None
            tasks += [asyncio.create_task(pump(i, prep.sample(i), pin)) for i in range(1, prep.n)]
            live = len(tasks)
            while live:
                item = await q.get()
                if item is _DONE:
                    live -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    room.release()
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_sample(self, prep: Prepared, index: int, deadline: float | None,
                          pin: str | None = None) -> AsyncIterator[Delta]:
        """Deltas of one sample, with frontend metrics."""
        sp = prep.sampling
        ts = TextStream(self.tokenizer.hf, sp.stop, sp.skip_special_tokens)
        parsers = OutputParsers(prep.reasoning_parser, prep.tool_parser)
        echo = prep.echo_text
        n_out = 0
        endpoint, _, stream = prep.endpoint.partition(":")
        agen = self.worker_stream(prep, deadline, pin)
        with self.metrics.frontend.track_request(endpoint, "stream" if stream else "unary") as fr:
            fr.set_input_tokens(len(prep.input_ids))
            try:
                async for chunk in agen:
                    ids = list(chunk.token_ids)
                    fr.on_tokens(len(ids))
                    n_out += len(ids)
                    logprobs = list(chunk.logprobs)
                    prompt_lps = list(chunk.prompt_logprobs)
                    if chunk.finish_reason:
                        # The worker says where a stop string begins: the text ends there.
                        text = ts.finish(ids, chunk.stop_text_pos if chunk.HasField("stop_text_pos") else None)
                        usage = common_pb2.Usage(prompt_tokens=len(prep.input_ids), completion_tokens=n_out)
                        if chunk.HasField("usage"):  # a migrated request's worker may count its output too
                            usage.cached_tokens = min(chunk.usage.cached_tokens, len(prep.input_ids))
                        elif prep.decision is not None and self.index is not None and self.index.block_size:
                            usage.cached_tokens = prep.decision.overlap_blocks * self.index.block_size
                        fr.set_cached_tokens(usage.cached_tokens, len(prep.input_ids))
                        reasoning, text, calls = parsers.push(text, final=True)
                        yield Delta(echo + text, ids, logprobs, chunk.finish_reason, chunk.matched_stop, usage, index,
                                    reasoning, calls, prompt_lps)
                        return
                    text = ts.push(ids)
                    if text or ids:
                        reasoning, text, calls = parsers.push(text, final=False)
                        yield Delta(echo + text, ids, logprobs, index=index, reasoning=reasoning, tool_calls=calls,
                                    prompt_logprobs=prompt_lps)
                        echo = ""
            except (asyncio.CancelledError, GeneratorExit):
                fr.client_disconnected()
                raise
            finally:
                await agen.aclose()
