"""Service runtime shared by every tandem process.

One gRPC server (health checking + reflection always on), one system HTTP port,
readiness, and graceful shutdown on SIGTERM/SIGINT. Services add their servicers,
call `start()`, do their warmup, call `set_ready()`, then `wait()`.

The gRPC server is synchronous (a thread pool) by default. With ``aio=True`` it is a
``grpc.aio`` server on the runtime's own asyncio loop (``runtime.loop``, a thread started
with the runtime): servicers are coroutines and run on that loop, with no thread hop per
message; a service whose own work lives on an asyncio loop (the router) runs it on
``runtime.loop`` too. The runtime stops that loop last, after its shutdown hooks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from functools import partial

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry
from tandem.config import ServerConfig
from tandem.server.auth import AdminInterceptor, AioAdminInterceptor, BearerCheck, read_secret
from tandem.server.system_http import SystemHttpServer
from tandem.server.tls import TlsReloader, tls_files

log = logging.getLogger(__name__)

# KV pages travel as bytes on the grpc transfer backend: allow large messages.
GRPC_MESSAGE_LIMIT = 512 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
    ("grpc.so_reuseport", 0),
]


# gRPC services that need the admin token (when one is set): profiling and the expert recorder.
ADMIN_SERVICES = ("tandem.v1.EngineControl",)


def service_name(pb2_module, service: str) -> str:
    """Full proto name of a service, e.g. service_name(decode_pb2, "Decode") -> "tandem.v1.Decode"."""
    return pb2_module.DESCRIPTOR.services_by_name[service].full_name


class ServiceRuntime:
    def __init__(
        self,
        name: str,
        config: ServerConfig,
        registry: CollectorRegistry | None = None,
        max_workers: int = 128,
        max_receive_message_bytes: int = GRPC_MESSAGE_LIMIT,
        aio: bool = False,
    ) -> None:
        self.name = name
        self.config = config
        self.registry = registry or REGISTRY
        options = [o for o in GRPC_OPTIONS if o[0] != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", max_receive_message_bytes))
        admin_token = read_secret(config, "admin_token")
        admin = BearerCheck(admin_token, "admin call") if admin_token else None
        self.tls = tls_files(config)
        self.tls_reloader = TlsReloader(self.tls) if self.tls else None
        credentials = self.tls_reloader.server_credentials() if self.tls_reloader else None
        bind = f"{config.host}:{config.port}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        if aio:
            self.loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=self._run_loop, name=f"{name}-aio", daemon=True)
            self._loop_thread.start()
            self.health = health.aio.HealthServicer()
            self.server, self.port = self._on_loop(self._aio_server(options, admin, self.health, bind, credentials))
        else:
            interceptors = [AdminInterceptor(admin, ADMIN_SERVICES)] if admin else []
            self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                                      interceptors=interceptors)
            self.health = health.HealthServicer(experimental_non_blocking=True)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            self.port = (self.server.add_secure_port(bind, credentials) if credentials
                         else self.server.add_insecure_port(bind))
        self._service_names: list[str] = []
        if self.port == 0:
            raise RuntimeError(f"{name}: cannot bind gRPC port {config.host}:{config.port}")
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._shutdown_hooks: list[Callable[[], None]] = []
        self.system = SystemHttpServer(config.host, config.system_port, self.registry, self._ready.is_set,
                                       tls=self.tls, admin_token=admin_token)
        if self.tls_reloader:
            self.tls_reloader.on_reload(self.system.reload_tls)
        self.started_at = time.time()

    # ---- the aio server's loop (aio=True) -------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def _on_loop(self, coro, timeout: float | None = 30.0):
        """Run ``coro`` on the runtime's loop from this (another) thread; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @staticmethod
    async def _aio_server(options, admin: BearerCheck | None, health_servicer, bind: str, credentials):
        interceptors = [AioAdminInterceptor(admin, ADMIN_SERVICES)] if admin else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
        return server, port

    def _set_health(self, status) -> None:
        for svc in ["", *self._service_names]:
            if self.loop is not None:
                self._on_loop(self.health.set(svc, status))
            else:
                self.health.set(svc, status)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def advertised_address(self) -> str:
        """host:port other processes reach the gRPC server at (--advertise-host, else --host)."""
        return f"{self.config.advertise_host or self.config.host}:{self.port}"

    @property
    def worker_id(self) -> str:
        return self.config.worker_id or self.advertised_address

    @property
    def system_address(self) -> str:
        return f"{self.config.host}:{self.system.port}"

    @property
    def advertised_system_address(self) -> str:
        return f"{self.config.advertise_host or self.config.host}:{self.system.port}"

    def add_service(self, add_to_server: Callable, servicer, full_name: str) -> None:
        """Register a servicer, e.g. add_service(decode_pb2_grpc.add_DecodeServicer_to_server, s, name)."""
        add_to_server(servicer, self.server)
        self._service_names.append(full_name)

    def on_shutdown(self, hook: Callable[[], None], first: bool = False) -> None:
        """Hooks run in registration order (`first` puts one in front) after health turns
        NOT_SERVING, before the server stops."""
        if first:
            self._shutdown_hooks.insert(0, hook)
        else:
            self._shutdown_hooks.append(hook)

    def start(self) -> None:
        names = [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(names, self.server)
        if self.loop is not None:
            self._on_loop(self.server.start())
        else:
            self.server.start()
        self.system.start()
        log.info("%s listening: grpc=%s%s system=%s://%s", self.name, self.address, " (TLS)" if self.tls else "",
                 "https" if self.tls else "http", self.system_address)

    def set_ready(self, **extra) -> None:
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._ready.set()
        if self.config.ready_file:
            tmp = f"{self.config.ready_file}.tmp"
            with open(tmp, "w") as f:
                json.dump({"name": self.name, "grpc": self.address, "system": self.system_address,
                           "pid": os.getpid(), **extra}, f)
            os.replace(tmp, self.config.ready_file)
        log.info("%s ready (SERVING) after %.2fs", self.name, time.time() - self.started_at)

    def set_not_serving(self) -> None:
        """Health NOT_SERVING while the process goes on (a drained worker): routers take it out of
        rotation."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def install_signal_handlers(self) -> None:
        def handle(signum, _frame):
            log.info("%s received %s, shutting down", self.name, signal.Signals(signum).name)
            self._stopping.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        if self.tls_reloader:
            reloader = self.tls_reloader
            signal.signal(signal.SIGHUP, lambda _signum, _frame: threading.Thread(
                target=reloader.reload, name="tls-reload", daemon=True).start())

    def request_stop(self) -> None:
        self._stopping.set()

    def wait(self) -> None:
        """Block until SIGTERM/SIGINT (or request_stop), then shut down gracefully."""
        self.install_signal_handlers()
        while not self._stopping.wait(0.2):
            pass
        self.shutdown()

    def shutdown(self) -> None:
        if self._stopped.is_set():
            return
        self._stopping.set()
        self._ready.clear()
        # Leave headroom inside the grace period for hooks and process exit.
        grace = max(0.1, self.config.shutdown_grace_period - 1.0)
        if self.loop is not None:
            self._on_loop(self.health.enter_graceful_shutdown())
            stopped = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop)
            wait_stopped = lambda: futures.wait([stopped], grace + 0.5)  # noqa: E731
        else:
            self.health.enter_graceful_shutdown()
            wait_stopped = partial(self.server.stop(grace).wait, grace + 0.5)
        for hook in self._shutdown_hooks:
            try:
                hook()
            except Exception:
                log.exception("%s shutdown hook failed", self.name)
        wait_stopped()
        self.system.stop()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._loop_thread.join(5)
        self._stopped.set()
        log.info("%s stopped", self.name)
