"""Request migration (--migration-limit) in the router, over scripted workers: a worker that
fails mid-stream hands the request to another one with the tokens so far (output_ids); the
client's stream goes on with no gap and no repeat, usage counts the original prompt, logprobs
continue, a stop string across the seam is found; limit 0 gives the error as before."""
from __future__ import annotations

import grpc
import pytest
from routing_fake_worker import FakeWorker
from tandem.config import RouterConfig
from tandem.router.app import build_router
from tandem.v1 import common_pb2, router_pb2

from tests.support.grpc_router import router_stub
from tests.support.waiting import wait_for

REPLY = "Hello world! Streaming text with émojis 🦊 and 漢字, then some more words at the end."
CUT = 5  # the first worker fails after streaming this many tokens


@pytest.fixture
def stack(tiny_model_dir, hf_tokenizer):
    made = []

    def make(**kw):
        ids = hf_tokenizer(REPLY)["input_ids"]
        workers = sorted([FakeWorker(ids, tokenizer=hf_tokenizer), FakeWorker(ids, tokenizer=hf_tokenizer)],
                         key=lambda w: w.address)
        workers[0].servicer.fail_after = CUT  # round_robin's first pick: the lowest worker id
        cfg = RouterConfig(model_path=tiny_model_dir, workers=[w.address for w in workers], http_port=0,
                           health_check_interval=3600, routing_policy="round_robin", **kw)
        app = build_router(cfg)
        app.start()
        made.append((app, workers))
        wait_for(lambda: len(app.core.pool.healthy()) == 2, what="workers healthy")
        return app, workers, ids

    yield make
    for app, workers in made:
        app.stop()
        for w in workers:
            w.stop()


def generate(app, **sampling):
    with router_stub(app) as stub:
        req = router_pb2.RouterGenerateRequest(text="Hi there", sampling=common_pb2.SamplingParams(**sampling))
        return list(stub.Generate(req, timeout=30))


def migrations(app, kind="ongoing_request"):
    return app.registry.get_sample_value("dynamo_frontend_model_migration_total",
                                         {"model": app.model_name, "migration_type": kind}) or 0


def test_a_failed_worker_is_replaced_mid_stream(stack, hf_tokenizer):
    app, workers, ids = stack(migration_limit=1)
    chunks = generate(app, max_tokens=100, logprobs=True, top_logprobs=1)
    got = [t for c in chunks for t in c.token_ids]
    assert got == ids  # no gap, no repeat
    assert "".join(c.text for c in chunks) == REPLY
    assert sum(len(c.logprobs) for c in chunks) == len(ids)  # logprobs continue after the seam
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == len(hf_tokenizer("Hi there")["input_ids"])
    assert last.usage.completion_tokens == len(ids)
    first, second = workers[0].servicer.requests, workers[1].servicer.requests
    assert len(first) == len(second) == 1
    assert list(first[0].output_ids) == [] and list(second[0].output_ids) == ids[:CUT]
    assert list(second[0].input_ids) == list(first[0].input_ids)  # the prompt stays the original one
    assert second[0].sampling.max_tokens == 100 and second[0].sampling.logprobs
    assert migrations(app) == 1


def test_a_stop_string_across_the_seam_is_found(stack, hf_tokenizer):
    app, workers, ids = stack(migration_limit=1)
    before = hf_tokenizer.decode(ids[:CUT])
    after = hf_tokenizer.decode(ids[:CUT + 2])
    stop = after[len(before) - 2:len(before) + 2]
    assert stop not in before and len(stop) == 4
    chunks = generate(app, max_tokens=100, stop=[stop])
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert "".join(c.text for c in chunks) == before[:-2]
    assert migrations(app) == 1


def test_prompt_logprobs_are_not_asked_for_again(stack):
    app, workers, ids = stack(migration_limit=1)
    generate(app, max_tokens=100, prompt_logprobs=0)
    assert workers[0].servicer.requests[0].sampling.HasField("prompt_logprobs")
    assert not workers[1].servicer.requests[0].sampling.HasField("prompt_logprobs")


def test_without_migration_the_client_gets_the_error(stack):
    app, workers, ids = stack()  # --migration-limit 0 (the default)
    with pytest.raises(grpc.RpcError) as e:
        generate(app, max_tokens=100)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "mid-stream" in e.value.details()
    assert not workers[1].servicer.requests and migrations(app) == 0


def test_migrations_stop_at_the_limit(stack):
    app, workers, ids = stack(migration_limit=1)
    workers[1].servicer.fail_after = CUT + 3  # the second worker fails too: a second migration is refused
    with pytest.raises(grpc.RpcError) as e:
        generate(app, max_tokens=100)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert migrations(app) == 1


def test_a_request_handed_over_with_its_kv_goes_on_elsewhere_with_its_source(stack):
    """A draining worker ends the stream with TokenChunk.move: the next worker gets the tokens
    so far and where to fetch their KV (kv_source); the client sees every token once."""
    app, workers, ids = stack(migration_limit=1)
    workers[0].servicer.fail_after, workers[0].servicer.move_after = None, CUT
    chunks = generate(app, max_tokens=100)
    assert [t for c in chunks for t in c.token_ids] == ids
    second = workers[1].servicer.requests[0]
    assert list(second.output_ids) == ids[:CUT]
    assert second.kv_source.address == "held-here:1" and second.kv_source.move_id == "m-1"
    assert not workers[0].servicer.requests[0].HasField("kv_source")
    assert migrations(app) == 1


def test_a_migrated_request_keeps_its_lora_adapter(tiny_model_dir, hf_tokenizer):
    """The re-send names the request's adapter and goes only to a worker holding it: the third
    worker, without the adapter, never sees the request."""
    ids = hf_tokenizer(REPLY)["input_ids"]
    workers = sorted([FakeWorker(ids, tokenizer=hf_tokenizer) for _ in range(3)], key=lambda w: w.address)
    holders, other = workers[:2], workers[2]
    for w in holders:
        w.servicer.load.lora_names.append("sql")
    holders[0].servicer.fail_after = CUT  # round_robin's first pick among the holders: the lowest worker id
    cfg = RouterConfig(model_path=tiny_model_dir, workers=[w.address for w in workers], http_port=0,
                       health_check_interval=3600, routing_policy="round_robin", migration_limit=1)
    app = build_router(cfg)
    app.start()
    try:
        wait_for(lambda: len(app.core.pool.healthy()) == 3 and app.core.lora_names() == ["sql"],
                 what="workers healthy, the adapter listed")
        with router_stub(app) as stub:
            req = router_pb2.RouterGenerateRequest(text="Hi there", model=f"{app.model_name}:sql",
                                                   sampling=common_pb2.SamplingParams(max_tokens=100))
            chunks = list(stub.Generate(req, timeout=30))
        assert [t for c in chunks for t in c.token_ids] == ids
        first, second = holders[0].servicer.requests, holders[1].servicer.requests
        assert len(first) == len(second) == 1 and not other.servicer.requests
        assert first[0].lora_name == second[0].lora_name == "sql"
        assert list(second[0].output_ids) == ids[:CUT]
        assert migrations(app) == 1
    finally:
        app.stop()
        for w in workers:
            w.stop()
