"""Both backends write prefill's page bytes into exactly the decode pages of the map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tandem.transfer import KVPoll, make_receiver, make_sender
from transfer_helpers import make_buffers, page_bytes, random_page_map, run_room

pytestmark = pytest.mark.timeout(120)
BACKENDS = ["grpc", "nixl"]


def _pair(backend, page_size, dtype, **kw):
    pb = make_buffers(num_pages=48, page_size=page_size, dtype=dtype, seed=1)
    db = make_buffers(num_pages=64, page_size=page_size, dtype=dtype)
    rx = make_receiver(backend, db, f"decode-{backend}-{page_size}-{dtype}")
    tx = make_sender(backend, pb, f"prefill-{backend}-{page_size}-{dtype}", **kw)
    tx.add_peer(rx.registration())
    deliver = None
    if backend == "grpc":
        def deliver(h):
            for m in h.messages:
                rx.receive(m)
            if h.kind == "aux":
                rx.receive_aux(h.room, h.aux_row)
    return pb, db, tx, rx, deliver


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_pages_equal_prefill_pages(backend, page_size, dtype):
    pb, db, tx, rx, deliver = _pair(backend, page_size, dtype)
    rng = np.random.default_rng(page_size * 7 + (dtype == torch.bfloat16))
    try:
        for n, chunks in ((1, 1), (13, 3), (40, 4)):
            src, dst = random_page_map(rng, n, pb.num_pages, db.num_pages)
            before = page_bytes(db, np.setdiff1d(np.arange(db.num_pages), dst))
            state, got, row = run_room(tx, rx, src, dst, num_chunks=chunks, deliver=deliver)
            assert state is KVPoll.Success
            assert page_bytes(db, dst) == page_bytes(pb, src)
            # Pages outside the map are untouched.
            assert page_bytes(db, np.setdiff1d(np.arange(db.num_pages), dst)) == before
            assert got.first_token_id == row.first_token_id and got.room == row.room
            assert got.top_logprobs == row.top_logprobs
            for t in [*db.k, *db.v]:
                t.zero_()
    finally:
        tx.close()
        rx.close()


def test_grpc_splits_large_chunks_into_bounded_messages():
    pb, db, tx, rx, deliver = _pair("grpc", 16, torch.float32, max_message_bytes=3 * 2 * 1024)
    bpp = pb.bytes_per_page  # 16 * 2 * 8 * 4 = 1024
    src, dst = np.arange(10), np.arange(20, 30)
    h = tx.send_kv(5, tx.peers[0], src, dst, 0, True)
    assert all(len(m.k) + len(m.v) <= 3 * 2 * bpp for m in h.messages)
    assert len(h.messages) == pb.num_layers * 4  # ceil(10 / 3) per layer
    assert [m.is_last for m in h.messages].count(True) == 1 and h.messages[-1].is_last
    assert h.nbytes == 2 * pb.num_layers * 10 * bpp
