"""Failures a worker turns into a gRPC status."""
from __future__ import annotations

import grpc


class RequestFailed(Exception):
    """End the RPC with this gRPC status and message."""

    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class ClientGone(Exception):
    """The caller cancelled; nothing more to send."""
