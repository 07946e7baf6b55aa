"""Which FP8 format a model is loaded in: from ``--quantization`` and ``config.json``.

Hugging Face FP8 checkpoints carry a ``quantization_config`` with ``quant_method: "fp8"``:

* **block-scaled** (DeepSeek-V3, Qwen3-FP8, transformers' ``FineGrainedFP8Config``):
  ``weight_block_size: [128, 128]``; each quantized linear has an E4M3 ``weight`` and a float32
  ``weight_scale_inv`` of ``[ceil(N / 128), ceil(K / 128)]``, the dequantisation *multiplier*
  (``W ~= weight * weight_scale_inv``, despite the name); activations are quantized per token and
  per 128-column group at run time.
* **per-tensor** (AutoFP8 / vLLM ``fp8``): an E4M3 ``weight``, a float32 ``weight_scale``
  (multiplier; ``weight_scale_inv`` in transformers' per-tensor form) and, with
  ``activation_scheme: "static"``, an ``input_scale`` (``activation_scale`` in transformers).

``modules_to_not_convert`` (``ignored_layers`` in AutoFP8) names linears kept in bf16: they carry
a bf16 ``weight`` in the checkpoint, which is what the loader goes by (the list is checked
against it). A bf16/fp32 checkpoint with ``--quantization fp8`` is quantized at load time:
per-channel weight scales, dynamic per-token activation scales (``online``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

FP8_METHODS = ("fp8",)
MOE_NOT_SUPPORTED = "FP8 MoE experts are not supported yet"


@dataclass(frozen=True)
class Fp8Config:
    """How the FP8 linears of one model are stored in its checkpoint."""

    layout: str  # "online" (bf16 checkpoint, quantized at load) | "block" | "per_tensor"
    activation_scheme: str = "dynamic"  # dynamic | static (per-tensor checkpoints with input_scale)
    weight_block_size: tuple[int, int] | None = None  # (rows, columns) of a weight block; layout "block"
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)
    gemm_backend: str = "auto"  # --fp8-gemm-backend

    @property
    def from_checkpoint(self) -> bool:
        return self.layout != "online"


def resolve_fp8_config(quantization: str | None, hf_config: dict, is_moe: bool,
                       gemm_backend: str = "auto") -> Fp8Config | None:
    """The FP8 format to load, or None for an unquantized model. ValueError naming the field for
    anything not supported: another ``quant_method``, a bad block size, FP8 with MoE experts."""
    qc = hf_config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ValueError(f"config.json quantization_config={qc!r}: must be an object")
    method = (qc or {}).get("quant_method")
    if qc is not None and method not in FP8_METHODS:
        raise ValueError(f"config.json quantization_config.quant_method={method!r}: not supported "
                         f"(supported: {', '.join(FP8_METHODS)})")
    if quantization not in (None, "fp8"):
        raise ValueError(f"quantization={quantization!r}: allowed are fp8 or none")
    if qc is None and quantization is None:
        return None
    if is_moe:
        raise ValueError(f"{MOE_NOT_SUPPORTED} (quantization=fp8"
                         f"{' from config.json' if qc is not None else ''} on a MoE checkpoint)")
    if qc is None:
        return Fp8Config(layout="online", gemm_backend=gemm_backend)
    scheme = str(qc.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"config.json quantization_config.activation_scheme={scheme!r}: allowed are dynamic, static")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"config.json quantization_config.fmt={fmt!r}: only e4m3 FP8 weights are supported")
    if qc.get("scale_fmt", "float") != "float":
        raise ValueError(f"config.json quantization_config.scale_fmt={qc.get('scale_fmt')!r}: only float32 scales "
                         "are supported")
    skip = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"config.json quantization_config.modules_to_not_convert={skip!r}: must be a list of "
                         "module names")
    block = qc.get("weight_block_size")
    if block is None:
        return Fp8Config(layout="per_tensor", activation_scheme=scheme, modules_to_not_convert=tuple(skip),
                         gemm_backend=gemm_backend)
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b >= 16 and b & (b - 1) == 0 for b in block)):
        raise ValueError(f"config.json quantization_config.weight_block_size={block!r}: must be two powers of two "
                         ">= 16, e.g. [128, 128]")
    if scheme != "dynamic":
        raise ValueError("config.json quantization_config: block-scaled weights (weight_block_size) need "
                         f"activation_scheme dynamic, not {scheme!r}")
    if gemm_backend == "scaled_mm":
        raise ValueError("fp8_gemm_backend='scaled_mm': block-scaled FP8 (weight_block_size) runs on the Triton "
                         "kernels; use auto or triton")
    return Fp8Config(layout="block", weight_block_size=(block[0], block[1]), modules_to_not_convert=tuple(skip),
                     gemm_backend=gemm_backend)


def is_skipped(name: str, patterns) -> bool:
    """Whether module ``name`` (checkpoint naming, e.g. ``model.layers.0.mlp.down_proj``) matches one of
    ``modules_to_not_convert``, as transformers matches them: a prefix ending at a module boundary,
    a regular expression with the same boundary, or a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in patterns:
        try:
            if re.match(rf"(?:{key}){boundary}", name):
                return True
        except re.error:
            pass
        if name.endswith(key):
            return True
    return False
