"""The Prefill handshake against a real prefill process with a hand-driven decode side:
bad input gets INVALID_ARGUMENT / FAILED_PRECONDITION with a message, and nothing is
written outside the allocated pages."""
from __future__ import annotations

import json

import grpc
import pytest
import torch
from tandem.transfer import KvBuffers, KVPoll, make_receiver, new_room_id
from tandem.v1 import prefill_pb2, prefill_pb2_grpc
from tandem.worker.pd_proto import message_from_proto, registration_to_request
from tandem.worker.process import model_fingerprint

from tests.support.clients import pages_in_use, sampling
from tests.support.procs import REPO, start_service

MODEL = "models/tandem-demo-dense"
PAGE = 16


def decode_buffers(page_size: int = PAGE, num_pages: int = 64) -> KvBuffers:
    cfg = json.loads((REPO / MODEL / "config.json").read_text())
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    shape = (num_pages, page_size, kv_heads, head_dim)
    layers = cfg["num_hidden_layers"]
    return KvBuffers([torch.zeros(shape) for _ in range(layers)], [torch.zeros(shape) for _ in range(layers)],
                     torch.zeros((16, 64), dtype=torch.uint8))


@pytest.fixture(scope="module")
def prefill():
    svc = start_service("tandem.prefill", "--model-path", MODEL, "--max-total-tokens", "4096",
                        "--disaggregation-transfer-backend", "grpc")
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def stub(prefill):
    with grpc.insecure_channel(prefill.grpc_address) as ch:
        yield prefill_pb2_grpc.PrefillStub(ch)


FINGERPRINT = model_fingerprint(str(REPO / MODEL), torch.float32)


def registered_receiver(stub, decode_id: str):
    rx = make_receiver("grpc", decode_buffers(), name=decode_id, model_fingerprint=FINGERPRINT)
    stub.RegisterDecode(registration_to_request(rx.registration(), decode_id))
    return rx


def start_msg(decode_id: str, ids=tuple(range(5, 45)), room: int = 0):
    return prefill_pb2.PrefillClientMessage(start=prefill_pb2.PrefillStart(
        request_id="t", decode_id=decode_id, input_ids=list(ids), sampling=sampling(max_tokens=4), room=room))


def alloc_msg(room: int, pages, aux: int = 0):
    return prefill_pb2.PrefillClientMessage(allocation=prefill_pb2.PageAllocation(room=room, page_indices=pages,
                                                                                  aux_slot=aux))


class Conversation:
    """Drive one Prefill stream step by step."""

    def __init__(self, stub, first):
        import queue

        self.q = queue.Queue()
        self.q.put(first)
        self.responses = stub.Prefill(iter(self.q.get, None), timeout=30)

    def send(self, msg):
        self.q.put(msg)

    def recv(self):
        return next(self.responses)

    def close(self):
        self.q.put(None)


def expect_error(fn, code: grpc.StatusCode, fragment: str):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()


def test_other_model_is_refused(stub):
    rx = make_receiver("grpc", decode_buffers(), name="d-other", model_fingerprint="other-model:0:float32")
    expect_error(lambda: stub.RegisterDecode(registration_to_request(rx.registration(), "d-other")),
                 grpc.StatusCode.FAILED_PRECONDITION, "model_fingerprint")


def test_layout_mismatch_is_refused(stub):
    rx = make_receiver("grpc", decode_buffers(page_size=8), name="d-mismatch", model_fingerprint=FINGERPRINT)
    expect_error(lambda: stub.RegisterDecode(registration_to_request(rx.registration(), "d-mismatch")),
                 grpc.StatusCode.FAILED_PRECONDITION, "page_size")


def test_unregistered_decode_is_refused(stub):
    # Decode writes its allocation right behind the start; a refused start ends the stream once it was read.
    conv = Conversation(stub, start_msg("nobody"))
    conv.send(alloc_msg(0, [0, 1, 2]))
    expect_error(conv.recv, grpc.StatusCode.FAILED_PRECONDITION, "not registered")


def test_first_message_must_be_start(stub):
    conv = Conversation(stub, alloc_msg(1, [0, 1, 2]))
    expect_error(conv.recv, grpc.StatusCode.INVALID_ARGUMENT, "first message must be 'start'")


def test_empty_prompt_is_refused(stub):
    registered_receiver(stub, "d-empty")
    conv = Conversation(stub, start_msg("d-empty", ids=()))
    conv.send(alloc_msg(0, [0]))
    expect_error(conv.recv, grpc.StatusCode.INVALID_ARGUMENT, "empty prompt")


@pytest.mark.parametrize("bad,fragment", [
    ("room", "this stream's room"),
    ("range", "out of range"),
    ("count", "the prompt needs"),
    ("aux", "aux slot"),
])
def test_bad_allocation_is_refused_and_nothing_written(stub, prefill, bad, fragment):
    rx = registered_receiver(stub, f"d-{bad}")
    room = new_room_id()
    conv = Conversation(stub, start_msg(f"d-{bad}", room=room))
    pages = list(range(3))  # 40 tokens in pages of 16
    msg = {
        "room": alloc_msg(room + 1, pages),
        "range": alloc_msg(room, pages[:-1] + [10_000]),
        "count": alloc_msg(room, pages[:-1]),
        "aux": alloc_msg(room, pages, aux=999),
    }[bad]
    conv.send(msg)
    expect_error(conv.recv, grpc.StatusCode.INVALID_ARGUMENT, fragment)
    assert all(float(t.abs().sum()) == 0.0 for t in rx.buffers.k + rx.buffers.v)
    assert pages_in_use(prefill.grpc_address, "prefill") == 0


def test_good_handshake_fills_exactly_the_allocated_pages(stub, prefill):
    rx = registered_receiver(stub, "d-good")
    room = new_room_id()
    pages = [7, 3, 20]
    rx.expect(room, pages, 5)
    conv = Conversation(stub, start_msg("d-good", room=room))
    conv.send(alloc_msg(room, pages, aux=5))
    confirmed = conv.recv().room
    assert (confirmed.room, confirmed.num_pages) == (room, len(pages))
    while rx.poll(room) not in (KVPoll.Success, KVPoll.Failed):
        rx.handle(message_from_proto(conv.recv()))
    assert rx.poll(room) is KVPoll.Success, rx.failure(room)
    conv.close()
    written = {p for p in range(rx.buffers.num_pages) if float(rx.buffers.k[0][p].abs().sum()) > 0}
    assert written == set(pages)
    assert pages_in_use(prefill.grpc_address, "prefill") == 0


def test_a_cancelled_room_is_quiet_before_the_answer_and_never_starts(stub, prefill):
    rx = registered_receiver(stub, "d-cancel")
    room = new_room_id()
    # Cancelled before its start arrives: prefill remembers it and refuses the start.
    assert not stub.CancelRoom(prefill_pb2.PrefillCancel(room=room, reason="test"), timeout=10).found
    conv = Conversation(stub, start_msg("d-cancel", room=room))
    conv.send(alloc_msg(room, [0, 1, 2]))
    expect_error(conv.recv, grpc.StatusCode.CANCELLED, f"room {room} was cancelled")
    # Cancelled while live: the answer comes once nothing is in flight, the stream ends failed.
    room = new_room_id()
    rx.expect(room, [4, 5, 6], 1)
    conv = Conversation(stub, start_msg("d-cancel", ids=range(5, 45), room=room))
    conv.send(alloc_msg(room, [4, 5, 6], aux=1))
    assert conv.recv().room.room == room
    stub.CancelRoom(prefill_pb2.PrefillCancel(room=room, reason="test"), timeout=30)
    msgs = []
    for m in conv.responses:
        msgs.append(m)
    assert msgs and msgs[-1].WhichOneof("msg") in ("failed", "done")
    if msgs[-1].WhichOneof("msg") == "failed":
        assert msgs[-1].failed.reason == prefill_pb2.TRANSFER_FAILURE_REASON_CANCELLED
    assert pages_in_use(prefill.grpc_address, "prefill") == 0
