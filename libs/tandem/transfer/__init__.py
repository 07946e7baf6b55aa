"""KV transfer between prefill and decode workers (``--disaggregation-transfer-backend``).

Usage (decode)::

    rx = make_receiver("nixl", KvBuffers(k_layers, v_layers, aux), name="decode-0")
    reg = rx.registration()            # -> RegisterDecode (reg.to_request(decode_id))
    rx.expect(room, page_indices, aux_slot)
    while rx.poll(room) not in (KVPoll.Success, KVPoll.Failed): ...
    row = rx.aux_row(room); rx.forget(room)

Usage (prefill)::

    tx = make_sender("nixl", KvBuffers(...), name="prefill-0")
    peer = tx.add_peer(Registration.from_request(register_decode_request))
    h = [tx.send_kv(room, peer, my_pages, decode_pages, chunk_index=0, is_last=True),
         tx.send_aux(room, peer, aux_slot, AuxRow(room, first_token_id, logprob))]
    status = tx.check(h)   # or tx.wait(h, timeout_s); then tx.release(h)

The library never imports the engine; the engine's pool is described by :class:`KvBuffers`.
"""

from .base import (
    KVPoll,
    KvReceiver,
    KvSender,
    Registration,
    TransferError,
    TransferHandle,
    XferState,
    XferStatus,
    new_room_id,
)
from .grpc_backend import GrpcKvReceiver, GrpcKvSender, aux_row_from_done, done_from_aux_row
from .layout import (
    AUX_MIN_SLOT_BYTES,
    AuxRow,
    KvBuffers,
    LayoutMismatchError,
    aux_max_top,
    build_layout,
    check_compatible,
    merge_page_runs,
    pack_aux_row,
    pages_needed,
    unpack_aux_row,
    validate_pages,
)

BACKENDS = ("nixl", "grpc")


def available_backends() -> dict[str, str]:
    """Backend name -> "" when usable here, else why not (e.g. nixl not installed)."""
    from . import nixl_backend

    return {
        "nixl": nixl_backend.NIXL_IMPORT_ERROR and (
            f"nixl package not importable: {nixl_backend.NIXL_IMPORT_ERROR}"
        ),
        "grpc": "",
    }


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown transfer backend {backend!r}; allowed: {', '.join(BACKENDS)}")


def make_sender(backend: str, buffers: KvBuffers, name: str, model_fingerprint: str = "",
                **kwargs) -> KvSender:
    """Prefill-side sender for ``backend`` ("nixl" or "grpc")."""
    _check_backend(backend)
    if backend == "nixl":
        from .nixl_backend import NixlKvSender

        return NixlKvSender(buffers, name, model_fingerprint, **kwargs)
    return GrpcKvSender(buffers, name, model_fingerprint, **kwargs)


def make_receiver(backend: str, buffers: KvBuffers, name: str, model_fingerprint: str = "",
                  **kwargs) -> KvReceiver:
    """Decode-side receiver for ``backend``; kwargs: bootstrap_timeout_s,
    transfer_timeout_s (and nixl_backends for nixl)."""
    _check_backend(backend)
    if backend == "nixl":
        from .nixl_backend import NixlKvReceiver

        return NixlKvReceiver(buffers, name, model_fingerprint, **kwargs)
    return GrpcKvReceiver(buffers, name, model_fingerprint, **kwargs)


__all__ = [
    "AUX_MIN_SLOT_BYTES", "AuxRow", "BACKENDS", "GrpcKvReceiver", "GrpcKvSender", "KVPoll",
    "KvBuffers", "KvReceiver", "KvSender", "LayoutMismatchError", "Registration",
    "TransferError", "TransferHandle", "XferState", "XferStatus", "available_backends",
    "aux_max_top", "aux_row_from_done", "build_layout", "check_compatible",
    "done_from_aux_row", "make_receiver", "make_sender", "merge_page_runs", "new_room_id",
    "pack_aux_row", "pages_needed", "unpack_aux_row", "validate_pages",
]
