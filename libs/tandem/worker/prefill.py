"""Prefill worker logic: RegisterDecode, the per-request Prefill stream, CancelRoom, GetLoad.

Per request the stream handler checks the request and decode's allocation (nothing is
computed or written before), opens the room in :class:`PrefillTransfers` and relays what
the room produces. :class:`PrefillTransfers` is prefill's one poll loop for every room: as
the request's outputs report a chunk's pages final (``StepOutput.pages_final``) it WRITEs
them into decode's pages (or packs them for the stream), then the aux row; it polls every room's transfer handles once per
iteration, and when they are done frees the pages (into the prefix cache) and reports
done. A failed or cancelled room is reported (and CancelRoom answered) only once none of
its writes is in flight any more, so decode may reuse its pages.

The handshake's sending side (:class:`KvSource`) also serves a draining decode worker, whose
rooms carry a request it holds for a move (``PrefillStart.move_id``): the room's pages are the
held request's, nothing is computed (:mod:`tandem.worker.kv_move`).
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
from tandem.config import DecodeConfig, PrefillConfig
from tandem.engine import UnknownLoraError
from tandem.routing.sampling import sampling_from_proto
from tandem.transfer import (
    AuxRow,
    FailureReason,
    KvSender,
    LayoutMismatchError,
    SampleToken,
    TransferDone,
    TransferError,
    TransferFailure,
    TransferHandle,
    TransferMessage,
    XferState,
    new_room_id,
    pages_needed,
)
from tandem.v1 import common_pb2, prefill_pb2
from tandem.worker.base import WorkerBase
from tandem.worker.engine_loop import EngineLoop, RequestStream
from tandem.worker.errors import RequestFailed
from tandem.worker.kv_move import HeldMoves
from tandem.worker.loop_thread import LoopThread
from tandem.worker.pd_proto import (
    layout_to_proto,
    message_to_proto,
    registration_from_request,
    sender_ranks_to_proto,
)
from tandem.worker.stats_reporter import StatsReporter

log = logging.getLogger(__name__)

# Poll period while transfers are in flight (NIXL handles need polling: UCX completes a write
# only when called) and while idle. In flight, the first check after a new write comes after
# FIRST_BUSY_POLL_S and the period doubles up to BUSY_POLL_S while nothing new happens: a small
# write (a chunk's last pages, the aux row) is seen complete within tens of microseconds instead
# of a whole period, and a long transfer is still polled at most every BUSY_POLL_S.
FIRST_BUSY_POLL_S = 0.00005
BUSY_POLL_S = 0.0005
IDLE_POLL_S = 0.05
_END = None  # ends a room's outbox


@dataclass
class _Room:
    room: int
    rid: str
    peer: str | None  # None: warmup, nothing is transferred
    dst_pages: list[int]
    aux_slot: int
    num_prompt_tokens: int
    skip_pages: int = 0  # leading prompt pages decode already holds: never written
    stream: RequestStream | None = None
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # protos for the stream handler
    handles: list[TransferHandle] = field(default_factory=list)
    sent_pages: int = 0
    seen_pages: int = 0  # prompt pages reported final so far (written or skipped)
    chunk_index: int = 0
    result: object = None  # the engine's prefill_done output
    aux_sent: bool = False
    held: bool = False  # the engine holds the prompt's pages until released
    failure: TransferFailure | None = None
    cancel_reason: str | None = None
    closed: threading.Event = field(default_factory=threading.Event)
    t0: float = field(default_factory=time.monotonic)
    t_xfer: float | None = None
    t_prefill: float | None = None
    t_finishing: float | None = None


class PrefillTransfers(LoopThread):
    """Every room of this prefill worker, on one thread, polled once per iteration."""

    _MAX_TOMBSTONES = 65536

    def __init__(self, loop: EngineLoop, sender: KvSender, transfer_timeout_s: float,
                 reporter: StatsReporter | None = None) -> None:
        super().__init__("prefill-transfers")
        self.loop = loop
        self.sender = sender
        self.transfer_timeout_s = transfer_timeout_s
        self.reporter = reporter
        self.completed = 0
        self._sends = 0  # writes started (the poll loop's period restarts short after one)
        self._rooms: dict[int, _Room] = {}
        self._tombstones: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def num_inflight(self) -> int:
        """Rooms in flight (the one count)."""
        with self._lock:
            return len(self._rooms)

    # ---- from stream handlers ----------------------------------------------------------
    def open(self, room: int, rid: str, peer: str | None, dst_pages: list[int], aux_slot: int, ids: list[int],
             sp, skip_pages: int = 0, lora_name: str | None = None, held: bool = False) -> _Room:
        """Track a room and start its prefill (under LoRA adapter ``lora_name``); its messages
        arrive on the room's outbox. ``skip_pages``: the prompt's leading pages decode already
        holds (not written). ``held``: ``rid`` is a request held for a move, whose KV is ``ids``:
        its pages are sent, nothing is computed."""
        r = _Room(room, rid, peer, dst_pages, aux_slot, len(ids), skip_pages)
        with self._lock:
            if room in self._tombstones:
                raise RequestFailed(grpc.StatusCode.CANCELLED, f"room {room} was cancelled")
            if room in self._rooms:
                raise RequestFailed(grpc.StatusCode.ALREADY_EXISTS, f"room {room} is already in flight")
            self._rooms[room] = r
        try:
            r.stream = (self.loop.export_held(rid, on_output=self._wake.set) if held else
                        self.loop.submit(ids, sp, rid, mode="prefill_only", on_output=self._wake.set,
                                         lora_name=lora_name))
        except ValueError as exc:
            with self._lock:
                self._rooms.pop(room, None)
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        self._publish()
        self._wake.set()
        return r

    def cancel(self, room: int, reason: str, wait_s: float | None = None) -> bool:
        """Cancel ``room``; with ``wait_s``, return once none of its writes is in flight (or
        after ``wait_s``). An unknown room is remembered, so that it never starts. Returns
        whether the room was live."""
        with self._lock:
            r = self._rooms.get(room)
            if r is None:
                self._tombstones[room] = None
                while len(self._tombstones) > self._MAX_TOMBSTONES:
                    self._tombstones.popitem(last=False)
                return False
            if r.cancel_reason is None:
                r.cancel_reason = reason
        self._wake.set()
        if wait_s is not None and not r.closed.wait(wait_s):
            raise TimeoutError(f"room {room} still has writes in flight after {wait_s:g} s")
        return True

    # ---- the poll loop -----------------------------------------------------------------
    def _run(self) -> None:
        busy_poll = FIRST_BUSY_POLL_S
        while not self._stop.is_set():
            self._wake.clear()
            with self._lock:
                rooms = list(self._rooms.values())
            before = self._sends
            for r in rooms:
                try:
                    self._advance(r)
                except Exception as exc:  # a bug must fail its room, not the loop
                    log.exception("room %s failed", r.room)
                    self._fail(r, FailureReason.PREFILL_FAILED, f"{type(exc).__name__}: {exc}")
                    self._advance_failed(r)
            busy = any(r.handles or r.failure for r in rooms)
            busy_poll = FIRST_BUSY_POLL_S if self._sends != before else min(2 * busy_poll, BUSY_POLL_S)
            self._wake.wait(busy_poll if busy else IDLE_POLL_S)
        with self._lock:
            rooms = list(self._rooms.values())
        for r in rooms:
            self._fail(r, FailureReason.PREFILL_FAILED, "prefill worker shutting down")
            self._close(r)

    def _advance(self, r: _Room) -> None:
        if r.stream is None:  # open() tracks the room before it submits the prefill: not started yet
            return
        if r.failure is not None:
            return self._advance_failed(r)
        if r.cancel_reason is not None:
            self._fail(r, FailureReason.CANCELLED, r.cancel_reason)
            return self._advance_failed(r)
        while (out := r.stream.poll(0)) is not None:
            if out.pages_final and r.peer is not None:  # warmup (no peer): nothing to send
                pages = out.pages_final[max(0, r.skip_pages - r.seen_pages):]  # decode holds the rest
                r.seen_pages += len(out.pages_final)
                if pages and not self._send_chunk(r, pages, out.num_computed_tokens >= r.num_prompt_tokens):
                    return self._advance_failed(r)
            if not out.finished:
                continue
            if not out.prefill_done:
                self._fail(r, FailureReason.PREFILL_FAILED, out.error or f"prefill ended: {out.finish_reason}")
                return self._advance_failed(r)
            r.result, r.held, r.t_prefill = out, True, time.monotonic()
        if r.result is None:
            return
        if r.peer is None:  # warmup: nothing to transfer
            return self._finish(r, 0)
        if not r.aux_sent:
            if r.sent_pages != len(r.dst_pages):
                self._fail(r, FailureReason.PROTOCOL, f"sent {r.sent_pages} of {len(r.dst_pages)} pages")
                return self._advance_failed(r)
            out = r.result
            row = AuxRow(r.room, [SampleToken(out.new_token_ids[0],
                                              out.new_logprobs[0] if out.new_logprobs else float("nan"),
                                              out.new_top_logprobs[0] if out.new_top_logprobs else [])],
                         out.cached_tokens)
            if not self._send(r, lambda: self.sender.send_aux(r.room, r.peer, r.aux_slot, row)):
                return self._advance_failed(r)
            r.aux_sent, r.t_finishing = True, time.monotonic()
        status = self.sender.check(r.handles)
        if status.state is XferState.ERROR:
            self.sender.notify_failed(r.room, r.peer, status.reason)
            self._fail(r, FailureReason.BACKEND_ERROR, status.reason)
            return self._advance_failed(r)
        if status.done:
            return self._finish(r, sum(h.nbytes for h in r.handles))
        if time.monotonic() - r.t_finishing > self.transfer_timeout_s:
            self._fail(r, FailureReason.TIMEOUT, f"transfer not done after {self.transfer_timeout_s:g} s")
            return self._advance_failed(r)

    def _send_chunk(self, r: _Room, pages: list[int], is_last: bool) -> bool:
        """WRITE a chunk's final pages into the next pages decode allocated."""
        dst = r.dst_pages[r.sent_pages:r.sent_pages + len(pages)]
        r.t_xfer = r.t_xfer or time.monotonic()
        if not self._send(r, lambda: self.sender.send_kv(r.room, r.peer, pages, dst, chunk_index=r.chunk_index,
                                                         is_last=is_last)):
            return False
        r.sent_pages += len(pages)
        r.chunk_index += 1
        return True

    def _send(self, r: _Room, send: Callable[[], TransferHandle]) -> bool:
        try:
            h = send()
        except (TransferError, ValueError) as exc:
            self._fail(r, FailureReason.BACKEND_ERROR, str(exc))
            return False
        r.handles.append(h)
        self._sends += 1
        for m in h.messages:
            self._put(r, m)
        return True

    def _put(self, r: _Room, msg: TransferMessage) -> None:
        r.outbox.put(message_to_proto(msg))

    def _finish(self, r: _Room, nbytes: int) -> None:
        t_done = time.monotonic()
        done = self.sender.done(r.room, r.handles) if r.peer is not None else TransferDone(r.room, 0, 0)
        self.sender.release(r.handles)
        r.handles = []
        self.loop.release(r.rid, cache=True)
        r.held = False
        xfer_s = t_done - (r.t_xfer or r.t_prefill)
        self.completed += 1
        msg = message_to_proto(done)
        msg.done.prefill_ms = (r.t_prefill - r.t0) * 1e3
        msg.done.transfer_ms = xfer_s * 1e3
        r.outbox.put(msg)
        if self.reporter is not None and r.peer is not None:
            self.reporter.set_gauges(kv_transfer_latency_ms=xfer_s * 1e3,
                                     kv_transfer_speed_gb_s=nbytes / max(xfer_s, 1e-9) / 1e9)
        self._close(r)

    def _fail(self, r: _Room, reason: FailureReason, message: str) -> None:
        if r.failure is not None:
            return
        r.failure = TransferFailure(r.room, reason, message)
        r.t_finishing = r.t_finishing or time.monotonic()
        if r.stream is not None and not r.stream.finished:
            r.stream.cancel()  # frees the pages the prefill holds
        elif r.held:
            self.loop.abort(r.rid)  # releases the held pages without caching them
            r.held = False
        if reason in (FailureReason.BACKEND_ERROR, FailureReason.TIMEOUT) and self.reporter is not None:
            self.reporter.add_counts(num_transfer_failed_reqs=1)

    def _advance_failed(self, r: _Room) -> None:
        """Report the failure once none of the room's writes is in flight."""
        if self.sender.in_flight(r.handles) and time.monotonic() - r.t_finishing <= self.transfer_timeout_s:
            return
        self.sender.release(r.handles)
        r.handles = []
        if r.held:
            self.loop.abort(r.rid)
            r.held = False
        self._put(r, r.failure)
        self._close(r)

    def _close(self, r: _Room) -> None:
        with self._lock:
            self._rooms.pop(r.room, None)
        r.outbox.put(_END)
        r.closed.set()
        self._publish()

    def _publish(self) -> None:
        if self.reporter is not None:
            self.reporter.set_gauges(num_prefill_inflight_queue_reqs=self.num_inflight)


class KvSource:
    """The sending side of the PD handshake: RegisterDecode, the per-request Prefill stream,
    CancelRoom. A prefill worker computes each room's prompt; a draining decode worker
    (``held``) sends the pages of a request it holds for a move (``PrefillStart.move_id``)."""

    def __init__(self, config: PrefillConfig | DecodeConfig, loop: EngineLoop, sender: KvSender, worker_id: str,
                 reporter: StatsReporter | None = None, held: HeldMoves | None = None) -> None:
        self.config, self.loop, self.worker_id = config, loop, worker_id
        self.held = held
        self.sender = sender
        self.decodes: dict[str, str] = {}  # decode_id -> sender peer name
        self._decodes_lock = threading.Lock()
        self.transfers = PrefillTransfers(loop, sender, config.disaggregation_transfer_timeout, reporter)

    # ---- RegisterDecode -------------------------------------------------------------------
    def register_decode(self, req: prefill_pb2.RegisterDecodeRequest) -> prefill_pb2.RegisterDecodeResponse:
        if not req.decode_id:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "decode_id is empty")
        reg = registration_from_request(req)
        with self._decodes_lock:
            old = self.decodes.pop(req.decode_id, None)
            if old is not None:
                self.sender.remove_peer(old)  # a restarted decode re-registers with new addresses
            try:
                peer = self.sender.add_peer(reg)
            except LayoutMismatchError as exc:
                raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"decode {req.decode_id} cannot receive this prefill's KV: {exc}") from None
            except (ValueError, TransferError) as exc:
                raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION, f"decode {req.decode_id}: {exc}") from None
            self.decodes[req.decode_id] = peer
        log.info("registered decode %s (agent %s, backend %s)", req.decode_id, peer, reg.backend)
        return prefill_pb2.RegisterDecodeResponse(prefill_id=self.worker_id, layout=layout_to_proto(self.sender.layout),
                                                  agent_name=self.sender.name,
                                                  ranks=sender_ranks_to_proto(self.sender.ranks()))

    # ---- Prefill stream -------------------------------------------------------------------
    def prefill(self, requests: Iterator[prefill_pb2.PrefillClientMessage],
                on_cancel: Callable[[Callable[[], None]], object]) -> Iterator[prefill_pb2.PrefillServerMessage]:
        first = next(requests, None)
        if first is None:
            return
        if first.WhichOneof("msg") != "start":
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the first message must be 'start', got {first.WhichOneof('msg')!r}")
        start = first.start
        # Decode writes its allocation right behind a non-warmup start, without waiting for an answer:
        # read it before refusing the start, so that this stream never ends while decode is still
        # writing (its failed write would then hide this worker's status behind a local INTERNAL).
        second = None if start.warmup else next(requests, None)
        ids = list(start.input_ids)
        try:
            sp = sampling_from_proto(start.sampling)
            if not start.move_id:  # a move's KV is computed: HeldMoves.check compares it, adapter included
                self.loop.validate(ids, sp, lora_name=start.lora_name or None)
        except UnknownLoraError as exc:  # decode holds the adapter, this prefill worker does not
            raise RequestFailed(grpc.StatusCode.NOT_FOUND, f"prefill worker {self.worker_id}: {exc}") from None
        except ValueError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if start.move_id:
            if self.held is None:
                raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"move_id={start.move_id!r}: this worker holds no request to move")
            if start.warmup:
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "move_id: a move is no warmup")
            # RequestFailed unless held here with these tokens, computed under this adapter
            self.held.check(start.move_id, ids, start.lora_name or None)
        room = start.room or new_room_id()
        num_pages = pages_needed(len(ids), self.loop.info.page_size)
        peer, pages, aux_slot, skip_pages = None, [], -1, 0
        if not start.warmup:
            with self._decodes_lock:
                peer = self.decodes.get(start.decode_id)
            if peer is None:
                raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"decode {start.decode_id!r} is not registered; call RegisterDecode first")
            msg = second
            if msg is None:
                return  # decode went away before allocating: nothing was computed
            if msg.WhichOneof("msg") != "allocation":
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"expected 'allocation' for room {room}, got {msg.WhichOneof('msg')!r}")
            alloc = msg.allocation
            if alloc.room not in (0, room):
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"allocation names room {alloc.room}, this stream's room is {room}")
            ps = self.loop.info.page_size
            if alloc.num_cached_tokens % ps or alloc.num_cached_tokens >= len(ids):
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"num_cached_tokens={alloc.num_cached_tokens}: must be a multiple of the page size "
                                    f"({ps}) below the prompt length ({len(ids)})")
            skip_pages = alloc.num_cached_tokens // ps
            num_pages -= skip_pages
            try:
                self.sender.check_allocation(peer, alloc.page_indices, alloc.aux_slot, num_pages)
            except ValueError as exc:
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            pages, aux_slot = list(alloc.page_indices), alloc.aux_slot
        rid = start.move_id or f"{start.request_id or 'prefill'}-{uuid.uuid4().hex[:8]}"
        if start.move_id:
            # this room sends it, or frees it when it fails
            self.held.take(start.move_id, ids, start.lora_name or None)
        try:
            r = self.transfers.open(room, rid, peer, pages, aux_slot, ids, sp, skip_pages, start.lora_name or None,
                                    held=bool(start.move_id))
        except RequestFailed:
            if start.move_id:
                self.loop.abort(rid)
            raise
        on_cancel(lambda: self.transfers.cancel(room, "decode cancelled the stream"))
        try:
            yield prefill_pb2.PrefillServerMessage(room=prefill_pb2.BootstrapRoom(
                room=room, num_pages=num_pages, prefill_id=self.worker_id))
            while (msg := r.outbox.get()) is not _END:
                yield msg
        finally:
            if not r.closed.is_set():
                self.transfers.cancel(room, "the Prefill stream ended")

    def cancel_room(self, req: prefill_pb2.PrefillCancel) -> prefill_pb2.CancelRoomResponse:
        try:
            found = self.transfers.cancel(req.room, req.reason or "cancelled by decode",
                                          wait_s=self.config.disaggregation_transfer_timeout)
        except TimeoutError as exc:
            raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
        return prefill_pb2.CancelRoomResponse(found=found)


class PrefillWorker(WorkerBase, KvSource):
    def __init__(self, config: PrefillConfig, loop: EngineLoop, sender: KvSender, worker_id: str,
                 reporter: StatsReporter | None = None) -> None:
        WorkerBase.__init__(self, config, loop, worker_id)
        KvSource.__init__(self, config, loop, sender, worker_id, reporter)

    def get_load(self) -> common_pb2.WorkerLoad:
        return self.load(self.transfers.num_inflight, self.transfers.completed)
