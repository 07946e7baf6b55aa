"""EPLB inside the engine on the demo MoE (GLM-4-MoE shape: sigmoid router with correction bias,
groups, a shared expert folded in), float32 on CPU:

* the device-side dispatch, recorder counters and in-place relayout: greedy tokens identical to
  the plain engine's with redundant experts and a plan applied mid-generation, on both backends
  (triton through the interpreter), for every dispatch algorithm;
* the device counters equal the host recorder's (per_token mode copies every token's ids to the
  host: its counts are the reference);
* ``--load-format dummy`` builds every supported architecture with the checkpoint loader's
  parameters, from config.json alone.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from tandem.engine import EngineCore, SamplingParams
from tandem.engine.loader import load_model
from tandem.engine.model_config import SUPPORTED_MODEL_TYPES
from tandem.eplb import rebalance_experts
from tandem.eplb.placement import ExpertLocation

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
MOE_LAYERS, EXPERTS, SLOTS = 3, 8, 12


def engine(path, **kw):
    kw.setdefault("max_total_tokens", 4096)
    return EngineCore(path, device="cpu", dtype="float32", **kw)


def generate(eng, prompts, sp, plan=None, at_step=3):
    """Step the engine over all prompts; the EPLB runtime folds the recorder after each step (as
    the worker's loop hook does) and applies ``plan`` after step ``at_step``."""
    rids = [eng.add_request(p, sp) for p in prompts]
    toks = {r: [] for r in rids}
    steps = 0
    while eng.has_work():
        for o in eng.step():
            toks[o.rid] += o.new_token_ids
        steps += 1
        if eng.eplb is not None:
            eng.eplb.end_pass()
            if plan is not None and steps == at_step:
                eng.eplb.submit(plan, version=1)
                assert eng.eplb.apply_pending() > 0
    return [toks[r] for r in rids]


def new_plan():
    load = torch.rand(MOE_LAYERS, EXPERTS, generator=torch.Generator().manual_seed(5)) * 100
    return ExpertLocation.from_rebalance(rebalance_experts(load, SLOTS, 4, 1, 1), EXPERTS, 1)


@pytest.fixture(scope="module")
def six_prompts(prompts):  # the conftest's prompts, six of them
    return prompts[:6]


@pytest.fixture(scope="module")
def plain_tokens(demo_models, six_prompts):
    return generate(engine(demo_models["moe"]), six_prompts, GREEDY)


@pytest.mark.parametrize("algo", ["static", "dynamic", "random"])
def test_rebalance_mid_generation_keeps_greedy_tokens(demo_models, plain_tokens, six_prompts, algo):
    eng = engine(demo_models["moe"], enable_eplb=True, ep_num_redundant_experts=SLOTS - EXPERTS,
                 ep_dispatch_algorithm=algo, init_expert_location="trivial")
    moe = eng.model.moe_layers()
    assert all(m.dispatcher is eng.eplb.dispatcher and m.recorder is eng.eplb.recorder for m in moe)
    assert moe[0].num_local == SLOTS and moe[0].spec.num_shared == 1  # the shared expert folded in
    ptrs = [(m.w13.data_ptr(), m.w2.data_ptr()) for m in moe]
    tables = (eng.eplb.dispatcher.log2phy.data_ptr(), eng.eplb.recorder.counter(0).data_ptr())
    plan = new_plan()
    assert generate(eng, six_prompts, GREEDY, plan) == plain_tokens
    assert eng.eplb.location == plan and eng.eplb.version == 1
    # in place: what a captured graph reads kept its address
    assert [(m.w13.data_ptr(), m.w2.data_ptr()) for m in moe] == ptrs
    assert (eng.eplb.dispatcher.log2phy.data_ptr(), eng.eplb.recorder.counter(0).data_ptr()) == tables
    for m in moe:  # each slot holds its new expert (a slot computed once before, copied in place)
        assert torch.equal(m.dispatcher.physical_to_logical[m.moe_index], plan.physical_to_logical[m.moe_index])
    # recorded: every computed token routed to top-2 experts in each MoE layer, every pass folded
    rec = eng.eplb.recorder
    computed = sum(len(eng.tokenize(p)) + len(t) - 1 for p, t in zip(six_prompts, plain_tokens))
    assert rec.logical_load().sum(1).tolist() == [2 * computed] * MOE_LAYERS


def test_device_counters_equal_the_host_recorder(demo_models, plain_tokens, six_prompts):
    """stat (device counters, folded per pass) vs per_token (host copies of every token's ids)."""
    cfg = dict(enable_eplb=True, ep_num_redundant_experts=SLOTS - EXPERTS, ep_dispatch_algorithm="dynamic")
    stat = engine(demo_models["moe"], expert_distribution_recorder_mode="stat", **cfg)
    host = engine(demo_models["moe"], expert_distribution_recorder_mode="per_token", **cfg)
    plan = new_plan()
    assert generate(stat, six_prompts, GREEDY, plan) == plain_tokens
    assert generate(host, six_prompts, GREEDY, plan) == plain_tokens
    records = host.eplb.recorder.dump_dict(tensors=True)["records"]
    want = torch.zeros(MOE_LAYERS, EXPERTS, dtype=torch.int64)
    for r in records:
        want[r["layer"]] += torch.bincount(r["topk_ids"].reshape(-1), minlength=EXPERTS)
    computed = sum(len(stat.tokenize(p)) + len(t) - 1 for p, t in zip(six_prompts, plain_tokens))
    assert want.sum(1).tolist() == [2 * computed] * MOE_LAYERS  # every computed token, top-2, each layer
    assert torch.equal(stat.eplb.recorder.logical_load(), want)
    assert stat.eplb.recorder.num_forward_passes == host.eplb.recorder.num_forward_passes
    # group-limited routing: each token's experts come from at most topk_group groups
    mc = host.model_config
    for r in records:
        groups = r["topk_ids"] // (mc.num_experts // mc.n_group)
        assert all(len(set(row.tolist())) <= mc.topk_group for row in groups)


def test_triton_backend_rebalance_keeps_tokens_and_counts(demo_models, plain_tokens, six_prompts):
    """The kernels' path (fused routing + dispatch + counting, fused experts) with a plan mid-run."""
    prompts, sp = six_prompts[:2], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    cfg = dict(enable_eplb=True, ep_num_redundant_experts=SLOTS - EXPERTS)
    tri = engine(demo_models["moe"], attention_backend="triton", **cfg)
    ref = engine(demo_models["moe"], **cfg)
    plan = new_plan()
    assert generate(tri, prompts, sp, plan, at_step=2) == [t[:5] for t in plain_tokens[:2]]
    generate(ref, prompts, sp, plan, at_step=2)
    assert torch.equal(tri.eplb.recorder.logical_load(), ref.eplb.recorder.logical_load())


# ---------------------------------------------------------------------------------- --load-format dummy
def tiny_config(model_type: str) -> dict:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    return {
        "llama": base, "mistral": base, "qwen2": base, "qwen3": dict(base, head_dim=16),
        "qwen2_moe": dict(base, **moe, shared_expert_intermediate_size=64, mlp_only_layers=[1]),
        "qwen3_moe": dict(base, **moe, head_dim=16, decoder_sparse_step=1),
        "glm4_moe": dict(base, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
                         topk_group=1, n_shared_experts=1, first_k_dense_replace=1, use_qk_norm=True,
                         head_dim=16, partial_rotary_factor=0.5),
    }[model_type]


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """One tiny random checkpoint per supported architecture, written by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("archs")
    out = {}
    for mt in sorted(SUPPORTED_MODEL_TYPES):
        cfg = AutoConfig.for_model(mt, **tiny_config(mt))
        torch.manual_seed(0)
        path = root / mt
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        out[mt] = str(path)
    return out


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_dummy_load_format_builds_every_architecture(model_type, hf_checkpoints, tmp_path):
    real, _ = load_model(hf_checkpoints[model_type], torch.float32, "cpu")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(os.path.join(hf_checkpoints[model_type], "config.json"), config_only)
    dummy, cfg = load_model(str(config_only), torch.float32, "cpu", load_format="dummy")
    want = {k: (tuple(v.shape), v.dtype) for k, v in real.state_dict().items()}
    assert {k: (tuple(v.shape), v.dtype) for k, v in dummy.state_dict().items()} == want
    assert not any(p.is_meta for p in dummy.parameters())
    if cfg.is_moe:
        assert any(len(m.gate_weight) > 1 for m in dummy.moe_layers())
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(str(config_only), torch.float32, "cpu")  # the default format reads the weights
    with pytest.raises(ValueError, match="load_format='fast'"):
        load_model(str(config_only), torch.float32, "cpu", load_format="fast")


def test_dummy_engine_runs_with_eplb_and_same_weights_twice(demo_models, tmp_path):
    """A MoE engine from config.json only: it serves, records, rebalances; dummy weights are a function
    of the parameter names (and of the logical expert for expert slots), so two engines agree."""
    shutil.copy(os.path.join(demo_models["moe"], "config.json"), tmp_path)
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300]]
    cfg = dict(load_format="dummy", enable_eplb=True, ep_num_redundant_experts=SLOTS - EXPERTS)
    a = generate(engine(str(tmp_path), **cfg), prompts, GREEDY, new_plan())
    b = engine(str(tmp_path), load_format="dummy")
    assert generate(b, prompts, GREEDY) == a and all(len(t) == 10 for t in a)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "glm4_moe"
    assert sorted(os.listdir(tmp_path)) == ["config.json"]  # nothing written
