"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) into ``CausalLM``."""
from __future__ import annotations

import functools
import glob
import os
import zlib

import torch
from safetensors import safe_open
from tandem.config.hf_config import read_hf_config

from .kv_quant import is_kv_scale_name
from .model import CausalLM, MoE, Rotary, plain_linear
from .model_config import ModelConfig
from .tensor_parallel import ONE_RANK, TensorParallel, check_tp_shape, shard_state

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed are auto, float32, bfloat16, float16")
    return DTYPES[dtype]


def _read_tensors(path: str) -> dict:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"model_path={path!r}: missing weights (no *.safetensors files)")
    tensors = {}
    for fn in files:
        with safe_open(fn, framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    if not any(k.startswith("model.") for k in tensors):
        # A base-model checkpoint (saved from e.g. Qwen3Model, as Qwen3-Embedding ships: no
        # "model." prefix and no lm_head): the same weights under the causal LM's names.
        tensors = {"model." + k: v for k, v in tensors.items()}
    return tensors


def _layer_flags(cfg: ModelConfig, t: dict) -> list[dict]:
    flags = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        flags.append(
            {
                "qkv_bias": p + "self_attn.q_proj.bias" in t,
                "qk_norm": p + "self_attn.q_norm.weight" in t,
                "moe": p + "mlp.gate.weight" in t,
                "shared_gate": p + "mlp.shared_expert_gate.weight" in t,
                "score_bias": p + "mlp.gate.e_score_correction_bias" in t,
            }
        )
    return flags


def _expert_weights(t: dict, p: str, E: int):
    """Stack per-expert tensors (or take already-fused ones) into (w13 [E,2I,H], w2 [E,H,I])."""
    if p + "mlp.experts.gate_up_proj" in t:  # transformers-5 fused layout
        return t.pop(p + "mlp.experts.gate_up_proj"), t.pop(p + "mlp.experts.down_proj")
    w13, w2 = [], []
    for e in range(E):
        q = f"{p}mlp.experts.{e}."
        try:
            g, u, d = t.pop(q + "gate_proj.weight"), t.pop(q + "up_proj.weight"), t.pop(q + "down_proj.weight")
        except KeyError as exc:
            raise ValueError(f"missing weights: {exc.args[0]}") from None
        w13.append(torch.cat([g, u], dim=0))
        w2.append(d)
    return torch.stack(w13), torch.stack(w2)


def _merge_projections(state: dict) -> None:
    """q/k/v -> qkv_proj and gate/up -> gate_up_proj (rows stacked in that order), in place."""
    merges = (("self_attn.", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
              ("", ("gate_proj", "up_proj"), "gate_up_proj"))
    for key in [k for k in state if k.endswith(".weight") or k.endswith(".bias")]:
        for scope, parts, merged in merges:
            head, _, kind = key.rpartition(".")
            prefix = head[: -len(parts[0])] if head.endswith(scope + parts[0]) else None
            if prefix is None or (scope and not prefix.endswith(scope)):
                continue
            names = [f"{prefix}{p}.{kind}" for p in parts]
            missing = [n for n in names if n not in state]
            if missing:
                raise ValueError(f"missing weights {missing}")
            state[f"{prefix}{merged}.{kind}"] = torch.cat([state.pop(n) for n in names], dim=0)


LOAD_FORMATS = ("auto", "dummy")


def linear_factory(deterministic: bool):
    """The model's linears without FP8: ``nn.Linear``, or the batch-invariant GEMM
    (--enable-deterministic-inference, ``tandem.engine.batch_invariant``)."""
    if not deterministic:
        return plain_linear
    from .batch_invariant import InvariantLinears

    return InvariantLinears()


def _fp8_linears(path: str, cfg: ModelConfig, t: dict, dtype: torch.dtype, device: str, quantization: str | None,
                 fp8_gemm_backend: str, deterministic: bool = False):
    """(FP8 format or None, the model's linear factory): FP8 when ``--quantization fp8`` or config.json's
    ``quantization_config`` says so (tandem.engine.quantization). FP8 weights of other modules in
    ``t`` are dequantized to ``dtype`` here."""
    from .quantization import Fp8Gemm, Fp8LinearFactory, dequantize_unplanned, plan_fp8_linears, resolve_fp8_config

    fp8 = resolve_fp8_config(quantization, read_hf_config(path), cfg.is_moe, fp8_gemm_backend)
    if fp8 is None:
        return None, linear_factory(deterministic)
    plan = plan_fp8_linears(fp8, t, cfg.num_layers)
    dequantize_unplanned(t, plan, fp8, cfg.num_layers, dtype)
    return fp8, Fp8LinearFactory(plan, Fp8Gemm(fp8.gemm_backend, device, deterministic), linear_factory(deterministic))


def load_model(path: str, dtype: torch.dtype, device: str, moe_hooks=None, load_format: str = "auto",
               quantization: str | None = None, fp8_gemm_backend: str = "auto",
               deterministic: bool = False, tp: TensorParallel = ONE_RANK,
               lora=None) -> tuple[CausalLM, ModelConfig]:
    """``moe_hooks`` (``tandem.engine.moe_hooks.ExpertHooks``): what MoE layers get at construction.
    ``load_format``: ``auto`` reads the safetensors; ``dummy`` builds random weights of the
    checkpoint's shape directly on the device from config.json alone (nothing read or written).
    ``quantization``: ``fp8`` quantizes the dense linears at load time (an FP8 checkpoint is
    recognised without it, from config.json's ``quantization_config``). ``deterministic``: the linears
    compute batch-invariantly (--enable-deterministic-inference).
    ``tp``: this rank's tensor-parallel place: every sharded tensor is sliced to its part here
    (``tandem.engine.tensor_parallel``; dummy weights are drawn at the local shape). ``lora``: the
    model's ``tandem.engine.lora.LoraWeights`` (``--enable-lora``; one rank only)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r}: allowed are {', '.join(LOAD_FORMATS)}")
    if load_format == "dummy":
        if quantization is not None:
            raise ValueError("load_format='dummy' with quantization='fp8': not supported; FP8 quantizes the "
                             "checkpoint's weights at load time (write a random-weight checkpoint instead)")
        return _load_dummy(path, dtype, device, moe_hooks, linear_factory(deterministic), tp=tp, lora=lora)
    cfg = ModelConfig.from_dir(path)
    check_tp_shape(cfg, tp.size, 1 if tp.expert_sharded else tp.size)
    t = _read_tensors(path)
    tie = "lm_head.weight" not in t
    flags = _layer_flags(cfg, t)
    dispatcher, recorder = _build_hooks(moe_hooks, cfg, flags)
    fp8, linear = _fp8_linears(path, cfg, t, dtype, device, quantization, fp8_gemm_backend, deterministic)
    if fp8 is not None and tp.size > 1:
        raise ValueError(f"model_path={path!r} holds FP8 weights: not supported with tp_size={tp.size} yet")
    with torch.device("meta"):  # no memory and no random init: every parameter comes from the checkpoint
        model = CausalLM(cfg, flags, tie_embeddings=tie, expert_dispatcher=dispatcher, expert_recorder=recorder,
                         linear=linear, tp=tp, lora=lora)
    state = {}
    for i, layer in enumerate(model.layers):
        p, d = f"model.layers.{i}.", f"layers.{i}."
        if isinstance(layer.mlp, MoE):
            moe = layer.mlp
            w13, w2 = _expert_weights(t, p, cfg.num_experts)
            if moe_hooks is not None and moe_hooks.keep_experts:
                moe_hooks.keep(moe.moe_index, w13, w2)
            shared = {}
            for src in ("shared_expert.", "shared_experts."):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    key = f"{p}mlp.{src}{name}.weight"
                    if key in t:
                        shared[name] = t.pop(key)
            if moe.shared is not None:
                state.update({f"{d}mlp.shared.{name}.weight": w for name, w in shared.items()})
                shared = None
            elif shared:
                shared = (shared["gate_proj"], shared["up_proj"], shared["down_proj"])
            state[d + "mlp.w13"], state[d + "mlp.w2"] = moe.pack_experts(w13, w2, shared or None)
            router = [t.pop(p + "mlp.gate.weight")]
            if moe.spec.shared_gated:
                router.append(t.pop(p + "mlp.shared_expert_gate.weight"))
            state[d + "mlp.gate_weight"] = torch.cat(router)
            if moe.score_bias is not None:
                state[d + "mlp.score_bias"] = t.pop(p + "mlp.gate.e_score_correction_bias")
    for k in list(t):
        if is_kv_scale_name(k):  # FP8 KV-cache scales: read by kv_quant for --kv-cache-dtype fp8_*
            del t[k]
        elif k.startswith("model."):
            state[k[len("model."):]] = t.pop(k)
        elif k == "lm_head.weight":
            state[k] = t.pop(k)
    shard_state(state, cfg, tp)  # before q/k/v and gate/up are merged: each is sliced by its own heads/rows
    if fp8 is not None:
        from .quantization import prepare_fp8_state

        prepare_fp8_state(state, linear.plan, fp8, cfg.num_layers, device, dtype)
    _merge_projections(state)
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"model_path={path!r}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"model_path={path!r}: unexpected weights {unexpected[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    return _finish(model, cfg, dtype, device), cfg


def _build_hooks(moe_hooks, cfg: ModelConfig, flags: list[dict]):
    num_moe = sum(f["moe"] for f in flags)
    if moe_hooks is None or not num_moe:
        return None, None
    return moe_hooks.build(cfg, num_moe)


def _finish(model: CausalLM, cfg: ModelConfig, dtype: torch.dtype, device: str) -> CausalLM:
    """Weights in place: on the device, in the model dtype; routing float32; rotary rebuilt."""
    model.rotary = Rotary(cfg)  # non-persistent buffers are not in the checkpoint: real before the move
    model.to(device=device, dtype=dtype)
    for m in model.moe_layers():  # routing stays float32, as in transformers
        m.gate_weight.data = m.gate_weight.data.float()
        if m.score_bias is not None:
            m.score_bias.data = m.score_bias.data.float()
    model.rotary = Rotary(cfg).to(device)  # rebuilt after the cast: inv_freq stays float32
    model.eval()
    return model


# ---------------------------------------------------------------------------------- --load-format dummy
def config_layer_flags(c: dict, cfg: ModelConfig) -> list[dict]:
    """The layer flags of ``_layer_flags``, from config.json alone (what transformers builds)."""
    mt = cfg.model_type
    if mt == "qwen2":
        qkv_bias = True
    elif mt == "qwen2_moe":
        qkv_bias = bool(c.get("qkv_bias", True))
    else:
        qkv_bias = bool(c.get("attention_bias", False))
    qk_norm = mt in ("qwen3", "qwen3_moe") or (mt == "glm4_moe" and bool(c.get("use_qk_norm", False)))
    flags = []
    for i in range(cfg.num_layers):
        if mt in ("qwen2_moe", "qwen3_moe"):
            moe = (i not in (c.get("mlp_only_layers") or []) and cfg.num_experts > 0
                   and (i + 1) % (c.get("decoder_sparse_step") or 1) == 0)
        else:
            moe = mt == "glm4_moe" and i >= c.get("first_k_dense_replace", 1)
        flags.append({"qkv_bias": qkv_bias, "qk_norm": qk_norm, "moe": moe,
                      "shared_gate": moe and mt == "qwen2_moe" and cfg.shared_expert_intermediate_size > 0,
                      "score_bias": moe and mt == "glm4_moe"})
    return flags


def _seeded(name: str, seed: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((zlib.crc32(name.encode()) << 20) ^ seed)


def dummy_tensor(name: str, shape, dtype: torch.dtype, device: str, std: float, seed: int = 0) -> torch.Tensor:
    """One dummy weight: a function of its name and the seed only (every EP rank draws the same)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.normal_(0.0, std, generator=_seeded(name, seed, device))


def _load_dummy(path: str, dtype: torch.dtype, device: str, moe_hooks, linear=plain_linear, seed: int = 0,
                tp: TensorParallel = ONE_RANK, lora=None):
    """Random weights of the checkpoint's shape; with TP each rank draws its shard's shape from the
    tensor's name (replicated tensors are equal on every rank; sharded ones are not TP 1's slices)."""
    raw = read_hf_config(path)
    cfg = ModelConfig.from_dict(raw)
    check_tp_shape(cfg, tp.size, 1 if tp.expert_sharded else tp.size)
    flags = config_layer_flags(raw, cfg)
    dispatcher, recorder = _build_hooks(moe_hooks, cfg, flags)
    with torch.device("meta"):
        model = CausalLM(cfg, flags, tie_embeddings=cfg.tie_word_embeddings, expert_dispatcher=dispatcher,
                         expert_recorder=recorder, linear=linear, tp=tp, lora=lora)
    std = float(raw.get("initializer_range") or 0.02)
    state = {}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith(("mlp.w13", "mlp.w2")):
            continue
        if "norm" in name:
            state[name] = torch.ones(p.shape, dtype=dtype, device=device)
        elif leaf in ("bias", "score_bias"):
            state[name] = torch.zeros(p.shape, dtype=dtype, device=device)
        else:
            state[name] = dummy_tensor(name, p.shape, dtype, device, std, seed)
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            moe = layer.mlp
            prefix = f"layers.{layer.mlp.layer_idx}.mlp."
            w13, w2 = _dummy_experts(prefix, moe, dtype, device, std, seed)
            state[prefix + "w13"], state[prefix + "w2"] = w13, w2
            if moe_hooks is not None and moe_hooks.keep_experts:
                moe_hooks.store = functools.partial(_dummy_expert_of_layer, model, dtype, device, std, seed)
    model.load_state_dict(state, strict=True, assign=True)
    return _finish(model, cfg, dtype, device), cfg


def _dummy_expert(prefix: str, moe: MoE, e: int, dtype, device, std: float, seed: int):
    """Logical expert ``e`` of a layer (or shared chunk ``e - E``): (w13 [2I, H], w2 [H, I])."""
    _, two_i, H = moe.w13.shape
    return (dummy_tensor(f"{prefix}w13:{e}", (two_i, H), dtype, device, std, seed),
            dummy_tensor(f"{prefix}w2:{e}", (H, two_i // 2), dtype, device, std, seed))


def _dummy_experts(prefix: str, moe: MoE, dtype, device, std: float, seed: int):
    ids = moe.local_experts().tolist() + [moe.num_experts + c for c in range(moe.spec.num_shared)]
    rows = [_dummy_expert(prefix, moe, e, dtype, device, std, seed) for e in ids]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def _dummy_expert_of_layer(model: CausalLM, dtype, device, std: float, seed: int, moe_index: int, e: int):
    moe = model.moe_layers()[moe_index]
    return _dummy_expert(f"layers.{moe.layer_idx}.mlp.", moe, e, dtype, device, std, seed)
