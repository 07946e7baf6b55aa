"""Router metrics with Dynamo's frontend names (dynamo_frontend_*, dynamo_router_overhead_*)
plus the routing decisions (tandem_router_*), all in one prometheus_client registry."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# SGLang's TTFT / ITL buckets (REFERENCE.md), reused for the frontend histograms.
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060,
               0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1, 2, 4, 6, 8)
E2E_BUCKETS = TTFT_BUCKETS + (600, 1200, 1800, 2400)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
MS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100)
RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.model = model
        m = ["model"]
        r = registry
        self.requests = Counter("dynamo_frontend_requests", "Requests handled by the frontend.",
                                ["model", "endpoint", "request_type", "status"], registry=r)
        self.inflight = Gauge("dynamo_frontend_inflight_requests", "Requests in flight.", m, registry=r)
        self.queued = Gauge("dynamo_frontend_queued_requests", "Requests waiting for their first token.", m,
                            registry=r)
        self.disconnected = Counter("dynamo_frontend_disconnected_clients", "Clients that went away mid-request.",
                                    m, registry=r)
        self.duration = Histogram("dynamo_frontend_request_duration_seconds", "End-to-end request time.", m,
                                  buckets=E2E_BUCKETS, registry=r)
        self.isl = Histogram("dynamo_frontend_input_sequence_tokens", "Prompt length in tokens.", m,
                             buckets=TOKEN_BUCKETS, registry=r)
        self.osl = Histogram("dynamo_frontend_output_sequence_tokens", "Generated tokens per request.", m,
                             buckets=TOKEN_BUCKETS, registry=r)
        self.output_tokens = Counter("dynamo_frontend_output_tokens", "Generated tokens.", m, registry=r)
        self.ttft = Histogram("dynamo_frontend_time_to_first_token_seconds", "Time to first token.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("dynamo_frontend_inter_token_latency_seconds", "Time between tokens.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.kv_hit_rate = Histogram("dynamo_frontend_kv_hit_rate",
                                     "Predicted prefix-cache hit rate of the chosen worker (overlap / blocks).",
                                     m, buckets=RATIO_BUCKETS, registry=r)
        self.cached_tokens = Histogram("dynamo_frontend_cached_tokens", "Prompt tokens served from prefix caches.",
                                       m, buckets=TOKEN_BUCKETS, registry=r)
        self.tokenizer_latency = Histogram("dynamo_frontend_tokenizer_latency_ms", "Prompt tokenization time.",
                                           m, buckets=MS_BUCKETS, registry=r)
        self.context_length = Gauge("dynamo_frontend_model_context_length", "Model context length.", m,
                                    registry=r)
        self.block_size = Gauge("dynamo_frontend_model_kv_cache_block_size", "KV block (page) size.", m,
                                registry=r)
        self.overhead_hashing = Histogram("dynamo_router_overhead_block_hashing_ms", "Block hashing time.",
                                          buckets=MS_BUCKETS, registry=r)
        self.overhead_match = Histogram("dynamo_router_overhead_indexer_find_matches_ms",
                                        "KV index lookup time.", buckets=MS_BUCKETS, registry=r)
        self.overhead_scheduling = Histogram("dynamo_router_overhead_scheduling_ms", "Worker choice time.",
                                             buckets=MS_BUCKETS, registry=r)
        self.overhead_total = Histogram("dynamo_router_overhead_total_ms",
                                        "Router time before the worker call (tokenize + route).",
                                        buckets=MS_BUCKETS, registry=r)
        self.decisions = Counter("tandem_router_decisions", "Routing decisions per chosen worker.",
                                 ["policy", "worker_id"], registry=r)
        self.overlap_blocks = Histogram("tandem_router_kv_overlap_blocks",
                                        "Prefix blocks already cached on the chosen worker.", ["policy"],
                                        buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.retries = Counter("tandem_router_retries", "Requests retried on another worker.", registry=r)
        self.worker_errors = Counter("tandem_router_worker_errors", "Failed worker calls.", ["worker_id", "code"],
                                     registry=r)
        self.worker_healthy = Gauge("tandem_router_worker_healthy", "1 if the worker is in rotation.",
                                    ["worker_id"], registry=r)
        self.indexed_blocks = Gauge("tandem_router_kv_indexed_blocks", "Distinct prefix blocks in the KV index.",
                                    registry=r)
