"""tandem metrics: SGLang-named engine metrics fed over ZMQ, Dynamo-named runtime metrics.

See README.md in this folder for every metric, its type, labels and meaning.
"""
from tandem.metrics.engine import EngineMetrics
from tandem.metrics.registry import (
    is_multiprocess,
    make_registry,
    metrics_text,
    multiproc_dir,
    prepare_multiproc_dir,
    process_exited,
    registration_target,
)
from tandem.metrics.runtime import ComponentMetrics, FrontendMetrics, RouterMetrics
from tandem.metrics.stats import SchedulerStats
from tandem.metrics.transport import MetricsPublisher, StatsSender, default_stats_endpoint, validate_endpoint

__all__ = [
    "ComponentMetrics", "EngineMetrics", "FrontendMetrics", "MetricsPublisher", "RouterMetrics",
    "SchedulerStats", "StatsSender", "default_stats_endpoint", "is_multiprocess", "make_registry",
    "metrics_text", "multiproc_dir", "prepare_multiproc_dir", "process_exited", "registration_target",
    "validate_endpoint",
]
