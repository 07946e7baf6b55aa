"""Model shapes the GPU benchmarks run without their weights (no model hub here).

Each shape is a Hugging Face ``config.json`` of a real model's architecture. A checkpoint
directory holding only that file runs with ``--load-format dummy`` (random weights created on
the device, nothing read or written); ``build_checkpoint`` writes a random-weight safetensors
checkpoint instead where one is wanted on disk (it fits for the dense shapes; the 30B MoE shape
does not fit the device's disk beside anything else).

``llama8b_32k`` is the long-context shape: Llama-3-8B with 32k positions and Llama-3.1's rope
scaling (``llama3``: factor 8, low/high frequency factors 1 and 4, original context 8192).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_MOE_COMMON = dict(vocab_size=151936, hidden_size=2048, max_position_embeddings=32768, rms_norm_eps=1e-6,
                   rope_theta=1000000.0, tie_word_embeddings=False, norm_topk_prob=False)

SHAPES = {
    "qwen05b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                    tie_word_embeddings=True),
    "llama8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                    tie_word_embeddings=False),
    "llama8b_32k": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=500000.0,
                        tie_word_embeddings=False,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Qwen3-Embedding-0.6B: the Qwen3 body without lm_head (embeddings: engine_bench.py --embedding)
    "qwen3-embedding-0.6b": dict(model_type="qwen3", vocab_size=151669, hidden_size=1024, intermediate_size=3072,
                                 num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                 tie_word_embeddings=True),
    # Qwen1.5-MoE-A2.7B: 60 routed experts, top-4, a gated shared expert (4 x 1408), 14.3B parameters
    "qwen2moe-a2.7b": dict(_MOE_COMMON, model_type="qwen2_moe", intermediate_size=5632, num_hidden_layers=24,
                           num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                           moe_intermediate_size=1408, shared_expert_intermediate_size=5632, decoder_sparse_step=1,
                           mlp_only_layers=[]),
    # Qwen3-30B-A3B: 128 routed experts, top-8, no shared expert, 48 layers, 30.5B parameters (~61 GB bf16)
    "qwen3moe-30b-a3b": dict(_MOE_COMMON, model_type="qwen3_moe", intermediate_size=6144, num_hidden_layers=48,
                             num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                             num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                             mlp_only_layers=[], norm_topk_prob=True),
}
# the keys that tell shapes apart in a config.json
_SIGNATURE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "num_experts", "max_position_embeddings")


def hf_config(shape: str):
    """The transformers config object of ``shape`` (EOS 2, no BOS, pad 0, as the demo tokenizer)."""
    from transformers import AutoConfig

    spec = dict(SHAPES[shape])
    return AutoConfig.for_model(spec.pop("model_type"), eos_token_id=2, bos_token_id=None, pad_token_id=0, **spec)


def write_config_dir(shape: str, out: str) -> str:
    """``out/config.json`` of ``shape`` only: a checkpoint for ``--load-format dummy``."""
    os.makedirs(out, exist_ok=True)
    cfg = hf_config(shape).to_dict()
    if "num_local_experts" in cfg and "num_experts" not in cfg:
        cfg["num_experts"] = cfg["num_local_experts"]  # the name real checkpoints use
    Path(out, "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def shape_of(model_path: str) -> str | None:
    """The name of the shape a checkpoint directory has (None: none of ours)."""
    cfg = json.loads(Path(model_path, "config.json").read_text())
    if "num_experts" not in cfg and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg["num_local_experts"]
    for name, spec in SHAPES.items():
        if all(cfg.get(k) == spec.get(k) for k in _SIGNATURE):
            return name
    return None


def build_checkpoint(shape: str, out: str, seed: int = 0, with_tokenizer: bool = True, repo: Path | None = None) -> str:
    """A random-weight bf16 safetensors checkpoint of ``shape`` (built on the GPU when there is one),
    with the demo tokenizer."""
    from transformers import AutoModelForCausalLM

    if os.path.isfile(os.path.join(out, "config.json")):
        print(f"{out}: exists")
        return out
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(out)
    if with_tokenizer:  # the benchmarks send token ids; a tokenizer only helps by-hand use
        from deploy.demo_models import build_all

        demo = build_all(str((repo or Path(__file__).resolve().parents[2]) / "models"))["tandem-demo-dense"]
        for name in ("tokenizer.json", "tokenizer_config.json"):
            Path(out, name).write_bytes(Path(demo, name).read_bytes())
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: built {shape}, {n / 1e6:.0f}M params (bf16)")
    return out
