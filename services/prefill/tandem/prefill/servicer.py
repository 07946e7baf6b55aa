"""gRPC transport of tandem.v1.Prefill over tandem.worker.prefill.PrefillWorker."""
from __future__ import annotations

from tandem.metrics import ComponentMetrics
from tandem.v1 import prefill_pb2_grpc
from tandem.worker.errors import RequestFailed
from tandem.worker.prefill import PrefillWorker


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker, metrics: ComponentMetrics) -> None:
        self.worker = worker
        self.metrics = metrics

    @staticmethod
    def _unary(handle, request, context):
        """A unary RPC: the worker's answer, or its RequestFailed as the call's status."""
        try:
            return handle(request)
        except RequestFailed as exc:
            context.abort(exc.status, exc.message)

    def RegisterDecode(self, request, context):
        return self._unary(self.worker.register_decode, request, context)

    def Prefill(self, request_iterator, context):
        with self.metrics.track_request("prefill") as track:
            try:
                for msg in self.worker.prefill(request_iterator, context.add_callback):
                    track.first_response()
                    track.add_response_bytes(msg.ByteSize())
                    if msg.WhichOneof("msg") == "failed":
                        track.set_error(msg.failed.error.code or "transfer_failed")
                    yield msg
            except RequestFailed as exc:
                track.set_error(exc.status.name)
                context.abort(exc.status, exc.message)

    def CancelRoom(self, request, context):
        return self._unary(self.worker.cancel_room, request, context)

    def GetLoad(self, request, context):
        return self.worker.get_load()

    def KvEvents(self, request, context):
        yield from self.worker.events.stream(request.since_sequence, request.snapshot, context.is_active)
