"""The edge between the transfer library and the Prefill protocol: its own types to and from
``tandem.v1`` messages, and each failure reason's gRPC status (in one table).

The transfer library never sees a proto; the workers never hand one to it.
"""
from __future__ import annotations

import dataclasses

import grpc
from tandem.transfer import (
    AuxData,
    FailureReason,
    KvPages,
    PoolLayout,
    Registration,
    TransferDone,
    TransferFailure,
    TransferMessage,
)
from tandem.v1 import common_pb2, prefill_pb2

_REASONS = {
    FailureReason.TIMEOUT: prefill_pb2.TRANSFER_FAILURE_REASON_TIMEOUT,
    FailureReason.BACKEND_ERROR: prefill_pb2.TRANSFER_FAILURE_REASON_BACKEND_ERROR,
    FailureReason.PREFILL_FAILED: prefill_pb2.TRANSFER_FAILURE_REASON_PREFILL_FAILED,
    FailureReason.BAD_REQUEST: prefill_pb2.TRANSFER_FAILURE_REASON_BAD_REQUEST,
    FailureReason.PROTOCOL: prefill_pb2.TRANSFER_FAILURE_REASON_PROTOCOL,
    FailureReason.CANCELLED: prefill_pb2.TRANSFER_FAILURE_REASON_CANCELLED,
}
_FROM_PROTO = {v: k for k, v in _REASONS.items()}

# Failure reason -> (the request's gRPC status, whether another prefill worker may succeed).
FAILURE_STATUS: dict[FailureReason, tuple[grpc.StatusCode, bool]] = {
    FailureReason.TIMEOUT: (grpc.StatusCode.DEADLINE_EXCEEDED, True),
    FailureReason.BACKEND_ERROR: (grpc.StatusCode.UNAVAILABLE, True),
    FailureReason.PREFILL_FAILED: (grpc.StatusCode.UNAVAILABLE, True),
    FailureReason.BAD_REQUEST: (grpc.StatusCode.INVALID_ARGUMENT, False),
    FailureReason.PROTOCOL: (grpc.StatusCode.UNAVAILABLE, True),
    FailureReason.CANCELLED: (grpc.StatusCode.CANCELLED, False),
}


def layout_to_proto(layout: PoolLayout) -> common_pb2.KvLayout:
    return common_pb2.KvLayout(**dataclasses.asdict(layout))


def layout_from_proto(layout: common_pb2.KvLayout) -> PoolLayout:
    return PoolLayout(**{f.name: getattr(layout, f.name) for f in dataclasses.fields(PoolLayout)})


def registration_to_request(reg: Registration, decode_id: str) -> prefill_pb2.RegisterDecodeRequest:
    return prefill_pb2.RegisterDecodeRequest(
        decode_id=decode_id, transfer_backend=reg.backend, agent_name=reg.agent_name,
        agent_metadata=reg.agent_metadata, layout=layout_to_proto(reg.layout),
        ranks=[prefill_pb2.RankAgent(agent_name=r.agent_name, agent_metadata=r.agent_metadata,
                                     layout=layout_to_proto(r.layout)) for r in reg.ranks])


def registration_from_request(req: prefill_pb2.RegisterDecodeRequest) -> Registration:
    ranks = tuple(Registration(req.transfer_backend, r.agent_name, bytes(r.agent_metadata), layout_from_proto(r.layout))
                  for r in req.ranks)
    return Registration(req.transfer_backend, req.agent_name, bytes(req.agent_metadata),
                        layout_from_proto(req.layout), ranks)


def sender_ranks_to_proto(ranks: list[tuple[str, PoolLayout]]) -> list[prefill_pb2.RankAgent]:
    """A prefill worker's senders for RegisterDecodeResponse.ranks (none for one rank)."""
    if len(ranks) < 2:
        return []
    return [prefill_pb2.RankAgent(agent_name=name, layout=layout_to_proto(lay)) for name, lay in ranks]


def prefill_agents(resp: prefill_pb2.RegisterDecodeResponse) -> str | tuple[tuple[str, PoolLayout], ...]:
    """Who writes a room of this prefill worker: its agent name (one rank), or every rank's
    ``(agent name, layout)``, rank 0 first (what ``RankedReceiver.expect`` takes as ``peer``)."""
    if len(resp.ranks) < 2:
        return resp.agent_name
    return tuple((r.agent_name, layout_from_proto(r.layout)) for r in resp.ranks)


def failure_to_proto(f: TransferFailure) -> prefill_pb2.TransferFailed:
    retryable = FAILURE_STATUS[f.reason][1]
    return prefill_pb2.TransferFailed(room=f.room, reason=_REASONS[f.reason], error=common_pb2.ErrorDetail(
        code=f.reason.value, message=f.message, retryable=retryable))


def failure_from_proto(f: prefill_pb2.TransferFailed) -> TransferFailure:
    reason = _FROM_PROTO.get(f.reason, FailureReason.PREFILL_FAILED)
    return TransferFailure(f.room, reason, f.error.message or reason.value)


def message_to_proto(msg: TransferMessage) -> prefill_pb2.PrefillServerMessage:
    """A transfer-library message as the Prefill stream carries it."""
    if isinstance(msg, KvPages):
        chunk = prefill_pb2.KvChunk(room=msg.room, chunk_index=msg.chunk_index, page_indices=msg.dst_pages,
                                    k=msg.k, v=msg.v, is_last=msg.is_last, kv_heads=msg.kv_heads,
                                    kv_head_start=msg.kv_head_start, dst_rank=msg.dst_rank)
        if msg.layer is not None:
            chunk.layer = msg.layer
        return prefill_pb2.PrefillServerMessage(chunk=chunk)
    if isinstance(msg, AuxData):
        return prefill_pb2.PrefillServerMessage(aux=prefill_pb2.KvAux(room=msg.room, row=msg.row,
                                                                      dst_rank=msg.dst_rank))
    if isinstance(msg, TransferDone):
        return prefill_pb2.PrefillServerMessage(done=prefill_pb2.TransferDone(
            room=msg.room, num_chunks=msg.num_chunks, bytes_transferred=msg.bytes_transferred))
    if isinstance(msg, TransferFailure):
        return prefill_pb2.PrefillServerMessage(failed=failure_to_proto(msg))
    raise TypeError(f"not a transfer message: {msg!r}")


def message_from_proto(msg: prefill_pb2.PrefillServerMessage) -> TransferMessage:
    """Inverse of :func:`message_to_proto` (not for BootstrapRoom, which is the worker's own)."""
    kind = msg.WhichOneof("msg")
    if kind == "chunk":
        c = msg.chunk
        return KvPages(c.room, c.chunk_index, tuple(c.page_indices), c.is_last,
                       c.layer if c.HasField("layer") else None, c.k, c.v, c.kv_head_start, c.kv_heads, c.dst_rank)
    if kind == "aux":
        return AuxData(msg.aux.room, msg.aux.row, msg.aux.dst_rank)
    if kind == "done":
        return TransferDone(msg.done.room, msg.done.num_chunks, msg.done.bytes_transferred)
    if kind == "failed":
        return failure_from_proto(msg.failed)
    raise ValueError(f"not a transfer message: {kind!r}")
