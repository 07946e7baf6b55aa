"""EPLB planner: collects expert load from workers, computes and publishes placements.

Workers report the logical-expert load they saw since their previous report
(``report_load``). Every ``eplb_rebalance_num_iterations`` forward passes (summed over
accepted reports) - or every ``eplb_rebalance_interval_s`` seconds when set - the
planner balances the load gathered since the previous plan with the configured
algorithm and publishes a new :class:`Plan` (version + 1) to every watcher. A plan
that would not improve balancedness on that load is not published (no copies for
nothing).

Plan versions: ``0`` is the initial placement when ``--init-expert-location`` names a
file or inline JSON (published at start); a ``trivial`` start publishes nothing, so
``current_plan`` is None until the first rebalance (GetPlan answers NOT_FOUND).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Summary
from tandem.config import EplbPlannerConfig
from tandem.config.hf_config import read_hf_config
from tandem.eplb.algorithms import (
    balancedness_per_layer,
    choose_algorithm,
    count_moves,
    gpu_loads,
    rebalance_experts,
    rebalance_global,
)
from tandem.eplb.move_aware import rebalance_move_aware, refine_placement
from tandem.eplb.placement import ExpertLocation

log = logging.getLogger(__name__)

__all__ = ["Plan", "ReportResult", "Planner", "PlannerMetrics", "model_moe_shape", "expert_weight_bytes"]

# A plan must raise mean balancedness by more than this to be published.
_MIN_GAIN = 1e-6

# Token counts per GPU per plan period: powers of 4 from 1 to ~1e9.
_COUNT_BUCKETS = tuple(float(4**i) for i in range(16))


@dataclass
class Plan:
    """A published placement."""

    version: int
    location: ExpertLocation
    algorithm: str  # "hierarchical", "global", "move_aware" or "init"
    balancedness_before: float
    balancedness_after: float
    num_moves: int
    created_at: float
    layer_balancedness: list = field(default_factory=list)  # after, per layer


@dataclass
class ReportResult:
    accepted: bool
    latest_plan_version: int  # -1 when there is no plan yet
    message: str = ""


@dataclass
class _Report:
    at: float
    passes: int
    counts: torch.Tensor  # [layers, experts] int64
    plan_version: int


class PlannerMetrics:
    """Prometheus metrics of the planner (on an injectable registry)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        reg = REGISTRY if registry is None else registry
        self.balancedness = Summary(
            "sglang:eplb_balancedness",
            "Per-layer balancedness (mean GPU load / max GPU load) of the load under the placement in use; "
            "one observation per layer per rebalance.",
            registry=reg,
        )
        self.layer_balancedness = Gauge(
            "tandem_eplb_layer_balancedness",
            "Balancedness of each MoE layer under the current plan, on the load it was computed from.",
            ["layer"],
            registry=reg,
        )
        self.gpu_physical_count = Histogram(
            "sglang:eplb_gpu_physical_count",
            "Tokens dispatched to each GPU per plan period (one observation per GPU), per layer.",
            ["layer"],
            buckets=_COUNT_BUCKETS,
            registry=reg,
        )
        self.rebalance_total = Counter(
            "tandem_eplb_rebalance_total", "Plans computed, by outcome.", ["outcome"], registry=reg
        )
        self.rebalance_duration = Histogram(
            "tandem_eplb_rebalance_duration_seconds",
            "Time to compute one plan.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=reg,
        )
        self.expert_moves = Counter(
            "tandem_eplb_expert_moves_total", "Expert weight copies required by published plans.", registry=reg
        )
        self.bytes_moved = Counter(
            "tandem_eplb_expert_bytes_moved_total",
            "Bytes of expert weights copied by published plans (0 when the expert size is unknown).",
            registry=reg,
        )
        self.plan_version = Gauge("tandem_eplb_plan_version", "Version of the current plan (-1 = none).", registry=reg)
        self.plan_version.set(-1)
        self.reports = Counter(
            "tandem_eplb_load_reports_total", "Load reports received, by result.", ["result"], registry=reg
        )


class Planner:
    """Keeps the load history and the current plan; thread-safe."""

    HISTORY_PER_WORKER = 256

    def __init__(
        self,
        config: EplbPlannerConfig,
        num_layers: int,
        num_logical_experts: int,
        num_groups: int = 1,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        expert_bytes: int = 0,
    ):
        self.config = config
        self.num_layers = num_layers
        self.num_logical = num_logical_experts
        self.num_groups = num_groups
        self.num_physical = num_logical_experts + config.ep_num_redundant_experts
        self.ep_size = config.ep_size
        self.num_nodes = config.nnodes
        self.expert_bytes = expert_bytes
        self._clock = clock
        _validate_shape(self)
        self.metrics = PlannerMetrics(registry)
        self._cond = threading.Condition()
        self._plan_lock = threading.Lock()
        self._closed = False
        self._history: dict[str, deque] = {}
        self._totals: dict[str, torch.Tensor] = {}
        self._pending = torch.zeros(num_layers, num_logical_experts, dtype=torch.float64)
        self._pending_passes = 0
        self._last_plan_at = clock()
        self.location = ExpertLocation.from_init_arg(
            config.init_expert_location,
            num_layers,
            num_logical_experts,
            self.num_physical,
            self.ep_size,
            num_groups,
            self.num_nodes,
        )
        self._plan: Plan | None = None
        if config.init_expert_location not in (None, "", "trivial"):
            self._publish(
                Plan(0, self.location, "init", 0.0, 0.0, 0, time.time(), []), moves=0
            )
        self._timer: threading.Thread | None = None

    # ------------------------------------------------------------------ reports
    def report_load(
        self,
        worker_id: str,
        layers: Mapping[int, Sequence[int]] | torch.Tensor,
        num_forward_passes: int,
        plan_version: int = 0,
        num_logical_experts: int = 0,
    ) -> ReportResult:
        """Add a worker's load since its previous report. ``layers`` is ``{layer: counts}``
        or a ``[layers, experts]`` tensor. A malformed report changes nothing."""
        try:
            counts = self._check_report(layers, num_forward_passes, num_logical_experts)
        except ValueError as exc:
            self.metrics.reports.labels("rejected").inc()
            return ReportResult(False, self.latest_version, str(exc))
        with self._cond:
            rep = _Report(self._clock(), int(num_forward_passes), counts, int(plan_version))
            self._history.setdefault(worker_id, deque(maxlen=self.HISTORY_PER_WORKER)).append(rep)
            total = self._totals.get(worker_id)
            self._totals[worker_id] = counts.clone() if total is None else total + counts
            self._pending += counts.double()
            self._pending_passes += int(num_forward_passes)
        self.metrics.reports.labels("accepted").inc()
        if self._pending_passes >= self.config.eplb_rebalance_num_iterations:
            self.rebalance(reason="iterations")
        else:
            self.maybe_rebalance()
        return ReportResult(True, self.latest_version)

    def _check_report(self, layers, passes: int, num_logical: int) -> torch.Tensor:
        E, L = self.num_logical, self.num_layers
        if num_logical and num_logical != E:
            raise ValueError(f"num_logical_experts={num_logical}, the planner's model has {E}")
        if passes < 0:
            raise ValueError(f"num_forward_passes={passes} is negative")
        if torch.is_tensor(layers):
            if tuple(layers.shape) != (L, E):
                raise ValueError(f"load tensor shape {tuple(layers.shape)}, expected [{L}, {E}]")
            counts = layers.long().cpu()
        else:
            counts = torch.zeros(L, E, dtype=torch.int64)
            for layer, row in layers.items():
                if not 0 <= layer < L:
                    raise ValueError(f"layer {layer} out of range [0, {L})")
                if len(row) != E:
                    raise ValueError(f"layer {layer}: {len(row)} counts, expected {E} (one per logical expert)")
                counts[layer] = torch.as_tensor(list(row), dtype=torch.int64)
        if (counts < 0).any():
            raise ValueError("negative expert counts")
        return counts

    def worker_load(self, worker_id: str) -> torch.Tensor | None:
        """Total load reported by one worker since start, ``[layers, experts]``."""
        with self._cond:
            t = self._totals.get(worker_id)
            return None if t is None else t.clone()

    def workers(self) -> list[str]:
        with self._cond:
            return sorted(self._history)

    # ------------------------------------------------------------------ planning
    @property
    def current_plan(self) -> Plan | None:
        with self._cond:
            return self._plan

    @property
    def latest_version(self) -> int:
        p = self.current_plan
        return -1 if p is None else p.version

    def pending_passes(self) -> int:
        with self._cond:
            return self._pending_passes

    def maybe_rebalance(self) -> Plan | None:
        """Rebalance if the iteration count or the time interval is due."""
        with self._cond:
            due_iters = self._pending_passes >= self.config.eplb_rebalance_num_iterations
            interval = self.config.eplb_rebalance_interval_s
            due_time = interval > 0 and self._clock() - self._last_plan_at >= interval
        if due_iters:
            return self.rebalance(reason="iterations")
        if due_time:
            return self.rebalance(reason="interval")
        return None

    def rebalance(self, reason: str = "manual") -> Plan | None:
        """Plan from the load gathered since the previous plan; publish it if it changes
        the placement. Returns the new plan or None."""
        with self._plan_lock:  # one plan at a time: each starts from the previous one
            return self._rebalance(reason)

    def _rebalance(self, reason: str) -> Plan | None:
        with self._cond:
            load = self._pending.clone()
            self._pending.zero_()
            self._pending_passes = 0
            self._last_plan_at = self._clock()
            old = self.location
        if load.sum() <= 0:
            self.metrics.rebalance_total.labels("no_load").inc()
            return None
        t0 = time.perf_counter()
        algorithm, new_p2l = self._compute(load, old.physical_to_logical)
        elapsed = time.perf_counter() - t0
        self.metrics.rebalance_duration.observe(elapsed)
        before = balancedness_per_layer(load, old.physical_to_logical, self.ep_size)
        after = balancedness_per_layer(load, new_p2l, self.ep_size)
        for v in before.tolist():
            self.metrics.balancedness.observe(v)
        for layer, row in enumerate(gpu_loads(load, old.physical_to_logical, self.ep_size).tolist()):
            for v in row:
                self.metrics.gpu_physical_count.labels(str(layer)).observe(v)
        moves = int(count_moves(old.physical_to_logical, new_p2l).sum())
        if moves == 0 or after.mean() <= before.mean() + _MIN_GAIN:
            # copying weights for no better balance is pure cost
            self.metrics.rebalance_total.labels("unchanged").inc()
            log.info("rebalance (%s): no better placement (balancedness %.4f)", reason, before.mean())
            return None
        location = ExpertLocation(new_p2l, self.num_logical, self.ep_size)
        with self._cond:
            version = 1 if self._plan is None else self._plan.version + 1
        plan = Plan(
            version=version,
            location=location,
            algorithm=algorithm,
            balancedness_before=float(before.mean()),
            balancedness_after=float(after.mean()),
            num_moves=moves,
            created_at=time.time(),
            layer_balancedness=after.tolist(),
        )
        self._publish(plan, moves)
        self.metrics.rebalance_total.labels("published").inc()
        log.info(
            "plan v%d (%s, %s): balancedness %.4f -> %.4f, %d expert moves, %.3fs",
            version, algorithm, reason, plan.balancedness_before, plan.balancedness_after, moves, elapsed,
        )
        return plan

    def _compute(self, load: torch.Tensor, old_p2l: torch.Tensor) -> tuple[str, torch.Tensor]:
        algo = self.config.eplb_algorithm
        if algo == "auto":
            algo = choose_algorithm(self.num_groups, self.num_nodes)
        if algo == "move_aware":
            res = rebalance_move_aware(
                load, old_p2l, self.ep_size, self.config.eplb_max_moves_per_layer, self.num_groups, self.num_nodes
            )
            return algo, res.phy2log
        if algo == "global":
            greedy = rebalance_global(load, self.num_physical, self.ep_size)[0]
            return algo, refine_placement(load, greedy, self.ep_size)
        phy2log, _, _ = rebalance_experts(load, self.num_physical, self.num_groups, self.num_nodes, self.ep_size)
        if self.num_nodes == 1:  # one node: no locality to keep, so refine like global
            phy2log = refine_placement(load, phy2log, self.ep_size)
        return algo, phy2log

    def _publish(self, plan: Plan, moves: int) -> None:
        with self._cond:
            self._plan = plan
            self.location = plan.location
            self._cond.notify_all()
        self.metrics.plan_version.set(plan.version)
        self.metrics.expert_moves.inc(moves)
        self.metrics.bytes_moved.inc(moves * self.expert_bytes)
        for layer, v in enumerate(plan.layer_balancedness):
            self.metrics.layer_balancedness.labels(str(layer)).set(v)

    # ------------------------------------------------------------------ watchers
    def wait_for_plan(self, after_version: int, timeout: float | None = None) -> Plan | None:
        """Block until a plan newer than ``after_version`` exists (returns it), or the
        timeout passes / the planner closes (returns None)."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._closed or (self._plan is not None and self._plan.version > after_version), timeout
            )
            if self._plan is not None and self._plan.version > after_version:
                return self._plan
            return None

    @property
    def closed(self) -> bool:
        return self._closed

    def start_timer(self, tick_s: float | None = None) -> None:
        """Check the time trigger in a daemon thread (only when an interval is set)."""
        interval = self.config.eplb_rebalance_interval_s
        if interval <= 0 or self._timer is not None:
            return
        tick = tick_s or min(1.0, interval / 4)

        def loop():
            while not self._closed:
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, tick)
                if not self._closed:
                    try:
                        self.maybe_rebalance()
                    except Exception:  # keep the timer alive; the error is logged
                        log.exception("timed rebalance failed")

        self._timer = threading.Thread(target=loop, name="eplb-timer", daemon=True)
        self._timer.start()

    def close(self) -> None:
        """Wake every watcher and stop the timer."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._timer is not None:
            self._timer.join(timeout=5)


def _validate_shape(p: Planner) -> None:
    if p.num_layers < 1 or p.num_logical < 1:
        raise ValueError(f"model has {p.num_layers} MoE layers and {p.num_logical} experts: not an MoE model")
    if p.num_physical % p.ep_size:
        raise ValueError(
            f"{p.num_logical} experts + ep_num_redundant_experts={p.config.ep_num_redundant_experts} = "
            f"{p.num_physical} slots do not split evenly over ep_size={p.ep_size}"
        )
    if p.ep_size % p.num_nodes:
        raise ValueError(f"ep_size={p.ep_size} is not a multiple of nnodes={p.num_nodes}")
    if p.num_groups < 1 or p.num_logical % p.num_groups:
        raise ValueError(f"n_group={p.num_groups} does not divide {p.num_logical} experts")
    if p.config.eplb_algorithm == "hierarchical" and p.num_groups % p.num_nodes:
        raise ValueError(
            f"eplb_algorithm=hierarchical needs n_group={p.num_groups} divisible by nnodes={p.num_nodes}; use auto or global"
        )


# ---------------------------------------------------------------------- model shape helpers
def model_moe_shape(model_path: str) -> tuple[int, int, int]:
    """``(num_moe_layers, num_logical_experts, num_groups)`` from a checkpoint's config.json.

    Experts: ``num_experts`` (Qwen-MoE), ``n_routed_experts`` (DeepSeek/GLM-4-MoE) or
    ``num_local_experts`` (Mixtral). MoE layers skip ``first_k_dense_replace`` leading
    dense layers and ``mlp_only_layers``, and follow ``decoder_sparse_step`` /
    ``moe_layer_freq``. Groups: ``n_group`` (1 when absent).
    """
    c = read_hf_config(model_path)
    experts = c.get("num_experts") or c.get("n_routed_experts") or c.get("num_local_experts") or 0
    if not experts:
        raise ValueError(f"{model_path}: config.json has no num_experts / n_routed_experts: not an MoE model")
    layers = int(c["num_hidden_layers"])
    first_dense = int(c.get("first_k_dense_replace") or 0)
    step = int(c.get("decoder_sparse_step") or 1)
    freq = int(c.get("moe_layer_freq") or 1)
    mlp_only = set(c.get("mlp_only_layers") or [])
    moe_layers = sum(
        1
        for i in range(layers)
        if i >= first_dense and i not in mlp_only and (i + 1) % step == 0 and i % freq == 0
    )
    return moe_layers, int(experts), int(c.get("n_group") or 1)


def expert_weight_bytes(model_path: str) -> int:
    """Bytes of one routed expert's weights (gate, up, down projections), 0 if unknown."""
    c = read_hf_config(model_path)
    hidden = c.get("hidden_size") or 0
    inter = c.get("moe_intermediate_size") or c.get("intermediate_size") or 0
    dtype = str(c.get("torch_dtype") or c.get("dtype") or "bfloat16")
    size = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype.replace("torch.", ""), 2)
    return int(3 * hidden * inter * size)
