"""Load-time FP8: which linears are FP8 (``plan_fp8_linears``, from the checkpoint's tensors before
the model is built) and the checkpoint's tensors turned into ``Fp8Linear``'s two forms
(``prepare_fp8_state``, before the loader merges q/k/v and gate/up).

A linear is FP8 when its checkpoint ``weight`` is E4M3 (``modules_to_not_convert`` must agree);
with ``--quantization fp8`` on a bf16 checkpoint every dense linear is (quantized here, on the
target device: per-channel scales). Merged projections take their shards' scales:

* block-scaled: the shards' ``[ceil(n_i / bn), Kb]`` scales stacked (each shard starts a block
  when every shard but the last has a multiple of bn rows; otherwise each scale row is repeated
  per weight row and the layer's ``group_n`` is 1);
* per-tensor: each shard's scalar repeated over its rows (per channel; no requantization); a
  static ``input_scale`` is the largest of the shards' (they quantize the same input).

FP8 weights of other modules (an FP8 ``lm_head``) are dequantized to ``--dtype``: only the dense
linears run in FP8.
"""
from __future__ import annotations

import logging

import torch

from .config import Fp8Config, is_skipped
from .fp8 import FP8_DTYPE, dequantize, quantize_rows
from .linear import Fp8LinearSpec

log = logging.getLogger(__name__)

# (scope, merged module, checkpoint shards) of each decoder layer's dense linears.
DENSE_LINEARS = (("self_attn.", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                 ("self_attn.", "o_proj", ("o_proj",)),
                 ("mlp.", "gate_up_proj", ("gate_proj", "up_proj")),
                 ("mlp.", "down_proj", ("down_proj",)))
WEIGHT_SCALE_KEYS = ("weight_scale_inv", "weight_scale")  # both the dequantisation multiplier
INPUT_SCALE_KEYS = ("input_scale", "activation_scale")
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale")


def _dense_linears(num_layers: int):
    """(model module name, [shard names without the checkpoint's ``model.`` prefix])."""
    for i in range(num_layers):
        for scope, merged, parts in DENSE_LINEARS:
            yield f"layers.{i}.{scope}{merged}", [f"layers.{i}.{scope}{p}" for p in parts]


def plan_fp8_linears(fp8: Fp8Config, tensors: dict, num_layers: int) -> dict[str, Fp8LinearSpec]:
    """Module name -> its FP8 form, for every dense linear that is FP8. ``tensors``: the checkpoint's."""
    plan = {}
    for name, shards in _dense_linears(num_layers):
        weights = [tensors.get(f"model.{s}.weight") for s in shards]
        if any(w is None for w in weights):
            continue  # the loader names the missing weights
        is_fp8 = [w.dtype == FP8_DTYPE for w in weights]
        if fp8.layout == "online":
            if any(is_fp8):
                raise ValueError(f"model.{shards[0]}.weight is FP8 but config.json has no quantization_config "
                                 "(quant_method fp8): the checkpoint's scales cannot be read")
            plan[name] = Fp8LinearSpec()
            continue
        if not any(is_fp8):
            continue
        if not all(is_fp8):
            raise ValueError(f"model.{name}: the merged shards {[f'model.{s}' for s in shards]} mix FP8 and "
                             "unquantized weights; every shard of a merged projection must have the same precision")
        skipped = [f"model.{s}" for s in shards if is_skipped(f"model.{s}", fp8.modules_to_not_convert)]
        if skipped:
            raise ValueError(f"{skipped[0]} is listed in quantization_config.modules_to_not_convert but its weight "
                             "is stored in FP8")
        if fp8.layout == "block":
            bn, bk = fp8.weight_block_size
            aligned = all(w.shape[0] % bn == 0 for w in weights[:-1])
            plan[name] = Fp8LinearSpec(group_n=bn if aligned else 1, group_k=bk)
        else:
            plan[name] = Fp8LinearSpec(static_input=fp8.activation_scheme == "static")
    if fp8.from_checkpoint and not plan:
        raise ValueError("config.json quantization_config.quant_method is fp8 but no dense linear weight is stored "
                         "in FP8 (float8_e4m3fn)")
    return plan


def _pop_first(state: dict, prefix: str, keys: tuple, required: bool) -> torch.Tensor | None:
    for k in keys:
        if prefix + k in state:
            t = state.pop(prefix + k)
            for other in keys:  # a checkpoint carrying both names: the first one read wins, the other goes
                state.pop(prefix + other, None)
            return t
    if required:
        raise ValueError(f"missing weights: {prefix}{keys[0]} (or {prefix}{keys[1]}) of FP8 weight {prefix}weight")
    return None


def prepare_fp8_state(state: dict, plan: dict[str, Fp8LinearSpec], fp8: Fp8Config, num_layers: int, device: str,
                      dtype: torch.dtype) -> None:
    """In place: each planned module's shards -> ``weight`` (E4M3), ``weight_scale`` (float32) and, for
    static activations, ``input_scale``, under the merged module's name; KV-cache scales dropped
    (the KV cache stays in ``dtype``). ``state``: the loader's, names without ``model.``."""
    shard_names = dict(_dense_linears(num_layers))
    for name, spec in plan.items():
        shards = shard_names[name]
        weights = [state.pop(s + ".weight") for s in shards]
        rows = [w.shape[0] for w in weights]
        K = weights[0].shape[1]
        if fp8.layout == "online":
            q, s = quantize_rows(torch.cat(weights).to(device))
            state[name + ".weight"], state[name + ".weight_scale"] = q, s[:, 0].contiguous()
            continue
        scales = [_pop_first(state, s + ".", WEIGHT_SCALE_KEYS, required=True).float() for s in shards]
        if fp8.layout == "block":
            bn, bk = fp8.weight_block_size
            for s, n, sc in zip(shards, rows, scales):
                want = (-(-n // bn), -(-K // bk))
                if tuple(sc.shape) != want:
                    raise ValueError(f"model.{s}.weight_scale_inv has shape {list(sc.shape)}; a [{n}, {K}] weight in "
                                     f"{bn}x{bk} blocks needs {list(want)}")
            if spec.group_n == 1:
                scales = [sc.repeat_interleave(bn, dim=0)[:n] for sc, n in zip(scales, rows)]
            scale = torch.cat(scales)
        else:
            for s, sc in zip(shards, scales):
                if sc.numel() != 1:
                    raise ValueError(f"model.{s}.weight_scale has shape {list(sc.shape)}: a per-tensor checkpoint "
                                     "(no weight_block_size) has one scale per weight")
            scale = torch.cat([sc.reshape(1).expand(n) for sc, n in zip(scales, rows)])
            inputs = [_pop_first(state, s + ".", INPUT_SCALE_KEYS, required=spec.static_input) for s in shards]
            if spec.static_input:
                state[name + ".input_scale"] = torch.stack([t.float().reshape(()) for t in inputs]).max()
        state[name + ".weight"] = torch.cat(weights)
        state[name + ".weight_scale"] = scale.contiguous()
    dropped = [k for k in state if k.endswith(KV_SCALE_SUFFIXES)]
    for k in dropped:
        del state[k]
    if dropped:
        log.warning("ignoring %d KV-cache scales of the checkpoint (e.g. %s): the KV cache stays in %s",
                    len(dropped), dropped[0], dtype)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()  # online quantization's temporaries: give them back before the KV pool is sized


def dequantize_unplanned(tensors: dict, plan: dict[str, Fp8LinearSpec], fp8: Fp8Config, num_layers: int,
                         dtype: torch.dtype) -> None:
    """In place, on the checkpoint's tensors: FP8 weights of modules that do not run in FP8 (an FP8
    ``lm_head``, embeddings, ...) dequantized to ``dtype``, their scales dropped."""
    planned = {f"model.{s}.weight" for name, shards in _dense_linears(num_layers) if name in plan for s in shards}
    for key in [k for k, v in tensors.items() if k.endswith(".weight") and v.dtype == FP8_DTYPE and k not in planned]:
        prefix = key[: -len("weight")]
        q = tensors[key]
        s = _pop_first(tensors, prefix, WEIGHT_SCALE_KEYS, required=True).float()
        _pop_first(tensors, prefix, INPUT_SCALE_KEYS, required=False)
        if s.numel() == 1:
            w = q.float() * s.reshape(())
        else:
            bn, bk = fp8.weight_block_size or (1, q.shape[1])
            w = dequantize(q, s, bn, bk)
        tensors[key] = w.to(dtype)
        log.info("%s: FP8 in the checkpoint, dequantized to %s (only the dense linears run in FP8)", key, dtype)
