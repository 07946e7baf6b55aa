"""A PEFT LoRA adapter read from disk (``adapter_config.json`` + ``adapter_model.safetensors``).

Supported: LoRA on the attention projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) and
the dense MLP (``gate_proj``, ``up_proj``, ``down_proj``), any rank up to ``--max-lora-rank``,
``lora_alpha`` and ``use_rslora`` scaling. The engine merges q/k/v and gate/up into one
projection; an adapter's parts land in that projection's slices (``TARGETS``). Anything else
(bias training, DoRA, ``modules_to_save``, embeddings, per-module rank or alpha patterns) is
refused with an error naming the field, never silently ignored.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

# PEFT module name -> (the engine's projection it is part of, index of the part).
TARGETS = {
    "q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1), "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


class LoraAdapterError(ValueError):
    """An adapter that cannot be served (bad path, unsupported config or weights)."""


@dataclass
class LoraAdapter:
    """One adapter's weights by engine projection: ``weights[(layer, proj)][part] = (A [r, in],
    B [out, r] * scaling)`` in float32 on the host; ``rank`` is the largest of its ranks."""

    name: str
    path: str
    rank: int
    weights: dict

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.weights.values()
                   for ab in parts.values() for t in ab)


def read_adapter_config(path: str) -> dict:
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise LoraAdapterError(f"lora path {path!r}: no adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraAdapterError(f"lora path {path!r}: peft_type={cfg.get('peft_type')!r}; only LORA is supported")
    for field, ok in (("bias", lambda v: v in (None, "none")), ("use_dora", lambda v: not v),
                      ("modules_to_save", lambda v: not v), ("rank_pattern", lambda v: not v),
                      ("alpha_pattern", lambda v: not v)):
        if not ok(cfg.get(field)):
            raise LoraAdapterError(f"lora path {path!r}: {field}={cfg.get(field)!r} is not supported")
    return cfg


def load_adapter(name: str, path: str, max_rank: int, num_layers: int) -> LoraAdapter:
    """Read and check an adapter; B is pre-multiplied by its scaling (alpha / r, or alpha / sqrt(r)
    with ``use_rslora``)."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(path)
    w_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(w_path):
        raise LoraAdapterError(f"lora path {path!r}: no adapter_model.safetensors")
    tensors = load_file(w_path)
    pairs: dict = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in TARGETS:
            raise LoraAdapterError(f"adapter {name!r}: weight {key!r} is not a LoRA weight of "
                                   f"{', '.join(TARGETS)}")
        layer = int(m.group(1))
        if layer >= num_layers:
            raise LoraAdapterError(f"adapter {name!r}: weight {key!r} names layer {layer}; the model has {num_layers}")
        pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = t.float()
    alpha = cfg.get("lora_alpha")
    weights: dict = {}
    rank = 0
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LoraAdapterError(f"adapter {name!r}: layer {layer} {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if b.shape[1] != r:
            raise LoraAdapterError(f"adapter {name!r}: layer {layer} {module}: lora_A has rank {r}, "
                                   f"lora_B {b.shape[1]}")
        if r > max_rank:
            raise LoraAdapterError(f"adapter {name!r}: rank {r} exceeds --max-lora-rank {max_rank}")
        scale_r = math.sqrt(r) if cfg.get("use_rslora") else r
        scaling = (alpha if alpha is not None else r) / scale_r
        proj, part = TARGETS[module]
        weights.setdefault((layer, proj), {})[part] = (a.contiguous(), (b * scaling).contiguous())
        rank = max(rank, r)
    if not weights:
        raise LoraAdapterError(f"adapter {name!r}: adapter_model.safetensors holds no LoRA weights")
    return LoraAdapter(name=name, path=path, rank=rank, weights=weights)
