"""Effective-config snapshots (YAML), written next to benchmark results."""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel


def config_to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=True)


def write_snapshot(config: BaseModel, path: str | os.PathLike, service: str | None = None) -> Path:
    """Write the effective config as YAML; `service` is stored as a comment header."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = f"# effective config of {service or type(config).__name__}\n"
    p.write_text(header + config_to_yaml(config))
    return p
