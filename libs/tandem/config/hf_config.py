"""A Hugging Face checkpoint's ``config.json``, read in one place for every service (the
engine's ModelConfig, the router's context length, the EPLB planner's MoE shape)."""
from __future__ import annotations

import json
import os

# Keys checkpoints use for the longest sequence, in the order they are trusted.
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions")


def read_hf_config(model_path: str) -> dict:
    """The parsed ``config.json`` of a checkpoint directory; ValueError naming the problem."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"model_path={model_path!r}: no config.json in this directory")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON file: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    return cfg


def context_length(cfg: dict) -> int | None:
    """The checkpoint's context length, None when it names none."""
    for key in CONTEXT_LENGTH_KEYS:
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None
