"""LoRA adapters served per request (``--enable-lora``): PEFT adapters read from disk
(``adapter``), kept in host memory and device slots (``manager``), applied beside each base
projection by segmented matmuls (``weights``, ``kernels``: Triton SGMV shrink/expand and their
torch references)."""
from .adapter import LoraAdapter, LoraAdapterError, load_adapter, read_adapter_config
from .manager import LoraExistsError, LoraInUseError, LoraManager, UnknownLoraError
from .setup import lora_manager, lora_weights
from .weights import LoraBatch, LoraDelta, LoraWeights, lora_batch

__all__ = ["LoraAdapter", "LoraAdapterError", "LoraBatch", "LoraDelta", "LoraExistsError", "LoraInUseError",
           "LoraManager", "LoraWeights",
           "UnknownLoraError", "load_adapter", "lora_batch", "lora_manager", "lora_weights", "read_adapter_config"]
