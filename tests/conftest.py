"""Test-suite wide rules.

Skips: the only tests that may be skipped are those needing hardware this machine lacks.
Mark such a test with one of the markers in HARDWARE (``@pytest.mark.requires_cuda``,
``@pytest.mark.requires_2_gpus``, also on a ``pytest.param``); the skip decision is made
here and nowhere else. Anything else a test needs (a Python package, etcd, Prometheus,
promtool, a demo model) it gets itself or ``make test`` installs it first, so any other
skip (``pytest.skip``, ``skipif``, ``importorskip``) is reported as a failure.

``slow`` marks the heavier tests. They run in ``make test`` like every other test;
``-m "not slow"`` leaves them out of a quick local run.
"""
from __future__ import annotations

import os

import pytest

# The Triton interpreter (CPU kernel tests) runs tl.dot as numpy's matmul. numpy's OpenBLAS with its
# own threads next to torch's on this 2-core shared machine took 30 ms for one 64x128x128 product,
# 0.03 ms with one thread (measured): set before anything loads numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# marker -> (CUDA GPUs needed, what the test needs, in words)
HARDWARE = {
    "requires_cuda": (1, "a CUDA GPU"),
    "requires_2_gpus": (2, "2 CUDA GPUs"),
}
_HARDWARE_SKIP = pytest.StashKey[bool]()


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavier test; runs in `make test` (-m 'not slow' leaves it out)")
    for name, (_, what) in HARDWARE.items():
        config.addinivalue_line("markers", f"{name}: needs {what}; skipped where absent (tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    wanted = [(item, HARDWARE[m.name]) for item in items for m in item.iter_markers() if m.name in HARDWARE]
    if not wanted:
        return
    have = cuda_device_count()
    for item, (gpus, what) in wanted:
        if have < gpus:
            item.stash[_HARDWARE_SKIP] = True
            item.add_marker(pytest.mark.skip(reason=f"hardware: needs {what}, this machine has {have} CUDA GPU(s)"))


def _not_allowed(reason: str) -> str:
    return (f"skipped for a reason outside the hardware list (tests/conftest.py HARDWARE): {reason}\n"
            "A test gets what it needs itself, or `make test` installs it; only absent hardware may skip.")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.skipped and not hasattr(report, "wasxfail") and not item.stash.get(_HARDWARE_SKIP, False):
        report.outcome = "failed"
        report.longrepr = _not_allowed(_skip_reason(report))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if report.skipped:  # a module-level skip
        report.outcome = "failed"
        report.longrepr = _not_allowed(_skip_reason(report))


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    """A real etcd on loopback for a module's tests (installed on first use if missing)."""
    from tests.unit.routing.routing_etcd import EtcdServer

    server = EtcdServer(str(tmp_path_factory.mktemp("etcd")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def etcd_tls(tmp_path_factory):
    """A real etcd on loopback over TLS that requires client certificates of `etcd_tls.pki`'s CA
    (--client-cert-auth); `pki.files(name)` issues them, `pki.rogue(name)` those of another CA."""
    from tests.support.pki import make_pki
    from tests.unit.routing.routing_etcd import EtcdServer

    directory = tmp_path_factory.mktemp("etcd-tls")
    server = EtcdServer(str(directory), pki=make_pki(directory / "pki"))
    yield server
    server.stop()
