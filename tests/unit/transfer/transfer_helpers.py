"""Shared helpers for the transfer tests: pools, page maps and a full room exchange."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch
from tandem.transfer import AuxRow, KvBuffers, KVPoll, backends, make_receiver, new_room_id, register_backend

SHAPE = dict(kv_heads=2, head_dim=8)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def use_shm_backend() -> None:
    """Register the test backend of shm_backend.py (once per process)."""
    from shm_backend import ShmKvReceiver, ShmKvSender

    if "shm" not in backends():
        register_backend("shm", ShmKvSender, ShmKvReceiver)


class ShmDir:
    """A folder under /dev/shm for buffers a process can share by file (removed by close())."""

    def __init__(self, path: str | None = None, prefix: str = "t") -> None:
        self.path = path or tempfile.mkdtemp(prefix="tandem-transfer-", dir="/dev/shm")
        self.prefix = prefix
        self._n = 0

    def tensor(self, shape, dtype) -> torch.Tensor:
        self._n += 1
        numel = int(np.prod(shape))
        t = torch.from_file(os.path.join(self.path, f"{self.prefix}{self._n}"), shared=True, size=numel,
                            dtype=dtype)
        return t.view(*shape)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def make_buffers(num_layers=3, num_pages=40, page_size=16, dtype=torch.float32, seed=None,
                 aux_slots=8, aux_slot_bytes=64, kv_heads=2, head_dim=8, shm: ShmDir | None = None) -> KvBuffers:
    """A pool with random content (``seed``) or zeros (``seed=None``); in shared-memory files
    when ``shm`` is given (every backend can use those, the shm backend needs them). FP8 pools
    get per-layer scales (the same for every pool of this shape, as two workers must have)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    shape = (num_pages, page_size, kv_heads, head_dim)

    def t():
        out = shm.tensor(shape, dtype) if shm is not None else torch.empty(shape, dtype=dtype)
        out.copy_(torch.zeros(shape) if g is None else torch.randn(shape, generator=g).to(dtype))
        return out

    aux = shm.tensor((aux_slots, aux_slot_bytes), torch.uint8) if shm is not None else \
        torch.empty(aux_slots, aux_slot_bytes, dtype=torch.uint8)
    aux.zero_()
    scales = [0.25 * (i + 1) for i in range(num_layers)] if dtype in FP8 else []
    return KvBuffers([t() for _ in range(num_layers)], [t() for _ in range(num_layers)], aux, scales,
                     scales[::-1])


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


def deliver(rx, handles) -> None:
    """What the workers do with a room's handles: carry their messages to the receiver."""
    for h in handles:
        for m in h.messages:
            rx.handle(m)


def send_room(tx, room, src, dst, num_chunks=2, aux_slot=1, row=None, peer=None, timeout_s=10.0):
    """Send ``src -> dst`` as ``num_chunks`` chunks plus an aux row, wait until the sender is
    done; returns (handles, TransferDone, row)."""
    peer = peer or tx.peers[0]
    parts = np.array_split(np.arange(len(src)), num_chunks)
    handles = [tx.send_kv(room, peer, src[part], dst[part], chunk_index=i, is_last=i == len(parts) - 1)
               for i, part in enumerate(parts)]
    row = row or AuxRow.one(room, 1234, -0.25, 16, [(7, -1.5), (8, -2.5)])
    handles.append(tx.send_aux(room, peer, aux_slot, row))
    status = tx.wait(handles, timeout_s)
    assert status.done, status.reason
    return handles, tx.done(room, handles), row


def run_room(tx, rx, src, dst, num_chunks=2, aux_slot=1, row=None, timeout_s=10.0):
    """A whole room through ``tx`` and ``rx``: returns (state, row read back, row sent)."""
    room = new_room_id()
    rx.expect(room, dst, aux_slot)
    handles, done, row = send_room(tx, room, src, dst, num_chunks, aux_slot, row, timeout_s=timeout_s)
    deliver(rx, handles)
    rx.handle(done)
    state = rx.wait(room, timeout_s)
    got = rx.aux_row(room) if state is KVPoll.Success else None
    tx.release(handles)
    rx.forget(room)
    return state, got, row


def decode_process(conn, backend: str, page_size: int, dtype_name: str, name: str, shm_path: str) -> None:
    """Child process: a receiver that fills rooms on request (two-process tests).

    Protocol on ``conn``: sends its Registration; then for each (room, dst_pages, aux_slot):
    expect, send "ready", apply every message received until None, wait, send (state, page
    bytes, aux row, failure). ``None`` instead of a room ends it.
    """
    from tandem.transfer.layout import torch_dtype

    use_shm_backend()
    db = make_buffers(num_pages=64, page_size=page_size, dtype=torch_dtype(dtype_name),
                      shm=ShmDir(shm_path, prefix=f"{name}-"))
    rx = make_receiver(backend, db, name)
    conn.send(rx.registration())
    while (msg := conn.recv()) is not None:
        room, dst, slot = msg
        rx.expect(room, dst, slot)
        conn.send("ready")
        while (m := conn.recv()) is not None:
            rx.handle(m)
        state = rx.wait(room, 15.0)
        row = rx.aux_row(room) if state is KVPoll.Success else None
        conn.send((int(state), page_bytes(db, dst), row, rx.failure(room)))
        rx.forget(room)
    rx.close()
