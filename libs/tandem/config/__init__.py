"""Typed service configuration: schemas, loading with precedence, snapshots."""
from tandem.config.loader import ConfigError, build_parser, load_config, load_or_exit, validate
from tandem.config.schemas import (
    SERVICE_SCHEMAS,
    DecodeConfig,
    DisaggregationConfig,
    EngineConfig,
    EplbPlannerConfig,
    PrefillConfig,
    RouterConfig,
    ServerConfig,
)
from tandem.config.snapshot import config_to_yaml, write_snapshot

__all__ = ["SERVICE_SCHEMAS", "ConfigError", "DecodeConfig", "DisaggregationConfig", "EngineConfig", "EplbPlannerConfig", "PrefillConfig", "RouterConfig", "ServerConfig", "build_parser", "config_to_yaml", "load_config", "load_or_exit", "validate", "write_snapshot"]
