"""grpc backend: KV pages as bytes in :class:`~tandem.transfer.messages.KvPages` messages
that the worker carries on its gRPC control stream (no NIXL needed).

The sender packs pages into messages (one per layer and page group, at most
``max_message_bytes`` of K+V each, so gRPC's default 4 MiB message limit holds); the
receiver checks every message against the room's allocation and writes the bytes into the
decode pages with the same page arithmetic as the NIXL backend. The aux row travels in
band too (:class:`~tandem.transfer.messages.AuxData`).

Room completion: the message with ``is_last`` has arrived, every (layer, page) of the
allocation has been written, the aux row and the sender's TransferDone have arrived.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from .base import HandleKind, KvReceiver, KvSender, Room, TransferHandle, XferState, XferStatus, inband_aux
from .layout import KvBuffers, head_slice, merge_page_runs
from .messages import KvPages

DEFAULT_MAX_MESSAGE_BYTES = 3 << 20


def _byte_rows(t: torch.Tensor) -> torch.Tensor:
    """Layer tensor as its bytes ``[num_pages, bytes_per_page]`` (any dtype, FP8 included: torch
    indexes uint8 on every device)."""
    return t.view(torch.uint8).view(t.shape[0], -1)


def _page_rows(t: torch.Tensor) -> np.ndarray | None:
    """Layer tensor as a uint8 numpy array [num_pages, bytes_per_page] (host memory only)."""
    if t.device.type != "cpu":
        return None
    return _byte_rows(t).numpy()


def _page_bytes(t: torch.Tensor, pages: np.ndarray) -> bytes:
    """Bytes of ``pages`` of one layer tensor, packed in the given order (one copy)."""
    rows = _page_rows(t)
    if rows is None:
        idx = torch.from_numpy(pages).to(t.device)
        return _byte_rows(t).index_select(0, idx).cpu().numpy().tobytes()
    runs = merge_page_runs(pages, pages)
    if len(runs) == 1:
        s, _, n = runs[0]
        return rows[s : s + n].tobytes()
    return b"".join([memoryview(rows[s : s + n]) for s, _, n in runs.tolist()])


def _from_bytes(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        # The tensor is only read; the message's bytes are immutable.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)


def _write_pages(t: torch.Tensor, pages: np.ndarray, data: bytes) -> None:
    """Write packed page bytes into pages ``pages`` of one layer tensor (one copy)."""
    rows = _page_rows(t)
    if rows is not None:
        rows[pages] = np.frombuffer(data, dtype=np.uint8).reshape(len(pages), -1)
        return
    src = _from_bytes(data).view(len(pages), -1)
    _byte_rows(t).index_copy_(0, torch.from_numpy(pages).to(t.device), src.to(t.device))


def _slice_bytes(t: torch.Tensor, pages: np.ndarray, first: int, n: int) -> bytes:
    """Heads ``[first, first + n)`` of every token of ``pages`` of one layer tensor, packed
    ``[pages, page_size, n, head_dim]`` (one gather)."""
    idx = torch.from_numpy(pages).to(t.device)
    return t.index_select(0, idx)[:, :, first:first + n].contiguous().view(torch.uint8).cpu().numpy().tobytes()


def _write_slice(t: torch.Tensor, pages: np.ndarray, heads: slice, data: bytes) -> None:
    """Write packed head-slice bytes into heads ``heads`` of pages ``pages`` of one layer tensor."""
    n = heads.stop - heads.start
    src = _from_bytes(data).view(t.dtype).view(len(pages), t.shape[1], n, t.shape[3])
    idx = torch.from_numpy(pages).to(t.device)
    t[idx, :, heads.start:heads.stop] = src.to(t.device)


class GrpcKvSender(KvSender):
    """Packs local pages into :class:`KvPages` messages (``handle.messages``)."""

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
        hs = head_slice(self.layout, remote)
        whole = hs.whole_pages(self.layout, remote)
        page_bytes = self.buffers.bytes_per_page if whole else self.buffers.bytes_per_page // self.buffers.kv_heads * hs.num_heads
        heads = {} if whole else {"kv_head_start": hs.model_head, "kv_heads": hs.num_heads}
        per_msg = max(1, self.max_message_bytes // (2 * page_bytes))
        msgs = []
        nbytes = 0
        for layer in range(self.buffers.num_layers):
            for s in range(0, max(len(src), 1), per_msg):
                idx = src[s : s + per_msg]
                if whole:
                    k = _page_bytes(self.buffers.k[layer], idx) if len(idx) else b""
                    v = _page_bytes(self.buffers.v[layer], idx) if len(idx) else b""
                else:
                    k = _slice_bytes(self.buffers.k[layer], idx, hs.src_head, hs.num_heads) if len(idx) else b""
                    v = _slice_bytes(self.buffers.v[layer], idx, hs.src_head, hs.num_heads) if len(idx) else b""
                nbytes += len(k) + len(v)
                msgs.append(KvPages(room, chunk_index, tuple(dst[s : s + per_msg].tolist()), False, layer, k, v,
                                    **heads))
            if not len(src):
                break  # an empty chunk still sends one (empty) message so it is counted
        msgs[-1] = dataclasses.replace(msgs[-1], is_last=is_last)
        return TransferHandle(room, peer, HandleKind.KV, nbytes, chunk_index, is_last, messages=msgs,
                              backend_state=XferState.DONE)

    def _send_aux(self, room, peer, remote, aux_slot, row) -> TransferHandle:
        return inband_aux(room, peer, row)

    def _check(self, h: TransferHandle) -> XferStatus:
        return XferStatus(XferState.DONE)


class GrpcKvReceiver(KvReceiver):
    """Writes :class:`KvPages` bytes into the decode pages of the room they belong to."""

    backend = "grpc"

    def __init__(self, buffers: KvBuffers, name: str = "decode", model_fingerprint: str = "", **timeouts):
        super().__init__(buffers, name, model_fingerprint, **timeouts)

    def _on_pages(self, r: Room, msg: KvPages) -> None:
        b = self.buffers
        if msg.layer is None:
            self._reject(r, f"room {r.room}: KvPages without a layer carries no page bytes")
        at = self._covered_pages(r, msg)
        dst = np.asarray(msg.dst_pages, dtype=np.int64)
        heads = slice(None)
        want = len(dst) * b.bytes_per_page
        if msg.kv_heads:  # a head slice from a sender of another TP size
            first = msg.kv_head_start - self.layout.kv_head_start
            if first < 0 or first + msg.kv_heads > b.kv_heads:
                self._reject(r, f"room {r.room}: KV heads [{msg.kv_head_start}, {msg.kv_head_start + msg.kv_heads}) "
                                f"are not all on this rank (heads [{self.layout.kv_head_start}, "
                                f"{self.layout.kv_head_start + b.kv_heads}))")
            heads = slice(first, first + msg.kv_heads)
            want = want // b.kv_heads * msg.kv_heads
        if len(msg.k) != want or len(msg.v) != want:
            self._reject(r, f"room {r.room}: KvPages for {len(dst)} pages carries "
                            f"{len(msg.k)}/{len(msg.v)} K/V bytes, expected {want}")
        if len(dst):
            for data, pool in ((msg.k, b.k), (msg.v, b.v)):
                if msg.kv_heads:
                    _write_slice(pool[msg.layer], dst, heads, data)
                else:
                    _write_pages(pool[msg.layer], dst, data)
        self._mark_covered(r, msg, at, heads)

    def _room_complete(self, r: Room) -> bool:
        return bool(r.coverage.all())
