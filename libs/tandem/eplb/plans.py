"""ExpertPlan messages on the worker side (shared by workers and the planner's tests)."""
from __future__ import annotations

from tandem.eplb.placement import ExpertLocation
from tandem.v1 import eplb_pb2


def plan_from_proto(msg: eplb_pb2.ExpertPlan, num_layers: int | None = None) -> ExpertLocation:
    """An ``ExpertLocation`` from a received plan, validated: a plan with the wrong shape
    raises ValueError (the worker then keeps its old placement)."""
    rows = [list(layer.physical_to_logical) for layer in msg.layers]
    if num_layers is not None and len(rows) != num_layers:
        raise ValueError(f"plan v{msg.version} has {len(rows)} layers, the model has {num_layers} MoE layers")
    if any(len(r) != msg.num_physical_experts for r in rows):
        raise ValueError(f"plan v{msg.version}: a layer does not have {msg.num_physical_experts} physical slots")
    return ExpertLocation(rows, msg.num_logical_experts, msg.num_ranks)
