"""FP8 weights for the dense linear layers (``--quantization fp8``, FP8 checkpoints).

``config``: which format a checkpoint is in; ``fp8``: the quantization rules in torch (the
reference and the CPU path); ``linear``: ``Fp8Linear`` and the model's linear factory;
``loading``: checkpoint tensors -> ``Fp8Linear`` parameters; ``gemm``: which kernel runs a layer
(``torch._scaled_mm`` or the Triton kernels of ``tandem.engine.kernels.fp8_gemm``, measured).
Importing this package does not import triton: the kernels load when a layer first runs on them.
"""
from .config import MOE_NOT_SUPPORTED, Fp8Config, resolve_fp8_config
from .gemm import Fp8Gemm
from .linear import Fp8Linear, Fp8LinearFactory, Fp8LinearSpec
from .loading import dequantize_unplanned, plan_fp8_linears, prepare_fp8_state

__all__ = ["MOE_NOT_SUPPORTED", "Fp8Config", "Fp8Gemm", "Fp8Linear", "Fp8LinearFactory", "Fp8LinearSpec",
           "dequantize_unplanned", "plan_fp8_linears", "prepare_fp8_state", "resolve_fp8_config"]
