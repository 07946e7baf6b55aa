"""Tensor parallelism across processes (gloo, loopback, one torch thread per rank) on the demo models.

The leader engine runs in this process and holds its shard of every layer; the followers are
spawned processes holding the others. Against a one-rank engine with the same batches (both wait
for each step's tokens), float32: tokens identical and logprobs within 1e-4 over greedy and seeded
requests, prefix-cache hits, chunked prefill and retraction in a small pool. A follower killed
mid-request fails the request with an error and marks the group broken; nothing is left running.
"""
from __future__ import annotations

import pytest
import torch
from tandem.config.schemas import EngineConfig
from tandem.engine import EngineCore, SamplingParams
from tandem.engine.parallel import start_parallel

from tests.support.models import demo_model

pytestmark = pytest.mark.timeout(300)

# A small pool (retraction), short chunks (chunked prefill), the batch twice (prefix hits).
CFG = dict(max_total_tokens=112, page_size=4, chunked_prefill_size=16, dtype="float32", device="cpu",
           disable_overlap_schedule=True)
# A shared prefix (two prompts), code, a license line and a one-token prompt.
LICENSE = "Copyright (C) 2007 Free Software Foundation, Inc."
PROMPTS = [LICENSE, LICENSE + " Everyone is permitted to copy", "for i in range(10):\n    print(i)\n",
           "from collections import OrderedDict\n", 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY', "yield"]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=True)
SEEDED = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True, logprobs=True)


def generate(engine):
    """The batch twice (the second time with prefix hits): tokens and logprobs per request."""
    out = []
    for _ in range(2):
        sps = [GREEDY, SEEDED] * (len(PROMPTS) // 2)
        rids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, sps)]
        toks, lps = {r: [] for r in rids}, {r: [] for r in rids}
        while engine.has_work():
            for o in engine.step():
                assert o.error is None, o.error
                toks[o.rid] += o.new_token_ids
                lps[o.rid] += o.new_logprobs
        out += [(toks[r], lps[r]) for r in rids]
    assert engine.num_available_pages == engine.pool.num_pages
    return out


@pytest.fixture(scope="module")
def one_rank():
    """The one-rank reference of a demo model, computed once per module: (path, outputs, stats)."""
    torch.set_num_threads(1)
    done = {}

    def get(name):
        if name not in done:
            path = demo_model(name)
            engine = EngineCore(path, **CFG)
            done[name] = path, generate(engine), engine.stats()
        return done[name]

    return get


# ep_size 1: MoE experts sharded along their intermediate size; 2: whole experts placed by EP.
@pytest.mark.parametrize("name,ep_size", [("tandem-demo-dense", 1), ("tandem-demo-moe", 1), ("tandem-demo-moe", 2)])
def test_two_ranks_match_one_rank(one_rank, name, ep_size):
    path, want, one_stats = one_rank(name)
    leader = start_parallel(EngineConfig(model_path=path, tp_size=2, ep_size=ep_size, **CFG), num_threads=1,
                            timeout_s=120)
    try:
        engine = leader.engine
        assert engine.pool.num_kv_heads == 1  # 2 KV heads over 2 ranks
        got = generate(engine)
        stats = engine.stats()
    finally:
        leader.close()
    for p in leader.processes:
        assert p.exitcode == 0, f"follower exited with {p.exitcode}"
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, g), (_, w) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
    # The same schedule as one rank: retraction and prefix hits happened in both.
    assert stats.num_retracted_total == one_stats.num_retracted_total > 0
    assert stats.cached_tokens_total == one_stats.cached_tokens_total > 0


def test_two_ranks_with_overlap_scheduling_match_one_rank(one_rank):
    """Overlap scheduling with TP: a pass is sent while its requests' newest tokens are still being
    sampled; rank 0 shares them on the device (``share_future``) and the follower resolves the same
    placeholders. Tokens equal the one-rank engine's (which runs without overlap)."""
    path, want, _ = one_rank("tandem-demo-dense")
    leader = start_parallel(EngineConfig(model_path=path, tp_size=2, **{**CFG, "disable_overlap_schedule": False}),
                            num_threads=1, timeout_s=120)
    try:
        assert leader.engine.overlap_schedule
        got = generate(leader.engine)
        shared = leader.messages_sent["future"]
    finally:
        leader.close()
    for p in leader.processes:
        assert p.exitcode == 0, f"follower exited with {p.exitcode}"
    assert shared > 0  # passes really read tokens still being sampled
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, g), (_, w) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)


def test_a_killed_follower_fails_the_request_and_breaks_the_group():
    torch.set_num_threads(1)
    path = demo_model("tandem-demo-dense")
    leader = start_parallel(EngineConfig(model_path=path, tp_size=2, **CFG), num_threads=1, timeout_s=30)
    engine = leader.engine
    try:
        rid = engine.add_request(PROMPTS[0], GREEDY)
        engine.step()  # the prompt's forward pass ran on both ranks
        follower = leader.processes[0]
        follower.kill()
        follower.join(10)
        with pytest.raises(RuntimeError, match="parallel group is broken: rank 1 .* exited with code -9"):
            while engine.has_work():
                engine.step()
        assert leader.failure is not None
        engine.abort(rid)
        with pytest.raises(RuntimeError, match="parallel group is broken"):  # every later step too
            engine.add_request(PROMPTS[1], GREEDY)
            engine.step()
    finally:
        leader.close()
    assert all(not p.is_alive() for p in leader.processes)
