"""Decode follows the prefill workers registered in a real etcd (--prefill-discovery etcd), as on
Kubernetes where prefill is scaled by its replica count: no prefill yet gives a clean UNAVAILABLE,
a prefill that registers is used, a second one joins, and one that stops is dropped while decode
keeps serving through the other."""
from __future__ import annotations

import grpc
import pytest

from tests.support.clients import generate, sampling
from tests.support.procs import start_service
from tests.support.waiting import wait_for

MODEL = "models/tandem-demo-dense"
PREFIX = "/tandem-it-prefill/workers/"
WORKER = ["--model-path", MODEL, "--max-total-tokens", "4096", "--page-size", "16", "--torch-num-threads", "1",
          "--disaggregation-transfer-backend", "grpc"]
REG = ["--etcd-prefix", PREFIX, "--etcd-ttl", "2"]


def prompt_tokens(prefill) -> float:
    import httpx

    text = httpx.get(f"http://{prefill.system_address}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sglang:prompt_tokens_total"))


def remote(decode, n: int = 4) -> list[int]:
    tokens, _ = generate(decode.grpc_address, list(range(10, 10 + 24)), sampling(max_tokens=n), override="remote",
                         timeout=60)
    return tokens


def test_decode_follows_prefill_workers_in_etcd(etcd):
    procs = []
    try:
        decode = start_service("tandem.decode", *WORKER, "--disaggregation-mode", "decode",
                               "--prefill-discovery", "etcd", "--etcd-endpoint", etcd.endpoint, *REG)
        procs.append(decode)
        with pytest.raises(grpc.RpcError) as info:
            remote(decode)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no prefill worker" in info.value.details()

        first = start_service("tandem.prefill", *WORKER, "--etcd-endpoint", etcd.endpoint, *REG)
        procs.append(first)
        wait_for(lambda: _serves(decode), 30, "decode to prefill through the first registered worker")
        before = prompt_tokens(first)
        assert len(remote(decode)) == 4 and prompt_tokens(first) > before

        second = start_service("tandem.prefill", *WORKER, "--etcd-endpoint", etcd.endpoint, *REG)
        procs.append(second)
        wait_for(lambda: sorted(etcd.keys(PREFIX)) == sorted(
            PREFIX + p.grpc_address for p in (decode, first, second)), 10, "three registrations")
        first.stop()  # scaled down: deregisters, decode stops picking it
        before = prompt_tokens(second)
        for _ in range(3):
            assert len(remote(decode)) == 4
        assert prompt_tokens(second) > before
        assert f"removed ['{first.grpc_address}']" in decode.log()
    finally:
        for p in reversed(procs):
            p.stop()


def _serves(decode) -> bool:
    try:
        return len(remote(decode)) == 4
    except grpc.RpcError:
        return False
