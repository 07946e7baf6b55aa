"""Stalled and slow clients through a real router and decode worker: a client that stops reading
has its stream dropped after --stream-stall-timeout (HTTP SSE and gRPC), the worker aborts the
request and frees its pages, and the next request is served; a slow client that keeps reading
is served to the end, however long its writes wait.

On loopback the kernel's socket buffers would absorb a whole stream, so the raw HTTP clients
advertise a tiny receive buffer and segment size (tests/support/stalled_client.py) and the gRPC
client keeps its flow-control window at 16 KiB. Each token of a chat stream with 20 top
logprobs is ~1.7 KB of SSE, so a few hundred tokens fill every buffer."""
from __future__ import annotations

import json

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tandem.v1 import router_pb2, router_pb2_grpc

from tests.support.clients import pages_in_use, sampling
from tests.support.procs import start_service
from tests.support.stalled_client import closed_by_server, large_chat_stream, raw_http_stream, read_to_end
from tests.support.waiting import wait_for

MODEL = "models/tandem-demo-dense"
NAME = "tandem-demo-dense"
STALL_TIMEOUT = "1"
LONG = 1500  # tokens: far more output than the buffers hold, and a request still running when dropped


@pytest.fixture(scope="module")
def stack():
    decode = start_service("tandem.decode", "--model-path", MODEL, "--max-total-tokens", "8192", "--skip-warmup",
                           "--log-level", "warning")
    router = start_service("tandem.router", "--model-path", MODEL, "--http-port", "0", "--workers",
                           decode.grpc_address, "--stream-stall-timeout", STALL_TIMEOUT)
    try:
        wait_for(lambda: httpx.get(f"http://{router.info['http']}/health").status_code == 200, 30, "router healthy")
        yield router, decode
    finally:
        router.stop()
        decode.stop()


def metric(address: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` at ``address``'s /metrics that carry ``labels``."""
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


CHAT = "/v1/chat/completions"


def chat(max_tokens: int) -> dict:
    return large_chat_stream(NAME, max_tokens)


def sse_events(data: bytes) -> list[dict]:
    return [json.loads(line[len(b"data: "):]) for line in data.split(b"\n")
            if line.startswith(b"data: {")]


def counters(router, decode) -> dict:
    http = router.info["http"]
    return {"http": metric(http, "tandem_router_stalled_streams_total", api="http"),
            "grpc": metric(http, "tandem_router_stalled_streams_total", api="grpc"),
            "waits": metric(http, "tandem_router_write_waits_total", api="http"),
            "aborted": metric(decode.system_address, "sglang:num_aborted_requests_total"),
            "logged": router.log().count("took no data")}


def assert_served_after(router) -> None:
    r = httpx.post(f"http://{router.info['http']}/v1/chat/completions", timeout=60,
                   json={**chat(8), "stream": False})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8


def assert_dropped_and_freed(router, decode, before: dict, api: str) -> None:
    """The router counted and logged one stalled stream, decode aborted the request (it did not run to
    its end) and no page is left in use."""
    wait_for(lambda: counters(router, decode)[api] == before[api] + 1, 60, f"the router to drop the {api} stream")
    wait_for(lambda: pages_in_use(decode.grpc_address) == 0, 30, "decode to free the request's pages")
    wait_for(lambda: counters(router, decode)["aborted"] == before["aborted"] + 1, 30, "decode to abort it")
    assert counters(router, decode)["logged"] == before["logged"] + 1
    wait_for(lambda: metric(router.info["http"], "dynamo_frontend_inflight_requests") == 0, 30,
             "the router to end the request")


def test_http_client_that_stops_reading_is_dropped_and_its_pages_freed(stack):
    router, decode = stack
    before = counters(router, decode)
    sock = raw_http_stream(router.info["http"], CHAT, chat(LONG))
    try:
        assert_dropped_and_freed(router, decode, before, "http")
        assert closed_by_server(sock, 30)  # reset: the router's kernel keeps nothing for it either
        data = read_to_end(sock)
    finally:
        sock.close()
    assert b"data: [DONE]" not in data
    assert_served_after(router)


def test_grpc_client_that_stops_reading_is_cancelled_and_its_pages_freed(stack):
    router, decode = stack
    before = counters(router, decode)
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]
    with grpc.insecure_channel(router.grpc_address, options=options) as ch:
        call = router_pb2_grpc.RouterStub(ch).Generate(router_pb2.RouterGenerateRequest(
            text="Tell me a story.", sampling=sampling(max_tokens=LONG, ignore_eos=True, logprobs=True,
                                                       top_logprobs=20)))
        assert_dropped_and_freed(router, decode, before, "grpc")
        tokens = 0
        with pytest.raises(grpc.RpcError) as err:
            for chunk in call:
                tokens += len(chunk.token_ids)
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert tokens < LONG
        served = list(router_pb2_grpc.RouterStub(ch).Generate(
            router_pb2.RouterGenerateRequest(text="Hello", sampling=sampling(max_tokens=4)), timeout=60))
        assert sum(len(c.token_ids) for c in served) == 4
    assert_served_after(router)


def test_slow_http_client_that_keeps_reading_is_not_dropped(stack):
    """The client reads nothing until the router's writes wait for it (counted), then at most 1 KB
    every 30 ms: draining the backlog takes seconds, far longer than the stall timeout (a watchdog on
    the time a write waits would drop it), but the client takes something well within it, so it
    gets the whole stream."""
    router, decode = stack
    before = counters(router, decode)
    max_tokens = 80
    sock = raw_http_stream(router.info["http"], CHAT, chat(max_tokens))
    try:
        wait_for(lambda: counters(router, decode)["waits"] > before["waits"], 60,
                 "the router's writes to wait for the client", interval=0.02)
        data = read_to_end(sock, sip=1024, pause=0.03)
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in data
    events = sse_events(data)
    assert sum(len(e["choices"][0]["logprobs"]["content"]) for e in events
               if e["choices"] and e["choices"][0].get("logprobs")) == max_tokens
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    after = counters(router, decode)
    assert (after["http"], after["logged"]) == (before["http"], before["logged"])
    wait_for(lambda: pages_in_use(decode.grpc_address) == 0, 30, "no page in use")
