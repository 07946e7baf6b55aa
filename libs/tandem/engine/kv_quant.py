"""FP8 KV cache (``--kv-cache-dtype fp8_e4m3|fp8_e5m2``): the pool's element type, the
per-layer K and V scales and where they come from, and the torch quantize / dequantize that
the torch_native backend runs and the Triton kernels are checked against.

A value is stored as ``fp8 = saturate(x / scale)`` (round to nearest even, clamped to the
format's largest finite value) and read back as ``fp8 * scale``: the scale is a
dequantization multiplier, as in vLLM's and SGLang's FP8 checkpoints. One scale per layer for
K and one for V. Where they come from, in this order:

1. ``--kv-cache-calibrate N`` (tandem's own flag): N prompts run at start through a scratch
   pool in the model dtype; scale = the power of two at or above 2 x the largest |K| (|V|)
   seen / the format's max. Values up to twice the calibrated range (or more) are stored
   unclipped, and FP8's relative precision is the same over its whole normal range, so the
   headroom costs nothing. A power of two divides exactly, and two workers that calibrate on
   different machines (last-bit differences in the largest value) still get the same scales,
   which PD requires.
2. The checkpoint's per-layer scales under the names vLLM and SGLang read
   (``CHECKPOINT_SCALE_SUFFIXES``).
3. 1.0 with a warning, as SGLang does.

FP8 tensors move as ``uint8`` views (``raw``): torch implements indexed writes and copies
for FP8 on some devices only; the bytes are the same.
"""
from __future__ import annotations

import glob
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

KV_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_DTYPES = tuple(KV_CACHE_DTYPES.values())
CALIBRATION_HEADROOM = 2.0
CALIBRATION_TOKENS = 512  # tokens per calibration prompt (fewer when the context is shorter)

# Per-layer scale names, after ``model.layers.{i}.self_attn.``: (K name, V name). The first two
# are vLLM's and SGLang's current names (llm-compressor), then NVIDIA ModelOpt's, then
# compressed-tensors' older output scales; ``kv_scale`` (one scale for both) is the deprecated form.
CHECKPOINT_SCALE_SUFFIXES = (
    ("k_scale", "v_scale"),
    ("k_proj.k_scale", "v_proj.v_scale"),
    ("k_proj.output_scale", "v_proj.output_scale"),
    ("kv_scale", "kv_scale"),
)
_SCALE_NAME = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(" + "|".join(
    re.escape(s) for pair in CHECKPOINT_SCALE_SUFFIXES for s in sorted(set(pair))) + r")$")


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's element type for ``--kv-cache-dtype``: ``auto`` keeps the model dtype."""
    if name == "auto":
        return model_dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={name!r}: allowed are auto, {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def raw(t: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor as the uint8 view of its bytes (other dtypes unchanged)."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def quantize(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """``saturate(x / scale)`` in ``dtype`` (float32 division, round to nearest even)."""
    m = fp8_max(dtype)
    return (x.float() / scale).clamp(-m, m).to(dtype)


def dequantize(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """``x * scale`` (in float32), in ``dtype``."""
    return (x.float() * scale).to(dtype)


def write_slots(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale) -> None:
    """Store ``x`` [T, heads, dim] at flat ``slots`` [T] of a pool ``[pages, page_size, heads, dim]``;
    quantized with ``scale`` when the pool is FP8, else cast."""
    heads, dim = x.shape[1], x.shape[2]
    if is_fp8(cache.dtype):
        cache.view(torch.uint8).view(-1, heads, dim)[slots] = raw(quantize(x, scale, cache.dtype))
    else:
        cache.view(-1, heads, dim)[slots] = x.to(cache.dtype)


def read_slots(cache: torch.Tensor, slots: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """The values at flat ``slots`` (any shape) of a pool, dequantized (FP8) or cast to ``dtype``."""
    heads, dim = cache.shape[2], cache.shape[3]
    if is_fp8(cache.dtype):
        return dequantize(cache.view(torch.uint8).view(-1, heads, dim)[slots].view(cache.dtype), scale, dtype)
    return cache.view(-1, heads, dim)[slots].to(dtype)


# ---- where the scales come from ---------------------------------------------------------------
@dataclass
class KvCacheSpec:
    """The pool's element type and its per-layer dequantization scales (empty unless FP8)."""

    dtype: torch.dtype
    k_scales: list = field(default_factory=list)
    v_scales: list = field(default_factory=list)
    source: str = "none"  # none | calibrated | checkpoint | default

    def __post_init__(self):
        for name in ("k_scales", "v_scales"):
            for i, s in enumerate(getattr(self, name)):
                if not (s > 0 and s < float("inf")):
                    raise ValueError(f"{name}[{i}]={s}: a KV scale must be a positive finite number")


def is_kv_scale_name(key: str) -> bool:
    """A checkpoint tensor holding a layer's KV-cache scale (not a weight of the model)."""
    return _SCALE_NAME.match(key) is not None


def checkpoint_kv_scales(path: str, num_layers: int) -> tuple[list, list] | None:
    """Per-layer (K, V) scales stored in the checkpoint, or None when it has none. A layer
    without its own scale keeps 1.0 (with a warning); a per-head scale becomes its largest value."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for fn in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(fn, framework="pt") as f:
            for key in f.keys():
                if is_kv_scale_name(key):
                    found[key] = f.get_tensor(key)
    if not found:
        return None
    scales: tuple[list, list] = ([], [])
    missing = []
    for i in range(num_layers):
        prefix = f"model.layers.{i}.self_attn."
        for which in (0, 1):
            key = next((prefix + pair[which] for pair in CHECKPOINT_SCALE_SUFFIXES if prefix + pair[which] in found),
                       None)
            if key is None:
                missing.append(f"{prefix}{('k', 'v')[which]}_scale")
                scales[which].append(1.0)
                continue
            value = float(found[key].float().max())
            if not (value > 0 and value < float("inf")):
                raise ValueError(f"model_path={path!r}: {key}={value}: a KV scale must be a positive finite number")
            scales[which].append(value)
    if missing:
        log.warning("the checkpoint has KV-cache scales but not %s%s: 1.0 used there", missing[0],
                    f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    return scales


def calibration_prompts(tokenizer, vocab_size: int, n: int, length: int, seed: int = 0) -> list[list]:
    """``n`` prompts of ``length`` tokens: the calibration passages rotated (prompt i starts at
    passage i), tokenized; seeded random token ids when the checkpoint has no tokenizer."""
    if tokenizer is None:
        rng = random.Random(seed)
        return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(n)]
    prompts = []
    for i in range(n):
        k = i % len(_PASSAGES)
        text = "\n\n".join(_PASSAGES[k:] + _PASSAGES[:k])
        ids = [t for t in tokenizer.encode(text).ids if t < vocab_size]
        while len(ids) < length:
            ids = ids + ids
        prompts.append(ids[:length])
    return prompts


@torch.inference_mode()
def calibrate_kv_scales(model, page_size: int, device: str, model_dtype: torch.dtype, kv_dtype: torch.dtype,
                        prompts: list[list]) -> tuple[list, list]:
    """Per-layer (K, V) scales from the largest |K| and |V| the model writes for ``prompts``,
    each prompt computed in one forward pass over a scratch pool in ``model_dtype``."""
    from tandem.sampling import SamplingParams

    from .kv_pool import KVPool
    from .model_runner import ModelRunner
    from .request import Request

    cfg = model.cfg
    longest = max(len(p) for p in prompts)
    pages = -(-longest // page_size)
    scratch = KVPool(cfg.num_layers, pages, page_size, cfg.num_kv_heads, cfg.head_dim, model_dtype, device,
                     num_aux_slots=1)
    runner = ModelRunner(model, scratch, device, penalty_rows=1)
    k_max = torch.zeros(cfg.num_layers, dtype=torch.float32, device=device)
    v_max = torch.zeros_like(k_max)
    for prompt in prompts:
        req = Request("kv-calibration", list(prompt), SamplingParams(max_tokens=1))
        req.pages = list(range(pages))
        runner.forward([(req, len(prompt))])
        n = len(prompt)
        for layer in range(cfg.num_layers):
            k = scratch.k_buffers[layer].view(-1, cfg.num_kv_heads, cfg.head_dim)[:n]
            v = scratch.v_buffers[layer].view(-1, cfg.num_kv_heads, cfg.head_dim)[:n]
            k_max[layer] = torch.maximum(k_max[layer], k.abs().max().float())
            v_max[layer] = torch.maximum(v_max[layer], v.abs().max().float())
    top = fp8_max(kv_dtype)

    def scales(amax: torch.Tensor) -> list:
        return [2.0 ** math.ceil(math.log2(CALIBRATION_HEADROOM * a / top)) if a > 0 else 1.0
                for a in amax.tolist()]

    return scales(k_max), scales(v_max)


def kv_cache_spec(cfg, model, model_dtype: torch.dtype, device: str, tokenizer) -> KvCacheSpec:
    """The KV pool's dtype and scales for engine config ``cfg`` (``kv_cache_dtype``,
    ``kv_cache_calibrate``) and the loaded ``model``."""
    dtype = kv_cache_dtype(cfg.kv_cache_dtype, model_dtype)
    if not is_fp8(dtype):
        if cfg.kv_cache_calibrate:
            raise ValueError(f"kv_cache_calibrate={cfg.kv_cache_calibrate}: needs --kv-cache-dtype fp8_e4m3 or "
                             "fp8_e5m2 (the bf16/float32 KV cache has no scales)")
        return KvCacheSpec(dtype)
    layers = model.cfg.num_layers
    if cfg.kv_cache_calibrate:
        length = min(CALIBRATION_TOKENS, cfg.context_length or model.cfg.max_position_embeddings)
        prompts = calibration_prompts(tokenizer, model.cfg.vocab_size, cfg.kv_cache_calibrate, length,
                                      cfg.random_seed)
        k, v = calibrate_kv_scales(model, cfg.page_size, device, model_dtype, dtype, prompts)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # the scratch pool's memory goes back before the real pool is sized
        log.info("KV cache %s: scales calibrated on %d prompts of %d tokens (K %.4g..%.4g, V %.4g..%.4g)",
                 cfg.kv_cache_dtype, len(prompts), length, min(k), max(k), min(v), max(v))
        return KvCacheSpec(dtype, k, v, "calibrated")
    found = checkpoint_kv_scales(cfg.model_path, layers)
    if found is not None:
        log.info("KV cache %s: per-layer scales read from the checkpoint", cfg.kv_cache_dtype)
        return KvCacheSpec(dtype, *found, "checkpoint")
    log.warning("KV cache %s: the checkpoint has no KV-cache scales; using scale 1.0 for K and V in every layer, "
                "which may cost accuracy (give a checkpoint with k_scale/v_scale, or --kv-cache-calibrate N)",
                cfg.kv_cache_dtype)
    return KvCacheSpec(dtype, [1.0] * layers, [1.0] * layers, "default")


# Calibration text: prose, code, numbers, dialogue and structured data, so the K and V ranges
# seen cover more than one kind of input.
_PASSAGES = [
    "The history of the printing press is a story of small improvements. Movable type existed long before "
    "Gutenberg, but his combination of an oil-based ink, a hand mould for casting letters and a screw press "
    "made books cheap enough that, within fifty years, millions of copies circulated across Europe.",
    "def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n        if a[i] <= "
    "b[j]:\n            out.append(a[i]); i += 1\n        else:\n            out.append(b[j]); j += 1\n    return "
    "out + a[i:] + b[j:]\n",
    "Quarterly revenue rose 12.4% to $3,218 million, while operating margin fell from 18.1% to 16.7%. The company "
    "repurchased 4.2 million shares at an average price of $87.35 and raised its full-year guidance to "
    "$12.9-13.1 billion.",
    "User: Can you explain why the sky is blue?\nAssistant: Sunlight contains every colour. Air molecules scatter "
    "short wavelengths much more strongly than long ones, so blue light reaches your eyes from every direction "
    "of the sky.\nUser: Then why are sunsets red?",
    '{"id": 4711, "name": "sensor-07", "readings": [21.5, 21.7, 22.0, 21.9], "unit": "celsius", '
    '"location": {"lat": 48.1374, "lon": 11.5755}, "active": true, "tags": ["lab", "north-wing"]}',
    "Les phénomènes naturels obéissent à des lois que la science cherche à décrire. Die Sprache der Mathematik "
    "erlaubt es, diese Gesetze genau zu formulieren. 数学是描述自然规律的语言。",
    "SELECT customer_id, COUNT(*) AS orders, SUM(total) AS revenue\nFROM orders\nWHERE created_at >= "
    "'2024-01-01'\nGROUP BY customer_id\nHAVING COUNT(*) > 3\nORDER BY revenue DESC\nLIMIT 20;",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune, or to take arms against a sea of troubles and by opposing end them.",
]
