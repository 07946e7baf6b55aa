"""Each service starts as a real process, turns SERVING, answers reflection, stops cleanly on SIGTERM."""
from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.procs import REPO, start_service

SERVICES = {
    "tandem.router": ("tandem.v1.Router", ["--model-path", "models/tandem-demo-dense", "--http-port", "0"]),
    "tandem.eplb_planner": ("tandem.v1.EplbPlanner", ["--model-path", "models/tandem-demo-moe"]),
    "tandem.prefill": ("tandem.v1.Prefill", ["--model-path", "models/tandem-demo-dense", "--max-total-tokens", "4096"]),
    "tandem.decode": ("tandem.v1.Decode", ["--model-path", "models/tandem-demo-dense", "--max-total-tokens", "4096"]),
}


def list_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        return {s.name for r in responses for s in r.list_services_response.service}


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_service_serves_health_and_reflection_then_stops_on_sigterm(module):
    service, args = SERVICES[module]
    # An idle service must not sit out its drain grace period: with a 600 s grace period, one that
    # waited for it would still be running when stop() gives up and kills it (exit code != 0).
    svc = start_service(module, *args, "--shutdown-grace-period", "600")
    try:
        assert svc.health_status() == health_pb2.HealthCheckResponse.SERVING
        assert svc.health_status(service) == health_pb2.HealthCheckResponse.SERVING
        names = list_services(svc.grpc_address)
        assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
        with urllib.request.urlopen(f"http://{svc.system_address}/health", timeout=5) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://{svc.system_address}/metrics", timeout=5) as r:
            assert b"python_info" in r.read()
            assert r.headers["Content-Type"].startswith("text/plain")
    finally:
        code = svc.stop(signal.SIGTERM, timeout=120)  # well below the 600 s grace
    assert code == 0, svc.log()  # it exited by itself, long before the grace period
    assert "stopped" in svc.log()


@pytest.mark.parametrize("module", ["tandem.router", "tandem.prefill", "tandem.decode", "tandem.eplb_planner"])
def test_help_lists_flags_and_bad_flag_fails_with_one_line(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and "--system-port" in out.stdout and "--print-config" in out.stdout
    bad = subprocess.run([sys.executable, "-m", module, "--port", "99999"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "config error: port='99999': Input should be less than or equal to 65535"
