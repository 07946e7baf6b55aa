"""One validation of a request (tandem.sampling): each bad value gets the same error from the
router's HTTP API (400 naming the parameter), its gRPC API (INVALID_ARGUMENT), a worker (the
proto mapped by tandem.routing.sampling, then the engine's check) and the engine itself."""
from __future__ import annotations

import os
from pathlib import Path

import grpc
import httpx
import pytest
from routing_fake_worker import FakeWorker
from tandem.config import RouterConfig
from tandem.engine import LLM, SamplingParams
from tandem.router.app import build_router
from tandem.routing.sampling import sampling_from_proto
from tandem.v1 import common_pb2, router_pb2

from deploy.demo_models import build_all
from tests.support.grpc_router import router_stub
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[3]
PROMPT = [11, 12, 13]
VOCAB = 8192  # the demo checkpoints' vocabulary (checked below)

# (HTTP /v1/completions fields, the parameter HTTP names, proto SamplingParams fields, engine SamplingParams fields)
BAD = [
    ({"temperature": -1.0}, "temperature", {"temperature": -1.0}, {"temperature": -1.0}),
    ({"top_p": 1.5}, "top_p", {"top_p": 1.5}, {"top_p": 1.5}),
    ({"top_k": -5}, "top_k", {"top_k": -5}, {"top_k": -5}),
    ({"min_p": 1.5}, "min_p", {"min_p": 1.5}, {"min_p": 1.5}),
    ({"max_tokens": -3}, "max_tokens", {"max_tokens": -3}, {"max_tokens": -3}),
    ({"min_tokens": 9}, "min_tokens", {"min_tokens": 9}, {"min_tokens": 9}),
    ({"presence_penalty": 2.5}, "presence_penalty", {"presence_penalty": 2.5}, {"presence_penalty": 2.5}),
    ({"frequency_penalty": -3.0}, "frequency_penalty", {"frequency_penalty": -3.0}, {"frequency_penalty": -3.0}),
    ({"repetition_penalty": 11.0}, "repetition_penalty", {"repetition_penalty": 11.0},
     {"repetition_penalty": 11.0}),
    ({"logprobs": 21}, "logprobs", {"logprobs": True, "top_logprobs": 21}, {"logprobs": True, "top_logprobs": 21}),
    ({"stop": ["ok", ""]}, "stop", {"stop": ["ok", ""]}, {"stop": ["ok", ""]}),
    ({"stop_token_ids": [VOCAB + 5]}, "stop_token_ids", {"stop_token_ids": [VOCAB + 5]},
     {"stop_token_ids": [VOCAB + 5]}),
    ({"logit_bias": {"7": 101.5}}, "logit_bias", {"logit_bias": {7: 101.5}}, {"logit_bias": {7: 101.5}}),
    ({"logit_bias": {str(VOCAB): 1.0}}, "logit_bias", {"logit_bias": {VOCAB: 1.0}}, {"logit_bias": {VOCAB: 1.0}}),
]


@pytest.fixture(scope="module")
def dense_dir():
    return build_all(os.path.join(REPO, "models"), log=lambda *_: None)["tandem-demo-dense"]


@pytest.fixture(scope="module")
def engine(dense_dir):
    eng = LLM(dense_dir, device="cpu", dtype="float32", max_total_tokens=1024).engine
    assert eng.model_config.vocab_size == VOCAB
    return eng


@pytest.fixture(scope="module")
def router(dense_dir):
    worker = FakeWorker([5, 6, 7])
    app = build_router(RouterConfig(model_path=dense_dir, workers=[worker.address], http_port=0,
                                    health_check_interval=0.1))
    app.start()
    wait_for(lambda: app.core.pool.healthy(), what="worker healthy")
    yield app, worker
    app.stop()
    worker.stop()


@pytest.mark.parametrize("http,param,proto,fields", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_each_bad_value_gets_the_same_error_everywhere(router, engine, http, param, proto, fields):
    app, worker = router
    r = httpx.post(f"http://{app.http_address}/v1/completions", timeout=30,
                   json={"model": app.model_name, "prompt": PROMPT, "max_tokens": 8, **http})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    with router_stub(app) as stub, pytest.raises(grpc.RpcError) as rpc:
        list(stub.Generate(router_pb2.RouterGenerateRequest(
            token_ids=router_pb2.TokenIds(ids=PROMPT), sampling=common_pb2.SamplingParams(**{"max_tokens": 8, **proto})),
            timeout=30))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError) as at_worker:  # what a worker does with the proto
        engine.validate_request(PROMPT, sampling_from_proto(common_pb2.SamplingParams(**{"max_tokens": 8, **proto})))
    with pytest.raises(ValueError) as at_engine:
        engine.validate_request(PROMPT, SamplingParams(**{"max_tokens": 8, **fields}))
    assert err["message"] == rpc.value.details() == str(at_worker.value) == str(at_engine.value)
    assert worker.servicer.requests == []  # nothing bad reached a worker
