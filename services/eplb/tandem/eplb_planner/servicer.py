"""gRPC ``tandem.v1.EplbPlanner`` over a :class:`~tandem.eplb.planner.Planner`."""
from __future__ import annotations

import logging

import grpc
from prometheus_client import CollectorRegistry
from tandem.config import EplbPlannerConfig
from tandem.eplb.planner import Planner
from tandem.eplb.plans import plan_to_proto
from tandem.v1 import eplb_pb2, eplb_pb2_grpc

log = logging.getLogger(__name__)

__all__ = ["EplbPlannerServicer"]

# How often a WatchPlans stream wakes up to notice a cancelled client.
_WATCH_POLL_S = 0.5


class EplbPlannerServicer(eplb_pb2_grpc.EplbPlannerServicer):
    """Implements ReportLoad / WatchPlans / GetPlan. Call :meth:`close` on shutdown so
    open WatchPlans streams end."""

    def __init__(
        self,
        config: EplbPlannerConfig,
        num_layers: int,
        num_logical_experts: int,
        num_groups: int,
        registry: CollectorRegistry | None = None,
        expert_bytes: int = 0,
    ):
        self.planner = Planner(
            config, num_layers, num_logical_experts, num_groups, registry=registry, expert_bytes=expert_bytes
        )
        self.planner.start_timer()

    def ReportLoad(self, request: eplb_pb2.ReportLoadRequest, context) -> eplb_pb2.ReportLoadResponse:
        layers: dict[int, list[int]] = {}
        for entry in request.layers:
            if entry.layer in layers:
                self.planner.metrics.reports.labels("rejected").inc()
                return eplb_pb2.ReportLoadResponse(
                    accepted=False,
                    latest_plan_version=self.planner.latest_version,
                    message=f"layer {entry.layer} reported twice",
                )
            layers[entry.layer] = list(entry.counts)
        res = self.planner.report_load(
            request.worker_id or context.peer(),
            layers,
            request.num_forward_passes,
            request.plan_version,
            request.num_logical_experts,
        )
        if not res.accepted:
            log.warning("rejected load report from %s: %s", request.worker_id, res.message)
        return eplb_pb2.ReportLoadResponse(
            accepted=res.accepted, latest_plan_version=res.latest_plan_version, message=res.message
        )

    def GetPlan(self, request: eplb_pb2.GetPlanRequest, context) -> eplb_pb2.ExpertPlan:
        plan = self.planner.current_plan
        if plan is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no expert placement plan yet")
        return plan_to_proto(plan)

    def WatchPlans(self, request: eplb_pb2.WatchPlansRequest, context):
        # since_version 0 (the default) means "send me the current plan, whatever it is".
        after = request.since_version if request.since_version > 0 else -1
        while True:
            plan = self.planner.wait_for_plan(after, timeout=_WATCH_POLL_S)
            if plan is not None:  # delivered even when closing, so no plan is lost
                after = plan.version
                yield plan_to_proto(plan)
            elif self.planner.closed or not context.is_active():
                return

    def close(self) -> None:
        self.planner.close()
