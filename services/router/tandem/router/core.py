"""RouterCore: picks a worker, calls its Decode.Generate, retries once on another worker
when it fails before any output, and turns tokens into text (incremental detokenization,
stop strings). Shared by the HTTP and the gRPC front ends; runs on the router's loop.

Cancellation: the worker call lives inside an async generator; when the consumer stops
early (client disconnected, gRPC cancel, stop string matched) the generator is closed or
cancelled and its `finally` cancels the worker's Generate call, so the worker aborts the
request and frees its pages.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

import grpc

from tandem.config import RouterConfig
from tandem.routing.detokenizer import TextStream
from tandem.routing.discovery import EtcdWatcher
from tandem.routing.kv_index import KvIndex
from tandem.routing.policies import Decision, KvAwarePolicy, make_policy
from tandem.routing.tokenizer import RouterTokenizer
from tandem.v1 import common_pb2, decode_pb2
from tandem.router.metrics import RouterMetrics
from tandem.router.workers import Worker, WorkerPool

log = logging.getLogger(__name__)

# Worker failures that say nothing about the request itself: another worker may succeed.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}


class RouterError(Exception):
    """A request failed; `code` is the gRPC status the gRPC API returns (HTTP maps it)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NoHealthyWorker(RouterError):
    def __init__(self, message: str = "no healthy worker available") -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


@dataclass
class Prepared:
    """A tokenized, validated request."""
    request_id: str
    input_ids: list[int]
    sampling: common_pb2.SamplingParams
    endpoint: str = "grpc"
    skip_special_tokens: bool = True
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Delta:
    """Output since the previous delta; the last one carries finish_reason and usage."""
    text: str
    token_ids: list[int]
    logprobs: list
    finish_reason: int = 0
    matched_stop: str = ""
    usage: Optional[common_pb2.Usage] = None


def static_worker_infos(addresses: list[str]) -> dict[str, common_pb2.WorkerInfo]:
    return {a: common_pb2.WorkerInfo(worker_id=a, address=a, role="agg") for a in addresses}


class RouterCore:
    def __init__(self, config: RouterConfig, tokenizer: RouterTokenizer, metrics: RouterMetrics,
                 model_name: str) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model_name = model_name
        self.index = KvIndex() if config.routing_policy == "kv_aware" else None
        self.policy = make_policy(config.routing_policy, self.index, config.kv_overlap_weight)
        self.pool: Optional[WorkerPool] = None
        self._watch_task: Optional[asyncio.Task] = None
        self.watcher: Optional[EtcdWatcher] = None
        metrics.context_length.labels(model_name).set(tokenizer.context_length)

    async def start(self) -> None:
        def on_health(w: Worker, ok: bool) -> None:
            self.metrics.worker_healthy.labels(w.worker_id).set(1 if ok else 0)

        self.pool = WorkerPool(self.config.health_check_interval, self.index, on_health)
        if self.config.discovery == "static":
            await self.pool.set_workers(static_worker_infos(self.config.workers))
        else:
            self.watcher = EtcdWatcher(self.config.etcd_endpoint, self.config.etcd_prefix, self._on_discovery)
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

    # ---- routing ------------------------------------------------------------------

    def route(self, input_ids: list[int], exclude: set[str] = frozenset()) -> tuple[Worker, Decision]:
        candidates = [w for w in self.pool.healthy() if w.worker_id not in exclude]
        if not candidates:
            raise NoHealthyWorker(
                f"no healthy worker available ({len(self.pool.workers)} known, "
                f"{len(self.pool.healthy())} healthy)")
        t0 = time.perf_counter()
        decision = self.policy.choose([w.view() for w in candidates], input_ids)
        m = self.metrics
        m.overhead_scheduling.observe((time.perf_counter() - t0) * 1e3)
        m.decisions.labels(self.policy.name, decision.worker_id).inc()
        if isinstance(self.policy, KvAwarePolicy):
            m.overhead_hashing.observe(decision.hash_ms)
            m.overhead_match.observe(decision.match_ms)
            m.overlap_blocks.labels(self.policy.name).observe(decision.overlap_blocks)
            if decision.request_blocks:
                m.kv_hit_rate.labels(self.model_name).observe(decision.overlap_blocks / decision.request_blocks)
            m.indexed_blocks.set(self.index.num_blocks())
            if self.index.block_size:
                m.block_size.labels(self.model_name).set(self.index.block_size)
        return self.pool.workers[decision.worker_id], decision

    def _blocks(self, n_tokens: int) -> int:
        bs = (self.index.block_size if self.index else None) or 16
        return math.ceil(n_tokens / bs)

    async def worker_stream(self, prep: Prepared, deadline: Optional[float] = None) -> AsyncIterator[common_pb2.TokenChunk]:
        """Raw worker chunks for a request, with at most `request_retries` retries on other
        workers while nothing has been streamed yet."""
        excluded: set[str] = set()
        attempt = 0
        last_error: Optional[RouterError] = None
        while True:
            try:
                worker, decision = self.route(prep.input_ids, excluded)
            except NoHealthyWorker:
                if last_error is not None:
                    raise last_error from None
                raise
            self.metrics.overhead_total.observe((time.perf_counter() - prep.started) * 1e3)
            blocks = self._blocks(len(prep.input_ids) + prep.sampling.max_tokens)
            worker.active_requests += 1
            worker.active_blocks += blocks
            timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
            call = worker.decode.Generate(
                decode_pb2.GenerateRequest(request_id=prep.request_id, input_ids=prep.input_ids,
                                           sampling=prep.sampling), timeout=timeout)
            streamed = False
            error: Optional[RouterError] = None
            retryable = False
            try:
                async for chunk in call:
                    if chunk.finish_reason == common_pb2.FINISH_REASON_ERROR:
                        e = chunk.error
                        error = RouterError(grpc.StatusCode.UNAVAILABLE if e.retryable else grpc.StatusCode.INTERNAL,
                                            f"worker {worker.worker_id}: {e.code}: {e.message}")
                        retryable = e.retryable
                        break
                    streamed = True
                    yield chunk
                    if chunk.finish_reason:
                        return
                else:
                    error = RouterError(grpc.StatusCode.UNAVAILABLE,
                                        f"worker {worker.worker_id} ended the stream without finishing the request")
                    retryable = True
            except grpc.aio.AioRpcError as e:
                code = e.code()
                self.metrics.worker_errors.labels(worker.worker_id, code.name).inc()
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.pool.mark_unhealthy(worker, f"Generate failed: {e.details()}")
                error = RouterError(code, f"worker {worker.worker_id}: {e.details() or code.name}")
                retryable = code in RETRYABLE
            finally:
                call.cancel()
                worker.active_requests -= 1
                worker.active_blocks -= blocks
            if streamed or not retryable or attempt >= self.config.request_retries:
                raise error
            attempt += 1
            excluded.add(worker.worker_id)
            last_error = error
            self.metrics.retries.inc()
            log.warning("request %s: %s; retrying on another worker", prep.request_id, error.message)

    async def run(self, prep: Prepared, timeout: Optional[float] = None) -> AsyncIterator[Delta]:
        """Text deltas of a request (detokenized, stop strings applied), with frontend metrics."""
        m, model = self.metrics, self.model_name
        deadline = None if timeout is None else time.monotonic() + timeout
        ts = TextStream(self.tokenizer.hf, list(prep.sampling.stop), prep.skip_special_tokens)
        n_out = 0
        first_at = last_at = None
        status = "error"
        m.inflight.labels(model).inc()
        m.queued.labels(model).inc()
        m.isl.labels(model).observe(len(prep.input_ids))
        agen = self.worker_stream(prep, deadline)
        try:
            async for chunk in agen:
                ids = list(chunk.token_ids)
                now = time.perf_counter()
                if ids:
                    if first_at is None:
                        first_at = now
                        m.queued.labels(model).dec()
                        m.ttft.labels(model).observe(now - prep.started)
                    elif last_at is not None:
                        m.itl.labels(model).observe((now - last_at) / len(ids))
                    last_at = now
                n_out += len(ids)
                text = ts.push(ids)
                logprobs = list(chunk.logprobs)
                if ts.stopped:
                    status = "success"
                    cached = chunk.usage.cached_tokens if chunk.HasField("usage") else 0
                    yield Delta(text, ids, logprobs, common_pb2.FINISH_REASON_STOP, ts.matched_stop,
                                common_pb2.Usage(prompt_tokens=len(prep.input_ids), completion_tokens=n_out,
                                                 cached_tokens=cached))
                    return
                if chunk.finish_reason:
                    text += ts.finish()
                    usage = common_pb2.Usage(prompt_tokens=len(prep.input_ids), completion_tokens=n_out)
                    if chunk.HasField("usage"):
                        usage.cached_tokens = chunk.usage.cached_tokens
                    m.cached_tokens.labels(model).observe(usage.cached_tokens)
                    status = "success"
                    yield Delta(text, ids, logprobs, chunk.finish_reason, chunk.matched_stop, usage)
                    return
                if text or ids:
                    yield Delta(text, ids, logprobs)
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            m.disconnected.labels(model).inc()
            raise
        finally:
            await agen.aclose()
            if first_at is None:
                m.queued.labels(model).dec()
            m.inflight.labels(model).dec()
            m.osl.labels(model).observe(n_out)
            m.output_tokens.labels(model).inc(n_out)
            m.duration.labels(model).observe(time.perf_counter() - prep.started)
            stream = "stream" if prep.endpoint.endswith(":stream") else "unary"
            m.requests.labels(model, prep.endpoint.split(":")[0], stream, status).inc()
