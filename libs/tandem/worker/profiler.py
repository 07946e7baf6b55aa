"""Engine profiler: torch.profiler started and stopped on demand, one Chrome trace per run.

The engine loop calls `after_step()` after every forward step; a profile started with
`num_steps=N` stops itself after N steps, one started with 0 runs until `stop()`.
Start/stop may come from any thread (HTTP or gRPC); the profiler itself is entered and
exited on the engine loop thread, which is the thread whose work it records.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tandem.worker.engine_loop import LoopHook
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)

_ACTIVITIES = {"CPU": ProfilerActivity.CPU, "CUDA": ProfilerActivity.CUDA}


@dataclass
class ProfileRequest:
    output_dir: str
    num_steps: int = 0
    activities: tuple[str, ...] = ()
    record_shapes: bool = False
    with_stack: bool = False

    def validate(self) -> None:
        if self.num_steps < 0:
            raise ValueError(f"num_steps={self.num_steps}: must be >= 0 (0 = until stop_profile)")
        unknown = [a for a in self.activities if a.upper() not in _ACTIVITIES]
        if unknown:
            raise ValueError(f"activities={list(self.activities)}: unknown {unknown}; allowed CPU, CUDA")
        if any(a.upper() == "CUDA" for a in self.activities) and not torch.cuda.is_available():
            raise ValueError("activities include CUDA but no CUDA device is available")


class EngineProfiler(LoopHook):
    def __init__(self, default_dir: str, worker_name: str) -> None:
        self.default_dir = default_dir
        self.worker_name = worker_name
        self._lock = threading.Lock()
        self._pending: ProfileRequest | None = None  # asked for, not yet entered on the loop thread
        self._active: profile | None = None
        self._request: ProfileRequest | None = None
        self._steps = 0
        self._stop_requested = False
        self._done = threading.Condition(self._lock)
        self.last_trace: str | None = None

    @property
    def running(self) -> bool:
        with self._lock:
            return self._active is not None or self._pending is not None

    def start(self, request: ProfileRequest) -> str:
        request.validate()
        if not request.output_dir:
            request.output_dir = self.default_dir
        Path(request.output_dir).mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._active is not None or self._pending is not None:
                raise RuntimeError("a profile is already running; call stop_profile first")
            self._pending = request
            self._stop_requested = False
            self.last_trace = None
        return f"profiling started ({request.num_steps or 'until stop'} steps) into {request.output_dir}"

    def stop(self, timeout: float = 60.0) -> str:
        """Ask the loop thread to stop and wait until the trace is written; returns its path."""
        with self._lock:
            if self._active is None and self._pending is None:
                if self.last_trace:
                    return self.last_trace
                raise RuntimeError("no profile is running")
            self._stop_requested = True
            if not self._done.wait_for(lambda: self._active is None and self._pending is None, timeout):
                raise TimeoutError(f"profiler did not stop within {timeout}s (is the engine loop running?)")
            return self.last_trace or ""

    def poll(self) -> None:
        """Engine loop thread, every iteration: enter a requested profile, leave a stopped one."""
        with self._lock:
            if self._pending is not None and self._active is None:
                req = self._pending
                acts = [_ACTIVITIES[a.upper()] for a in req.activities] or (
                    [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
                self._active = profile(activities=acts, record_shapes=req.record_shapes, with_stack=req.with_stack)
                self._active.__enter__()
                self._request, self._pending, self._steps = req, None, 0
            if self._active is not None and self._stop_requested:
                self._finish()

    def after_step(self, stats) -> None:
        """Engine loop thread, after each forward step."""
        with self._lock:
            if self._active is None:
                return
            self._active.step()
            self._steps += 1
            if self._request.num_steps and self._steps >= self._request.num_steps:
                self._finish()

    def _finish(self) -> None:
        prof, req = self._active, self._request
        prof.__exit__(None, None, None)
        path = os.path.join(req.output_dir, f"{self.worker_name}-{int(time.time() * 1000)}-{os.getpid()}.trace.json")
        prof.export_chrome_trace(path)
        log.info("profile of %d steps written to %s", self._steps, path)
        self.last_trace = path
        self._active = self._request = None
        self._stop_requested = False
        self._done.notify_all()
