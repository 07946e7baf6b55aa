"""EplbRuntime on the engine's MoE layer: outputs independent of placement, plans applied in place."""
from types import SimpleNamespace

import pytest
import torch
from tandem.engine import model as model_mod
from tandem.eplb import rebalance_experts
from tandem.eplb.dispatch import ExpertDispatcher
from tandem.eplb.placement import ExpertLocation
from tandem.eplb.recorder import ExpertDistributionRecorder
from tandem.eplb.runtime import EplbRuntime

E, H, INTER, K = 8, 16, 8, 2
CFG = SimpleNamespace(
    num_experts=E, hidden_size=H, moe_intermediate_size=INTER, num_experts_per_tok=K,
    scoring_func="softmax", norm_topk_prob=True, routed_scaling_factor=1.0, n_group=1, topk_group=1,
    shared_expert_intermediate_size=0,
)


def checkpoint(layers=2):
    """Per layer: router and logical experts (what a checkpoint holds)."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(E, H, generator=g) * 0.1, torch.randn(E, 2 * INTER, H, generator=g) * 0.1,
             torch.randn(E, H, INTER, generator=g) * 0.1) for _ in range(layers)]


def moe_model(ckpt, dispatcher=None, recorder=None):
    net = torch.nn.ModuleList(model_mod.MoE(CFG, i, False, False, i, dispatcher, recorder) for i in range(len(ckpt)))
    with torch.no_grad():
        for m, (router, w13, w2) in zip(net, ckpt):
            m.gate_weight.copy_(router)
            packed = m.pack_experts(w13, w2)
            m.w13.copy_(packed[0])
            m.w2.copy_(packed[1])
    return net


def run(net, x, recorder=None):
    fb = SimpleNamespace(positions=torch.arange(x.shape[0]), is_decode=False, seq_lens=None,
                         record_experts=recorder is not None)
    for m in net:
        x = x + m(x, None, fb)
    if recorder is not None:
        recorder.end_pass()
    return x


@pytest.mark.parametrize("algo", ["static", "dynamic", "random"])
def test_outputs_do_not_depend_on_placement(algo):
    ckpt = checkpoint()
    x = torch.randn(24, H, generator=torch.Generator().manual_seed(1))
    ref = run(moe_model(ckpt), x)
    w = torch.rand(2, E) * 100
    loc = ExpertLocation.from_rebalance(rebalance_experts(w, 12, 1, 1, 4), E, 4)
    one_rank = ExpertLocation(loc.physical_to_logical, E, 1)
    disp = ExpertDispatcher(one_rank, algo)
    rec = ExpertDistributionRecorder("stat_approx", 2, E, physical_to_logical=loc.physical_to_logical)
    rec.start()
    net = moe_model(ckpt, disp, rec)
    eplb = EplbRuntime(disp, [m.routed_weights() for m in net], rec)
    assert net[0].w13.shape[0] == 12
    out = run(net, x, rec)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert rec.logical_load().sum(1).tolist() == [24 * K, 24 * K]

    # a different plan between passes: copied into the same tensors, same outputs again
    ptrs = [(m.w13.data_ptr(), m.w2.data_ptr()) for m in net] + [disp.log2phy.data_ptr()]
    new = ExpertLocation.from_rebalance(rebalance_experts(torch.rand(2, E) * 100, 12, 1, 1, 1), E, 1)
    eplb.submit(new, version=3)
    moves = eplb.apply_pending()
    assert moves == int((new.physical_to_logical != one_rank.physical_to_logical).sum()) > 0
    assert eplb.version == 3 and torch.equal(disp.physical_to_logical, new.physical_to_logical)
    assert [(m.w13.data_ptr(), m.w2.data_ptr()) for m in net] + [disp.log2phy.data_ptr()] == ptrs  # in place
    for i, m in enumerate(net):
        for s, e in enumerate(new.physical_to_logical[i].tolist()):
            assert torch.equal(m.w13[s], ckpt[i][1][e]) and torch.equal(m.w2[s], ckpt[i][2][e])
    torch.testing.assert_close(run(net, x, rec), ref, rtol=1e-5, atol=1e-5)


def test_wrong_plan_keeps_old_placement():
    loc = ExpertLocation.trivial(2, E, 12, 1)
    disp = ExpertDispatcher(loc)
    net = moe_model(checkpoint(), disp)
    eplb = EplbRuntime(disp, [m.routed_weights() for m in net])
    with pytest.raises(ValueError, match="does not match"):
        eplb.submit(ExpertLocation.trivial(2, E, 16, 1))
    assert eplb.apply_pending() == 0 and eplb.location is loc
    with pytest.raises(ValueError, match="MoE layers"):
        EplbRuntime(disp, [m.routed_weights() for m in net] * 2)
    with pytest.raises(ValueError, match="placement has 2 MoE layers"):
        moe_model(checkpoint(3), disp)
