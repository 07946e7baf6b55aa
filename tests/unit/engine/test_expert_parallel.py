"""Expert parallelism, simulated in one process: two sharded MoE copies (one per "rank",
run on two threads whose all_reduce sums their buffers) against the one-rank MoE.

Exactness argument under test: each (token, entry) row is computed by exactly one rank, so
the reduce only adds zeros, and each token's rows are summed in logical-expert order. Every
rank's MoE layers get their dispatcher (local slots, all-reduce) at construction.
"""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from tandem.engine.model import MoE
from tandem.engine.parallel import ParallelGroup
from tandem.eplb import rebalance_experts
from tandem.eplb.dispatch import ExpertDispatcher
from tandem.eplb.placement import ExpertLocation
from tandem.eplb.runtime import EplbRuntime

E, H, INTER, LAYERS = 8, 32, 16, 2


def moe_cfg(top_k: int, shared: bool) -> SimpleNamespace:
    return SimpleNamespace(
        num_experts=E, hidden_size=H, moe_intermediate_size=INTER, num_experts_per_tok=top_k,
        scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=1.0, n_group=4, topk_group=2,
        shared_expert_intermediate_size=INTER if shared else 0,
    )


def checkpoint(shared: bool = True) -> list[dict]:
    """Per layer: router, score bias, logical experts, shared expert (what a checkpoint holds)."""
    g = torch.Generator().manual_seed(0)
    return [{"router": torch.randn(E, H, generator=g) * 0.2, "bias": torch.randn(E, generator=g) * 0.2,
             "w13": torch.randn(E, 2 * INTER, H, generator=g) * 0.2, "w2": torch.randn(E, H, INTER, generator=g) * 0.2,
             "shared": (torch.randn(INTER, H, generator=g) * 0.2, torch.randn(INTER, H, generator=g) * 0.2,
                        torch.randn(H, INTER, generator=g) * 0.2) if shared else None}
            for _ in range(LAYERS)]


def moe_net(ckpt, top_k: int = 2, dispatcher=None) -> torch.nn.ModuleList:
    cfg = moe_cfg(top_k, ckpt[0]["shared"] is not None)
    net = torch.nn.ModuleList(MoE(cfg, i, False, True, i, dispatcher) for i in range(LAYERS))
    with torch.no_grad():
        for m, c in zip(net, ckpt):
            m.gate_weight.copy_(c["router"])
            m.score_bias.copy_(c["bias"])
            w13, w2 = m.pack_experts(c["w13"], c["w2"], c["shared"])
            m.w13.copy_(w13)
            m.w2.copy_(w2)
    return net


def run(net, x):
    fb = SimpleNamespace(positions=torch.arange(x.shape[0]), is_decode=False, seq_lens=None, record_experts=False)
    with torch.inference_mode():
        for m in net:
            x = x + m(x, None, fb)
    return x


class ThreadGroup:
    """In-process stand-in for the EP process group: ranks are threads."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.bufs: list = [None] * size

    def member(self, rank: int) -> ParallelGroup:
        group = self

        class Member(ParallelGroup):
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


def run_ep(ckpt, loc, x, algo="static", plan=None, top_k=3):
    """Run the layers sharded over ``loc.ep_size`` thread-ranks; every rank's output."""
    group = ThreadGroup(loc.ep_size)
    outs, errors = [None] * loc.ep_size, []
    disps = [ExpertDispatcher(loc, algo, seed=7, rank=r, all_reduce=group.member(r).all_reduce)
             for r in range(loc.ep_size)]
    nets = [moe_net(ckpt, top_k, disps[r]) for r in range(loc.ep_size)]

    def store(layer, e):  # every logical expert on the host, as the loader keeps them with EP
        return ckpt[layer]["w13"][e], ckpt[layer]["w2"][e]

    runtimes = [EplbRuntime(disps[r], [m.routed_weights() for m in nets[r]], store=store) for r in range(loc.ep_size)]

    def rank_main(r):
        try:
            if plan is not None:
                run(nets[r], x)  # one pass on the old placement, then switch
                runtimes[r].set_location(plan)
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
    return outs, nets, runtimes


def one_rank(ckpt, loc, x, algo="static", top_k=3):
    one = ExpertLocation(loc.physical_to_logical, E, 1)
    return run(moe_net(ckpt, top_k, ExpertDispatcher(one, algo, seed=7)), x)


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
    ckpt = checkpoint()
    loc = placements()[name]
    ref = one_rank(ckpt, loc, X, algo)
    outs, nets, _ = run_ep(ckpt, loc, X, algo)
    for r, out in enumerate(outs):
        assert torch.equal(out, ref), f"rank {r}: max diff {(out - ref).abs().max()}"
        assert nets[r][0].num_local == loc.slots_per_rank  # only its own slots (+ the shared chunk)
        assert nets[r][0].w13.shape[0] == loc.slots_per_rank + 1
        assert nets[r][0].dispatcher.local_start == r * loc.slots_per_rank


def test_placement_invariance_bitwise_without_redundancy():
    """Summing in logical order: any permutation of the slots gives identical floats (k=3)."""
    ckpt = checkpoint()
    plain = run(moe_net(ckpt, 3), X)
    for seed in range(4):
        p2l = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(seed * 10 + i))
                           for i in range(LAYERS)])
        out = one_rank(ckpt, ExpertLocation(p2l, E, 1), X)
        assert torch.equal(out, plain)


def test_redundant_experts_stay_within_float_noise_of_one_slot_per_expert():
    """Replicas split an expert's tokens into smaller GEMMs; CPU BLAS may round a row
    differently for very small M, so only closeness (and the same argmax) is guaranteed."""
    ckpt = checkpoint()
    plain = run(moe_net(ckpt, 2), X)
    outs, _, _ = run_ep(ckpt, placements()["redundant"], X, "dynamic", top_k=2)
    torch.testing.assert_close(outs[0], plain, rtol=1e-5, atol=1e-5)


def test_new_placement_between_passes_copies_only_changed_local_slots():
    ckpt = checkpoint()
    locs = placements()
    old, new = locs["redundant"], ExpertLocation.from_rebalance(
        rebalance_experts(torch.rand(LAYERS, E, generator=torch.Generator().manual_seed(9)) * 100, E + 2, 4, 1, 2),
        E, 2)
    assert not torch.equal(old.physical_to_logical, new.physical_to_logical)
    outs, nets, runtimes = run_ep(ckpt, old, X, plan=new, top_k=2)
    ref = one_rank(ckpt, new, X, top_k=2)
    for r in range(2):
        assert torch.equal(outs[r], ref)
        assert torch.equal(nets[r][1].dispatcher.physical_to_logical, new.physical_to_logical)
        assert runtimes[r].moves_applied == int((old.physical_to_logical != new.physical_to_logical).sum())
        # the local weights are the logical experts of this rank's slots
        for i, m in enumerate(nets[r]):
            for j, e in enumerate(new.local_experts(i, r)):
                assert torch.equal(m.w13[j], ckpt[i]["w13"][e]) and torch.equal(m.w2[j], ckpt[i]["w2"][e])


def test_shared_expert_is_added_once():
    ckpt = checkpoint(shared=True)
    outs, nets, _ = run_ep(ckpt, placements()["trivial"], X)
    assert nets[0][0].shared_here and not nets[1][0].shared_here  # folded: rank 0 computes its rows
    assert torch.equal(outs[1], run(moe_net(ckpt, 3), X))


def test_bad_inputs():
    loc = ExpertLocation.trivial(LAYERS, E, E, 2)
    with pytest.raises(ValueError, match="EP rank 3 is outside the placement's 2 ranks"):
        ExpertDispatcher(loc, rank=3)
    from tandem.engine.parallel import init_parallel

    with pytest.raises(ValueError, match="rank 3 is outside"):
        init_parallel(3, 2, "tcp://127.0.0.1:1")
