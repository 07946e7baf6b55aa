"""The transfer test suite every backend runs: a test module subclasses :class:`BackendSuite`
and sets ``backend`` (test_backend_suite.py: grpc and the shm test backend; test_nixl_backend.py:
nixl). Rooms go through the backend exactly as the workers drive it: ``expect``, the sender's
handles, their messages carried to ``handle``, ``done``, polling."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import time

import numpy as np
import pytest
import torch
from tandem.transfer import (
    AuxRow,
    FailureReason,
    KVPoll,
    LayoutMismatchError,
    SampleToken,
    TransferDone,
    TransferFailure,
    make_receiver,
    make_sender,
    new_room_id,
    pack_aux_row,
)
from transfer_helpers import (
    ShmDir,
    decode_process,
    deliver,
    make_buffers,
    page_bytes,
    random_page_map,
    run_room,
    send_room,
    use_shm_backend,
)

_names = itertools.count()


def wait_for_state(rx, room, state, timeout_s=10.0) -> KVPoll:
    """Poll until ``room`` is in ``state`` (notifications of out-of-band backends take a moment)."""
    deadline = time.monotonic() + timeout_s
    while (got := rx.poll(room)) is not state and time.monotonic() < deadline:
        time.sleep(0.001)
    return got


class BackendSuite:
    backend = ""

    @pytest.fixture
    def shm(self):
        use_shm_backend()
        d = ShmDir()
        yield d
        d.close()

    @pytest.fixture
    def make_pair(self, shm):
        made = []

        def make(page_size=4, num_pages=16, dtype=torch.float32, **sender_kwargs):
            i = next(_names)
            pb = make_buffers(num_pages=num_pages, page_size=page_size, dtype=dtype, seed=3 + i, shm=shm)
            db = make_buffers(num_pages=num_pages + 16, page_size=page_size, dtype=dtype, shm=shm)
            rx = make_receiver(self.backend, db, f"d-{self.backend}-{i}", "m", transfer_timeout_s=None)
            tx = make_sender(self.backend, pb, f"p-{self.backend}-{i}", "m", **sender_kwargs)
            tx.add_peer(rx.registration())
            made.append((tx, rx))
            return pb, db, tx, rx

        yield make
        for tx, rx in made:
            tx.close()
            rx.close()

    @pytest.mark.parametrize("page_size", [1, 16])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
    def test_decode_pages_equal_prefill_pages(self, make_pair, page_size, dtype):
        """Pages arrive byte for byte (FP8 pages as their bytes: --kv-cache-dtype fp8_e4m3)."""
        pb, db, tx, rx = make_pair(page_size, num_pages=48, dtype=dtype)
        assert rx.registration().layout.dtype == str(dtype).removeprefix("torch.")
        rng = np.random.default_rng(page_size * 7 + (dtype == torch.bfloat16))
        for n, chunks in ((1, 1), (13, 3), (40, 4)):
            src, dst = random_page_map(rng, n, pb.num_pages, db.num_pages)
            before = page_bytes(db, np.setdiff1d(np.arange(db.num_pages), dst))
            state, got, row = run_room(tx, rx, src, dst, num_chunks=chunks)
            assert state is KVPoll.Success
            assert page_bytes(db, dst) == page_bytes(pb, src)
            # Pages outside the map are untouched.
            assert page_bytes(db, np.setdiff1d(np.arange(db.num_pages), dst)) == before
            assert got == row
            for t in [*db.k, *db.v]:
                t.zero_()

    def test_state_progression_needs_every_chunk_the_aux_row_and_done(self, make_pair):
        pb, db, tx, rx = make_pair()
        room = new_room_id()
        rx.bootstrap(room)
        assert rx.poll(room) is KVPoll.Bootstrapping
        rx.expect(room, [2, 3, 9], aux_slot=0)
        assert rx.poll(room) is KVPoll.WaitingForInput
        peer = tx.peers[0]
        h = [tx.send_kv(room, peer, [1], [3], chunk_index=1, is_last=False)]  # out of order
        deliver(rx, h)
        assert tx.wait(h, 10).done  # the sender polls its handles (UCX progresses there too)
        assert wait_for_state(rx, room, KVPoll.Transferring) is KVPoll.Transferring
        h += [tx.send_kv(room, peer, [5], [9], chunk_index=2, is_last=True),
              tx.send_aux(room, peer, 0, AuxRow.one(room, 11))]
        deliver(rx, h[1:])
        assert tx.wait(h, 10).done
        rx.handle(TransferDone(room, 3, 0))
        assert rx.poll(room) is KVPoll.Transferring  # chunk 0 is missing
        h.append(tx.send_kv(room, peer, [0], [2], chunk_index=0, is_last=False))
        deliver(rx, h[-1:])
        assert tx.wait(h, 10).done
        assert wait_for_state(rx, room, KVPoll.Success) is KVPoll.Success
        assert rx.aux_row(room).first_token_id == 11
        assert page_bytes(db, [2, 3, 9]) == page_bytes(pb, [0, 1, 5])
        tx.release(h)
        rx.forget(room)
        assert room not in rx.rooms
        with pytest.raises(KeyError, match=f"unknown room {room}"):
            rx.poll(room)

    def test_room_waits_for_the_senders_done(self, make_pair):
        pb, db, tx, rx = make_pair()
        room = new_room_id()
        rx.expect(room, [4, 5], 1)
        handles, done, _ = send_room(tx, room, np.array([0, 1]), np.array([4, 5]), aux_slot=1)
        deliver(rx, handles)
        # Everything arrived but the sender's last word: no Success yet, however long we wait.
        assert rx.wait(room, 0.2) is not KVPoll.Success
        rx.handle(done)
        assert wait_for_state(rx, room, KVPoll.Success) is KVPoll.Success
        tx.release(handles)

    def test_done_disagreeing_with_the_chunks_fails_the_room(self, make_pair):
        pb, db, tx, rx = make_pair()
        room = new_room_id()
        rx.expect(room, [4, 5], 1)
        handles, done, _ = send_room(tx, room, np.array([0, 1]), np.array([4, 5]), num_chunks=2, aux_slot=1)
        deliver(rx, handles)
        rx.handle(TransferDone(room, done.num_chunks + 1, done.bytes_transferred))
        assert wait_for_state(rx, room, KVPoll.Failed) is KVPoll.Failed
        failure = rx.failure(room)
        assert failure.reason is FailureReason.PROTOCOL and "reports 3 chunks" in failure.message
        tx.release(handles)

    def test_empty_chunk_still_counts(self, make_pair):
        pb, db, tx, rx = make_pair()
        room = new_room_id()
        rx.expect(room, [1], 0)
        peer = tx.peers[0]
        h = [tx.send_kv(room, peer, [0], [1], 0, False), tx.send_kv(room, peer, [], [], 1, True),
             tx.send_aux(room, peer, 0, AuxRow.one(room, 1))]
        deliver(rx, h)
        assert tx.wait(h, 10).done
        rx.handle(tx.done(room, h))
        assert wait_for_state(rx, room, KVPoll.Success) is KVPoll.Success
        tx.release(h)

    def test_reported_failure_is_typed(self, make_pair):
        _, _, _, rx = make_pair()
        room = new_room_id()
        rx.expect(room, [0], 0)
        rx.handle(TransferFailure(room, FailureReason.PREFILL_FAILED, "prefill out of memory"))
        assert rx.poll(room) is KVPoll.Failed
        assert rx.failure(room) == TransferFailure(room, FailureReason.PREFILL_FAILED, "prefill out of memory")
        with pytest.raises(ValueError, match="is Failed, not Success"):
            rx.aux_row(room)

    def test_forgotten_room_ignores_late_messages(self, make_pair):
        pb, db, tx, rx = make_pair()
        room = new_room_id()
        rx.expect(room, [3], 0)
        rx.forget(room)
        handles, done, _ = send_room(tx, room, np.array([0]), np.array([3]), num_chunks=1, aux_slot=0)
        for m in [*[m for h in handles for m in h.messages], done]:
            assert rx.handle(m) is KVPoll.Failed  # dropped, not an error
        rx.poll_all()
        assert rx.rooms == {}
        tx.release(handles)

    def test_expect_leaves_the_aux_slot_alone(self, make_pair):
        # Prefill may have written the room's row before decode calls expect(): clearing a slot
        # is the engine's job when it hands the slot out, never expect()'s.
        _, db, _, rx = make_pair()
        db.aux[2] = torch.frombuffer(bytearray(pack_aux_row(AuxRow.one(1, 42), 64)), dtype=torch.uint8)
        before = db.aux[2].clone()
        rx.expect(1, [0], 2)
        assert torch.equal(db.aux[2], before)

    def test_aux_row_of_parallel_samples(self, make_pair):
        pb, db, tx, rx = make_pair()
        room = new_room_id()
        row = AuxRow(room, [SampleToken(100 + i, -0.25 * i) for i in range(4)], cached_tokens=8)
        rx.expect(room, [7, 8], 3)
        handles, done, _ = send_room(tx, room, np.array([0, 1]), np.array([7, 8]), num_chunks=1, aux_slot=3,
                                     row=row)
        deliver(rx, handles)
        rx.handle(done)
        assert wait_for_state(rx, room, KVPoll.Success) is KVPoll.Success
        assert rx.aux_row(room) == row
        tx.release(handles)

    def test_expect_validation(self, make_pair):
        _, db, _, rx = make_pair()
        with pytest.raises(ValueError, match=f"decode page index {db.num_pages} out of range"):
            rx.expect(1, [0, db.num_pages], 0)
        with pytest.raises(ValueError, match="aux slot 8 out of range for 8 aux slots"):
            rx.expect(1, [0], 8)
        with pytest.raises(ValueError, match="duplicates"):
            rx.expect(2, [3, 3], 0)
        assert 2 not in rx.rooms
        rx.expect(4, [0], 0)
        with pytest.raises(ValueError, match="room 4 is already expected"):
            rx.expect(4, [1], 1)
        with pytest.raises(ValueError, match="unknown room 12345"):
            rx.handle(TransferDone(12345, 1))

    def test_sender_validation(self, make_pair):
        pb, db, tx, _ = make_pair()
        peer = tx.peers[0]
        with pytest.raises(ValueError, match=f"prefill page index {pb.num_pages} out of range"):
            tx.send_kv(1, peer, [pb.num_pages], [0])
        with pytest.raises(ValueError, match="decode page index 99 out of range"):
            tx.send_kv(1, peer, [0], [99])
        with pytest.raises(ValueError, match="2 prefill pages but 1 decode pages"):
            tx.send_kv(1, peer, [0, 1], [0])
        with pytest.raises(ValueError, match="unknown decode peer 'x'"):
            tx.send_kv(1, "x", [0], [0])
        with pytest.raises(ValueError, match="aux slot 8 out of range"):
            tx.send_aux(1, peer, 8, AuxRow.one(1, 0))
        with pytest.raises(ValueError, match="aux row is for room 2, not 1"):
            tx.send_aux(1, peer, 0, AuxRow.one(2, 0))
        with pytest.raises(ValueError, match="allocation repeats a page index"):
            tx.check_allocation(peer, [1, 1], 0, num_pages=2)

    def test_add_peer_rejects_mismatch_and_wrong_backend(self, shm):
        i = next(_names)
        tx = make_sender(self.backend, make_buffers(shm=shm), f"p-mm-{i}", "model-a")
        other = make_receiver(self.backend, make_buffers(page_size=8, shm=shm), f"d-mm-{i}", "model-a")
        try:
            with pytest.raises(LayoutMismatchError, match="page_size"):
                tx.add_peer(other.registration())
            reg = other.registration()
            reg.backend = "some-other-backend"
            with pytest.raises(ValueError, match="uses transfer backend 'some-other-backend'"):
                tx.add_peer(reg)
            assert tx.peers == []
        finally:
            tx.close()
            other.close()

    @pytest.mark.parametrize("page_size, dtype", [(1, torch.bfloat16), (16, torch.float32), (16, torch.float8_e5m2)])
    def test_two_processes_pages_equal(self, shm, page_size, dtype):
        """The receiver in another process: only what the backend moves (and the messages the
        workers carry) gets there."""
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        name = f"decode-2p-{self.backend}-{page_size}-{next(_names)}"
        p = ctx.Process(target=decode_process, daemon=True,
                        args=(child, self.backend, page_size, str(dtype).removeprefix("torch."), name, shm.path))
        p.start()
        tx = None
        try:
            assert conn.poll(60), "decode process did not start"
            reg = conn.recv()
            pb = make_buffers(num_pages=48, page_size=page_size, dtype=dtype, seed=11, shm=shm)
            tx = make_sender(self.backend, pb, f"prefill-2p-{self.backend}-{page_size}-{next(_names)}")
            peer = tx.add_peer(reg)
            rng = np.random.default_rng(page_size)
            for n in (5, 30):
                room = new_room_id()
                src, dst = random_page_map(rng, n, pb.num_pages, 64)
                conn.send((room, dst.tolist(), 2))
                assert conn.poll(30) and conn.recv() == "ready"
                row = AuxRow.one(room, 77, -0.5)
                handles, done, _ = send_room(tx, room, src, dst, num_chunks=2, aux_slot=2, row=row, peer=peer)
                for m in [*[m for h in handles for m in h.messages], done]:
                    conn.send(m)
                conn.send(None)
                tx.release(handles)
                assert conn.poll(30)
                state, got, back, failure = conn.recv()
                assert state == KVPoll.Success, failure
                assert got == page_bytes(pb, src)
                assert back == row
            conn.send(None)
        finally:
            if tx is not None:
                tx.close()
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
