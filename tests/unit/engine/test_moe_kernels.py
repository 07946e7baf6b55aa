"""The MoE kernels (routing, alignment, fused experts) against their torch references
(``tandem.engine.moe_math``, ``moe_align.align_ref``), on CPU through the Triton interpreter in
float32: top-k 1/4/8, grouped routing, sigmoid + correction bias, the folded shared expert,
redundant replicas under every dispatch algorithm, another EP rank's slots, empty experts, the
recorder's counts with a padded graph batch, 1 and 300 tokens."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tandem.engine import moe_math
from tandem.engine.kernels import fused_moe, moe_align, moe_routing
from tandem.engine.model import MoE
from tandem.engine.moe_math import RoutingSpec
from tandem.eplb import rebalance_experts
from tandem.eplb.dispatch import ExpertDispatcher
from tandem.eplb.placement import ExpertLocation

LAYERS = 3


def spec(E, k, scoring="softmax", n_group=1, topk_group=1, shared=0, gated=False, renorm=True, scale=1.0):
    return RoutingSpec(E, k, scoring, renorm, scale, n_group, topk_group, shared, gated)


def dispatcher(E, algo, ep_size=1, rank=0, redundant=4):
    g = torch.Generator().manual_seed(E)
    result = rebalance_experts(torch.rand(LAYERS, E, generator=g) * 100, E + redundant, 1, 1, ep_size)
    return ExpertDispatcher(ExpertLocation.from_rebalance(result, E, ep_size), algo, seed=99, rank=rank)


ROUTING_CASES = {
    "top1": (spec(16, 1), False, None),
    "top4 shared gated (Qwen2-MoE)": (spec(60, 4, shared=4, gated=True, renorm=False), False, None),
    "top8 (Qwen3-MoE)": (spec(128, 8), False, None),
    "softmax groups": (spec(32, 4, n_group=4, topk_group=2), False, None),
    "sigmoid bias groups (GLM-4/DeepSeek-V3)": (spec(64, 8, "sigmoid", 8, 4, shared=1, scale=2.5), True, None),
    "sigmoid bias": (spec(16, 2, "sigmoid"), True, None),
    "replicas static": (spec(32, 4), False, "static"),
    "replicas random": (spec(32, 8, "sigmoid", 4, 2), True, "random"),
    "replicas dynamic": (spec(16, 4, shared=2), False, "dynamic"),
}


@pytest.mark.parametrize("tokens", [1, 300])
@pytest.mark.parametrize("case", list(ROUTING_CASES))
def test_routing_kernel_matches_torch(case, tokens):
    sp, bias, algo = ROUTING_CASES[case]
    g = torch.Generator().manual_seed(tokens)
    E = sp.num_experts
    logits = torch.randn(tokens, E + int(sp.shared_gated), generator=g) * 2
    b = torch.randn(E, generator=g) * 0.3 if bias else None
    disp = dispatcher(E, algo, ep_size=2, rank=1) if algo else None  # rank 1 of 2: half the slots are elsewhere
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    seq_lens = torch.randint(0, 3, (tokens,), generator=g)  # 0 = a padding row of a graph batch
    counts = [torch.zeros(E, dtype=torch.int32) for _ in range(2)]
    args = (sp, logits, b, disp, 1, positions, False)
    ids, slots, weights = moe_routing.route(*args, counts[0], False, seq_lens)
    want_ids, want_slots, want_weights = moe_math.route_tokens(*args, counts[1], False, seq_lens)
    assert torch.equal(ids, want_ids) and torch.equal(slots, want_slots)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)
    assert torch.equal(counts[0], counts[1])
    k = sp.top_k
    # what the recorder must see: every routed entry of every real row
    host = torch.bincount(ids[seq_lens > 0, :k].reshape(-1).long(), minlength=E)
    assert torch.equal(counts[0].long(), host)
    assert bool((ids[:, :k].diff(dim=1) > 0).all())  # ascending expert ids: the summation order
    if sp.n_group > 1:  # group-limited: each token's experts come from at most topk_group groups
        groups = ids[:, :k].long() // (E // sp.n_group)
        assert all(len(set(row.tolist())) <= sp.topk_group for row in groups)
    if sp.num_shared:
        assert torch.equal(ids[:, k:], torch.arange(E, E + sp.num_shared, dtype=torch.int32).expand(tokens, -1))
        sentinel = (disp.num_local if disp else E) + sp.num_shared
        assert bool((slots[:, k:] == sentinel).all())  # shared_here=False: another rank computes them
    if disp is not None:  # a replica of the same expert, on this rank or marked "not here"
        phys = disp.dispatch(1, ids[:, :k], positions)
        assert torch.equal(disp.physical_to_logical[1][phys], ids[:, :k].long())
        assert bool(((slots[:, :k] < disp.num_local) == (phys >= disp.local_start)).all())


@pytest.mark.parametrize("tokens,rows,hidden", [(1, 61, 512), (13, 128, 300), (64, 9, 64), (65, 8, 32)])
def test_router_logits_kernel_matches_torch(tokens, rows, hidden):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(tokens, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    want = torch.nn.functional.linear(x, w)
    assert (moe_routing.router_logits(x, w) - want).abs().max().item() < 1e-4


def test_routing_counts_physical_slots_and_replicas_spread():
    sp = spec(8, 2)
    disp = dispatcher(8, "static", redundant=8)  # every expert twice
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    counts = [torch.zeros(16, dtype=torch.int32) for _ in range(2)]
    moe_routing.route(sp, logits, None, disp, 0, None, True, counts[0], True)
    moe_math.route_tokens(sp, logits, None, disp, 0, None, True, counts[1], True)
    assert torch.equal(counts[0], counts[1]) and int(counts[0].sum()) == 128
    assert int((counts[0] > 0).sum()) > 8  # static dispatch used both replicas of some experts


@pytest.mark.parametrize("n,num_slots,block_m", [
    (4, 60, 16),       # one token, top-4: most slots empty
    (300 * 8, 129, 16),  # 300 tokens, top-8, 128 experts + 1
    (0, 8, 16),        # nothing routed here
    (7, 3, 4),
    (300 * 4, 64, 32),
])
def test_align_kernel_matches_torch(n, num_slots, block_m):
    g = torch.Generator().manual_seed(n)
    slots = torch.randint(0, num_slots + 1, (n,), generator=g).to(torch.int32)  # num_slots = not here
    sorted_ids, block_slot = moe_align.align(slots, num_slots, block_m)
    want = moe_align.align_ref(slots, num_slots, block_m)
    assert torch.equal(sorted_ids, want[0]) and torch.equal(block_slot, want[1])
    # every entry here is in exactly one block of its own slot
    here = (slots < num_slots).nonzero().flatten()
    rows = sorted_ids.view(-1, block_m)
    listed = rows[rows < n]
    assert sorted(listed.tolist()) == here.tolist()
    for b, s in enumerate(block_slot.tolist()):
        entries = rows[b][rows[b] < n]
        assert s < num_slots or entries.numel() == 0
        assert bool((slots[entries.long()] == s).all())


def test_align_groups_and_pads():
    ids = torch.tensor([2, 0, 2, 3, 2, 0], dtype=torch.int32)  # 3 = not here (num_slots 3)
    sorted_ids, block_slot = moe_align.align(ids, 3, block_m=2)
    blocks = sorted_ids.view(-1, 2).tolist()
    assert blocks[:3] == [[1, 5], [0, 2], [4, 6]]  # slot 0, then slot 2 in two blocks (padding = 6)
    assert block_slot.tolist()[:3] == [0, 2, 2] and all(s == 3 for s in block_slot.tolist()[3:])


GEMM_CASES = [
    # schedule, tokens, entries per token, slots, hidden, inter
    ("tokens", 1, 4, 12, 64, 32),
    ("tokens", 5, 3, 4, 32, 48),
    ("blocks", 1, 4, 12, 64, 32),
    ("blocks", 17, 8, 9, 32, 16),   # more slots than fit one block
    ("blocks", 300, 3, 6, 32, 16),
]


@pytest.mark.parametrize("mode,T,KS,S,H,inter", GEMM_CASES)
def test_fused_experts_match_torch(mode, T, KS, S, H, inter):
    g = torch.Generator().manual_seed(T * KS)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(S, 2 * inter, H, generator=g) * 0.1
    w2 = torch.randn(S, H, inter, generator=g) * 0.1
    slots = torch.randint(0, S + 1, (T, KS), generator=g).to(torch.int32)  # S = on another EP rank
    slots[:, 0] = 1  # slot 0 stays empty
    weights = torch.rand(T, KS, generator=g)
    cfg = fused_moe.default_config(1 if mode == "tokens" else 1000, KS, H, inter, interpreter=True)
    assert cfg["mode"] == mode
    ref = moe_math.expert_rows(x, w13, w2, slots, weights)
    rows = fused_moe.fused_experts(x, w13, w2, slots, weights, combine=False, config=cfg)
    assert (rows - ref).abs().max().item() < 1e-5
    assert bool((rows[slots == S] == 0).all())  # not here: zero, for the all-reduce
    out = fused_moe.fused_experts(x, w13, w2, slots, weights, combine=True, config=cfg)
    assert (out - moe_math.combine(ref)).abs().max().item() < 1e-5
    if mode == "tokens":  # the down projection split from the combine: the same sums
        split = fused_moe.fused_experts(x, w13, w2, slots, weights, combine=True, config=dict(cfg, split_down=True))
        assert torch.equal(split, out)
    assert torch.equal(fused_moe.combine_rows(ref), moe_math.combine(ref))


def test_config_lookup_takes_the_nearest_tuned_batch(tmp_path, monkeypatch):
    tuned = {"configs": {fused_moe.shape_key(8, 64, 32, torch.float32): {
        "1": {"mode": "tokens", "up": {"BLOCK_N": 8}, "down": {"BLOCK_N": 8}},
        "64": {"mode": "blocks", "BLOCK_M": 16, "up": {}, "down": {}}}}}
    (tmp_path / "fused_moe_cpu.json").write_text(__import__("json").dumps(tuned))
    monkeypatch.setattr(fused_moe, "CONFIG_DIR", str(tmp_path))
    fused_moe._tuned.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert fused_moe.get_config(1, 8, 64, 32, torch.float32, cpu)["up"]["BLOCK_N"] == 8
        assert fused_moe.get_config(2, 8, 64, 32, torch.float32, cpu)["mode"] == "blocks"
        assert fused_moe.get_config(500, 8, 64, 32, torch.float32, cpu) == fused_moe.default_config(
            500, 8, 64, 32, interpreter=True)  # larger than any tuned batch: the default
        assert fused_moe.get_config(1, 4, 64, 32, torch.float32, cpu) == fused_moe.default_config(
            1, 4, 64, 32, interpreter=True)  # another shape: untuned
    finally:
        fused_moe._tuned.cache_clear()


def _layer(shared: bool, disp=None, recorder=None):
    cfg = SimpleNamespace(num_experts=16, hidden_size=32, moe_intermediate_size=16, num_experts_per_tok=4,
                          scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=1.5, n_group=4,
                          topk_group=2, shared_expert_intermediate_size=32 if shared else 0)
    torch.manual_seed(0)
    m = MoE(cfg, 1, shared, True, 1, disp, recorder)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("tokens", [1, 300])
def test_moe_layer_triton_equals_torch_with_replicas_and_recorder(tokens):
    """The whole layer: routing kernel + fused experts (shared expert folded: 2 chunks) against the
    torch path, with redundant replicas and the recorder counting a padded batch."""
    from tandem.engine.ops import TritonOps
    from tandem.eplb.recorder import ExpertDistributionRecorder

    disp = dispatcher(16, "random", redundant=4)
    recs = [ExpertDistributionRecorder("stat", LAYERS, 16) for _ in range(2)]
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 32, generator=g)
    seq_lens = torch.randint(0, 3, (tokens,), generator=g)
    fb = SimpleNamespace(positions=torch.arange(tokens) + 7, is_decode=True, seq_lens=seq_lens, record_experts=True)
    ops = TritonOps(SimpleNamespace(inv_freq=torch.ones(4)), 16)
    outs = []
    for rec, use in zip(recs, (ops, None)):
        layer = _layer(True, disp, rec)
        assert layer.spec.num_shared == 2 and layer.shared is None
        outs.append(layer(x, use, fb))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5
    assert torch.equal(recs[0].counter(1), recs[1].counter(1))
    assert int(recs[0].counter(1).sum()) == 4 * int((seq_lens > 0).sum())
