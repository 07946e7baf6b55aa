"""Servicers for RPCs that have no implementation yet: UNIMPLEMENTED with a clear message."""
from __future__ import annotations

import grpc


def unimplemented_servicer(base: type, full_service_name: str, reason: str):
    """Subclass `base` (a generated *Servicer) so every RPC aborts UNIMPLEMENTED naming itself."""

    def make(method_name: str):
        def method(self, request, context: grpc.ServicerContext):
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{full_service_name}/{method_name} is not implemented in this build: {reason}",
            )

        method.__name__ = method_name
        return method

    methods = {
        name: make(name)
        for name in dir(base)
        if not name.startswith("_") and callable(getattr(base, name))
    }
    return type(f"Unimplemented{base.__name__}", (base,), methods)()
