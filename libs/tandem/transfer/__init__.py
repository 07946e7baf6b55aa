"""KV transfer between prefill and decode workers (``--disaggregation-transfer-backend``).

Usage (decode)::

    rx = make_receiver("nixl", KvBuffers(k_layers, v_layers, aux), name="decode-0")
    reg = rx.registration()            # -> every prefill worker, once
    rx.expect(room, page_indices, aux_slot)
    rx.handle(msg)                     # each message the sender's worker forwarded
    states = rx.poll_all()             # once per loop iteration, for every room
    row = rx.aux_row(room); rx.forget(room)

Usage (prefill)::

    tx = make_sender("nixl", KvBuffers(...), name="prefill-0")
    peer = tx.add_peer(registration)
    h = [tx.send_kv(room, peer, my_pages, decode_pages, chunk_index=0, is_last=True),
         tx.send_aux(room, peer, aux_slot, AuxRow.one(room, first_token_id, logprob))]
    # forward every h[i].messages to decode; poll tx.check(h) until DONE, then
    # forward tx.done(room, h) and tx.release(h)

The library knows neither the engine (its pool is described by :class:`KvBuffers`) nor
any proto (:mod:`.messages` are its own). Adding a backend: ``README.md`` in this folder.
"""

from .aux import AUX_MIN_SLOT_BYTES, AuxRow, SampleToken, aux_max_samples, aux_max_top, pack_aux_row, unpack_aux_row
from .base import (
    HandleKind,
    KVPoll,
    KvReceiver,
    KvSender,
    Registration,
    TransferError,
    TransferHandle,
    XferState,
    XferStatus,
    inband_aux,
    new_room_id,
)
from .grpc_backend import GrpcKvReceiver, GrpcKvSender
from .layout import (
    HeadSlice,
    KvBuffers,
    LayoutMismatchError,
    PoolLayout,
    build_layout,
    check_compatible,
    head_slice,
    merge_page_runs,
    pages_needed,
    run_descriptors,
    slice_descriptors,
    validate_pages,
    writers_of,
)
from .messages import AuxData, FailureReason, KvPages, TransferDone, TransferFailure, TransferMessage

# name -> (sender class, receiver class); "nixl" is imported lazily (it loads native code).
_BACKENDS: dict[str, tuple[type[KvSender], type[KvReceiver]] | None] = {
    "nixl": None,
    "grpc": (GrpcKvSender, GrpcKvReceiver),
}


def register_backend(name: str, sender: type[KvSender], receiver: type[KvReceiver]) -> None:
    """Make ``name`` usable with :func:`make_sender` / :func:`make_receiver`."""
    if name in _BACKENDS:
        raise ValueError(f"transfer backend {name!r} is already registered")
    _BACKENDS[name] = (sender, receiver)


def backends() -> tuple[str, ...]:
    """Names of the registered backends."""
    return tuple(_BACKENDS)


def available_backends() -> dict[str, str]:
    """Backend name -> "" when usable here, else why not (e.g. nixl not installed)."""
    from . import nixl_backend

    return {name: (f"nixl package not importable: {nixl_backend.NIXL_IMPORT_ERROR}"
                   if name == "nixl" and nixl_backend.NIXL_IMPORT_ERROR else "") for name in _BACKENDS}


def _classes(backend: str) -> tuple[type[KvSender], type[KvReceiver]]:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown transfer backend {backend!r}; allowed: {', '.join(_BACKENDS)}")
    if _BACKENDS[backend] is None:
        from .nixl_backend import NixlKvReceiver, NixlKvSender

        _BACKENDS[backend] = (NixlKvSender, NixlKvReceiver)
    return _BACKENDS[backend]


def make_sender(backend: str, buffers: KvBuffers, name: str, model_fingerprint: str = "",
                **kwargs) -> KvSender:
    """Prefill-side sender for ``backend``."""
    return _classes(backend)[0](buffers, name, model_fingerprint, **kwargs)


def make_receiver(backend: str, buffers: KvBuffers, name: str, model_fingerprint: str = "",
                  **kwargs) -> KvReceiver:
    """Decode-side receiver for ``backend``; kwargs: bootstrap_timeout_s, waiting_timeout_s,
    transfer_timeout_s (and the backend's own, e.g. nixl_backends)."""
    return _classes(backend)[1](buffers, name, model_fingerprint, **kwargs)


__all__ = [
    "AUX_MIN_SLOT_BYTES", "AuxData", "AuxRow", "FailureReason", "GrpcKvReceiver", "GrpcKvSender", "HeadSlice",
    "HandleKind", "KVPoll", "KvBuffers", "KvPages", "KvReceiver", "KvSender", "LayoutMismatchError",
    "PoolLayout", "Registration", "SampleToken", "TransferDone", "TransferError", "TransferFailure",
    "TransferHandle", "TransferMessage", "XferState", "XferStatus", "available_backends", "aux_max_samples",
    "aux_max_top", "backends", "build_layout", "check_compatible", "inband_aux", "make_receiver",
    "make_sender", "merge_page_runs", "new_room_id", "pack_aux_row", "pages_needed", "register_backend", "run_descriptors",
    "unpack_aux_row", "validate_pages", "head_slice", "slice_descriptors", "writers_of",
]
