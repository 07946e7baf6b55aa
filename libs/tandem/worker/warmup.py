"""Prefill warmup (as Dynamo's SGLang prefill leader does): one dummy request with a fake
bootstrap room that transfers nothing, its stream consumed to the end, before the worker
reports SERVING, so the first real request's TTFT is not a cold-start spike."""
from __future__ import annotations

import logging

import grpc
from tandem.server.channels import open_channel
from tandem.server.tls import TlsFiles
from tandem.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)

WARMUP_INPUT_IDS = [0, 1, 2, 3]


def warmup_prefill(address: str, timeout: float, full_chunk_tokens: int = 0,
                   tls: TlsFiles | None = None) -> prefill_pb2.TransferDone:
    """Dynamo's tiny warmup request, then (when `full_chunk_tokens` > 0) one prompt of a whole
    prefill chunk, so the largest matrix shapes are not first met by a user request."""
    done = _warmup_request(address, timeout, WARMUP_INPUT_IDS, tls)
    if full_chunk_tokens > len(WARMUP_INPUT_IDS):
        # Token ids 0-3 exist in every vocabulary.
        done = _warmup_request(address, timeout, [i % 4 for i in range(full_chunk_tokens)], tls)
    return done


def _warmup_request(address: str, timeout: float, input_ids: list[int],
                    tls: TlsFiles | None) -> prefill_pb2.TransferDone:
    start = prefill_pb2.PrefillStart(
        request_id="warmup", input_ids=input_ids, warmup=True,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
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
