from __future__ import annotations

import pytest
from tandem.engine import radix_cache
from tandem.routing.block_hash import block_hashes, hash_block
from tandem.routing.kv_index import KvIndex, KvIndexError
from tandem.v1 import common_pb2

BS = 4


def stored(ids, parent=None, salt=0):
    """Events as a worker with its own (different) hash function would send them."""
    hashes = [h ^ salt for h in block_hashes(ids, BS, None)]
    return hashes


def test_block_hash_chain_and_engine_equality():
    a = block_hashes(list(range(12)), 4)
    b = block_hashes(list(range(8)) + [99, 9, 10, 11], 4)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert block_hashes(list(range(11)), 4) == a[:2]  # partial block skipped
    assert hash_block(None, [1, 2]) == hash_block(0, [1, 2]) != hash_block(1, [1, 2])
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1], 0)
    for parent in (None, 7, 2**64 - 1):
        assert hash_block(parent, [3, 1, 4, 1, 5]) == radix_cache.block_hash(parent, [3, 1, 4, 1, 5])


def test_match_counts_leading_blocks_per_worker():
    idx = KvIndex()
    prompt = list(range(40))  # 10 blocks
    # w0 holds the first 6 blocks, w1 the first 3, with worker hashes unlike the router's
    idx.store("w0", stored(prompt[:24], salt=1), prompt[:24], BS)
    idx.store("w1", stored(prompt[:12], salt=2), prompt[:12], BS)
    keys = idx.request_keys(prompt)
    assert len(keys) == 10
    assert idx.match(keys) == {"w0": 6, "w1": 3}
    # a different prompt start matches nothing
    assert idx.match(idx.request_keys([99] + prompt[1:])) == {}
    assert idx.num_blocks("w0") == 6 and idx.num_blocks() == 6


def test_parent_chaining_across_events_and_removal():
    idx = KvIndex()
    ids = list(range(16))
    h = stored(ids, salt=5)
    idx.store("w", h[:2], ids[:8], BS)
    idx.store("w", h[2:], ids[8:], BS, parent=h[1])
    assert idx.match(idx.request_keys(ids)) == {"w": 4}
    idx.remove("w", [h[2]])
    assert idx.match(idx.request_keys(ids)) == {"w": 2}
    with pytest.raises(KvIndexError, match="parent"):
        idx.store("w", [123], ids[:4], BS, parent=424242)
    idx.clear("w")
    assert idx.match(idx.request_keys(ids)) == {} and idx.num_blocks() == 0


def test_block_size_mismatch_and_bad_lengths_rejected():
    idx = KvIndex()
    idx.store("a", [1], [1, 2, 3, 4], 4)
    with pytest.raises(KvIndexError, match="block_size"):
        idx.store("b", [2], [1, 2, 3, 4, 5, 6, 7, 8], 8)
    with pytest.raises(KvIndexError, match="token ids"):
        idx.store("a", [1, 2], [1, 2, 3], 4)


def test_apply_batch_events_and_gap_detection():
    idx = KvIndex()
    ids = list(range(8))
    h = stored(ids, salt=9)
    b1 = common_pb2.KvEventBatch(sequence=1, events=[
        common_pb2.KvEvent(stored=common_pb2.BlockStored(block_hashes=h, token_ids=ids, block_size=BS))])
    assert idx.apply_batch("w", b1)
    assert idx.match(idx.request_keys(ids)) == {"w": 2}
    b2 = common_pb2.KvEventBatch(sequence=2, events=[
        common_pb2.KvEvent(removed=common_pb2.BlockRemoved(block_hashes=[h[1]]))])
    assert idx.apply_batch("w", b2)
    assert idx.match(idx.request_keys(ids)) == {"w": 1}
    b4 = common_pb2.KvEventBatch(sequence=4, events=[common_pb2.KvEvent(cleared=common_pb2.AllBlocksCleared())])
    assert not idx.apply_batch("w", b4)  # gap: 3 missing
    assert idx.num_blocks("w") == 0
    bad = common_pb2.KvEventBatch(sequence=5, events=[common_pb2.KvEvent(stored=common_pb2.BlockStored(
        block_hashes=[1], token_ids=[1, 2, 3, 4], block_size=BS, parent_block_hash=777))])
    assert idx.apply_batch("w", bad) and idx.events_rejected == 1


def test_shared_blocks_refcounted_per_worker():
    idx = KvIndex()
    ids = list(range(8))
    idx.store("a", stored(ids, salt=1), ids, BS)
    idx.store("b", stored(ids, salt=2), ids, BS)
    idx.remove_worker("a")
    assert idx.match(idx.request_keys(ids)) == {"b": 2}
    # the same block stored twice under two worker hashes stays until both are removed
    idx.store("b", [111, 222], ids, BS)
    idx.remove("b", stored(ids, salt=2))
    assert idx.match(idx.request_keys(ids)) == {"b": 2}
    idx.remove("b", [111, 222])
    assert idx.num_blocks() == 0


def test_host_tier_blocks_match_apart_from_device_blocks():
    from tandem.routing.kv_index import DEVICE, HOST

    idx = KvIndex()
    prompt = list(range(32))  # 8 blocks
    hashes = stored(prompt, salt=3)
    idx.store("w0", hashes, prompt, BS, tier=DEVICE)
    idx.store("w0", hashes, prompt, BS, tier=HOST)  # write-through: also on host
    keys = idx.request_keys(prompt)
    # The device loses its last 5 blocks (evicted to host): 3 on the device, 8 reachable.
    idx.remove("w0", hashes[3:], tier=DEVICE)
    assert idx.match(keys) == {"w0": 3}
    assert idx.match_tiers(keys) == {"w0": (3, 8)}
    assert idx.num_blocks("w0") == 3 and idx.num_blocks("w0", tier=HOST) == 8
    # A host block's parent may have left the device: its worker hash stays known while any tier holds it.
    idx.remove("w0", hashes[5:], tier=HOST)
    assert idx.match_tiers(keys) == {"w0": (3, 5)}
    idx.store("w0", hashes[5:6], prompt[20:24], BS, parent=hashes[4], tier=HOST)
    assert idx.match_tiers(keys) == {"w0": (3, 6)}
    idx.clear("w0")
    assert idx.match_tiers(keys) == {} and idx.num_blocks(tier=HOST) == 0


def test_apply_batch_reads_the_tier():
    idx = KvIndex()
    prompt = list(range(8))
    hashes = stored(prompt, salt=5)
    batch = common_pb2.KvEventBatch(sequence=1, events=[
        common_pb2.KvEvent(stored=common_pb2.BlockStored(block_hashes=hashes, token_ids=prompt, block_size=BS,
                                                         tier=common_pb2.KV_TIER_HOST))])
    idx.apply_batch("w1", batch)
    keys = idx.request_keys(prompt)
    assert idx.match(keys) == {} and idx.match_tiers(keys) == {"w1": (0, 2)}
    batch = common_pb2.KvEventBatch(sequence=2, events=[
        common_pb2.KvEvent(removed=common_pb2.BlockRemoved(block_hashes=hashes, tier=common_pb2.KV_TIER_HOST))])
    idx.apply_batch("w1", batch)
    assert idx.match_tiers(keys) == {}
