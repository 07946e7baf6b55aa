"""Serve a RouterApp's gRPC Router service on a loopback port for a test: a ``grpc.aio`` server
on the app's own loop (where its servicer's coroutines must run), as the router process does."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import grpc.aio
from tandem.v1 import router_pb2_grpc


@contextlib.contextmanager
def router_stub(app):
    """Yields a RouterStub connected to ``app``'s Router service (``app`` started); stops the
    server afterwards."""
    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterServicer_to_server(app.servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(serve(), app.loop).result(10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield router_pb2_grpc.RouterStub(ch)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), app.loop).result(10)
