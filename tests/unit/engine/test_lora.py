"""LoRA adapters per request: the SGMV kernels against torch, PEFT loading, the engine against
transformers with the adapter merged into the weights (float32), mixed batches, and the adapter in
every cache key."""
from __future__ import annotations

import os

import pytest
import torch
from tandem.engine import SamplingParams, UnknownLoraError
from tandem.engine.lora import LoraAdapterError, kernels

from deploy.demo_lora import build_adapter, merge_into

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


# ---- kernels (Triton interpreter vs torch) ------------------------------------------------------------
def _segments(lens, slots):
    starts = [sum(lens[:i]) for i in range(len(lens))]
    return (torch.tensor(starts, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
            torch.tensor(slots, dtype=torch.int32))


@pytest.mark.parametrize("lens,slots,K", [([1, 1, 1, 1], [0, -1, 2, 0], 40), ([5, 17, 3, 40], [1, 0, -1, 2], 40),
                                          ([1, 1, 1], [0, 2, -1], 1100)])
def test_sgmv_shrink_expand_match_torch(lens, slots, K):
    """K 1100: shrink splits K in partials (the last one short) that expand adds."""
    g = torch.Generator().manual_seed(0)
    T, N, R, S = sum(lens), 70, 24, 3  # K, N not multiples of the blocks; R = 3 parts of rank 8
    x = torch.randn(T, K, generator=g)
    a = torch.randn(S, R, K, generator=g) / K ** 0.5
    b = torch.randn(S, N, R, generator=g)
    y = torch.randn(T, N, generator=g)
    st, ln, sl = _segments(lens, slots)
    xa = kernels.shrink(x, a, st, ln, sl, max(lens))
    assert xa.shape == (kernels.num_splits(K, kernels.k_per_split(len(lens))), T, R)
    xa_ref = kernels.shrink_ref(x, a, st, ln, sl)
    used = torch.repeat_interleave(sl, ln) >= 0
    assert torch.allclose(xa.sum(0)[used], xa_ref[used], atol=1e-4, rtol=1e-4)
    ref = kernels.expand_ref(xa_ref, b, y.clone(), st, ln, sl)
    for given in (xa_ref.clone(), xa):  # a [T, R] product, or shrink's partials
        out = kernels.expand(given, b, y.clone(), st, ln, sl, max(lens))
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
        assert torch.equal(out[~used], y[~used])  # base rows untouched
        assert not torch.allclose(out[used], y[used])


@pytest.mark.parametrize("slots", [[1], [0, -1, 2, 0, 2, 2, -1, 1, 0, 0, 1, 2, -1, 0, 1, 2, 2, 0, 1]])
def test_stacked_expand_matches_torch(slots):
    """The stacked form's one kernel: each row adds its own slot's columns times its slot's B (a row
    tile mixing every slot and base rows, and a lone row); base rows are copied."""
    g = torch.Generator().manual_seed(0)
    T, N, R, S = len(slots), 70, 24, 3
    ys = torch.randn(T, N + S * R, generator=g)
    b = torch.randn(S, N, R, generator=g)
    rs = torch.tensor(slots, dtype=torch.int32)
    out = kernels.expand_stacked(ys, N, b, rs)
    ref = kernels.expand_stacked_ref(ys, N, b, rs)
    assert out.shape == (T, N) and out.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    for block_n, warps in ((32, 2), (128, 8)):  # the launch configurations lora_expand_bench.py times
        assert torch.equal(kernels.expand_stacked(ys, N, b, rs, block_n=block_n, num_warps=warps), out)
    base = rs < 0
    assert torch.equal(out[base], ys[base, :N])
    assert not torch.allclose(out[~base], ys[~base, :N], atol=1e-2)
    with pytest.raises(ValueError, match="is not"):
        kernels.expand_stacked(ys[:, :-1], N, b, rs)


@pytest.mark.parametrize("bias", [False, True])
def test_stacked_projection_equals_the_beside_form(bias):
    """LoraDelta.stack: A's rows appended to the base weight (the linear keeps its own view, its output
    unchanged) gives what the SGMV beside form gives, with the Triton kernels and the torch path, and
    adapters written after stacking land in the stacked rows. A linear of another dtype stays beside."""
    from tandem.engine.lora import LoraWeights, lora_batch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    K, parts, S, r = 40, (24, 8, 8), 3, 8
    lin = nn.Linear(K, sum(parts), bias=bias)
    x = torch.randn(7, K, generator=g)
    base_out = lin(x).detach()
    stacked, beside = LoraWeights(S, r, torch.float32, "cpu"), LoraWeights(S, r, torch.float32, "cpu")
    d, d0 = stacked("layers.0.self_attn.qkv_proj", K, parts, lin), beside("layers.0.self_attn.qkv_proj", K, parts, lin)
    assert stacked.stack() == 1 and d.stacked is not None and d0.stacked is None
    assert d.stacked.shape == (sum(parts) + S * 3 * r, K)
    assert lin.weight.shape == (sum(parts), K) and lin.weight.data_ptr() == d.stacked.data_ptr()
    assert torch.equal(lin(x).detach(), base_out)
    for slot in range(S):
        ad = {p: (torch.randn(r, K, generator=g), torch.randn(n, r, generator=g)) for p, n in enumerate(parts)}
        d.write(slot, ad)
        d0.write(slot, ad)
    with torch.no_grad():
        for use_triton in (True, False):
            batch = lora_batch([1, -1, 0, 2], [2, 1, 1, 3], "cpu", use_triton)
            got, want = d.project(x, batch), d0.project(x, batch)
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
            assert torch.equal(got[2], base_out[2])  # the base request's row
            assert not torch.allclose(got[0], base_out[0], atol=1e-2)
        assert torch.equal(d.project(x, None), base_out)
    other = LoraWeights(S, r, torch.float64, "cpu")
    other("layers.0.self_attn.o_proj", K, (8,), nn.Linear(K, 8))
    assert other.stack() == 0


def test_deterministic_deltas_run_one_row_tile_and_no_torch_path():
    """--enable-deterministic-inference: every projection launches the kernels with the fixed row
    tile (a segment longer than the tile still matches torch); the batch-variant torch path refuses."""
    from tandem.engine.lora import LoraWeights, lora_batch

    g = torch.Generator().manual_seed(0)
    lens, slots = [1, 40, 3], [0, 1, -1]
    st, ln, sl = _segments(lens, slots)
    x, a = torch.randn(44, 40, generator=g), torch.randn(2, 8, 40, generator=g)
    xa = kernels.shrink(x, a, st, ln, sl, 40, block_m=kernels.INVARIANT_BLOCK_M)
    used = torch.repeat_interleave(sl, ln) >= 0
    assert torch.allclose(xa.sum(0)[used], kernels.shrink_ref(x, a, st, ln, sl)[used], atol=1e-4, rtol=1e-4)
    det, default = LoraWeights(2, 8, torch.float32, "cpu", deterministic=True), LoraWeights(2, 8, torch.float32, "cpu")
    d, d0 = det("layers.0.self_attn.o_proj", 40, (24,)), default("layers.0.self_attn.o_proj", 40, (24,))
    assert d.block_m == kernels.INVARIANT_BLOCK_M and d0.block_m is None
    assert d.k_chunk == kernels.K_PER_SPLIT and d0.k_chunk is None
    with pytest.raises(RuntimeError, match="deterministic LoRA runs the Triton kernels only"):
        d(x[:4], torch.zeros(4, 24), lora_batch([0, 1], [1, 3], "cpu", use_triton=False))


def test_config_refuses_lora_on_embedding_workers():
    from tandem.config import EngineConfig

    with pytest.raises(ValueError, match="enable_lora / lora_paths: not with is_embedding=true"):
        EngineConfig(is_embedding=True, lora_paths=["a=/x"])
    with pytest.raises(ValueError, match="not with is_embedding=true"):
        EngineConfig(is_embedding=True, enable_lora=True, max_lora_rank=8)


def test_lora_is_refused_with_tensor_parallelism(demo_models):
    """The adapters' A/B are not sharded like the column- and row-parallel layers they add to: the
    config names the fields, and the model refuses to be built that way."""
    from tandem.config import EngineConfig
    from tandem.engine.loader import load_model
    from tandem.engine.tensor_parallel import TensorParallel

    with pytest.raises(ValueError, match="enable_lora / lora_paths: not with tp_size=2"):
        EngineConfig(tp_size=2, lora_paths=["a=/x"])
    with pytest.raises(ValueError, match="not with tp_size=4"):
        EngineConfig(tp_size=4, enable_lora=True, max_lora_rank=8)
    assert EngineConfig(tp_size=1, lora_paths=["a=/x"]).lora_enabled
    assert EngineConfig(tp_size=2).tp_size == 2
    with pytest.raises(ValueError, match="LoRA with tensor parallelism"):
        load_model(str(demo_models["dense"]), torch.float32, "cpu", load_format="dummy",
                   tp=TensorParallel(rank=0, size=2), lora=object())


# ---- adapters ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(demo_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    m = demo_models["dense"]
    return {
        "a": build_adapter(m, str(root / "a"), rank=8, seed=1),  # every module
        "b": build_adapter(m, str(root / "b"), rank=4, targets=("q_proj", "v_proj", "down_proj"), seed=2),
        "c": build_adapter(m, str(root / "c"), rank=8, targets=("k_proj", "o_proj", "gate_proj", "up_proj"), seed=3),
    }


@pytest.fixture(scope="module")
def lora_llm(demo_models, make_llm, adapters):
    return make_llm(demo_models["dense"], lora_paths=[f"{n}={p}" for n, p in adapters.items()],
                    max_loras_per_batch=3, max_lora_rank=8)


@pytest.fixture(scope="module")
def hf_merged(demo_models, adapters):
    from transformers import AutoModelForCausalLM

    out = {}
    for name in [None, *adapters]:
        hf = AutoModelForCausalLM.from_pretrained(demo_models["dense"], dtype=torch.float32).eval()
        if name is not None:
            hf.load_state_dict(merge_into(hf.state_dict(), adapters[name]))
        out[name] = hf
    return out


def _hf_greedy(hf, ids, n):
    t = torch.tensor([ids])
    return hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False)[0, len(ids):].tolist()


def test_adapter_logits_and_tokens_match_merged_reference(lora_llm, hf_merged, prompts):
    eng = lora_llm.engine
    ids = eng.tokenize(prompts[0])
    for name in ["a", "b", "c"]:
        out = lora_llm.generate(ids, GREEDY, lora_name=name)[0]
        assert out.token_ids == _hf_greedy(hf_merged[name], ids, GREEDY.max_tokens), name
    # Logits of the whole prompt under adapter a, to 1e-4.
    from tandem.engine.request import Request

    r = Request(rid="logits", prompt_ids=ids, sampling=SamplingParams(), lora_name="a")
    r.lora_slot = eng.lora.acquire("a")
    assert eng.scheduler.ensure_pages(r, len(ids))
    try:
        fb = eng.runner.build([(r, len(ids))])
        fb.logits_indices = torch.arange(len(ids))
        ours = eng.model(fb, eng.pool.k_buffers, eng.pool.v_buffers)
        with torch.no_grad():
            ref = hf_merged["a"](torch.tensor([ids])).logits[0].float()
            base = hf_merged[None](torch.tensor([ids])).logits[0].float()
        assert (ours - ref).abs().max().item() <= 1e-4
        assert (ours - base).abs().max().item() > 1e-2  # a no-op adapter would fail here
    finally:
        eng.pool.free(r.pages)
        eng.lora.release(r.lora_slot)


def test_adapter_changes_the_output(lora_llm, prompts):
    ids = lora_llm.engine.tokenize(prompts[1])
    base = lora_llm.generate(ids, GREEDY)[0].token_ids
    assert lora_llm.generate(ids, GREEDY, lora_name="a")[0].token_ids != base


def test_mixed_batch_equals_each_alone(lora_llm, prompts):
    """Three adapters of two ranks and the base model in one batch (prefill and decode) give the
    tokens each gives alone."""
    ps = [lora_llm.engine.tokenize(p) for p in prompts[:4]]
    names = ["a", None, "b", "c"]
    alone = [lora_llm.generate(p, GREEDY, lora_name=n)[0].token_ids for p, n in zip(ps, names)]
    mixed = lora_llm.generate(ps, GREEDY, lora_name=names)
    assert [o.token_ids for o in mixed] == alone
    same = lora_llm.generate([ps[1]] * 4, GREEDY, lora_name=["a", None, "b", "c"])
    assert len({tuple(o.token_ids) for o in same}) >= 3  # one prompt, different models in one batch
    assert [o.token_ids for o in same] == [lora_llm.generate(ps[1], GREEDY, lora_name=n)[0].token_ids
                                           for n in ["a", None, "b", "c"]]


def test_same_prompt_under_two_adapters_shares_no_pages(lora_llm, prompts):
    eng = lora_llm.engine
    eng.flush_cache()
    ids = eng.tokenize(" ".join(prompts[:4]) * 2)
    assert len(ids) > 3 * eng.page_size
    first = lora_llm.generate(ids, GREEDY, lora_name="a")[0]
    assert first.cached_tokens == 0
    assert eng.cached_prefix_tokens(ids, "a") >= 2 * eng.page_size
    assert eng.cached_prefix_tokens(ids, "b") == 0 and eng.cached_prefix_tokens(ids) == 0
    assert lora_llm.generate(ids, GREEDY, lora_name="b")[0].cached_tokens == 0
    assert lora_llm.generate(ids, GREEDY)[0].cached_tokens == 0
    assert lora_llm.generate(ids, GREEDY, lora_name="a")[0].cached_tokens > 0


def test_pd_decode_prefix_reuse_matches_under_the_request_adapter_only(lora_llm, prompts):
    """Decode-side prefix reuse (allocate_external(reuse_prefix=True)) shares pages cached under the
    request's own adapter, never another adapter's or the base model's."""
    eng = lora_llm.engine
    eng.flush_cache()
    ids = eng.tokenize(" ".join(prompts[:4]) * 2)
    lora_llm.generate(ids, GREEDY, lora_name="a")
    for name, reused in (("b", False), (None, False), ("a", True)):
        alloc = eng.allocate_external(ids, SamplingParams(max_tokens=4, temperature=0.0), reuse_prefix=True,
                                      lora_name=name)
        assert (alloc.num_cached_tokens >= 2 * eng.page_size) == reused and (alloc.num_cached_tokens > 0) == reused
        assert eng.abort(alloc.rid)
        eng.step()
    assert not any(eng.lora.slot_users)  # each aborted allocation gave its adapter slot back


def test_a_request_moved_mid_decode_keeps_its_adapter_and_slot(lora_llm, prompts):
    """Drain by moving KV under an adapter (one engine as holder and target: its pages copied into
    pages reserved for the move): the target's allocation pins the adapter's LoRA slot like a PD
    request's, the request decodes on with exactly the tokens of an uninterrupted run under that
    adapter (not the base model's), and every slot is free once it ended."""
    from tests.unit.engine.test_disaggregation import copy_pages, run_to_end

    eng = lora_llm.engine
    eng.flush_cache()
    ids = eng.tokenize(prompts[1])
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = lora_llm.generate(ids, sp, lora_name="a")[0].token_ids
    assert want != lora_llm.generate(ids, sp)[0].token_ids
    eng.flush_cache()
    rid = eng.add_request(ids, sp, lora_name="a")
    before = []
    while len(before) < 4:
        before += [t for o in eng.step() if o.rid == rid for t in o.new_token_ids]
    held = eng.hold_for_move(rid)
    before += [t for o in eng.step() if o.rid == rid for t in o.new_token_ids]
    assert held.lora_name == "a" and held.last_token_id == before[-1]
    slot = eng.lora.slot_of("a")
    assert eng.lora.slot_users[slot] == 1  # the held request keeps its slot until its pages are sent
    alloc = eng.allocate_external(ids, sp, rid="moved", output_ids=before, lora_name="a")
    assert eng.lora.slot_users[slot] == 2  # the target pins it for the moved request
    out = eng.export_held(rid)
    copy_pages(eng, eng, out.pages_final, alloc.page_indices)
    eng.release(rid, cache=False)
    assert eng.lora.slot_users[slot] == 1
    eng.activate_external("moved", before[-1])
    rest, reason = run_to_end(eng, "moved")
    assert reason == "length" and before + rest == want
    assert not any(eng.lora.slot_users)


def test_kv_events_carry_the_adapter_and_distinct_hashes(lora_llm, prompts):
    eng = lora_llm.engine
    eng.flush_cache()
    events = []
    eng.subscribe_kv_events(events.extend)
    ids = eng.tokenize(" ".join(prompts[:3]))
    for name in ["a", None]:
        lora_llm.generate(ids, GREEDY, lora_name=name)
    stored = [e for e in events if type(e).__name__ == "BlockStored" and e.parent_block_hash is None]
    by_lora = {e.lora_name: e for e in stored}
    assert set(by_lora) >= {"a", None}
    assert by_lora["a"].token_ids[:eng.page_size] == by_lora[None].token_ids[:eng.page_size]
    assert by_lora["a"].block_hashes[0] != by_lora[None].block_hashes[0]


def test_more_adapters_than_slots_wait_and_finish(demo_models, make_llm, adapters, prompts):
    llm = make_llm(demo_models["dense"], lora_paths=[f"{n}={p}" for n, p in adapters.items()],
                   max_loras_per_batch=1, max_loaded_loras=1)
    ps = [llm.engine.tokenize(p) for p in prompts[:3]]
    alone = [llm.generate(p, GREEDY, lora_name=n)[0].token_ids for p, n in zip(ps, "abc")]
    assert [o.token_ids for o in llm.generate(ps, GREEDY, lora_name=list("abc"))] == alone
    assert llm.engine.lora.counters.disk_loads > 0  # one adapter in memory: the others read again


def test_load_unload_list_and_errors(lora_llm, adapters, demo_models, tmp_path, prompts):
    eng = lora_llm.engine
    assert set(eng.list_loras()) == {"a", "b", "c"}
    with pytest.raises(UnknownLoraError, match="'nope'"):
        lora_llm.generate("hi", GREEDY, lora_name="nope")
    eng.load_lora("a2", adapters["a"])
    ids = eng.tokenize(prompts[0])
    assert lora_llm.generate(ids, GREEDY, lora_name="a2")[0].token_ids == \
        lora_llm.generate(ids, GREEDY, lora_name="a")[0].token_ids
    with pytest.raises(LoraAdapterError, match="already loaded"):
        eng.load_lora("a2", adapters["a"])
    eng.unload_lora("a2")
    assert "a2" not in eng.list_loras()
    with pytest.raises(UnknownLoraError):
        eng.unload_lora("a2")
    # Busy: a waiting/running request pins its adapter.
    rid = eng.add_request(ids, GREEDY, lora_name="b")
    eng.step()
    with pytest.raises(LoraAdapterError, match="in use"):
        eng.unload_lora("b")
    while eng.has_work():
        eng.step()
    assert rid not in eng.requests
    big = build_adapter(demo_models["dense"], str(tmp_path / "big"), rank=16, seed=5)
    with pytest.raises(LoraAdapterError, match="max-lora-rank"):
        eng.load_lora("big", big)
    with pytest.raises(LoraAdapterError, match="adapter_config.json"):
        eng.load_lora("none", str(tmp_path))
    os.remove(os.path.join(big, "adapter_model.safetensors"))


def test_triton_backend_with_lora_matches_torch_native(demo_models, make_llm, adapters, lora_llm, prompts):
    llm = make_llm(demo_models["dense"], lora_paths=[f"a={adapters['a']}", f"b={adapters['b']}"],
                   attention_backend="triton", max_lora_rank=8)
    # Tiny (the interpreter runs every kernel, ~3 s a layer): one prefill step, two segments of two
    # adapters of different ranks; the first token's logprob checks the last rows' logits. Decode's
    # one-row segments are in test_sgmv_shrink_expand_match_torch; decode with CUDA graphs in
    # benchmarks/gpu_engine_check.py --only lora.
    ps = [llm.engine.tokenize(p)[:5] for p in prompts[:2]]
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=True)
    names = ["a", "b"]
    got = llm.generate(ps, sp, lora_name=names)
    ref = lora_llm.generate(ps, sp, lora_name=names)
    base = lora_llm.generate(ps, sp)
    for g, r, b in zip(got, ref, base):
        assert g.token_ids == r.token_ids
        assert max(abs(x - y) for x, y in zip(g.logprobs, r.logprobs)) <= 1e-4
        assert g.token_ids != b.token_ids or max(abs(x - y) for x, y in zip(g.logprobs, b.logprobs)) > 1e-3


def test_per_adapter_counts_reach_prometheus(lora_llm, prompts, tmp_path):
    """The engine counts requests and tokens by adapter; the stats reporter sends them as deltas
    and the worker's metrics expose sglang:lora_*_total{lora_name}."""
    from prometheus_client import CollectorRegistry
    from tandem.metrics import EngineMetrics
    from tandem.worker.stats_reporter import StatsReporter

    eng = lora_llm.engine
    sent = []
    rep = StatsReporter(f"ipc://{tmp_path}/stats", page_size=eng.page_size, stats=eng.stats)
    rep.sender.close()
    rep.sender = type("Collect", (), {"send": lambda self, m: sent.append(m), "close": lambda self: None})()
    rep.after_step(eng.stats())  # the baseline: what earlier tests counted is not in the deltas
    ids = eng.tokenize(prompts[2])
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    lora_llm.generate([ids, ids, ids], sp, lora_name=["b", "b", None])
    rep.after_step(eng.stats())
    lora_llm.generate(ids, sp, lora_name="c")
    rep.after_step(eng.stats())
    first, second = sent[1], sent[2]
    assert first.lora_requests == {"b": 2} and first.lora_generation_tokens == {"b": 10}
    assert first.lora_prompt_tokens == {"b": 2 * len(ids)}
    assert second.lora_requests == {"c": 1} and second.lora_prompt_tokens == {"c": len(ids)}
    reg = CollectorRegistry()
    em = EngineMetrics(reg, model_name="m", engine_type="unified", worker_id="w")
    for m in sent[1:]:
        em.apply(type(m).from_bytes(m.to_bytes()))  # through the wire format
    labels = {"model_name": "m", "engine_type": "unified", "worker_id": "w", "tp_rank": "0", "pp_rank": "0"}
    assert reg.get_sample_value("sglang:lora_requests_total", {**labels, "lora_name": "b"}) == 2
    assert reg.get_sample_value("sglang:lora_generation_tokens_total", {**labels, "lora_name": "b"}) == 10
    assert reg.get_sample_value("sglang:lora_prompt_tokens_total", {**labels, "lora_name": "c"}) == len(ids)
    assert reg.get_sample_value("sglang:lora_requests_total", {**labels, "lora_name": "a"}) is None


def test_deploy_local_lora_serves_the_demo_adapters(demo_models, tmp_path):
    """LORA=1 (``lora: true``): every worker of the local stack gets the demo adapters, built next
    to the model; a MoE model is refused by name."""
    from deploy.local.stack import load_stack_config, plan_stack

    model = tmp_path / "tandem-demo-dense"
    model.symlink_to(os.path.abspath(demo_models["dense"]))
    cfg = load_stack_config(overrides={"model_path": str(model), "lora": "1"})
    workers = [s for s in plan_stack(cfg) if s.kind in ("prefill", "decode")]
    assert len(workers) == 2
    for s in workers:
        names = [item.partition("=")[0] for item in s.config["lora_paths"]]
        assert names == ["tandem-demo-lora-a", "tandem-demo-lora-b"]
        for item in s.config["lora_paths"]:
            assert os.path.isfile(os.path.join(item.partition("=")[2], "adapter_config.json"))
    assert "lora_paths" not in plan_stack(load_stack_config(overrides={"model_path": str(model)}))[0].config
    with pytest.raises(ValueError, match="MoE"):
        plan_stack(load_stack_config(overrides={"model_path": os.path.abspath(demo_models["moe"]), "lora": True}))
    # EMBED= beside LORA=1: the embedding worker serves the base embedding model, without adapters;
    # an embedding MODEL with LORA=1 is refused by name.
    from tests.support.models import demo_model

    embed = demo_model("tandem-demo-embed")
    specs = plan_stack(load_stack_config(overrides={"model_path": str(model), "lora": "1",
                                                    "embedding_model_path": embed}))
    by_name = {s.name: s.config for s in specs}
    assert by_name["embed-0"]["is_embedding"] and "lora_paths" not in by_name["embed-0"]
    assert by_name["decode-0"]["lora_paths"]
    with pytest.raises(ValueError, match="LORA=1 with MODEL=.*embedding model"):
        load_stack_config(overrides={"model_path": embed, "lora": "1"})


def test_engine_bench_lora_runs_tiny_and_writes_its_results(demo_models, tmp_path, capsys):
    """The GPU gate script (``engine_bench.py --lora``) on the demo model, tiny: both sides measured
    in one run, the targets printed met or not, the results file written by the script."""
    import json

    from benchmarks.engine_bench import main

    out = tmp_path / "lora.json"
    assert main(["--lora", "--model", demo_models["dense"], "--batch-sizes", "1", "2", "--input-len", "8",
                 "--output-len", "2", "--lora-adapters", "2", "--lora-rank", "4", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["batch"] for row in r["rows"]] == [1, 2] and r["lora_rank"] == 4
    for row in r["rows"]:
        assert row["base_tok_s"] > 0 and row["lora_tok_s"] > 0 and row["ratio"] == row["lora_tok_s"] / row["base_tok_s"]
    assert [row["adapters_in_batch"] for row in r["rows"]] == [1, 2]
    (gate,) = r["gates"]  # batch 1 only: no batch of 64 in this run
    assert gate["target"].startswith("batch 1") and gate["met"] == (r["rows"][0]["ratio"] >= 0.9)
    assert "target: batch 1" in capsys.readouterr().out and out.with_suffix(".md").is_file()
    assert r["git"]["commit"] and "--lora" in r["command"]
