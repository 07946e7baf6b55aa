"""EPLB on a worker: expert placement, the expert-distribution recorder, and the planner
client (ReportLoad with recorded load, WatchPlans -> new placement applied between
forward passes). Control over HTTP (SGLang's routes) and the EngineControl gRPC service:

    POST /start_expert_distribution_record
    POST /stop_expert_distribution_record
    POST /dump_expert_distribution_record   {"output_dir": "...", "format": "json" | "pt"}
"""
from __future__ import annotations

import logging
import os
import threading
import time

import grpc
from tandem.eplb.plans import plan_from_proto
from tandem.eplb.recorder import ExpertDistributionRecorder
from tandem.eplb.runtime import EplbRuntime
from tandem.server.channels import open_channel
from tandem.server.system_http import SystemHttpServer
from tandem.server.tls import TlsFiles
from tandem.v1 import eplb_pb2, eplb_pb2_grpc
from tandem.worker.engine_loop import EngineLoop, LoopHook

log = logging.getLogger(__name__)


class ExpertRecorderControl:
    """Start/stop/dump of the recorder, shared by the HTTP routes and gRPC."""

    def __init__(self, recorder: ExpertDistributionRecorder, default_dir: str, worker_name: str) -> None:
        self.recorder = recorder
        self.default_dir = default_dir
        self.worker_name = worker_name

    @property
    def mode(self) -> str:
        return self.recorder.mode

    def start(self) -> None:
        self.recorder.start()

    def stop(self) -> None:
        self.recorder.stop()

    def dump_to_dir(self, output_dir: str | None, fmt: str = "json") -> str:
        if fmt not in ("json", "pt"):
            raise ValueError(f"format={fmt!r}: allowed json, pt")
        out = output_dir or self.default_dir
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"expert_distribution_{self.worker_name}_{int(time.time() * 1000)}.{fmt}")
        return self.recorder.dump(path, fmt)

    def add_routes(self, system: SystemHttpServer) -> None:
        def start(_body):
            self.start()
            return 200, {"ok": True, "mode": self.mode}

        def stop(_body):
            self.stop()
            return 200, {"ok": True, "mode": self.mode}

        def dump(body):
            path = self.dump_to_dir(body.get("output_dir"), body.get("format", "json"))
            return 200, {"ok": True, "path": path, "mode": self.mode}

        system.add_route("POST", "/start_expert_distribution_record", start)
        system.add_route("POST", "/stop_expert_distribution_record", stop)
        system.add_route("POST", "/dump_expert_distribution_record", dump)


class _ForwardPasses(LoopHook):
    """After every engine step (one forward pass at most) the recorder folds its device counters."""

    def __init__(self, eplb: EplbRuntime) -> None:
        self.eplb = eplb

    def after_step(self, stats) -> None:
        self.eplb.end_pass()


class WorkerEplb:
    """Built before the engine loop starts; the engine built the placement, dispatcher and recorder
    into its MoE layers from the same config (``engine.eplb``). After that it reaches the engine
    only through loop commands (plans) and the recorder's thread-safe reads."""

    def __init__(self, config, loop: EngineLoop, worker_id: str) -> None:
        engine = loop.engine  # not started yet: reading its EPLB runtime is safe here
        self.config = config
        self.loop = loop
        self.worker_id = worker_id
        if engine.eplb is None or engine.eplb.recorder is None:
            raise ValueError("--enable-eplb / --expert-distribution-recorder-mode need a MoE model; "
                             f"{config.model_path} has no MoE layers")
        self.eplb = engine.eplb
        self.recorder = self.eplb.recorder
        location = self.eplb.location
        self.num_layers = location.num_layers
        self.num_logical = location.num_logical
        self.num_physical = location.num_physical
        self.plan_version = 0
        self.plans_applied = 0
        self.plans_rejected = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stream = None
        self._channel = None
        loop.add_hook(_ForwardPasses(self.eplb))
        self.control = ExpertRecorderControl(self.recorder, config.profile_dir, worker_id.replace(":", "_"))

    def status(self) -> dict:
        return {"plan_version": self.plan_version, "plans_applied": self.plans_applied,
                "plans_rejected": self.plans_rejected, "recorder_mode": self.recorder.mode,
                "recording": self.recorder.recording, "num_layers": self.num_layers,
                "num_logical_experts": self.num_logical, "num_physical_experts": self.num_physical,
                "physical_to_logical": self.eplb.location.physical_to_logical.tolist()}

    def add_routes(self, system: SystemHttpServer) -> None:
        self.control.add_routes(system)
        system.add_route("GET", "/eplb/status", lambda _body: (200, self.status()))

    # ---- plans ---------------------------------------------------------------------------
    def submit_plan(self, msg: eplb_pb2.ExpertPlan) -> bool:
        """Queue a plan from the planner: applied by the engine loop between two forward
        passes. A bad one is logged and the old placement kept."""
        try:
            self.eplb.submit(plan_from_proto(msg, self.num_layers), msg.version)
        except ValueError as exc:
            self.plans_rejected += 1
            log.error("rejected EPLB plan v%d, keeping v%d: %s", msg.version, self.plan_version, exc)
            return False
        self.loop.call(lambda _engine: self._apply_pending())
        return True

    def _apply_pending(self) -> None:
        """Loop thread, between forward passes: copy expert weights into their new slots."""
        if not self.eplb.has_pending:
            return  # a later command already applied it
        copies = self.eplb.apply_pending()
        self.plan_version = self.eplb.version
        self.plans_applied += 1
        log.info("applied EPLB plan v%s: %d expert copies", self.plan_version, copies)

    # ---- planner client ---------------------------------------------------------------------
    def start_planner_client(self, address: str, report_interval_s: float = 1.0, tls: TlsFiles | None = None) -> None:
        self._channel = open_channel(address, tls)
        self._stub = eplb_pb2_grpc.EplbPlannerStub(self._channel)
        for target, name in ((self._watch, "eplb-watch"), (self._report, "eplb-report")):
            t = threading.Thread(target=target, args=(report_interval_s,), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _watch(self, _interval: float) -> None:
        while not self._stop.is_set():
            try:
                self._stream = self._stub.WatchPlans(eplb_pb2.WatchPlansRequest(worker_id=self.worker_id,
                                                                                since_version=self.plan_version))
                for plan in self._stream:
                    if plan.version > self.plan_version:
                        self.submit_plan(plan)
            except grpc.RpcError as exc:
                if not self._stop.is_set():
                    log.debug("WatchPlans ended (%s); reconnecting", exc.code().name)
            self._stop.wait(1.0)

    def _report(self, interval: float) -> None:
        while not self._stop.wait(interval):
            counts, passes = self.recorder.take_load_delta()
            if passes == 0:
                continue
            req = eplb_pb2.ReportLoadRequest(
                worker_id=self.worker_id, num_forward_passes=passes, plan_version=self.plan_version,
                num_logical_experts=self.num_logical,
                layers=[eplb_pb2.LayerLoad(layer=i, counts=row) for i, row in enumerate(counts.tolist())])
            try:
                resp = self._stub.ReportLoad(req, timeout=10)
                if not resp.accepted:
                    log.warning("planner rejected our load report: %s", resp.message)
            except grpc.RpcError as exc:
                log.debug("ReportLoad failed (%s); load of %d passes dropped", exc.code().name, passes)

    def close(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.cancel()
        if self._channel is not None:
            self._channel.close()
