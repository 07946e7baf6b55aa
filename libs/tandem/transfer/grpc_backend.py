"""grpc backend: KV pages as bytes in ``tandem.v1.KvChunk`` messages (no NIXL needed).

The sender packs pages into ``KvChunk`` messages (one per layer and page group, at most
``max_message_bytes`` of K+V each, so gRPC's default 4 MiB message limit holds); the
Prefill service puts them on the Prefill stream. The receiver validates every message
against the room's allocation and writes the bytes into the decode pages with the same
page arithmetic as the NIXL backend. The metadata row travels in ``TransferDone``
(see :func:`done_from_aux_row` / :func:`aux_row_from_done`) and is written into the aux
slot by :meth:`GrpcKvReceiver.receive_aux`.

Room completion: the message with ``is_last`` has arrived, every (layer, page) of the
allocation has been written, and the aux row has arrived.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch
from tandem.v1 import common_pb2, prefill_pb2

from .base import (
    KVPoll,
    KvReceiver,
    KvSender,
    Registration,
    Room,
    TransferHandle,
    XferState,
    XferStatus,
)
from .layout import AuxRow, KvBuffers, merge_page_runs, pack_aux_row, torch_dtype

DEFAULT_MAX_MESSAGE_BYTES = 3 << 20


def _page_rows(t: torch.Tensor) -> np.ndarray | None:
    """Layer tensor as a uint8 numpy array [num_pages, bytes_per_page] (host memory only)."""
    if t.device.type != "cpu":
        return None
    return t.view(torch.uint8).numpy().reshape(t.shape[0], -1)


def _page_bytes(t: torch.Tensor, pages: np.ndarray) -> bytes:
    """Bytes of ``pages`` of one layer tensor, packed in the given order (one copy)."""
    rows = _page_rows(t)
    if rows is None:
        idx = torch.from_numpy(pages).to(t.device)
        return t.index_select(0, idx).cpu().view(torch.uint8).numpy().tobytes()
    runs = merge_page_runs(pages, pages)
    if len(runs) == 1:
        s, _, n = runs[0]
        return rows[s : s + n].tobytes()
    return b"".join([memoryview(rows[s : s + n]) for s, _, n in runs.tolist()])


def _from_bytes(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        # The tensor is only read; protobuf's bytes are immutable.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)


def _write_pages(t: torch.Tensor, pages: np.ndarray, data: bytes, dtype, page_shape) -> None:
    """Write packed page bytes into pages ``pages`` of one layer tensor (one copy)."""
    rows = _page_rows(t)
    if rows is not None:
        rows[pages] = np.frombuffer(data, dtype=np.uint8).reshape(len(pages), -1)
        return
    src = _from_bytes(data).view(dtype).view(len(pages), *page_shape)
    t.index_copy_(0, torch.from_numpy(pages).to(t.device), src.to(t.device))


class GrpcKvSender(KvSender):
    """Packs local pages into ``KvChunk`` messages (``handle.messages``)."""

    backend = "grpc"

    def __init__(
        self,
        buffers: KvBuffers,
        name: str = "prefill",
        model_fingerprint: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        super().__init__(buffers, name, model_fingerprint)
        if max_message_bytes < 2 * buffers.bytes_per_page:
            raise ValueError(
                f"max_message_bytes={max_message_bytes} cannot hold one page of K and V "
                f"({2 * buffers.bytes_per_page} bytes)"
            )
        self.max_message_bytes = max_message_bytes

    def _send_kv(self, room, peer, remote, src, dst, chunk_index, is_last) -> TransferHandle:
        per_msg = max(1, self.max_message_bytes // (2 * self.buffers.bytes_per_page))
        msgs = []
        nbytes = 0
        for layer in range(self.buffers.num_layers):
            for s in range(0, max(len(src), 1), per_msg):
                idx = src[s : s + per_msg]
                k = _page_bytes(self.buffers.k[layer], idx) if len(idx) else b""
                v = _page_bytes(self.buffers.v[layer], idx) if len(idx) else b""
                nbytes += len(k) + len(v)
                msgs.append(
                    prefill_pb2.KvChunk(
                        room=room, chunk_index=chunk_index, layer=layer,
                        page_indices=dst[s : s + per_msg].tolist(), k=k, v=v,
                    )
                )
            if not len(src):
                break  # an empty chunk still sends one (empty) message so it is counted
        msgs[-1].is_last = is_last
        return TransferHandle(room, peer, "kv", nbytes, chunk_index, is_last, messages=msgs)

    def _send_aux(self, room, peer, remote, aux_slot, row) -> TransferHandle:
        return TransferHandle(room, peer, "aux", remote.aux_slot_bytes, aux_row=row)

    def _check(self, h: TransferHandle) -> XferStatus:
        return XferStatus(XferState.DONE)


class GrpcKvReceiver(KvReceiver):
    """Writes ``KvChunk`` bytes into the decode pages of the room they belong to.

    :meth:`receive` and :meth:`receive_aux` raise ``ValueError`` for bad input (unknown
    room, page not allocated to the room, wrong byte count); nothing is written then and
    a known room is marked Failed with the same message.
    """

    backend = "grpc"

    def __init__(self, buffers: KvBuffers, name: str = "decode", model_fingerprint: str = "",
                 **timeouts):
        super().__init__(buffers, name, model_fingerprint, **timeouts)
        self._dtype = torch_dtype(self.layout.dtype)
        self._page_shape = tuple(buffers.k[0].shape[1:])
        self._lock = threading.RLock()
        # room -> (sorted pages, position of each sorted page in the allocation, coverage)
        self._alloc: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def registration(self) -> Registration:
        return Registration(self.backend, self.name, b"", self.layout)

    def _on_expect(self, r: Room) -> None:
        order = np.argsort(r.pages, kind="stable")
        cov = np.zeros((self.buffers.num_layers, len(r.pages)), dtype=bool)
        self._alloc[r.room] = (r.pages[order], order, cov)

    def _on_forget(self, room: int) -> None:
        self._alloc.pop(room, None)

    def _room_complete(self, r: Room) -> bool:
        return bool(self._alloc[r.room][2].all())

    def _fail(self, r: Room | None, msg: str):
        if r is not None and r.state not in (KVPoll.Success, KVPoll.Failed):
            r.state, r.reason = KVPoll.Failed, msg
        raise ValueError(msg)

    def receive(self, chunk: prefill_pb2.KvChunk) -> KVPoll:
        """Validate and write one message; returns the room's new state."""
        with self._lock:
            r = self._rooms.get(chunk.room)
            if r is None:
                raise ValueError(f"KvChunk for unknown room {chunk.room}")
            if r.state not in (KVPoll.WaitingForInput, KVPoll.Transferring):
                if r.state is KVPoll.Bootstrapping:
                    self._fail(r, f"room {r.room}: KvChunk before the page allocation")
                return r.state  # late message of a failed room: ignore
            b = self.buffers
            if not 0 <= chunk.layer < b.num_layers:
                self._fail(r, f"room {r.room}: layer {chunk.layer} out of range for "
                              f"{b.num_layers} layers")
            dst = np.asarray(chunk.page_indices, dtype=np.int64)
            want = len(dst) * b.bytes_per_page
            if len(chunk.k) != want or len(chunk.v) != want:
                self._fail(r, f"room {r.room}: KvChunk for {len(dst)} pages carries "
                              f"{len(chunk.k)}/{len(chunk.v)} K/V bytes, expected {want}")
            sorted_pages, order, cov = self._alloc[r.room]
            if len(dst):
                at = np.searchsorted(sorted_pages, dst).clip(0, max(len(sorted_pages) - 1, 0))
                ok = sorted_pages[at] == dst if len(sorted_pages) else np.zeros(len(dst), bool)
                if not ok.all():
                    bad = int(dst[np.nonzero(~ok)[0][0]])
                    self._fail(r, f"room {r.room}: decode page {bad} is not allocated to this "
                                  f"room (pool has {b.num_pages} pages)")
                for src, pool in ((chunk.k, b.k), (chunk.v, b.v)):
                    _write_pages(pool[chunk.layer], dst, src, self._dtype, self._page_shape)
                cov[chunk.layer, order[at]] = True
            self._chunk_arrived(r, chunk.chunk_index, chunk.is_last, 2 * want)
            return r.state

    def receive_aux(self, room: int, row: AuxRow) -> KVPoll:
        """Write the metadata row (from ``TransferDone``) into the room's aux slot."""
        with self._lock:
            r = self._rooms.get(room)
            if r is None:
                raise ValueError(f"aux row for unknown room {room}")
            if r.state not in (KVPoll.WaitingForInput, KVPoll.Transferring):
                return r.state
            if row.room != room:
                self._fail(r, f"aux row is for room {row.room}, not {room}")
            data = pack_aux_row(row, self.buffers.aux_slot_bytes)
            self.buffers.aux[r.aux_slot].copy_(_from_bytes(data).to(self.buffers.aux.device))
            self._aux_arrived(r)
            return r.state

    def poll(self, room: int) -> KVPoll:
        with self._lock:
            return super().poll(room)

    def _stream_chunk(self, chunk: prefill_pb2.KvChunk) -> None:
        self.receive(chunk)

    def _stream_done(self, room: int, done: prefill_pb2.TransferDone) -> None:
        self.receive_aux(room, aux_row_from_done(done))


def done_from_aux_row(row: AuxRow, **fields) -> prefill_pb2.TransferDone:
    """``TransferDone`` carrying ``row`` (grpc backend); extra fields pass through."""
    lp = None
    if row.first_token_logprob == row.first_token_logprob:  # not NaN
        lp = common_pb2.PositionLogprobs(
            logprob=row.first_token_logprob,
            top=[common_pb2.TokenLogprob(token_id=t, logprob=p) for t, p in row.top_logprobs],
        )
    return prefill_pb2.TransferDone(
        room=row.room, first_token_id=row.first_token_id, first_token_logprobs=lp,
        cached_tokens=row.cached_tokens, **fields,
    )


def aux_row_from_done(done: prefill_pb2.TransferDone) -> AuxRow:
    """Inverse of :func:`done_from_aux_row`."""
    if done.HasField("first_token_logprobs"):
        lp = done.first_token_logprobs
        return AuxRow(done.room, done.first_token_id, lp.logprob, done.cached_tokens,
                      [(t.token_id, t.logprob) for t in lp.top])
    return AuxRow(done.room, done.first_token_id, float("nan"), done.cached_tokens)
