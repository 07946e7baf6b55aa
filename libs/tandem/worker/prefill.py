"""Prefill worker logic: RegisterDecode, the per-request Prefill handshake, GetLoad.

Per request: assign a bootstrap room, take decode's page allocation, run the prompt
in prefill-only mode, and as each chunk's pages become final write them into decode's
pages (NIXL WRITE, or KvChunk messages on the stream for the grpc backend); then the aux
row (first token, logprob), wait for every transfer handle, free our pages (into the
prefix cache) and report done — or failed with a reason. Nothing is written before the
allocation has been checked against decode's registered layout.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from tandem.config import PrefillConfig
from tandem.transfer import AuxRow, KvSender, LayoutMismatchError, Registration, new_room_id, pages_needed
from tandem.v1 import common_pb2, prefill_pb2
from tandem.worker.convert import position_logprobs, sampling_from_proto
from tandem.worker.engine_loop import EngineLoop
from tandem.worker.errors import RequestFailed
from tandem.worker.kv_events import KvEventLog

log = logging.getLogger(__name__)


@dataclass
class PrefillCounters:
    requests: int = 0
    warmups: int = 0
    completed: int = 0
    failed: int = 0
    bytes_sent: int = 0
    last_transfer_gb_s: float = 0.0
    last_transfer_ms: float = 0.0


class PrefillWorker:
    def __init__(self, config: PrefillConfig, loop: EngineLoop, sender: KvSender, worker_id: str) -> None:
        self.config = config
        self.loop = loop
        self.engine = loop.engine
        self.sender = sender
        self.worker_id = worker_id
        self.decodes: dict[str, str] = {}  # decode_id -> sender peer name
        self._decodes_lock = threading.Lock()
        self.rooms: dict[int, str] = {}  # live room -> request id
        self.counters = PrefillCounters()
        self._reported_failed = 0
        self.events = KvEventLog(worker_id, self.engine.kv_snapshot)
        self.engine.subscribe_kv_events(self.events.on_events)

    # ---- RegisterDecode -------------------------------------------------------------------
    def register_decode(self, req: prefill_pb2.RegisterDecodeRequest) -> prefill_pb2.RegisterDecodeResponse:
        if not req.decode_id:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "decode_id is empty")
        reg = Registration.from_request(req)
        with self._decodes_lock:
            old = self.decodes.pop(req.decode_id, None)
            if old is not None:
                self.sender.remove_peer(old)  # a restarted decode re-registers with new addresses
            try:
                peer = self.sender.add_peer(reg)
            except LayoutMismatchError as exc:
                raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"decode {req.decode_id} cannot receive this prefill's KV: {exc}") from None
            except ValueError as exc:
                raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION, f"decode {req.decode_id}: {exc}") from None
            self.decodes[req.decode_id] = peer
        log.info("registered decode %s (agent %s, backend %s)", req.decode_id, peer, reg.backend)
        layout = common_pb2.KvLayout()
        layout.CopyFrom(self.sender.layout)
        return prefill_pb2.RegisterDecodeResponse(prefill_id=self.worker_id, layout=layout,
                                                  agent_name=self.sender.name)

    # ---- Prefill stream -------------------------------------------------------------------
    def prefill(self, requests: Iterator[prefill_pb2.PrefillClientMessage],
                is_active: Callable[[], bool]) -> Iterator[prefill_pb2.PrefillServerMessage]:
        first = next(requests, None)
        if first is None:
            return
        if first.WhichOneof("msg") != "start":
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the first message must be 'start', got {first.WhichOneof('msg')!r}")
        start = first.start
        ids = list(start.input_ids)
        try:
            sp = sampling_from_proto(start.sampling)
            self.engine.validate_request(ids, sp)
        except ValueError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        peer = None
        if not start.warmup:
            with self._decodes_lock:
                peer = self.decodes.get(start.decode_id)
            if peer is None:
                raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"decode {start.decode_id!r} is not registered; call RegisterDecode first")
        rid = f"{start.request_id or 'prefill'}-{uuid.uuid4().hex[:8]}"
        room = new_room_id()
        num_pages = pages_needed(len(ids), self.engine.page_size)
        self.counters.requests += 1
        self.rooms[room] = rid
        try:
            yield prefill_pb2.PrefillServerMessage(room=prefill_pb2.BootstrapRoom(
                room=room, num_pages=num_pages, prefill_id=self.worker_id))
            if start.warmup:
                self.counters.warmups += 1
                yield from self._run(rid, ids, sp, room, None, None, is_active)
                return
            msg = next(requests, None)
            if msg is None:
                return  # decode went away before allocating: nothing was computed
            if msg.WhichOneof("msg") == "cancel":
                return
            if msg.WhichOneof("msg") != "allocation":
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"expected 'allocation' for room {room}, got {msg.WhichOneof('msg')!r}")
            alloc = msg.allocation
            self._check_allocation(alloc, room, num_pages, peer)
            yield from self._run(rid, ids, sp, room, peer, alloc, is_active)
        finally:
            self.rooms.pop(room, None)

    def _check_allocation(self, alloc: prefill_pb2.PageAllocation, room: int, num_pages: int, peer: str) -> None:
        if alloc.room not in (0, room):
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"allocation names room {alloc.room}, this stream's room is {room}")
        if len(alloc.page_indices) != num_pages:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"allocation has {len(alloc.page_indices)} pages, the prompt needs {num_pages}")
        remote = self.sender._peer_layout(peer)
        bad = [p for p in alloc.page_indices if not 0 <= p < remote.num_pages]
        if bad:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"page index {bad[0]} out of range for decode's pool of {remote.num_pages} pages")
        if len(set(alloc.page_indices)) != len(alloc.page_indices):
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "allocation repeats a page index")
        if not 0 <= alloc.aux_slot < remote.num_aux_slots:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"aux slot {alloc.aux_slot} out of range for {remote.num_aux_slots} slots")

    def _run(self, rid, ids, sp, room, peer, alloc, is_active) -> Iterator[prefill_pb2.PrefillServerMessage]:
        """Prefill `ids`, streaming finished chunks to decode; `peer` None = warmup (no transfer)."""
        chunks: queue.Queue = queue.Queue()
        t0 = time.monotonic()

        def on_chunk(_rid, pages, num_computed):  # engine loop thread: just hand over
            chunks.put((list(pages), num_computed >= len(ids)))

        stream = self.loop.submit(ids, sp, rid, mode="prefill_only", on_chunk_done=None if peer is None else on_chunk)
        handles, sent_pages, chunk_index, result, held = [], 0, 0, None, False
        t_xfer = None
        try:
            while result is None:
                if not is_active():
                    stream.cancel()
                    return
                out = stream.poll(0.002)
                if out is not None and out.finished:
                    if out.finish_reason != "prefill_done":
                        yield _failed(room, "prefill_aborted", out.error or f"prefill ended: {out.finish_reason}")
                        return
                    held, result = True, out
                while peer is not None and not chunks.empty():
                    pages, is_last = chunks.get()
                    dst = alloc.page_indices[sent_pages:sent_pages + len(pages)]
                    t_xfer = t_xfer or time.monotonic()
                    h = self.sender.send_kv(room, peer, pages, dst, chunk_index=chunk_index, is_last=is_last)
                    handles.append(h)
                    for m in h.messages:
                        yield prefill_pb2.PrefillServerMessage(chunk=m)
                    sent_pages += len(pages)
                    chunk_index += 1
            t_prefill = time.monotonic()
            tok = result.new_token_ids[0]
            lp = result.new_logprobs[0] if result.new_logprobs else float("nan")
            top = result.new_top_logprobs[0] if result.new_top_logprobs else []
            nbytes = 0
            if peer is not None:
                if sent_pages != len(alloc.page_indices):
                    yield _failed(room, "internal", f"sent {sent_pages} of {len(alloc.page_indices)} pages")
                    return
                handles.append(self.sender.send_aux(room, peer, alloc.aux_slot,
                                                    AuxRow(room, tok, lp, result.cached_tokens, top)))
                status = self.sender.wait(handles, self.config.disaggregation_transfer_timeout)
                if status.failed:
                    self.counters.failed += 1
                    self.sender.notify_failed(room, peer, status.reason)
                    yield _failed(room, "transfer_failed", status.reason, retryable=True)
                    return
                nbytes = sum(h.nbytes for h in handles)
            t_done = time.monotonic()
            self.engine.release(rid, cache=True)
            held = False
            xfer_s = t_done - (t_xfer or t_prefill)
            self.counters.completed += 1
            self.counters.bytes_sent += nbytes
            self.counters.last_transfer_ms = xfer_s * 1e3
            self.counters.last_transfer_gb_s = nbytes / max(xfer_s, 1e-9) / 1e9
            done = prefill_pb2.TransferDone(
                room=room, first_token_id=tok, cached_tokens=result.cached_tokens, bytes_transferred=nbytes,
                num_chunks=chunk_index, prefill_ms=(t_prefill - t0) * 1e3, transfer_ms=xfer_s * 1e3,
                first_token_logprobs=position_logprobs(lp if lp == lp else None, top))
            yield prefill_pb2.PrefillServerMessage(done=done)
        finally:
            if handles:
                self.sender.release(handles)
            if held:
                self.engine.abort(rid)  # releases the held pages without caching them
            elif not stream.finished:
                stream.cancel()

    def prefill_stats(self, _stats=None) -> dict:
        """Disaggregation fields of the next SchedulerStats."""
        c = self.counters
        failed = c.failed - self._reported_failed
        self._reported_failed = c.failed
        return dict(num_prefill_inflight_queue_reqs=len(self.rooms), kv_transfer_speed_gb_s=c.last_transfer_gb_s,
                    kv_transfer_latency_ms=c.last_transfer_ms, num_transfer_failed_reqs=failed)

    def get_load(self) -> common_pb2.WorkerLoad:
        s = self.engine.stats()
        return common_pb2.WorkerLoad(
            num_running_reqs=s.num_running_reqs, num_waiting_reqs=s.num_queue_reqs, free_pages=s.num_free_pages,
            total_pages=s.num_total_pages, evictable_pages=s.num_evictable_pages,
            num_inflight_transfers=len(self.rooms), token_usage=s.token_usage, cache_hit_rate=s.cache_hit_rate,
            num_prefilled_reqs=self.counters.completed)


def _failed(room: int, code: str, message: str, retryable: bool = False) -> prefill_pb2.PrefillServerMessage:
    return prefill_pb2.PrefillServerMessage(failed=prefill_pb2.TransferFailed(
        room=room, error=common_pb2.ErrorDetail(code=code, message=message, retryable=retryable)))
