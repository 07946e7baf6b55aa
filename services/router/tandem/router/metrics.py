"""Router metrics: Dynamo's frontend and routing metrics from the shared `tandem.metrics`
library (dynamo_frontend_*, dynamo_router_overhead_*, tandem_router_decisions/overlap/retries),
plus the router's own view of its workers (tandem_router_worker_*, tandem_router_kv_*) and the
streams it dropped because their client stopped taking data (tandem_router_stalled_streams_total)."""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge
from tandem.metrics import FrontendMetrics
from tandem.metrics import RouterMetrics as RoutingMetrics

log = logging.getLogger(__name__)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.model = model
        self.frontend = FrontendMetrics(registry, model=model)
        self.routing = RoutingMetrics(registry, model=model)
        self.worker_errors = Counter("tandem_router_worker_errors", "Failed worker calls, by gRPC status.",
                                     ["model", "worker_id", "code"], registry=registry)
        self.worker_healthy = Gauge("tandem_router_worker_healthy", "1 while the worker is in rotation.",
                                    ["model", "worker_id"], registry=registry)
        self.embedding_inputs = Counter("tandem_router_embedding_inputs", "Inputs embedded (/v1/embeddings and "
                                        "Router.Embed), by embedding model.", ["model"], registry=registry)
        self.indexed_blocks = Gauge("tandem_router_kv_indexed_blocks",
                                    "Distinct prefix blocks in the router's KV index.", ["model"], registry=registry)
        self.stalled_streams = Counter(
            "tandem_router_stalled_streams", "Streams dropped because the client took no data for "
            "--stream-stall-timeout seconds (their worker request cancelled), by API (http, grpc).",
            ["model", "api"], registry=registry)
        self.write_waits = Counter(
            "tandem_router_write_waits", "Times a stream's writes had to wait for a client slower than its "
            "output (HTTP: the connection's write buffer passed its high-water mark; gRPC: the send window was "
            "full), by API.", ["model", "api"], registry=registry)

    def stall_events(self, api: str, timeout: float) -> StreamStallEvents:
        """What the stall watchdog of ``api`` (http, grpc) reports to: these counters and the log."""
        return StreamStallEvents(self, api, timeout)


class StreamStallEvents:
    def __init__(self, metrics: RouterMetrics, api: str, timeout: float) -> None:
        self.waits = metrics.write_waits.labels(metrics.model, api)
        self.stalls = metrics.stalled_streams.labels(metrics.model, api)
        self.api = api
        self.timeout = timeout

    def write_waited(self) -> None:
        self.waits.inc()

    def stalled(self, peer: str, waiting: str) -> None:
        self.stalls.inc()
        log.warning("%s client %s took no data for %g s (%s waiting): stream dropped, its worker request "
                    "cancelled (--stream-stall-timeout)", self.api, peer, self.timeout, waiting)
