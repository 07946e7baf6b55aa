"""grpc backend and the shared room state machine (KVPoll, timeouts, bad input)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from tandem.transfer import (
    AuxRow,
    GrpcKvReceiver,
    GrpcKvSender,
    KVPoll,
    LayoutMismatchError,
    Registration,
    aux_row_from_done,
    done_from_aux_row,
    make_receiver,
    make_sender,
    pack_aux_row,
)
from tandem.v1 import prefill_pb2
from transfer_helpers import make_buffers, page_bytes


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


def test_state_progression(pair):
    pb, db, tx, rx = pair
    rx.bootstrap(7)
    assert rx.poll(7) is KVPoll.Bootstrapping
    rx.expect(7, [2, 3], aux_slot=0)
    assert rx.poll(7) is KVPoll.WaitingForInput
    h0 = tx.send_kv(7, "d", [0], [2], chunk_index=0, is_last=False)
    h1 = tx.send_kv(7, "d", [1], [3], chunk_index=1, is_last=True)
    for m in h0.messages:
        rx.receive(m)
    assert rx.poll(7) is KVPoll.Transferring
    for m in h1.messages:
        rx.receive(m)
    assert rx.poll(7) is KVPoll.Transferring  # aux missing
    rx.receive_aux(7, AuxRow(7, 11))
    assert rx.poll(7) is KVPoll.Success
    assert rx.aux_row(7).first_token_id == 11
    assert page_bytes(db, [2, 3]) == page_bytes(pb, [0, 1])
    rx.forget(7)
    assert 7 not in rx.rooms
    with pytest.raises(KeyError, match="unknown room 7"):
        rx.poll(7)


def test_bad_chunks_fail_room_and_write_nothing(pair):
    pb, db, tx, rx = pair
    rx.expect(1, [4, 5], aux_slot=1)
    before = page_bytes(db, range(16))
    good = tx.send_kv(1, "d", [0, 1], [4, 5], 0, True).messages[0]

    bad = prefill_pb2.KvChunk()
    bad.CopyFrom(good)
    bad.page_indices[:] = [4, 9]  # page 9 not allocated to room 1
    with pytest.raises(ValueError, match="decode page 9 is not allocated to this room"):
        rx.receive(bad)
    assert rx.poll(1) is KVPoll.Failed and "page 9" in rx.failure_reason(1)
    assert page_bytes(db, range(16)) == before
    # Later messages of a failed room are ignored, not written.
    assert rx.receive(good) is KVPoll.Failed
    assert page_bytes(db, range(16)) == before

    rx.expect(2, [6], aux_slot=2)
    short = tx.send_kv(2, "d", [0], [6], 0, True).messages[0]
    short.k = short.k[:-1]
    with pytest.raises(ValueError, match="expected"):
        rx.receive(short)
    rx.expect(3, [7], aux_slot=3)
    wrong_layer = tx.send_kv(3, "d", [0], [7], 0, True).messages[0]
    wrong_layer.layer = 99
    with pytest.raises(ValueError, match="layer 99 out of range for 3 layers"):
        rx.receive(wrong_layer)
    with pytest.raises(ValueError, match="unknown room 12345"):
        rx.receive(prefill_pb2.KvChunk(room=12345))
    assert page_bytes(db, range(16)) == before


def test_expect_validation(pair):
    _, _, _, rx = pair
    with pytest.raises(ValueError, match="decode page index 16 out of range for a pool of 16"):
        rx.expect(1, [0, 16], 0)
    with pytest.raises(ValueError, match="aux slot 8 out of range for 8 aux slots"):
        rx.expect(1, [0], 8)
    with pytest.raises(ValueError, match="duplicates"):
        rx.expect(2, [3, 3], 0)
    assert 2 not in rx.rooms
    rx.expect(4, [0], 0)
    with pytest.raises(ValueError, match="room 4 is already expected"):
        rx.expect(4, [1], 1)


def test_sender_validation(pair):
    _, _, tx, _ = pair
    with pytest.raises(ValueError, match="prefill page index 16 out of range"):
        tx.send_kv(1, "d", [16], [0])
    with pytest.raises(ValueError, match="decode page index 99 out of range"):
        tx.send_kv(1, "d", [0], [99])
    with pytest.raises(ValueError, match="2 prefill pages but 1 decode pages"):
        tx.send_kv(1, "d", [0, 1], [0])
    with pytest.raises(ValueError, match="unknown decode peer 'x'"):
        tx.send_kv(1, "x", [0], [0])
    with pytest.raises(ValueError, match="aux slot 8 out of range"):
        tx.send_aux(1, "d", 8, AuxRow(1, 0))
    with pytest.raises(ValueError, match="aux row is for room 2, not 1"):
        tx.send_aux(1, "d", 0, AuxRow(2, 0))


def test_add_peer_rejects_mismatch_and_wrong_backend():
    tx = GrpcKvSender(make_buffers(), "p", "model-a")
    other = GrpcKvReceiver(make_buffers(page_size=8), "d", "model-a")
    with pytest.raises(LayoutMismatchError, match="page_size"):
        tx.add_peer(other.registration())
    reg = GrpcKvReceiver(make_buffers(), "d2", "model-a").registration()
    reg.backend = "nixl"
    with pytest.raises(ValueError, match="uses transfer backend 'nixl'"):
        tx.add_peer(reg)
    assert tx.peers == []


def test_registration_roundtrip_through_proto():
    rx = make_receiver("grpc", make_buffers(), "decode-1", "fp")
    req = rx.registration().to_request("decode@127.0.0.1:1")
    back = Registration.from_request(prefill_pb2.RegisterDecodeRequest.FromString(
        req.SerializeToString()))
    assert back.agent_name == "decode-1" and back.backend == "grpc"
    assert back.layout == rx.layout and req.decode_id == "decode@127.0.0.1:1"
    with pytest.raises(ValueError, match="unknown transfer backend 'tcp'"):
        make_sender("tcp", make_buffers(), "p")


def test_timeouts_and_mark_failed():
    rx = GrpcKvReceiver(make_buffers(), "d", bootstrap_timeout_s=0.01, transfer_timeout_s=0.01)
    rx.bootstrap(1)
    rx.expect(2, [0], 0)
    time.sleep(0.03)
    assert rx.poll(1) is KVPoll.Failed and "bootstrap timed out" in rx.failure_reason(1)
    assert rx.poll(2) is KVPoll.Failed and "KV transfer timed out" in rx.failure_reason(2)
    rx2 = GrpcKvReceiver(make_buffers(), "d", bootstrap_timeout_s=None, transfer_timeout_s=None)
    rx2.expect(3, [0], 0)
    rx2.mark_failed(3, "prefill died")
    assert rx2.poll(3) is KVPoll.Failed and rx2.failure_reason(3) == "prefill died"
    with pytest.raises(ValueError, match="is Failed, not Success"):
        rx2.aux_row(3)
    rx2.forget(3)
    rx2.forget(3)  # idempotent
    assert rx2.rooms == {}


def test_expect_leaves_the_aux_slot_alone():
    # Prefill may have written the room's row before decode calls expect() (one round trip):
    # clearing a slot is the engine's job when it hands the slot out, never expect()'s.
    db = make_buffers()
    db.aux[2] = torch.frombuffer(bytearray(pack_aux_row(AuxRow(1, 42), 64)), dtype=torch.uint8)
    before = db.aux[2].clone()
    rx = GrpcKvReceiver(db, "d")
    rx.expect(1, [0], 2)
    assert torch.equal(db.aux[2], before)


def test_done_message_carries_aux_row():
    row = AuxRow(9, 17, -0.5, 3, [(1, -0.5), (2, -1.25)])
    done = done_from_aux_row(row, num_chunks=2, bytes_transferred=100)
    done = prefill_pb2.TransferDone.FromString(done.SerializeToString())
    assert done.num_chunks == 2
    assert aux_row_from_done(done) == row
    plain = aux_row_from_done(done_from_aux_row(AuxRow(9, 17)))
    assert plain.first_token_id == 17 and math.isnan(plain.first_token_logprob)


def test_empty_chunk_still_counts(pair):
    _, _, tx, rx = pair
    rx.expect(5, [1], 0)
    h0 = tx.send_kv(5, "d", [0], [1], 0, False)
    h1 = tx.send_kv(5, "d", [], [], 1, True)
    assert len(h1.messages) == 1 and h1.messages[0].is_last
    for m in [*h0.messages, *h1.messages]:
        rx.receive(m)
    rx.receive_aux(5, AuxRow(5, 1))
    assert rx.poll(5) is KVPoll.Success


def test_bfloat16_pages_survive_bytes(pair):
    pb = make_buffers(num_pages=4, page_size=2, dtype=torch.bfloat16, seed=4)
    pb.k[0][1].view(torch.int16).fill_(-1)  # NaN bit patterns must survive as bytes too
    db = make_buffers(num_pages=4, page_size=2, dtype=torch.bfloat16)
    tx, rx = GrpcKvSender(pb, "p"), GrpcKvReceiver(db, "d")
    tx.add_peer(rx.registration())
    rx.expect(1, [3, 0], 0)
    for m in tx.send_kv(1, "d", [1, 2], [3, 0]).messages:
        rx.receive(m)
    rx.receive_aux(1, AuxRow(1, 0))
    assert rx.poll(1) is KVPoll.Success
    assert page_bytes(db, [3, 0]) == page_bytes(pb, [1, 2])
    assert np.array_equal(db.k[0][3].view(torch.int16).numpy(), pb.k[0][1].view(torch.int16).numpy())
