"""How many KV pages the pool gets: --max-total-tokens, or a fraction of free GPU memory, or
of available host memory (capped) on CPU (split out of engine.py, code unchanged)."""
from __future__ import annotations

import torch
from tandem.config.schemas import EngineConfig

from .model_config import ModelConfig

CPU_KV_BYTES_CAP = 512 << 20


def kv_pool_pages(cfg: EngineConfig, mc: ModelConfig, dtype: torch.dtype, device: str,
                  kv_heads: int | None = None) -> int:
    """Pages of ``cfg.page_size`` tokens for the KV pool of model ``mc`` on ``device`` whose elements are
    ``dtype`` (the KV cache dtype: an FP8 pool holds twice the tokens of a bf16 one in the same bytes).
    ``kv_heads``: the heads this rank's pool holds (TP; default all of the model's)."""
    page_size = cfg.page_size
    kv_heads = mc.num_kv_heads if kv_heads is None else kv_heads
    bytes_per_token = 2 * mc.num_layers * kv_heads * mc.head_dim * dtype.itemsize
    if cfg.max_total_tokens:
        total_tokens = cfg.max_total_tokens
    elif device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        budget = total * cfg.mem_fraction_static - (total - free)
        if budget <= 0:
            raise ValueError(f"mem_fraction_static={cfg.mem_fraction_static}: no memory left for the KV pool")
        total_tokens = int(budget // bytes_per_token)
    else:
        total_tokens = int(min(cfg.mem_fraction_static * _host_available_bytes(), CPU_KV_BYTES_CAP)
                           // bytes_per_token)
    return max(1, total_tokens // page_size)


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
