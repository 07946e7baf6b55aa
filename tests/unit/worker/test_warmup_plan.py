"""What a worker warms before SERVING (tandem.worker.warmup.warmup_requests): on CUDA every sampler
path and a multi-page prompt besides Dynamo's request and a full chunk; on CPU those two only."""
from __future__ import annotations

from types import SimpleNamespace

from tandem.sampling import SamplingParams
from tandem.v1 import common_pb2
from tandem.worker.warmup import WARMUP_INPUT_IDS, warmup_requests


def info(device: str, num_pages: int = 1000, page_size: int = 16, context_length: int = 4096):
    return SimpleNamespace(device=device, num_pages=num_pages, page_size=page_size, context_length=context_length)


def test_cuda_warms_every_sampler_path_a_multi_page_prompt_and_a_full_chunk():
    plan = warmup_requests(info("cuda:0"), 8192)
    sps = [SamplingParams(max_tokens=2, **kw) for _, kw in plan]  # the engine's field names
    for _, kw in plan:
        common_pb2.SamplingParams(**kw)  # the proto's
    assert plan[0] == (WARMUP_INPUT_IDS, {"temperature": 0.0})  # Dynamo's request first
    assert any(sp.greedy for sp in sps) and any(not sp.greedy and sp.seed is not None for sp in sps)
    assert any(not sp.greedy and (sp.top_k > 0 or sp.top_p < 1.0) for sp in sps)
    assert any(sp.frequency_penalty and sp.repetition_penalty != 1.0 and sp.logit_bias for sp in sps)
    assert any(sp.logprobs and sp.top_logprobs for sp in sps)
    assert [len(ids) for ids, _ in plan if len(ids) > len(WARMUP_INPUT_IDS)] == [256, 8192]


def test_the_multi_page_prompt_fits_a_small_pool_and_chunk():
    plan = warmup_requests(info("cuda", num_pages=16, page_size=4), 48)
    assert [len(ids) for ids, _ in plan if len(ids) > len(WARMUP_INPUT_IDS)] == [16, 48]
    assert [len(ids) for ids, _ in warmup_requests(info("cuda", context_length=100))][-1] == 96


def test_cpu_warms_dynamos_request_and_a_full_chunk_only():
    assert warmup_requests(info("cpu"), 512) == [(WARMUP_INPUT_IDS, {"temperature": 0.0}), ([0, 1, 2, 3] * 128,
                                                                                            {"temperature": 0.0})]
    assert warmup_requests(info("cpu")) == [(WARMUP_INPUT_IDS, {"temperature": 0.0})]
