"""nixl backend: notifications, failure signals, and transfers across two real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
import torch
from tandem.transfer import (
    AuxRow,
    KVPoll,
    Registration,
    XferState,
    available_backends,
    make_receiver,
    make_sender,
)
from tandem.transfer.nixl_backend import parse_notif
from tandem.v1 import common_pb2
from transfer_helpers import decode_process, make_buffers, page_bytes, random_page_map

pytestmark = pytest.mark.timeout(60)
_n = iter(range(10**6))


def _wait_for(rx, room, state, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while rx.poll(room) is not state and time.monotonic() < deadline:
        time.sleep(0.001)
    return rx.poll(room)


@pytest.fixture
def pair():
    i = next(_n)
    pb = make_buffers(num_pages=16, page_size=4, seed=5)
    db = make_buffers(num_pages=16, page_size=4)
    rx = make_receiver("nixl", db, f"nd{i}", transfer_timeout_s=None)
    tx = make_sender("nixl", pb, f"np{i}", aux_staging_slots=2)
    peer = tx.add_peer(rx.registration())
    yield pb, db, tx, rx, peer
    tx.close()
    rx.close()


def test_parse_notif():
    assert parse_notif(b"12_kv_3_1") == (12, "kv", (3, True))
    assert parse_notif(b"12_kv_0_0") == (12, "kv", (0, False))
    assert parse_notif(b"7_aux") == (7, "aux", ())
    assert parse_notif(b"7_fail_prefill oom_x") == (7, "fail", ("prefill oom_x",))
    with pytest.raises(ValueError):
        parse_notif(b"7_bogus")


def test_notifications_before_expect_are_kept(pair):
    pb, db, tx, rx, peer = pair
    # Prefill wrote before decode called expect(): the room must still complete.
    h = [tx.send_kv(3, peer, [0, 1], [8, 9]), tx.send_aux(3, peer, 0, AuxRow(3, 99))]
    assert tx.wait(h, 5).done
    tx.release(h)
    deadline = time.monotonic() + 5
    while not rx._pending and time.monotonic() < deadline:  # let the notifs land
        rx._progress()
    rx.expect(3, [8, 9], 0)
    assert rx.wait(3, 5) is KVPoll.Success
    assert page_bytes(db, [8, 9]) == page_bytes(pb, [0, 1])
    # ...and so must its aux row: with the one-round-trip handshake decode hands the slot to
    # prefill before it learns the room, so expect() must never clear what already landed.
    row = rx.aux_row(3)
    assert (row.room, row.first_token_id) == (3, 99)


def test_room_counts_chunks_until_last_and_aux(pair):
    pb, db, tx, rx, peer = pair
    rx.expect(4, [1, 2, 3], 1)
    h = [tx.send_kv(4, peer, [5], [1], 1, False)]  # chunk 1 of 0..2 first (out of order)
    assert tx.wait(h, 5).done
    assert rx.wait(4, 0.3) is KVPoll.Transferring
    h += [tx.send_kv(4, peer, [6], [3], 2, True), tx.send_aux(4, peer, 1, AuxRow(4, 1))]
    assert tx.wait(h, 5).done
    assert rx.wait(4, 0.3) is KVPoll.Transferring  # chunk 0 still missing
    h.append(tx.send_kv(4, peer, [4], [2], 0, False))
    assert tx.wait(h, 5).done
    assert rx.wait(4, 5) is KVPoll.Success
    assert page_bytes(db, [1, 2, 3]) == page_bytes(pb, [5, 4, 6])
    tx.release(h)


def test_empty_chunk_and_failure_notification(pair):
    _, _, tx, rx, peer = pair
    rx.expect(5, [0], 0)
    h = tx.send_kv(5, peer, [], [], 0, False)  # nothing to write: notification only
    assert tx.check(h).done
    assert _wait_for(rx, 5, KVPoll.Transferring) is KVPoll.Transferring
    tx.notify_failed(5, peer, "prefill out of memory")
    assert rx.wait(5, 5) is KVPoll.Failed
    assert "prefill out of memory" in rx.failure_reason(5)


def test_notifications_from_other_agent_ignored(pair):
    pb, db, tx, rx, peer = pair
    rx.expect(6, [7], 0, peer="someone-else")
    h = [tx.send_kv(6, peer, [0], [7]), tx.send_aux(6, peer, 0, AuxRow(6, 1))]
    assert tx.wait(h, 5).done
    assert rx.wait(6, 0.3) is KVPoll.WaitingForInput
    tx.release(h)


def test_forgotten_room_ignores_late_notifications(pair):
    _, _, tx, rx, peer = pair
    rx.expect(8, [0], 0)
    rx.forget(8)
    h = [tx.send_kv(8, peer, [0], [0]), tx.send_aux(8, peer, 0, AuxRow(8, 1))]
    assert tx.wait(h, 5).done
    time.sleep(0.05)
    rx._progress()
    assert 8 not in rx._pending and rx.rooms == {}
    tx.release(h)


def test_aux_staging_slots_are_recycled(pair):
    _, _, tx, rx, peer = pair
    for room in range(10, 16):  # 6 rows through 2 staging slots
        rx.expect(room, [room], 0)
        h = [tx.send_kv(room, peer, [0], [room]), tx.send_aux(room, peer, 0, AuxRow(room, room))]
        assert tx.wait(h, 5).done
        tx.release(h)
        assert rx.wait(room, 5) is KVPoll.Success
        assert rx.aux_row(room).first_token_id == room
        rx.forget(room)
    a = tx.send_aux(20, peer, 0, AuxRow(20, 0))
    b = tx.send_aux(21, peer, 0, AuxRow(21, 0))
    with pytest.raises(RuntimeError, match="staging slots are in flight"):
        tx.send_aux(22, peer, 0, AuxRow(22, 0))
    tx.wait([a, b], 5)
    tx.release([a, b])


def test_missing_nixl_gives_clear_error(monkeypatch):
    from tandem.transfer import nixl_backend

    monkeypatch.setattr(nixl_backend, "NIXL_IMPORT_ERROR", "ModuleNotFoundError: No module 'nixl'")
    with pytest.raises(RuntimeError, match="needs the 'nixl' Python package"):
        make_sender("nixl", make_buffers(), "x")
    assert "nixl package not importable" in available_backends()["nixl"]


def _spawn_decode(page_size, dtype_name, name):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=decode_process, args=(child, page_size, dtype_name, name), daemon=True)
    p.start()
    assert parent.poll(30), "decode process did not start"
    agent, md, lay = parent.recv()
    return p, parent, Registration("nixl", agent, md, common_pb2.KvLayout.FromString(lay))


@pytest.mark.parametrize("page_size, dtype", [(1, torch.bfloat16), (16, torch.float32)])
def test_two_processes_pages_equal(page_size, dtype):
    name = f"decode-2p-{page_size}"
    p, conn, reg = _spawn_decode(page_size, str(dtype).removeprefix("torch."), name)
    pb = make_buffers(num_pages=48, page_size=page_size, dtype=dtype, seed=11)
    tx = make_sender("nixl", pb, f"prefill-2p-{page_size}")
    try:
        peer = tx.add_peer(reg)
        rng = np.random.default_rng(page_size)
        for room, n in ((101, 5), (102, 30)):
            src, dst = random_page_map(rng, n, pb.num_pages, 64)
            conn.send((room, dst.tolist(), 2))
            assert conn.poll(15) and conn.recv() == "ready"
            half = n // 2
            h = [tx.send_kv(room, peer, src[:half], dst[:half], 0, False),
                 tx.send_kv(room, peer, src[half:], dst[half:], 1, True),
                 tx.send_aux(room, peer, 2, AuxRow(room, 77, -0.5))]
            assert tx.wait(h, 10).done
            tx.release(h)
            assert conn.poll(15)
            state, got, row, reason = conn.recv()
            assert state == KVPoll.Success, reason
            assert got == page_bytes(pb, src)
            assert (row.room, row.first_token_id, row.first_token_logprob) == (room, 77, -0.5)

        # The decode process dies: the next transfer errors out instead of hanging.
        conn.send((103, [0], 0))
        assert conn.poll(15) and conn.recv() == "ready"
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        h = [tx.send_kv(103, peer, [0], [0], 0, True), tx.send_aux(103, peer, 0, AuxRow(103, 1))]
        status = tx.wait(h, 15)
        assert status.state is XferState.ERROR and status.reason
        tx.release(h)
    finally:
        tx.close()
        if p.is_alive():
            p.kill()
        p.join(5)
