"""PD with an FP8 KV cache through real processes: pages travel as FP8 bytes over nixl and over
grpc, and decoding them gives the tokens of the aggregated worker with the same FP8 cache; a
prefill/decode pair whose KV dtypes differ is refused with both dtypes named."""
from __future__ import annotations

import random

import grpc
import pytest

from tests.support.clients import generate, generate_many, sampling
from tests.support.procs import start_service

MODEL = "models/tandem-demo-dense"
# Scales calibrated at start by each worker: prefill and decode must arrive at the same ones.
FP8 = ["--model-path", MODEL, "--max-total-tokens", "4096", "--chunked-prefill-size", "64", "--page-size", "16",
       "--kv-cache-dtype", "fp8_e4m3", "--kv-cache-calibrate", "1"]


def prompts(n: int = 8, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 500) for _ in range(rng.choice([17, 95, 160]))] for _ in range(n)]


@pytest.fixture(scope="module")
def agg():
    svc = start_service("tandem.decode", *FP8)
    yield svc
    svc.stop()


def _pair(backend: str):
    flags = ["--disaggregation-transfer-backend", backend]
    prefill = start_service("tandem.prefill", *FP8, *flags)
    decode = start_service("tandem.decode", *FP8, *flags, "--disaggregation-mode", "decode",
                           "--prefill-addresses", prefill.grpc_address)
    return prefill, decode


@pytest.fixture(scope="module")
def pairs():
    """backend -> (prefill, decode) with FP8 K/V, started on first use, stopped at the end."""
    made = {}

    def get(backend: str):
        if backend not in made:
            made[backend] = _pair(backend)
        return made[backend]

    yield get
    for prefill, decode in made.values():
        decode.stop()
        prefill.stop()


@pytest.mark.parametrize("backend", ["nixl", "grpc"])
def test_fp8_pd_tokens_equal_fp8_aggregated(pairs, agg, backend):
    _, decode = pairs(backend)
    ps = prompts()
    seeded = [sampling(max_tokens=10, temperature=0.9, top_p=0.95, seed=50 + i) for i in range(len(ps))]
    disagg = generate_many(decode.grpc_address, ps, seeded, concurrency=8, override="remote")
    assert disagg == generate_many(agg.grpc_address, ps, seeded, concurrency=8)


def test_decode_with_another_kv_dtype_is_refused(pairs):
    prefill, _ = pairs("grpc")
    other = start_service("tandem.decode", "--model-path", MODEL, "--max-total-tokens", "4096", "--page-size", "16",
                          "--disaggregation-transfer-backend", "grpc", "--disaggregation-mode", "decode",
                          "--prefill-addresses", prefill.grpc_address, "--prefill-retries", "0")
    try:
        with pytest.raises(grpc.RpcError) as info:
            generate(other.grpc_address, list(range(10, 90)), sampling(max_tokens=4), override="remote")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
        details = info.value.details()
        assert "dtype" in details and "'float32'" in details and "'float8_e4m3fn'" in details, details
        assert "--kv-cache-dtype" in details
        assert "refuses this decode" in other.log()  # its warmup said so at start, without waiting
    finally:
        other.stop()
