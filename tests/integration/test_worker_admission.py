"""A decode worker's bounded queue: beyond the running batch plus --max-queued-requests a
request is refused at once with RESOURCE_EXHAUSTED (no unbounded wait), and once the load is
gone the worker serves again with no page leaked."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from tests.support.clients import generate, pages_in_use, sampling
from tests.support.procs import start_service
from tests.support.waiting import wait_for

MODEL = "models/tandem-demo-dense"


def test_overload_is_refused_at_once_and_pages_come_back():
    worker = start_service("tandem.decode", "--model-path", MODEL, "--max-total-tokens", "4096",
                           "--max-running-requests", "1", "--max-queued-requests", "1", "--skip-warmup")
    try:
        def one(i: int):
            try:
                tokens, _ = generate(worker.grpc_address, [11, 12, 13 + i], sampling(max_tokens=300, ignore_eos=True),
                                     timeout=120)
                return len(tokens)
            except grpc.RpcError as e:
                return (e.code(), e.details())

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(one, range(6)))  # six at once for a capacity of two
        served = [r for r in results if r == 300]
        refused = [r for r in results if r != 300]
        assert 1 <= len(served) <= 5 and refused, results  # arrivals within ms: some must meet a full worker
        assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queued-requests" in msg
                   for code, msg in refused), refused
        wait_for(lambda: pages_in_use(worker.grpc_address) == 0, timeout=30, what="pages freed")
        tokens, _ = generate(worker.grpc_address, [11, 12, 13], sampling(max_tokens=2), timeout=60)
        assert len(tokens) == 2
    finally:
        worker.stop()
