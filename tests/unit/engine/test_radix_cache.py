"""Radix cache: chained block hashes, events, LRU eviction, locking; MoE routing hooks."""
from __future__ import annotations

import torch
from tandem.engine import AllBlocksCleared, BlockRemoved, BlockStored, SamplingParams, block_hash
from tandem.engine.kv_pool import KVPool
from tandem.engine.radix_cache import RadixCache


def make(page_size=4, pages=16):
    pool = KVPool(1, pages, page_size, 1, 2, torch.float32, "cpu")
    cache = RadixCache(page_size, pool.free)
    events = []
    cache.subscribe(events.extend)
    return pool, cache, events


def test_insert_match_events_and_hash_chain():
    pool, cache, events = make()
    toks = list(range(10))  # 2 full pages + 2 tokens
    pages = pool.alloc(3)
    cache.insert(toks, pages, 0)
    assert pool.num_free_pages == 14  # the partial page went back
    (ev,) = events
    assert isinstance(ev, BlockStored) and ev.parent_block_hash is None and ev.block_size == 4
    h0 = block_hash(None, [0, 1, 2, 3])
    assert ev.block_hashes == [h0, block_hash(h0, [4, 5, 6, 7])] and ev.token_ids == list(range(8))
    matched, node = cache.match_prefix(list(range(9)))
    assert matched == pages[:2]
    # extend the chain: the event names its parent
    cache.lock(node)
    more = pool.alloc(1)
    cache.insert(list(range(12)), pages[:2] + more, 2)
    cache.unlock(node)
    assert events[-1].parent_block_hash == ev.block_hashes[-1] and events[-1].token_ids == [8, 9, 10, 11]
    assert cache.num_pages == cache.evictable_pages == 3


def test_lru_eviction_respects_locks():
    pool, cache, events = make()
    a, b = pool.alloc(1), pool.alloc(1)
    cache.insert([1, 1, 1, 1], a, 0)
    cache.insert([2, 2, 2, 2], b, 0)
    _, node_b = cache.match_prefix([2, 2, 2, 2])  # b most recently used, and locked
    cache.lock(node_b)
    assert cache.evict(2) == 1  # only a can go
    assert isinstance(events[-1], BlockRemoved) and events[-1].block_hashes == [block_hash(None, [1, 1, 1, 1])]
    cache.unlock(node_b)
    assert cache.reset() and isinstance(events[-1], AllBlocksCleared)
    assert pool.num_free_pages == 16


def test_duplicate_pages_are_freed():
    pool, cache, _ = make()
    p1, p2 = pool.alloc(1), pool.alloc(1)
    cache.insert([5, 5, 5, 5], p1, 0)
    cache.insert([5, 5, 5, 5], p2, 0)  # computed twice concurrently: the second copy is freed
    assert cache.num_pages == 1 and pool.num_free_pages == 15


def test_engine_emits_events(moe_llm, prompts):
    eng = moe_llm.engine
    events = []
    eng.subscribe_kv_events(events.extend)
    try:
        eng.flush_cache()
        moe_llm.generate([prompts[3]], SamplingParams(max_tokens=4, temperature=0))
    finally:
        eng.cache.subscribers.remove(events.extend)
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert stored and all(len(e.token_ids) == e.block_size * len(e.block_hashes) for e in stored)
