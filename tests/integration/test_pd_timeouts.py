"""Decode's room timeouts through a real decode process and a prefill that stalls: nothing arrives
after the allocation (waiting timeout), the first data arrives and then nothing more (transfer
timeout), or the pool stays full so a room never gets its pages (bootstrap timeout). Each ends the request with DEADLINE_EXCEEDED naming the timeout, frees
every page and aux slot, and the room went Bootstrapping -> WaitingForInput (-> Transferring)
-> Failed on the live path."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from tandem.transfer import AuxRow
from tandem.transfer.aux import pack_aux_row
from tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

from tests.support.clients import pages_in_use, sampling
from tests.support.procs import start_service
from tests.support.waiting import wait_for

MODEL = "models/tandem-demo-dense"


class StallingPrefill(prefill_pb2_grpc.PrefillServicer):
    """Registers decode, confirms each room, then (mode "silent") sends nothing or (mode
    "partial") sends the aux row only, and never finishes."""

    def __init__(self) -> None:
        self.mode = "silent"
        self.layout = None
        self.rooms: list[int] = []
        self.cancelled: list[int] = []

    def RegisterDecode(self, request, context):
        self.layout = request.layout
        return prefill_pb2.RegisterDecodeResponse(prefill_id="stalling", layout=request.layout, agent_name="stall")

    def Prefill(self, request_iterator, context):
        start = next(request_iterator).start
        alloc = next(request_iterator).allocation
        self.rooms.append(start.room)
        yield prefill_pb2.PrefillServerMessage(room=prefill_pb2.BootstrapRoom(
            room=start.room, num_pages=len(alloc.page_indices), prefill_id="stalling"))
        if self.mode == "partial":
            row = pack_aux_row(AuxRow.one(start.room, 7), self.layout.aux_slot_bytes)
            yield prefill_pb2.PrefillServerMessage(aux=prefill_pb2.KvAux(room=start.room, row=row))
        while context.is_active():
            time.sleep(0.05)

    def CancelRoom(self, request, context):
        self.cancelled.append(request.room)
        return prefill_pb2.CancelRoomResponse(found=True)

    def GetLoad(self, request, context):
        return common_pb2.WorkerLoad()


def remote_generate(address: str) -> tuple[grpc.StatusCode, str]:
    """One remote-prefill request of 40 tokens to decode: (status, details)."""
    with grpc.insecure_channel(address) as ch:
        try:
            list(decode_pb2_grpc.DecodeStub(ch).Generate(decode_pb2.GenerateRequest(
                input_ids=list(range(5, 45)), sampling=sampling(max_tokens=4), prefill_override="remote"), timeout=60))
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details()


@pytest.fixture(scope="module")
def stalled():
    servicer = StallingPrefill()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    servicer.port = port
    server.start()
    decode = start_service("tandem.decode", "--model-path", MODEL, "--max-total-tokens", "4096", "--skip-warmup",
                           "--disaggregation-mode", "decode", "--prefill-addresses", f"127.0.0.1:{port}",
                           "--disaggregation-transfer-backend", "grpc", "--prefill-retries", "0",
                           "--disaggregation-waiting-timeout", "1", "--disaggregation-transfer-timeout", "1")
    yield servicer, decode
    decode.stop()
    server.stop(0)


@pytest.mark.parametrize("mode,fragment", [("silent", "waiting for KV timed out"),
                                           ("partial", "KV transfer timed out")])
def test_stalled_prefill_trips_the_timeout_and_frees_every_page(stalled, mode, fragment):
    servicer, decode = stalled
    servicer.mode = mode
    seen = len(servicer.rooms)
    results: list = []
    t = threading.Thread(target=lambda: results.append(remote_generate(decode.grpc_address)))
    t.start()
    wait_for(lambda: len(servicer.rooms) > seen, timeout=30, what="the room reached prefill")
    assert pages_in_use(decode.grpc_address) > 0  # allocated while it waits
    t.join(60)
    code, details = results[0]
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and fragment in details, results
    assert servicer.rooms[-1] in servicer.cancelled  # decode asked prefill to stop writing first
    wait_for(lambda: pages_in_use(decode.grpc_address) == 0, timeout=20, what="pages freed")


def test_bootstrap_timeout_when_the_pool_stays_full(stalled):
    """A room that cannot get its pages (the pool is held by a stalled room) fails at the
    bootstrap timeout with RESOURCE_EXHAUSTED; once the holder times out, every page is free."""
    servicer, _ = stalled
    servicer.mode = "silent"
    port = servicer.port
    decode = start_service("tandem.decode", "--model-path", MODEL, "--max-total-tokens", "64", "--skip-warmup",
                           "--disaggregation-mode", "decode", "--prefill-addresses", f"127.0.0.1:{port}",
                           "--disaggregation-transfer-backend", "grpc", "--prefill-retries", "0",
                           "--disaggregation-bootstrap-timeout", "1", "--disaggregation-waiting-timeout", "8")
    results: list = []

    def run():
        results.append(remote_generate(decode.grpc_address))

    try:
        seen = len(servicer.rooms)
        holder = threading.Thread(target=run)
        holder.start()
        wait_for(lambda: len(servicer.rooms) > seen, timeout=30, what="the holder's room at prefill")
        run()  # 3 of the 4 pages are held: this one waits for pages, then its bootstrap timeout trips
        code, details = results[0]
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "bootstrap timeout" in details, results
        assert len(servicer.rooms) == seen + 1  # it never reached prefill
        holder.join(60)
        assert results[1][0] == grpc.StatusCode.DEADLINE_EXCEEDED, results  # the holder: waiting timeout
        wait_for(lambda: pages_in_use(decode.grpc_address) == 0, timeout=20, what="pages freed")
    finally:
        decode.stop()
