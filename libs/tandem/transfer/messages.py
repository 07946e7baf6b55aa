"""The transfer library's messages: what a sender hands its receiver besides (or instead of)
writing memory directly, and the typed failure reasons.

A backend that moves data out of band (NIXL WRITEs) needs only :class:`TransferDone` and
:class:`TransferFailure` on the control stream; one that moves data in band (``grpc``)
also sends :class:`KvPages` with the page bytes and :class:`AuxData` with the aux row. The
worker carries these messages between the processes (translated to and from
``tandem.v1`` messages at its edge); the library never sees a proto.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FailureReason(enum.Enum):
    """Why a room failed. The worker maps each reason to a gRPC status in one table."""

    TIMEOUT = "timeout"  # a bootstrap or transfer deadline passed
    BACKEND_ERROR = "backend_error"  # the transport failed (a NIXL error, the peer went away)
    PREFILL_FAILED = "prefill_failed"  # the sender could not produce the room (prefill aborted)
    BAD_REQUEST = "bad_request"  # an allocation, page index or message that can never work
    PROTOCOL = "protocol"  # inconsistent messages (extra chunks, a stale aux row, wrong room)
    CANCELLED = "cancelled"  # the room was cancelled; nothing more will be written into it


@dataclass(frozen=True)
class KvPages:
    """Pages of chunk ``chunk_index`` of ``room`` in decode's pool.

    With ``k``/``v`` set (in-band backends), they carry ``len(dst_pages)`` pages of layer
    ``layer``, packed in ``dst_pages`` order. Without bytes, the sender already wrote the
    pages of every layer (``layer`` None) and this message is the notice.
    ``is_last``: the last message of the room's last chunk. ``kv_heads`` > 0: the bytes hold only the
    model's KV heads ``[kv_head_start, kv_head_start + kv_heads)`` of every token (a sender and a
    receiver of different TP sizes), packed ``[pages, page_size, kv_heads, head_dim]``; 0: whole pages.
    ``dst_rank``: the rank of the receiving worker whose pool the message fills (a decode worker of
    several TP ranks has one receiver per rank; 0 for a one-rank worker).
    """

    room: int
    chunk_index: int
    dst_pages: tuple[int, ...]
    is_last: bool = False
    layer: int | None = None
    k: bytes = b""
    v: bytes = b""
    kv_head_start: int = 0
    kv_heads: int = 0
    dst_rank: int = 0


@dataclass(frozen=True)
class AuxData:
    """The room's packed aux row (``tandem.transfer.aux``), for decode's aux slot (of rank
    ``dst_rank``, as in :class:`KvPages`)."""

    room: int
    row: bytes
    dst_rank: int = 0


@dataclass(frozen=True)
class TransferDone:
    """The sender's last word on a room: every write finished (none is in flight any more)."""

    room: int
    num_chunks: int
    bytes_transferred: int = 0


@dataclass(frozen=True)
class TransferFailure:
    """A room failed; when the sender reports it, none of its writes is in flight any more."""

    room: int
    reason: FailureReason
    message: str


TransferMessage = KvPages | AuxData | TransferDone | TransferFailure
