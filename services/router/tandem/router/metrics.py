"""Router metrics: Dynamo's frontend and routing metrics from the shared `tandem.metrics`
library (dynamo_frontend_*, dynamo_router_overhead_*, tandem_router_decisions/overlap/retries),
plus the router's own view of its workers (tandem_router_worker_*, tandem_router_kv_*) and the
streams it dropped because their client stopped taking data (tandem_router_stalled_streams_total)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from tandem.metrics import FrontendMetrics
from tandem.metrics import RouterMetrics as RoutingMetrics


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.model = model
        self.frontend = FrontendMetrics(registry, model=model)
        self.routing = RoutingMetrics(registry, model=model)
        self.worker_errors = Counter("tandem_router_worker_errors", "Failed worker calls, by gRPC status.",
                                     ["model", "worker_id", "code"], registry=registry)
        self.worker_healthy = Gauge("tandem_router_worker_healthy", "1 while the worker is in rotation.",
                                    ["model", "worker_id"], registry=registry)
        self.indexed_blocks = Gauge("tandem_router_kv_indexed_blocks",
                                    "Distinct prefix blocks in the router's KV index.", ["model"], registry=registry)
        self.stalled_streams = Counter(
            "tandem_router_stalled_streams", "Streams dropped because the client took no data for "
            "--stream-stall-timeout seconds (their worker request cancelled), by API (http, grpc).",
            ["model", "api"], registry=registry)
