"""The engine's effective configuration: EngineConfig merged with keyword overrides, and the
defaults that depend on the device (split out of engine.py, code unchanged)."""
from __future__ import annotations

import os

import torch
from tandem.config.schemas import EngineConfig


def merge_config(model_path, config: EngineConfig | None, overrides: dict) -> EngineConfig:
    if config is not None:
        if overrides or model_path:
            data = config.model_dump()
            data.update(overrides)
            if model_path:
                data["model_path"] = model_path
            return EngineConfig(**data)
        return config
    # Services pass their whole config; keep only the engine's fields.
    fields = EngineConfig.model_fields
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise ValueError(f"unknown engine option(s) {unknown}; see tandem.config.EngineConfig")
    return EngineConfig(model_path=model_path, **overrides)


def resolve_device(requested: str) -> str:
    """``auto`` -> cuda when torch sees a GPU, else cpu; ``cuda`` without a GPU is an error."""
    device = requested
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    return device


def attention_backend(requested: str | None, device: str, deterministic: bool = False) -> str:
    """The backend to run: ``requested``, or the device's default (triton on CUDA, torch_native on CPU;
    ``deterministic``, --enable-deterministic-inference, runs on triton only)."""
    if requested is None:
        requested = "triton" if device.startswith("cuda") or deterministic else "torch_native"
    if requested == "triton" and not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        why = "enable_deterministic_inference (the triton backend)" if deterministic else "attention_backend='triton'"
        raise ValueError(f"{why} on CPU runs only through the Triton interpreter "
                         "(set TRITON_INTERPRET=1; slow, for tests); use torch_native on CPU")
    return requested


def default_chunked_prefill_size(device: str) -> int:
    if not device.startswith("cuda"):
        return 512
    gb = torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9
    return 2048 if gb < 35 else 4096 if gb < 60 else 8192
