"""FP8 weights on CPU: the quantization rules, config.json / --quantization parsing, loading both
Hugging Face layouts (from our writer, from transformers' own FP8 quantizer, and in AutoFP8's
per-tensor layout), modules_to_not_convert, and the engine end to end (torch path)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tandem.engine import LLM, SamplingParams
from tandem.engine.loader import load_model
from tandem.engine.quantization import (
    MOE_NOT_SUPPORTED,
    Fp8Gemm,
    Fp8Linear,
    Fp8LinearSpec,
    resolve_fp8_config,
)
from tandem.engine.quantization import fp8 as F
from tandem.engine.quantization.config import is_skipped
from torch import nn

from benchmarks.common.fp8_accuracy import corpus_sequences, cosine, position_logits, teacher_forced
from benchmarks.common.fp8_checkpoint import write_fp8_checkpoint

E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3 = E4M3[~E4M3.isnan()]


# ---- quantization rules ------------------------------------------------------------------------
def test_exact_values_round_trip_exactly_per_row_group_and_block():
    g = torch.Generator().manual_seed(0)
    M, K = 6, 300
    q = E4M3[torch.randint(0, E4M3.numel(), (M, K), generator=g)]
    q[:, 0] = 448.0  # each row (and each 128-column group, and each block) reaches the e4m3 maximum
    q[:, 128] = -448.0
    q[:, 256] = 448.0
    s = torch.pow(2.0, torch.randint(-8, 4, (M, 1), generator=g).float())
    x = q * s
    xq, xs = F.quantize_rows(x)
    assert torch.equal(xs, s) and torch.equal(xq.float(), q)
    assert torch.equal(F.dequantize(xq, xs), x)
    gq, gs = F.quantize_row_groups(x, 128)
    assert gs.shape == (M, 3) and torch.equal(gs, s.expand(M, 3)) and torch.equal(F.dequantize(gq, gs, 1, 128), x)
    xb = q * torch.tensor([[2.0**-5]] * 4 + [[8.0]] * 2)  # 6 rows: a full block of 4 and a short one of 2
    bq, bs = F.quantize_blocks(xb, (4, 128))
    assert torch.equal(bs, torch.tensor([[2.0**-5] * 3, [8.0] * 3]))
    assert torch.equal(F.dequantize(bq, bs, 4, 128), xb)


@pytest.mark.parametrize("kind", ["rows", "groups", "blocks"])
def test_random_values_round_trip_within_e4m3_precision(kind):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 333, generator=g) * torch.logspace(-3, 1, 200)[:, None]
    if kind == "rows":
        q, s = F.quantize_rows(w)
        per_value = s.expand_as(w)
    elif kind == "groups":
        q, s = F.quantize_row_groups(w, 128)
        per_value = F.expand_block_scale(s, (1, 128), tuple(w.shape))
    else:
        q, s = F.quantize_blocks(w, (128, 128))
        per_value = F.expand_block_scale(s, (128, 128), tuple(w.shape))
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    back = q.float() * per_value
    normal = w.abs() / per_value >= 2.0**-6  # e4m3 normals: 3 mantissa bits, relative error <= half a step
    assert normal.float().mean().item() > 0.9
    rel = ((back - w).abs() / w.abs())[normal]
    assert rel.max().item() <= 2.0**-4 + 1e-6
    assert ((back - w).abs() <= 2.0**-10 * per_value + 1e-12)[~normal].all()  # subnormals: absolute step 2^-9


def test_zero_rows_and_saturation():
    x = torch.zeros(3, 64)
    x[1, 5] = 1e30  # beyond any scale: clamps to the row maximum, no inf / nan
    x[2] = torch.linspace(-1, 1, 64)
    q, s = F.quantize_rows(x)
    assert torch.all(q[0].float() == 0) and s[0].item() > 0
    assert not torch.isnan(q.float()).any() and q.float().abs().max().item() == 448.0
    sq = F.quantize_static(torch.tensor([[1e9, -1e9, 0.5]]), torch.tensor(0.5))[0]
    assert sq.float().tolist() == [[448.0, -448.0, 1.0]]


# ---- config ------------------------------------------------------------------------------------
def test_resolve_fp8_config_from_flag_and_config_json():
    assert resolve_fp8_config(None, {}, False) is None
    assert resolve_fp8_config("fp8", {}, False).layout == "online"
    block = resolve_fp8_config(None, {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                              "fmt": "e4m3", "weight_block_size": [128, 128]}}, False)
    assert block.layout == "block" and block.weight_block_size == (128, 128)
    pt = resolve_fp8_config("fp8", {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static",
                                                            "ignored_layers": ["lm_head"]}}, False)
    assert pt.layout == "per_tensor" and pt.activation_scheme == "static" and pt.modules_to_not_convert == ("lm_head",)


@pytest.mark.parametrize("flag,qc,moe,match", [
    (None, {"quant_method": "awq"}, False, "quant_method='awq': not supported"),
    (None, {"quant_method": "fp8", "weight_block_size": [100, 128]}, False, "weight_block_size"),
    (None, {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, False,
     "need activation_scheme dynamic"),
    (None, {"quant_method": "fp8", "activation_scheme": "sometimes"}, False, "activation_scheme='sometimes'"),
    ("fp8", None, True, MOE_NOT_SUPPORTED),
    (None, {"quant_method": "fp8"}, True, MOE_NOT_SUPPORTED),
    ("int4", None, False, "quantization='int4'"),
])
def test_resolve_fp8_config_errors_name_the_field(flag, qc, moe, match):
    cfg = {} if qc is None else {"quantization_config": qc}
    with pytest.raises(ValueError, match=match):
        resolve_fp8_config(flag, cfg, moe)


def test_modules_to_not_convert_match_like_transformers():
    assert is_skipped("lm_head", ["lm_head"])
    assert is_skipped("model.layers.1.mlp.down_proj", ["model.layers.1"])
    assert not is_skipped("model.layers.11.mlp.down_proj", ["model.layers.1"])
    assert is_skipped("model.layers.11.mlp.down_proj", [r"model\.layers\.1\d"])
    assert is_skipped("model.layers.3.mlp.down_proj", ["down_proj"])
    assert not is_skipped("model.layers.3.mlp.gate_proj", ["mlp.gate"])


def test_quantization_flag_in_the_worker_schemas():
    from tandem.config import ConfigError, DecodeConfig, PrefillConfig, load_config

    for schema in (DecodeConfig, PrefillConfig):
        cfg, _ = load_config(schema, ["--quantization", "fp8", "--fp8-gemm-backend", "torch"], environ={})
        assert cfg.quantization == "fp8" and cfg.fp8_gemm_backend == "torch"
        assert load_config(schema, [], environ={})[0].quantization is None
    with pytest.raises(ConfigError, match="quantization='int8'"):
        load_config(DecodeConfig, ["--quantization", "int8"], environ={})


# ---- Fp8Linear -----------------------------------------------------------------------------------
def _layer(N=64, K=96, spec=Fp8LinearSpec(), bias=True, backend="torch"):
    layer = Fp8Linear(K, N, bias, spec, Fp8Gemm(backend))
    g = torch.Generator().manual_seed(2)
    w = torch.randn(N, K, generator=g)
    if spec.group_k is None:
        q, s = F.quantize_rows(w)
        s = s[:, 0]
    else:
        q, s = F.quantize_blocks(w, (spec.group_n, spec.group_k))
    layer.weight.data, layer.weight_scale.data = q, s
    if bias:
        layer.bias.data = torch.randn(N, generator=g)
    return layer, w


def test_to_dtype_keeps_the_fp8_format_and_casts_the_bias():
    layer, _ = _layer()
    scale = layer.weight_scale.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert layer.bias.dtype == torch.bfloat16
    layer.half()
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.bias.dtype == torch.float16


def test_fp8_linear_matches_the_bf16_linear_it_came_from():
    layer, w = _layer(N=96, K=256, spec=Fp8LinearSpec(group_n=32, group_k=128))
    x = torch.randn(7, 256)
    y = layer(x)
    ref = x @ w.t() + layer.bias
    assert y.shape == (7, 96)
    cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.999


def test_scaled_mm_backend_agrees_with_the_torch_reference():
    layer, _ = _layer(N=64, K=96, bias=False)
    x = torch.randn(5, 96)
    ref = layer(x)
    layer.gemm = Fp8Gemm("scaled_mm")
    assert (layer(x) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_forward_never_reads_a_device_value_on_the_host():
    """A CUDA graph cannot hold a host read of device data (``.item()``, ``bool(t)``, ``.tolist()``):
    the FP8 forward (scales read on the device, shapes from metadata) has none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoHostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func not in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default), func
            return func(*args, **(kwargs or {}))

    for backend in ("torch", "scaled_mm"):
        layer, _ = _layer(bias=True, backend=backend)
        layer.input_scale = nn.Parameter(torch.tensor(0.05), requires_grad=False)
        with NoHostReads():
            layer(torch.randn(3, 96))


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        Fp8Gemm("triton", "cpu")


# ---- checkpoints -------------------------------------------------------------------------------
def _tiny_model(path, hidden=256, heads=4, kv_heads=2, inter=384, layers=2, qwen2=False, seed=0):
    """A random bf16 Llama (or Qwen2: q/k/v biases) checkpoint written by transformers."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cfg = (Qwen2Config if qwen2 else LlamaConfig)(
        vocab_size=320, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=False, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # weights large enough that every layer matters
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.04)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    src = _tiny_model(root / "bf16")
    # 192 = 1.5 blocks of q rows: the merged QKV shards do not start on block boundaries.
    odd = _tiny_model(root / "bf16-odd", hidden=192, heads=3, kv_heads=1, inter=320, qwen2=True)
    log = lambda *_: None  # noqa: E731
    return {
        "bf16": src, "odd": odd,
        "block": write_fp8_checkpoint(src, str(root / "block"), "block", device="cpu", log=log),
        "odd_block": write_fp8_checkpoint(odd, str(root / "odd-block"), "block", device="cpu", log=log),
        "per_tensor": write_fp8_checkpoint(src, str(root / "pt"), "per_tensor", device="cpu", log=log),
        "skip": write_fp8_checkpoint(src, str(root / "skip"), "block", skip=("model.layers.1.mlp.down_proj",),
                                     device="cpu", log=log),
    }


def _original(src: str, layer: int, merged: str) -> torch.Tensor:
    t = load_file(os.path.join(src, "model.safetensors"))
    parts = {"qkv_proj": ("self_attn.", "q_proj", "k_proj", "v_proj"), "o_proj": ("self_attn.", "o_proj"),
             "gate_up_proj": ("mlp.", "gate_proj", "up_proj"), "down_proj": ("mlp.", "down_proj")}[merged]
    return torch.cat([t[f"model.layers.{layer}.{parts[0]}{p}.weight"] for p in parts[1:]]).float()


def _module(model, layer: int, merged: str):
    scope = model.layers[layer].self_attn if merged in ("qkv_proj", "o_proj") else model.layers[layer].mlp
    return getattr(scope, merged)


def _dequantized(m: Fp8Linear) -> torch.Tensor:
    return F.dequantize(m.weight, m.weight_scale, m.group_n, m.group_k)


@pytest.mark.parametrize("ckpt,src,group_n", [("block", "bf16", 128), ("odd_block", "odd", 1),
                                               ("per_tensor", "bf16", 1)])
def test_fp8_checkpoints_load_to_the_weights_they_were_written_from(tiny, ckpt, src, group_n):
    model, _ = load_model(tiny[ckpt], torch.float32, "cpu")
    for merged in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        m = _module(model, 1, merged)
        assert isinstance(m, Fp8Linear) and m.weight.dtype == torch.float8_e4m3fn
        w = _original(tiny[src], 1, merged)
        err = (_dequantized(m) - w).abs()
        # half an e4m3 step of the largest value in a scale group, at most
        assert err.max().item() <= 2.0**-4 * w.abs().max().item(), merged
    assert _module(model, 0, "qkv_proj").group_n == group_n
    assert model.lm_head.weight.dtype == torch.float32 and not isinstance(model.lm_head, Fp8Linear)


def test_weight_scale_inv_is_a_multiplier(tmp_path, tiny):
    """Scales far from 1 (2^-10): applying ``weight_scale_inv`` by division would be off by 2^20."""
    t = load_file(os.path.join(tiny["block"], "model-00001.safetensors"))
    key = "model.layers.0.mlp.down_proj"
    q, s = t[key + ".weight"], t[key + ".weight_scale_inv"]
    t[key + ".weight_scale_inv"] = s * 2.0**-10
    out = tmp_path / "scaled"
    out.mkdir()
    save_file(t, str(out / "model.safetensors"))
    for name in ("config.json",):
        (out / name).write_text(open(os.path.join(tiny["block"], name)).read())
    model, _ = load_model(str(out), torch.float32, "cpu")
    m = model.layers[0].mlp.down_proj
    want = q.float() * F.expand_block_scale(s * 2.0**-10, (128, 128), tuple(q.shape))
    assert torch.equal(_dequantized(m), want)
    x = torch.randn(3, q.shape[1])
    y = m(x)
    assert (y - x @ want.t()).abs().max().item() <= 0.05 * (x @ want.t()).abs().max().item()


def test_fp8_logits_stay_close_to_bf16(tiny):
    """Every layout, end to end: each linear's output is within e4m3's ~3.7% (cosine 0.9993); a
    random 2-layer network amplifies that to ~10% of the logits (top-1 agreement is measured on
    the trained demo model below)."""
    ref = LLM(tiny["bf16"], device="cpu", dtype="float32", max_total_tokens=1024)
    seqs = [list(range(3 + i, 40 + i)) for i in range(4)]
    want = position_logits(ref.engine, seqs)
    for path, kw in ((tiny["bf16"], {"quantization": "fp8"}), (tiny["block"], {}), (tiny["per_tensor"], {})):
        llm = LLM(path, device="cpu", dtype="float32", max_total_tokens=1024, **kw)
        assert all(isinstance(layer.mlp.down_proj, Fp8Linear) for layer in llm.engine.model.layers)
        got = position_logits(llm.engine, seqs)
        assert cosine(got, want) >= 0.99, (path, kw)
        assert ((got - want).norm() / want.norm()).item() <= 0.15, (path, kw)


def test_modules_to_not_convert_stay_bf16(tiny):
    cfg = json.loads(open(os.path.join(tiny["skip"], "config.json")).read())
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["model.layers.1.mlp.down_proj"]
    model, _ = load_model(tiny["skip"], torch.float32, "cpu")
    assert type(model.layers[1].mlp.down_proj) is nn.Linear
    assert isinstance(model.layers[0].mlp.down_proj, Fp8Linear) and isinstance(model.layers[1].mlp.gate_up_proj,
                                                                                Fp8Linear)
    assert torch.equal(model.layers[1].mlp.down_proj.weight, _original(tiny["bf16"], 1, "down_proj"))


def _rewrite(src: str, dst, edit_tensors=None, edit_config=None) -> str:
    os.makedirs(dst, exist_ok=True)
    t = {}
    for fn in sorted(os.listdir(src)):
        if fn.endswith(".safetensors"):
            t.update(load_file(os.path.join(src, fn)))
    if edit_tensors:
        edit_tensors(t)
    save_file(t, os.path.join(dst, "model.safetensors"))
    cfg = json.loads(open(os.path.join(src, "config.json")).read())
    if edit_config:
        edit_config(cfg)
    open(os.path.join(dst, "config.json"), "w").write(json.dumps(cfg))
    return str(dst)


def test_bad_fp8_checkpoints_fail_naming_the_tensor(tiny, tmp_path):
    def mixed(t):  # q_proj unquantized, k/v in FP8
        p = "model.layers.0.self_attn.q_proj."
        t[p + "weight"] = F.dequantize(t[p + "weight"], t.pop(p + "weight_scale_inv"), 128, 128).bfloat16()

    with pytest.raises(ValueError, match="mix FP8 and unquantized"):
        load_model(_rewrite(tiny["block"], tmp_path / "mixed", mixed), torch.float32, "cpu")

    def listed(cfg):
        cfg["quantization_config"]["modules_to_not_convert"] = ["model.layers.0.mlp.down_proj"]

    with pytest.raises(ValueError, match="down_proj is listed in quantization_config.modules_to_not_convert"):
        load_model(_rewrite(tiny["block"], tmp_path / "listed", edit_config=listed), torch.float32, "cpu")

    def short_scale(t):
        key = "model.layers.0.mlp.gate_proj.weight_scale_inv"
        t[key] = t[key][:1]

    with pytest.raises(ValueError, match="gate_proj.weight_scale_inv has shape"):
        load_model(_rewrite(tiny["block"], tmp_path / "short", short_scale), torch.float32, "cpu")

    def no_scale(t):
        del t["model.layers.1.self_attn.o_proj.weight_scale"]

    with pytest.raises(ValueError, match="o_proj.weight_scale"):
        load_model(_rewrite(tiny["per_tensor"], tmp_path / "noscale", no_scale), torch.float32, "cpu")


def test_checkpoint_written_by_transformers_fp8_quantizer(tiny, tmp_path, monkeypatch):
    """transformers' own ``FineGrainedFP8Config`` quantizes the bf16 checkpoint (its ``Fp8Quantize``
    conversion, plain torch) and ``save_pretrained`` writes it: ``weight`` F8_E4M3,
    ``weight_scale_inv`` F32 per 128 x 128 block, its config dict. Its GPU check is bypassed: it
    refuses to quantize without a GPU, though the quantization itself runs on CPU."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    hf = AutoModelForCausalLM.from_pretrained(tiny["bf16"], quantization_config=FineGrainedFP8Config(),
                                              dtype=torch.bfloat16)
    out = str(tmp_path / "hf-fp8")
    hf.save_pretrained(out)
    qc = json.loads(open(os.path.join(out, "config.json")).read())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert saved["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape == (1, 2)
    model, _ = load_model(out, torch.float32, "cpu")
    ours, _ = load_model(tiny["block"], torch.float32, "cpu")
    for layer in (0, 1):
        for merged in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            m = _module(model, layer, merged)
            w = _original(tiny["bf16"], layer, merged)
            assert isinstance(m, Fp8Linear) and m.group_n == 128 and m.group_k == 128
            assert (_dequantized(m) - w).abs().max().item() <= 2.0**-4 * w.abs().max().item(), merged
            # transformers scales by 448 / amax where we divide by amax / 448: the same values but for
            # a last bit of the scale and the rare element it moves across a rounding boundary
            theirs, mine = _dequantized(m), _dequantized(_module(ours, layer, merged))
            assert ((theirs - mine).abs() > 1e-6 * w.abs().max()).float().mean().item() < 0.01, merged
    seqs = [list(range(5, 40))]
    got = position_logits(LLM(out, device="cpu", dtype="float32", max_total_tokens=1024).engine, seqs)
    bf16 = position_logits(LLM(tiny["bf16"], device="cpu", dtype="float32", max_total_tokens=1024).engine, seqs)
    assert cosine(got, bf16) >= 0.99


def test_autofp8_per_tensor_static_layout(tiny, tmp_path):
    """The per-tensor layout as AutoFP8 writes it (github.com/neuralmagic/AutoFP8, README "Checkpoint
    structure" and auto_fp8/quantize.py ``save_quantized_model``): ``quantization_config`` =
    {quant_method: fp8, activation_scheme: static, ignored_layers: [...]}; per linear ``weight``
    F8_E4M3, ``weight_scale`` and ``input_scale`` 0-d F32 tensors (``scale.float().reciprocal()``,
    a multiplier); ignored layers keep their bf16 ``weight``."""
    src = load_file(os.path.join(tiny["bf16"], "model.safetensors"))
    t, ignored = {}, ["lm_head", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    for k, w in src.items():
        mod = k[: -len(".weight")]
        if "layers" in k and k.endswith("_proj.weight") and mod not in ignored:
            amax = w.float().abs().max()
            scale = 448.0 / amax.clamp(min=1e-12)
            t[k] = (w.float() * scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            t[mod + ".weight_scale"] = scale.float().reciprocal()
            t[mod + ".input_scale"] = torch.tensor(0.02 + 0.001 * len(t))  # calibrated per layer: all differ
        else:
            t[k] = w
    out = tmp_path / "autofp8"
    out.mkdir()
    save_file(t, str(out / "model.safetensors"))
    cfg = json.loads(open(os.path.join(tiny["bf16"], "config.json")).read())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ignored}
    (out / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(str(out), torch.float32, "cpu")
    qkv = model.layers[1].self_attn.qkv_proj
    p = "model.layers.1.self_attn."
    assert qkv.input_scale.item() == max(t[p + s + "_proj.input_scale"].item() for s in "qkv")
    assert torch.equal(qkv.weight_scale[:256], t[p + "q_proj.weight_scale"].expand(256))
    assert torch.equal(qkv.weight_scale[256:384], t[p + "k_proj.weight_scale"].expand(128))
    assert type(model.layers[0].mlp.gate_up_proj) is nn.Linear and isinstance(model.layers[0].mlp.down_proj,
                                                                                Fp8Linear)
    x = torch.randn(4, 256) * 0.5
    y = qkv(x)
    want = x @ _original(tiny["bf16"], 1, "qkv_proj").t()
    assert torch.nn.functional.cosine_similarity(y.flatten(), want.flatten(), dim=0).item() > 0.99


def test_fp8_lm_head_in_a_checkpoint_is_dequantized(tiny, tmp_path):
    def quantized_head(t):
        q, s = F.quantize_blocks(t["lm_head.weight"].float(), (128, 128))
        t["lm_head.weight"], t["lm_head.weight_scale_inv"] = q, s

    model, _ = load_model(_rewrite(tiny["block"], tmp_path / "head", quantized_head), torch.float32, "cpu")
    head = load_file(os.path.join(tiny["bf16"], "model.safetensors"))["lm_head.weight"].float()
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert (model.lm_head.weight - head).abs().max().item() <= 2.0**-4 * head.abs().max().item()


# ---- the engine ----------------------------------------------------------------------------------
def test_online_fp8_engine_on_the_demo_model(demo_models, make_llm):
    ref = make_llm(demo_models["dense"])
    llm = make_llm(demo_models["dense"], quantization="fp8")
    assert all(isinstance(layer.self_attn.qkv_proj, Fp8Linear) for layer in llm.engine.model.layers)
    acc = teacher_forced(ref.engine, llm.engine, corpus_sequences(ref.tokenizer, 16, 32))
    assert acc["top1"] >= 0.95 and acc["mean_kl"] < 1e-3, acc
    out = llm.generate(["The GNU General Public License is"], SamplingParams(max_tokens=8, temperature=0))[0]
    assert len(out.token_ids) == 8


def test_fp8_on_a_moe_checkpoint_is_refused(demo_models):
    with pytest.raises(ValueError, match=MOE_NOT_SUPPORTED):
        LLM(demo_models["moe"], device="cpu", dtype="float32", max_total_tokens=1024, quantization="fp8")


def test_engine_bench_fp8_runs_every_variant_and_reports_the_bytes_read(tiny, tmp_path):
    """``engine_bench.py --quantization fp8 --compare-bf16 --fp8-checkpoint``: one run, each variant's tok/s,
    the bytes a decode step reads (FP8 linears at one byte a weight), the gates (batch 64 not run: not
    measured, not a pass)."""
    from benchmarks import engine_bench

    out = tmp_path / "fp8.json"
    rc = engine_bench.main(["--model", tiny["bf16"], "--device", "cpu", "--dtype", "float32", "--batch-sizes", "1",
                            "--input-len", "8", "--output-len", "2", "--quantization", "fp8", "--compare-bf16",
                            "--fp8-checkpoint", tiny["block"], "--gates", "fp8", "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and out.with_suffix(".md").is_file()
    names = [v["variant"] for v in r["variants"]]
    assert names == ["float32", "fp8-online", "fp8-block"]
    nbytes = {v["variant"]: v["bytes_read_per_step"] for v in r["variants"]}
    linear_params = 2 * (256 * 512 + 256 * 256 + 384 * 2 * 256 + 256 * 384)  # 2 layers: qkv, o, gate/up, down
    assert nbytes["float32"] - nbytes["fp8-online"] >= 3 * linear_params - 4 * 2 * (512 + 256 + 768 + 256)
    assert all(row["vs_unquantized"] > 0 for v in r["variants"] for row in v["rows"])
    gates = {g["target"]: g for g in r["gates"]}
    assert gates["fp8-online batch 64 >= 1.3x bf16 tok/s (same run)"]["met"] is None
    assert gates["fp8-online batch 1 >= 1.4x bf16 tok/s (same run)"]["value"] is not None
