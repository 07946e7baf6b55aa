"""Expert parallelism across 2 processes (gloo, loopback) on the MoE demo model.

The leader engine runs in this process and holds half of every MoE layer's experts; the
follower is a spawned process holding the other half. Greedy tokens must equal a
single-rank engine's, and the logprobs must be bit-identical to a single-rank engine
using the same expert placement (the EP reduction only adds zeros).
"""
from __future__ import annotations

import json

import pytest
import torch
from tandem.config.schemas import EngineConfig
from tandem.engine import EngineCore, SamplingParams
from tandem.engine.parallel import start_parallel
from tandem.eplb import rebalance_experts
from tandem.eplb.placement import ExpertLocation

from tests.support.models import demo_model

CFG = dict(max_total_tokens=4096, dtype="float32", device="cpu", chunked_prefill_size=40)
PROMPTS = [
    "The GNU General Public License is a free, copyleft license for",
    "The GNU General Public License is a free, copyleft license for software and other kinds",
    "def __init__(self, name, value=None):\n    self.name = name\n",
    "import os\nimport sys\n\n",
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
    "class Error(Exception):\n    \"\"\"Base class for",
    "return",
    "Licensed under the Apache License, Version 2.0 (the \"License\");",
]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True)
SAMPLED = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True, logprobs=True)

pytestmark = pytest.mark.timeout(300)
# cpu: gloo, fp32 (always); cuda: NCCL on 2 GPUs in bf16 (skipped without them)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.requires_2_gpus),
]


@pytest.fixture(scope="module")
def moe_path():
    torch.set_num_threads(1)
    return demo_model("tandem-demo-moe")


def generate(engine, at_step=None):
    """All prompts at once (plus one seeded sampled request); at_step=(n, fn) runs fn after step n."""
    sps = [GREEDY] * len(PROMPTS) + [SAMPLED]
    rids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS + PROMPTS[:1], sps)]
    toks = {r: [] for r in rids}
    lps = {r: [] for r in rids}
    steps = 0
    while engine.has_work():
        for o in engine.step():
            toks[o.rid] += o.new_token_ids
            lps[o.rid] += o.new_logprobs
        steps += 1
        if at_step is not None and steps == at_step[0]:
            at_step[1]()
    assert engine.num_available_pages == engine.pool.num_pages
    return [toks[r] for r in rids], [lps[r] for r in rids]


def base(device):
    return dict(CFG, device=device, dtype="float32" if device == "cpu" else "bfloat16")


def one_rank(path, location=None, at_step=None, device="cpu", **cfg):
    # Expert parallelism always waits for each step's tokens: so does its reference, or a
    # finished request's wasted row would change the batches (and MoE float sums) it is held to.
    if location is not None:  # the same placement on one rank
        cfg = dict(cfg, init_expert_location=json.dumps(
            {"physical_to_logical_map": location.physical_to_logical.tolist()}))
    engine = EngineCore(path, **base(device), disable_overlap_schedule=True, **cfg)
    if location is not None and at_step is not None:
        n, new = at_step
        new = ExpertLocation(new.physical_to_logical, new.num_logical, 1)
        at_step = (n, lambda: (engine.eplb.submit(new), engine.eplb.apply_pending()))
    return generate(engine, at_step)


def with_ep(path, at_step=None, device="cpu", **cfg):
    leader = start_parallel(EngineConfig(model_path=path, ep_size=2, **base(device), **cfg), num_threads=1,
                                   timeout_s=120)
    engine = leader.engine
    try:
        moe = engine.model.moe_layers()
        assert moe[0].num_local == leader.eplb.location.slots_per_rank  # only rank 0's half
        if at_step is not None:
            n, new = at_step
            at_step = (n, lambda: (leader.eplb.submit(new), leader.eplb.apply_pending()))
        out = generate(engine, at_step)
        return out, leader.eplb.location
    finally:
        leader.close()
        for p in leader.processes:
            assert p.exitcode == 0, f"follower exited with {p.exitcode}"


@pytest.mark.parametrize("device", DEVICES)
def test_two_ranks_match_one_rank(moe_path, device):
    ref_toks, ref_lps = one_rank(moe_path, device=device)
    (toks, lps), loc = with_ep(moe_path, device=device)
    assert loc == ExpertLocation.trivial(loc.num_layers, 8, 8, 2)
    assert toks == ref_toks
    assert lps == ref_lps  # same placement as the single rank: bit-identical


@pytest.fixture(scope="module")
def moe_with_kv_scales(moe_path, tmp_path_factory):
    """The MoE demo checkpoint plus per-layer K/V scales (not 1.0, and different per layer) under
    vLLM/SGLang's names."""
    import os

    from safetensors.torch import save_file
    from tandem.engine.model_config import ModelConfig

    out = tmp_path_factory.mktemp("moe-kv") / "moe-kv-scales"
    out.mkdir()
    for name in os.listdir(moe_path):
        os.symlink(os.path.join(moe_path, name), out / name)
    layers = ModelConfig.from_dir(moe_path).num_layers
    save_file({**{f"model.layers.{i}.self_attn.k_scale": torch.tensor(0.02 * (1 + i)) for i in range(layers)},
               **{f"model.layers.{i}.self_attn.v_scale": torch.tensor(0.01 * (1 + i)) for i in range(layers)}},
              str(out / "kv_scales.safetensors"))
    return str(out)


def test_two_ranks_match_one_rank_with_an_fp8_kv_cache(moe_with_kv_scales):
    """The follower stores K/V as the leader does (--kv-cache-dtype and the leader's scales):
    the same bits as one rank with the same FP8 cache."""
    fp8 = dict(kv_cache_dtype="fp8_e4m3")
    ref_toks, ref_lps = one_rank(moe_with_kv_scales, **fp8)
    (toks, lps), _ = with_ep(moe_with_kv_scales, **fp8)
    assert toks == ref_toks and lps == ref_lps


def test_kv_cache_calibration_is_refused_with_expert_parallelism(moe_path):
    with pytest.raises(ValueError, match="kv_cache_calibrate=1: not supported with tp_size=1, ep_size=2"):
        EngineConfig(model_path=moe_path, ep_size=2, kv_cache_dtype="fp8_e4m3", kv_cache_calibrate=1)


@pytest.mark.parametrize("device", DEVICES)
def test_redundant_experts_and_rebalance_mid_flight(moe_path, device):
    """10 slots (2 redundant), dynamic dispatch, a new placement applied on both ranks
    while requests are running."""
    cfg = dict(ep_num_redundant_experts=2, ep_dispatch_algorithm="dynamic")
    layers = 3  # demo MoE: 4 layers, the first dense
    load = torch.rand(layers, 8, generator=torch.Generator().manual_seed(0)) * 100
    init = ExpertLocation.trivial(layers, 8, 10, 2)
    new = ExpertLocation.from_rebalance(rebalance_experts(load, 10, 4, 1, 2), 8, 2)
    assert not torch.equal(init.physical_to_logical, new.physical_to_logical)

    plain_toks, _ = one_rank(moe_path, device=device)
    same_toks, same_lps = one_rank(moe_path, init, at_step=(6, new), device=device, **cfg)
    (toks, lps), loc = with_ep(moe_path, at_step=(6, new), device=device, **cfg)
    assert loc == new
    assert toks == same_toks and lps == same_lps  # EP == one rank with the same placements, bitwise
    same = sum(a == b for a, b in zip(toks[: len(PROMPTS)], plain_toks, strict=False))
    print(f"{device}: {same}/{len(PROMPTS)} greedy sequences equal to the 8-slot placement's")
    if device == "cpu":  # fp32: replicas' smaller GEMMs round within noise; bf16 on GPU may flip a token
        assert same == len(PROMPTS)


def test_engine_loop_drives_ep_with_idle_keepalive(moe_path):
    """The worker's threading: a loop thread steps the leader, requests arrive from another
    thread, idle gaps are bridged by keepalive no-ops; close() stops the follower cleanly."""
    import time

    from tandem.worker.engine_loop import EngineLoop, LoopHook

    class LeaderHook(LoopHook):  # what the worker hooks in: keepalive, and the recorder's passes
        def poll(self):
            leader.keepalive()

        def after_step(self, stats):
            leader.eplb.end_pass()

    ref_toks, _ = one_rank(moe_path)
    # The leader's engine builds the recorder into its MoE layers (rank 0 sees every token).
    leader = start_parallel(EngineConfig(model_path=moe_path, ep_size=2, expert_distribution_recorder_mode="stat",
                                                **CFG), num_threads=1, timeout_s=120, keepalive_s=0.05)
    engine = leader.engine
    rec = engine.eplb.recorder
    rec.start()
    loop = EngineLoop(engine, "ep-test")
    loop.add_hook(LeaderHook())
    loop.start()
    try:
        got, cached = [], []
        for half in (PROMPTS[:4], PROMPTS[4:]):
            streams = [loop.submit(engine.tokenize(p), GREEDY, rid=f"r{len(got)}-{i}") for i, p in enumerate(half)]
            for s in streams:
                outs = list(s)
                got.append([t for out in outs for t in out.new_token_ids])
                cached.append(outs[-1].cached_tokens)
            time.sleep(0.3)  # idle: keepalives flow
        assert got == ref_toks[: len(PROMPTS)]
        assert leader.messages_sent["noop"] >= 2 and leader.messages_sent["forward"] > 0
        # every computed token (prompt + all but the last output token) routed to k=2 experts per layer
        computed = sum(len(engine.tokenize(p)) - c + len(t) - 1 for p, t, c in zip(PROMPTS, got, cached, strict=True))
        assert rec.logical_load().sum(1).tolist() == [2 * computed] * 3
    finally:
        loop.stop()
        leader.close()
    assert all(p.exitcode == 0 for p in leader.processes)
