"""Fuzzing every proto request through the real servicers (hypothesis): a decode worker's
Generate, and a prefill worker's RegisterDecode, CancelRoom and Prefill streams with bad rooms,
pages and aux slots, driven by a hand-made decode side. Valid requests succeed; one definite
violation gets a non-OK status (never INTERNAL / UNKNOWN, which mean a crash path); random
messages never crash a server; afterwards no page is in use on either worker and a valid
request still succeeds."""
from __future__ import annotations

import math
import queue

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tandem.transfer import KVPoll, make_receiver, new_room_id
from tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tandem.worker.pd_proto import message_from_proto, registration_to_request

from tests.integration.test_prefill_handshake import FINGERPRINT, MODEL, PAGE, decode_buffers
from tests.support.clients import pages_in_use
from tests.support.procs import start_service
from tests.support.waiting import wait_for

VOCAB = 8192
CONTEXT = 2048
DECODE_PAGES, AUX_ROWS = 64, 16  # decode_buffers(): the hand-made decode side's pool
CRASH = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def workers():
    common = ["--model-path", MODEL, "--max-total-tokens", "4096", "--skip-warmup", "--page-size", str(PAGE)]
    decode = start_service("tandem.decode", *common)
    prefill = start_service("tandem.prefill", *common, "--disaggregation-transfer-backend", "grpc")
    dch, pch = grpc.insecure_channel(decode.grpc_address), grpc.insecure_channel(prefill.grpc_address)
    rx = make_receiver("grpc", decode_buffers(PAGE, DECODE_PAGES), name="fuzz-decode", model_fingerprint=FINGERPRINT)
    pstub = prefill_pb2_grpc.PrefillStub(pch)
    pstub.RegisterDecode(registration_to_request(rx.registration(), "fuzz-decode"), timeout=30)
    yield decode_pb2_grpc.DecodeStub(dch), pstub, rx, decode, prefill
    dch.close()
    pch.close()
    for svc in (decode, prefill):
        svc.stop()


ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
int32 = st.integers(-(2 ** 31), 2 ** 31 - 1)


@st.composite
def valid_sampling(draw):
    return common_pb2.SamplingParams(
        max_tokens=draw(st.integers(1, 4)), temperature=draw(st.floats(0, 2, width=32)),
        top_p=draw(st.floats(0.0625, 1, width=32)), top_k=draw(st.integers(-1, 40)), min_p=draw(st.floats(0, 1, width=32)),
        seed=draw(st.integers(0, 2 ** 64 - 1)), stop=draw(st.lists(st.text(min_size=1, max_size=4), max_size=2)),
        stop_token_ids=draw(st.lists(st.integers(0, VOCAB - 1), max_size=2)), ignore_eos=draw(st.booleans()),
        logprobs=draw(st.booleans()), top_logprobs=draw(st.integers(0, 5)),
        presence_penalty=draw(st.floats(-2, 2, width=32)), frequency_penalty=draw(st.floats(-2, 2, width=32)),
        repetition_penalty=draw(st.floats(0.5, 2, width=32)),
        logit_bias=draw(st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100, width=32), max_size=3)))


# One definite violation each, applied to a valid request (field, value) or (None, input ids).
VIOLATIONS = st.one_of(
    st.tuples(st.just("max_tokens"), st.integers(-(2 ** 31), 0)),  # a large one is cut at the context: valid
    st.tuples(st.just("temperature"), st.one_of(st.floats(max_value=-0.0625, width=32), st.just(math.nan))),
    st.tuples(st.just("top_p"), st.floats(min_value=1.0625, width=32)),
    st.tuples(st.just("min_p"), st.floats(min_value=1.0625, width=32)),
    st.tuples(st.just("top_logprobs"), st.integers(21, 2 ** 31 - 1)),
    st.tuples(st.just("ids"), st.one_of(st.just([]), st.lists(st.integers(-(2 ** 31), -1), min_size=1, max_size=3),
                                        st.lists(st.integers(VOCAB, 2 ** 31 - 1), min_size=1, max_size=3),
                                        st.lists(st.integers(0, VOCAB - 1), min_size=CONTEXT, max_size=CONTEXT))),
    st.tuples(st.just("override"), st.text(min_size=1, max_size=8).filter(lambda s: s not in ("local",))),
)


def _run_generate(stub, req) -> tuple[grpc.StatusCode, list]:
    try:
        chunks = list(stub.Generate(req, timeout=60))
        return grpc.StatusCode.OK, chunks
    except grpc.RpcError as e:
        return e.code(), [e.details()]


@FUZZ
@given(prompt=ids, sp=valid_sampling())
def test_generate_valid_succeeds(workers, cases, prompt, sp):
    cases["proto"] += 1
    code, chunks = _run_generate(workers[0], decode_pb2.GenerateRequest(input_ids=prompt, sampling=sp))
    assert code == grpc.StatusCode.OK, (prompt, sp, chunks)
    assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


@settings(FUZZ, max_examples=300)
@given(prompt=ids, sp=valid_sampling(), violation=VIOLATIONS)
def test_generate_violation_is_refused(workers, cases, prompt, sp, violation):
    cases["proto"] += 1
    field, value = violation
    req = decode_pb2.GenerateRequest(input_ids=prompt, sampling=sp)
    if field == "ids":
        req.ClearField("input_ids")
        req.input_ids.extend(value)
    elif field == "override":
        req.prefill_override = value  # "remote" is refused too: this worker is aggregated
    else:
        setattr(req.sampling, field, value)
    code, detail = _run_generate(workers[0], req)
    assert code not in (grpc.StatusCode.OK, *CRASH), (field, value, code, detail)


@settings(FUZZ, max_examples=250)
@given(req=st.builds(decode_pb2.GenerateRequest, request_id=st.text(max_size=12),
                     input_ids=st.lists(int32, max_size=30),
                     sampling=st.builds(common_pb2.SamplingParams, temperature=floats, top_p=floats, top_k=int32,
                                        min_p=floats, max_tokens=st.integers(-5, 6), min_tokens=st.integers(-3, 8),
                                        top_logprobs=st.integers(-3, 25), presence_penalty=floats,
                                        frequency_penalty=floats, repetition_penalty=floats,
                                        stop=st.lists(st.text(max_size=4), max_size=3),
                                        stop_token_ids=st.lists(int32, max_size=3),
                                        logit_bias=st.dictionaries(int32, floats, max_size=3)),
                     prefill_override=st.sampled_from(["", "local", "remote", "x"])))
def test_generate_anything_never_crashes(workers, cases, req):
    cases["proto"] += 1
    code, detail = _run_generate(workers[0], req)
    assert code not in CRASH, (req, code, detail)


class Stream:
    """One Prefill stream, driven message by message."""

    def __init__(self, stub, first) -> None:
        self.q: queue.Queue = queue.Queue()
        self.q.put(first)
        self.responses = stub.Prefill(iter(self.q.get, None), timeout=60)

    def send(self, msg) -> None:
        self.q.put(msg)

    def drain(self, rx, room: int | None) -> tuple[grpc.StatusCode, list]:
        """Feed every answer to the receiver until the stream ends; (status, messages)."""
        seen = []
        try:
            for m in self.responses:
                seen.append(m.WhichOneof("msg"))
                if room is not None and m.WhichOneof("msg") != "room":
                    rx.handle(message_from_proto(m))
                if m.WhichOneof("msg") in ("done", "failed"):
                    self.q.put(None)
            return grpc.StatusCode.OK, seen
        except grpc.RpcError as e:
            return e.code(), [*seen, e.details()]
        finally:
            self.q.put(None)


def _start(decode_id: str, prompt, room: int) -> prefill_pb2.PrefillClientMessage:
    return prefill_pb2.PrefillClientMessage(start=prefill_pb2.PrefillStart(
        request_id="fuzz", decode_id=decode_id, input_ids=prompt, room=room,
        sampling=common_pb2.SamplingParams(max_tokens=2)))


def _alloc(room: int, pages, aux: int) -> prefill_pb2.PrefillClientMessage:
    return prefill_pb2.PrefillClientMessage(allocation=prefill_pb2.PageAllocation(room=room, page_indices=pages,
                                                                                  aux_slot=aux))


@st.composite
def handshake(draw):
    """(valid?, prompt, start room, allocation room, pages, aux slot, decode id)."""
    prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=48))
    need = math.ceil(len(prompt) / PAGE)
    pages = draw(st.lists(st.integers(0, DECODE_PAGES - 1), min_size=need, max_size=need, unique=True))
    aux = draw(st.integers(0, AUX_ROWS - 1))
    fault = draw(st.sampled_from([None, None, "room", "range", "negative", "count", "aux", "decode", "empty"]))
    alloc_room_offset, decode_id = 0, "fuzz-decode"
    if fault == "room":
        alloc_room_offset = draw(st.integers(1, 2 ** 20))
    elif fault == "range":
        pages[draw(st.integers(0, need - 1))] = draw(st.integers(DECODE_PAGES, 2 ** 31 - 1))
    elif fault == "negative":
        pages[draw(st.integers(0, need - 1))] = draw(st.integers(-(2 ** 31), -1))
    elif fault == "count":
        pages = pages[:-1] if draw(st.booleans()) else pages + [p for p in range(DECODE_PAGES) if p not in pages][:1]
    elif fault == "aux":
        aux = draw(st.one_of(st.integers(AUX_ROWS, 2 ** 31 - 1), st.integers(-(2 ** 31), -1)))
    elif fault == "decode":
        decode_id = draw(st.text(max_size=10).filter(lambda s: s != "fuzz-decode"))
    elif fault == "empty":
        prompt = []
    return fault is None, prompt, alloc_room_offset, pages, aux, decode_id


@settings(FUZZ, max_examples=250)
@given(case=handshake())
def test_prefill_handshakes(workers, cases, case):
    cases["proto"] += 1
    _dstub, pstub, rx, _decode, prefill = workers
    valid, prompt, offset, pages, aux, decode_id = case
    room = new_room_id()
    if valid:
        rx.expect(room, pages, aux)
    stream = Stream(pstub, _start(decode_id, prompt, room))
    stream.send(_alloc((room + offset) % 2 ** 64, pages, aux))
    code, seen = stream.drain(rx, room if valid else None)
    if valid:
        assert code == grpc.StatusCode.OK and seen[-1] == "done", (case, code, seen)
        assert rx.poll(room) is KVPoll.Success, rx.failure(room)
        rx.forget(room)
    else:
        assert code not in (grpc.StatusCode.OK, *CRASH) or seen[-1] == "failed", (case, code, seen)


message = st.one_of(
    st.builds(lambda d, p, r: _start(d, p, r), st.sampled_from(["fuzz-decode", "", "x"]),
              st.lists(int32, max_size=40), st.integers(0, 2 ** 64 - 1)),
    st.builds(lambda r, p, a: _alloc(r, p, a), st.integers(0, 2 ** 64 - 1), st.lists(int32, max_size=6), int32),
    st.just(prefill_pb2.PrefillClientMessage()),
)


@settings(FUZZ, max_examples=150)
@given(msgs=st.lists(message, min_size=1, max_size=4))
def test_prefill_random_streams_never_crash(workers, cases, msgs):
    cases["proto"] += 1
    stream = Stream(workers[1], msgs[0])
    for m in msgs[1:]:
        stream.send(m)
    stream.send(None)
    code, seen = stream.drain(workers[2], None)
    assert code not in CRASH, (msgs, code, seen)


@settings(FUZZ, max_examples=150)
@given(req=st.one_of(
    st.builds(prefill_pb2.RegisterDecodeRequest, decode_id=st.text(max_size=10), transfer_backend=st.text(max_size=6),
              agent_name=st.text(max_size=6), agent_metadata=st.binary(max_size=40),
              layout=st.builds(common_pb2.KvLayout)),
    st.builds(prefill_pb2.PrefillCancel, room=st.integers(0, 2 ** 64 - 1), reason=st.text(max_size=10))))
def test_prefill_unary_calls_never_crash(workers, cases, req):
    cases["proto"] += 1
    pstub = workers[1]
    call = pstub.RegisterDecode if isinstance(req, prefill_pb2.RegisterDecodeRequest) else pstub.CancelRoom
    if isinstance(req, prefill_pb2.RegisterDecodeRequest) and req.decode_id == "fuzz-decode":
        req.decode_id = "fuzz-other"  # keep the fuzzing decode's own registration
    try:
        call(req, timeout=30)
    except grpc.RpcError as e:
        assert e.code() not in CRASH, (req, e.code(), e.details())


def test_after_fuzzing_no_page_in_use_and_a_valid_request_succeeds(workers, cases):
    dstub, pstub, rx, decode, prefill = workers
    cases["proto"] += 1
    for svc, kind in ((decode, "decode"), (prefill, "prefill")):
        assert svc.proc.poll() is None, f"{kind} died"
        wait_for(lambda a=svc.grpc_address, k=kind: pages_in_use(a, k) == 0, timeout=30, what=f"{kind} pages free")
    code, chunks = _run_generate(dstub, decode_pb2.GenerateRequest(
        input_ids=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=2)))
    assert code == grpc.StatusCode.OK and len([t for c in chunks for t in c.token_ids]) == 2
    assert cases["proto"] >= 1000, cases
