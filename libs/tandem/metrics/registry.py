"""Registries and exposition for one process or several (prometheus_client multiprocess mode).

Single process: metrics are registered on a plain ``CollectorRegistry`` and exposed from it.

Several processes of one service (``PROMETHEUS_MULTIPROC_DIR`` set): every process writes
its samples to mmap files in that directory, and the process serving ``/metrics`` exposes a
registry holding only a ``MultiProcessCollector``, which merges the files. Metrics must
then *not* be registered on that exposition registry (they would be reported twice), so
metric constructors go through :func:`registration_target`.

prometheus_client chooses its value storage when it is first imported, so the variable
must be set before anything imports ``prometheus_client``; :func:`make_registry` raises a
clear error when that order was wrong instead of silently exposing nothing.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

ENV_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


class MultiProcessRegistry(CollectorRegistry):
    """The exposition registry of a multiprocess service: only its MultiProcessCollector."""


def multiproc_dir() -> str | None:
    """The multiprocess directory from the environment, or None in single-process mode."""
    return os.environ.get(ENV_MULTIPROC_DIR) or os.environ.get("prometheus_multiproc_dir") or None


def make_registry() -> CollectorRegistry:
    """A registry for the current environment.

    Without ``PROMETHEUS_MULTIPROC_DIR``: a fresh ``CollectorRegistry`` to register metrics on.
    With it: a registry holding a ``MultiProcessCollector`` over that directory; metrics built
    by this package on it write to the shared files instead of registering.
    """
    path = multiproc_dir()
    if path is None:
        return CollectorRegistry()
    if not os.path.isdir(path):
        raise ValueError(f"{ENV_MULTIPROC_DIR}={path!r} is not an existing directory")
    if values.ValueClass is values.MutexValue:
        raise RuntimeError(
            f"{ENV_MULTIPROC_DIR} was set after prometheus_client was imported; set it in the "
            "environment before the process starts (or before any import of prometheus_client)"
        )
    registry = MultiProcessRegistry()
    MultiProcessCollector(registry, path=path)
    return registry


def is_multiprocess(registry: CollectorRegistry | None) -> bool:
    """True for an exposition registry made by :func:`make_registry` in multiprocess mode."""
    return isinstance(registry, MultiProcessRegistry)


def registration_target(registry: CollectorRegistry | None) -> CollectorRegistry | None:
    """The registry to pass to a metric constructor (None = do not register)."""
    return None if is_multiprocess(registry) else registry


def metrics_text(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type, for ``/metrics``.

    The body uses legacy (``[a-zA-Z_:]``) names only, so it is announced as text format
    0.0.4, which every Prometheus 2.x scraper parses.
    """
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


def prepare_multiproc_dir(path: str) -> str:
    """Create ``path`` empty (removing files of an earlier run) for a multiprocess service.

    Call it in the parent before any child starts, then export ``PROMETHEUS_MULTIPROC_DIR``.
    """
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def process_exited(pid: int) -> None:
    """Tell the multiprocess collector that ``pid`` is gone (drops its ``live*`` gauges)."""
    path = multiproc_dir()
    if path is not None:
        mark_process_dead(pid, path)


class RefreshCollector:
    """A collector that yields nothing but runs ``fn`` on every scrape.

    Used to update gauges that depend on the scrape time (uptime). In multiprocess mode the
    merged value lags one scrape, since the file collector may run before this one.
    """

    def __init__(self, fn: Callable[[], None]):
        self._fn = fn

    def describe(self):
        return []

    def collect(self):
        self._fn()
        return []
