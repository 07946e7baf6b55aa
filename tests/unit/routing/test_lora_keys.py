"""The adapter is part of the router's prefix keys, value-for-value the engine's block hashes."""
from __future__ import annotations

from tandem.engine.radix_cache import RadixCache
from tandem.routing.block_hash import lora_root_hash
from tandem.routing.kv_index import KvIndex


def test_root_hash_matches_engine_and_separates_adapters():
    from tandem.engine import lora_root_hash as engine_root

    assert lora_root_hash(None) is None
    assert lora_root_hash("a") == engine_root("a") != lora_root_hash("b")


def test_engine_events_index_under_their_adapter_only():
    cache = RadixCache(4, lambda pages: None)
    events = []
    cache.subscribe(events.extend)
    toks = list(range(8))
    cache.insert(toks, [0, 1], 0, lora="a")
    cache.insert(toks, [2, 3], 0)
    idx = KvIndex()
    for ev in events:
        idx.store("w", ev.block_hashes, ev.token_ids, ev.block_size, ev.parent_block_hash, lora=ev.lora_name)
    assert idx.match(idx.request_keys(toks, "a")) == {"w": 2}
    assert idx.match(idx.request_keys(toks)) == {"w": 2}
    assert idx.match(idx.request_keys(toks, "b")) == {}
    # The router's keys are the engine's hashes (same function on both sides).
    a_hashes = [e for e in events if e.lora_name == "a"][0].block_hashes
    assert idx.request_keys(toks, "a") == a_hashes
    assert cache.match_prefix(toks, "b")[0] == [] and cache.match_prefix(toks, "a")[0] == [0, 1]
