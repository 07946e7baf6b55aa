"""tandem.eplb: expert-parallel load balancing.

Library half (``libs/tandem/eplb``): rebalance algorithms, expert placement maps and the
expert-distribution recorder. The planner service (``services/eplb/tandem/eplb``:
``planner``, ``servicer``, ``__main__``) lives in the same package: ``extend_path`` below
merges both folders, so ``python -m tandem.eplb`` and ``tandem.eplb.rebalance_experts``
both work. (Only this folder may carry an ``__init__.py``.)
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)  # noqa: F821 - merge services/eplb/tandem/eplb

from .algorithms import (  # noqa: E402
    balancedness,
    balancedness_per_layer,
    choose_algorithm,
    count_moves,
    gpu_loads,
    log2phy_from_phy2log,
    logcnt_from_phy2log,
    rebalance_experts,
)
from .move_aware import MoveAwareResult, rebalance_move_aware  # noqa: E402

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
