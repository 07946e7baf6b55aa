"""gRPC transport of tandem.v1.Decode over tandem.worker.decode.DecodeWorker, and of the Prefill
handshake's sending side for the requests a drain moves (over tandem.worker.prefill.KvSource)."""
from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from tandem.metrics import ComponentMetrics
from tandem.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from tandem.worker.decode import DecodeWorker
from tandem.worker.embedding import EmbeddingWorker
from tandem.worker.errors import ClientGone, RequestFailed
from tandem.worker.prefill import KvSource
from tandem.worker.stats_reporter import StatsReporter


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    """``embedder``: an embedding worker's Embed logic (None: this worker generates); ``info``:
    what GetInfo answers."""

    def __init__(self, worker: DecodeWorker, metrics: ComponentMetrics, reporter: StatsReporter,
                 info: Callable[[], common_pb2.WorkerInfo], embedder: EmbeddingWorker | None = None) -> None:
        self.worker = worker
        self.metrics = metrics
        self.reporter = reporter
        self.info = info
        self.embedder = embedder

    def GetInfo(self, request, context):
        return self.info()

    def Embed(self, request, context):
        if self.embedder is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this worker generates; embeddings are served by workers started with --is-embedding")
        t0 = time.monotonic()
        with self.metrics.track_request("embed", request_bytes=request.ByteSize()) as track:
            try:
                response = self.embedder.embed(request)
            except RequestFailed as exc:
                track.set_error(exc.status.name)
                context.abort(exc.status, exc.message)
            track.first_response()
            track.add_response_bytes(response.ByteSize())
        self.reporter.record_request(ttft=None, itl=[], e2e=time.monotonic() - t0, aborted=False)
        return response

    def Generate(self, request, context):
        if self.embedder is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this worker serves embeddings (--is-embedding): call Embed, not Generate")
        t0 = time.monotonic()
        times: list[float] = []
        aborted = True
        with self.metrics.track_request("generate", request_bytes=request.ByteSize()) as track:
            try:
                for chunk in self.worker.generate(request, context.is_active, context.add_callback):
                    if chunk.token_ids:
                        times.append(time.monotonic())
                    track.first_response()
                    track.add_response_bytes(chunk.ByteSize())
                    if chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                        aborted = chunk.finish_reason == common_pb2.FINISH_REASON_ABORT
                    yield chunk
            except ClientGone:
                track.set_error("CANCELLED")
                return
            except RequestFailed as exc:
                track.set_error(exc.status.name)
                context.abort(exc.status, exc.message)
            finally:
                if times:
                    self.reporter.record_request(
                        ttft=times[0] - t0, itl=[b - a for a, b in zip(times, times[1:])],
                        e2e=time.monotonic() - t0, aborted=aborted)

    def GetLoad(self, request, context):
        return self.worker.get_load()

    def KvEvents(self, request, context):
        yield from self.worker.events.stream(request.since_sequence, request.snapshot, context.is_active)


class MoveSourceServicer(prefill_pb2_grpc.PrefillServicer):
    """tandem.v1.Prefill on a decode worker: the sending side of the handshake for the requests a
    drain holds for a move (``PrefillStart.move_id``, ``tandem.worker.kv_move``). GetLoad and
    KvEvents are a prefill worker's (UNIMPLEMENTED here)."""

    def __init__(self, source: KvSource) -> None:
        self.source = source

    def RegisterDecode(self, request, context):
        try:
            return self.source.register_decode(request)
        except RequestFailed as exc:
            context.abort(exc.status, exc.message)

    def Prefill(self, request_iterator, context):
        try:
            yield from self.source.prefill(request_iterator, context.add_callback)
        except RequestFailed as exc:
            context.abort(exc.status, exc.message)

    def CancelRoom(self, request, context):
        try:
            return self.source.cancel_room(request)
        except RequestFailed as exc:
            context.abort(exc.status, exc.message)
