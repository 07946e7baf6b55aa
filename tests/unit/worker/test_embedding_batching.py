"""An embedding worker batches concurrent requests: requests that arrive while the engine is
busy are embedded by one engine command, each gets its own vectors (as if alone), and a bad
request fails alone with INVALID_ARGUMENT naming its input."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from tandem.engine import EngineCore
from tandem.engine.tokenizer import load_tokenizer
from tandem.v1 import common_pb2
from tandem.worker.embedding import EmbeddingWorker
from tandem.worker.engine_loop import EngineLoop
from tandem.worker.errors import RequestFailed

from deploy.demo_models import EMBED_SPEC, build_all

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def worker():
    path = build_all(os.path.join(REPO, "models"), log=lambda *_: None)[EMBED_SPEC["name"]]
    engine = EngineCore(path, is_embedding=True, device="cpu", dtype="float32", max_total_tokens=2048)
    loop = EngineLoop(engine, "embed-test")
    loop.start()
    yield EmbeddingWorker(loop, load_tokenizer(path))
    loop.stop()


def request(*inputs, dims=0):
    return common_pb2.EmbedRequest(inputs=[common_pb2.EmbedInput(text=t) if isinstance(t, str) else
                                           common_pb2.EmbedInput(token_ids=common_pb2.TokenSequence(ids=t))
                                           for t in inputs], dimensions=dims)


def vectors(resp):
    return torch.tensor([list(e.values) for e in resp.embeddings])


def test_concurrent_requests_share_one_engine_command(worker):
    reqs = [request("hello there", [5, 6, 7]), request([9] * 30, dims=16), request("a third one")]
    alone = [vectors(worker.embed(r)) for r in reqs]
    gate = threading.Event()
    worker.loop.call(lambda _engine: gate.wait(30))  # the engine is busy until the gate opens
    before_req, before_batches = worker.requests, worker.batches
    with ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(worker.embed, r) for r in reqs]
        while worker.requests < before_req + 3:  # all three are waiting (they count when queued)
            threading.Event().wait(0.01)
        gate.set()
        together = [vectors(f.result(timeout=60)) for f in futs]
    assert worker.batches == before_batches + 1
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert together[1].shape == (1, 16)


def test_bad_request_fails_alone(worker):
    with pytest.raises(RequestFailed) as e:
        worker.embed(request("fine", [1, 10**6]))
    assert e.value.status == grpc.StatusCode.INVALID_ARGUMENT and e.value.message.startswith("input[1]:")
    assert worker.embed(request("fine")).embeddings[0].num_tokens > 0
