"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) into ``CausalLM``."""
from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open

from .kv_quant import is_kv_scale_name
from .model import CausalLM, MoE, Rotary
from .model_config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed are auto, float32, bfloat16, float16")
    return DTYPES[dtype]


def _read_tensors(path: str) -> dict:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"model_path={path!r}: missing weights (no *.safetensors files)")
    tensors = {}
    for fn in files:
        with safe_open(fn, framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    return tensors


def _layer_flags(cfg: ModelConfig, t: dict) -> list[dict]:
    flags = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        flags.append(
            {
                "qkv_bias": p + "self_attn.q_proj.bias" in t,
                "qk_norm": p + "self_attn.q_norm.weight" in t,
                "moe": p + "mlp.gate.weight" in t,
                "shared_gate": p + "mlp.shared_expert_gate.weight" in t,
                "score_bias": p + "mlp.gate.e_score_correction_bias" in t,
            }
        )
    return flags


def _expert_weights(t: dict, p: str, E: int):
    """Stack per-expert tensors (or take already-fused ones) into (w13 [E,2I,H], w2 [E,H,I])."""
    if p + "mlp.experts.gate_up_proj" in t:  # transformers-5 fused layout
        return t.pop(p + "mlp.experts.gate_up_proj"), t.pop(p + "mlp.experts.down_proj")
    w13, w2 = [], []
    for e in range(E):
        q = f"{p}mlp.experts.{e}."
        try:
            g, u, d = t.pop(q + "gate_proj.weight"), t.pop(q + "up_proj.weight"), t.pop(q + "down_proj.weight")
        except KeyError as exc:
            raise ValueError(f"missing weights: {exc.args[0]}") from None
        w13.append(torch.cat([g, u], dim=0))
        w2.append(d)
    return torch.stack(w13), torch.stack(w2)


def _merge_projections(state: dict) -> None:
    """q/k/v -> qkv_proj and gate/up -> gate_up_proj (rows stacked in that order), in place."""
    merges = (("self_attn.", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
              ("", ("gate_proj", "up_proj"), "gate_up_proj"))
    for key in [k for k in state if k.endswith(".weight") or k.endswith(".bias")]:
        for scope, parts, merged in merges:
            head, _, kind = key.rpartition(".")
            prefix = head[: -len(parts[0])] if head.endswith(scope + parts[0]) else None
            if prefix is None or (scope and not prefix.endswith(scope)):
                continue
            names = [f"{prefix}{p}.{kind}" for p in parts]
            missing = [n for n in names if n not in state]
            if missing:
                raise ValueError(f"missing weights {missing}")
            state[f"{prefix}{merged}.{kind}"] = torch.cat([state.pop(n) for n in names], dim=0)


def load_model(path: str, dtype: torch.dtype, device: str) -> tuple[CausalLM, ModelConfig]:
    cfg = ModelConfig.from_dir(path)
    t = _read_tensors(path)
    tie = "lm_head.weight" not in t
    with torch.device("meta"):  # no memory and no random init: every parameter comes from the checkpoint
        model = CausalLM(cfg, _layer_flags(cfg, t), tie_embeddings=tie)
    state = {}
    for i, layer in enumerate(model.layers):
        p, d = f"model.layers.{i}.", f"layers.{i}."
        if isinstance(layer.mlp, MoE):
            state[d + "mlp.w13"], state[d + "mlp.w2"] = _expert_weights(t, p, cfg.num_experts)
            state[d + "mlp.gate_weight"] = t.pop(p + "mlp.gate.weight")
            if layer.mlp.score_bias is not None:
                state[d + "mlp.score_bias"] = t.pop(p + "mlp.gate.e_score_correction_bias")
            for src, dst in (("shared_expert.", "shared."), ("shared_experts.", "shared.")):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    key = f"{p}mlp.{src}{name}.weight"
                    if key in t:
                        state[f"{d}mlp.{dst}{name}.weight"] = t.pop(key)
            if layer.mlp.shared_gate is not None:
                state[d + "mlp.shared_gate.weight"] = t.pop(p + "mlp.shared_expert_gate.weight")
    for k in list(t):
        if is_kv_scale_name(k):  # FP8 KV-cache scales: read by kv_quant for --kv-cache-dtype fp8_*
            del t[k]
        elif k.startswith("model."):
            state[k[len("model."):]] = t.pop(k)
        elif k == "lm_head.weight":
            state[k] = t.pop(k)
    _merge_projections(state)
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"model_path={path!r}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"model_path={path!r}: unexpected weights {unexpected[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in the checkpoint: make them real before the move.
    model.rotary = Rotary(cfg)
    for m in model.moe_layers():
        m.physical_to_logical = torch.arange(m.num_experts)
    model.to(device=device, dtype=dtype)
    for m in model.moe_layers():  # routing stays float32, as in transformers
        m.gate_weight.data = m.gate_weight.data.float()
        if m.score_bias is not None:
            m.score_bias.data = m.score_bias.data.float()
    model.rotary = Rotary(cfg).to(device)  # rebuilt after the cast: inv_freq stays float32
    model.eval()
    return model, cfg
