"""Decode's set of prefill workers when it follows etcd (--prefill-discovery etcd): peers join and
leave while decode serves; a leaving peer is picked no more, and its channel closes only once its
in-flight prefills have ended."""
from __future__ import annotations

import pytest
from tandem.v1 import common_pb2
from tandem.worker.prefill_client import PrefillDiscovery, PrefillSelector, RemotePrefillError


def test_static_selector_needs_addresses():
    with pytest.raises(ValueError, match="no prefill workers"):
        PrefillSelector([], "round_robin", 16)


def test_peers_join_and_leave_round_robin():
    sel = PrefillSelector([], "round_robin", 16, dynamic=True)
    try:
        with pytest.raises(RemotePrefillError) as info:
            sel.pick([1, 2, 3])
        assert info.value.code == "no_prefill_workers" and not info.value.retryable
        sel.set_addresses(["a:1", "b:1"])
        assert {sel.pick([1]).address for _ in range(4)} == {"a:1", "b:1"}
        a = next(p for p in sel.peers if p.address == "a:1")
        a.inflight = 1  # a prefill still running on the worker that leaves
        sel.set_addresses(["b:1", "c:1"])
        assert [p.address for p in sel.peers] == ["b:1", "c:1"]
        assert {sel.pick([1]).address for _ in range(4)} == {"b:1", "c:1"}
        assert sel._retired == [a]  # kept open while its prefill runs
        a.inflight = 0
        sel.set_addresses(["b:1", "c:1"])
        assert sel._retired == []
        b = sel.peers[0]
        sel.set_addresses(["b:1", "c:1", "d:1"])
        assert sel.peers[0] is b  # a peer that stays keeps its channel and registration
        assert sel.pick([1], exclude={"b:1", "c:1"}).address == "d:1"
    finally:
        sel.stop()


def test_discovery_keeps_prefills_of_this_model_only():
    sel = PrefillSelector([], "round_robin", 16, dynamic=True)
    disc = PrefillDiscovery(sel, "http://127.0.0.1:2379", "/t/", model="dense")
    infos = {
        "p1": common_pb2.WorkerInfo(worker_id="p1", address="10.0.0.1:50061", role="prefill", model="dense"),
        "p2": common_pb2.WorkerInfo(worker_id="p2", address="10.0.0.2:50061", role="prefill", model="moe"),
        "d1": common_pb2.WorkerInfo(worker_id="d1", address="10.0.0.3:50071", role="decode", model="dense"),
    }
    try:
        disc._on_change(infos)
        assert [p.address for p in sel.peers] == ["10.0.0.1:50061"] and disc.synced.is_set()
        disc._on_change({})
        assert sel.peers == []
    finally:
        sel.stop()
