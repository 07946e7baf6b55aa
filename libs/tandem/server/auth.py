"""Bearer-token checks shared by the HTTP ports and gRPC: the router's API key, the system
ports' admin token. A refused peer is logged once (per peer address), never per request."""
from __future__ import annotations

import hmac
import logging
import threading

import grpc
import grpc.aio

log = logging.getLogger(__name__)


def read_secret(config, name: str) -> str | None:
    """`config.<name>`, or the first line of the file named by `config.<name>_file`."""
    value = getattr(config, name, None)
    path = getattr(config, f"{name}_file", None)
    if value or not path:
        return value or None
    with open(path, encoding="utf-8") as f:
        token = f.readline().strip()
    if not token:
        raise ValueError(f"{name}_file={path!r}: the file is empty")
    return token


class BearerCheck:
    """Compares `authorization: Bearer <token>` in constant time; `expected` None = open."""

    def __init__(self, expected: str | None, what: str) -> None:
        self.expected = expected
        self.what = what
        self._refused_peers: set[str] = set()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.expected is not None

    def allows(self, authorization: str | None, peer: str) -> bool:
        if self.expected is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.expected.encode()):
            return True
        with self._lock:
            first = peer not in self._refused_peers
            if first and len(self._refused_peers) < 10_000:
                self._refused_peers.add(peer)
        if first:
            log.warning("refused %s from %s: %s", self.what, peer,
                        "no bearer token" if not authorization else "wrong bearer token")
        return False


ADMIN_DENIED = "admin call: missing or wrong bearer token (--admin-token)"


class AdminRule:
    """Calls to ``services`` need `authorization: Bearer <admin token>` metadata."""

    def __init__(self, check: BearerCheck, services: tuple[str, ...]) -> None:
        self._check = check
        self._prefixes = tuple(f"/{s}/" for s in services)

    def refuses(self, details) -> bool:
        """True for a call (its ``HandlerCallDetails``) to an admin service without the token."""
        return details.method.startswith(self._prefixes) and not self._check.allows(
            dict(details.invocation_metadata).get("authorization"), "gRPC admin client")


class AdminInterceptor(grpc.ServerInterceptor):
    """gRPC server interceptor: calls to the admin services (EngineControl: profiling, expert
    recorder) need `authorization: Bearer <admin token>` metadata, else UNAUTHENTICATED."""

    def __init__(self, check: BearerCheck, services: tuple[str, ...]) -> None:
        self._rule = AdminRule(check, services)

        def deny(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, ADMIN_DENIED)

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        return self._deny if self._rule.refuses(details) else continuation(details)


class AioAdminInterceptor(grpc.aio.ServerInterceptor):
    """:class:`AdminInterceptor` for a ``grpc.aio`` server (the same rule, the same answer)."""

    def __init__(self, check: BearerCheck, services: tuple[str, ...]) -> None:
        self._rule = AdminRule(check, services)

        async def deny(_request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, ADMIN_DENIED)

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        return self._deny if self._rule.refuses(details) else await continuation(details)
