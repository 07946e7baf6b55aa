"""RouterApp: the router's pieces wired together, for `python -m tandem.router` and tests.

    runtime = ServiceRuntime("router", config, aio=True)
    app = build_router(config, registry=runtime.registry)
    runtime.add_service(router_pb2_grpc.add_RouterServicer_to_server, app.servicer, name)
    app.start(runtime.loop)  # on the runtime's loop: discovery, health checks, OpenAI HTTP on config.http_port
    ...
    app.stop()

Everything of the router runs on one asyncio loop: the OpenAI HTTP server (uvicorn), every
worker gRPC call, and the gRPC Router servicer (coroutines, served by the runtime's
``grpc.aio`` server on the same loop). ``start()`` without a loop runs one in a thread of the
app's own (tests that serve the servicer themselves use ``app.loop``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading

import uvicorn
from prometheus_client import CollectorRegistry
from tandem.config import RouterConfig
from tandem.router.core import RouterCore
from tandem.router.grpc_api import RouterServicer
from tandem.router.http_api import build_http_app
from tandem.router.metrics import RouterMetrics
from tandem.router.stall import stall_guarded
from tandem.routing.grammar_check import warm as warm_grammar_check
from tandem.routing.tokenizer import RouterTokenizer
from tandem.server.tls import TlsReloader, reload_ssl_context, uvicorn_ssl_options
from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger(__name__)


class RouterApp:
    def __init__(self, config: RouterConfig, registry: CollectorRegistry | None = None) -> None:
        if not config.model_path:
            raise ValueError("model_path is required: the router tokenizes prompts with the model's tokenizer")
        if config.discovery == "static" and not config.workers:
            log.warning("static discovery with no workers: every request will get 503 until workers are configured")
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tokenizer = RouterTokenizer(config.model_path)
        self.model_name = config.served_model_name or os.path.basename(os.path.normpath(config.model_path))
        self.metrics = RouterMetrics(self.registry, self.model_name)
        self.core = RouterCore(config, self.tokenizer, self.metrics, self.model_name)
        self.servicer = RouterServicer(self.core)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None  # the app's own loop thread (start() without a loop)
        self._main: concurrent.futures.Future | None = None
        self._server: uvicorn.Server | None = None
        self._sock: socket.socket | None = None
        self.http_port: int | None = None

    def reload_tls_on(self, reloader: TlsReloader) -> None:
        """The OpenAI port's certificate follows the process's reloads (SIGHUP)."""
        def reload() -> None:
            if self._server is not None and self._server.config.ssl is not None:
                reload_ssl_context(self._server.config.ssl, reloader.tls)
        reloader.on_reload(reload)

    @property
    def http_address(self) -> str:
        return f"{self.config.host}:{self.http_port}"

    def start(self, loop: asyncio.AbstractEventLoop | None = None, timeout: float = 30.0) -> None:
        """Start discovery, health checks and the HTTP server on ``loop`` (running in another
        thread: the process runtime's), else on a loop in a thread of the app's own. Returns
        once the HTTP port is bound and serving."""
        if self._main is not None:
            raise RuntimeError("router already started")
        # The grammar checker (xgrammar, which loads torch) is imported here, off the event loop,
        # so the first structured-output request does not stall every other one.
        threading.Thread(target=warm_grammar_check, name="grammar-import", daemon=True).start()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted connections: without it, a keep-alive response written in two
        # parts (headers, body) waits for the client's delayed ACK (~40 ms on Linux).
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.bind((self.config.host, self.config.http_port))
        self.http_port = self._sock.getsockname()[1]
        started = threading.Event()
        errors: list[BaseException] = []
        uv_config = uvicorn.Config(build_http_app(self.core, self.registry), log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=2, lifespan="off", http=self._http_protocol(),
                                   **uvicorn_ssl_options(self.core.tls))
        self._server = uvicorn.Server(uv_config)

        async def main() -> None:
            try:
                await self.core.start()
                serve = asyncio.create_task(self._server.serve(sockets=[self._sock]))
                while not self._server.started and not serve.done():
                    await asyncio.sleep(0.01)
                started.set()
                await serve
            except BaseException as e:  # surface start failures to start()
                errors.append(e)
                started.set()
                raise
            finally:
                await self.core.stop()

        if loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=run_loop, args=(loop,), name="router-loop", daemon=True)
            self._thread.start()
        self.loop = loop
        self._main = asyncio.run_coroutine_threadsafe(main(), loop)
        self._main.add_done_callback(log_loop_error)
        if not started.wait(timeout):
            raise TimeoutError(f"router HTTP server not started after {timeout}s")
        if errors:
            self.stop()
            raise RuntimeError(f"router failed to start: {errors[0]}") from errors[0]
        log.info("router HTTP (OpenAI API) on http://%s, policy %s", self.http_address, self.config.routing_policy)

    def _http_protocol(self) -> type[asyncio.Protocol]:
        """uvicorn's HTTP protocol, its connections dropped when their client stalls."""
        timeout = self.config.stream_stall_timeout
        return stall_guarded(AutoHTTPProtocol, timeout, self.metrics.stall_events("http", timeout))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the HTTP server and close worker channels (and the app's own loop thread)."""
        if self._main is None:
            return
        if self._server is not None:
            self._server.should_exit = True
        concurrent.futures.wait([self._main], timeout)
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
        self._main = None


def run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


def log_loop_error(main: concurrent.futures.Future) -> None:
    if not main.cancelled() and main.exception() is not None:
        log.error("router loop ended with an error", exc_info=main.exception())


def build_router(config: RouterConfig, registry: CollectorRegistry | None = None) -> RouterApp:
    """Construct the router (tokenizer, policy, worker pool, HTTP app, gRPC servicer); nothing runs
    until `start()`."""
    return RouterApp(config, registry)
