"""Write an FP8 checkpoint from a bf16 / fp32 one, in the two Hugging Face layouts tandem loads.

* ``block``: DeepSeek-V3 / Qwen3-FP8 / transformers ``FineGrainedFP8Config``: every dense linear's
  ``weight`` in E4M3 with a float32 ``weight_scale_inv`` per 128 x 128 block (the multiplier),
  ``quantization_config = {quant_method: fp8, activation_scheme: dynamic, fmt: e4m3,
  weight_block_size: [128, 128]}``;
* ``per_tensor``: AutoFP8 / vLLM ``fp8``: ``weight`` in E4M3 with a scalar float32
  ``weight_scale`` (and, with ``--input-scale``, a static scalar ``input_scale`` for every linear:
  ``activation_scheme: static``), ``ignored_layers`` listing what stays bf16.

Embeddings, norms and ``lm_head`` are copied unchanged, and so are the linears named by
``--skip`` (listed in ``modules_to_not_convert``). The tensors are quantized one at a time, on
the GPU when there is one, with the rules of ``tandem.engine.quantization.fp8``; output files
of at most ~4 GB with a ``model.safetensors.index.json``; tokenizer files copied.

    python -m benchmarks.common.fp8_checkpoint /tmp/llama8b /tmp/llama8b-fp8-block --layout block
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "libs"))

from tandem.engine.quantization.fp8 import inverse_scale_of, quantize_blocks, scale_of, to_fp8  # noqa: E402

LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
SHARD_BYTES = 4 << 30


def quantize_tensor(w: torch.Tensor, layout: str, block=(128, 128)) -> dict[str, torch.Tensor]:
    """{suffix: tensor} of one linear weight in ``layout``: ``weight`` and its scale."""
    if layout == "block":
        q, s = quantize_blocks(w, block)
        return {"weight": q, "weight_scale_inv": s}
    amax = w.abs().amax()
    return {"weight": to_fp8(w, inverse_scale_of(amax)), "weight_scale": scale_of(amax).reshape(())}


def write_fp8_checkpoint(src: str, out: str, layout: str, block=(128, 128), skip=(), input_scale: float | None = None,
                         device: str | None = None, log=print) -> str:
    if layout not in ("block", "per_tensor"):
        raise ValueError(f"layout={layout!r}: block or per_tensor")
    if input_scale is not None and layout != "per_tensor":
        raise ValueError("input_scale (static activations) goes with the per_tensor layout")
    if os.path.isfile(os.path.join(out, "config.json")):
        log(f"{out}: exists")
        return out
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(out, exist_ok=True)
    cfg = json.loads(Path(src, "config.json").read_text())
    qc = {"quant_method": "fp8", "activation_scheme": "static" if input_scale is not None else "dynamic"}
    if layout == "block":
        qc.update(fmt="e4m3", weight_block_size=list(block))
        if skip:
            qc["modules_to_not_convert"] = list(skip)
    else:
        qc["ignored_layers"] = ["lm_head", *skip]
    cfg["quantization_config"] = qc
    shard, shard_bytes, index, n_files, quantized = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n_files
        if shard:
            n_files += 1
            name = f"model-{n_files:05d}.safetensors"
            save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for fn in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        with safe_open(fn, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                module = key[: -len(".weight")]
                if LINEAR.match(key) and module not in skip:
                    parts = quantize_tensor(t.to(device), layout, block)
                    if input_scale is not None:
                        parts["input_scale"] = torch.tensor(float(input_scale))
                    tensors = {f"{module}.{k}": v.cpu().contiguous() for k, v in parts.items()}
                    quantized += 1
                else:
                    tensors = {key: t}
                for k, v in tensors.items():
                    shard[k] = v
                    shard_bytes += v.numel() * v.element_size()
                if shard_bytes >= SHARD_BYTES:
                    flush()
    flush()
    if not quantized:
        raise ValueError(f"{src}: no dense linear weight found to quantize")
    total = sum(os.path.getsize(os.path.join(out, n)) for n in set(index.values()))
    Path(out, "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=1))
    Path(out, "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))
    log(f"{out}: {layout} FP8 checkpoint, {quantized} linears quantized, {total / 1e9:.2f} GB")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="bf16 / fp32 Hugging Face checkpoint directory")
    ap.add_argument("out", help="output directory (left alone if it already holds a config.json)")
    ap.add_argument("--layout", choices=["block", "per_tensor"], required=True)
    ap.add_argument("--block", type=int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"))
    ap.add_argument("--skip", nargs="*", default=[], help="linears kept unquantized, e.g. model.layers.0.mlp.down_proj")
    ap.add_argument("--input-scale", type=float, default=None,
                    help="per_tensor: a static input_scale for every linear (activation_scheme static)")
    ap.add_argument("--device", default=None, help="where to quantize (default: cuda if available)")
    a = ap.parse_args(argv)
    write_fp8_checkpoint(a.src, a.out, a.layout, tuple(a.block), a.skip, a.input_scale, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
