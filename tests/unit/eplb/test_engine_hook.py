"""EplbEngineHook on the engine's MoE layer: outputs independent of placement, plans applied."""
from types import SimpleNamespace

import pytest
import torch
from tandem.engine import model as model_mod
from tandem.eplb import rebalance_experts
from tandem.eplb.engine_hook import EplbEngineHook
from tandem.eplb.placement import ExpertLocation
from tandem.eplb.recorder import ExpertDistributionRecorder

E, H, INTER, K = 8, 16, 8, 2


def moe_model(layers=2):
    cfg = SimpleNamespace(
        num_experts=E, hidden_size=H, moe_intermediate_size=INTER, num_experts_per_tok=K,
        scoring_func="softmax", norm_topk_prob=True, routed_scaling_factor=1.0, n_group=1, topk_group=1,
        shared_expert_intermediate_size=0,
    )
    torch.manual_seed(0)
    net = torch.nn.ModuleList(model_mod.MoE(cfg, i, False, False) for i in range(layers))
    with torch.no_grad():
        for m in net:
            for p in (m.gate_weight, m.w13, m.w2):
                p.normal_(0, 0.1)  # keeps activations O(1): only float summation order differs
    return net


def run(net, x, hook=None):
    if hook:
        hook.on_forward_start()
    for m in net:
        x = x + m(x)
    if hook:
        hook.on_forward_end()
    return x


@pytest.mark.parametrize("algo", ["static", "dynamic", "random"])
def test_outputs_do_not_depend_on_placement(algo):
    x = torch.randn(24, H, generator=torch.Generator().manual_seed(1))
    ref = run(moe_model(), x)
    net = moe_model()
    w = torch.rand(2, E) * 100
    loc = ExpertLocation.from_rebalance(rebalance_experts(w, 12, 1, 1, 4), E, 4)
    rec = ExpertDistributionRecorder("stat_approx", 2, E, physical_to_logical=loc.physical_to_logical)
    rec.start()
    hook = EplbEngineHook(net, loc, algo, recorder=rec)
    hook.install()
    assert net[0].w13.shape[0] == 12
    out = run(net, x, hook)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert rec.logical_load().sum(1).tolist() == [24 * K, 24 * K]

    # apply a different plan between passes: same outputs again
    new = ExpertLocation.from_rebalance(rebalance_experts(torch.rand(2, E) * 100, 12, 1, 1, 4), E, 4)
    hook.submit(new, version=3)
    moves = hook.apply_pending()
    assert moves == int((new.physical_to_logical != loc.physical_to_logical).sum())
    assert hook.version == 3 and torch.equal(net[1].physical_to_logical, new.physical_to_logical[1])
    torch.testing.assert_close(run(net, x, hook), ref, rtol=1e-5, atol=1e-5)


def test_wrong_plan_keeps_old_placement():
    net = moe_model()
    loc = ExpertLocation.trivial(2, E, 12, 4)
    hook = EplbEngineHook(net, loc)
    hook.install()
    with pytest.raises(ValueError, match="does not match"):
        hook.submit(ExpertLocation.trivial(2, E, 16, 4))
    assert hook.apply_pending() == 0 and hook.location is loc
    with pytest.raises(ValueError, match="MoE layers"):
        EplbEngineHook(moe_model(layers=3), loc)
