"""Start real tandem service processes for integration tests and wait until they serve."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServiceProcess:
    module: str
    proc: subprocess.Popen
    grpc_address: str
    system_address: str
    log_path: Path
    _log_file: object = field(repr=False, default=None)
    info: dict = field(default_factory=dict)  # the ready file: grpc, system, pid (+ http for the router)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_address)

    def health_status(self, service: str = "") -> int:
        with self.channel() as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the process and wait for it; a process still running after ``timeout`` (a
        deadline for a hang, not a speed test: generous, since the suite runs two test files at
        once on two cores) is killed, and its exit code is then the kill's."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log_file:
            self._log_file.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def start_service(module: str, *args: str, timeout: float = 120.0, env: dict | None = None,
                  log_dir: str | None = None) -> ServiceProcess:
    """Run `python -m <module> --port 0 --system-port 0 <args>` and wait for it to be SERVING.

    Readiness comes from the service's --ready-file, written once health is SERVING.
    """
    log_dir = log_dir or tempfile.mkdtemp(prefix="tandem-test-")
    name = module.rsplit(".", 1)[-1]
    ready = Path(log_dir) / f"{name}-{os.getpid()}-{time.monotonic_ns()}.ready"
    log_path = ready.with_suffix(".log")
    log_file = open(log_path, "w")
    cmd = [sys.executable, "-m", module, "--port", "0", "--system-port", "0", "--ready-file", str(ready), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            log_file.close()
            raise RuntimeError(f"{module} exited with {proc.returncode} before ready:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            log_file.close()
            raise TimeoutError(f"{module} not ready after {timeout}s:\n{log_path.read_text()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return ServiceProcess(module, proc, info["grpc"], info["system"], log_path, log_file, info)
