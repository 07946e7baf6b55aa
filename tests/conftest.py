"""Test-suite wide options: `slow` tests (heavier than `make test` allows) run with --run-slow."""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavier test, excluded from `make test` (use --run-slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    """A real etcd on loopback for a module's tests; skipped, with the reason, when the etcd
    binary cannot be installed (build-support/install-etcd.sh)."""
    from tests.unit.routing.routing_etcd import EtcdServer

    try:
        server = EtcdServer(str(tmp_path_factory.mktemp("etcd")))
    except RuntimeError as e:
        pytest.skip(str(e))
    yield server
    server.stop()
