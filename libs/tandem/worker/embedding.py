"""Embedding worker logic (``--is-embedding``): Embed requests in, pooled vectors out.

Texts are tokenized on the calling (gRPC) thread with the checkpoint's tokenizer, special
tokens included (Qwen3-Embedding's tokenizer appends the ``<|endoftext|>`` whose hidden state
is the embedding), and each request is checked there, so a bad one fails alone with
INVALID_ARGUMENT naming the input.

Batching: requests that arrive while the engine is busy wait in a queue; the next engine
command takes every waiting request at once, so concurrent small requests share forward
passes (the engine packs all their inputs without padding, per token budget). Each request's
result is the return value of that command, split back per request.
"""
from __future__ import annotations

import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc
from tandem.engine import EmbeddingOutput, EngineCore
from tandem.v1 import common_pb2
from tandem.worker.engine_loop import EngineLoop
from tandem.worker.errors import RequestFailed


@dataclass
class _Job:
    inputs: list[list[int]]
    dimensions: int | None
    done: Future = field(default_factory=Future)


def embed_groups(engine: EngineCore, jobs: list[_Job]) -> list[EmbeddingOutput]:
    """One engine call per distinct ``dimensions`` over every job's inputs; each job's output, in order."""
    outputs: list[EmbeddingOutput | None] = [None] * len(jobs)
    by_dims: dict[int | None, list[int]] = {}
    for i, job in enumerate(jobs):
        by_dims.setdefault(job.dimensions, []).append(i)
    for dims, idx in by_dims.items():
        out = engine.embed([ids for i in idx for ids in jobs[i].inputs], dims)
        at = 0
        for i in idx:
            n = len(jobs[i].inputs)
            outputs[i] = EmbeddingOutput(out.vectors[at:at + n], out.num_tokens[at:at + n], out.pooling,
                                         out.normalized)
            at += n
    return outputs


class EmbeddingWorker:
    """Serves Decode.Embed on an embedding worker; ``tokenizer``: the checkpoint's (tokenizers.Tokenizer)."""

    def __init__(self, loop: EngineLoop, tokenizer) -> None:
        self.loop = loop
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._waiting: list[_Job] = []
        self.requests = 0
        self.batches = 0  # engine commands run (each takes every request waiting then)

    def tokenize(self, inputs) -> list[list[int]]:
        """Token ids of each EmbedInput; RequestFailed(INVALID_ARGUMENT) naming the input."""
        texts = {i: x.text for i, x in enumerate(inputs) if x.WhichOneof("input") == "text"}
        if texts and self.tokenizer is None:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                "input: this checkpoint has no tokenizer.json; send token ids")
        encoded = dict(zip(texts, (e.ids for e in self.tokenizer.encode_batch(list(texts.values()))))) if texts else {}
        out = []
        for i, x in enumerate(inputs):
            kind = x.WhichOneof("input")
            if kind is None:
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, f"input[{i}]: set text or token_ids")
            out.append(list(encoded[i]) if kind == "text" else list(x.token_ids.ids))
        return out

    def embed(self, request: common_pb2.EmbedRequest) -> common_pb2.EmbedResponse:
        """The request's embeddings; RequestFailed for a bad request or a stopped engine."""
        if request.dimensions < 0:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, f"dimensions: {request.dimensions} is not >= 1")
        ids = self.tokenize(request.inputs)
        dims = request.dimensions or None
        try:
            self.loop.validate_embedding(ids, dims)
        except ValueError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        job = _Job(ids, dims)
        with self._lock:
            self._waiting.append(job)
            first = len(self._waiting) == 1
            self.requests += 1
        if first:  # no command is queued for the waiting list yet: queue one
            self.loop.call(self._run_waiting)
        try:
            out: EmbeddingOutput = job.done.result()
        except ValueError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except RuntimeError as exc:  # the engine loop stopped (shutting down)
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        return to_response(out)

    def _run_waiting(self, engine: EngineCore) -> None:
        """Loop thread: embed every waiting request together; each gets its result (or the error)."""
        with self._lock:
            jobs, self._waiting = self._waiting, []
        self.batches += 1
        try:
            outputs = embed_groups(engine, jobs)
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets it
            for job in jobs:
                job.done.set_exception(exc)
            return
        for job, out in zip(jobs, outputs):
            job.done.set_result(out)

    def warmup(self) -> None:
        """One real pass before SERVING, so the first request does not pay for cold kernels."""
        self.embed(common_pb2.EmbedRequest(request_id=f"warmup-{uuid.uuid4().hex[:6]}", inputs=[
            common_pb2.EmbedInput(token_ids=common_pb2.TokenSequence(ids=[0, 1, 2, 3]))]))


def to_response(out: EmbeddingOutput) -> common_pb2.EmbedResponse:
    rows = out.vectors.numpy()
    return common_pb2.EmbedResponse(
        embeddings=[common_pb2.Embedding(values=row, num_tokens=n) for row, n in zip(rows, out.num_tokens)],
        prompt_tokens=out.prompt_tokens, pooling=out.pooling, normalized=out.normalized)
