"""Warmup before SERVING, so the first real request's TTFT is not a cold-start spike. Prefill (as
Dynamo's SGLang prefill leader does): dummy requests with a fake bootstrap room that transfer
nothing, each stream consumed to the end. What every worker warms (``warmup_requests``: every
sampler path, prompt sizes up to a whole chunk) is defined here, once."""
from __future__ import annotations

import logging

import grpc
from tandem.server.channels import open_channel
from tandem.server.tls import TlsFiles
from tandem.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)

WARMUP_INPUT_IDS = [0, 1, 2, 3]
GREEDY = {"temperature": 0.0}
# A prompt of several pages: the first multi-page transfer in PD and the prefill shapes between the
# tiny prompt and a whole chunk.
WARMUP_MULTI_PAGE_TOKENS = 256
# Every sampler code path a first request can take (after a prefill the sampler runs eagerly, so its
# kernels compile on first use, not at graph capture): greedy, a seeded draw (the Gumbel kernel),
# top-k/top-p/min-p with logprobs, penalties with a logit bias. Field names are both the proto's and
# the engine's SamplingParams'.
WARMUP_SAMPLINGS = (
    GREEDY,
    {"temperature": 0.8, "seed": 1},
    {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.01, "seed": 1, "logprobs": True, "top_logprobs": 2},
    {"temperature": 0.8, "seed": 1, "frequency_penalty": 0.5, "presence_penalty": 0.1, "repetition_penalty": 1.1,
     "logit_bias": {1: 1.0}},
)


def warmup_prompt(tokens: int) -> list[int]:
    """A prompt of ``tokens`` ids 0-3 (they exist in every vocabulary)."""
    return [i % 4 for i in range(tokens)]


def compiles_kernels(info) -> bool:
    """Whether a first request on this engine (``EngineLoop.info``) meets kernels that compile or load
    on first use: CUDA (Triton JIT, cuBLAS heuristics). The CPU engine (torch_native) has none, and
    warms with Dynamo's request and a full chunk only (each warmup request costs every start)."""
    return str(info.device).startswith("cuda")


def multi_page_tokens(info) -> int:
    """The multi-page warmup prompt's length on an engine: at most a quarter of its KV pool and within
    its context, so warmup never competes for pages."""
    return max(len(WARMUP_INPUT_IDS), min(WARMUP_MULTI_PAGE_TOKENS, info.context_length - 4,
                                          info.num_pages * info.page_size // 4))


def warmup_requests(info, full_chunk_tokens: int = 0) -> list[tuple[list[int], dict]]:
    """[(prompt ids, sampling fields)] a worker on engine ``info`` runs before SERVING: Dynamo's tiny
    greedy request; where kernels compile (``compiles_kernels``) the tiny prompt with every other
    sampler path and a greedy multi-page prompt; then (``full_chunk_tokens`` > 0) a whole prefill
    chunk, so the largest matrix shapes are not first met by a user request."""
    cold = compiles_kernels(info)
    out = [(WARMUP_INPUT_IDS, dict(kw)) for kw in (WARMUP_SAMPLINGS if cold else WARMUP_SAMPLINGS[:1])]
    lengths = {full_chunk_tokens}
    if cold:
        lengths.add(min(multi_page_tokens(info), full_chunk_tokens or WARMUP_MULTI_PAGE_TOKENS))
    out += [(warmup_prompt(n), dict(GREEDY)) for n in sorted(lengths) if n > len(WARMUP_INPUT_IDS)]
    return out


def warmup_prefill(address: str, timeout: float, requests: list[tuple[list[int], dict]],
                   tls: TlsFiles | None = None) -> prefill_pb2.TransferDone:
    """Run ``requests`` (``warmup_requests``) through the prefill server at ``address``. Returns the
    last result."""
    done = None
    for ids, sampling in requests:
        done = _warmup_request(address, timeout, ids, sampling, tls)
    return done


def _warmup_request(address: str, timeout: float, input_ids: list[int], sampling: dict,
                    tls: TlsFiles | None) -> prefill_pb2.TransferDone:
    start = prefill_pb2.PrefillStart(
        request_id="warmup", input_ids=input_ids, warmup=True,
        sampling=common_pb2.SamplingParams(max_tokens=8, ignore_eos=True, **sampling))
    with open_channel(address, tls) as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)
        done = None
        try:
            for msg in stub.Prefill(iter([prefill_pb2.PrefillClientMessage(start=start)]), timeout=timeout):
                if msg.WhichOneof("msg") == "done":
                    done = msg.done
                elif msg.WhichOneof("msg") == "failed":
                    raise RuntimeError(f"prefill warmup failed: {msg.failed.error.message}")
        except grpc.RpcError as exc:
            raise RuntimeError(f"prefill warmup failed: {exc.code().name}: {exc.details()}") from None
    if done is None:
        raise RuntimeError("prefill warmup ended without a result")
    log.info("prefill warmup (%d tokens): prefilled in %.1f ms", len(input_ids), done.prefill_ms)
    return done
