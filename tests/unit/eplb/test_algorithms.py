"""rebalance_experts: the published example, invariants, balancedness."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tandem.eplb import balancedness, balancedness_per_layer, choose_algorithm, count_moves, rebalance_experts
from tandem.eplb.algorithms import balanced_packing, log2phy_from_phy2log, rebalance_global, replicate_experts

WEIGHT = torch.tensor(
    [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
)
PUBLISHED_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_published_example():
    phy2log, log2phy, logcnt = rebalance_experts(WEIGHT, 16, 4, 2, 8)
    assert phy2log.tolist() == PUBLISHED_PHY2LOG
    assert logcnt.sum(1).tolist() == [16, 16]
    # each replica listed in log2phy points back at its expert
    for layer in range(2):
        for e in range(12):
            slots = [s for s in log2phy[layer, e].tolist() if s >= 0]
            assert len(slots) == logcnt[layer, e]
            assert all(phy2log[layer, s] == e for s in slots)


def test_hierarchical_keeps_groups_on_one_node():
    phy2log, _, _ = rebalance_experts(WEIGHT, 16, 4, 2, 8)
    slots_per_node = 8
    for layer in range(2):
        for node in range(2):
            groups = {e // 3 for e in phy2log[layer, node * slots_per_node:(node + 1) * slots_per_node].tolist()}
            assert len(groups) == 2  # 4 groups over 2 nodes: 2 whole groups per node


def test_auto_chooses_global_when_groups_do_not_divide():
    assert choose_algorithm(4, 2) == "hierarchical"
    assert choose_algorithm(3, 2) == "global"
    auto, _, _ = rebalance_experts(WEIGHT, 16, 3, 2, 8)
    glob, _, _ = rebalance_global(WEIGHT, 16, 8)
    assert torch.equal(auto, glob)


def test_balancedness_improves_on_the_example():
    trivial = torch.arange(12).repeat(2, 1)
    before = balancedness(WEIGHT, trivial, 4)
    phy2log, _, _ = rebalance_experts(WEIGHT, 16, 4, 2, 8)
    assert balancedness(WEIGHT, phy2log, 8) > before
    # hand-checked value: 1 GPU holding everything is perfectly "balanced"
    assert balancedness(WEIGHT, trivial, 1) == pytest.approx(1.0)


def test_balancedness_definition():
    w = torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    # 2 GPUs: [3+1, 0+0] -> mean 2, max 4
    assert balancedness_per_layer(w, torch.tensor([[0, 1, 2, 3]]), 2).item() == pytest.approx(0.5)
    # replica of expert 0 on the other GPU: loads [1.5+1, 1.5+0]
    p = torch.tensor([[0, 1, 0, 2]])
    w2 = torch.tensor([[3.0, 1.0, 0.0]])
    assert balancedness_per_layer(w2, p, 2).item() == pytest.approx(2.0 / 2.5)


def test_replicate_gives_extra_slots_to_the_hottest():
    phy2log, rank, cnt = replicate_experts(torch.tensor([[10.0, 1.0, 4.0]]), 5)
    # per-replica loads: 10 -> (5) -> still the max over 1 and 4 -> (3.33)
    assert cnt.tolist() == [[3, 1, 1]]
    assert phy2log[0].tolist() == [0, 1, 2, 0, 0]
    assert rank[0].tolist() == [0, 0, 0, 1, 2]


def test_balanced_packing_equal_sizes():
    w = torch.tensor([[5.0, 4, 3, 3, 2, 1]])
    pack, rank = balanced_packing(w, 2)
    assert sorted(torch.bincount(pack[0]).tolist()) == [3, 3]
    loads = [w[0][pack[0] == p].sum().item() for p in range(2)]
    assert loads == [9.0, 9.0]


@pytest.mark.parametrize(
    "bad",
    [
        dict(num_replicas=10, num_groups=4, num_nodes=2, num_gpus=8),  # fewer slots than experts
        dict(num_replicas=18, num_groups=4, num_nodes=2, num_gpus=8),  # not a multiple of gpus
        dict(num_replicas=16, num_groups=5, num_nodes=1, num_gpus=8),  # groups do not divide experts
        dict(num_replicas=16, num_groups=4, num_nodes=3, num_gpus=8),  # gpus not multiple of nodes
    ],
)
def test_bad_shapes_raise(bad):
    with pytest.raises(ValueError):
        rebalance_experts(WEIGHT, **bad)


def test_count_moves():
    a = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    b = torch.tensor([[0, 1, 3, 2], [0, 1, 2, 3]])
    assert count_moves(a, b).tolist() == [2, 0]


@st.composite
def shapes(draw):
    num_nodes = draw(st.sampled_from([1, 2]))
    gpus_per_node = draw(st.sampled_from([1, 2, 4]))
    num_gpus = num_nodes * gpus_per_node
    num_groups = draw(st.sampled_from([1, 2, 3, 4]))
    group_size = draw(st.integers(1, 4))
    num_logical = num_groups * group_size
    # physical: a multiple of num_gpus, >= num_logical
    base = -(-num_logical // num_gpus) * num_gpus
    num_physical = base + num_gpus * draw(st.integers(0, 2))
    layers = draw(st.integers(1, 3))
    loads = draw(st.lists(st.integers(0, 1000), min_size=layers * num_logical, max_size=layers * num_logical))
    w = torch.tensor(loads, dtype=torch.float64).view(layers, num_logical)
    return w, num_physical, num_groups, num_nodes, num_gpus


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_invariants(case):
    w, num_physical, num_groups, num_nodes, num_gpus = case
    phy2log, log2phy, logcnt = rebalance_experts(w, num_physical, num_groups, num_nodes, num_gpus)
    layers, num_logical = w.shape
    assert phy2log.shape == (layers, num_physical)
    assert (logcnt >= 1).all()  # every logical expert has a replica
    assert (logcnt.sum(1) == num_physical).all()  # replica totals
    # logcnt agrees with phy2log, log2phy is its inverse
    for layer in range(layers):
        assert torch.bincount(phy2log[layer], minlength=num_logical).tolist() == logcnt[layer].tolist()
        for e in range(num_logical):
            slots = sorted(s for s in log2phy[layer, e].tolist() if s >= 0)
            assert slots == (phy2log[layer] == e).nonzero().flatten().tolist()
    assert torch.equal(log2phy, log2phy_from_phy2log(phy2log, num_logical))
    b = balancedness_per_layer(w, phy2log, num_gpus)
    assert ((b > 0) & (b <= 1 + 1e-9)).all()
