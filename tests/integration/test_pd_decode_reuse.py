"""Decode-side prefix reuse in PD (--disaggregation-decode-enable-radix-cache), through real
processes on loopback: 4 chats x 3 turns, each turn's prompt the previous turn's prompt and
output plus a new message. From turn 2 on, prefill writes only the pages after what decode
already holds (tandem_pd_transferred_tokens_total); the tokens equal the aggregated worker's;
no page is left in use on either side."""
from __future__ import annotations

import random

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.clients import generate, pages_in_use, sampling
from tests.support.procs import start_service
from tests.support.waiting import wait_for

MODEL = "models/tandem-demo-dense"
PAGE = 16
ENGINE = ["--model-path", MODEL, "--max-total-tokens", "8192", "--page-size", str(PAGE), "--log-level", "warning"]
CHATS, TURNS, NEW_TOKENS = 4, 3, 20


def metric(address: str, name: str) -> float:
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


@pytest.fixture(scope="module", params=["grpc", pytest.param("nixl", marks=pytest.mark.slow)])
def stack(request):
    common = [*ENGINE, "--disaggregation-transfer-backend", request.param]
    prefill = start_service("tandem.prefill", *common)
    decode = start_service("tandem.decode", *common, "--disaggregation-mode", "decode", "--prefill-addresses",
                           prefill.grpc_address, "--disaggregation-decode-enable-radix-cache")
    agg = start_service("tandem.decode", *ENGINE)
    yield prefill, decode, agg
    for p in (decode, agg, prefill):
        p.stop()


def test_later_turns_transfer_only_the_new_suffix(stack):
    prefill, decode, agg = stack
    rng = random.Random(3)
    chats = [[rng.randrange(10, 500) for _ in range(40 + 7 * i)] for i in range(CHATS)]
    sp = sampling(max_tokens=12)
    sent = 0  # prompt tokens of all remote prefills so far: each is counted transferred or reused

    def counters():
        return (metric(decode.system_address, "tandem_pd_transferred_tokens_total"),
                metric(decode.system_address, "tandem_pd_decode_reused_tokens_total"))

    start = sum(counters())  # the warmup's remote prefill counts too
    held = [0] * CHATS  # tokens of each chat whose KV decode's prefix cache holds (full pages)
    for turn in range(TURNS):
        before = counters()
        expect_reused = 0
        for i, prompt in enumerate(chats):
            # Decode matches at most the prompt's first L - 1 tokens, in full pages.
            expect_reused += min(held[i], (len(prompt) - 1) // PAGE * PAGE)
            got, _ = generate(decode.grpc_address, prompt, sp, override="remote")
            want, _ = generate(agg.grpc_address, prompt, sp)
            assert got == want, (turn, i)
            sent += len(prompt)
            # Cached when it ended: the prompt and the output but the last token (never computed).
            held[i] = (len(prompt) + len(got) - 1) // PAGE * PAGE
            chats[i] = prompt + got + [rng.randrange(10, 500) for _ in range(NEW_TOKENS)]
        wait_for(lambda n=sent: sum(counters()) - start == n, timeout=30, what="decode's PD token counters")
        transferred = counters()[0] - before[0]
        reused = counters()[1] - before[1]
        assert reused == expect_reused, (turn, transferred, reused)
        if turn == 0:
            assert reused == 0
        else:
            # Decode holds the earlier turns: only the new message and the page it starts in are written.
            assert 0 < transferred <= CHATS * (NEW_TOKENS + PAGE), (turn, transferred, reused)
    assert wait_for(lambda: pages_in_use(decode.grpc_address) == 0, timeout=20, what="decode pages back")
    assert wait_for(lambda: pages_in_use(prefill.grpc_address, "prefill") == 0, timeout=20, what="prefill pages back")
