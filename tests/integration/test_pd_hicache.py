"""PD disaggregation with HiCache on the prefill worker: prefixes evicted from its small device
pool come back from the host tier, and the tokens equal the aggregated worker's."""
from __future__ import annotations

import random
import time

from tests.integration.test_pd_disaggregation import ENGINE, wait_no_pages_in_use
from tests.integration.test_worker_observability import scrape, total
from tests.support.clients import generate_many, sampling
from tests.support.procs import start_service


def test_prefill_with_hicache_equals_aggregated():
    rng = random.Random(7)
    prompts = [[rng.randrange(10, 500) for _ in range(400)] for _ in range(4)]  # 25 pages each
    common = ["--page-size", "16", "--disaggregation-transfer-backend", "grpc"]
    prefill = start_service("tandem.prefill", *ENGINE, *common, "--max-total-tokens", "1024",
                            "--enable-hierarchical-cache", "--hicache-mem-layout", "page_first")
    decode = start_service("tandem.decode", *ENGINE, *common, "--disaggregation-mode", "decode",
                           "--prefill-selection", "round_robin", "--prefill-addresses", prefill.grpc_address)
    agg = start_service("tandem.decode", *ENGINE, "--page-size", "16")
    try:
        params = [sampling(max_tokens=8)] * len(prompts)
        want = generate_many(agg.grpc_address, prompts, params, concurrency=2)
        for _ in range(2):  # the second round finds every prompt evicted from the prefill's device pool
            assert generate_many(decode.grpc_address, prompts, params, concurrency=2, override="remote") == want
        deadline = time.monotonic() + 15
        while total(scrape(prefill.system_address), "tandem_hicache_host_hit_tokens_total") == 0:
            assert time.monotonic() < deadline, "no host hit reported by the prefill worker"
            time.sleep(0.2)
        assert wait_no_pages_in_use(decode.grpc_address) == 0
        assert wait_no_pages_in_use(prefill.grpc_address, "prefill") == 0
    finally:
        for s in (decode, agg, prefill):
            s.stop()
