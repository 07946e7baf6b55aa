"""Admission limits on the router: body size, prompt tokens, max_tokens, n, stop strings and
logit-bias size (each a flag; 400 / INVALID_ARGUMENT naming the parameter, 413 for the body),
the gRPC message limit, and the concurrency limits (429 + Retry-After / RESOURCE_EXHAUSTED)."""
from __future__ import annotations

import threading

import grpc
import httpx
import pytest
from routing_fake_worker import FakeWorker
from tandem.config import RouterConfig
from tandem.router.app import build_router
from tandem.server import ServiceRuntime, service_name
from tandem.v1 import common_pb2, router_pb2, router_pb2_grpc

from tests.support.grpc_router import router_stub
from tests.support.waiting import wait_for

LIMITS = dict(max_request_bytes=4096, max_prompt_tokens=20, max_output_tokens=8, max_n=2, max_stop_strings=2,
              max_stop_string_length=5, max_logit_bias=3)


@pytest.fixture
def limited(tiny_model_dir, hf_tokenizer):
    worker = FakeWorker(hf_tokenizer("ok fine")["input_ids"] * 8)
    app = build_router(RouterConfig(model_path=tiny_model_dir, workers=[worker.address], http_port=0,
                                    health_check_interval=0.1, **LIMITS))
    app.start()
    wait_for(lambda: app.core.pool.healthy(), what="worker healthy")
    yield app, worker
    app.stop()
    worker.stop()


def _post(app, body, **kw):
    return httpx.post(f"http://{app.http_address}/v1/completions", json={"model": app.model_name, **body},
                      timeout=10, **kw)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "word " * 40, "max_tokens": 2}, "prompt"),
    ({"prompt": "x", "max_tokens": 9}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2, "n": 3}, "n"),
    ({"prompt": "x", "max_tokens": 2, "stop": ["a", "b", "c"]}, "stop"),
    ({"prompt": "x", "max_tokens": 2, "stop": ["toolong"]}, "stop"),
    ({"prompt": "x", "max_tokens": 2, "logit_bias": {"1": 1, "2": 1, "3": 1, "4": 1}}, "logit_bias"),
])
def test_http_limits_answer_400_naming_the_parameter(limited, body, param):
    app, worker = limited
    r = _post(app, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "--max-" in err["message"]
    assert worker.servicer.requests == []
    assert _post(app, {"prompt": "x", "max_tokens": 2}).status_code == 200  # still serving


def test_body_limit_413_and_default_max_tokens_capped(limited):
    app, worker = limited
    r = _post(app, {"prompt": "x" * 5000, "max_tokens": 2})
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit still holds while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'
    r = httpx.post(f"http://{app.http_address}/v1/completions", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 413
    assert _post(app, {"prompt": "x"}).status_code == 200  # completions' default of 16 is capped to 8
    assert worker.servicer.requests[-1].sampling.max_tokens == 8


def test_grpc_limits_invalid_argument_and_message_size(limited, tiny_model_dir):
    app, worker = limited
    sp = common_pb2.SamplingParams
    bad = [router_pb2.RouterGenerateRequest(text="x", sampling=sp(max_tokens=9)),
           router_pb2.RouterGenerateRequest(text="x", n=3, sampling=sp(max_tokens=2)),
           router_pb2.RouterGenerateRequest(text="x", sampling=sp(max_tokens=2, stop=["a", "b", "c"])),
           router_pb2.RouterGenerateRequest(text="x", sampling=sp(max_tokens=2, logit_bias={1: 1, 2: 1, 3: 1, 4: 1})),
           router_pb2.RouterGenerateRequest(token_ids=router_pb2.TokenIds(ids=[5] * 21), sampling=sp(max_tokens=2))]
    with router_stub(app) as stub:
        for req in bad:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(req, timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-" in err.value.details()
        assert list(stub.Generate(router_pb2.RouterGenerateRequest(text="x", sampling=sp(max_tokens=2)), timeout=10))
    assert len(worker.servicer.requests) == 1
    # The router's own gRPC server receives at most --max-request-bytes per message.
    rt = ServiceRuntime("router", app.config, max_receive_message_bytes=app.config.max_request_bytes, aio=True)
    rt.config.port = 0
    rt.add_service(router_pb2_grpc.add_RouterServicer_to_server, app.servicer, service_name(router_pb2, "Router"))
    rt.start()
    try:
        with grpc.insecure_channel(rt.address) as ch:
            with pytest.raises(grpc.RpcError) as err:
                list(router_pb2_grpc.RouterStub(ch).Generate(
                    router_pb2.RouterGenerateRequest(text="x" * 5000, sampling=sp(max_tokens=2)), timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        rt.shutdown()


def test_concurrency_limits_429_with_retry_after(tiny_model_dir, hf_tokenizer):
    worker = FakeWorker(hf_tokenizer("ok")["input_ids"])
    worker.servicer.gate = threading.Event()
    app = build_router(RouterConfig(model_path=tiny_model_dir, workers=[worker.address], http_port=0,
                                    health_check_interval=0.1, max_concurrent_requests=2,
                                    max_concurrent_requests_per_key=1))
    app.start()
    held: list[httpx.Response] = []
    try:
        wait_for(lambda: app.core.pool.healthy(), what="worker healthy")
        body = {"prompt": "x", "max_tokens": 2}

        def hold(key):
            held.append(_post(app, body, headers={"authorization": f"Bearer {key}"}))
        first = threading.Thread(target=hold, args=("alice",))
        first.start()
        wait_for(lambda: len(worker.servicer.requests) == 1, what="alice's request at the worker")
        r = _post(app, body, headers={"authorization": "Bearer alice"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "--max-concurrent-requests-per-key" in r.json()["error"]["message"]
        with router_stub(app) as stub:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(router_pb2.RouterGenerateRequest(text="x", sampling=common_pb2.SamplingParams(
                    max_tokens=2)), metadata=(("authorization", "Bearer alice"),), timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        second = threading.Thread(target=hold, args=("bob",))  # another key gets in
        second.start()
        wait_for(lambda: len(worker.servicer.requests) == 2, what="bob's request at the worker")
        r = _post(app, body, headers={"authorization": "Bearer carol"})  # the router's total limit
        assert r.status_code == 429 and "--max-concurrent-requests " in r.json()["error"]["message"]
        worker.servicer.gate.set()
        first.join(10)
        second.join(10)
        assert [h.status_code for h in held] == [200, 200]
        assert _post(app, body, headers={"authorization": "Bearer alice"}).status_code == 200
        assert app.core.admission.in_flight == 0 and not app.core.admission.per_key
    finally:
        worker.servicer.gate.set()
        app.stop()
        worker.stop()
