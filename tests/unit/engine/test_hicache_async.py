"""HiCache copies are asynchronous: the engine keeps stepping while they run, and the pages of a
copy in flight are never evicted, freed or reused until it reports done. The copies here run at
once (so the data is right) but report done only when the test says so: no sleeps, no timing."""
from __future__ import annotations

import random

import pytest
from tandem.engine import SamplingParams
from tandem.hicache.controller import SyncCopies

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PS = 16


class Gate:
    def __init__(self):
        self.open = False

    def done(self) -> bool:
        return self.open

    def wait(self) -> None:
        raise AssertionError("the engine waited for a copy the test holds in flight")


class GatedCopies(SyncCopies):
    """Copies run when issued; while ``hold`` is on, each reports done only once its gate opens."""

    def __init__(self):
        self.hold = True
        self.gates: list[Gate] = []

    def _gate(self):
        if not self.hold:
            return super().backup(lambda: None)
        self.gates.append(Gate())
        return self.gates[-1]

    def backup(self, copy):
        copy()
        return self._gate()

    def load(self, copy_layer, num_layers):
        for layer in range(num_layers):
            copy_layer(layer)
        return self._gate(), None

    def release(self) -> None:
        self.hold = False
        for g in self.gates:
            g.open = True


def _prompt(seed: int, n: int = 256) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 8000) for _ in range(n)]


@pytest.fixture(scope="module")
def reference(dense_llm):
    return {s: dense_llm.generate([_prompt(s)], GREEDY)[0].token_ids for s in (1, 2)}


def _gated_engine(make_llm, demo_models, **kw):
    llm = make_llm(demo_models["dense"], enable_hierarchical_cache=True, max_total_tokens=512, **kw)  # 32 pages
    copies = llm.engine.hicache.copies = GatedCopies()
    return llm, llm.engine, copies


def _finish(eng, copies) -> None:
    copies.release()
    eng.cache.poll()
    assert not eng.hicache.busy


def _run(eng, prompt) -> list:
    rid, tokens = eng.add_request(prompt, GREEDY), []
    while rid in eng.requests:
        tokens += [t for o in eng.step() if o.rid == rid for t in o.new_token_ids]
    return tokens


def test_backup_in_flight_is_never_evicted_nor_overwritten(make_llm, demo_models, reference):
    llm, eng, copies = _gated_engine(make_llm, demo_models)
    a = _prompt(1)
    assert _run(eng, a) == reference[1]
    held = list(eng.cache._all_nodes())  # noqa: SLF001 (the test inspects the tree)
    assert len(held) == 16 and len(copies.gates) == 1 and all(n.io_busy for n in held)
    dev, host = [n.page for n in held], [n.host_page for n in held]
    assert eng.cache.evictable_pages == 0 and eng.cache.evict(32) == 0  # in a copy: not evictable
    # B needs 17 pages, 16 are free, the other 16 are in the copy: B waits, the engine steps on.
    rid = eng.add_request(_prompt(2), GREEDY)
    for _ in range(5):
        assert eng.step() == []
    assert [n.page for n in held] == dev and [n.host_page for n in held] == host
    assert not set(dev) & set(eng.pool._free) and not set(host) & set(eng.hicache.host._free)  # noqa: SLF001
    assert rid in eng.requests and eng.requests[rid].pages == []
    # The copy is done: B evicts A (now on host) and runs; A comes back from host intact.
    copies.release()
    tokens = []
    while rid in eng.requests:
        tokens += [t for o in eng.step() if o.rid == rid for t in o.new_token_ids]
    assert tokens == reference[2]
    eng.cache.evict(eng.cache.evictable_pages)  # A to host entirely (B took one of its pages)
    out = llm.generate([a], GREEDY)[0]
    assert out.token_ids == reference[1] and eng.hicache.counters.host_hit_tokens == 15 * PS
    _finish(eng, copies)


def test_engine_keeps_stepping_while_copies_are_in_flight(make_llm, demo_models, reference, dense_llm):
    llm, eng, copies = _gated_engine(make_llm, demo_models)
    a, short = _prompt(1), _prompt(9, 40)
    want_short = dense_llm.generate([short], GREEDY)[0].token_ids
    assert _run(eng, a) == reference[1]
    assert _run(eng, short) == want_short  # A's backup still in flight: other work runs meanwhile
    assert eng.hicache.busy and not any(g.open for g in copies.gates)
    # Load-back in flight: A is evicted (its copy done first), then loaded back under a held gate.
    copies.release()
    eng.cache.poll()
    eng.cache.evict(eng.cache.evictable_pages)
    copies.hold = True
    assert _run(eng, a) == reference[1]  # the forward pass ran; the load reports done later
    loaded = [n for n in eng.cache._all_nodes() if n.io_busy]  # noqa: SLF001
    assert len(loaded) == 15 and all(n.page >= 0 and n.host_page >= 0 for n in loaded)
    assert eng.cache.evict(64) == 1  # only A's 16th page (recomputed): the loaded ones are in the copy
    assert all(n.page >= 0 for n in loaded)
    _finish(eng, copies)
    assert eng.cache.evict(64) == 15


def test_write_through_backs_up_each_prefill_chunk(make_llm, demo_models, reference):
    """A long prompt is backed up chunk by chunk, while the next chunk computes."""
    llm = make_llm(demo_models["dense"], enable_hierarchical_cache=True, max_total_tokens=512,
                   chunked_prefill_size=64)
    eng = llm.engine
    rid = eng.add_request(_prompt(1), GREEDY)
    on_host = []
    while rid in eng.requests:
        eng.step()
        on_host.append(eng.hicache.host.num_used_pages)
    assert on_host[:4] == [4, 8, 12, 16]  # 64-token chunks: 4 pages each


def test_backups_the_host_cannot_take_are_counted(make_llm, demo_models):
    llm = make_llm(demo_models["dense"], enable_hierarchical_cache=True, max_total_tokens=512, hicache_ratio=2.0)
    eng, c = llm.engine, llm.engine.hicache.counters
    ctl = eng.hicache
    ctl.host.alloc(ctl.host.num_pages - 10)  # the host pool has 10 pages left for 16 prompt pages
    llm.generate([_prompt(1)], GREEDY)
    assert c.backup_skipped_pages == 6 and ctl.host.num_free_pages == 0
    eng.cache.wait_io()
