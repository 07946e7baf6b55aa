"""An engine built for ranks mirrors every forward pass (``tandem.engine.forward_mirror``), in process.

The group is a stand-in with the engine-facing surface of ``ParallelGroup`` (``size``, ``lead``);
its mirror runs a replica follower as ``ParallelFollower.step`` does: a ``ModelRunner`` of its own
over a KV pool of the same shape, fed only the ``ForwardPass`` records it is handed. Every K/V the
leader writes must then be in the replica's pool at the same slots: a pass that escapes the mirror
(prefill, a chunk, a decode, a pass with prompt logprobs) leaves the replica behind.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from tandem.engine import EngineCore, SamplingParams
from tandem.engine.kv_pool import KVPool
from tandem.engine.model_runner import ModelRunner

CFG = dict(max_total_tokens=256, page_size=4, chunked_prefill_size=16, dtype="float32", device="cpu")
PROMPTS = ["Copyright (C) 2007 Free Software Foundation, Inc.", "for i in range(10):\n    print(i)\n", "yield"]


class ReplicaMirror:
    """A follower in this process: each pass handed to ``mirroring`` runs on the replica first."""

    def __init__(self, model, pool: KVPool):
        self.pool = KVPool(pool.num_layers, pool.num_pages, pool.page_size, pool.num_kv_heads, pool.head_dim,
                           pool.dtype, "cpu")
        self.runner = ModelRunner(model, self.pool, "cpu")
        self.leader_pool = pool
        self.passes = []
        self.accepts_external_kv = False
        self.failures = []
        self.inside = False
        self.shared = []  # sizes of the sampled tokens shared (overlap scheduling)
        self.status = torch.zeros(1, dtype=torch.int32)  # the custom all-reduce's status word, as on a GPU

    @contextlib.contextmanager
    def mirroring(self, fp):
        assert not self.inside, "passes do not nest"
        self.passes.append(fp)
        self.inside = True
        try:
            yield
        finally:
            self.inside = False
        # As ParallelFollower.step (after share_future, which the leader calls inside the block).
        self.runner.forward(fp.items(), eager=not fp.graph)

    def share_future(self, tokens):
        assert self.inside
        self.shared.append(tokens.numel())
        self.runner.future_buffer(tokens.numel()).copy_(tokens)  # the broadcast, in process

    def collective_status(self):
        return self.status

    def fail(self, why: str) -> RuntimeError:
        self.failures.append(why)
        return RuntimeError(f"the worker's parallel group is broken: {why}")


class OneFollowerGroup:
    """``ParallelGroup`` as ``EngineCore`` sees it: two ranks, ``lead`` opens the mirror."""

    size = 2

    def __init__(self):
        self.mirror = None
        self.lead_kwargs = None

    def lead(self, **kw):
        self.lead_kwargs = kw
        self.mirror = ReplicaMirror(kw["model"], kw["pool"])
        return self.mirror


@pytest.fixture(scope="module")
def built(demo_models):
    torch.set_num_threads(1)
    group = OneFollowerGroup()
    return EngineCore(demo_models["dense"], parallel=group, **CFG), group


def run(engine, requests) -> dict:
    rids = [engine.add_request(p, sp) for p, sp in requests]
    out = {r: [] for r in rids}
    while engine.has_work():
        for o in engine.step():
            assert o.error is None, o.error
            out[o.rid] += o.new_token_ids
    return out


def test_the_engine_built_for_ranks_mirrors_every_pass(built):
    engine, group = built
    mirror = group.mirror
    assert engine.mirror is mirror and engine.runner.mirror is mirror
    assert engine.overlap_schedule  # sampled tokens reach the followers on the device (share_future)
    kw = group.lead_kwargs
    assert kw["pool"] is engine.pool and kw["model"] is engine.model and kw["eplb"] is None
    assert kw["max_positions"] == engine.context_length + 1
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    logprobs = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    # Chunked prefill (a 16-token budget), decode, prompt logprobs; the batch twice (prefix hits).
    run(engine, [(p, greedy) for p in PROMPTS] + [(PROMPTS[1], logprobs)])
    run(engine, [(p, greedy) for p in PROMPTS])
    assert engine.stats().cached_tokens_total > 0
    assert len(mirror.passes) > 10
    assert any(len(ids) > 1 for fp in mirror.passes for _, ids, _ in fp.records)  # prefill chunks
    assert any(all(len(ids) == 1 for _, ids, _ in fp.records) for fp in mirror.passes)  # decodes
    assert mirror.shared and all(n == fp.future_count() for n, fp in
                                 zip(mirror.shared, [fp for fp in mirror.passes if fp.future_count()]))
    written = 0
    for mine, theirs in zip(engine.pool.k_buffers + engine.pool.v_buffers, mirror.pool.k_buffers + mirror.pool.v_buffers):
        assert torch.equal(mine, theirs)
        written += int(mine.count_nonzero())
    assert written > 0


def test_a_pass_runs_after_the_followers_got_it_and_not_twice(built):
    """The leader's pass runs inside ``mirroring`` (nothing else can be sent in between)."""
    engine, group = built
    mirror = group.mirror
    seen = []
    forward = engine.model.forward

    def spy(*args, **kw):
        seen.append(mirror.inside)
        return forward(*args, **kw)

    engine.model.forward = spy  # the replica's runner shares the model: its passes run outside
    try:
        n = len(mirror.passes)
        run(engine, [(PROMPTS[2], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))])
    finally:
        del engine.model.forward
    passes = len(mirror.passes) - n
    assert passes > 0 and seen.count(True) == passes and seen.count(False) == passes


def test_kv_written_from_outside_is_refused_without_receivers(built):
    engine, group = built
    alloc = engine.allocate_external(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0))
    engine.activate_external(alloc.rid, 5)
    n = len(group.mirror.passes)
    with pytest.raises(RuntimeError, match="needs a receiver on every rank"):
        engine.step()
    assert len(group.mirror.passes) == n  # nothing was sent
    engine.abort(alloc.rid)
    engine.step()
    assert engine.num_available_pages == engine.pool.num_pages


def test_a_failed_collective_breaks_the_group(built):
    """A collective of the leader's pass fails (a rank died): the error names the group as broken."""
    engine, group = built
    forward = engine.model.forward

    def dies(*args, **kw):
        if group.mirror.inside:  # the leader's pass (the replica's runs before it, on the same model)
            raise RuntimeError("Connection closed by peer")
        return forward(*args, **kw)

    engine.model.forward = dies
    rid = engine.add_request(PROMPTS[2], SamplingParams(max_tokens=2, temperature=0.0))
    try:
        with pytest.raises(RuntimeError, match="parallel group is broken: a collective of the forward pass failed: "
                                               "Connection closed by peer"):
            engine.step()
    finally:
        del engine.model.forward
        engine.abort(rid)
        engine.step()
    assert group.mirror.failures == ["a collective of the forward pass failed: Connection closed by peer"]


def test_a_collective_that_gave_up_on_a_peer_drops_its_step(built):
    """A custom all-reduce whose barrier timed out (a peer rank died) leaves its sums incomplete and sets
    its status word: the step that reads it raises with the group broken, and none of its tokens
    reach the request (they came from those sums)."""
    engine, group = built
    mirror = group.mirror
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    got, before = [], len(mirror.failures)
    try:
        for _ in range(4):  # prefill and a few decodes, healthy
            got += [t for o in engine.step() if o.rid == rid for t in o.new_token_ids]
        assert got and len(mirror.failures) == before
        mirror.status[0] = 1  # the next pass's all-reduce gave up (as the kernel writes it)
        with pytest.raises(RuntimeError, match="parallel group is broken: a custom all-reduce gave up waiting for a "
                                               "peer rank"):
            for _ in range(3):  # with overlap scheduling the step that resolves it is the next one
                got += [t for o in engine.step() if o.rid == rid for t in o.new_token_ids]
        assert len(mirror.failures) == before + 1 and "its tokens were dropped" in mirror.failures[-1]
        assert len(got) < 20
    finally:
        mirror.status[0] = 0
        engine.abort(rid)
        while engine.has_work():
            engine.step()
