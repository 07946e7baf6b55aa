from __future__ import annotations

import collections

import pytest
from tandem.routing.kv_index import KvIndex
from tandem.routing.policies import KvAwarePolicy, WorkerView, make_policy


def views(n, **kw):
    return [WorkerView(f"w{i}", **kw) for i in range(n)]


def test_round_robin_cycles():
    p = make_policy("round_robin")
    assert [p.choose(views(3), [1]).worker_id for _ in range(6)] == ["w0", "w1", "w2"] * 2


def test_random_uses_all_workers():
    p = make_policy("random", seed=1)
    counts = collections.Counter(p.choose(views(3), [1]).worker_id for _ in range(300))
    assert set(counts) == {"w0", "w1", "w2"} and min(counts.values()) > 50


def test_least_loaded_prefers_fewer_waiting_then_free_pages():
    p = make_policy("least_loaded")
    ws = [WorkerView("a", num_waiting_reqs=3, free_pages=900), WorkerView("b", num_waiting_reqs=1, free_pages=10),
          WorkerView("c", num_waiting_reqs=1, free_pages=500)]
    assert p.choose(ws, [1]).worker_id == "c"
    ws[2].active_requests = 2
    assert p.choose(ws, [1]).worker_id == "b"


def test_unknown_policy():
    with pytest.raises(ValueError, match="routing_policy='fastest'"):
        make_policy("fastest")


def test_kv_aware_overlap_vs_load():
    idx = KvIndex()
    prompt = list(range(64))  # 16 blocks of 4
    from tandem.routing.block_hash import block_hashes
    idx.store("w0", block_hashes(prompt[:48], 4), prompt[:48], 4)  # 12 blocks cached on w0
    p = KvAwarePolicy(idx, overlap_weight=1.0)
    d = p.choose(views(2), prompt)
    assert (d.worker_id, d.overlap_blocks, d.request_blocks) == ("w0", 12, 16)
    # w0 busy: 4 blocks to prefill + 20 active (24) vs 16 + 0 on w1 -> w1
    ws = views(2)
    ws[0].active_blocks = 20
    assert p.choose(ws, prompt).worker_id == "w1"
    # a higher overlap weight makes the cached prefix win again: 2*4+20=28 < 2*16=32
    p2 = KvAwarePolicy(idx, overlap_weight=2.0)
    assert p2.choose(ws, prompt).worker_id == "w0"


def test_kv_aware_spreads_new_prefixes():
    idx = KvIndex()
    from tandem.routing.block_hash import block_hashes
    a = list(range(100, 132))
    idx.store("w0", block_hashes(a, 4), a, 4)
    p = KvAwarePolicy(idx)
    # no overlap anywhere, equal load: the emptier cache wins
    assert p.choose(views(2), list(range(500, 532))).worker_id == "w1"


def test_kv_aware_weights_host_hits_below_device_hits():
    from tandem.routing.block_hash import block_hashes
    from tandem.routing.kv_index import HOST

    idx = KvIndex()
    prompt = list(range(64))  # 16 blocks of 4
    idx.store("w0", block_hashes(prompt[:32], 4), prompt[:32], 4)  # 8 blocks on w0's device
    idx.store("w1", block_hashes(prompt[:48], 4), prompt[:48], 4, tier=HOST)  # 12 blocks on w1's host
    # host blocks count half: w1 saves 6 blocks, w0 saves 8 -> w0
    d = KvAwarePolicy(idx, host_hit_weight=0.5).choose(views(2), prompt)
    assert (d.worker_id, d.overlap_blocks, d.cost) == ("w0", 8, 8)
    # counted fully, w1's 12 host blocks beat w0's 8 device blocks
    d = KvAwarePolicy(idx, host_hit_weight=1.0).choose(views(2), prompt)
    assert (d.worker_id, d.overlap_blocks, d.cost) == ("w1", 12, 4)
