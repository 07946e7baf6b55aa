"""ExpertLocation: constructors, --init-expert-location parsing, validation, dispatch, diff."""
import json

import pytest
import torch
from tandem.eplb import rebalance_experts
from tandem.eplb.placement import ExpertLocation, diff


def test_trivial_round_robin():
    loc = ExpertLocation.trivial(num_layers=2, num_logical=4, num_physical=6, ep_size=3)
    assert loc.physical_to_logical.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert loc.logical_count[0].tolist() == [2, 2, 1, 1]
    assert loc.logical_to_physical[0].tolist() == [[0, 4], [1, 5], [2, -1], [3, -1]]
    assert [loc.rank_of_slot(s) for s in range(6)] == [0, 0, 1, 1, 2, 2]
    assert loc.local_experts(0, 2) == [0, 1]


def test_from_rebalance():
    w = torch.tensor([[5.0, 1, 1, 1]])
    loc = ExpertLocation.from_rebalance(rebalance_experts(w, 6, 1, 1, 2), 4, 2)
    assert loc.logical_count[0, 0] == 3


def test_init_arg_forms(tmp_path):
    p2l = [[1, 0, 2, 3], [3, 2, 1, 0]]
    expected = ExpertLocation(p2l, 4, 2)
    inline = json.dumps({"physical_to_logical_map": p2l})
    assert ExpertLocation.from_init_arg(inline, 2, 4, 4, 2) == expected
    jpath = tmp_path / "loc.json"
    jpath.write_text(inline)
    assert ExpertLocation.from_init_arg(str(jpath), 2, 4, 4, 2) == expected
    ppath = tmp_path / "loc.pt"
    expected.save(str(ppath))
    assert ExpertLocation.from_init_arg(str(ppath), 2, 4, 4, 2) == expected
    assert ExpertLocation.from_init_arg("trivial", 2, 4, 4, 2) == ExpertLocation.trivial(2, 4, 4, 2)


def test_init_from_logical_count_replicates_hot_expert(tmp_path):
    count = [[100, 1, 1, 1], [1, 1, 1, 100]]
    loc = ExpertLocation.from_init_arg(json.dumps({"logical_count": count}), 2, 4, 6, 2)
    assert loc.logical_count[0, 0] == 3 and loc.logical_count[1, 3] == 3
    # a recorder-style [passes, layers, experts] window is summed
    path = tmp_path / "dump.pt"
    torch.save({"logical_count": torch.tensor([count, count])}, str(path))
    assert ExpertLocation.from_init_arg(str(path), 2, 4, 6, 2) == loc


@pytest.mark.parametrize(
    "arg, match",
    [
        ('{"physical_to_logical_map": [[0, 1, 2, 3]]}', "shape"),  # 1 layer, model has 2
        ('{"physical_to_logical_map": [[0, 1, 2], [0, 1, 2]]}', "shape"),  # 3 slots, model has 4
        ('{"physical_to_logical_map": [[0, 1, 2, 7], [0, 1, 2, 3]]}', "out of range"),
        ('{"physical_to_logical_map": [[0, 1, 2, 2], [0, 1, 2, 3]]}', "expert 3 has no physical replica"),
        ('{"logical_count": [[1, 2, 3], [1, 2, 3]]}', "logical_count has shape"),
        ('{"something": 1}', "must hold"),
        ("{not json", "invalid inline JSON"),
        ("/nonexistent/loc.json", "no such file"),
    ],
)
def test_init_arg_errors(arg, match):
    with pytest.raises(ValueError, match=match):
        ExpertLocation.from_init_arg(arg, num_layers=2, num_logical=4, num_physical=4, ep_size=2)


def test_uneven_slots_per_rank():
    with pytest.raises(ValueError, match="do not split evenly"):
        ExpertLocation.trivial(1, 4, 5, 2)


def test_float_ids_rejected():
    with pytest.raises(ValueError, match="integer"):
        ExpertLocation([[0.0, 1.0]], 2, 1)


@pytest.fixture
def redundant():
    # expert 0 has replicas in slots 0 (rank 0) and 4 (rank 2); expert 1 in 1 and 5
    return ExpertLocation.trivial(1, 4, 6, 3)


def test_dispatch_maps_to_a_replica_of_the_same_expert(redundant):
    ids = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 0], [0, 1]])
    for algo in ("static", "dynamic", "random"):
        phys = redundant.dispatch(0, ids, algo, seed=3)
        assert phys.shape == ids.shape
        assert torch.equal(redundant.physical_to_logical[0][phys], ids)


def test_static_is_deterministic_and_spreads_by_position(redundant):
    ids = torch.tensor([[0], [0], [0], [0]])
    a = redundant.dispatch(0, ids, "static")
    assert a.flatten().tolist() == [0, 4, 0, 4]
    assert torch.equal(a, redundant.dispatch(0, ids, "static"))
    # prefer the replica on the caller's rank
    assert redundant.dispatch(0, ids, "static", rank=2).flatten().tolist() == [4, 4, 4, 4]


def test_dynamic_balances_ranks(redundant):
    ids = torch.zeros(8, 1, dtype=torch.long)  # 8 tokens all to expert 0
    phys = redundant.dispatch(0, ids, "dynamic").flatten()
    assert sorted(torch.bincount(phys, minlength=6).tolist()) == [0, 0, 0, 0, 4, 4]
    # expert 0 at even positions only: static's position rule puts all of them on rank 0
    ids = torch.tensor([[0], [3], [0], [3], [0], [3], [0], [3]])
    static = torch.bincount(redundant.dispatch(0, ids, "static").flatten() // 2, minlength=3).tolist()
    dynamic = torch.bincount(redundant.dispatch(0, ids, "dynamic").flatten() // 2, minlength=3).tolist()
    assert static == [4, 4, 0]
    assert dynamic == [2, 4, 2]


def test_random_is_seeded(redundant):
    ids = torch.zeros(32, 2, dtype=torch.long)
    a = redundant.dispatch(0, ids, "random", seed=7)
    b = redundant.dispatch(0, ids, "random", seed=7)
    assert torch.equal(a, b) and set(a.flatten().tolist()) == {0, 4}
    assert not torch.equal(a, redundant.dispatch(0, ids, "random", seed=8))
    # a fresh draw at every position, about half on each replica
    pos = redundant.dispatch(0, ids[:, :1], "random", positions=torch.arange(100, 132), seed=7)
    assert not torch.equal(pos, a[:, :1]) and 8 <= int((pos == 4).sum()) <= 24


def test_dispatch_errors(redundant):
    with pytest.raises(ValueError, match="allowed"):
        redundant.dispatch(0, torch.zeros(1, 1, dtype=torch.long), "fastest")
    with pytest.raises(ValueError, match="out of range"):
        redundant.dispatch(0, torch.tensor([[9]]), "static")


def test_diff_lists_slot_copies():
    old = ExpertLocation([[0, 1, 2, 3, 0, 1]], 4, 3)
    new = ExpertLocation([[0, 1, 2, 3, 0, 0]], 4, 3)
    copies = diff(old, new)
    assert len(copies) == 1
    c = copies[0]
    assert (c.layer, c.slot, c.rank, c.logical) == (0, 5, 2, 0)
    assert c.src_slot == 4 and c.src_rank == 2  # local source preferred
    assert diff(old, old) == []
    with pytest.raises(ValueError, match="different shapes"):
        diff(old, ExpertLocation.trivial(1, 4, 4, 2))
