"""Scheduler -> service stats transport over ZMQ PUSH/PULL.

The engine side (:class:`StatsSender`) connects a PUSH socket and sends with NOBLOCK,
a small high-water mark and ``ZMQ_IMMEDIATE``: if the publisher is slow, stalled or gone,
``send`` drops the message and counts it instead of blocking the scheduler loop. ZMQ
reconnects by itself, so a restarted publisher starts receiving again without any action
on the engine side.

The service side (:class:`MetricsPublisher`) binds a PULL socket in a daemon thread and
applies every message to :class:`EngineMetrics` (and optionally to
:class:`ComponentMetrics` for Dynamo's KV gauges).
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading

import zmq
from tandem.metrics.engine import EngineMetrics
from tandem.metrics.runtime import ComponentMetrics
from tandem.metrics.stats import SchedulerStats

log = logging.getLogger(__name__)

_IPC_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes on Linux, leave a margin


def validate_endpoint(endpoint: str) -> str:
    """Accept ``ipc://<path>`` or ``tcp://<host>:<port>``; raise ValueError otherwise."""
    if not isinstance(endpoint, str):
        raise ValueError(f"stats endpoint must be a string, got {type(endpoint).__name__}")
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not path:
            raise ValueError(f"stats endpoint {endpoint!r}: empty ipc path")
        if len(path.encode()) > _IPC_PATH_MAX:
            raise ValueError(f"stats endpoint {endpoint!r}: ipc path longer than {_IPC_PATH_MAX} bytes")
        return endpoint
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"stats endpoint {endpoint!r}: expected tcp://host:port with port 1..65535")
        return endpoint
    raise ValueError(f"stats endpoint {endpoint!r}: must start with ipc:// or tcp://")


def default_stats_endpoint(worker_id: str) -> str:
    """An ipc endpoint in the temp directory, unique per worker id."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(worker_id))
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'tandem-stats-{safe}.sock')}"


class StatsSender:
    """Engine-side sender. Not thread-safe: call it from the scheduler thread only."""

    def __init__(self, endpoint: str, *, hwm: int = 64):
        self.endpoint = validate_endpoint(endpoint)
        if hwm < 1:
            raise ValueError(f"hwm must be >= 1, got {hwm}")
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing while no publisher is connected
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self._sock.connect(self.endpoint)
        self.sent = 0
        self.dropped = 0
        self._closed = False

    def send(self, stats: SchedulerStats) -> bool:
        """Send without blocking. Returns False (and counts a drop) if it could not be queued."""
        if self._closed:
            self.dropped += 1
            return False
        try:
            self._sock.send(stats.to_bytes(), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        except zmq.ZMQError as e:  # e.g. context terminated: never propagate into the scheduler
            log.debug("stats send failed: %s", e)
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)
            self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MetricsPublisher:
    """Service-side receiver: a daemon thread that applies stats messages to the metrics."""

    def __init__(self, endpoint: str, engine_metrics: EngineMetrics, *,
                 component_metrics: ComponentMetrics | None = None, rcvhwm: int = 1000,
                 poll_interval_s: float = 0.1):
        self.endpoint = validate_endpoint(endpoint)
        self.engine_metrics = engine_metrics
        self.component_metrics = component_metrics
        self.rcvhwm = rcvhwm
        self.poll_ms = max(1, int(poll_interval_s * 1000))
        self.received = 0
        self.bad_messages = 0
        self.last_stats: SchedulerStats | None = None
        self._ctx: zmq.Context | None = None
        self._sock = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> MetricsPublisher:
        """Bind (errors such as an address in use surface here) and start the thread."""
        if self._thread is not None:
            raise RuntimeError("MetricsPublisher already started")
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            self._ctx.term()
            raise RuntimeError(f"MetricsPublisher cannot bind {self.endpoint}: {e}") from e
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tandem-metrics-publisher", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        sock = self._sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(self.poll_ms):
                    continue
                while True:  # drain everything that is ready
                    try:
                        data = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(data)
        finally:
            sock.close(linger=0)

    def _handle(self, data: bytes) -> None:
        try:
            stats = SchedulerStats.from_bytes(data)
            self.engine_metrics.apply(stats)
            if self.component_metrics is not None:
                self.component_metrics.apply_engine_stats(stats)
        except Exception as e:  # a bad message must not kill the thread
            self.bad_messages += 1
            log.warning("dropping bad stats message: %s", e)
            return
        self.last_stats = stats
        self.received += 1

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, close the socket (removing the ipc file) and the context."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("metrics publisher thread did not stop within %.1fs", timeout)
        self._thread = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self.endpoint.startswith("ipc://"):  # libzmq leaves the socket file behind
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except FileNotFoundError:
                pass

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
