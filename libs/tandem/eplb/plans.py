"""The ExpertPlan message both ways: the planner service sends plans, workers apply them."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tandem.eplb.placement import ExpertLocation
from tandem.v1 import eplb_pb2

if TYPE_CHECKING:
    from tandem.eplb.planner import Plan


def plan_from_proto(msg: eplb_pb2.ExpertPlan, num_layers: int | None = None) -> ExpertLocation:
    """An ``ExpertLocation`` from a received plan, validated: a plan with the wrong shape
    raises ValueError (the worker then keeps its old placement)."""
    rows = [list(layer.physical_to_logical) for layer in msg.layers]
    if num_layers is not None and len(rows) != num_layers:
        raise ValueError(f"plan v{msg.version} has {len(rows)} layers, the model has {num_layers} MoE layers")
    if any(len(r) != msg.num_physical_experts for r in rows):
        raise ValueError(f"plan v{msg.version}: a layer does not have {msg.num_physical_experts} physical slots")
    return ExpertLocation(rows, msg.num_logical_experts, msg.num_ranks)


def plan_to_proto(plan: Plan) -> eplb_pb2.ExpertPlan:
    loc = plan.location
    return eplb_pb2.ExpertPlan(
        version=plan.version,
        num_logical_experts=loc.num_logical,
        num_physical_experts=loc.num_physical,
        num_ranks=loc.ep_size,
        layers=[eplb_pb2.LayerPlacement(physical_to_logical=row) for row in loc.physical_to_logical.tolist()],
        algorithm=plan.algorithm,
        balancedness_before=plan.balancedness_before,
        balancedness_after=plan.balancedness_after,
        num_moves=plan.num_moves,
        created_at=plan.created_at,
    )
