"""Shared helpers for the transfer tests: pools, page maps and a full room exchange."""

from __future__ import annotations

import numpy as np
import torch
from tandem.transfer import AuxRow, KvBuffers, KVPoll, new_room_id

SHAPE = dict(kv_heads=2, head_dim=8)


def make_buffers(num_layers=3, num_pages=40, page_size=16, dtype=torch.float32, seed=None,
                 aux_slots=8, aux_slot_bytes=64, kv_heads=2, head_dim=8) -> KvBuffers:
    """A pool with random content (``seed``) or zeros (``seed=None``)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    shape = (num_pages, page_size, kv_heads, head_dim)

    def t():
        if g is None:
            return torch.zeros(shape, dtype=dtype)
        return torch.randn(shape, generator=g).to(dtype)

    return KvBuffers([t() for _ in range(num_layers)], [t() for _ in range(num_layers)],
                     torch.zeros(aux_slots, aux_slot_bytes, dtype=torch.uint8))


def random_page_map(rng: np.random.Generator, n: int, src_pool: int, dst_pool: int):
    """``n`` distinct source pages and ``n`` distinct destination pages, with some runs."""
    src = rng.choice(src_pool, size=n, replace=False)
    dst = rng.choice(dst_pool, size=n, replace=False)
    # Make part of the map contiguous on both sides so that run merging is exercised.
    if n >= 4 and src_pool >= n and dst_pool >= n:
        k = n // 2
        s0 = rng.integers(0, src_pool - n + 1)
        d0 = rng.integers(0, dst_pool - n + 1)
        src = np.concatenate((np.arange(s0, s0 + k), [p for p in src if not s0 <= p < s0 + k]))
        dst = np.concatenate((np.arange(d0, d0 + k), [p for p in dst if not d0 <= p < d0 + k]))
        src, dst = src[:n], dst[:n]
    return src.astype(np.int64), dst.astype(np.int64)


def page_bytes(buffers: KvBuffers, pages) -> list[bytes]:
    """Raw bytes of ``pages`` in every layer, K then V (exact comparison, NaN-safe)."""
    idx = torch.as_tensor(np.asarray(pages, dtype=np.int64))
    return [t.index_select(0, idx).contiguous().view(torch.uint8).numpy().tobytes()
            for t in [*buffers.k, *buffers.v]]


def run_room(tx, rx, src, dst, num_chunks=2, aux_slot=1, deliver=None, timeout_s=10.0):
    """Send ``src -> dst`` as ``num_chunks`` chunks plus an aux row; return (state, row).

    ``deliver(handle)`` carries grpc messages to the receiver (None for nixl).
    """
    room = new_room_id()
    rx.expect(room, dst, aux_slot)
    peer = tx.peers[0]
    parts = np.array_split(np.arange(len(src)), num_chunks)
    handles = []
    for i, part in enumerate(parts):
        handles.append(tx.send_kv(room, peer, src[part], dst[part], chunk_index=i,
                                  is_last=i == len(parts) - 1))
    row = AuxRow(room, 1234, -0.25, 16, [(7, -1.5), (8, -2.5)])
    handles.append(tx.send_aux(room, peer, aux_slot, row))
    status = tx.wait(handles, timeout_s)
    assert status.done, status.reason
    if deliver is not None:
        for h in handles:
            deliver(h)
    state = rx.wait(room, timeout_s)
    got = rx.aux_row(room) if state is KVPoll.Success else None
    tx.release(handles)
    rx.forget(room)
    return state, got, row


def decode_process(conn, page_size: int, dtype_name: str, name: str = "decode-proc") -> None:
    """Child process: a nixl receiver that fills rooms on request (two-process tests).

    Protocol on ``conn``: sends (agent_name, metadata, layout bytes); then for each
    (room, dst_pages, aux_slot) received: expect, send "ready", wait, send
    (state, page bytes, aux row). ``None`` ends it.
    """
    from tandem.transfer.layout import torch_dtype
    from tandem.transfer.nixl_backend import NixlKvReceiver

    db = make_buffers(num_pages=64, page_size=page_size, dtype=torch_dtype(dtype_name))
    rx = NixlKvReceiver(db, name)
    reg = rx.registration()
    conn.send((reg.agent_name, reg.agent_metadata, reg.layout.SerializeToString()))
    while (msg := conn.recv()) is not None:
        room, dst, slot = msg
        rx.expect(room, dst, slot)
        conn.send("ready")
        state = rx.wait(room, 15.0)
        row = rx.aux_row(room) if state is KVPoll.Success else None
        conn.send((int(state), page_bytes(db, dst), row, rx.failure_reason(room)))
        rx.forget(room)
    rx.close()
