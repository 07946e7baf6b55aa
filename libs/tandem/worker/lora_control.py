"""LoRA adapters loaded and unloaded while a worker serves (admin routes, behind --admin-token).

SGLang's system HTTP routes, on the worker's system port:

    POST /load_lora_adapter   {"lora_name": "a", "lora_path": "/path/to/adapter"}
    POST /unload_lora_adapter {"lora_name": "a"}
    GET  /lora_adapters
    -> {"success": true, "message": "...", "loaded_adapters": {"a": "/path/to/adapter"}}

and their gRPC twins ``EngineControl.LoadLora`` / ``UnloadLora`` / ``ListLoras``. Both are thin
over :class:`LoraControl`, which waits for the engine loop to do the work between two steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from tandem.engine import LoraAdapterError, LoraExistsError, LoraInUseError, UnknownLoraError
from tandem.server.system_http import SystemHttpServer
from tandem.worker.engine_loop import EngineLoop

# What each refusal is, over gRPC and HTTP (most specific first: they subclass LoraAdapterError).
_ERRORS = ((UnknownLoraError, grpc.StatusCode.NOT_FOUND, 404),
           (LoraExistsError, grpc.StatusCode.ALREADY_EXISTS, 409),
           (LoraInUseError, grpc.StatusCode.FAILED_PRECONDITION, 409),
           (LoraAdapterError, grpc.StatusCode.INVALID_ARGUMENT, 400))


class LoraControlError(Exception):
    """A refused LoRA command, with its gRPC code and HTTP status."""

    def __init__(self, code: grpc.StatusCode, http_status: int, message: str) -> None:
        super().__init__(message)
        self.code, self.http_status, self.message = code, http_status, message


@dataclass
class LoraResult:
    message: str
    adapters: dict[str, str]  # every adapter the worker holds now: name -> path


class LoraControl:
    def __init__(self, loop: EngineLoop, timeout: float = 120.0) -> None:
        self.loop, self.timeout = loop, timeout

    def _run(self, fut) -> dict[str, str]:
        try:
            return fut.result(self.timeout)
        except (UnknownLoraError, LoraAdapterError) as exc:
            code, status = next((c, s) for kind, c, s in _ERRORS if isinstance(exc, kind))
            raise LoraControlError(code, status, str(exc)) from None

    def _enabled(self) -> None:
        if not self.loop.lora_enabled:
            raise LoraControlError(grpc.StatusCode.FAILED_PRECONDITION, 400,
                                   "this worker serves no LoRA adapters (start it with --enable-lora)")

    @staticmethod
    def _name(name: str) -> str:
        if not name:
            raise LoraControlError(grpc.StatusCode.INVALID_ARGUMENT, 400, "lora_name: required")
        return name

    def load(self, name: str, path: str) -> LoraResult:
        self._enabled()
        if not path:
            raise LoraControlError(grpc.StatusCode.INVALID_ARGUMENT, 400, "lora_path: required")
        adapters = self._run(self.loop.load_lora(self._name(name), path))
        return LoraResult(f"loaded LoRA adapter {name!r} from {path!r}", adapters)

    def unload(self, name: str) -> LoraResult:
        self._enabled()
        adapters = self._run(self.loop.unload_lora(self._name(name)))
        return LoraResult(f"unloaded LoRA adapter {name!r}", adapters)

    def list(self) -> LoraResult:
        return LoraResult(f"{len(self.loop.loras)} LoRA adapter(s)", dict(self.loop.loras))

    # ---- SGLang's HTTP routes -----------------------------------------------------------------
    def add_routes(self, system: SystemHttpServer) -> None:
        def fields(body: dict, allowed: set[str]) -> dict:
            unknown = sorted(set(body) - allowed)
            if unknown:
                raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
            if any(not isinstance(v, str) for v in body.values()):
                raise ValueError(f"{sorted(allowed)}: strings expected")
            return body

        def reply(call):
            try:
                r = call()
            except LoraControlError as exc:
                return exc.http_status, {"success": False, "error_message": exc.message}
            return 200, {"success": True, "message": r.message, "loaded_adapters": r.adapters}

        def load(body: dict):
            b = fields(body, {"lora_name", "lora_path"})
            return reply(lambda: self.load(b.get("lora_name", ""), b.get("lora_path", "")))

        def unload(body: dict):
            b = fields(body, {"lora_name"})
            return reply(lambda: self.unload(b.get("lora_name", "")))

        system.add_route("POST", "/load_lora_adapter", load)
        system.add_route("POST", "/unload_lora_adapter", unload)
        system.add_route("GET", "/lora_adapters", lambda body: reply(self.list))
