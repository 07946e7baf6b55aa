"""Expert parallelism, simulated in one process: two sharded MoE copies (one per "rank",
run on two threads whose all_reduce sums their buffers) against the one-rank MoE.

Exactness argument under test: each (token, k) entry is computed by exactly one rank, so
the reduce only adds zeros, and each token's k outputs are summed in logical-expert order.
"""
from __future__ import annotations

import copy
import threading
from types import SimpleNamespace

import pytest
import torch
from tandem.engine.expert_parallel import ExpertParallelGroup, ExpertParallelHook
from tandem.engine.model import MoE
from tandem.eplb import rebalance_experts
from tandem.eplb.engine_hook import EplbEngineHook
from tandem.eplb.placement import ExpertLocation

E, H, INTER, LAYERS = 8, 32, 16, 2


def moe_net(top_k: int = 2, shared: bool = True) -> torch.nn.ModuleList:
    cfg = SimpleNamespace(
        num_experts=E, hidden_size=H, moe_intermediate_size=INTER, num_experts_per_tok=top_k,
        scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=1.0, n_group=4, topk_group=2,
        shared_expert_intermediate_size=INTER if shared else 0,
    )
    torch.manual_seed(0)
    net = torch.nn.ModuleList(MoE(cfg, i, False, True) for i in range(LAYERS))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def run(net, x):
    with torch.inference_mode():
        for m in net:
            x = x + m(x)
    return x


class ThreadGroup:
    """In-process stand-in for the EP process group: ranks are threads."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.bufs: list = [None] * size

    def member(self, rank: int) -> ExpertParallelGroup:
        group = self

        class Member(ExpertParallelGroup):
            def all_reduce(self, t):
                group.bufs[rank] = t
                group.barrier.wait()
                if rank == 0:
                    total = group.bufs[0].clone()
                    for b in group.bufs[1:]:
                        total += b
                    group.total = total
                group.barrier.wait()
                t.copy_(group.total)
                group.barrier.wait()

        return Member(rank, self.size, torch.device("cpu"))


def run_ep(net, loc, x, algo="static", plan=None):
    """Run ``net`` sharded over ``loc.ep_size`` thread-ranks; every rank's output."""
    group = ThreadGroup(loc.ep_size)
    outs, errors = [None] * loc.ep_size, []
    nets = [copy.deepcopy(net) for _ in range(loc.ep_size)]
    hooks = [ExpertParallelHook(nets[r], loc, group.member(r), algo, seed=7) for r in range(loc.ep_size)]
    for h in hooks:
        h.install()

    def rank_main(r):
        try:
            if plan is not None:
                run(nets[r], x)  # one pass on the old placement, then switch
                hooks[r].set_location(plan)
            outs[r] = run(nets[r], x)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(loc.ep_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return outs, nets, hooks


def one_rank(net, loc, x, algo="static"):
    net = copy.deepcopy(net)
    hook = EplbEngineHook(net, loc, algo, seed=7)
    hook.install()
    return run(net, x)


X = torch.randn(40, H, generator=torch.Generator().manual_seed(3))


def placements():
    w = torch.rand(LAYERS, E, generator=torch.Generator().manual_seed(5)) * 100
    return {
        "trivial": ExpertLocation.trivial(LAYERS, E, E, 2),
        "permuted": ExpertLocation(torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(i))
                                                for i in range(LAYERS)]), E, 2),
        "redundant": ExpertLocation.from_rebalance(rebalance_experts(w, E + 2, 4, 1, 2), E, 2),
        "redundant4": ExpertLocation.from_rebalance(rebalance_experts(w, E + 4, 4, 1, 4), E, 4),
    }


@pytest.mark.parametrize("algo", ["static", "dynamic", "random"])
@pytest.mark.parametrize("name", ["trivial", "permuted", "redundant", "redundant4"])
def test_sharded_moe_equals_one_rank_bitwise(name, algo):
    """EP over 2 or 4 ranks == one rank with the same placement, bit for bit, on every rank."""
    net = moe_net(top_k=3)
    loc = placements()[name]
    ref = one_rank(net, loc, X, algo)
    outs, nets, _ = run_ep(net, loc, X, algo)
    for r, out in enumerate(outs):
        assert torch.equal(out, ref), f"rank {r}: max diff {(out - ref).abs().max()}"
        assert nets[r][0].w13.shape[0] == loc.slots_per_rank  # only its own slots
        assert nets[r][0].local_slot_start == r * loc.slots_per_rank


def test_placement_invariance_bitwise_without_redundancy():
    """Summing in logical order: any permutation of the slots gives identical floats (k=3)."""
    net = moe_net(top_k=3)
    plain = run(copy.deepcopy(net), X)
    for seed in range(4):
        p2l = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(seed * 10 + i))
                           for i in range(LAYERS)])
        out = one_rank(net, ExpertLocation(p2l, E, 1), X)
        assert torch.equal(out, plain)


def test_redundant_experts_stay_within_float_noise_of_one_slot_per_expert():
    """Replicas split an expert's tokens into smaller GEMMs; CPU BLAS may round a row
    differently for very small M, so only closeness (and the same argmax) is guaranteed."""
    net = moe_net(top_k=2)
    plain = run(copy.deepcopy(net), X)
    outs, _, _ = run_ep(net, placements()["redundant"], X, "dynamic")
    torch.testing.assert_close(outs[0], plain, rtol=1e-5, atol=1e-5)


def test_new_placement_between_passes_copies_only_changed_local_slots():
    net = moe_net(top_k=2)
    locs = placements()
    old, new = locs["redundant"], ExpertLocation.from_rebalance(
        rebalance_experts(torch.rand(LAYERS, E, generator=torch.Generator().manual_seed(9)) * 100, E + 2, 4, 1, 2),
        E, 2)
    assert not torch.equal(old.physical_to_logical, new.physical_to_logical)
    outs, nets, hooks = run_ep(net, old, X, plan=new)
    ref = one_rank(net, new, X)
    for r in range(2):
        assert torch.equal(outs[r], ref)
        assert torch.equal(nets[r][1].physical_to_logical, new.physical_to_logical[1])
        assert hooks[r].moves_applied == int((old.physical_to_logical != new.physical_to_logical).sum())
        # the local weights are the logical experts of this rank's slots
        for i, m in enumerate(nets[r]):
            src = net[i]
            for j, e in enumerate(new.local_experts(i, r)):
                assert torch.equal(m.w13[j], src.w13[e]) and torch.equal(m.w2[j], src.w2[e])


def test_shared_expert_is_added_once():
    net = moe_net(top_k=2, shared=True)
    loc = placements()["trivial"]
    outs, _, _ = run_ep(net, loc, X)
    assert torch.equal(outs[1], run(copy.deepcopy(net), X))


def test_bad_inputs():
    net = moe_net()
    with pytest.raises(ValueError, match="ep_size=2, the EP group has 4 ranks"):
        ExpertParallelHook(net, ExpertLocation.trivial(LAYERS, E, E, 2), ExpertParallelGroup(0, 4, torch.device("cpu")))
    from tandem.engine.expert_parallel import init_expert_parallel

    with pytest.raises(ValueError, match="rank 3 is outside"):
        init_expert_parallel(3, 2, "tcp://127.0.0.1:1")
