"""``--enable-lora`` at engine start: the device buffers the model is built with, then the manager."""
from __future__ import annotations

from .adapter import read_adapter_config
from .manager import LoraManager
from .weights import LoraWeights


def lora_weights(cfg, dtype, device: str) -> LoraWeights | None:
    """The slot buffers for ``cfg`` (an EngineConfig), None without LoRA. ``--max-lora-rank``
    defaults to the largest rank of ``--lora-paths``."""
    if not cfg.lora_enabled:
        return None
    rank = cfg.max_lora_rank
    if rank is None:
        rank = max(int(read_adapter_config(path).get("r") or 0) for path in cfg.lora_path_map.values())
        if rank < 1:
            raise ValueError("max_lora_rank: could not read a rank 'r' from the adapter_config.json of lora_paths")
    return LoraWeights(cfg.max_loras_per_batch, rank, dtype, device, cfg.enable_deterministic_inference)


def lora_manager(cfg, weights: LoraWeights | None, num_layers: int) -> LoraManager | None:
    """The manager of a model built with ``weights``, holding ``--lora-paths``."""
    if weights is None:
        return None
    return LoraManager(weights, num_layers, cfg.max_loaded_loras or 1 << 30, cfg.lora_path_map)
