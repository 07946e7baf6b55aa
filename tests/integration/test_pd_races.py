"""PD races found under load, replayed deterministically: an in-process decode worker (its
engine loop, NIXL receiver and prefill client are the real ones) against a real prefill
process over NIXL. The interleavings that load produced by chance are forced here:

* prefill finishes the whole room (KV pages, aux row, notifications) before decode has
  even processed the BootstrapRoom message (decode's handler thread starved by the load);
* the first attempt fails after its transfer and decode retries, and the retry is
  activated before the engine loop steps again (a fast retry, e.g. a prefix-cache hit on
  prefill, while decode's loop is busy with a long step).
"""
from __future__ import annotations

import grpc
import pytest
from tandem.config import DecodeConfig
from tandem.engine.engine import EngineCore
from tandem.transfer import AuxRow, KvBuffers
from tandem.transfer.nixl_backend import NixlKvReceiver
from tandem.v1 import decode_pb2
from tandem.worker.decode import DecodeWorker
from tandem.worker.engine_loop import EngineLoop
from tandem.worker.errors import RequestFailed
from tandem.worker.prefill_client import PrefillSelector
from tandem.worker.process import engine_config_of, model_fingerprint

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


class ExpectsAfterPrefillFinished(NixlKvReceiver):
    """Decode learns its room only after prefill has written and reported all of it."""

    def __init__(self, *args, watched_prefill: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.watched_prefill = watched_prefill
        self.rooms_done_before = 0

    def expect(self, room, *args, **kwargs):
        wait_for(lambda: load(self.watched_prefill, "prefill").num_prefilled_reqs > self.rooms_done_before,
                 timeout=60, what="prefill to finish the room")
        super().expect(room, *args, **kwargs)


class FirstAuxRowMismatches(NixlKvReceiver):
    """The first room's aux row reads as another room's (what decode saw under load)."""

    mismatched = 0

    def aux_row(self, room):
        row = super().aux_row(room)
        if not self.mismatched:
            self.mismatched += 1
            return AuxRow(row.room + 1, row.first_token_id)
        return row


class DecodeSide:
    """One decode worker in this process; its engine loop starts when the test says so."""

    def __init__(self, prefill_address: str, receiver_type, prefill_retries: int = 1, **receiver_kwargs):
        self.config = DecodeConfig(model_path=MODEL, max_total_tokens=4096, chunked_prefill_size=256,
                                   disaggregation_mode="decode", prefill_addresses=[prefill_address],
                                   disaggregation_transfer_backend="nixl", prefill_retries=prefill_retries)
        self.engine = EngineCore(config=engine_config_of(self.config))
        self.loop = EngineLoop(self.engine, "decode")
        pool = self.engine.pool
        self.receiver = receiver_type(KvBuffers(pool.k_buffers, pool.v_buffers, pool.aux), "race-decode",
                                      model_fingerprint(MODEL, self.engine.dtype), **receiver_kwargs)
        self.selector = PrefillSelector([prefill_address], "round_robin", self.engine.page_size)
        self.worker = DecodeWorker(self.config, self.loop, "race-decode", self.receiver, self.selector)
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

    def close(self):
        self.loop.stop()
        self.selector.stop()
        self.receiver.close()


def test_room_written_before_decode_expects_it_succeeds_first_time(prefill):
    decode = DecodeSide(prefill.grpc_address, ExpectsAfterPrefillFinished, watched_prefill=prefill.grpc_address)
    try:
        decode.receiver.rooms_done_before = load(prefill.grpc_address, "prefill").num_prefilled_reqs
        decode.start_loop()
        remote = decode.generate("remote")
        assert decode.worker.counters.retries == 0, "the first attempt must not fail"
        assert remote == decode.local_reference()
    finally:
        decode.close()


def test_retry_after_aux_mismatch_returns_the_full_output(prefill):
    decode = DecodeSide(prefill.grpc_address, FirstAuxRowMismatches)
    try:
        # The loop steps for the first time only once the retry is active: whatever the first
        # attempt's abort left for the engine loop to deliver meets the retry's stream.
        remote = decode.generate("remote", on_cancel=lambda _cancel: decode.start_loop())
        assert decode.worker.counters.retries == 1
        assert len(remote) == 12
        assert remote == decode.local_reference()
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
