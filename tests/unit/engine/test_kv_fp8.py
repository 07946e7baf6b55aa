"""FP8 KV cache in the engine (``--kv-cache-dtype fp8_e4m3|fp8_e5m2``): twice the tokens in the
same memory, accuracy against the full-precision cache, where the scales come from (checkpoint,
calibration, 1.0), the triton backend equal to the torch path, prefill-only -> external decode
with FP8 pages equal to local FP8 decoding, and HiCache tiers keeping FP8 pages byte for byte."""
from __future__ import annotations

import logging
import math
import os
import random

import pytest
import torch
from safetensors.torch import save_file
from tandem.config.schemas import EngineConfig
from tandem.engine import SamplingParams, kv_quant, pool_sizing
from tandem.engine.model_config import ModelConfig

from tests.unit.engine.test_disaggregation import copy_pages, run_to_end

SEEDED = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True, logprobs=True)
TEXT = ("The GNU General Public License is a free, copyleft license for software and other kinds of works. "
        "The licenses for most software and other practical works are designed to take away your freedom to share "
        "and change the works. By contrast, the GNU General Public License is intended to guarantee your freedom "
        "to share and change all versions of a program.\n\nimport os\nimport sys\n\n"
        "def main(argv=None):\n    args = parse(argv)\n    for i in range(len(args.items)):\n        if args.items[i]:\n"
        "            print(i)\n    return 0\n")


def _layer_scales(n: int, base: float) -> list:
    return [base * (1 + 0.25 * i) for i in range(n)]


@pytest.fixture(scope="module")
def scaled_checkpoint(demo_models, tmp_path_factory):
    """The dense demo checkpoint plus a file of per-layer KV scales under vLLM/SGLang's names."""
    src = demo_models["dense"]
    out = tmp_path_factory.mktemp("scaled") / "dense-kv-scales"
    out.mkdir()
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), out / name)
    layers = ModelConfig.from_dir(src).num_layers
    k, v = _layer_scales(layers, 0.02), _layer_scales(layers, 0.01)
    save_file({**{f"model.layers.{i}.self_attn.k_scale": torch.tensor(k[i]) for i in range(layers)},
               **{f"model.layers.{i}.self_attn.v_scale": torch.tensor(v[i]) for i in range(layers)}},
              str(out / "kv_scales.safetensors"))
    return str(out), k, v


def test_fp8_pool_holds_twice_the_tokens_in_the_same_memory(demo_models, monkeypatch):
    monkeypatch.setattr(pool_sizing, "_host_available_bytes", lambda: 1 << 30)  # the same budget for both
    mc = ModelConfig.from_dir(demo_models["dense"])
    cfg = EngineConfig(model_path=demo_models["dense"], page_size=16, mem_fraction_static=0.25)
    bf16 = pool_sizing.kv_pool_pages(cfg, mc, torch.bfloat16, "cpu")
    for fp8 in kv_quant.FP8_DTYPES:
        assert pool_sizing.kv_pool_pages(cfg, mc, fp8, "cpu") == 2 * bf16


def test_engine_sizes_its_fp8_pool_by_the_fp8_element(demo_models, make_llm, monkeypatch):
    monkeypatch.setattr(pool_sizing, "CPU_KV_BYTES_CAP", 4 << 20)  # the same small budget for both engines
    full = make_llm(demo_models["dense"], max_total_tokens=None).engine.pool
    fp8 = make_llm(demo_models["dense"], max_total_tokens=None, kv_cache_dtype="fp8_e4m3").engine.pool
    assert full.dtype == torch.float32 and fp8.num_pages == 4 * full.num_pages


def test_engine_pool_is_fp8_and_its_layout_says_so(demo_models, make_llm, caplog):
    with caplog.at_level(logging.WARNING, logger="tandem.engine.kv_quant"):
        eng = make_llm(demo_models["dense"], kv_cache_dtype="fp8_e5m2").engine
    assert eng.pool.dtype == torch.float8_e5m2 and eng.dtype == torch.float32  # weights keep --dtype
    assert all(t.element_size() == 1 for t in eng.pool.k_buffers + eng.pool.v_buffers)
    assert eng.pool.scales() == ([1.0] * 8, [1.0] * 8)
    assert "no KV-cache scales; using scale 1.0" in caplog.text  # as SGLang: 1.0, with a warning


def test_config_refuses_bad_kv_cache_settings(demo_models, make_llm):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(model_path=demo_models["dense"], kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_calibrate=2: needs --kv-cache-dtype fp8_e4m3 or fp8_e5m2"):
        make_llm(demo_models["dense"], kv_cache_calibrate=2)


def _top1(llm, ids):
    """Teacher-forced top-1 prediction at every prompt position (prompt logprobs, top 1)."""
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    return [top[0][0] for _, top in out.prompt_logprobs]


@pytest.mark.parametrize("kv_dtype,calibrate", [("fp8_e4m3", 0), ("fp8_e5m2", 2)])
def test_fp8_kv_top1_agrees_with_full_precision_kv(demo_models, make_llm, dense_llm, kv_dtype, calibrate):
    """Teacher-forced over 600 tokens: the prediction at each position with FP8 K/V equals the
    float32 cache's at >= 97% of positions (the issue's bar, here on CPU in float32)."""
    ids = dense_llm.tokenizer.encode(TEXT * 4).ids[:600]
    want = _top1(dense_llm, ids)
    llm = make_llm(demo_models["dense"], kv_cache_dtype=kv_dtype, kv_cache_calibrate=calibrate)
    got = _top1(llm, ids)
    agree = sum(a == b for a, b in zip(got, want)) / len(want)
    assert agree >= 0.97, agree


def test_scales_come_from_the_checkpoint(scaled_checkpoint, demo_models, make_llm, prompts):
    path, k, v = scaled_checkpoint
    llm = make_llm(path, kv_cache_dtype="fp8_e4m3")
    got_k, got_v = llm.engine.pool.scales()
    assert got_k == pytest.approx(k, rel=1e-6) and got_v == pytest.approx(v, rel=1e-6)
    # Stored values are K / k_scale: layer 0's keys are stored 1 / 0.02 = 50x larger than
    # by the same weights with scale 1.0.
    plain = make_llm(demo_models["dense"], kv_cache_dtype="fp8_e4m3")
    stored = []
    for m in (llm, plain):
        m.generate([prompts[0]], SamplingParams(max_tokens=1))
        stored.append(m.engine.pool.k_buffers[0].float().abs().max().item())
        m.engine.flush_cache()
    assert stored[0] / stored[1] == pytest.approx(50, rel=0.1)
    # --kv-cache-dtype auto ignores the scales (the loader knows them; no "unexpected weights").
    assert make_llm(path).engine.pool.dtype == torch.float32


@pytest.mark.parametrize("names", [
    ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),          # NVIDIA ModelOpt
    ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),  # compressed-tensors (older)
    ("self_attn.kv_scale", None),                                       # deprecated: one scale for both
])
def test_checkpoint_scale_names(tmp_path, names):
    t = {}
    for i in range(3):
        t[f"model.layers.{i}.{names[0]}"] = torch.tensor([0.5 + i])
        if names[1]:
            t[f"model.layers.{i}.{names[1]}"] = torch.tensor(0.25 + i)
    t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(2, 2)  # not a scale
    save_file(t, str(tmp_path / "model.safetensors"))
    k, v = kv_quant.checkpoint_kv_scales(str(tmp_path), 3)
    assert k == [0.5, 1.5, 2.5] and v == ([0.25, 1.25, 2.25] if names[1] else k)
    assert not kv_quant.is_kv_scale_name("model.layers.0.self_attn.q_proj.weight")


def test_checkpoint_without_a_layer_scale_warns_and_bad_scales_are_refused(tmp_path, caplog):
    save_file({"model.layers.0.self_attn.k_scale": torch.tensor(2.0),
               "model.layers.0.self_attn.v_scale": torch.tensor(3.0)}, str(tmp_path / "a.safetensors"))
    with caplog.at_level(logging.WARNING, logger="tandem.engine.kv_quant"):
        assert kv_quant.checkpoint_kv_scales(str(tmp_path), 2) == ([2.0, 1.0], [3.0, 1.0])
    assert "not model.layers.1.self_attn.k_scale and 1 more: 1.0 used there" in caplog.text
    save_file({"model.layers.0.self_attn.k_scale": torch.tensor(0.0)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_scale=0.0: a KV scale must be a positive"):
        kv_quant.checkpoint_kv_scales(str(tmp_path), 1)


def test_calibration_scales_cover_twice_the_largest_value_seen(demo_models, make_llm, dense_llm):
    """--kv-cache-calibrate 2: per layer, scale = the power of two at or above 2 x max|K| / 448,
    max|K| over the calibration prompts as the float32 cache holds them; so those prompts' keys
    are stored by the FP8 engine within [112, 224] at their largest, none saturated."""
    llm = make_llm(demo_models["dense"], kv_cache_dtype="fp8_e4m3", kv_cache_calibrate=2)
    eng = llm.engine
    k_scales, v_scales = eng.pool.scales()
    assert all(math.log2(s).is_integer() for s in k_scales + v_scales) and len(set(k_scales)) > 1
    prompts = kv_quant.calibration_prompts(eng.tokenizer, eng.model_config.vocab_size, 2, 512)
    assert len(prompts) == 2 and prompts[0] != prompts[1] and all(len(p) == 512 for p in prompts)
    layers = eng.model_config.num_layers
    amax, top = torch.zeros(layers), torch.zeros(layers)
    for p in prompts:
        for m, out in ((dense_llm, amax), (llm, top)):
            m.engine.flush_cache()
            m.generate([p], SamplingParams(max_tokens=1))
            for layer in range(layers):
                out[layer] = max(out[layer], m.engine.pool.k_buffers[layer].float().abs().max())
            m.engine.flush_cache()
    want = [2.0 ** math.ceil(math.log2(2 * a / 448)) for a in amax.tolist()]
    assert k_scales == want
    assert all(112 <= t <= 224 for t in top.tolist()), top.tolist()  # 112: a value just above it, rounded


def test_triton_backend_equals_torch_native_with_fp8(scaled_checkpoint, make_llm):
    """Through the Triton interpreter: quantize on write and dequantize in the kernels give the
    torch path's tokens and logprobs (scales != 1, page size 4: pages straddled)."""
    path, _, _ = scaled_checkpoint
    sp = SamplingParams(max_tokens=4, temperature=0.9, top_k=40, seed=5, ignore_eos=True, logprobs=True)
    prompt = "The GNU General Public License is"
    outs = [make_llm(path, attention_backend=b, page_size=4, kv_cache_dtype="fp8_e4m3").generate([prompt], sp)[0]
            for b in ("torch_native", "triton")]
    assert outs[0].token_ids == outs[1].token_ids
    assert outs[0].logprobs == pytest.approx(outs[1].logprobs, abs=1e-4)


def test_prefill_only_then_external_decode_with_fp8_pages_equals_local(scaled_checkpoint, make_llm, prompts):
    """PD inside one process: FP8 pages of a prefill-only request copied byte for byte into a
    decode engine's pre-allocated pages decode to the tokens of local FP8 decoding."""
    path, _, _ = scaled_checkpoint
    pe = make_llm(path, kv_cache_dtype="fp8_e4m3", chunked_prefill_size=8).engine
    agg = make_llm(path, kv_cache_dtype="fp8_e4m3")
    de = agg.engine
    for prompt in prompts[:3]:
        de.flush_cache()
        local = agg.generate([prompt], SEEDED)[0]
        de.flush_cache()
        alloc = de.allocate_external(prompt, SEEDED)
        rid = pe.add_request(prompt, SEEDED, mode="prefill_only")
        pages, done = [], None
        while done is None:
            for o in pe.step():
                if o.rid == rid:
                    pages += o.pages_final  # every page of the prompt, once, in page-table order
                    done = o if o.prefill_done else None
        copy_pages(pe, de, pages, alloc.page_indices)
        pe.release(rid)
        de.activate_external(alloc.rid, done.new_token_ids[0], float("nan"))
        decoded, reason = run_to_end(de, alloc.rid)
        assert reason == "length" and decoded == local.token_ids, prompt
        pe.flush_cache()


def _prompt(seed: int, n: int = 256) -> list:
    rng = random.Random(seed)
    return [rng.randrange(1, 8000) for _ in range(n)]


def _prefix_bytes(eng, ids) -> torch.Tensor:
    """The device KV bytes of the prefix of ``ids`` held by the radix cache, every layer."""
    pages, _ = eng.cache.match_prefix(ids)
    idx = torch.tensor(pages)
    return torch.stack([t.view(torch.uint8)[idx] for t in eng.pool.k_buffers + eng.pool.v_buffers])


def test_storage_keeps_fp8_pages_of_other_scales_apart(demo_models):
    """Pages on disk are only read back by a pool of the same dtype and, for FP8, the same scales."""
    from tandem.engine.hicache_setup import storage_namespace
    from tandem.engine.kv_pool import KVPool

    def pool(dtype, k=None):
        return KVPool(2, 4, 16, 2, 8, dtype, "cpu", num_aux_slots=1, k_scales=k, v_scales=k and [1.0, 1.0])

    path = demo_models["dense"]
    names = [storage_namespace(path, p) for p in (pool(torch.float32), pool(torch.float8_e4m3fn, [1.0, 1.0]),
                                                     pool(torch.float8_e4m3fn, [0.5, 1.0]))]
    assert len(set(names)) == 3 and "float8_e4m3fn" in names[1]
    assert storage_namespace(path, pool(torch.float8_e4m3fn, [0.5, 1.0])) == names[2]


@pytest.mark.parametrize("layout,io", [("layer_first", "direct"), ("page_first", "kernel")])
def test_hicache_load_back_of_fp8_pages_equals_recompute(make_llm, demo_models, layout, io, tmp_path):
    """A prefix evicted from the device comes back from the host tier (and, in a new engine, from
    storage) as the FP8 bytes the first prefill wrote, and decodes to the same tokens."""
    kw = dict(kv_cache_dtype="fp8_e4m3", enable_hierarchical_cache=True, max_total_tokens=512,
              hicache_mem_layout=layout, hicache_io_backend=io, hicache_storage_backend="file",
              hicache_storage_dir=str(tmp_path), hicache_storage_prefetch_policy="wait_complete")
    llm = make_llm(demo_models["dense"], **kw)
    eng, a = llm.engine, _prompt(1)
    first = llm.generate([a], SEEDED)[0]
    computed = _prefix_bytes(eng, a)
    assert eng.hicache.host.dtype == torch.float8_e4m3fn
    assert eng.hicache.host.bytes_per_page == 2 * 8 * 16 * 2 * 64  # one byte per element
    for s in (2, 3):  # two more prompts evict the first from the 32-page device pool
        llm.generate([_prompt(s)], SEEDED)
    assert eng.cached_prefix_tokens(a) == 0
    again = llm.generate([a], SEEDED)[0]
    assert eng.hicache.counters.host_hit_tokens == 15 * 16 and again.cached_tokens == 15 * 16
    assert torch.equal(_prefix_bytes(eng, a)[:, :15], computed[:, :15])
    assert again.token_ids == first.token_ids
    eng.hicache.flush_storage()
    fresh = make_llm(demo_models["dense"], **kw)
    from_storage = fresh.generate([a], SEEDED)[0]
    assert fresh.engine.hicache.counters.storage_hit_tokens == 15 * 16
    assert torch.equal(_prefix_bytes(fresh.engine, a)[:, :15], computed[:, :15])
    assert from_storage.token_ids == first.token_ids
