"""Small gRPC client helpers for integration tests."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
from tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2_grpc


def sampling(max_tokens: int = 16, temperature: float = 0.0, seed: int | None = None, **kw) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, **kw)
    if seed is not None:
        p.seed = seed
    return p


def generate(address: str, input_ids, params: common_pb2.SamplingParams, override: str = "",
             timeout: float = 120) -> tuple[list[int], common_pb2.TokenChunk]:
    with grpc.insecure_channel(address) as ch:
        stub = decode_pb2_grpc.DecodeStub(ch)
        tokens, last = [], None
        for chunk in stub.Generate(decode_pb2.GenerateRequest(input_ids=list(input_ids), sampling=params,
                                                              prefill_override=override), timeout=timeout):
            tokens += chunk.token_ids
            last = chunk
        return tokens, last


def generate_many(address: str, prompts, params_list, concurrency: int = 16, override: str = "") -> list[list[int]]:
    with ThreadPoolExecutor(concurrency) as pool:
        futs = [pool.submit(generate, address, p, s, override) for p, s in zip(prompts, params_list)]
        return [f.result()[0] for f in futs]


def load(address: str, service: str = "decode") -> common_pb2.WorkerLoad:
    with grpc.insecure_channel(address) as ch:
        stub = decode_pb2_grpc.DecodeStub(ch) if service == "decode" else prefill_pb2_grpc.PrefillStub(ch)
        return stub.GetLoad(common_pb2.GetLoadRequest(), timeout=10)


def pages_in_use(address: str, service: str = "decode") -> int:
    """Pages held by requests (not free, not merely cached): 0 when nothing leaked."""
    w = load(address, service)
    return w.total_pages - w.free_pages - w.evictable_pages
