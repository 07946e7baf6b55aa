"""LoRA adapters through real processes on loopback: the router's ``model=base:adapter`` equals the
engine's own output for that adapter and reaches only workers holding it; PD with an adapter
equals aggregated with it (float32, greedy); an unknown adapter is a 404 / NOT_FOUND naming it at
the router, the worker and a prefill worker lacking it; the same prompt under two adapters never
shares cached KV through the router; adapters loaded and unloaded while serving (SGLang's HTTP
routes and EngineControl, behind the admin token)."""
from __future__ import annotations

import grpc
import httpx
import pytest
from tandem.config import RouterConfig
from tandem.router.app import build_router
from tandem.v1 import decode_pb2, decode_pb2_grpc, engine_control_pb2, engine_control_pb2_grpc, router_pb2

from deploy.demo_lora import build_adapter
from tests.integration.router_support import agg_worker_args, start_many
from tests.support.clients import sampling
from tests.support.grpc_router import router_stub
from tests.support.models import demo_model
from tests.support.waiting import wait_for

BASE = "tandem-demo-dense"
ENGINE = ["--dtype", "float32", "--page-size", "16", "--max-total-tokens", "4096", "--max-lora-rank", "8"]
PROMPT = "def __init__(self, name, value=None):\n    self.name = name\n"  # the demo model and
# its adapters give different greedy tokens for this one
MAX_TOKENS = 12
TOKEN = "lora-admin-secret"  # the decode worker's --admin-token


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    model = demo_model()
    return {"a": build_adapter(model, str(root / "a"), rank=8, seed=1),
            "b": build_adapter(model, str(root / "b"), rank=4, targets=("q_proj", "v_proj", "down_proj"), seed=2),
            "c": build_adapter(model, str(root / "c"), rank=8, targets=("o_proj", "up_proj"), seed=3)}


def _loras(adapters, *names):
    return ["--lora-paths", *[f"{n}={adapters[n]}" for n in names]]


@pytest.fixture(scope="module")
def stack(adapters):
    """agg: an aggregated worker holding a and b; prefill (b) + decode (b and c) for PD."""
    model = demo_model()
    common = [*ENGINE, "--disaggregation-transfer-backend", "grpc"]
    agg, prefill = start_many([("tandem.decode", agg_worker_args(model, *ENGINE, *_loras(adapters, "a", "b"))),
                               ("tandem.prefill", ["--model-path", model, *common, *_loras(adapters, "b")])])
    decode = start_many([("tandem.decode", ["--model-path", model, *common, "--disaggregation-mode", "decode",
                                            "--prefill-addresses", prefill.grpc_address, "--admin-token", TOKEN,
                                            "--max-local-prefill-length", "32",  # PROMPT is local
                                            *_loras(adapters, "b", "c")])])[0]
    procs = {"agg": agg, "prefill": prefill, "decode": decode}
    yield procs
    for p in procs.values():
        p.stop()


def _router(addresses, adapters):
    cfg = RouterConfig(model_path=demo_model(), workers=list(addresses), http_port=0, health_check_interval=0.2,
                       routing_policy="kv_aware")
    app = build_router(cfg)
    app.start()
    wait_for(lambda: len(app.core.lora_names()) == adapters, timeout=30, what="workers healthy, adapters listed")
    return app


@pytest.fixture(scope="module")
def router(stack):
    """A kv_aware router over the aggregated worker (a, b) and the PD decode worker (b, c)."""
    app = _router([stack["agg"].grpc_address, stack["decode"].grpc_address], 3)
    yield app
    app.stop()


@pytest.fixture(scope="module")
def reference(adapters):
    """The engine's offline API: greedy tokens of PROMPT under each adapter and the base model."""
    from tandem.engine import LLM, SamplingParams

    llm = LLM(demo_model(), page_size=16, dtype="float32", lora_paths=[f"{n}={p}" for n, p in adapters.items()])
    ids = llm.engine.tokenize(PROMPT)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return ids, {n: llm.generate(ids, sp, lora_name=n)[0] for n in [None, "a", "b", "c"]}


def _http(app):
    return httpx.Client(base_url=f"http://127.0.0.1:{app.http_port}", timeout=120)


def _complete(client, model, prompt, max_tokens=MAX_TOKENS):
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                "temperature": 0, "ignore_eos": True})


def _generate(address, ids, lora="", override="", max_tokens=MAX_TOKENS, logprobs=False):
    """Greedy tokens (and their logprobs) from a worker's Decode.Generate."""
    with grpc.insecure_channel(address) as ch:
        stub = decode_pb2_grpc.DecodeStub(ch)
        out, lps = [], []
        sp = sampling(max_tokens, ignore_eos=True, logprobs=logprobs)
        for chunk in stub.Generate(decode_pb2.GenerateRequest(input_ids=list(ids), lora_name=lora, sampling=sp,
                                                              prefill_override=override), timeout=120):
            out += chunk.token_ids
            lps += chunk.logprobs
        return (out, lps) if logprobs else out


def test_models_lists_base_and_every_adapter(router):
    with _http(router) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == [BASE, f"{BASE}:a", f"{BASE}:b", f"{BASE}:c"]
        assert c.get(f"/v1/models/{BASE}:a").json()["id"] == f"{BASE}:a"


def test_router_adapter_equals_engine_and_reaches_only_its_holders(router, reference):
    ids, ref = reference
    assert ref["a"].token_ids != ref[None].token_ids  # the adapter changes the output
    with _http(router) as c, router_stub(router) as stub:
        for model, name in [(f"{BASE}:a", "a"), (BASE, None), (f"{BASE}:c", "c")]:
            # Several requests each: only the aggregated worker holds a, only decode holds c (a
            # request routed to the other worker would be refused with NOT_FOUND).
            for _ in range(2):
                r = _complete(c, model, ids)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == ref[name].text, model
                got = [t for chunk in stub.Generate(router_pb2.RouterGenerateRequest(
                    model=model, token_ids=router_pb2.TokenIds(ids=ids),
                    sampling=sampling(MAX_TOKENS, ignore_eos=True)), timeout=120) for t in chunk.token_ids]
                assert got == ref[name].token_ids, model


def test_unknown_adapter_is_404_and_not_found_naming_it(router, stack, reference):
    ids, _ = reference
    with _http(router) as c:
        r = _complete(c, f"{BASE}:nope", PROMPT)
        assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"model": f"{BASE}:nope", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
        assert c.get(f"/v1/models/{BASE}:nope").status_code == 404
    with router_stub(router) as stub, pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(router_pb2.RouterGenerateRequest(model=f"{BASE}:nope", text=PROMPT,
                                                            sampling=sampling(2)), timeout=30))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in e.value.details()
    for address in (stack["agg"].grpc_address, stack["decode"].grpc_address):
        with pytest.raises(grpc.RpcError) as e:
            _generate(address, ids, lora="nope")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in e.value.details()


def test_pd_with_adapter_equals_aggregated(stack, reference):
    long_ids = reference[0] * 6  # past one page: several KV pages cross from prefill
    agg, agg_lps = _generate(stack["agg"].grpc_address, long_ids, lora="b", logprobs=True)
    pd, pd_lps = _generate(stack["decode"].grpc_address, long_ids, lora="b", override="remote", logprobs=True)
    assert pd == agg
    assert len(pd_lps) == MAX_TOKENS
    assert max(abs(x.logprob - y.logprob) for x, y in zip(pd_lps, agg_lps)) <= 1e-4
    assert pd != _generate(stack["agg"].grpc_address, long_ids)  # not the base model's tokens


def test_pd_prefill_without_the_adapter_is_not_found_naming_it(stack, reference):
    with pytest.raises(grpc.RpcError) as e:
        _generate(stack["decode"].grpc_address, reference[0] * 4, lora="c", override="remote")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "prefill worker" in e.value.details() and "'c'" in e.value.details()


def test_adapter_never_hits_another_adapters_cache_through_the_router(stack):
    """The same long prompt under a, then b, then the base model, through a kv_aware router over
    the one worker holding a and b: only a repeat under a is served from cache (the worker's
    count), and the router's prefix index holds the prompt under a only."""
    router = _router([stack["agg"].grpc_address], 2)
    try:
        _check_no_cross_adapter_hits(router)
    finally:
        router.stop()


def _check_no_cross_adapter_hits(router):
    prompt = " ".join(["Tandem bicycles are built for two riders who pedal together."] * 8)
    keys = router.core.index.request_keys
    ids = router.core.tokenizer.encode(prompt)

    def cached(model):
        with _http(router) as c:
            r = _complete(c, model, prompt, max_tokens=2)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    agg_id = router.core.pool.healthy()[0].worker_id
    assert cached(f"{BASE}:a") == 0
    wait_for(lambda: router.core.index.match(keys(ids, "a")).get(agg_id, 0) >= 2, what="a's blocks indexed")
    assert router.core.index.match(keys(ids, "b")) == {} and router.core.index.match(keys(ids)) == {}
    for model in (f"{BASE}:b", BASE):
        assert cached(model) == 0, model
    assert cached(f"{BASE}:a") >= 2 * 16


def test_load_and_unload_while_serving(stack, router, adapters, reference):
    """Adapter a onto the PD pair while it serves (decode over HTTP with its admin token, prefill
    over gRPC): PD under a then equals aggregated under a and the router routes a there too;
    unloaded, it is NOT_FOUND again."""
    ids = reference[0] * 6
    decode_http = f"http://{stack['decode'].system_address}"
    auth = {"authorization": f"Bearer {TOKEN}"}
    load_a = {"lora_name": "a", "lora_path": adapters["a"]}
    assert httpx.post(f"{decode_http}/load_lora_adapter", json=load_a).status_code == 401
    with grpc.insecure_channel(stack["decode"].grpc_address) as ch, pytest.raises(grpc.RpcError) as e:
        engine_control_pb2_grpc.EngineControlStub(ch).ListLoras(engine_control_pb2.ListLorasRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    r = httpx.post(f"{decode_http}/load_lora_adapter", json=load_a, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["loaded_adapters"] == {n: adapters[n] for n in "abc"}, r.text
    r = httpx.post(f"{decode_http}/load_lora_adapter", json=load_a, headers=auth, timeout=60)
    assert r.status_code == 409 and "already loaded" in r.json()["error_message"]
    r = httpx.post(f"{decode_http}/load_lora_adapter", json={"lora_name": "x", "lora_pth": "/"}, headers=auth)
    assert r.status_code == 400 and "lora_pth" in r.json()["error"]

    with grpc.insecure_channel(stack["prefill"].grpc_address) as ch:
        ctl = engine_control_pb2_grpc.EngineControlStub(ch)
        out = ctl.LoadLora(engine_control_pb2.LoadLoraRequest(lora_name="a", lora_path=adapters["a"]), timeout=60)
        assert [(x.lora_name, x.lora_path) for x in out.adapters] == [("a", adapters["a"]), ("b", adapters["b"])]
        with pytest.raises(grpc.RpcError) as e:
            ctl.LoadLora(engine_control_pb2.LoadLoraRequest(lora_name="z", lora_path="/nonexistent"), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter_config.json" in e.value.details()

        assert _generate(stack["decode"].grpc_address, ids, lora="a", override="remote") == \
            _generate(stack["agg"].grpc_address, ids, lora="a")
        decode_id = next(w.worker_id for w in router.core.pool.workers.values()
                         if w.address == stack["decode"].grpc_address)
        wait_for(lambda: "a" in router.core.pool.workers[decode_id].load.lora_names, what="the router sees a on decode")

        out = ctl.UnloadLora(engine_control_pb2.UnloadLoraRequest(lora_name="a"), timeout=60)
        assert [x.lora_name for x in out.adapters] == ["b"]
        with pytest.raises(grpc.RpcError) as e:
            ctl.UnloadLora(engine_control_pb2.UnloadLoraRequest(lora_name="a"), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'a'" in e.value.details()
        assert [x.lora_name for x in ctl.ListLoras(engine_control_pb2.ListLorasRequest(), timeout=10).adapters] == ["b"]
    r = httpx.post(f"{decode_http}/unload_lora_adapter", json={"lora_name": "a"}, headers=auth, timeout=60)
    assert r.status_code == 200 and set(r.json()["loaded_adapters"]) == {"b", "c"}
    r = httpx.post(f"{decode_http}/unload_lora_adapter", json={"lora_name": "a"}, headers=auth, timeout=60)
    assert r.status_code == 404 and "'a'" in r.json()["error_message"]
    with pytest.raises(grpc.RpcError) as e:
        _generate(stack["decode"].grpc_address, ids, lora="a")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
