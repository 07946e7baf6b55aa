"""The checkpoint's tokenizer (tokenizer.json) and its EOS token ids (config.json,
generation_config.json, tokenizer_config.json) (split out of engine.py, code unchanged)."""
from __future__ import annotations

import json
import os

from .model_config import ModelConfig


def eos_token_ids(path: str, mc: ModelConfig, tokenizer) -> set:
    """Every id that ends a generation: the model's, generation_config's and the tokenizer's."""
    ids = set(mc.eos_token_ids) | _generation_eos(path)
    if tokenizer is not None:
        eos = _tokenizer_eos(path, tokenizer)
        if eos is not None:
            ids.add(eos)
    return ids


def load_tokenizer(path: str):
    fn = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(fn):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(fn)


def _tokenizer_eos(path: str, tok) -> int | None:
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return tok.token_to_id(eos) if isinstance(eos, str) else None


def _generation_eos(path: str) -> set:
    try:
        with open(os.path.join(path, "generation_config.json")) as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError):
        return set()
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}
