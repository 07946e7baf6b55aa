"""PD over NIXL under load, shaped like the perf sweep that found the aux-row race (1 prefill
+ 1 decode worker, the deploy stack's engine settings): hundreds of remote prefills arriving
in bursts of 16 whose prompts prefill already has cached, so prefill often finishes a room
before decode has processed its BootstrapRoom message. Every request must return its full
output, token-identical to the aggregated worker, on the first attempt.

The interleaving depends on the scheduler; tests/integration/test_pd_races.py forces it."""
from __future__ import annotations

import random

import pytest

from tests.support.clients import generate_many, pages_in_use, sampling
from tests.support.procs import start_service
from tests.support.waiting import wait_for

MODEL = "models/tandem-demo-dense"
ENGINE = ["--model-path", MODEL, "--max-total-tokens", "16384", "--chunked-prefill-size", "512",
          "--torch-num-threads", "1"]
DISTINCT, BURSTS, BURST_SIZE, MAX_TOKENS = 16, 20, 16, 8


@pytest.fixture(scope="module")
def stack():
    common = [*ENGINE, "--disaggregation-transfer-backend", "nixl"]
    prefill = start_service("tandem.prefill", *common)
    decode = start_service("tandem.decode", *common, "--disaggregation-mode", "decode",
                           "--prefill-addresses", prefill.grpc_address)
    agg = start_service("tandem.decode", *ENGINE)
    yield prefill, decode, agg
    for s in (decode, agg, prefill):
        s.stop()


def test_hundreds_of_remote_prefills_in_bursts_equal_aggregated(stack):
    prefill, decode, agg = stack
    rng = random.Random(11)
    prompts = [[rng.randrange(10, 500) for _ in range(rng.choice([40, 100, 200, 400]))] for _ in range(DISTINCT)]
    params = sampling(max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = generate_many(agg.grpc_address, prompts, [params] * DISTINCT, concurrency=BURST_SIZE)
    assert all(len(tokens) == MAX_TOKENS for tokens in expected)

    def burst(which: list[int]) -> list[tuple[int, list[int]]]:
        got = generate_many(decode.grpc_address, [prompts[i] for i in which], [params] * len(which),
                            concurrency=BURST_SIZE, override="remote")
        return [(i, tokens) for i, tokens in zip(which, got) if tokens != expected[i]]

    wrong = burst(list(range(DISTINCT)))  # the first time: prefill computes every prompt
    for _ in range(BURSTS):  # then bursts of prompts prefill has cached: fast rooms
        wrong += burst([rng.randrange(DISTINCT) for _ in range(BURST_SIZE)])
    total = DISTINCT + BURSTS * BURST_SIZE
    assert not wrong, f"{len(wrong)} of {total} requests differ from aggregated, e.g. prompt {wrong[0][0]}: " \
                      f"{wrong[0][1]} != {expected[wrong[0][0]]}"
    assert "retrying prefill" not in decode.log(), "a first attempt failed under load"
    wait_for(lambda: pages_in_use(decode.grpc_address) == 0, timeout=20, what="decode pages freed")
    wait_for(lambda: pages_in_use(prefill.grpc_address, "prefill") == 0, timeout=20, what="prefill pages freed")
