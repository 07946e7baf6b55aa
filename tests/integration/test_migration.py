"""Request migration on loopback with real workers (CPU, float32): a decode worker that dies
mid-stream (its fault hook exits the process after a request's FAULT_AT-th token, no sleep)
under --migration-limit 1 leaves the client a stream with exactly the tokens of an
uninterrupted run (greedy with penalties and a stop string across the seam, seeded with
penalties; logprobs and usage too). With --migration-limit 0 the client gets the error: see
tests/unit/routing/test_router_migration.py (a scripted worker fails mid-stream; one worker
process less here)."""
from __future__ import annotations

import pytest
from tandem.config import RouterConfig
from tandem.router.app import build_router
from tandem.v1 import common_pb2, router_pb2

from tests.integration.router_support import agg_worker_args, log_tail, start_many
from tests.support.grpc_router import router_stub
from tests.support.models import demo_model
from tests.support.ports import free_ports
from tests.support.waiting import wait_for

FAULT_AT = 6
PROMPT = "The GNU General Public License is a free, copyleft license for"
CASES = ["greedy", "seeded"]
PAUSE_AT = 4  # the drained worker's engine pauses once each of its requests streamed this many tokens
DRAIN_STREAMS = 8
PENALTIES = dict(frequency_penalty=1.5, presence_penalty=1.0, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def workers():
    """One healthy worker (a port-0 port: above every other one), one doomed worker per case and
    one to drain, on ports below the ephemeral range, so round_robin's first pick (the lowest
    worker id) is the doomed (or drained) one."""
    model = demo_model()
    ports = free_ports(len(CASES) + 2)
    fault = {"TANDEM_FAULT_EXIT_AFTER_TOKENS": str(FAULT_AT)}
    pause = {"TANDEM_FAULT_PAUSE_AFTER_TOKENS": str(PAUSE_AT)}
    specs = [("tandem.decode", agg_worker_args(model))]
    specs += [("tandem.decode", agg_worker_args(model, "--port", str(p))) for p in ports[:-1]]
    # The one whose KV cannot be fetched: another transfer backend than its target's (nixl).
    specs.append(("tandem.decode", agg_worker_args(model, "--port", str(ports[-1]), "--disaggregation-transfer-backend",
                                                   "grpc", "--drain-timeout", "1")))
    procs = start_many(specs, envs=[None] + [fault] * len(CASES) + [pause, pause])
    yield procs[0], dict(zip(CASES + ["drain", "refused"], procs[1:]))
    for p in procs:
        p.stop()


def make_router(addresses, **kw):
    cfg = RouterConfig(model_path=demo_model(), workers=list(addresses), http_port=0, routing_policy="round_robin",
                       health_check_interval=3600, **kw)
    app = build_router(cfg)
    app.start()
    wait_for(lambda: len(app.core.pool.healthy()) == len(addresses), timeout=30, what="workers healthy")
    return app


def generate(app, model="", **sampling):
    with router_stub(app) as stub:
        req = router_pb2.RouterGenerateRequest(text=PROMPT, model=model, sampling=common_pb2.SamplingParams(**sampling))
        chunks = list(stub.Generate(req, timeout=120))
    return ([t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks),
            [lp.logprob for c in chunks for lp in c.logprobs], chunks[-1])


@pytest.fixture(scope="module")
def reference(workers):
    """Uninterrupted runs on the healthy worker."""
    app = make_router([workers[0].grpc_address])
    yield lambda **sp: generate(app, **sp)
    app.stop()


def migrated(workers, case, limit, **sp):
    healthy, doomed = workers
    app = make_router([doomed[case].grpc_address, healthy.grpc_address], migration_limit=limit)
    try:
        return generate(app, **sp), app.registry.get_sample_value(
            "dynamo_frontend_model_migration_total", {"model": app.model_name, "migration_type": "ongoing_request"})
    finally:
        app.stop()
        assert doomed[case].proc.wait(30) == 86, log_tail(doomed[case])  # it died of its fault hook


def spanning_stop(tokenizer, ids, seam):
    before = tokenizer.decode(ids[:seam])
    after = tokenizer.decode(ids[:seam + 2])
    return after[len(before) - 2:len(before) + 2]


def test_greedy_with_penalties_and_a_stop_string_across_the_seam(workers, reference):
    full_ids, full_text, _, _ = reference(max_tokens=32, temperature=0, ignore_eos=True, **PENALTIES)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model())
    stop = spanning_stop(tok, full_ids, FAULT_AT)
    assert len(stop) == 4 and full_text.index(stop) == len(tok.decode(full_ids[:FAULT_AT])) - 2, stop  # the first one
    sp = dict(max_tokens=32, temperature=0, ignore_eos=True, stop=[stop], logprobs=True, **PENALTIES)
    want = reference(**sp)
    (ids, text, lps, last), n = migrated(workers, "greedy", 1, **sp)
    assert n == 1
    assert ids == want[0] and text == want[1] and len(ids) > FAULT_AT
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP == want[3].finish_reason
    assert lps == pytest.approx(want[2], abs=1e-4)
    assert last.usage.prompt_tokens == want[3].usage.prompt_tokens
    assert last.usage.completion_tokens == want[3].usage.completion_tokens == len(ids)


def test_seeded_with_penalties(workers, reference):
    sp = dict(max_tokens=24, temperature=0.9, seed=77, ignore_eos=True, logprobs=True, frequency_penalty=0.8)
    want = reference(**sp)
    (ids, text, lps, last), n = migrated(workers, "seeded", 1, **sp)
    assert n == 1
    assert ids == want[0] and text == want[1]
    assert lps == pytest.approx(want[2], abs=1e-4)
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == want[3].usage.prompt_tokens and last.usage.completion_tokens == 24

@pytest.fixture(scope="module")
def pd_workers():
    """A prefill worker and two decode workers (grpc transfer backend): the one to drain on a
    port below the ephemeral range (round_robin's first pick), paused by its fault hook."""
    model = demo_model()
    common = ["--model-path", model, "--log-level", "warning", "--disaggregation-transfer-backend", "grpc"]
    (prefill,) = start_many([("tandem.prefill", common)])
    decode = [*common, "--disaggregation-mode", "decode", "--prefill-addresses", prefill.grpc_address]
    drained, other = start_many([("tandem.decode", [*decode, "--port", str(free_ports(1)[0])]),
                                 ("tandem.decode", decode)],
                                envs=[{"TANDEM_FAULT_PAUSE_AFTER_TOKENS": str(PAUSE_AT)}, None])
    yield drained, other
    for p in (drained, other, prefill):
        p.stop()


def _stats(worker):
    """(local prefills, moves in by outcome, pages moved in) of a worker: GetLoad and /metrics."""
    import re
    import urllib.request

    from tandem.v1 import common_pb2 as c
    from tandem.v1 import decode_pb2_grpc

    with worker.channel() as ch:
        load = decode_pb2_grpc.DecodeStub(ch).GetLoad(c.GetLoadRequest(), timeout=10)
    with urllib.request.urlopen(f"http://{worker.system_address}/metrics", timeout=10) as r:
        text = r.read().decode()

    def value(name, label=""):
        return sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*{label}[^}}]*}} (\S+)$", text, re.M))

    return (load.num_prefilled_reqs, value("tandem_component_kv_moves_in_total", 'outcome="moved"'),
            value("tandem_component_kv_moves_in_total", 'outcome="recomputed"'),
            value("tandem_component_kv_moved_in_pages_total"))


def _drain_under_streams(drained, other, reference, adapter=None):
    """8 streams over ``drained`` and ``other`` (round_robin: 4 each), ``drained`` paused by its fault
    hook once each of its requests streamed PAUSE_AT tokens, then drained; every stream must end
    with the tokens of an uninterrupted run. ``adapter``: every stream under this LoRA adapter
    (model "base:adapter"). Returns the DrainResponse, the router's migrations and ``other``'s
    stats before and after."""
    import threading

    from grpc_health.v1 import health_pb2
    from tandem.v1 import common_pb2 as c
    from tandem.v1 import decode_pb2_grpc, engine_control_pb2, engine_control_pb2_grpc

    sps = [dict(max_tokens=32, ignore_eos=True, temperature=0.8 if i % 2 else 0, seed=100 + i, logprobs=True,
                frequency_penalty=0.5) for i in range(DRAIN_STREAMS)]
    want = [reference(**sp)[0] for sp in sps]
    app = make_router([drained.grpc_address, other.grpc_address], migration_limit=1)
    model = f"{app.model_name}:{adapter}" if adapter else ""
    if adapter:
        wait_for(lambda: app.core.lora_names() == [adapter], timeout=30, what="the adapter listed")
    got: list[list[int]] = [[] for _ in sps]
    errors: list[BaseException] = []

    def one(i):
        try:
            with router_stub(app) as stub:
                req = router_pb2.RouterGenerateRequest(text=PROMPT, model=model, sampling=c.SamplingParams(**sps[i]))
                for chunk in stub.Generate(req, timeout=120):
                    got[i].extend(chunk.token_ids)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(DRAIN_STREAMS)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: all(got) or errors, timeout=120, what="every stream's first tokens")
        before = _stats(other)
        with drained.channel() as ch:
            resp = engine_control_pb2_grpc.EngineControlStub(ch).Drain(engine_control_pb2.DrainRequest(), timeout=120)
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert got == want
        assert resp.ok and resp.num_pages_in_use == 0 and resp.num_requests_left == 0, resp
        migrated_n = app.registry.get_sample_value("dynamo_frontend_model_migration_total",
                                                   {"model": app.model_name, "migration_type": "ongoing_request"})
        assert resp.num_requests_handed_back >= 1 and migrated_n == resp.num_requests_handed_back
        assert len(resp.request_ids) == resp.num_requests_handed_back
        assert drained.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
        with drained.channel() as ch:
            load = decode_pb2_grpc.DecodeStub(ch).GetLoad(c.GetLoadRequest(), timeout=10)
        assert load.num_running_reqs == 0 and load.free_pages + load.evictable_pages == load.total_pages
        return resp, before, _stats(other)
    finally:
        app.stop()


@pytest.mark.parametrize("mode", ["agg", pytest.param("pd", marks=pytest.mark.slow)])
def test_drain_moves_every_request_with_its_kv(mode, request, workers, reference):
    """Drain by moving KV (agg: nixl, PD: grpc backend): the drained worker holds each request's
    pages, the worker the router picks fetches them and decodes on: the tokens are those of an
    uninterrupted run and nothing is recomputed there (no local prefill, every move in counted
    "moved"); the drained worker ends NOT_SERVING with 0 pages in use."""
    if mode == "agg":
        other, drained = workers[0], workers[1]["drain"]
    else:
        drained, other = request.getfixturevalue("pd_workers")
    resp, before, after = _drain_under_streams(drained, other, reference)
    assert resp.num_requests_moved == resp.num_requests_handed_back, resp  # every one was decoding
    assert resp.num_pages_moved >= resp.num_requests_moved
    prefills, moved, recomputed, pages = (a - b for a, b in zip(after, before))
    assert (prefills, moved, recomputed, pages) == (0, resp.num_requests_moved, 0, resp.num_pages_moved)


def test_drain_falls_back_to_recompute_when_the_target_cannot_fetch(workers, reference):
    """The drained worker sends KV over grpc, its target receives over nixl: the target's fetch is
    refused (another transfer backend), so it recomputes each request (--drain-timeout 1 frees the
    held pages on the drained worker); the tokens are still those of an uninterrupted run."""
    other, drained = workers[0], workers[1]["refused"]
    resp, before, after = _drain_under_streams(drained, other, reference)
    prefills, moved, recomputed, pages = (a - b for a, b in zip(after, before))
    assert resp.num_requests_moved == 0 and resp.num_pages_moved == 0, resp
    assert (moved, pages) == (0, 0)
    assert recomputed == prefills == resp.num_requests_handed_back


@pytest.fixture(scope="module")
def lora_workers(tmp_path_factory):
    """Two aggregated workers holding LoRA adapter "a" (the one to drain on a port below the
    ephemeral range, paused by its fault hook) and the router of uninterrupted runs under "a"."""
    from deploy.demo_lora import build_adapter

    model = demo_model()
    lora = ["--lora-paths", f"a={build_adapter(model, str(tmp_path_factory.mktemp('loras') / 'a'), rank=8, seed=1)}"]
    drained, other = start_many([("tandem.decode", agg_worker_args(model, *lora, "--port", str(free_ports(1)[0]))),
                                 ("tandem.decode", agg_worker_args(model, *lora))],
                                envs=[{"TANDEM_FAULT_PAUSE_AFTER_TOKENS": str(PAUSE_AT)}, None])
    app = make_router([other.grpc_address])
    wait_for(lambda: app.core.lora_names() == ["a"], timeout=30, what="the adapter listed")
    yield drained, other, lambda **sp: generate(app, f"{app.model_name}:a", **sp)
    app.stop()
    for p in (drained, other):
        p.stop()


def test_drain_moves_a_lora_request_under_its_adapter(lora_workers, reference):
    """Requests under a LoRA adapter move with their KV: the target fetches it under the same
    adapter (PrefillStart.lora_name, checked by the drained worker) and decodes on under it: the
    tokens are those of an uninterrupted run under the adapter, not the base model's, and nothing
    is recomputed on the target."""
    drained, other, under_a = lora_workers
    sp = dict(max_tokens=32, ignore_eos=True, temperature=0, frequency_penalty=0.5, logprobs=True, seed=100)
    assert under_a(**sp)[0] != reference(**sp)[0]  # the adapter changes the tokens
    resp, before, after = _drain_under_streams(drained, other, under_a, adapter="a")
    assert resp.num_requests_moved == resp.num_requests_handed_back >= 1, resp
    prefills, moved, recomputed, pages = (a - b for a, b in zip(after, before))
    assert (prefills, moved, recomputed, pages) == (0, resp.num_requests_moved, 0, resp.num_pages_moved)
