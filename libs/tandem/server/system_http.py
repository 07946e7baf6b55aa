"""The system HTTP port of every service: /health, /metrics and extra JSON routes.

Served with the router's HTTP stack (FastAPI on uvicorn), on its own thread and asyncio
loop, independent of the gRPC server, so metrics stay readable when the service is busy.
Routes are plain functions ``handler(body: dict) -> (status, json-able body)``; they run in
a worker thread (a handler may block, e.g. until a profile is written). Routes added with
`add_route` are admin routes: with an admin token they need `authorization: Bearer <token>`
(401 otherwise); /health and /metrics stay open. With TLS files the port serves HTTPS
(client certificates required when a CA is given).
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from tandem.server.auth import BearerCheck
from tandem.server.tls import TlsFiles, reload_ssl_context, uvicorn_ssl_options

log = logging.getLogger(__name__)

# A route handler takes the parsed JSON body (or {} for GET) and returns (status, json-able body).
RouteHandler = Callable[[dict], tuple[int, Any]]


class SystemHttpServer:
    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        is_healthy: Callable[[], bool],
        tls: TlsFiles | None = None,
        admin_token: str | None = None,
    ) -> None:
        self._registry = registry
        self._is_healthy = is_healthy
        self._tls = tls
        self._admin = BearerCheck(admin_token, "admin route")
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))  # bound now: the port is known before start()
        self._sock.listen(128)  # and connections queue until the server accepts them
        self.app = self._build_app()
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                     lifespan="off", timeout_graceful_shutdown=1,
                                                     **uvicorn_ssl_options(tls)))
        self._thread = threading.Thread(target=self._serve, name="system-http", daemon=True)

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    @property
    def scheme(self) -> str:
        return "https" if self._tls else "http"

    def reload_tls(self) -> None:
        """Load the current certificate files into the serving SSL context (SIGHUP)."""
        if self._tls is not None and self._server.config.ssl is not None:
            reload_ssl_context(self._server.config.ssl, self._tls)

    def add_route(self, method: str, path: str, handler: RouteHandler) -> None:
        async def endpoint(request: Request) -> JSONResponse:
            peer = request.client.host if request.client else "?"
            if not self._admin.allows(request.headers.get("authorization"), peer):
                return JSONResponse({"error": "admin route: missing or wrong bearer token (--admin-token)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            body: dict = {}
            raw = await request.body()
            if raw:
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError as exc:
                    return JSONResponse({"error": f"body is not valid JSON: {exc}"}, status_code=400)
                if not isinstance(body, dict):
                    return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
            try:
                status, result = await run_in_threadpool(handler, body)
            except ValueError as exc:
                status, result = 400, {"error": str(exc)}
            except Exception as exc:  # a failing control route must not kill the port
                log.exception("system route %s %s failed", method, path)
                status, result = 500, {"error": f"{type(exc).__name__}: {exc}"}
            return JSONResponse(result, status_code=status)

        self.app.add_api_route(path, endpoint, methods=[method.upper()])

    def start(self, timeout: float = 10.0) -> None:
        """Serve from a thread; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not self._server.started:
            raise RuntimeError(f"system HTTP server on port {self.port} did not start")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def _build_app(self) -> FastAPI:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(HTTPException)
        async def _http_error(request: Request, exc: HTTPException):
            if exc.status_code in (404, 405):
                return JSONResponse({"error": f"no route {request.method} {request.url.path}"}, status_code=404)
            return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/health")
        async def health() -> JSONResponse:
            ok = self._is_healthy()
            return JSONResponse({"status": "ok" if ok else "starting"}, status_code=200 if ok else 503)

        return app
