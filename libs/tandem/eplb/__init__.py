"""tandem.eplb: expert-parallel load balancing.

Rebalance algorithms, expert placement maps, the expert-distribution recorder and the
planner's logic (``planner``). The planner service is ``tandem.eplb_planner``
(``services/eplb``), a thin gRPC shell over :class:`tandem.eplb.planner.Planner`.
"""
from .algorithms import (
    balancedness,
    balancedness_per_layer,
    choose_algorithm,
    count_moves,
    gpu_loads,
    log2phy_from_phy2log,
    logcnt_from_phy2log,
    rebalance_experts,
)
from .move_aware import MoveAwareResult, rebalance_move_aware

__all__ = [
    "rebalance_experts",
    "rebalance_move_aware",
    "MoveAwareResult",
    "balancedness",
    "balancedness_per_layer",
    "choose_algorithm",
    "count_moves",
    "gpu_loads",
    "log2phy_from_phy2log",
    "logcnt_from_phy2log",
]
