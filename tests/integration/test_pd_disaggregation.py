"""PD disaggregation through real processes on loopback: token identity with the
aggregated worker, conditional disaggregation, failures and cancellation, bad handshakes."""
from __future__ import annotations

import random
import signal
import threading
import time

import grpc
import pytest

from tests.support.clients import generate, generate_many, load, pages_in_use, sampling
from tests.support.procs import start_service

MODEL = "models/tandem-demo-dense"
ENGINE = ["--model-path", MODEL, "--max-total-tokens", "16384", "--chunked-prefill-size", "256"]


def prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [rng.choice([3, 17, 40, 95, 160, 300]) for _ in range(n)]
    return [[rng.randrange(10, 500) for _ in range(k)] for k in lengths]


def wait_no_pages_in_use(address: str, service: str = "decode", timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        used = pages_in_use(address, service)
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(0.1)


class Cluster:
    def __init__(self, backend: str, page_size: int, selection: str, num_prefill: int = 2, extra=()):
        common = [*ENGINE, "--page-size", str(page_size), "--disaggregation-transfer-backend", backend]
        self.prefills = [start_service("tandem.prefill", *common) for _ in range(num_prefill)]
        self.decode = start_service("tandem.decode", *common, "--disaggregation-mode", "decode",
                                    "--prefill-selection", selection, "--prefill-addresses",
                                    *[p.grpc_address for p in self.prefills], *extra)
        self.agg = start_service("tandem.decode", *ENGINE, "--page-size", str(page_size))

    def stop(self):
        for s in [self.decode, self.agg, *self.prefills]:
            s.stop()


CONFIGS = {
    "nixl-page16-round_robin": ("nixl", 16, "round_robin"),
    "grpc-page1-kv_aware": ("grpc", 1, "kv_aware"),
}
SLOW_CONFIGS = {
    "nixl-page1-kv_aware": ("nixl", 1, "kv_aware"),
    "grpc-page16-round_robin": ("grpc", 16, "round_robin"),
}


@pytest.fixture(scope="module", params=[*CONFIGS, *[pytest.param(k, marks=pytest.mark.slow) for k in SLOW_CONFIGS]])
def cluster(request):
    c = Cluster(*{**CONFIGS, **SLOW_CONFIGS}[request.param])
    yield c
    c.stop()


def test_disaggregated_tokens_equal_aggregated_greedy_and_seeded(cluster):
    ps = prompts(16)
    greedy = [sampling(max_tokens=12)] * len(ps)
    seeded = [sampling(max_tokens=12, temperature=0.9, top_p=0.95, seed=100 + i) for i in range(len(ps))]
    for params in (greedy, seeded):
        disagg = generate_many(cluster.decode.grpc_address, ps, params, concurrency=16, override="remote")
        agg = generate_many(cluster.agg.grpc_address, ps, params, concurrency=16)
        assert disagg == agg
    # Both prefill workers did work, and nothing stayed allocated anywhere.
    assert all(load(p.grpc_address, "prefill").num_prefilled_reqs > 0 for p in cluster.prefills)
    assert wait_no_pages_in_use(cluster.decode.grpc_address) == 0
    for p in cluster.prefills:
        assert wait_no_pages_in_use(p.grpc_address, "prefill") == 0


def test_short_prompt_is_prefilled_locally():
    prefill = start_service("tandem.prefill", *ENGINE, "--disaggregation-transfer-backend", "grpc")
    decode = start_service("tandem.decode", *ENGINE, "--disaggregation-transfer-backend", "grpc",
                           "--disaggregation-mode", "decode", "--prefill-addresses", prefill.grpc_address,
                           "--max-local-prefill-length", "32")
    try:
        before_p = load(prefill.grpc_address, "prefill").num_prefilled_reqs
        before_d = load(decode.grpc_address).num_prefilled_reqs
        generate(decode.grpc_address, list(range(10, 30)), sampling(max_tokens=4))
        assert load(prefill.grpc_address, "prefill").num_prefilled_reqs == before_p
        assert load(decode.grpc_address).num_prefilled_reqs == before_d + 1
        generate(decode.grpc_address, list(range(10, 80)), sampling(max_tokens=4))
        assert load(prefill.grpc_address, "prefill").num_prefilled_reqs == before_p + 1
        assert load(decode.grpc_address).num_prefilled_reqs == before_d + 1
    finally:
        decode.stop()
        prefill.stop()


def _kill_prefill_mid_transfer(retries: int):
    """A long prompt in flight; SIGKILL the prefill doing it. Returns (outcome, decode address)."""
    slow = ["--chunked-prefill-size", "32"]  # many chunks: a wide window to kill it in
    common = [*ENGINE, *slow, "--disaggregation-transfer-backend", "nixl"]
    prefills = [start_service("tandem.prefill", *common) for _ in range(2)]
    decode = start_service("tandem.decode", *common, "--disaggregation-mode", "decode", "--prefill-retries",
                           str(retries), "--prefill-addresses", *[p.grpc_address for p in prefills])
    start_pages = pages_in_use(decode.grpc_address)
    result = {}

    def run():
        try:
            result["tokens"] = generate(decode.grpc_address, list(range(3, 1500)), sampling(max_tokens=8),
                                        override="remote")[0]
        except grpc.RpcError as exc:
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        for p in prefills:
            if load(p.grpc_address, "prefill").num_inflight_transfers > 0:
                victim = p
                break
    assert victim is not None, "the request never reached a prefill worker"
    victim.proc.send_signal(signal.SIGKILL)
    t.join(120)
    leaked = wait_no_pages_in_use(decode.grpc_address) - start_pages
    survivor = next(p for p in prefills if p is not victim)
    survivor_leak = wait_no_pages_in_use(survivor.grpc_address, "prefill")
    for s in [decode, *prefills]:
        s.stop()
    return result, leaked, survivor_leak


def test_prefill_killed_mid_transfer_retries_on_another_worker():
    result, leaked, survivor_leak = _kill_prefill_mid_transfer(retries=1)
    assert "tokens" in result, result.get("error")
    assert len(result["tokens"]) == 8
    assert leaked == 0 and survivor_leak == 0


def test_prefill_killed_mid_transfer_without_retry_fails_cleanly():
    result, leaked, _ = _kill_prefill_mid_transfer(retries=0)
    err = result.get("error")
    assert err is not None, "expected the request to fail"
    assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert "remote prefill failed" in err.details()
    assert leaked == 0


def test_client_cancel_mid_stream_frees_pages_on_both_sides():
    c = Cluster("nixl", 16, "round_robin", num_prefill=1)
    try:
        from tandem.v1 import decode_pb2, decode_pb2_grpc

        with grpc.insecure_channel(c.decode.grpc_address) as ch:
            stream = decode_pb2_grpc.DecodeStub(ch).Generate(decode_pb2.GenerateRequest(
                input_ids=list(range(5, 400)), sampling=sampling(max_tokens=500, ignore_eos=True),
                prefill_override="remote"))
            first = next(stream)
            assert first.token_ids
            assert pages_in_use(c.decode.grpc_address) > 0
            stream.cancel()
        assert wait_no_pages_in_use(c.decode.grpc_address) == 0
        assert wait_no_pages_in_use(c.prefills[0].grpc_address, "prefill") == 0
    finally:
        c.stop()
