"""gRPC channels to other tandem processes: plaintext, or TLS / mTLS with this process's
certificate when --ssl-certfile is set (tandem.server.tls)."""
from __future__ import annotations

import grpc
from tandem.server.runtime import GRPC_OPTIONS
from tandem.server.tls import TlsFiles, channel_credentials


def open_channel(address: str, tls: TlsFiles | None, options=GRPC_OPTIONS, aio: bool = False):
    """A grpc (or grpc.aio with `aio`) channel to `address`, secure when `tls` is given."""
    api = grpc.aio if aio else grpc
    if tls is None:
        return api.insecure_channel(address, options=options)
    return api.secure_channel(address, channel_credentials(tls), options=options)
