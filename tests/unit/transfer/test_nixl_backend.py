"""nixl backend: the suite every backend runs, plus what is NIXL's own: notifications (also
before expect), the sender agent check, aux staging slots, failure signals, a dead peer."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
from backend_suite import BackendSuite, wait_for_state
from tandem.transfer import (
    AuxRow,
    FailureReason,
    KVPoll,
    XferState,
    available_backends,
    make_receiver,
    make_sender,
)
from tandem.transfer.nixl_backend import parse_notif
from transfer_helpers import ShmDir, decode_process, make_buffers, page_bytes

pytestmark = pytest.mark.timeout(120)
_n = iter(range(10**6))


class TestNixlBackend(BackendSuite):
    backend = "nixl"


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
    h = [tx.send_kv(3, peer, [0, 1], [8, 9]), tx.send_aux(3, peer, 0, AuxRow.one(3, 99))]
    assert tx.wait(h, 5).done
    done = tx.done(3, h)
    tx.release(h)
    deadline = time.monotonic() + 5
    while rx.num_early_notifications < 2 and time.monotonic() < deadline:  # let the notifs land
        rx.poll_all()
    assert rx.num_early_notifications == 2
    rx.expect(3, [8, 9], 0)
    rx.handle(done)
    assert rx.wait(3, 5) is KVPoll.Success
    assert page_bytes(db, [8, 9]) == page_bytes(pb, [0, 1])
    # ...and so must its aux row: expect() never clears what already landed.
    row = rx.aux_row(3)
    assert (row.room, row.first_token_id) == (3, 99)
    assert rx.num_early_notifications == 0


def test_failure_notification(pair):
    _, _, tx, rx, peer = pair
    rx.expect(5, [0], 0)
    h = tx.send_kv(5, peer, [], [], 0, False)  # nothing to write: notification only
    assert tx.check(h).done
    assert wait_for_state(rx, 5, KVPoll.Transferring) is KVPoll.Transferring
    tx.notify_failed(5, peer, "prefill out of memory")
    assert rx.wait(5, 5) is KVPoll.Failed
    assert rx.failure(5).reason is FailureReason.BACKEND_ERROR
    assert "prefill out of memory" in rx.failure(5).message


def test_notifications_from_other_agent_ignored(pair):
    pb, db, tx, rx, peer = pair
    rx.expect(6, [7], 0, peer="someone-else")
    h = [tx.send_kv(6, peer, [0], [7]), tx.send_aux(6, peer, 0, AuxRow.one(6, 1))]
    assert tx.wait(h, 5).done
    rx.handle(tx.done(6, h))
    assert rx.wait(6, 0.3) is not KVPoll.Success
    tx.release(h)


def test_forgotten_room_keeps_no_late_notifications(pair):
    _, _, tx, rx, peer = pair
    rx.expect(8, [0], 0)
    rx.forget(8)
    h = [tx.send_kv(8, peer, [0], [0]), tx.send_aux(8, peer, 0, AuxRow.one(8, 1))]
    assert tx.wait(h, 5).done
    time.sleep(0.05)
    rx.poll_all()
    assert rx.num_early_notifications == 0 and rx.rooms == {}
    tx.release(h)


def test_aux_staging_slots_are_recycled(pair):
    _, _, tx, rx, peer = pair
    for room in range(10, 16):  # 6 rows through 2 staging slots
        rx.expect(room, [room], 0)
        h = [tx.send_kv(room, peer, [0], [room]), tx.send_aux(room, peer, 0, AuxRow.one(room, room))]
        assert tx.wait(h, 5).done
        rx.handle(tx.done(room, h))
        tx.release(h)
        assert rx.wait(room, 5) is KVPoll.Success
        assert rx.aux_row(room).first_token_id == room
        rx.forget(room)
    a = tx.send_aux(20, peer, 0, AuxRow.one(20, 0))
    b = tx.send_aux(21, peer, 0, AuxRow.one(21, 0))
    with pytest.raises(RuntimeError, match="staging slots are in flight"):
        tx.send_aux(22, peer, 0, AuxRow.one(22, 0))
    tx.wait([a, b], 5)
    tx.release([a, b])
    tx.release(tx.send_aux(22, peer, 0, AuxRow.one(22, 0)))  # a released slot is free again


def test_progress_callback_wakes_the_owner(pair):
    _, _, tx, rx, peer = pair
    woken = []
    rx.on_progress(lambda: woken.append(1))
    rx.expect(30, [1], 0)
    h = tx.send_kv(30, peer, [0], [1], 0, False)
    assert tx.wait(h, 5).done
    deadline = time.monotonic() + 5
    while not woken and time.monotonic() < deadline:
        time.sleep(0.001)
    assert woken, "the progress thread drained a notification without calling back"
    tx.release(h)


def test_missing_nixl_gives_clear_error(monkeypatch):
    from tandem.transfer import nixl_backend

    monkeypatch.setattr(nixl_backend, "NIXL_IMPORT_ERROR", "ModuleNotFoundError: No module 'nixl'")
    with pytest.raises(RuntimeError, match="needs the 'nixl' Python package"):
        make_sender("nixl", make_buffers(), "x")
    assert "nixl package not importable" in available_backends()["nixl"]


def test_dead_decode_process_fails_the_transfer():
    shm = ShmDir()
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    p = ctx.Process(target=decode_process, args=(child, "nixl", 16, "float32", "decode-dies", shm.path),
                    daemon=True)
    p.start()
    tx = make_sender("nixl", make_buffers(num_pages=48, seed=11), "prefill-dies")
    try:
        assert conn.poll(60), "decode process did not start"
        peer = tx.add_peer(conn.recv())
        conn.send((103, [0], 0))
        assert conn.poll(15) and conn.recv() == "ready"
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        h = [tx.send_kv(103, peer, [0], [0], 0, True), tx.send_aux(103, peer, 0, AuxRow.one(103, 1))]
        status = tx.wait(h, 15)
        assert status.state is XferState.ERROR and status.reason
        tx.release(h)
    finally:
        tx.close()
        if p.is_alive():
            p.kill()
        p.join(5)
        shm.close()
