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
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from tandem.engine import EngineCore, SamplingParams
from tandem.transfer import available_backends
from tandem.v1 import decode_pb2, decode_pb2_grpc

from tests.support.clients import load, pages_in_use, sampling
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
REFERENCE: dict[tuple, tuple[list[int], list[float]]] = {}  # prompt -> one-rank tokens, logprobs


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens of an aggregated one-rank engine, per prompt."""
    torch.set_num_threads(1)
    engine = EngineCore(demo_model("tandem-demo-dense"), max_total_tokens=2048, dtype="float32", device="cpu",
                        page_size=4, disable_overlap_schedule=True)
    out = []
    for p in PROMPTS:
        rid = engine.add_request(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                                   logprobs=True))
        toks, lps = [], []
        while engine.has_work():
            for o in engine.step():
                if o.rid == rid:
                    toks += o.new_token_ids
                    lps += o.new_logprobs
        REFERENCE[tuple(p)] = toks, lps
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

    def start(*args):
        """Start services side by side (the decode workers need the prefills' addresses only)."""
        with ThreadPoolExecutor(len(args)) as pool:
            futures = [pool.submit(start_service, *a) for a in args]
        failed = None
        for f in futures:
            try:
                started.append(f.result())
            except BaseException as exc:
                failed = exc
        if failed is not None:
            raise failed
        return started[-len(args):]

    try:
        p1, p2 = start(("tandem.prefill", *common), ("tandem.prefill", *common, "--tp-size", "2"))
        decode = ["--disaggregation-mode", "decode", "--max-local-prefill-length", "0",
                  "--prefill-selection", "round_robin", "--prefill-addresses"]
        d1, d2 = start(("tandem.decode", *common, *decode, p2.grpc_address),
                       ("tandem.decode", *common, "--tp-size", "2", *decode, p1.grpc_address, p2.grpc_address))
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


def run(address: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, prefilled remotely."""
    with grpc.insecure_channel(address) as ch:
        chunks = list(decode_pb2_grpc.DecodeStub(ch).Generate(decode_pb2.GenerateRequest(
            input_ids=prompt, sampling=sampling(MAX_TOKENS, ignore_eos=True, logprobs=True),
            prefill_override="remote"), timeout=120))
    return [t for c in chunks for t in c.token_ids], [lp.logprob for c in chunks for lp in c.logprobs]


def served(address: str, prompts=PROMPTS) -> list[list[int]]:
    """The tokens of each prompt; their logprobs must be the one-rank engine's within 1e-4 (a sharded
    sum is not bit-identical; a KV head written wrong or not at all moves them far more)."""
    out = []
    for p in prompts:
        toks, lps = run(address, p)
        ref = REFERENCE[tuple(p)]
        if toks == ref[0]:
            assert max(abs(a - b) for a, b in zip(lps, ref[1])) < 1e-4, (lps, ref[1])
        out.append(toks)
    return out


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
    assert served(address, PROMPTS[:1]) == reference[:1]
    assert served(address) == reference
    after = [load(cluster[p].grpc_address, "prefill").num_prefilled_reqs for p in ("prefill_tp1", "prefill_tp2")]
    assert sorted(a - b for a, b in zip(after, before)) == [len(PROMPTS), len(PROMPTS) + 1]
    assert no_pages_left(cluster["decode_tp2"].grpc_address, "decode") == 0
    for p in ("prefill_tp1", "prefill_tp2"):
        assert no_pages_left(cluster[p].grpc_address, "prefill") == 0
