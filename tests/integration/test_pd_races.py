"""PD races found under load, replayed deterministically: an in-process decode worker (its
engine loop, NIXL receiver and remote-prefill loop are the real ones) against a real
prefill process over NIXL. The interleavings that load produced by chance are forced here:

* prefill finishes the whole room (KV pages, aux row, notifications, done) while decode's
  transfer loop is starved and has not looked at the room once;
* the first attempt fails after its transfer and decode retries, and the first attempt's
  abort reaches the engine only after the retry is active (a fast retry, e.g. a
  prefix-cache hit on prefill, while decode's loop is busy with a long step).
"""
from __future__ import annotations

import threading

import grpc
import pytest
from tandem.config import DecodeConfig
from tandem.engine import EngineCore
from tandem.transfer import AuxRow, KvBuffers, KVPoll
from tandem.transfer.nixl_backend import NixlKvReceiver
from tandem.v1 import decode_pb2
from tandem.worker.decode import DecodeWorker
from tandem.worker.engine_loop import EngineLoop
from tandem.worker.errors import RequestFailed
from tandem.worker.process import engine_config_of, model_fingerprint
from tandem.worker.remote_prefill import RemotePrefill

from tests.support.clients import load, sampling
from tests.support.procs import REPO, start_service
from tests.support.waiting import wait_for

MODEL = str(REPO / "models" / "tandem-demo-dense")
ENGINE = ["--model-path", MODEL, "--max-total-tokens", "4096", "--chunked-prefill-size", "256",
          "--disaggregation-transfer-backend", "nixl"]
PROMPT = [(7 * i) % 400 + 10 for i in range(90)]


@pytest.fixture(scope="module")
def prefill():
    svc = start_service("tandem.prefill", *ENGINE)
    yield svc
    svc.stop()


class PollsAfterPrefillFinished(NixlKvReceiver):
    """Decode's transfer loop, starved: once prefill has the room, the loop's next poll waits
    until prefill has written, notified and reported all of it."""

    def __init__(self, *args, watched_prefill: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.watched_prefill = watched_prefill
        self.rooms_done_before = 0
        self.starved = 0

    def poll_all(self):
        if not self.starved and KVPoll.WaitingForInput in self.rooms.values():
            now = load(self.watched_prefill, "prefill")
            if now.num_inflight_transfers or now.num_prefilled_reqs > self.rooms_done_before:
                self.starved += 1
                wait_for(lambda: load(self.watched_prefill, "prefill").num_prefilled_reqs > self.rooms_done_before,
                         timeout=60, what="prefill to finish the room")
        return super().poll_all()


class FirstAuxRowMismatches(NixlKvReceiver):
    """The first room's aux row reads as another room's (what decode saw under load)."""

    mismatched = 0

    def aux_row(self, room):
        row = super().aux_row(room)
        if not self.mismatched:
            self.mismatched += 1
            return AuxRow(row.room + 1, row.samples, row.cached_tokens)
        return row


class LateAborts(EngineLoop):
    """Holds back the aborts of the first attempt (request id "race") until the retry is active."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held: list[str] = []
        self.released_after_activation = False
        self._lock = threading.Lock()

    def abort(self, rid, reason="abort"):
        with self._lock:
            if rid == "race" and not self.released_after_activation:
                self.held.append(rid)
                return self.call(lambda _engine: False)
        return super().abort(rid, reason)

    def activate_external(self, rid, *args):
        fut = super().activate_external(rid, *args)
        if rid != "race":
            fut.add_done_callback(lambda _fut: self._release())
        return fut

    def _release(self):
        with self._lock:
            held, self.held, self.released_after_activation = self.held, [], True
        for rid in held:
            super().abort(rid)


class DecodeSide:
    """One decode worker in this process; its engine loop starts when the test says so."""

    def __init__(self, prefill_address: str, receiver_type, prefill_retries: int = 1, loop_type=EngineLoop,
                 **receiver_kwargs):
        self.config = DecodeConfig(model_path=MODEL, max_total_tokens=4096, chunked_prefill_size=256,
                                   disaggregation_mode="decode", prefill_addresses=[prefill_address],
                                   disaggregation_transfer_backend="nixl", prefill_retries=prefill_retries)
        self.engine = EngineCore(config=engine_config_of(self.config))
        self.loop = loop_type(self.engine, "decode")
        pool = self.engine.pool
        self.receiver = receiver_type(KvBuffers(pool.k_buffers, pool.v_buffers, pool.aux), "race-decode",
                                      model_fingerprint(MODEL, self.engine.dtype), **receiver_kwargs)
        self.remote = RemotePrefill(self.config, self.loop, self.receiver, "race-decode")
        self.remote.start()
        self.worker = DecodeWorker(self.config, self.loop, "race-decode", self.remote)
        self.loop_started = False

    def start_loop(self) -> None:
        if not self.loop_started:
            self.loop_started = True
            self.loop.start()

    def generate(self, override: str, on_cancel=lambda _cancel: None) -> list[int]:
        request = decode_pb2.GenerateRequest(request_id="race", input_ids=PROMPT, prefill_override=override,
                                             sampling=sampling(max_tokens=12, ignore_eos=True))
        chunks = list(self.worker.generate(request, lambda: True, on_cancel))
        assert chunks and chunks[-1].finish_reason, chunks
        return [t for c in chunks for t in c.token_ids]

    def local_reference(self) -> list[int]:
        self.start_loop()
        return self.generate("local")

    def pages_in_use(self) -> int:
        s = self.loop.call(lambda engine: engine.stats()).result(10)
        return s.num_total_pages - s.num_free_pages - s.num_evictable_pages

    def close(self):
        self.remote.stop()
        self.loop.stop()
        self.receiver.close()


def test_room_finished_before_decode_looks_at_it_succeeds_first_time(prefill):
    decode = DecodeSide(prefill.grpc_address, PollsAfterPrefillFinished, watched_prefill=prefill.grpc_address)
    try:
        decode.receiver.rooms_done_before = load(prefill.grpc_address, "prefill").num_prefilled_reqs
        decode.start_loop()
        remote = decode.generate("remote")
        assert decode.receiver.starved == 1, "the transfer loop was never held back"
        assert decode.remote.counters.retries == 0, "the first attempt must not fail"
        assert remote == decode.local_reference()
    finally:
        decode.close()


def test_retry_after_aux_mismatch_returns_the_full_output(prefill):
    decode = DecodeSide(prefill.grpc_address, FirstAuxRowMismatches, loop_type=LateAborts)
    try:
        decode.start_loop()
        remote = decode.generate("remote")
        assert decode.remote.counters.retries == 1
        assert decode.loop.released_after_activation, "the first attempt's abort was not held back"
        assert len(remote) == 12
        assert remote == decode.local_reference()
        wait_for(lambda: decode.pages_in_use() == 0, timeout=20, what="decode pages freed")
    finally:
        decode.close()


def test_aux_mismatch_without_retries_left_is_an_error(prefill):
    decode = DecodeSide(prefill.grpc_address, FirstAuxRowMismatches, prefill_retries=0)
    try:
        decode.start_loop()
        with pytest.raises(RequestFailed, match="does not match room"):
            decode.generate("remote")
    finally:
        decode.close()


def test_an_abort_nobody_asked_for_is_an_error_not_an_empty_success(prefill):
    decode = DecodeSide(prefill.grpc_address, NixlKvReceiver)
    try:
        def abort_then_run(_cancel):
            decode.loop.abort("race")  # e.g. a stale abort meant for an earlier attempt
            decode.start_loop()

        with pytest.raises(RequestFailed, match="aborted before it finished") as failed:
            decode.generate("local", on_cancel=abort_then_run)
        assert failed.value.status == grpc.StatusCode.ABORTED
    finally:
        decode.close()
