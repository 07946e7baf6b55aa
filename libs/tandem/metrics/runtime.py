"""Dynamo-named runtime metrics: workers (``dynamo_component_*``), the router frontend
(``dynamo_frontend_*``) and routing (``dynamo_router_overhead_*``, ``tandem_router_*``).

Typical use in a gRPC handler::

    cm = ComponentMetrics(registry, component="decode", endpoint="generate", model="demo", worker_id="d0")
    with cm.track_request(request_bytes=req.ByteSize()) as t:
        for resp in generate(...):
            t.first_response()            # no-op after the first call
            t.add_response_bytes(resp.ByteSize())
            yield resp

An exception leaving the block counts as an error with error_type = the exception's class
name (or what ``t.set_error(...)`` said); the request is still counted and timed.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry
from tandem.metrics import definitions as d
from tandem.metrics.registry import RefreshCollector
from tandem.metrics.stats import SchedulerStats


class RequestTracker:
    """Per-request handle given by :meth:`ComponentMetrics.track_request`."""

    def __init__(self, metrics: ComponentMetrics, labels: dict[str, str]):
        self._m = metrics
        self._labels = labels
        self.start = time.perf_counter()
        self.first_response_at: float | None = None
        self.error_type: str | None = None

    def first_response(self) -> None:
        """Mark the first streamed response (observed once)."""
        if self.first_response_at is None:
            self.first_response_at = time.perf_counter()
            self._m.ttfr.labels(**self._labels).observe(self.first_response_at - self.start)

    def add_response_bytes(self, n: int) -> None:
        self._m.response_bytes.labels(**self._labels).inc(max(0, int(n)))

    def set_error(self, error_type: str) -> None:
        """Count this request as failed with ``error_type`` (e.g. a gRPC status code name)."""
        self.error_type = str(error_type)


class ComponentMetrics:
    """``dynamo_component_*`` metrics of one worker component."""

    def __init__(self, registry: CollectorRegistry | None, *, component: str, endpoint: str, model: str,
                 worker_id: str, namespace: str = "tandem"):
        for name, value in (("component", component), ("endpoint", endpoint), ("model", model),
                            ("worker_id", worker_id), ("namespace", namespace)):
            if not value:
                raise ValueError(f"ComponentMetrics: {name} must be a non-empty string")
        self.base = {"dynamo_namespace": namespace, "dynamo_component": component, "model": model,
                     "worker_id": str(worker_id)}
        self.default_endpoint = endpoint
        m = {key: spec.create(registry) for key, spec in d.COMPONENT.items()}
        self._requests, self._req_bytes = m["requests_total"], m["request_bytes_total"]
        self.response_bytes, self._inflight = m["response_bytes_total"], m["inflight_requests"]
        self._duration, self._errors = m["request_duration_seconds"], m["errors_total"]
        self.ttfr, self._uptime = m["time_to_first_response_seconds"], m["uptime_seconds"]
        self._total_blocks, self._active_blocks = m["total_blocks"], m["active_blocks"]
        self._usage, self._hit_rate = m["gpu_cache_usage_percent"], m["gpu_prefix_cache_hit_rate"]
        self._load_time, self._kv_events = m["model_load_time_seconds"], m["kv_cache_events_applied_total"]
        self._drained = m["tandem_component_drained_requests_total"]
        self._drained_moved = (m["tandem_component_drained_moved_requests_total"],
                               m["tandem_component_drained_moved_pages_total"])
        self._moves_in = (m["tandem_component_kv_moves_in_total"], m["tandem_component_kv_moved_in_pages_total"])
        self.started_at = time.time()
        if registry is not None:
            registry.register(RefreshCollector(self.refresh_uptime))
        self.refresh_uptime()

    def labels(self, endpoint: str | None = None) -> dict[str, str]:
        return {**self.base, "dynamo_endpoint": endpoint or self.default_endpoint}

    @contextmanager
    def track_request(self, endpoint: str | None = None, request_bytes: int = 0) -> Iterator[RequestTracker]:
        labels = self.labels(endpoint)
        self._requests.labels(**labels).inc()
        if request_bytes:
            self._req_bytes.labels(**labels).inc(max(0, int(request_bytes)))
        inflight = self._inflight.labels(**labels)
        inflight.inc()
        tracker = RequestTracker(self, labels)
        try:
            yield tracker
        except BaseException as e:
            if tracker.error_type is None:
                tracker.error_type = type(e).__name__
            raise
        finally:
            inflight.dec()
            self._duration.labels(**labels).observe(time.perf_counter() - tracker.start)
            if tracker.error_type is not None:
                self._errors.labels(**labels, error_type=tracker.error_type).inc()

    def init_series(self, endpoint: str | None = None) -> None:
        """Create the per-endpoint series at zero, so dashboards and rate() see them before
        the first request (Prometheus' advice for labelled metrics)."""
        labels = self.labels(endpoint)
        for metric in (self._requests, self._req_bytes, self.response_bytes, self._inflight, self._duration,
                       self.ttfr):
            metric.labels(**labels)

    def refresh_uptime(self) -> None:
        self._uptime.labels(**self.labels()).set(time.time() - self.started_at)

    def set_model_load_time(self, seconds: float) -> None:
        self._load_time.labels(**self.labels()).set(seconds)

    def requests_drained(self, n: int, moved: int = 0, moved_pages: int = 0) -> None:
        """A Drain handed ``n`` requests back, ``moved`` of them with their KV (``moved_pages`` pages)."""
        self._drained.labels(**self.labels()).inc(n)
        self._drained_moved[0].labels(**self.labels()).inc(moved)
        self._drained_moved[1].labels(**self.labels()).inc(moved_pages)

    def kv_moved_in(self, outcome: str, pages: int) -> None:
        """A request moved here off a draining worker: outcome "moved" (``pages`` fetched) or "recomputed"."""
        self._moves_in[0].labels(**self.labels(), outcome=outcome).inc()
        self._moves_in[1].labels(**self.labels()).inc(pages)

    def kv_events_applied(self, n: int = 1) -> None:
        self._kv_events.labels(**self.labels()).inc(n)

    def set_kv_stats(self, *, total_blocks: int, active_blocks: int, usage: float,
                     prefix_cache_hit_rate: float | None = None) -> None:
        labels = self.labels()
        self._total_blocks.labels(**labels).set(total_blocks)
        self._active_blocks.labels(**labels).set(active_blocks)
        self._usage.labels(**labels).set(usage)
        if prefix_cache_hit_rate is not None:
            self._hit_rate.labels(**labels).set(prefix_cache_hit_rate)

    def apply_engine_stats(self, stats: SchedulerStats) -> None:
        """Derive the KV gauges from an engine stats message (needs page_size and pool sizes)."""
        if not stats.page_size or stats.max_total_num_tokens is None or stats.num_used_tokens is None:
            return
        total = stats.max_total_num_tokens // stats.page_size
        active = -(-stats.num_used_tokens // stats.page_size)
        usage = stats.token_usage if stats.token_usage is not None else (
            stats.num_used_tokens / stats.max_total_num_tokens if stats.max_total_num_tokens else 0.0)
        self.set_kv_stats(total_blocks=total, active_blocks=active, usage=usage,
                          prefix_cache_hit_rate=stats.cache_hit_rate)


class FrontendRequest:
    """Per-request handle given by :meth:`FrontendMetrics.track_request`."""

    def __init__(self, metrics: FrontendMetrics):
        self._m = metrics
        self.start = time.perf_counter()
        self._last_token_at: float | None = None
        self.output_tokens = 0
        self.status = "success"
        self._queued = True

    def set_input_tokens(self, n: int) -> None:
        self._m.isl.labels(**self._m.base).observe(n)

    def set_cached_tokens(self, cached: int, input_tokens: int) -> None:
        """Prompt tokens found in the KV cache (as reported by the worker or predicted by routing)."""
        self._m.cached.labels(**self._m.base).observe(cached)
        if input_tokens > 0:
            self._m.hit_rate.labels(**self._m.base).observe(min(1.0, cached / input_tokens))

    def on_tokens(self, n: int = 1) -> None:
        """``n`` new output tokens arrived together: first call gives TTFT, later ones ITL."""
        if n <= 0:
            return
        now = time.perf_counter()
        base = self._m.base
        if self._last_token_at is None:
            self._m.ttft.labels(**base).observe(now - self.start)
            self.leave_queue()
        else:
            per_token = (now - self._last_token_at) / n
            child = self._m.itl.labels(**base)
            for _ in range(n):
                child.observe(per_token)
        self._last_token_at = now
        self.output_tokens += n
        self._m.output_tokens.labels(**base).inc(n)

    def client_disconnected(self) -> None:
        self._m.disconnected.labels(**self._m.base).inc()
        self.status = "error"

    def set_status(self, status: str) -> None:
        if status not in ("success", "error"):
            raise ValueError(f"status must be 'success' or 'error', got {status!r}")
        self.status = status

    def leave_queue(self) -> None:
        if self._queued:
            self._queued = False
            self._m.queued.labels(**self._m.base).dec()


class FrontendMetrics:
    """``dynamo_frontend_*`` metrics of the router's HTTP/gRPC frontend, for one model."""

    def __init__(self, registry: CollectorRegistry | None, *, model: str):
        if not model:
            raise ValueError("FrontendMetrics: model must be a non-empty string")
        self.base = {"model": model}
        m = {key: spec.create(registry) for key, spec in d.FRONTEND.items()}
        self._requests, self._inflight, self.queued = m["requests_total"], m["inflight_requests"], m["queued_requests"]
        self.disconnected, self._duration = m["disconnected_clients"], m["request_duration_seconds"]
        self.isl, self._osl, self.output_tokens = m["input_sequence_tokens"], m["output_sequence_tokens"], m["output_tokens_total"]
        self.ttft, self.itl = m["time_to_first_token_seconds"], m["inter_token_latency_seconds"]
        self.hit_rate, self.cached, self._tok = m["kv_hit_rate"], m["cached_tokens"], m["tokenizer_latency_ms"]
        self._ctx, self._block, self._blocks = (m["model_context_length"], m["model_kv_cache_block_size"],
                                                m["model_total_kv_blocks"])
        self._migrations, self._migration_too_long = (m["model_migration_total"],
                                                      m["model_migration_max_seq_len_exceeded_total"])
        for g in (self._inflight, self.queued, self.disconnected):
            g.labels(**self.base)  # series exist (at 0) before the first request

    def set_model_info(self, *, context_length: int | None = None, kv_cache_block_size: int | None = None,
                       total_kv_blocks: int | None = None) -> None:
        if context_length is not None:
            self._ctx.labels(**self.base).set(context_length)
        if kv_cache_block_size is not None:
            self._block.labels(**self.base).set(kv_cache_block_size)
        if total_kv_blocks is not None:
            self._blocks.labels(**self.base).set(total_kv_blocks)

    def record_migration(self, migration_type: str) -> None:
        """migration_type: "ongoing_request" (continued with its tokens so far) | "new_request" (sent again)."""
        self._migrations.labels(**self.base, migration_type=migration_type).inc()

    def migration_too_long(self) -> None:
        self._migration_too_long.labels(**self.base).inc()

    def observe_tokenizer_ms(self, operation: str, ms: float) -> None:
        """operation: "tokenize" | "detokenize" | "chat_template"."""
        self._tok.labels(**self.base, operation=operation).observe(ms)

    @contextmanager
    def track_request(self, endpoint: str, request_type: str) -> Iterator[FrontendRequest]:
        """endpoint: e.g. "chat_completions" / "completions" / "grpc_generate";
        request_type: "stream" | "unary"."""
        if request_type not in ("stream", "unary"):
            raise ValueError(f"request_type must be 'stream' or 'unary', got {request_type!r}")
        inflight = self._inflight.labels(**self.base)
        inflight.inc()
        self.queued.labels(**self.base).inc()
        req = FrontendRequest(self)
        try:
            yield req
        except BaseException:
            req.status = "error"
            raise
        finally:
            req.leave_queue()
            inflight.dec()
            self._duration.labels(**self.base).observe(time.perf_counter() - req.start)
            self._osl.labels(**self.base).observe(req.output_tokens)
            self._requests.labels(**self.base, endpoint=endpoint, request_type=request_type,
                                  status=req.status).inc()


class RouterMetrics:
    """Routing overhead (Dynamo's names) and routing decisions (tandem_router_*)."""

    def __init__(self, registry: CollectorRegistry | None, *, model: str):
        if not model:
            raise ValueError("RouterMetrics: model must be a non-empty string")
        self.model = model
        self.m = {key: spec.create(registry) for key, spec in d.ROUTER.items()}

    def observe_overhead_ms(self, *, block_hashing: float | None = None,
                            indexer_find_matches: float | None = None, scheduling: float | None = None,
                            total: float | None = None) -> None:
        for key, value in (("block_hashing", block_hashing), ("indexer_find_matches", indexer_find_matches),
                           ("scheduling", scheduling), ("total", total)):
            if value is not None:
                self.m[key].labels(model=self.model).observe(value)

    def record_decision(self, *, worker_id: str, policy: str, overlap_blocks: int | None = None) -> None:
        self.m["decisions_total"].labels(model=self.model, worker_id=str(worker_id), policy=policy).inc()
        if overlap_blocks is not None:
            self.m["kv_overlap_blocks"].labels(model=self.model, policy=policy).observe(overlap_blocks)

    def record_retry(self, reason: str) -> None:
        self.m["retries_total"].labels(model=self.model, reason=reason).inc()


__all__ = ["ComponentMetrics", "FrontendMetrics", "FrontendRequest", "RequestTracker", "RouterMetrics"]
