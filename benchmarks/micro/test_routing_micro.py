"""Routing decisions, KV index updates and lookups, block hashing."""
from __future__ import annotations

import pytest
from tandem.routing.block_hash import block_hashes
from tandem.routing.kv_index import KvIndex
from tandem.routing.policies import WorkerView, make_policy
from tandem.v1 import common_pb2

BLOCK = 16
WORKERS = [f"w{i}" for i in range(8)]


def stored_batch(seq: int, tokens: list[int]) -> common_pb2.KvEventBatch:
    hashes = block_hashes(tokens, BLOCK)
    return common_pb2.KvEventBatch(sequence=seq, events=[common_pb2.KvEvent(stored=common_pb2.BlockStored(
        block_hashes=[h & (2**63 - 1) for h in hashes], token_ids=tokens, block_size=BLOCK))])


@pytest.fixture(scope="module")
def index(prompt) -> KvIndex:
    """8 workers, each caching a different-length prefix of the prompt plus its own blocks."""
    idx = KvIndex(block_size=BLOCK)
    for i, w in enumerate(WORKERS):
        n = (i + 1) * 256
        idx.apply_batch(w, stored_batch(1, prompt[:n]))
        idx.apply_batch(w, stored_batch(2, [t + i for t in prompt[n:n + 512]]))
    return idx


@pytest.fixture(scope="module")
def views() -> list[WorkerView]:
    return [WorkerView(w, active_requests=i % 3, active_blocks=10 * i, num_waiting_reqs=i % 2, free_pages=100 - i)
            for i, w in enumerate(WORKERS)]


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "kv_aware"])
def test_routing_decision(benchmark, policy, index, views, prompt):
    p = make_policy(policy, index)
    decision = benchmark(p.choose, views, prompt)
    assert decision.worker_id in WORKERS


def test_block_hashing_2048_tokens(benchmark, prompt):
    hashes = benchmark(block_hashes, prompt, BLOCK)
    assert len(hashes) == len(prompt) // BLOCK


def test_kv_index_lookup(benchmark, index, prompt):
    keys = index.request_keys(prompt)
    overlap = benchmark(index.match, keys)
    assert overlap["w7"] == 2048 // BLOCK


def test_kv_index_update_store_and_remove(benchmark, prompt):
    batch = stored_batch(1, prompt)
    removed = common_pb2.KvEventBatch(sequence=2, events=[common_pb2.KvEvent(removed=common_pb2.BlockRemoved(
        block_hashes=batch.events[0].stored.block_hashes))])

    def update():
        idx = KvIndex(block_size=BLOCK)
        idx.apply_batch("w", batch)
        idx.apply_batch("w", removed)
        return idx

    idx = benchmark(update)
    assert idx.num_blocks("w") == 0
