"""The transfer suite (backend_suite.py) for the grpc backend and for the shared-memory test
backend written from the README (shm_backend.py); nixl runs it in test_nixl_backend.py."""

from __future__ import annotations

import pytest
from backend_suite import BackendSuite

pytestmark = pytest.mark.timeout(120)


class TestGrpcBackend(BackendSuite):
    backend = "grpc"


class TestShmBackend(BackendSuite):
    backend = "shm"
