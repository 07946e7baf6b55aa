"""Decode's set of prefill workers when it follows etcd (--prefill-discovery etcd): peers join and
leave while decode serves; a leaving peer is picked no more, and its channel closes only once no
attempt uses it. Discovery keeps the prefill workers of this model only."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from tandem.config import DecodeConfig
from tandem.transfer import make_receiver
from tandem.v1 import common_pb2
from tandem.worker.prefill_discovery import PrefillDiscovery
from tandem.worker.remote_prefill import AttemptFailed, RemotePrefill

from tests.unit.transfer.transfer_helpers import make_buffers

ENGINE = SimpleNamespace(info=SimpleNamespace(page_size=16))


def remote_prefill(addresses: list[str], dynamic: bool) -> RemotePrefill:
    config = DecodeConfig(model_path="unused", disaggregation_mode="decode", prefill_addresses=addresses,
                          disaggregation_transfer_backend="grpc", prefill_selection="round_robin",
                          prefill_discovery="etcd" if dynamic else "static",
                          etcd_endpoint="http://127.0.0.1:2379" if dynamic else None)
    receiver = make_receiver("grpc", make_buffers(), "decode-under-test")
    return RemotePrefill(config, ENGINE, receiver, "decode-under-test", dynamic=dynamic)


def on_loop(remote: RemotePrefill, fn):
    """Run ``fn`` on the remote-prefill loop (after queued set_addresses calls) and return its result."""
    async def call():
        return fn()
    return asyncio.run_coroutine_threadsafe(call(), remote._aio).result(5)  # noqa: SLF001


def test_static_set_needs_addresses():
    with pytest.raises(ValueError, match="no prefill workers"):
        RemotePrefill(DecodeConfig.model_construct(prefill_addresses=[]), ENGINE,
                      make_receiver("grpc", make_buffers(), "d"), "d")


def test_peers_join_and_leave():
    remote = remote_prefill([], dynamic=True)
    remote.start()
    try:
        with pytest.raises(AttemptFailed, match="no prefill worker is registered") as info:
            on_loop(remote, lambda: remote._pick([1, 2, 3], set()))  # noqa: SLF001
        assert not info.value.retryable
        remote.set_addresses(["a:1", "b:1", "a:1"])
        assert on_loop(remote, lambda: {remote._pick([1], set()).address for _ in range(4)}) == {"a:1", "b:1"}  # noqa: SLF001
        b = remote.peers[1]
        remote.set_addresses(["b:1", "c:1"])
        assert on_loop(remote, lambda: [p.address for p in remote.peers]) == ["b:1", "c:1"]
        assert remote.peers[0] is b, "a peer that stays keeps its channel and registration"
        assert on_loop(remote, lambda: remote._pick([1], {"b:1"}).address) == "c:1"  # noqa: SLF001
        remote.set_addresses([])
        assert on_loop(remote, lambda: remote.peers) == []
    finally:
        remote.stop()


def test_discovery_keeps_prefills_of_this_model_only():
    seen: list[list[str]] = []
    disc = PrefillDiscovery(seen.append, "http://127.0.0.1:2379", "/t/", model="dense")
    infos = {
        "p1": common_pb2.WorkerInfo(worker_id="p1", address="10.0.0.1:50061", role="prefill", model="dense"),
        "p2": common_pb2.WorkerInfo(worker_id="p2", address="10.0.0.2:50061", role="prefill", model="moe"),
        "d1": common_pb2.WorkerInfo(worker_id="d1", address="10.0.0.3:50071", role="decode", model="dense"),
        "p0": common_pb2.WorkerInfo(worker_id="p0", address="10.0.0.4:50061", role="prefill", model=""),
    }
    disc.on_change(infos)
    assert seen == [["10.0.0.4:50061", "10.0.0.1:50061"]] and disc.synced.is_set()
    disc.on_change({})
    assert seen[-1] == []
