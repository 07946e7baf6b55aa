"""Scripted in-process Decode servicer: a test double for router unit tests (retries,
cancellation, errors), not a model. Integration tests use the real decode worker."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tandem.routing.block_hash import block_hashes
from tandem.sampling import IncrementalDetokenizer, StopStrings
from tandem.v1 import common_pb2, decode_pb2_grpc


class ScriptedDecode(decode_pb2_grpc.DecodeServicer):
    """Generate streams `reply_ids` one token per chunk (cut at max_tokens). With a
    ``tokenizer``, stop strings end it as a worker's engine ends it (the same check, and the
    last chunk says where the stop string begins)."""

    def __init__(self, reply_ids, block_size=4, delay=0.0, tokenizer=None):
        self.tokenizer = tokenizer
        self.reply_ids = list(reply_ids)
        self.block_size = block_size
        self.delay = delay
        self.fail_code = None  # abort Generate with this code before any output
        self.end_aborted = False  # end the stream at once with finish_reason ABORT and no tokens
        self.gate = None  # a threading.Event: Generate waits for it before the first token
        self.fail_after = None  # abort Generate with UNAVAILABLE once this many tokens of the reply went out
        self.move_after = None  # hand the request over with its KV (TokenChunk.move) once this many tokens went out
        self.requests = []
        self.cancelled = []
        self.finished = []
        self._events = []
        self._cv = threading.Condition()
        self.load = common_pb2.WorkerLoad(free_pages=100, total_pages=100)

    def Generate(self, request, context):
        self.requests.append(request)
        if self.fail_code is not None:
            context.abort(self.fail_code, "scripted failure")
        context.add_callback(lambda: None if request.request_id in self.finished
                             else self.cancelled.append(request.request_id))
        hashes = block_hashes(list(request.input_ids), self.block_size)
        if hashes:
            n = len(hashes) * self.block_size
            with self._cv:
                self._events.append(common_pb2.KvEvent(stored=common_pb2.BlockStored(
                    block_hashes=hashes, token_ids=request.input_ids[:n], block_size=self.block_size)))
                self._cv.notify_all()
        if self.gate is not None:
            self.gate.wait(30)
        if self.end_aborted:
            self.finished.append(request.request_id)
            yield common_pb2.TokenChunk(request_id=request.request_id, finish_reason=common_pb2.FINISH_REASON_ABORT)
            return
        # A migrated request (output_ids) goes on where its reply was cut, as the engine does.
        n = min(request.sampling.max_tokens, len(self.reply_ids))
        start = len(request.output_ids)
        stops = None
        if self.tokenizer is not None and request.sampling.stop:
            detok, stops = IncrementalDetokenizer(self.tokenizer), StopStrings(list(request.sampling.stop))
            stops.feed(detok.add(list(request.output_ids)), armed=False)
        for i in range(start, n):
            if self.delay:
                time.sleep(self.delay)
            if not context.is_active():
                return
            if self.fail_after is not None and i >= self.fail_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "scripted failure mid-stream")
            if self.move_after is not None and i >= self.move_after:
                yield common_pb2.TokenChunk(request_id=request.request_id,
                                            move=common_pb2.KvMove(address="held-here:1", move_id="m-1"))
                return
            chunk = common_pb2.TokenChunk(request_id=request.request_id, token_ids=[self.reply_ids[i]])
            if request.sampling.logprobs:
                chunk.logprobs.add(logprob=-0.5, top=[common_pb2.TokenLogprob(token_id=self.reply_ids[i],
                                                                              logprob=-0.5)][:request.sampling.top_logprobs])
            if stops is not None and stops.feed(detok.add([self.reply_ids[i]])):
                self.finished.append(request.request_id)
                chunk.finish_reason = common_pb2.FINISH_REASON_STOP
                chunk.stop_text_pos, chunk.matched_stop = stops.pos, stops.matched
                chunk.usage.CopyFrom(common_pb2.Usage(prompt_tokens=len(request.input_ids), completion_tokens=i + 1))
                yield chunk
                return
            if i == n - 1:
                self.finished.append(request.request_id)
                chunk.finish_reason = common_pb2.FINISH_REASON_LENGTH
                chunk.usage.CopyFrom(common_pb2.Usage(prompt_tokens=len(request.input_ids), completion_tokens=n))
            yield chunk

    def GetLoad(self, request, context):
        return self.load

    def KvEvents(self, request, context):
        seq = 0
        sent = 0
        while context.is_active():
            with self._cv:
                self._cv.wait_for(lambda n=sent: len(self._events) > n, timeout=0.2)
                new = self._events[sent:]
            if new:
                sent += len(new)
                seq += 1
                yield common_pb2.KvEventBatch(sequence=seq, timestamp=time.time(), events=new)


class FakeWorker:
    def __init__(self, reply_ids, server_credentials=None, **kw):
        self.servicer = ScriptedDecode(reply_ids, **kw)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        decode_pb2_grpc.add_DecodeServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = (self.server.add_secure_port("127.0.0.1:0", server_credentials) if server_credentials
                     else self.server.add_insecure_port("127.0.0.1:0"))
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()
        self.set_serving(True)

    def set_serving(self, ok: bool) -> None:
        st = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", st)

    def stop(self) -> None:
        self.server.stop(0)
