"""SGLang-named engine metrics, updated from :class:`SchedulerStats` messages."""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry
from tandem.metrics import definitions as d
from tandem.metrics.stats import SchedulerStats


class EngineMetrics:
    """All ``sglang:*`` metrics of one engine (one worker), with a fixed base label set.

    ``apply(stats)`` sets gauges, adds counter deltas and observes latency samples.
    Thread-safe (the publisher thread calls it; tests may call it directly).
    """

    def __init__(self, registry: CollectorRegistry | None, *, model_name: str, engine_type: str,
                 worker_id: str):
        if engine_type not in d.ENGINE_TYPES:
            raise ValueError(f"engine_type must be one of {d.ENGINE_TYPES}, got {engine_type!r}")
        if not model_name:
            raise ValueError("model_name must be a non-empty string")
        self.registry = registry
        self.base = {"model_name": model_name, "engine_type": engine_type, "worker_id": str(worker_id)}
        self._lock = threading.Lock()
        self.gauges = {spec.name[len("sglang:"):]: spec.create(registry) for spec in d.ENGINE_GAUGES}
        self.counters = {field: spec.create(registry) for spec, field in d.ENGINE_COUNTERS}
        self.realtime_tokens = d.REALTIME_TOKENS.create(registry)
        self.lora_counters = {field: spec.create(registry) for spec, field in d.LORA_COUNTERS}
        self.histograms = {field: spec.create(registry) for spec, field in d.ENGINE_HISTOGRAMS}
        self.eplb_balancedness = d.EPLB_BALANCEDNESS.create(registry)
        self.eplb_gpu_physical_count = None  # created on first use: buckets depend on ep_size
        self._eplb_ep_size: int | None = None

    def labels_for(self, stats: SchedulerStats) -> dict[str, str]:
        return {**self.base, "tp_rank": str(stats.tp_rank), "pp_rank": str(stats.pp_rank)}

    def apply(self, stats: SchedulerStats) -> None:
        _validate(stats)
        labels = self.labels_for(stats)
        with self._lock:
            for name, gauge in self.gauges.items():
                value = getattr(stats, name)
                if value is not None:
                    gauge.labels(**labels).set(value)
            for field, counter in self.counters.items():
                delta = getattr(stats, field)
                # Touch the child even for 0 so the series exists from the first message.
                child = counter.labels(**labels)
                if delta:
                    child.inc(delta)
            for mode, field in d.REALTIME_MODES:
                delta = getattr(stats, field)
                child = self.realtime_tokens.labels(**labels, mode=mode)
                if delta:
                    child.inc(delta)
            for field, counter in self.lora_counters.items():
                for lora_name, delta in getattr(stats, field).items():
                    counter.labels(**labels, lora_name=lora_name).inc(delta)
            for field, hist in self.histograms.items():
                samples = getattr(stats, field)
                child = hist.labels(**labels)
                for value in samples:
                    child.observe(value)
            for forward_mode, samples in stats.eplb_balancedness.items():
                child = self.eplb_balancedness.labels(**labels, forward_mode=forward_mode)
                for value in samples:
                    child.observe(value)
            if stats.eplb_gpu_physical_count:
                self._apply_eplb_counts(labels, stats.eplb_gpu_physical_count)

    def _apply_eplb_counts(self, labels: dict[str, str], counts: dict[int, list[int]]) -> None:
        ep_size = max(len(v) for v in counts.values())
        if self.eplb_gpu_physical_count is None:
            self._eplb_ep_size = ep_size
            self.eplb_gpu_physical_count = d.eplb_gpu_physical_count_spec(ep_size).create(self.registry)
        elif ep_size > self._eplb_ep_size:
            raise ValueError(f"eplb_gpu_physical_count has {ep_size} ranks, metric was built for "
                             f"{self._eplb_ep_size}")
        for layer, per_rank in counts.items():
            child = self.eplb_gpu_physical_count.labels(**labels, layer=str(layer))
            for rank, n in enumerate(per_rank):
                child.observe_n(rank, int(n))


_DELTA_FIELDS = tuple(f for _, f in d.ENGINE_COUNTERS) + tuple(f for _, f in d.REALTIME_MODES)


def _validate(stats: SchedulerStats) -> None:
    """Reject a message before touching any metric, so a bad one changes nothing."""
    for field in _DELTA_FIELDS:
        delta = getattr(stats, field)
        if not isinstance(delta, (int, float)) or delta < 0:
            raise ValueError(f"stats.{field} is a delta and must be a number >= 0, got {delta!r}")
    for _, field in d.LORA_COUNTERS:
        for lora_name, delta in getattr(stats, field).items():
            if not isinstance(delta, (int, float)) or delta < 0:
                raise ValueError(f"stats.{field}[{lora_name!r}] is a delta and must be a number >= 0, got {delta!r}")
