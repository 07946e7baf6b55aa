"""Helpers shared by the engine benchmarks (engine_bench.py, engine_prefill.py): checkpoint
shapes and random-weight builds, device sync and timing, HBM read bandwidth."""
from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common.results import REPO

SHAPES = {
    "qwen05b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    "llama8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                    tie_word_embeddings=False),
}


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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def read_bandwidth(device: str) -> float | None:
    """HBM read bytes/s: a sum over a 4 GiB buffer, best of 5 after a warm-up."""
    if not device.startswith("cuda"):
        return None
    buf = torch.ones(2 << 30, dtype=torch.bfloat16, device=device)
    buf.sum()
    sync(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        buf.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    nbytes = buf.numel() * buf.element_size()
    del buf
    torch.cuda.empty_cache()
    return nbytes / best


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def release_memory(cuda: bool) -> None:
    """Give the memory of a model just deleted back before the next one loads."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def shape_of(model_path: str) -> str | None:
    cfg = json.loads(Path(model_path, "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads")
    for name, spec in SHAPES.items():
        if all(cfg.get(k) == spec[k] for k in keys):
            return name
    return None
