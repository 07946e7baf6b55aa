"""The router's view of its workers: gRPC channels, health checks, load polling and the
KV-event subscription that feeds the KV index (tandem.routing.kv_events).

Everything here runs on the router's asyncio loop. A worker is taken out of rotation when a
health check is refused or answers NOT_SERVING, after --health-check-failures checks in a row
time out (timeout <= health_check_interval), or when a request to it fails with UNAVAILABLE
(which health-checks it at once), and comes back on the first SERVING answer. Each change is
kept in the worker's `health_events` (up/down, with the consecutive failures that led to it).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tandem.routing.kv_events import follow_kv_events
from tandem.routing.kv_index import KvIndex
from tandem.routing.policies import WorkerView
from tandem.server.channels import open_channel
from tandem.server.tls import TlsFiles
from tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Reconnect quickly to a worker that comes back (the default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
]


class Worker:
    """``info_known``: whether ``info`` says what the worker is (etcd registrations do); a
    worker given by address alone (static discovery) is asked (Decode.GetInfo) before its
    first request, so generation and embedding requests each reach their kind of worker."""

    def __init__(self, info: common_pb2.WorkerInfo, tls: TlsFiles | None = None, info_known: bool = True) -> None:
        self.info = common_pb2.WorkerInfo()
        self.info.CopyFrom(info)
        self.info_known = info_known
        self.worker_id = info.worker_id or info.address
        self.address = info.address
        # With mTLS, a worker whose certificate does not chain to the CA never passes a health
        # check (its handshake fails), so it never gets a request.
        self.channel = open_channel(info.address, tls, CHANNEL_OPTIONS, aio=True)
        self.decode = decode_pb2_grpc.DecodeStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.healthy = False
        self.missed_checks = 0  # consecutive health checks that timed out
        self.checks = 0  # health checks answered or failed, since added
        self.failed_checks = 0  # of those, failed (refused, TLS handshake, NOT_SERVING, timeout)
        self.consecutive_failures = 0
        self.health_events: list[tuple[str, int]] = []  # ("up" | "down", consecutive failed checks then)
        self.load: common_pb2.WorkerLoad | None = None
        self.active_requests = 0
        self.active_blocks = 0
        self.tasks: list[asyncio.Task] = []

    @property
    def is_embedding(self) -> bool:
        return self.info.is_embedding

    def view(self) -> WorkerView:
        ld = self.load
        return WorkerView(
            self.worker_id, self.active_requests, self.active_blocks,
            ld.num_waiting_reqs if ld else 0, ld.num_running_reqs if ld else 0,
            ld.free_pages if ld else 0, ld.total_pages if ld else 0,
        )

    def to_proto(self) -> common_pb2.WorkerInfo:
        out = common_pb2.WorkerInfo()
        out.CopyFrom(self.info)
        out.worker_id = self.worker_id
        out.healthy = self.healthy
        if self.load is not None:
            out.load.CopyFrom(self.load)
        return out

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        await self.channel.close(grace=None)


class WorkerPool:
    def __init__(self, health_interval: float, index: KvIndex | None = None,
                 on_health: Callable[[Worker, bool], None] | None = None, tls: TlsFiles | None = None,
                 max_missed_checks: int = 2, ask_info: bool = False) -> None:
        """``ask_info``: workers come with an address only (static discovery): ask each what it is."""
        self.tls = tls
        self.ask_info = ask_info
        self.max_missed_checks = max_missed_checks
        self.health_interval = health_interval
        self.check_timeout = min(1.0, max(0.2, health_interval))
        self.index = index
        self.on_health = on_health
        self.workers: dict[str, Worker] = {}
        self.changed = asyncio.Event()  # set whenever a worker turns healthy

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.healthy]

    async def set_workers(self, infos: dict[str, common_pb2.WorkerInfo]) -> None:
        """Make the pool exactly `infos` (by worker id): add new ones, drop gone ones,
        replace ones whose address changed."""
        for wid in list(self.workers):
            if wid not in infos or infos[wid].address != self.workers[wid].address:
                await self.remove(wid)
        for wid, info in infos.items():
            if wid not in self.workers:
                self.add(info)

    def add(self, info: common_pb2.WorkerInfo) -> Worker:
        w = Worker(info, self.tls, info_known=not self.ask_info)
        if w.worker_id in self.workers:
            raise ValueError(f"worker {w.worker_id} already known")
        self.workers[w.worker_id] = w
        w.tasks.append(asyncio.create_task(self._health_loop(w), name=f"health {w.worker_id}"))
        if self.index is not None:
            w.tasks.append(asyncio.create_task(self._kv_events_loop(w), name=f"kv-events {w.worker_id}"))
        log.info("worker added: %s at %s", w.worker_id, w.address)
        return w

    async def remove(self, worker_id: str) -> None:
        w = self.workers.pop(worker_id, None)
        if w is None:
            return
        w.healthy = False
        if self.on_health:
            self.on_health(w, False)
        if self.index is not None:
            self.index.remove_worker(worker_id)
        await w.close()
        log.info("worker removed: %s", worker_id)

    async def close(self) -> None:
        for wid in list(self.workers):
            await self.remove(wid)

    def _set_health(self, w: Worker, ok: bool, reason: str = "") -> None:
        if w.healthy == ok:
            return
        w.healthy = ok
        w.health_events.append(("up" if ok else "down", w.consecutive_failures))
        if ok:
            log.info("worker %s healthy", w.worker_id)
            self.changed.set()
        else:
            log.warning("worker %s unhealthy: %s", w.worker_id, reason)
        if self.on_health:
            self.on_health(w, ok)

    async def check(self, w: Worker) -> bool:
        try:
            resp = await w.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.check_timeout)
            ok, reason = resp.status == health_pb2.HealthCheckResponse.SERVING, "not SERVING"
        except grpc.aio.AioRpcError as e:
            ok, reason = False, f"{e.code().name}: {e.details()}"
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and w.healthy:
                # A busy worker may miss a deadline: take it out after --health-check-failures
                # misses in a row. A refused connection or NOT_SERVING takes it out at once.
                w.missed_checks += 1
                if w.missed_checks < self.max_missed_checks:
                    w.checks += 1
                    w.failed_checks += 1
                    w.consecutive_failures += 1
                    return True
        w.checks += 1
        w.failed_checks += not ok
        w.consecutive_failures = 0 if ok else w.consecutive_failures + 1
        if ok or not reason.startswith("DEADLINE_EXCEEDED"):
            w.missed_checks = 0
        if ok and not w.info_known:
            ok, reason = await self._learn_info(w)
        if ok:
            try:
                w.load = await w.decode.GetLoad(common_pb2.GetLoadRequest(), timeout=self.check_timeout)
            except grpc.aio.AioRpcError as e:
                log.debug("GetLoad of %s failed: %s", w.worker_id, e.code().name)
        self._set_health(w, ok, reason)
        return ok

    async def _learn_info(self, w: Worker) -> tuple[bool, str]:
        """Ask a worker what it is (GetInfo): its kind (embedding or generation), role and model.
        A worker without GetInfo (older than it) generates."""
        try:
            info = await w.decode.GetInfo(decode_pb2.GetInfoRequest(), timeout=self.check_timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                return False, f"GetInfo: {e.code().name}: {e.details()}"
        else:
            w.info.is_embedding = info.is_embedding
            w.info.role = info.role or w.info.role
            w.info.model = info.model or w.info.model
            w.info.system_address = info.system_address or w.info.system_address
        w.info_known = True
        log.info("worker %s: %s%s", w.worker_id, "embeddings" if w.is_embedding else "generation",
                 f" of {w.info.model}" if w.info.model else "")
        return True, ""

    async def _health_loop(self, w: Worker) -> None:
        while True:
            await self.check(w)
            await asyncio.sleep(self.health_interval)

    async def _kv_events_loop(self, w: Worker) -> None:
        await follow_kv_events(w.decode.KvEvents, self.index, w.worker_id, ready=lambda: w.healthy,
                               idle_wait_s=self.health_interval / 2)
