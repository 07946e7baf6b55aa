"""tandem engine: HF checkpoints over a paged KV pool, radix prefix cache, continuous batching.

Public API::

    from tandem.engine import LLM, SamplingParams          # offline use
    from tandem.engine import EngineCore                   # step() loop for services
"""
from .engine import EngineCore, EngineStats, ExternalAllocation, PrefillResult, StepOutput
from .kv_pool import AUX_SLOT_BYTES, KVPool, OutOfPages
from .llm import LLM, RequestOutput
from .radix_cache import AllBlocksCleared, BlockRemoved, BlockStored, block_hash
from .request import Mode
from .sampling_params import SamplingParams

__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "EngineCore", "EngineStats", "StepOutput", "PrefillResult",
    "ExternalAllocation", "KVPool", "AUX_SLOT_BYTES", "OutOfPages",
    "BlockStored", "BlockRemoved", "AllBlocksCleared", "block_hash", "Mode",
]
