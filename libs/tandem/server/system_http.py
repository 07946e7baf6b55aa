"""The system HTTP port of every service: /health, /metrics and extra JSON routes.

A plain threaded HTTP server keeps it independent of the gRPC server and of any
asyncio loop, so metrics stay readable even when the service is busy.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

# A route handler takes the parsed JSON body (or {} for GET) and returns (status, json-able body).
RouteHandler = Callable[[dict], tuple[int, Any]]


class _QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A scraper that gave up mid-response is not an error worth a traceback.
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            log.debug("system-http client %s went away", client_address)
            return
        super().handle_error(request, client_address)


class SystemHttpServer:
    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        is_healthy: Callable[[], bool],
    ) -> None:
        self._registry = registry
        self._is_healthy = is_healthy
        self._routes: dict[tuple[str, str], RouteHandler] = {}
        self._httpd = _QuietHTTPServer((host, port), self._make_handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="system-http", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def add_route(self, method: str, path: str, handler: RouteHandler) -> None:
        self._routes[(method.upper(), path)] = handler

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _make_handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # route access logs to debug, not stderr
                log.debug("system-http " + fmt, *args)

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, obj: Any) -> None:
                self._send(status, json.dumps(obj).encode(), "application/json")

            def _dispatch(self, method: str) -> None:
                path = self.path.split("?", 1)[0]
                if method == "GET" and path == "/metrics":
                    return self._send(200, generate_latest(server._registry), CONTENT_TYPE_LATEST)
                if method == "GET" and path == "/health":
                    ok = server._is_healthy()
                    return self._json(200 if ok else 503, {"status": "ok" if ok else "starting"})
                handler = server._routes.get((method, path))
                if handler is None:
                    return self._json(404, {"error": f"no route {method} {path}"})
                body: dict = {}
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    try:
                        body = json.loads(self.rfile.read(length) or b"{}")
                    except json.JSONDecodeError as exc:
                        return self._json(400, {"error": f"body is not valid JSON: {exc}"})
                    if not isinstance(body, dict):
                        return self._json(400, {"error": "body must be a JSON object"})
                try:
                    status, result = handler(body)
                except ValueError as exc:
                    status, result = 400, {"error": str(exc)}
                except Exception as exc:  # a failing control route must not kill the port
                    log.exception("system route %s %s failed", method, path)
                    status, result = 500, {"error": f"{type(exc).__name__}: {exc}"}
                self._json(status, result)

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

        return Handler
