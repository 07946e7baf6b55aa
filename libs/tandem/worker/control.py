"""Engine control plane of a worker: profiling over the system HTTP port and gRPC (LoRA
adapters: ``lora_control``; the expert recorder: ``eplb``).

    POST /engine/start_profile {"output_dir": "...", "num_steps": 5, "activities": ["CPU"],
                                "record_shapes": false, "with_stack": false}
    POST /engine/stop_profile  -> {"trace_path": "..."}
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from tandem.server.system_http import SystemHttpServer
from tandem.v1 import engine_control_pb2, engine_control_pb2_grpc
from tandem.worker.lora_control import LoraControl, LoraControlError, LoraResult
from tandem.worker.profiler import EngineProfiler, ProfileRequest

if TYPE_CHECKING:
    from tandem.worker.decode import DrainReport

DEFAULT_DRAIN_TIMEOUT_S = 60.0


def _profile_request(body: dict) -> ProfileRequest:
    allowed = {"output_dir", "num_steps", "activities", "record_shapes", "with_stack"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        return ProfileRequest(output_dir=str(body.get("output_dir") or ""), num_steps=int(body.get("num_steps", 0)),
                              activities=tuple(body.get("activities") or ()),
                              record_shapes=bool(body.get("record_shapes", False)),
                              with_stack=bool(body.get("with_stack", False)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad profile request: {exc}") from None


def add_profile_routes(system: SystemHttpServer, profiler: EngineProfiler) -> None:
    def start(body: dict):
        req = _profile_request(body)
        try:
            message = profiler.start(req)
        except RuntimeError as exc:
            return 409, {"error": str(exc)}
        return 200, {"ok": True, "message": message}

    def stop(body: dict):
        try:
            path = profiler.stop()
        except RuntimeError as exc:
            return 409, {"error": str(exc)}
        except TimeoutError as exc:
            return 504, {"error": str(exc)}
        return 200, {"ok": True, "trace_path": path}

    system.add_route("POST", "/engine/start_profile", start)
    system.add_route("POST", "/engine/stop_profile", stop)


class EngineControlServicer(engine_control_pb2_grpc.EngineControlServicer):
    """gRPC twin of the HTTP control routes; expert recording is added by the EPLB hook."""

    def __init__(self, profiler: EngineProfiler, expert_recorder=None, loras: LoraControl | None = None) -> None:
        self.profiler = profiler
        self.expert_recorder = expert_recorder
        self.loras = loras
        self._drain: Callable[[float], DrainReport] | None = None

    def serve_drain(self, drain: Callable[[float], DrainReport]) -> None:
        """Answer Drain with ``drain(timeout_s)`` (decode and aggregated workers; others refuse it)."""
        self._drain = drain

    def Drain(self, request, context):
        if self._drain is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Drain is served by decode and aggregated workers")
        if request.timeout_s < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"timeout_s={request.timeout_s}: must be >= 0")
        report = self._drain(request.timeout_s or DEFAULT_DRAIN_TIMEOUT_S)
        message = ("drained" if report.ok else
                   f"not drained: {report.requests_left} requests and {report.pages_in_use} pages left")
        return engine_control_pb2.DrainResponse(ok=report.ok, message=message,
                                                num_requests_handed_back=len(report.handed_back),
                                                request_ids=report.handed_back,
                                                num_requests_left=report.requests_left,
                                                num_pages_in_use=report.pages_in_use,
                                                num_requests_moved=report.moved, num_pages_moved=report.pages_moved)

    def StartProfile(self, request, context):
        req = ProfileRequest(output_dir=request.output_dir, num_steps=request.num_steps,
                             activities=tuple(request.activities), record_shapes=request.record_shapes,
                             with_stack=request.with_stack)
        try:
            message = self.profiler.start(req)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RuntimeError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return engine_control_pb2.ProfileResponse(ok=True, message=message)

    def StopProfile(self, request, context):
        try:
            path = self.profiler.stop()
        except RuntimeError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except TimeoutError as exc:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        return engine_control_pb2.ProfileResponse(ok=True, message="profile written", trace_path=path)

    def _recorder(self, context):
        if self.expert_recorder is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "expert distribution recording needs a MoE model (and --expert-distribution-recorder-mode)")
        return self.expert_recorder

    def StartExpertDistributionRecord(self, request, context):
        rec = self._recorder(context)
        rec.start()
        return engine_control_pb2.ExpertRecordResponse(ok=True, message="recording", mode=rec.mode)

    def StopExpertDistributionRecord(self, request, context):
        rec = self._recorder(context)
        rec.stop()
        return engine_control_pb2.ExpertRecordResponse(ok=True, message="stopped", mode=rec.mode)

    def DumpExpertDistributionRecord(self, request, context):
        rec = self._recorder(context)
        try:
            path = rec.dump_to_dir(request.output_dir or None, request.format or "json")
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return engine_control_pb2.ExpertRecordResponse(ok=True, message="dumped", path=str(path), mode=rec.mode)

    # ---- LoRA adapters (LoraControl) -------------------------------------------------------------
    def _lora(self, context, call) -> engine_control_pb2.LoraResponse:
        try:
            r: LoraResult = call()
        except LoraControlError as exc:
            context.abort(exc.code, exc.message)
        return engine_control_pb2.LoraResponse(ok=True, message=r.message, adapters=[
            engine_control_pb2.LoraAdapterInfo(lora_name=n, lora_path=p) for n, p in sorted(r.adapters.items())])

    def LoadLora(self, request, context):
        return self._lora(context, lambda: self.loras.load(request.lora_name, request.lora_path))

    def UnloadLora(self, request, context):
        return self._lora(context, lambda: self.loras.unload(request.lora_name))

    def ListLoras(self, request, context):
        return self._lora(context, self.loras.list)
