"""tandem engine: HF checkpoints over a paged KV pool, radix prefix cache, continuous batching.

Public API (import these names from ``tandem.engine``, not from its modules)::

    from tandem.engine import LLM, SamplingParams          # offline use
    from tandem.engine import EngineCore                   # step() loop for services
"""
from tandem.sampling import SamplingError, SamplingParams, StructuredOutput

from .disaggregation import ExternalAllocation, HeldForMove
from .embedding import EmbeddingOutput
from .engine import EngineCore
from .kv_pool import AUX_SLOT_BYTES, KVPool, OutOfPages
from .llm import LLM, RequestOutput
from .lora import LoraAdapterError, LoraExistsError, LoraInUseError, UnknownLoraError
from .outputs import StepOutput
from .radix_cache import AllBlocksCleared, BlockRemoved, BlockStored, block_hash, lora_root_hash
from .request import Mode
from .stats import EngineStats

__all__ = [
    "LoraAdapterError", "LoraExistsError", "LoraInUseError", "UnknownLoraError", "lora_root_hash",
    "LLM", "SamplingParams", "StructuredOutput", "SamplingError", "RequestOutput", "EngineCore", "EngineStats",
    "StepOutput", "EmbeddingOutput", "ExternalAllocation", "HeldForMove", "KVPool", "AUX_SLOT_BYTES", "OutOfPages",
    "BlockStored", "BlockRemoved", "AllBlocksCleared", "block_hash", "Mode",
]
