"""Planner: reports -> plans, watchers, bad reports, time trigger, metrics."""
import json
import threading

import pytest
import torch
from prometheus_client import CollectorRegistry
from tandem.config import EplbPlannerConfig
from tandem.eplb.planner import Planner, model_moe_shape

L, E = 2, 8


def cfg(**kw):
    base = dict(ep_size=4, ep_num_redundant_experts=4, eplb_rebalance_num_iterations=10)
    base.update(kw)
    return EplbPlannerConfig(**base)


def skewed():
    w = torch.ones(L, E, dtype=torch.int64)
    w[:, 0] = 100
    w[:, 1] = 50
    return w


def make(registry=None, **kw):
    return Planner(cfg(**kw), L, E, num_groups=1, registry=registry or CollectorRegistry())


def test_plan_after_n_iterations():
    p = make()
    assert p.current_plan is None and p.latest_version == -1
    r = p.report_load("w0", skewed(), num_forward_passes=4)
    assert r.accepted and p.current_plan is None
    p.report_load("w1", skewed(), num_forward_passes=6)  # 10 passes summed over workers
    plan = p.current_plan
    assert plan is not None and plan.version == 1
    assert plan.algorithm == "hierarchical"  # auto: 1 group divides over 1 node
    assert plan.balancedness_after > plan.balancedness_before
    assert plan.num_moves > 0
    assert plan.location.logical_count[0, 0] >= 2  # hot expert replicated
    assert p.pending_passes() == 0


def test_watchers_get_new_plans():
    p = make()
    got = []

    def watch():
        got.append(p.wait_for_plan(-1, timeout=10))

    t = threading.Thread(target=watch)
    t.start()
    p.report_load("w0", skewed(), 10)
    t.join(10)
    assert got and got[0] is not None and got[0].version == 1
    # a newer plan only after more load with a different shape
    assert p.wait_for_plan(1, timeout=0.01) is None
    flipped = skewed().flip(1)
    p.report_load("w0", flipped, 10)
    assert p.wait_for_plan(1, timeout=1).version == 2


@pytest.mark.parametrize(
    "layers, passes, n_logical, match",
    [
        ({0: [1] * 7}, 1, 0, "7 counts, expected 8"),
        ({5: [1] * 8}, 1, 0, "layer 5 out of range"),
        ({0: [-1] + [1] * 7}, 1, 0, "negative"),
        ({0: [1] * 8}, -1, 0, "negative"),
        ({0: [1] * 8}, 1, 16, "num_logical_experts=16"),
        (torch.ones(3, 8), 1, 0, "shape"),
    ],
)
def test_bad_report_rejected_and_nothing_changes(layers, passes, n_logical, match):
    p = make()
    p.report_load("w0", skewed(), 10)
    plan = p.current_plan
    r = p.report_load("bad", layers, passes, num_logical_experts=n_logical)
    assert not r.accepted and match in r.message
    assert r.latest_plan_version == 1
    assert p.current_plan is plan and p.pending_passes() == 0
    assert "bad" not in p.workers()


def test_balanced_load_publishes_nothing():
    p = make(ep_num_redundant_experts=0)
    p.report_load("w0", torch.ones(L, E, dtype=torch.int64), 10)
    assert p.current_plan is None


def test_time_trigger():
    now = [0.0]
    p = Planner(cfg(eplb_rebalance_num_iterations=10**6, eplb_rebalance_interval_s=5),
                L, E, registry=CollectorRegistry(), clock=lambda: now[0])
    p.report_load("w0", skewed(), 1)
    assert p.current_plan is None
    now[0] = 6.0
    assert p.maybe_rebalance() is not None and p.current_plan.version == 1


def test_move_aware_respects_budget():
    p = make(eplb_algorithm="move_aware", eplb_max_moves_per_layer=2)
    p.report_load("w0", skewed(), 10)
    plan = p.current_plan
    assert plan.algorithm == "move_aware" and 0 < plan.num_moves <= 2 * L


def test_init_location_published_as_version_0():
    p2l = [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]] * L
    p = make(init_expert_location=json.dumps({"physical_to_logical_map": p2l}))
    assert p.current_plan.version == 0 and p.current_plan.algorithm == "init"
    p.report_load("w0", skewed(), 10)
    assert p.current_plan.version == 1


def test_bad_config_shapes():
    with pytest.raises(ValueError, match="split evenly"):
        Planner(cfg(ep_size=3, ep_num_redundant_experts=0), L, E, registry=CollectorRegistry())
    with pytest.raises(ValueError, match="hierarchical"):
        Planner(cfg(eplb_algorithm="hierarchical", nnodes=2), L, E, num_groups=3 if E % 3 == 0 else 1,
                registry=CollectorRegistry())
    with pytest.raises(ValueError, match="physical_to_logical_map has shape"):
        make(init_expert_location='{"physical_to_logical_map": [[0, 1]]}')


def test_metrics_registered():
    reg = CollectorRegistry()
    p = make(registry=reg)
    p.report_load("w0", skewed(), 10)
    p.report_load("w0", {0: [1]}, 1)
    assert reg.get_sample_value("tandem_eplb_rebalance_total", {"outcome": "published"}) == 1
    assert reg.get_sample_value("tandem_eplb_expert_moves_total") == p.current_plan.num_moves
    assert reg.get_sample_value("sglang:eplb_balancedness_count") == L
    assert reg.get_sample_value("sglang:eplb_gpu_physical_count_count", {"layer": "0"}) == 4
    assert reg.get_sample_value("tandem_eplb_rebalance_duration_seconds_count") == 1
    assert reg.get_sample_value("tandem_eplb_load_reports_total", {"result": "rejected"}) == 1
    assert reg.get_sample_value("tandem_eplb_plan_version") == 1


def test_model_moe_shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "num_experts": 16}))
    assert model_moe_shape(str(tmp_path)) == (4, 16, 1)
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 6, "n_routed_experts": 32, "n_group": 4, "first_k_dense_replace": 1})
    )
    assert model_moe_shape(str(tmp_path)) == (5, 32, 4)
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "intermediate_size": 8}))
    with pytest.raises(ValueError, match="not an MoE model"):
        model_moe_shape(str(tmp_path))
