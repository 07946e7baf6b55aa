"""Embeddings through the router: an embedding worker (--is-embedding, the demo embedding
checkpoint) beside a generating worker, behind one router with static discovery (the router
asks each worker what it is). The official `openai` client's embeddings equal transformers'
hidden states with the same pooling; 64 mixed-length inputs in one request; bad input gets 400
naming the field; generation still reaches the generating worker only; gRPC Router.Embed."""
from __future__ import annotations

import base64

import grpc
import httpx
import numpy as np
import openai
import pytest
import torch
from tandem.config import RouterConfig
from tandem.router.app import build_router
from tandem.v1 import common_pb2, router_pb2

from tests.integration.router_support import agg_worker_args, start_many
from tests.support.grpc_router import router_stub
from tests.support.models import demo_model
from tests.support.waiting import wait_for

EMBED = "tandem-demo-embed"
TEXTS = ["The capital of France is Paris.", "def fibonacci(n): return n if n < 2 else fibonacci(n - 1)",
         "Tandem bicycles are built for two riders."]


@pytest.fixture(scope="module")
def stack():
    dense, embed = demo_model(), demo_model(EMBED)
    emb_worker, gen_worker = start_many([
        ("tandem.decode", agg_worker_args(embed, "--is-embedding", "--max-total-tokens", "4096",
                                          "--chunked-prefill-size", "256")),
        ("tandem.decode", agg_worker_args(dense, "--max-total-tokens", "512")),
    ])
    cfg = RouterConfig(model_path=dense, workers=[emb_worker.grpc_address, gen_worker.grpc_address], http_port=0,
                       health_check_interval=0.2)
    app = build_router(cfg)
    app.start()
    wait_for(lambda: len(app.core.pool.healthy()) == 2, timeout=30, what="workers healthy")
    yield app, emb_worker, gen_worker
    app.stop()
    for p in (emb_worker, gen_worker):
        p.stop()


@pytest.fixture(scope="module")
def reference():
    """transformers' final hidden states of the checkpoint, last-token pooled (its modules.json),
    float32: vectors(ids_list, dims) -> [B, D] normalised as the checkpoint says (Normalize)."""
    from tokenizers import Tokenizer
    from transformers import AutoModel

    path = demo_model(EMBED)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(f"{path}/tokenizer.json")

    def vectors(inputs, dims=None):
        out = []
        with torch.no_grad():
            for ids in inputs:
                h = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
                out.append(h[:dims] if dims else h)
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)

    def encode(texts):
        return [e.ids for e in tok.encode_batch(texts)]

    return vectors, encode


def test_openai_client_embeddings_equal_transformers(stack, reference):
    app, *_ = stack
    vectors, encode = reference
    client = openai.OpenAI(base_url=f"http://{app.http_address}/v1", api_key="none", max_retries=0)
    want = vectors(encode(TEXTS))
    for fmt in (openai.NOT_GIVEN, "float", "base64"):  # the client asks for base64 when not given
        out = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format=fmt)
        if fmt == "base64":  # asked for explicitly, the client hands back the string: float32 little-endian
            got = torch.tensor(np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in out.data]))
        else:
            got = torch.tensor([d.embedding for d in out.data])
        assert [d.index for d in out.data] == [0, 1, 2]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert out.usage.prompt_tokens == out.usage.total_tokens == sum(len(ids) for ids in encode(TEXTS))
        assert out.model == EMBED
    one = client.embeddings.create(model=EMBED, input=TEXTS[0], dimensions=64)
    got = torch.tensor(one.data[0].embedding)
    assert got.shape == (64,)
    torch.testing.assert_close(got, vectors(encode(TEXTS[:1]), 64)[0], atol=1e-5, rtol=0)
    ids = client.embeddings.create(model=EMBED, input=encode(TEXTS[:1])[0])  # one list of token ids
    torch.testing.assert_close(torch.tensor(ids.data[0].embedding), want[0], atol=1e-5, rtol=0)
    assert EMBED in [m.id for m in client.models.list().data]


def test_batch_of_64_mixed_lengths(stack, reference):
    """64 inputs of 1..300 tokens in one request: more tokens than the worker's 256-token budget, so
    several packed passes; each vector equals its input's own transformers vector."""
    app, emb_worker, _ = stack
    vectors, _ = reference
    g = torch.Generator().manual_seed(7)
    lens = torch.randint(1, 300, (64,), generator=g).tolist()
    inputs = [torch.randint(3, 8000, (n,), generator=g).tolist() for n in lens]
    r = httpx.post(f"http://{app.http_address}/v1/embeddings", json={"model": EMBED, "input": inputs}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    got = torch.tensor([d["embedding"] for d in body["data"]])
    torch.testing.assert_close(got, vectors(inputs), atol=1e-5, rtol=0)
    assert body["usage"]["prompt_tokens"] == sum(lens)
    metrics = httpx.get(f"http://{app.http_address}/metrics").text
    assert 'tandem_router_embedding_inputs_total{model="tandem-demo-embed"}' in metrics
    assert 'endpoint="embeddings"' in metrics

    def worker_counter(name: str) -> float:
        text = httpx.get(f"http://{emb_worker.system_address}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    # The worker publishes its engine counters between steps (when idle, every few seconds).
    wait_for(lambda: worker_counter("sglang:prompt_tokens_total") >= sum(lens), timeout=30,
             what="the worker's sglang:prompt_tokens_total counting the batch")
    assert worker_counter('dynamo_component_requests_total') >= 1


@pytest.mark.parametrize("body,param", [
    ({"input": []}, "input"),
    ({"input": [""]}, "input[0]"),
    ({"input": ["ok", [1, -2]]}, "input[1]"),
    ({"input": ["ok", [[1]]]}, "input[1]"),
    ({"input": 5}, "input"),
    ({"input": ["ok", [5] * 2000]}, "input[1]"),  # longer than the 1024-token context (the worker's check)
    ({"input": "ok", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "ok", "dimensions": 0}, "dimensions"),
    ({"input": "ok", "dimensions": 100000}, "dimensions"),  # more than the hidden size (the worker's check)
    ({"input": "ok", "temperature": 1}, "temperature"),
    ({}, "input"),
])
def test_bad_input_is_400_naming_the_field(stack, body, param):
    app, *_ = stack
    r = httpx.post(f"http://{app.http_address}/v1/embeddings", json={"model": EMBED, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_models_and_kinds_route_apart(stack):
    """Embeddings of the generating model: 404; generation still works (on the generating worker)."""
    app, emb_worker, gen_worker = stack
    r = httpx.post(f"http://{app.http_address}/v1/embeddings", json={"model": app.model_name, "input": "x"},
                   timeout=30)
    assert r.status_code == 404, r.text
    for _ in range(3):  # round robin over both workers would hit the embedding one
        r = httpx.post(f"http://{app.http_address}/v1/completions",
                       json={"model": app.model_name, "prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200, r.text
    kinds = {w.address: w.is_embedding for w in app.core.pool.workers.values()}
    assert kinds == {emb_worker.grpc_address: True, gen_worker.grpc_address: False}
    # /v1/models lists the embedding model after the base; generation naming it: 404 saying why.
    (embed_model,) = app.core.embedding_models()
    ids = [m["id"] for m in httpx.get(f"http://{app.http_address}/v1/models", timeout=30).json()["data"]]
    assert ids == [app.model_name, embed_model]
    assert httpx.get(f"http://{app.http_address}/v1/models/{embed_model}", timeout=30).status_code == 200
    r = httpx.post(f"http://{app.http_address}/v1/completions",
                   json={"model": embed_model, "prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 404 and "embeddings only" in r.json()["error"]["message"], r.text
    # A router with embedding workers only: generation is not an outage to retry (503) but a 404.
    solo = build_router(RouterConfig(model_path=demo_model(EMBED), workers=[emb_worker.grpc_address], http_port=0,
                                     health_check_interval=0.2))
    solo.start()
    try:
        wait_for(lambda: len(solo.core.pool.healthy()) == 1, timeout=30, what="embedding worker healthy")
        r = httpx.post(f"http://{solo.http_address}/v1/completions",
                       json={"model": EMBED, "prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 404 and "embeddings only" in r.json()["error"]["message"], r.text
    finally:
        solo.stop()


def test_grpc_router_embed(stack, reference):
    app, *_ = stack
    vectors, encode = reference
    with router_stub(app) as stub:
        resp = stub.Embed(router_pb2.RouterEmbedRequest(
            inputs=[common_pb2.EmbedInput(text=t) for t in TEXTS], dimensions=32), timeout=60)
        got = torch.tensor([list(e.values) for e in resp.embeddings])
        torch.testing.assert_close(got, vectors(encode(TEXTS), 32), atol=1e-5, rtol=0)
        assert resp.model == EMBED and resp.usage.prompt_tokens == sum(e.num_tokens for e in resp.embeddings)
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(router_pb2.RouterEmbedRequest(model=EMBED), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(router_pb2.RouterEmbedRequest(model="nope", inputs=[common_pb2.EmbedInput(text="x")]),
                       timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
