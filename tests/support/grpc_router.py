"""Serve a RouterApp's gRPC Router service on a loopback port for a test."""
from __future__ import annotations

import contextlib
from concurrent import futures

import grpc
from tandem.v1 import router_pb2_grpc


@contextlib.contextmanager
def router_stub(app):
    """Yields a RouterStub connected to ``app``'s Router service; stops the server afterwards."""
    server = grpc.server(futures.ThreadPoolExecutor(8))
    router_pb2_grpc.add_RouterServicer_to_server(app.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield router_pb2_grpc.RouterStub(ch)
    finally:
        server.stop(0)
