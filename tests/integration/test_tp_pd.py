"""PD between prefill and decode workers of different TP sizes, through real processes (gloo, one torch
thread per rank), over grpc and nixl: prefill TP 2 -> decode TP 1, prefill TP 1 -> decode TP 2 and
prefill TP 2 -> decode TP 2 serve the greedy tokens of an aggregated one-rank engine (float32), and
leave no page held on any worker (a follower's pool mirrors its leader's page table, so the leader's
count is every rank's).

Per backend one cluster (module scope): prefill workers of TP 1 and TP 2, a decode worker of TP 1 fed
by the TP 2 prefill, and a decode worker of TP 2 fed by both (round robin, so both pairings run).
"""
from __future__ import annotations

import time

import pytest
import torch
from tandem.engine import EngineCore, SamplingParams
from tandem.transfer import available_backends

from tests.support.clients import generate, load, pages_in_use, sampling
from tests.support.models import demo_model
from tests.support.procs import start_service

pytestmark = pytest.mark.timeout(300)

ENGINE = ["--max-total-tokens", "2048", "--dtype", "float32", "--page-size", "4", "--chunked-prefill-size", "32",
          "--torch-num-threads", "1", "--dist-timeout", "60", "--skip-warmup"]
# Multi-page prompts, one of them chunked (> 32 tokens), one shorter than a page.
PROMPTS = [[5, 17, 301, 2000, 44, 9, 77, 1234, 8000, 3, 3, 610],
           [(i * 37) % 8000 + 3 for i in range(45)],
           [11, 12, 13],
           [(i * 101) % 7000 + 9 for i in range(21)]]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens of an aggregated one-rank engine, per prompt."""
    torch.set_num_threads(1)
    engine = EngineCore(demo_model("tandem-demo-dense"), max_total_tokens=2048, dtype="float32", device="cpu",
                        page_size=4, disable_overlap_schedule=True)
    out = []
    for p in PROMPTS:
        rid = engine.add_request(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        toks = []
        while engine.has_work():
            toks += [t for o in engine.step() if o.rid == rid for t in o.new_token_ids]
        out.append(toks)
    return out


BACKENDS = ["grpc", pytest.param("nixl", marks=pytest.mark.skipif("nixl" not in available_backends() or
                                                                   available_backends()["nixl"] != "",
                                                                   reason="nixl not installed"))]


@pytest.fixture(scope="module", params=BACKENDS)
def cluster(request):
    path = demo_model("tandem-demo-dense")
    common = ["--model-path", path, *ENGINE, "--disaggregation-transfer-backend", request.param]
    started = []
    try:
        p1 = start_service("tandem.prefill", *common)
        started.append(p1)
        p2 = start_service("tandem.prefill", *common, "--tp-size", "2")
        started.append(p2)
        decode = ["--disaggregation-mode", "decode", "--max-local-prefill-length", "0",
                  "--prefill-selection", "round_robin", "--prefill-addresses"]
        d1 = start_service("tandem.decode", *common, *decode, p2.grpc_address)
        started.append(d1)
        d2 = start_service("tandem.decode", *common, "--tp-size", "2", *decode, p1.grpc_address, p2.grpc_address)
        started.append(d2)
    except BaseException:
        for s in started:
            s.stop()
        raise
    yield {"prefill_tp1": p1, "prefill_tp2": p2, "decode_tp1": d1, "decode_tp2": d2}
    for s in started:
        s.stop()


def no_pages_left(address: str, service: str, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while (used := pages_in_use(address, service)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return used


def served(address: str) -> list[list[int]]:
    return [generate(address, p, sampling(MAX_TOKENS, ignore_eos=True), override="remote")[0] for p in PROMPTS]


def test_prefill_tp2_to_decode_tp1(cluster, reference):
    before = load(cluster["prefill_tp2"].grpc_address, "prefill").num_prefilled_reqs
    assert served(cluster["decode_tp1"].grpc_address) == reference
    assert load(cluster["prefill_tp2"].grpc_address, "prefill").num_prefilled_reqs - before == len(PROMPTS)
    assert no_pages_left(cluster["decode_tp1"].grpc_address, "decode") == 0
    assert no_pages_left(cluster["prefill_tp2"].grpc_address, "prefill") == 0


def test_prefill_tp1_and_tp2_to_decode_tp2(cluster, reference):
    """Round robin over both prefill workers: the prompts twice, one request in between, so each prompt
    is prefilled once by each of them."""
    address = cluster["decode_tp2"].grpc_address
    before = [load(cluster[p].grpc_address, "prefill").num_prefilled_reqs for p in ("prefill_tp1", "prefill_tp2")]
    assert served(address) == reference
    assert generate(address, PROMPTS[0], sampling(MAX_TOKENS, ignore_eos=True), override="remote")[0] == reference[0]
    assert served(address) == reference
    after = [load(cluster[p].grpc_address, "prefill").num_prefilled_reqs for p in ("prefill_tp1", "prefill_tp2")]
    assert sorted(a - b for a, b in zip(after, before)) == [len(PROMPTS), len(PROMPTS) + 1]
    assert no_pages_left(cluster["decode_tp2"].grpc_address, "decode") == 0
    for p in ("prefill_tp1", "prefill_tp2"):
        assert no_pages_left(cluster[p].grpc_address, "prefill") == 0
