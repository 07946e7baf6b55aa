"""grpc backend (pages as bytes in KvPages messages) and the room table every backend shares
(KVPoll, timeouts, typed failures, bad input). The suite every backend runs is
backend_suite.py."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from tandem.transfer import (
    AuxRow,
    FailureReason,
    GrpcKvReceiver,
    GrpcKvSender,
    KvPages,
    KVPoll,
    TransferDone,
)
from transfer_helpers import deliver, make_buffers, page_bytes


@pytest.fixture
def pair():
    pb = make_buffers(num_pages=16, page_size=4, seed=3)
    db = make_buffers(num_pages=16, page_size=4)
    tx = GrpcKvSender(pb, "p", "m")
    rx = GrpcKvReceiver(db, "d", "m")
    tx.add_peer(rx.registration())
    return pb, db, tx, rx


def test_kvpoll_numbers_match_sglang():
    assert [int(s) for s in (KVPoll.Failed, KVPoll.Bootstrapping, KVPoll.WaitingForInput,
                             KVPoll.Transferring, KVPoll.Success)] == [0, 1, 2, 3, 4]


def test_bad_pages_fail_the_room_and_write_nothing(pair):
    pb, db, tx, rx = pair
    rx.expect(1, [4, 5], aux_slot=1)
    before = page_bytes(db, range(16))
    good = tx.send_kv(1, "d", [0, 1], [4, 5], 0, True).messages[0]

    bad = KvPages(good.room, good.chunk_index, (4, 9), good.is_last, good.layer, good.k, good.v)
    with pytest.raises(ValueError, match="decode page 9 is not allocated to this room"):
        rx.handle(bad)  # page 9 not allocated to room 1
    assert rx.poll(1) is KVPoll.Failed and "page 9" in rx.failure(1).message
    assert rx.failure(1).reason is FailureReason.PROTOCOL
    assert page_bytes(db, range(16)) == before
    # Later messages of a failed room are ignored, not written.
    assert rx.handle(good) is KVPoll.Failed
    assert page_bytes(db, range(16)) == before

    rx.expect(2, [6], aux_slot=2)
    short = tx.send_kv(2, "d", [0], [6], 0, True).messages[0]
    with pytest.raises(ValueError, match="expected"):
        rx.handle(KvPages(short.room, 0, short.dst_pages, True, short.layer, short.k[:-1], short.v))
    rx.expect(3, [7], aux_slot=3)
    one = tx.send_kv(3, "d", [0], [7], 0, True).messages[0]
    with pytest.raises(ValueError, match="layer 99 out of range for 3 layers"):
        rx.handle(KvPages(3, 0, one.dst_pages, True, 99, one.k, one.v))
    rx.expect(4, [8], aux_slot=4)
    with pytest.raises(ValueError, match="carries no page bytes"):
        rx.handle(KvPages(4, 0, (8,), True))  # a notice: this backend sends bytes
    with pytest.raises(ValueError, match="unknown room 12345"):
        rx.handle(KvPages(12345, 0, ()))
    assert page_bytes(db, range(16)) == before


def test_pages_before_the_allocation_fail_the_room(pair):
    _, _, tx, rx = pair
    rx.bootstrap(5)
    m = tx.send_kv(5, "d", [0], [1], 0, True).messages[0]
    with pytest.raises(ValueError, match="before the page allocation"):
        rx.handle(m)
    assert rx.poll(5) is KVPoll.Failed


def test_large_chunks_split_into_bounded_messages():
    pb = make_buffers(num_pages=48, page_size=16, seed=1)
    db = make_buffers(num_pages=64, page_size=16)
    tx, rx = GrpcKvSender(pb, "p", max_message_bytes=3 * 2 * 1024), GrpcKvReceiver(db, "d")
    tx.add_peer(rx.registration())
    bpp = pb.bytes_per_page  # 16 * 2 * 8 * 4 = 1024
    src, dst = np.arange(10), np.arange(20, 30)
    h = tx.send_kv(5, "d", src, dst, 0, True)
    assert all(len(m.k) + len(m.v) <= 3 * 2 * bpp for m in h.messages)
    assert len(h.messages) == pb.num_layers * 4  # ceil(10 / 3) per layer
    assert [m.is_last for m in h.messages].count(True) == 1 and h.messages[-1].is_last
    assert h.nbytes == 2 * pb.num_layers * 10 * bpp
    rx.expect(5, dst, 0)
    a = tx.send_aux(5, "d", 0, AuxRow.one(5, 1))
    deliver(rx, [h, a])
    rx.handle(tx.done(5, [h, a]))
    assert rx.poll(5) is KVPoll.Success
    assert page_bytes(db, dst) == page_bytes(pb, src)


def test_room_incomplete_until_every_layer_arrived(pair):
    pb, db, tx, rx = pair
    rx.expect(6, [2], 0)
    h = tx.send_kv(6, "d", [0], [2], 0, True)
    a = tx.send_aux(6, "d", 0, AuxRow.one(6, 1))
    deliver(rx, [a])
    for m in h.messages[1:]:  # layer 0 never arrives
        rx.handle(m)
    rx.handle(tx.done(6, [h, a]))
    assert rx.poll(6) is KVPoll.Transferring
    rx.handle(h.messages[0])
    assert rx.poll(6) is KVPoll.Success


def test_timeouts_are_typed_and_fail_once():
    rx = GrpcKvReceiver(make_buffers(), "d", bootstrap_timeout_s=0.01, waiting_timeout_s=0.01)
    rx.bootstrap(1)
    rx.expect(2, [0], 0)
    time.sleep(0.03)
    states = rx.poll_all()
    assert states == {1: KVPoll.Failed, 2: KVPoll.Failed}
    assert rx.failure(1).reason is FailureReason.TIMEOUT and "bootstrap timed out" in rx.failure(1).message
    assert rx.failure(2).reason is FailureReason.TIMEOUT and "waiting for KV timed out" in rx.failure(2).message
    rx2 = GrpcKvReceiver(make_buffers(), "d", bootstrap_timeout_s=None, transfer_timeout_s=None,
                         waiting_timeout_s=None)
    rx2.expect(3, [0], 0)
    rx2.fail(3, FailureReason.BACKEND_ERROR, "prefill died")
    rx2.fail(3, FailureReason.TIMEOUT, "later")  # the first failure stays
    assert rx2.poll(3) is KVPoll.Failed and rx2.failure(3).message == "prefill died"
    rx2.forget(3)
    rx2.forget(3)  # idempotent
    assert rx2.rooms == {}


def test_success_is_final(pair):
    _, _, tx, rx = pair
    rx.expect(7, [1], 0)
    h = [tx.send_kv(7, "d", [0], [1], 0, True), tx.send_aux(7, "d", 0, AuxRow.one(7, 3))]
    deliver(rx, h)
    rx.handle(tx.done(7, h))
    assert rx.poll(7) is KVPoll.Success
    rx.handle(TransferDone(7, 5))  # a stray late message cannot undo it
    assert rx.poll(7) is KVPoll.Success and rx.failure(7) is None


def test_bfloat16_pages_survive_bytes():
    pb = make_buffers(num_pages=4, page_size=2, dtype=torch.bfloat16, seed=4)
    pb.k[0][1].view(torch.int16).fill_(-1)  # NaN bit patterns must survive as bytes too
    db = make_buffers(num_pages=4, page_size=2, dtype=torch.bfloat16)
    tx, rx = GrpcKvSender(pb, "p"), GrpcKvReceiver(db, "d")
    tx.add_peer(rx.registration())
    rx.expect(1, [3, 0], 0)
    h = [tx.send_kv(1, "d", [1, 2], [3, 0]), tx.send_aux(1, "d", 0, AuxRow.one(1, 0))]
    deliver(rx, h)
    rx.handle(tx.done(1, h))
    assert rx.poll(1) is KVPoll.Success
    assert page_bytes(db, [3, 0]) == page_bytes(pb, [1, 2])
    assert np.array_equal(db.k[0][3].view(torch.int16).numpy(), pb.k[0][1].view(torch.int16).numpy())


def test_each_state_has_its_own_timeout():
    """Bootstrapping -> bootstrap timeout; WaitingForInput (allocated, nothing arrived) -> waiting
    timeout; Transferring -> transfer timeout counted from the first data, not from the allocation."""
    pb = make_buffers(num_pages=16, page_size=4, seed=3)
    tx = GrpcKvSender(pb, "p", "m")
    rx = GrpcKvReceiver(make_buffers(num_pages=16, page_size=4), "d", "m", bootstrap_timeout_s=30,
                        waiting_timeout_s=0.05, transfer_timeout_s=1.0)
    tx.add_peer(rx.registration())
    rx.bootstrap(1)
    rx.expect(1, [0], 0)  # waits, nothing comes
    rx.bootstrap(2)
    rx.expect(2, [1], 1)
    rx.bootstrap(3)  # never allocated: the 30 s bootstrap timeout is far
    time.sleep(0.03)
    deliver(rx, [tx.send_aux(2, "d", 1, AuxRow.one(2, 1))])  # room 2's first data, within its wait
    assert rx.poll(2) is KVPoll.Transferring
    time.sleep(0.05)
    states = rx.poll_all()
    assert states == {1: KVPoll.Failed, 2: KVPoll.Transferring, 3: KVPoll.Bootstrapping}, states
    assert rx.failure(1).reason is FailureReason.TIMEOUT and "waiting for KV timed out" in rx.failure(1).message
    time.sleep(1.0)
    assert rx.poll(2) is KVPoll.Failed and "KV transfer timed out" in rx.failure(2).message
    assert rx.poll(3) is KVPoll.Bootstrapping
