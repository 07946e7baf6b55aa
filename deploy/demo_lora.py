"""Demo LoRA adapters for a demo checkpoint, in PEFT's on-disk format, built offline.

``adapter_config.json`` + ``adapter_model.safetensors`` exactly as ``peft`` saves a LoRA adapter
(keys ``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight``), with
random A *and* B from a fixed seed: PEFT's default initialisation sets B to zero, which would make
an adapter a no-op (``init_lora_weights=False`` in peft does what this does). Used by tests and by
``make deploy-local``; ``merge_into`` gives the merged weights ``W + B @ A * scaling`` of the
plain reference.

    python -m deploy.demo_lora models/tandem-demo-dense models/tandem-demo-lora-a --rank 8 --seed 1
"""
from __future__ import annotations

import argparse
import json
import os

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
DEMO_ADAPTERS = {  # name -> (rank, targets, seed) built next to the demo dense model
    "tandem-demo-lora-a": (8, ATTN + MLP, 1),
    "tandem-demo-lora-b": (4, ("q_proj", "v_proj"), 2),
}


def _shapes(cfg: dict) -> dict:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    q, kv, inter = heads * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"]
    return {"q_proj": ("self_attn", h, q), "k_proj": ("self_attn", h, kv), "v_proj": ("self_attn", h, kv),
            "o_proj": ("self_attn", q, h), "gate_proj": ("mlp", h, inter), "up_proj": ("mlp", h, inter),
            "down_proj": ("mlp", inter, h)}


def build_adapter(model_dir: str, out_dir: str, rank: int, targets=ATTN + MLP, seed: int = 0,
                  alpha: float | None = None, std_b: float = 0.3) -> str:
    """Write a random LoRA adapter for the checkpoint in ``model_dir`` to ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    shapes = _shapes(cfg)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for m in targets:
            scope, n_in, n_out = shapes[m]
            p = f"base_model.model.model.layers.{i}.{scope}.{m}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            tensors[f"{p}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * std_b
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha or 2 * rank,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": False,
              "base_model_name_or_path": os.path.abspath(model_dir)}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def merge_into(state: dict, adapter_dir: str) -> dict:
    """``state`` (a transformers model's state dict) with the adapter merged: W += B @ A * scaling."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    t = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    out = dict(state)
    for key in t:
        if not key.endswith("lora_A.weight"):
            continue
        base = key[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
        a, b = t[key].double(), t[key.replace("lora_A", "lora_B")].double()
        scaling = cfg["lora_alpha"] / (a.shape[0] ** 0.5 if cfg.get("use_rslora") else a.shape[0])
        out[base] = (state[base].double() + b @ a * scaling).to(state[base].dtype)
    return out


def build_demo_adapters(model_dir: str, root: str) -> dict:
    """The DEMO_ADAPTERS for the dense demo model under ``root``: {name: path}."""
    return {name: build_adapter(model_dir, os.path.join(root, name), r, targets, seed)
            for name, (r, targets, seed) in DEMO_ADAPTERS.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default=",".join(ATTN + MLP), help="comma-separated PEFT module names")
    a = ap.parse_args(argv)
    print(build_adapter(a.model_dir, a.out_dir, a.rank, tuple(a.targets.split(",")), a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
