"""HiCache in the engine: prefixes evicted from the device come back from host or storage with
the same tokens; write policies; corrupt storage pages are recomputed; no page leaks."""
from __future__ import annotations

import os
import random

import pytest
from tandem.engine import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PS = 16
DEVICE_TOKENS = 512  # 32 pages: two more 256-token prompts (17 pages each) evict the first


def _prompt(seed: int, n: int = 256) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 8000) for _ in range(n)]


def _hi(make_llm, demo_models, **kw):
    kw.setdefault("max_total_tokens", DEVICE_TOKENS)
    if kw.get("hicache_storage_backend"):
        kw.setdefault("hicache_storage_prefetch_policy", "wait_complete")
    return make_llm(demo_models["dense"], enable_hierarchical_cache=True, **kw)


def _tokens(llm, prompt):
    return llm.generate([prompt], GREEDY)[0].token_ids


def _evict_by_pressure(llm, *seeds):
    for s in seeds:
        _tokens(llm, _prompt(s))


def _check_tiers(eng):
    """Every host page is held by exactly one tree node; device pages are all accounted for."""
    ctl, cache = eng.hicache, eng.cache
    assert ctl.host.num_used_pages == cache.num_host_nodes
    nodes = list(cache._all_nodes())  # noqa: SLF001 (test inspects the tree)
    assert all(n.page >= 0 or n.host_page >= 0 for n in nodes)
    assert all(n.parent.page >= 0 for n in nodes if n.page >= 0 and n.parent is not cache.root)
    assert sum(n.page >= 0 for n in nodes) == cache.num_pages
    assert sorted(n.host_page for n in nodes if n.host_page >= 0) == sorted(
        set(range(ctl.host.num_pages)) - set(ctl.host._free))  # noqa: SLF001


@pytest.fixture(scope="module")
def reference(dense_llm):
    return {s: _tokens(dense_llm, _prompt(s)) for s in (1, 2, 3)}


@pytest.mark.parametrize("layout,io", [("layer_first", "direct"), ("page_first", "kernel")])
def test_host_load_back_same_tokens(make_llm, demo_models, reference, layout, io):
    llm = _hi(make_llm, demo_models, hicache_mem_layout=layout, hicache_io_backend=io)
    eng, a = llm.engine, _prompt(1)
    assert _tokens(llm, a) == reference[1]
    _evict_by_pressure(llm, 2, 3)
    assert eng.cached_prefix_tokens(a) == 0  # gone from the device
    out = llm.generate([a], GREEDY)[0]
    assert out.token_ids == reference[1]
    c = eng.hicache.counters
    assert c.host_hit_tokens == 15 * PS and out.cached_tokens == 15 * PS
    assert c.load_back_bytes == 15 * eng.hicache.host.bytes_per_page
    st = eng.stats()
    assert st.hicache_host_hit_tokens_total == 15 * PS and st.hicache_host_total_pages == 64
    assert st.hicache_host_used_pages == eng.hicache.host.num_used_pages > 0
    _check_tiers(eng)


def test_write_policies(make_llm, demo_models, reference):
    a = _prompt(1)
    on_host = {}
    for policy in ("write_through", "write_through_selective", "write_back"):
        llm = _hi(make_llm, demo_models, hicache_write_policy=policy)
        host = llm.engine.hicache.host
        _tokens(llm, a)
        after_one = host.num_used_pages
        _tokens(llm, a)
        after_two = host.num_used_pages
        _evict_by_pressure(llm, 2, 3)
        out = llm.generate([a], GREEDY)[0]
        assert out.token_ids == reference[1]
        on_host[policy] = (after_one, after_two, llm.engine.hicache.counters.host_hit_tokens)
        _check_tiers(llm.engine)
    # write_through: all 16 full prompt pages on host after one request; selective: only once hit
    # twice (the second request hits the 15 pages it matched); write_back: only on eviction.
    assert on_host["write_through"][:2] == (16, 16)
    assert on_host["write_through_selective"][:2] == (0, 15)
    assert on_host["write_back"][:2] == (0, 0)
    assert all(hits == 15 * PS for _, _, hits in on_host.values())


def test_storage_survives_restart_and_rejects_corrupt_pages(make_llm, demo_models, reference, tmp_path):
    store = str(tmp_path / "kv")
    first = _hi(make_llm, demo_models, hicache_storage_backend="file", hicache_storage_dir=store)
    a = _prompt(1)
    assert _tokens(first, a) == reference[1]
    first.engine.hicache.flush_storage()  # written on a background thread
    assert first.engine.hicache.counters.storage_write_tokens == 16 * PS
    # A new engine (a restarted worker) over the same folder: served from storage.
    second = _hi(make_llm, demo_models, hicache_storage_backend="file", hicache_storage_dir=store)
    out = second.generate([a], GREEDY)[0]
    assert out.token_ids == reference[1]
    assert second.engine.hicache.counters.storage_hit_tokens == 15 * PS and out.cached_tokens == 15 * PS
    _check_tiers(second.engine)
    second.engine.hicache.flush_storage()
    # Corrupt the 6th page (one flipped byte) and truncate the 11th: recomputed from there on.
    folder = second.engine.hicache.storage.dir
    keys = _chain_keys(a)
    with open(os.path.join(folder, f"{keys[5]:016x}.kv"), "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(os.path.join(folder, f"{keys[10]:016x}.kv"), "r+b") as f:
        f.truncate(200)
    third = _hi(make_llm, demo_models, hicache_storage_backend="file", hicache_storage_dir=store)
    out = third.generate([a], GREEDY)[0]
    c = third.engine.hicache.counters
    assert out.token_ids == reference[1]
    # Pages are read in parallel: the truncated 11th may have been read (and found bad) too.
    assert c.storage_hit_tokens == 5 * PS and third.engine.hicache.storage_corrupt_pages in (1, 2)
    third.engine.hicache.flush_storage()
    # The recomputed pages were written again: a fourth engine gets all of them.
    fourth = _hi(make_llm, demo_models, hicache_storage_backend="file", hicache_storage_dir=store)
    assert _tokens(fourth, a) == reference[1]
    assert fourth.engine.hicache.counters.storage_hit_tokens == 15 * PS


def _chain_keys(tokens):
    from tandem.engine import block_hash

    keys, h = [], None
    for i in range(len(tokens) // PS):
        h = block_hash(h, tuple(tokens[i * PS:(i + 1) * PS]))
        keys.append(h)
    return keys


def test_pressure_many_concurrent_requests_no_leak(make_llm, demo_models, dense_llm, tmp_path):
    # 12 requests over 3 shared 128-token prefixes, host pool only 2x the device: every tier full.
    prefixes = [_prompt(10 + i, 128) for i in range(3)]
    prompts = [prefixes[i % 3] + _prompt(100 + i, 40) for i in range(12)]
    want = [o.token_ids for o in dense_llm.generate(prompts, GREEDY)]
    llm = _hi(make_llm, demo_models, max_total_tokens=512, hicache_mem_layout="page_first",
              hicache_write_policy="write_back", hicache_storage_backend="file", hicache_storage_dir=str(tmp_path))
    for _ in range(2):
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want
        _check_tiers(llm.engine)
    assert llm.engine.hicache.counters.host_hit_tokens > 0
    assert llm.engine.flush_cache() and llm.engine.hicache.host.num_used_pages == 0


def test_flags_checked_at_start(make_llm, demo_models):
    with pytest.raises(ValueError, match="needs --enable-hierarchical-cache"):
        make_llm(demo_models["dense"], hicache_storage_backend="file")
    with pytest.raises(ValueError, match="drop --disable-radix-cache"):
        _hi(make_llm, demo_models, disable_radix_cache=True)


def test_nixl_storage_backend(make_llm, demo_models, reference, tmp_path):
    """The nixl backend (NIXL's POSIX plugin moves the bytes) writes files the file backend reads."""
    store = str(tmp_path / "kv")
    first = _hi(make_llm, demo_models, hicache_storage_backend="nixl", hicache_storage_dir=store)
    a = _prompt(1)
    assert _tokens(first, a) == reference[1]
    first.engine.hicache.flush_storage()
    for backend in ("nixl", "file"):
        again = _hi(make_llm, demo_models, hicache_storage_backend=backend, hicache_storage_dir=store)
        assert _tokens(again, a) == reference[1]
        assert again.engine.hicache.counters.storage_hit_tokens == 15 * PS


def test_kv_events_carry_the_tier(make_llm, demo_models):
    from tandem.engine import BlockRemoved, BlockStored

    llm = _hi(make_llm, demo_models)
    events = []
    llm.engine.subscribe_kv_events(events.extend)
    a = _prompt(1)
    _tokens(llm, a)
    stored = {t: {h for e in events if isinstance(e, BlockStored) and e.tier == t for h in e.block_hashes}
              for t in ("device", "host")}
    keys = set(_chain_keys(a))
    assert stored["device"] == stored["host"] == keys  # write_through: computed and backed up
    events.clear()
    _evict_by_pressure(llm, 2, 3)
    removed = {h for e in events if isinstance(e, BlockRemoved) and e.tier == "device" for h in e.block_hashes}
    assert keys <= removed
    snap = llm.engine.kv_snapshot()
    assert keys <= {h for e in snap if e.tier == "host" for h in e.block_hashes}
    assert not keys & {h for e in snap if e.tier == "device" for h in e.block_hashes}


def test_forward_calls_layer_ready_before_each_layer(make_llm, demo_models, monkeypatch):
    """The hook a CUDA load-back uses to make layer i wait for its own pages only (the
    controller hands it out once per pending load; on CPU it has none, so fake one)."""
    llm = _hi(make_llm, demo_models)
    eng, seen = llm.engine, []
    hooks = iter([seen.append])  # one pending load, then none
    monkeypatch.setattr(eng.hicache, "take_layer_ready", lambda: next(hooks, None))
    rid = eng.add_request(_prompt(4, 40), GREEDY)
    while eng.has_work():
        eng.step()
    assert seen == list(range(eng.model_config.num_layers))  # the first forward only
    assert not hasattr(eng.runner, "layer_ready") and rid not in eng.requests  # it travels with the batch
    with pytest.raises(ValueError, match="ep-size"):
        _hi(make_llm, demo_models, ep_size=2)


def test_idle_engine_waits_for_a_storage_prefetch_instead_of_spinning(make_llm, demo_models, reference, tmp_path):
    """While the only request waits for its prefix from storage, a step blocks on the read: a
    loop of empty steps would hold the GIL the prefetch thread needs between reads (on an H200
    that made a 2k-prefix storage hit 1000x slower than recomputing it)."""
    import time

    store = str(tmp_path / "kv")
    first = _hi(make_llm, demo_models, hicache_storage_backend="file", hicache_storage_dir=store)
    a = _prompt(1)
    _tokens(first, a)
    first.engine.hicache.flush_storage()
    eng = _hi(make_llm, demo_models, hicache_storage_backend="file", hicache_storage_dir=store).engine
    storage, read = eng.hicache.storage, eng.hicache.storage.read_into

    def slow_read(*args):
        time.sleep(0.02)  # a slow disk: 15 pages take at least 0.3 s over the reader threads
        return read(*args)

    storage.read_into = slow_read
    rid = eng.add_request(a, GREEDY)
    steps, tokens, done = 0, [], False
    while not done:
        outs = [o for o in eng.step() if o.rid == rid]
        steps += 1
        tokens += [t for o in outs for t in o.new_token_ids]
        done = any(o.finished for o in outs)
    assert tokens == reference[1]
    assert eng.hicache.counters.storage_hit_tokens == 15 * PS
    # Each idle step blocks up to 10 ms on the read: a few dozen while the 15 pages arrive, not
    # the thousands of a busy loop (a bound on the count of steps, not on time).
    assert steps < 300, steps


def test_storage_size_limit_keeps_the_newest_chains(make_llm, demo_models, reference, tmp_path):
    store = str(tmp_path / "kv")
    page_file = 32 + PS * 8 + 131072  # header, token ids, K/V of the demo model's 16-token page
    llm = _hi(make_llm, demo_models, hicache_storage_backend="file", hicache_storage_dir=store,
              hicache_storage_max_bytes=20 * page_file)
    for s in (1, 2, 3):
        assert _tokens(llm, _prompt(s)) == reference[s]
        llm.engine.cache.wait_io()  # chains written one after the other (each in parallel)
    storage = llm.engine.hicache.storage
    assert storage.used_bytes == 20 * page_file and storage.num_evicted == 28
    assert sum(os.path.getsize(os.path.join(storage.dir, f)) for f in os.listdir(storage.dir)) == 20 * page_file
    keys = {s: _chain_keys(_prompt(s)) for s in (1, 2, 3)}
    assert not any(storage.exists(k) for k in keys[1])  # the oldest chain, whole
    assert [storage.exists(k) for k in keys[2]] == [True] * 4 + [False] * 12  # the next, from its tail
    assert all(storage.exists(k) for k in keys[3])
    again = _hi(make_llm, demo_models, hicache_storage_backend="file", hicache_storage_dir=store,
                hicache_storage_max_bytes=20 * page_file)
    assert _tokens(again, _prompt(3)) == reference[3]
    assert again.engine.hicache.counters.storage_hit_tokens == 15 * PS


def test_host_pages_for_a_storage_read_never_take_the_prefix_being_loaded(make_llm, demo_models, reference, tmp_path):
    """A prefix half on host, half in storage, with the host pool full: the host pages the storage
    read needs are found by evicting other host pages, never the host half about to be loaded."""
    llm = _hi(make_llm, demo_models, hicache_storage_backend="file", hicache_storage_dir=str(tmp_path))
    eng, a = llm.engine, _prompt(1)
    assert _tokens(llm, a) == reference[1]  # A's 16 pages: on host and in storage
    eng.cache.wait_io()
    eng.flush_cache()
    _tokens(llm, a[:128] + _prompt(50, 64))  # A's first 8 pages back (from storage) + 4 others
    for seed in (51, 52, 53):
        _tokens(llm, _prompt(seed))
    _tokens(llm, _prompt(54, 72))
    eng.cache.wait_io()
    eng.cache.evict(eng.cache.evictable_pages)
    assert eng.hicache.host.num_free_pages == 0  # 8 + 4 + 3 x 16 + 4 pages: the host pool is full
    before = eng.hicache.counters.storage_hit_tokens
    out = llm.generate([a], GREEDY)[0]
    assert out.token_ids == reference[1] and out.cached_tokens == 15 * PS
    assert eng.hicache.counters.storage_hit_tokens - before == 7 * PS  # A's pages 9-15 from storage
    eng.cache.wait_io()
    _check_tiers(eng)
