"""A Prefill stream whose start this worker refuses ends only after the allocation decode wrote
right behind it was read: decode's second write never races the end of the stream (that race
turned the NOT_FOUND of a missing LoRA adapter into INTERNAL or UNKNOWN on decode)."""
from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest
from tandem.config import PrefillConfig
from tandem.engine import UnknownLoraError
from tandem.v1 import common_pb2, prefill_pb2
from tandem.worker.errors import RequestFailed
from tandem.worker.prefill import PrefillWorker


class RefusingLoop:
    """The engine-loop calls the Prefill stream makes before anything runs: it holds no adapter."""

    info = SimpleNamespace(page_size=4)
    lora_names: list = []

    def kv_snapshot(self):
        return []

    def subscribe_kv_events(self, fn) -> None:
        pass

    def validate(self, ids, sp, output_ids=(), lora_name=None) -> None:
        if lora_name is not None:
            raise UnknownLoraError(f"LoRA adapter {lora_name!r} is not loaded")
        if not ids:
            raise ValueError("input_ids: empty")


def _stream(start: prefill_pb2.PrefillStart, with_allocation: bool = True):
    """The messages decode writes, and the list of those the worker read."""
    read = []
    msgs = [prefill_pb2.PrefillClientMessage(start=start)]
    if with_allocation:
        msgs.append(prefill_pb2.PrefillClientMessage(allocation=prefill_pb2.PageAllocation(
            room=start.room, page_indices=[0, 1], aux_slot=0)))

    def requests():
        for m in msgs:
            read.append(m.WhichOneof("msg"))
            yield m
    return requests(), read


@pytest.fixture
def worker(tmp_path):
    return PrefillWorker(PrefillConfig(model_path=str(tmp_path)), RefusingLoop(), sender=None, worker_id="p0")


@pytest.mark.parametrize("start, code", [
    (prefill_pb2.PrefillStart(decode_id="d0", input_ids=[1, 2, 3, 4, 5], room=7, lora_name="c",
                              sampling=common_pb2.SamplingParams(max_tokens=1)), grpc.StatusCode.NOT_FOUND),
    (prefill_pb2.PrefillStart(decode_id="d0", input_ids=[], room=7,
                              sampling=common_pb2.SamplingParams(max_tokens=1)), grpc.StatusCode.INVALID_ARGUMENT),
    (prefill_pb2.PrefillStart(decode_id="unregistered", input_ids=[1, 2, 3], room=7,
                              sampling=common_pb2.SamplingParams(max_tokens=1)), grpc.StatusCode.FAILED_PRECONDITION),
])
def test_a_refused_start_is_answered_after_its_allocation_was_read(worker, start, code):
    requests, read = _stream(start)
    with pytest.raises(RequestFailed) as e:
        list(worker.prefill(requests, on_cancel=lambda fn: None))
    assert e.value.status == code
    assert read == ["start", "allocation"]  # nothing decode writes is left unread when the stream ends
    if code == grpc.StatusCode.NOT_FOUND:
        assert "prefill worker p0" in e.value.message and "'c'" in e.value.message


def test_a_refused_warmup_start_has_no_allocation_to_wait_for(worker):
    start = prefill_pb2.PrefillStart(input_ids=[1, 2, 3], warmup=True, lora_name="c",
                                     sampling=common_pb2.SamplingParams(max_tokens=1))
    requests, read = _stream(start, with_allocation=False)
    with pytest.raises(RequestFailed) as e:
        list(worker.prefill(requests, on_cancel=lambda fn: None))
    assert e.value.status == grpc.StatusCode.NOT_FOUND and read == ["start"]
