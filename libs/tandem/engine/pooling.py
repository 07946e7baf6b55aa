"""Embedding pooling: how a sequence's hidden states become one vector.

Three methods, as sentence-transformers and SGLang name them:

* ``last``: the last token's final hidden state (Qwen3-Embedding, decoder-only embedders),
* ``mean``: the mean over every token's final hidden state,
* ``cls``: the first token's final hidden state.

Then Matryoshka truncation (OpenAI's ``dimensions``: the first D values) and, when the model
asks for it, L2 normalisation, in that order (as vLLM: a truncated vector is normalised again,
so it has unit norm like OpenAI's shortened embeddings).

The method and normalisation come from the checkpoint's sentence-transformers files when it
has them (``modules.json`` naming a ``Pooling`` module and its ``config.json``, a ``Normalize``
module), else last-token pooling with normalisation (what vLLM and SGLang do for a decoder-only
model). A module that would change the vector and is not implemented here (``Dense``, max or
weighted-mean pooling) is refused at start rather than silently skipped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POOLING_METHODS = ("last", "mean", "cls")

_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
# sentence-transformers' boolean keys in 1_Pooling/config.json, and the newer single key's values.
_ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_ST_MODE_NAMES = {"lasttoken": "last", "mean": "mean", "cls": "cls"}
_ST_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


@dataclass(frozen=True)
class PoolingConfig:
    """``method``: one of POOLING_METHODS; ``normalize``: L2-normalise the (truncated) vector;
    ``source``: where they came from (logs)."""

    method: str = "last"
    normalize: bool = True
    source: str = "default"

    def __post_init__(self) -> None:
        if self.method not in POOLING_METHODS:
            raise ValueError(f"pooling={self.method!r}: allowed are {', '.join(POOLING_METHODS)}")


def read_sentence_transformers(path: str) -> PoolingConfig | None:
    """The pooling a checkpoint's sentence-transformers files ask for; None when it has none.
    ValueError naming the file for a module or mode this engine does not implement."""
    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        return None
    with open(modules_file) as f:
        modules = json.load(f)
    method, normalize = None, False
    for m in modules:
        kind = m.get("type", "")
        if kind == _ST_TRANSFORMER:
            continue
        if kind == _ST_NORMALIZE:
            normalize = True
        elif kind == _ST_POOLING:
            method = _read_pooling_module(os.path.join(path, m.get("path", ""), "config.json"))
        else:
            raise ValueError(f"{modules_file}: module {m.get('path', '?')!r} ({kind}) is not supported "
                             "(tandem implements Transformer, Pooling and Normalize)")
    if method is None:
        raise ValueError(f"{modules_file}: no {_ST_POOLING} module (pass --pooling)")
    return PoolingConfig(method, normalize, "sentence-transformers")


def _read_pooling_module(config_file: str) -> str:
    with open(config_file) as f:
        cfg = json.load(f)
    if "pooling_mode" in cfg:  # sentence-transformers >= 5 may write the mode by name
        name = cfg["pooling_mode"]
        if name not in _ST_MODE_NAMES:
            raise ValueError(f"{config_file}: pooling_mode={name!r} is not supported "
                             f"(allowed: {', '.join(_ST_MODE_NAMES)}); pass --pooling")
        return _ST_MODE_NAMES[name]
    unsupported = [k for k in _ST_UNSUPPORTED if cfg.get(k)]
    chosen = [v for k, v in _ST_MODES.items() if cfg.get(k)]
    if unsupported or len(chosen) != 1:
        raise ValueError(f"{config_file}: exactly one of {', '.join(_ST_MODES)} must be true "
                         f"(found {', '.join(unsupported) or ', '.join(chosen) or 'none'}); pass --pooling")
    if cfg.get("include_prompt") is False:
        raise ValueError(f"{config_file}: include_prompt=false is not supported")
    return chosen[0]


def resolve_pooling(path: str, pooling: str | None = None, normalize: bool | None = None) -> PoolingConfig:
    """The checkpoint's pooling (sentence-transformers files, else the default), with the
    ``--pooling`` / ``--embedding-normalize`` overrides applied."""
    base = read_sentence_transformers(path) if pooling is None or normalize is None else None
    base = base or PoolingConfig()
    source = base.source if pooling is None and normalize is None else "flags"
    return PoolingConfig(pooling or base.method, base.normalize if normalize is None else normalize, source)


def pooled_rows(lens: list[int], method: str) -> list[int] | None:
    """Rows of the packed token batch (inputs one after another) that pooling reads: each
    input's last (``last``) or first (``cls``) token; None = every row (``mean``)."""
    if method == "mean":
        return None
    rows, start = [], 0
    for n in lens:
        rows.append(start + n - 1 if method == "last" else start)
        start += n
    return rows


def pool(hidden: torch.Tensor, lens: list[int], method: str) -> torch.Tensor:
    """[B, H] float32 vectors from ``hidden``: the rows ``pooled_rows`` named (``last``/``cls``,
    [B, H]) or every packed row (``mean``, [sum(lens), H])."""
    h = hidden.float()
    if method != "mean":
        return h
    seg = torch.repeat_interleave(torch.arange(len(lens), device=h.device),
                                  torch.tensor(lens, device=h.device))
    sums = torch.zeros(len(lens), h.shape[1], dtype=torch.float32, device=h.device).index_add_(0, seg, h)
    return sums / torch.tensor(lens, dtype=torch.float32, device=h.device)[:, None]


def finish(vectors: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """Matryoshka truncation to ``dimensions`` (None or 0 = keep all), then L2 normalisation."""
    if dimensions:
        vectors = vectors[:, :dimensions]
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors
