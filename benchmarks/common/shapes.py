"""Model shapes the GPU benchmarks build as random-weight checkpoints (no model hub here), and
the builder: ``python benchmarks/engine_bench.py --build SHAPE DIR``.

``llama8b_32k`` is the long-context shape: Llama-3-8B with 32k positions and Llama-3.1's rope
scaling (``llama3``: factor 8, low/high frequency factors 1 and 4, original context 8192).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

_LLAMA8B = dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=False)
SHAPES = {
    "qwen05b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    "llama8b": _LLAMA8B,
    "llama8b_32k": {**_LLAMA8B, "max_position_embeddings": 32768,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}
# What tells the shapes apart in a checkpoint's config.json.
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings")


def build_checkpoint(shape: str, out: str, seed: int = 0, with_tokenizer: bool = True) -> str:
    """A random-weight bf16 checkpoint of a known shape (no model hub here), with the demo tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from deploy.demo_models import build_all

    if os.path.isfile(os.path.join(out, "config.json")):
        print(f"{out}: exists")
        return out
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    cfg = (Qwen2Config if arch == "qwen2" else LlamaConfig)(eos_token_id=2, bos_token_id=None, pad_token_id=0, **spec)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    if with_tokenizer:  # the benchmark itself sends token ids; a tokenizer only helps by-hand use
        demo = build_all(str(REPO / "models"))["tandem-demo-dense"]
        for name in ("tokenizer.json", "tokenizer_config.json"):
            Path(out, name).write_bytes(Path(demo, name).read_bytes())
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: built {shape}, {n / 1e6:.0f}M params (bf16)")
    return out


def shape_of(model_path: str) -> str | None:
    """The name of the shape ``model_path`` was built with, or None."""
    cfg = json.loads(Path(model_path, "config.json").read_text())
    for name, spec in SHAPES.items():
        if all(cfg.get(k) == spec[k] for k in _SHAPE_KEYS):
            return name
    return None
