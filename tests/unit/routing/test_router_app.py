"""The router app (HTTP + gRPC) in front of scripted in-process workers: OpenAI shapes,
errors, auth, retries, cancellation propagation, health-based removal."""
from __future__ import annotations

import json

import grpc
import httpx
import openai
import pytest
from routing_fake_worker import FakeWorker
from tandem.config import RouterConfig
from tandem.router.app import build_router
from tandem.v1 import common_pb2, router_pb2

from tests.support.grpc_router import router_stub
from tests.support.waiting import wait_for

REPLY = "Hello world! Streaming text with émojis 🦊 and 漢字."


@pytest.fixture
def make_router(tiny_model_dir):
    made = []

    def make(workers, **kw):
        cfg = RouterConfig(model_path=tiny_model_dir, workers=[w.address for w in workers], http_port=0,
                           **{"health_check_interval": 0.1, **kw})
        app = build_router(cfg)
        app.start()
        made.append(app)
        wait_for(lambda: len(app.core.pool.healthy()) == len(workers), what="workers healthy")
        return app

    yield make
    for app in made:
        app.stop()


@pytest.fixture
def workers(hf_tokenizer):
    ids = hf_tokenizer(REPLY)["input_ids"]
    made = [FakeWorker(ids, tokenizer=hf_tokenizer), FakeWorker(ids, tokenizer=hf_tokenizer)]
    yield made
    for w in made:
        w.stop()


def url(app, path):
    return f"http://{app.http_address}{path}"


def test_completion_chat_and_stream(make_router, workers, hf_tokenizer):
    app = make_router(workers)
    name = app.model_name
    n = len(hf_tokenizer(REPLY)["input_ids"])
    r = httpx.post(url(app, "/v1/completions"), json={"model": name, "prompt": "Hello", "max_tokens": 100})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == REPLY
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == n
    assert body["id"].startswith("cmpl-") and r.headers["x-request-id"] == body["id"]

    r = httpx.post(url(app, "/v1/chat/completions"),
                   json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    # The chat template was applied: the worker saw the rendered prompt's tokens.
    rendered = hf_tokenizer("<|user|>hi<|end|><|assistant|>", add_special_tokens=False)["input_ids"]
    assert any(list(w.servicer.requests[-1].input_ids) == rendered for w in workers)

    with httpx.stream("POST", url(app, "/v1/chat/completions"),
                      json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
                            "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == REPLY
    assert chunks[-1]["usage"]["completion_tokens"] == n and chunks[-1]["choices"] == []
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_stop_string_cancels_worker(make_router, workers):
    app = make_router(workers[:1])
    r = httpx.post(url(app, "/v1/completions"),
                   json={"model": app.model_name, "prompt": "x", "max_tokens": 100, "stop": ["🦊"]})
    body = r.json()
    assert body["choices"][0]["text"] == "Hello world! Streaming text with émojis "
    assert body["choices"][0]["finish_reason"] == "stop"


def test_openai_client_and_logprobs(make_router, workers):
    app = make_router(workers)
    client = openai.OpenAI(base_url=url(app, "/v1"), api_key="unused")
    assert [m.id for m in client.models.list().data] == [app.model_name]
    out = client.completions.create(model=app.model_name, prompt="a", max_tokens=5, logprobs=1)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 5 and lp.token_logprobs == [-0.5] * 5 and len(lp.top_logprobs) == 5
    chat = client.chat.completions.create(model=app.model_name, messages=[{"role": "user", "content": "q"}],
                                          max_tokens=3, logprobs=True, top_logprobs=1)
    assert [c.logprob for c in chat.choices[0].logprobs.content] == [-0.5] * 3
    stream = client.completions.create(model=app.model_name, prompt="a", max_tokens=100, stream=True)
    assert "".join(c.choices[0].text for c in stream) == REPLY


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b'{"model": "M", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
    (b'{"model": "M", "prompt": 5}', 400, "prompt"),
    (b'{"model": "M", "prompt": ""}', 400, "prompt"),
    (b'{"model": "M", "prompt": "x", "max_tokens": 100000}', 400, "max_tokens"),
    (b'{"model": "M", "prompt": "x", "temperature": -1}', 400, "temperature"),
    (b'{"model": "M", "prompt": "x", "n": 99}', 400, "n"),
    (b'{"model": "nope", "prompt": "x"}', 404, "model"),
    (b'[1, 2]', 400, None),
])
def test_bad_input_statuses(make_router, workers, body, status, param):
    app = make_router(workers[:1])
    body = body.replace(b'"M"', json.dumps(app.model_name).encode())
    r = httpx.post(url(app, "/v1/completions"), content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    # still serving
    ok = httpx.post(url(app, "/v1/completions"), json={"model": app.model_name, "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_api_key(make_router, workers):
    app = make_router(workers[:1], api_key="sekret")
    body = {"model": app.model_name, "prompt": "x", "max_tokens": 2}
    assert httpx.post(url(app, "/v1/completions"), json=body).status_code == 401
    r = httpx.post(url(app, "/v1/completions"), json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url(app, "/v1/completions"), json=body, headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 200


def test_no_healthy_worker_503_then_back(make_router, workers):
    app = make_router(workers[:1])
    workers[0].set_serving(False)
    wait_for(lambda: not app.core.pool.healthy(), what="worker out of rotation")
    r = httpx.post(url(app, "/v1/completions"), json={"model": app.model_name, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["message"]
    assert httpx.get(url(app, "/health")).status_code == 503
    workers[0].set_serving(True)
    wait_for(lambda: app.core.pool.healthy(), what="worker back")
    r = httpx.post(url(app, "/v1/completions"), json={"model": app.model_name, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200


def test_retry_on_other_worker_before_output(make_router, workers):
    app = make_router(workers, routing_policy="round_robin")
    workers[0].servicer.fail_code = grpc.StatusCode.UNAVAILABLE
    workers[1].servicer.fail_code = None
    for _ in range(4):
        r = httpx.post(url(app, "/v1/completions"), json={"model": app.model_name, "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200, r.text
    assert workers[1].servicer.requests  # every request ended on the good worker


def test_error_without_retry_is_clear(make_router, workers):
    app = make_router(workers[:1], request_retries=0)
    workers[0].servicer.fail_code = grpc.StatusCode.UNAVAILABLE
    r = httpx.post(url(app, "/v1/completions"), json={"model": app.model_name, "prompt": "x", "max_tokens": 3})
    assert r.status_code == 503
    assert "scripted failure" in r.json()["error"]["message"]


def test_request_failure_ejects_a_worker_only_when_it_is_unreachable(make_router, workers):
    # Health checks run once at start, then not again during the test: what happens to the
    # rotation here is the request path's doing.
    app = make_router(workers[:1], request_retries=0, health_check_interval=3600)
    body = {"model": app.model_name, "prompt": "x", "max_tokens": 3}
    workers[0].servicer.fail_code = grpc.StatusCode.UNAVAILABLE  # this request failed; the worker is fine
    for _ in range(2):
        r = httpx.post(url(app, "/v1/completions"), json=body)
        assert r.status_code == 503 and "scripted failure" in r.json()["error"]["message"], r.text
        assert app.core.pool.healthy()
    workers[0].stop()  # now the worker itself is gone
    r = httpx.post(url(app, "/v1/completions"), json=body)
    assert r.status_code == 503
    assert not app.core.pool.healthy()
    r = httpx.post(url(app, "/v1/completions"), json=body)
    assert r.status_code == 503 and "no healthy worker" in r.json()["error"]["message"]


def test_worker_stream_ending_aborted_is_an_error_never_an_empty_success(make_router, workers):
    app = make_router(workers[:1], request_retries=0)
    workers[0].servicer.end_aborted = True
    body = {"model": app.model_name, "prompt": "x", "max_tokens": 3}
    r = httpx.post(url(app, "/v1/completions"), json=body)
    assert r.status_code == 500 and "aborted the request" in r.json()["error"]["message"]
    r = httpx.post(url(app, "/v1/completions"), json={**body, "stream": True})
    assert r.status_code == 500 and "aborted the request" in r.json()["error"]["message"]
    with router_stub(app) as stub, pytest.raises(grpc.RpcError) as failed:
        list(stub.Generate(router_pb2.RouterGenerateRequest(
            text="x", sampling=common_pb2.SamplingParams(max_tokens=3)), timeout=10))
    assert failed.value.code() == grpc.StatusCode.ABORTED


def test_worker_stream_ending_aborted_is_retried_on_another_worker(make_router, workers):
    app = make_router(workers, routing_policy="round_robin")
    workers[0].servicer.end_aborted = True
    for _ in range(4):
        r = httpx.post(url(app, "/v1/completions"), json={"model": app.model_name, "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
    assert workers[0].servicer.requests and len(workers[1].servicer.requests) == 4


def test_client_disconnect_cancels_worker_call(make_router, hf_tokenizer):
    slow = FakeWorker(hf_tokenizer(REPLY)["input_ids"] * 10, delay=0.05)
    try:
        app = make_router([slow])
        with httpx.stream("POST", url(app, "/v1/completions"),
                          json={"model": app.model_name, "prompt": "x", "max_tokens": 200, "stream": True}) as r:
            next(r.iter_lines())
        wait_for(lambda: slow.servicer.cancelled, what="worker call cancelled")
        # non-streaming: the client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url(app, "/v1/completions"), json={"model": app.model_name, "prompt": "y", "max_tokens": 200},
                       timeout=0.3)
        wait_for(lambda: len(slow.servicer.cancelled) == 2, what="second worker call cancelled")
    finally:
        slow.stop()


def test_grpc_router_generate_and_list(make_router, workers, hf_tokenizer):
    app = make_router(workers)
    with router_stub(app) as stub:
        req = router_pb2.RouterGenerateRequest(text="hello", sampling=common_pb2.SamplingParams(max_tokens=100))
        chunks = list(stub.Generate(req, timeout=10))
        assert "".join(c.text for c in chunks) == REPLY
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and chunks[-1].usage.completion_tokens
        chat = router_pb2.RouterGenerateRequest(
            chat=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role="user", content="hi")]),
            sampling=common_pb2.SamplingParams(max_tokens=2))
        assert len(list(stub.Generate(chat, timeout=10))) == 2
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(router_pb2.RouterGenerateRequest(text="x", sampling=common_pb2.SamplingParams(
                max_tokens=10**6)), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(router_pb2.RouterGenerateRequest(model="other", text="x"), timeout=10))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        listing = stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
        assert sorted(w.address for w in listing.workers) == sorted(w.address for w in workers)
        assert all(w.healthy and w.load.total_pages == 100 for w in listing.workers)
        assert listing.policy == "round_robin"


def test_grpc_cancel_propagates(make_router, hf_tokenizer):
    slow = FakeWorker(hf_tokenizer(REPLY)["input_ids"] * 10, delay=0.05)
    try:
        app = make_router([slow])
        with router_stub(app) as stub:
            call = stub.Generate(router_pb2.RouterGenerateRequest(
                token_ids=router_pb2.TokenIds(ids=[1, 2, 3]), sampling=common_pb2.SamplingParams(max_tokens=200)))
            next(call)
            call.cancel()
            wait_for(lambda: slow.servicer.cancelled, what="cancel reaches the worker")
            # deadline: propagates too
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(router_pb2.RouterGenerateRequest(
                    token_ids=router_pb2.TokenIds(ids=[1, 2]), sampling=common_pb2.SamplingParams(max_tokens=200)),
                    timeout=0.5))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda: len(slow.servicer.cancelled) == 2, what="deadline reaches the worker")
    finally:
        slow.stop()


def test_kv_aware_routes_shared_prefix_to_same_worker(make_router, workers):
    app = make_router(workers, routing_policy="kv_aware")
    prefix = list(range(10, 42))  # 8 blocks of 4
    chosen = []
    for i in range(6):
        r = httpx.post(url(app, "/v1/completions"),
                       json={"model": app.model_name, "prompt": prefix + [50 + i], "max_tokens": 1})
        assert r.status_code == 200
        chosen.append(0 if workers[0].servicer.requests and
                      list(workers[0].servicer.requests[-1].input_ids)[-1] == 50 + i else 1)
        # let the KV event reach the index before the next request
        wait_for(lambda: app.core.index.num_blocks() >= 8, what="blocks indexed")
    assert len(set(chosen)) == 1, chosen
    metrics = httpx.get(url(app, "/metrics")).text
    assert "tandem_router_decisions_total" in metrics and "dynamo_frontend_requests_total" in metrics
    assert "dynamo_frontend_kv_hit_rate_bucket" in metrics and "tandem_router_kv_overlap_blocks_bucket" in metrics


@pytest.mark.parametrize("n", [1, 2])
def test_a_closed_request_releases_its_worker_before_close_returns(make_router, workers, n):
    """The HTTP handler closes a request's delta generator once its response is complete. By the
    time that close returns, the worker's in-flight accounting (which routing reads) is released:
    the generators below close in order. Left to the event loop's finalizer, they closed later,
    sometimes after the client had its response and sent the next request (kv_aware then saw the
    finished request as still running: a routing decision that depended on timing)."""
    import asyncio

    from tandem.router.core import Prepared
    from tandem.sampling import SamplingParams

    app = make_router(workers)

    async def run_and_close():
        prep = Prepared(f"close-{n}", [5, 6, 7], SamplingParams(max_tokens=4, seed=1), n=n)
        deltas = app.core.run(prep)
        finished = 0
        async for d in deltas:
            finished += bool(d.finish_reason)
            if finished == n:
                break  # as the HTTP handler does: stop at the last finish, then close
        await deltas.aclose()
        return {w.worker_id: w.active_requests for w in app.core.pool.workers.values()}

    in_flight = asyncio.run_coroutine_threadsafe(run_and_close(), app.loop).result(30)
    assert set(in_flight.values()) == {0}, in_flight
