"""Decode's remote prefills: every room in flight, on one thread, in one poll loop.

One asyncio loop ("remote-prefill") owns the KV receiver and every Prefill stream
(``grpc.aio``: no reader thread per call). Per request a coroutine runs the attempts
(retrying on another prefill worker); per attempt:

1. pick a prefill worker (``tandem.routing.policies``, fed by the prefills' KvEvents for
   kv_aware), register with it once, choose the room and start tracking it in the receiver
   (Bootstrapping: the bootstrap timeout runs);
2. pre-allocate pages and an aux slot through the engine loop (a command; waits while the
   pool is full, bounded by the bootstrap timeout), ``expect`` the room, send the request
   and the allocation on one stream (one round trip);
3. forward what prefill sends (in-band KV, the aux row, done, failed) to the receiver.

The poll loop polls every in-flight room once per iteration (``KvReceiver.poll_all``, as
SGLang's scheduler does), woken by new messages or NIXL notifications; it applies the
receiver's timeouts and ends each attempt whose room reached Success or Failed. On Success
the aux row (the first token, which travels only there) activates the request in the
engine. On failure the attempt never frees pages prefill may still write: unless prefill
said done or failed (its writes are over), it first asks ``CancelRoom`` and waits for the
answer, then aborts the engine request (pages and aux slot freed).

Failures carry a typed reason; ``pd_proto.FAILURE_STATUS`` maps it to the request's gRPC
status. In-flight counts live in the attempts table only.

``move_in`` is the same attempt with a draining decode worker as the sender: the KV of a
request moved off it (``tandem.worker.kv_move``), one attempt, no retry.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc
from tandem.config import DecodeConfig
from tandem.engine import OutOfPages
from tandem.routing.kv_events import follow_kv_events
from tandem.routing.kv_index import KvIndex
from tandem.routing.policies import WorkerView, make_policy
from tandem.routing.sampling import sampling_to_proto
from tandem.sampling import SamplingParams
from tandem.server.channels import open_channel
from tandem.server.tls import TlsFiles, tls_files
from tandem.transfer import AuxRow, FailureReason, KVPoll, KvReceiver, TransferDone, TransferFailure, new_room_id
from tandem.v1 import prefill_pb2, prefill_pb2_grpc
from tandem.worker.engine_loop import EngineLoop, RequestStream
from tandem.worker.pd_proto import FAILURE_STATUS, message_from_proto, prefill_agents, registration_to_request
from tandem.worker.stats_reporter import StatsReporter

log = logging.getLogger(__name__)

# How long an abandoned attempt waits for prefill to confirm that none of its writes is in
# flight before the pages are freed anyway (a prefill that cannot answer in this time is
# taken to be gone).
CANCEL_ACK_TIMEOUT_S = 10.0
# Poll period while no message or notification wakes the loop (timeouts are checked then).
IDLE_POLL_S = 0.05

# gRPC errors of the Prefill stream: whether another worker may help, and the request's status.
# NOT_FOUND: that prefill worker lacks the request's LoRA adapter (another one may hold it; the
# last attempt's NOT_FOUND reaches the client as such).
_RETRYABLE_RPC = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
                  grpc.StatusCode.NOT_FOUND}
_KEPT_RPC_STATUS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND}


class AttemptFailed(Exception):
    """One remote prefill attempt failed; ``retryable``: another worker may succeed."""

    def __init__(self, status: grpc.StatusCode, message: str, retryable: bool, bootstrap: bool = False,
                 reregister: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.retryable = status, message, retryable
        self.bootstrap = bootstrap  # failed before prefill confirmed the room
        self.reregister = reregister  # prefill did not know us (restarted): register again

    @classmethod
    def from_failure(cls, f: TransferFailure, bootstrap: bool = False) -> AttemptFailed:
        status, retryable = FAILURE_STATUS[f.reason]
        return cls(status, f.message, retryable, bootstrap)

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError, what: str, bootstrap: bool = False) -> AttemptFailed:
        return cls.from_status(exc.code(), exc.details(), what, bootstrap)

    @classmethod
    def from_status(cls, code: grpc.StatusCode, details: str | None, what: str,
                    bootstrap: bool = False) -> AttemptFailed:
        """The attempt's failure from the status ``what`` (a Prefill call) ended with."""
        status = code if code in _KEPT_RPC_STATUS else grpc.StatusCode.UNAVAILABLE
        return cls(status, f"{what}: {details or code.name}", code in _RETRYABLE_RPC, bootstrap,
                   reregister=code == grpc.StatusCode.FAILED_PRECONDITION)


class RemotePrefillFailed(Exception):
    """Every attempt failed (or one that may not be retried): end the request with ``status``."""

    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class PdCounters:
    """Per worker, since start (failures go to the metrics as they happen)."""

    remote_prefills: int = 0
    retries: int = 0


class PrefillPeer:
    """One prefill worker as decode sees it (its channel lives on the remote-prefill loop)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel: grpc.aio.Channel | None = None
        self.stub: prefill_pb2_grpc.PrefillStub | None = None
        self.agent_name: str | None = None
        # Who writes its rooms: the agent name, or each TP rank's (name, layout) (pd_proto.prefill_agents).
        self.agents: str | tuple = ()
        self._register_lock: asyncio.Lock | None = None

    def connect(self, tls: TlsFiles | None = None) -> None:
        self.channel = open_channel(self.address, tls, aio=True)
        self.stub = prefill_pb2_grpc.PrefillStub(self.channel)
        self._register_lock = asyncio.Lock()

    async def ensure_registered(self, request: prefill_pb2.RegisterDecodeRequest, timeout: float = 10.0
                                ) -> str | tuple:
        """RegisterDecode once (again after the prefill restarted); returns who writes its rooms:
        prefill's agent name, or each of its TP ranks' (the receiver's ``expect(peer=...)``)."""
        async with self._register_lock:
            if self.agent_name is None:
                try:
                    resp = await self.stub.RegisterDecode(request, timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                        raise AttemptFailed(grpc.StatusCode.FAILED_PRECONDITION, f"{self.address}: {exc.details()}",
                                            False, bootstrap=True) from None
                    raise AttemptFailed.from_rpc(exc, self.address, bootstrap=True) from None
                self.agent_name, self.agents = resp.agent_name, prefill_agents(resp)
            return self.agents


@dataclass(frozen=True)
class _Move:
    """A request moved off a draining decode worker: its tokens so far and what the holder calls it."""

    move_id: str
    output_ids: list[int]


@dataclass
class _Attempt:
    room: int
    rid: str
    peer: PrefillPeer
    blocks: int
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    allocated: bool = False
    confirmed: bool = False  # prefill answered with the room
    prefill_finished: bool = False  # prefill said done or failed: none of its writes is in flight
    t_confirmed: float | None = None
    stream_error: AttemptFailed | None = None


class RemotePrefill:
    """Decode's remote prefills (see the module docstring). ``prefill()`` may be called from
    any thread; everything else runs on the loop's own thread."""

    def __init__(self, config: DecodeConfig, engine: EngineLoop, receiver: KvReceiver, worker_id: str,
                 reporter: StatsReporter | None = None, dynamic: bool = False) -> None:
        self.config = config
        self.engine = engine
        self.receiver = receiver
        self.worker_id = worker_id
        self.reporter = reporter
        # address -> peer; replaced whole (never mutated) so other threads may read it.
        # ``dynamic``: the set follows etcd (``set_addresses``) and may be empty for a while.
        self._peers = {a: PrefillPeer(a) for a in dict.fromkeys(config.prefill_addresses)}
        if not self._peers and not dynamic:
            raise ValueError("no prefill workers configured")
        self._retired: list[PrefillPeer] = []  # left the set, channel open while attempts use it
        self._move_sources: dict[str, PrefillPeer] = {}  # draining decode workers we fetched moved KV from
        self._followers: dict[str, asyncio.Task] = {}
        self.index = KvIndex(block_size=engine.info.page_size)
        self.policy = make_policy(config.prefill_selection, self.index)
        self.counters = PdCounters()
        self._registration = registration_to_request(receiver.registration(), worker_id)
        self._attempts: dict[int, _Attempt] = {}
        self._aio = asyncio.new_event_loop()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._thread = threading.Thread(target=self._run, name="remote-prefill", daemon=True)
        self._started = threading.Event()
        self.last_overlap_blocks = 0

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    def stop(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._aio).result(timeout)
        self._aio.call_soon_threadsafe(self._aio.stop)
        self._thread.join(timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self._aio)
        self._wake = asyncio.Event()
        for p in self.peers:
            self._connect(p)
        self._tasks.append(self._aio.create_task(self._poll_loop(), name="poll-rooms"))
        # Out-of-band backends say when notifications arrived: the poll loop sleeps until then.
        self.receiver.on_progress(lambda: self._aio.call_soon_threadsafe(self._wake.set))
        self._started.set()
        self._aio.run_forever()
        self._aio.close()

    async def _shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        followers = list(self._followers.values())
        for t in followers:
            t.cancel()
        await asyncio.gather(*self._tasks, *followers, return_exceptions=True)
        for p in [*self.peers, *self._retired, *self._move_sources.values()]:
            await p.channel.close(grace=None)

    # ---- the set of prefill workers ----------------------------------------------------
    @property
    def peers(self) -> list[PrefillPeer]:
        return list(self._peers.values())

    def set_addresses(self, addresses: Sequence[str]) -> None:
        """Make the set of prefill workers exactly ``addresses`` (any thread; --prefill-discovery
        etcd). A worker that leaves is picked no more at once; its channel closes once no
        attempt uses it. A worker that stays keeps its channel and registration."""
        self._aio.call_soon_threadsafe(self._set_addresses, list(dict.fromkeys(addresses)))

    def _set_addresses(self, wanted: list[str]) -> None:
        gone = [a for a in self._peers if a not in wanted]
        added = [a for a in wanted if a not in self._peers]
        peers = {a: self._peers.get(a) or self._connect(PrefillPeer(a)) for a in wanted}
        for a in gone:
            follower = self._followers.pop(a, None)
            if follower is not None:
                follower.cancel()
            self.index.remove_worker(a)
            self._retired.append(self._peers[a])
        self._peers = peers
        self._close_idle_retired()
        if added or gone:
            log.info("prefill workers: %s (added %s, removed %s)", wanted or "none", added or "-", gone or "-")

    def _connect(self, peer: PrefillPeer) -> PrefillPeer:
        peer.connect(tls_files(self.config))
        if self.config.prefill_selection == "kv_aware":
            self._followers[peer.address] = self._aio.create_task(
                follow_kv_events(peer.stub.KvEvents, self.index, peer.address), name=f"kv-events {peer.address}")
        return peer

    def _close_idle_retired(self) -> None:
        busy = {id(a.peer) for a in self._attempts.values()}
        for p in [p for p in self._retired if id(p) not in busy]:
            self._retired.remove(p)
            self._aio.create_task(p.channel.close(grace=None))

    # ---- requests (any thread) ---------------------------------------------------------
    def prefill(self, rid: str, ids: list[int], sp: SamplingParams,
                peer: PrefillPeer | None = None, lora_name: str | None = None) -> Future[RequestStream]:
        """Prefill ``ids`` remotely and activate the request here; the Future gives its output
        stream or raises RemotePrefillFailed. Cancelling the Future abandons the request
        cleanly (prefill is told, pages are freed once it confirmed). ``peer``: only this
        worker, no retry (warmup). ``lora_name``: the LoRA adapter both sides run the prompt under
        (prefill answers NOT_FOUND when it does not hold it)."""
        return asyncio.run_coroutine_threadsafe(self._request(rid, ids, sp, peer, lora_name), self._aio)

    def move_in(self, rid: str, ids: list[int], output_ids: list[int], sp: SamplingParams, address: str,
                move_id: str, lora_name: str | None = None) -> Future[RequestStream]:
        """Fetch the KV of a request moved off the draining decode worker at ``address`` (it holds
        it as ``move_id``: the KV of ``ids`` and ``output_ids`` but the last) and continue it here
        from its last token; the Future gives its output stream or raises RemotePrefillFailed (one
        attempt: the caller recomputes it instead). Cancelling it abandons the fetch cleanly.
        ``lora_name``: the adapter its KV was computed under (the holder checks it; here its LoRA
        slot is taken with the pages)."""
        return asyncio.run_coroutine_threadsafe(
            self._move_in(rid, ids, sp, address, _Move(move_id, list(output_ids)), lora_name), self._aio)

    async def _move_in(self, rid: str, ids: list[int], sp: SamplingParams, address: str,
                       move: _Move, lora_name: str | None = None) -> RequestStream:
        peer = self._move_sources.get(address)
        if peer is None:
            peer = self._move_sources[address] = PrefillPeer(address)
            peer.connect(tls_files(self.config))
        return await self._request(rid, ids, sp, peer, lora_name, move)

    @property
    def num_inflight(self) -> int:
        """Rooms in flight (the one count: the attempts table)."""
        return len(self._attempts)

    # ---- the poll loop -----------------------------------------------------------------
    async def _poll_loop(self) -> None:
        while True:
            self._wake.clear()
            if self._attempts:
                states = self.receiver.poll_all()
                for room, att in list(self._attempts.items()):
                    if states.get(room) in (KVPoll.Success, KVPoll.Failed):
                        att.ended.set()
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
            except TimeoutError:
                pass

    # ---- one request, its attempts -----------------------------------------------------
    async def _request(self, rid: str, ids: list[int], sp: SamplingParams, only: PrefillPeer | None,
                       lora_name: str | None = None, move: _Move | None = None) -> RequestStream:
        tried: set[str] = set()
        last: AttemptFailed | None = None
        attempts = 1 if only is not None else self.config.prefill_retries + 1
        for attempt in range(attempts):
            try:
                peer = only or self._pick(ids, tried, lora_name)
            except AttemptFailed as exc:
                self._count_failure(exc)
                last = exc
                break
            tried.add(peer.address)
            if attempt:
                self.counters.retries += 1
                log.warning("request %s: retrying prefill on %s after: %s", rid, peer.address, last.message)
            # Each attempt is its own engine request: a failed attempt's abort leaves a final
            # output for the engine loop to deliver, and under the same id it would end the
            # retry's stream, empty.
            attempt_rid = rid if attempt == 0 else f"{rid}#retry{attempt}"
            try:
                row = await self._attempt(peer, attempt_rid, ids, sp, lora_name, move)
            except AttemptFailed as exc:
                self._count_failure(exc)
                last = exc
                if exc.reregister:
                    peer.agent_name = None  # e.g. the prefill restarted and lost our registration
                if not exc.retryable:
                    break
                continue
            self.counters.remote_prefills += move is None
            first = row.samples[0]
            try:
                return await asyncio.wrap_future(self.engine.activate_external(
                    attempt_rid, first.token_id, first.logprob if sp.logprobs else None, row.cached_tokens,
                    first.top_logprobs))
            except ValueError as exc:
                self.engine.abort(attempt_rid)
                raise RemotePrefillFailed(grpc.StatusCode.INTERNAL, f"activating {rid} failed: {exc}") from None
        raise RemotePrefillFailed(last.status, f"remote prefill failed after {len(tried)} worker(s): {last.message}")

    def _pick(self, ids: Sequence[int], exclude: set[str], lora_name: str | None = None) -> PrefillPeer:
        peers = self.peers
        if not peers:
            raise AttemptFailed(grpc.StatusCode.UNAVAILABLE, "no prefill worker is registered", False, bootstrap=True)
        candidates = [p for p in peers if p.address not in exclude] or peers
        views = [WorkerView(p.address, active_requests=sum(a.peer is p for a in self._attempts.values()),
                            active_blocks=sum(a.blocks for a in self._attempts.values() if a.peer is p))
                 for p in candidates]
        decision = self.policy.choose(views, ids, lora_name)
        self.last_overlap_blocks = decision.overlap_blocks
        return next(p for p in candidates if p.address == decision.worker_id)

    async def _attempt(self, peer: PrefillPeer, rid: str, ids: list[int], sp: SamplingParams,
                       lora_name: str | None = None, move: _Move | None = None) -> AuxRow:
        """One attempt; on any failure nothing of it is left (room, pages, aux slot, stream).
        ``move``: the sender holds the KV of ``ids`` and the move's output_ids but the last."""
        rx, cfg = self.receiver, self.config
        room = new_room_id()
        att = _Attempt(room, rid, peer, math.ceil(len(ids) / self.engine.info.page_size))
        rx.bootstrap(room)  # the bootstrap timeout runs from here
        self._attempts[room] = att
        call = reader = None
        t0 = time.monotonic()
        self._publish()
        try:
            agent = await peer.ensure_registered(self._registration)
            alloc = await self._allocate(att, ids, sp, lora_name, move)
            t_alloc = time.monotonic()
            rx.expect(room, alloc.page_indices, alloc.aux_slot, peer=agent)
            call = peer.stub.Prefill(timeout=cfg.disaggregation_bootstrap_timeout + cfg.disaggregation_waiting_timeout
                                     + cfg.disaggregation_transfer_timeout)
            try:
                await call.write(prefill_pb2.PrefillClientMessage(start=prefill_pb2.PrefillStart(
                    request_id=rid, decode_id=self.worker_id, input_ids=ids + move.output_ids[:-1] if move else ids,
                    sampling=sampling_to_proto(sp), room=room, lora_name=lora_name or "",
                    move_id=move.move_id if move else "")))
                await call.write(prefill_pb2.PrefillClientMessage(allocation=prefill_pb2.PageAllocation(
                    room=room, page_indices=alloc.page_indices, aux_slot=alloc.aux_slot,
                    num_cached_tokens=alloc.num_cached_tokens)))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # Prefill ended the stream first: report its status, not the failed write.
                raise AttemptFailed.from_status(await call.code(), await call.details(), f"prefill {peer.address}",
                                                bootstrap=True) from None
            reader = asyncio.create_task(self._read(att, call, len(alloc.page_indices)))
            await att.ended.wait()
            if att.stream_error is not None:
                raise att.stream_error
            if rx.poll(room) is KVPoll.Failed:
                raise AttemptFailed.from_failure(rx.failure(room), bootstrap=not att.confirmed)
            row = rx.aux_row(room)
            if row.room != room or not row.samples:
                raise AttemptFailed.from_failure(TransferFailure(room, FailureReason.PROTOCOL, (
                    f"aux row {row.room}/{row.samples[0].token_id if row.samples else None} does not match "
                    f"room {room}")))
            t_done = time.monotonic()
            self._publish(kv_transfer_alloc_ms=(t_alloc - t0) * 1e3,
                          kv_transfer_bootstrap_ms=((att.t_confirmed or t_done) - t_alloc) * 1e3,
                          kv_transfer_latency_ms=(t_done - (att.t_confirmed or t_alloc)) * 1e3,
                          kv_transfer_total_mb=rx.bytes_received(room) / 1e6)
            await call.done_writing()
            if self.reporter is not None and move is None:
                self.reporter.add_counts(pd_transferred_tokens=len(ids) - alloc.num_cached_tokens,
                                         pd_decode_reused_tokens=alloc.num_cached_tokens)
            return row
        except BaseException:
            if att.allocated and call is not None and not att.prefill_finished:
                await self._cancel_room(peer, room)
            if att.allocated:
                self.engine.abort(rid)  # frees the pre-allocated pages and aux slot
            raise
        finally:
            if reader is not None:
                reader.cancel()
            if call is not None:
                call.cancel()
            rx.forget(room)
            del self._attempts[room]
            if self._retired:
                self._close_idle_retired()
            self._publish()

    async def _allocate(self, att: _Attempt, ids: list[int], sp: SamplingParams, lora_name: str | None = None,
                        move: _Move | None = None):
        """Pre-allocate decode pages; wait while the pool is full, until the room's bootstrap
        timeout fails it. A moved request's KV is fetched whole (no prefix reuse)."""
        while True:
            try:
                alloc = await asyncio.wrap_future(self.engine.allocate_external(
                    ids, sp, att.rid, reuse_prefix=move is None and self.config.disaggregation_decode_enable_radix_cache,
                    output_ids=move.output_ids if move else (), lora_name=lora_name))
            except OutOfPages:
                if self.receiver.poll(att.room) is KVPoll.Failed:
                    raise AttemptFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        "decode KV pool stayed full past the bootstrap timeout", False,
                                        bootstrap=True) from None
                await asyncio.sleep(0.01)
                continue
            except ValueError as exc:
                raise AttemptFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc), False, bootstrap=True) from None
            att.allocated = True
            return alloc

    async def _read(self, att: _Attempt, call, num_pages: int) -> None:
        """Forward what prefill sends on the attempt's stream to the receiver."""
        try:
            async for msg in call:
                if msg.WhichOneof("msg") == "room":
                    if msg.room.room != att.room or msg.room.num_pages != num_pages:
                        raise AttemptFailed(grpc.StatusCode.FAILED_PRECONDITION, (
                            f"prefill answered room {msg.room.room} of {msg.room.num_pages} pages, decode sent room "
                            f"{att.room} of {num_pages} pages (page sizes differ?)"), False, bootstrap=True)
                    att.confirmed, att.t_confirmed = True, time.monotonic()
                    continue
                lib_msg = message_from_proto(msg)
                att.prefill_finished |= isinstance(lib_msg, (TransferDone, TransferFailure))
                try:
                    self.receiver.handle(lib_msg)
                except ValueError:
                    pass  # the room is Failed now, with the reason
                self._wake.set()
            if not att.prefill_finished:
                raise AttemptFailed(grpc.StatusCode.UNAVAILABLE, "prefill closed the stream before reporting done",
                                    True, bootstrap=not att.confirmed)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and att.ended.is_set():
                return  # we cancelled it
            att.stream_error = AttemptFailed.from_rpc(exc, f"prefill {att.peer.address}", bootstrap=not att.confirmed)
            att.ended.set()
        except AttemptFailed as exc:
            att.stream_error = exc
            att.ended.set()

    async def _cancel_room(self, peer: PrefillPeer, room: int) -> None:
        """Ask prefill to stop the room and wait until none of its writes is in flight."""
        try:
            await peer.stub.CancelRoom(prefill_pb2.PrefillCancel(room=room, reason="decode abandoned the room"),
                                       timeout=CANCEL_ACK_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:  # unreachable: gone, nothing more is written
                log.warning("room %s: prefill %s did not confirm the cancel (%s); freeing its pages anyway",
                            room, peer.address, exc.code().name)

    # ---- stats -------------------------------------------------------------------------
    def _count_failure(self, exc: AttemptFailed) -> None:
        if self.reporter is not None:
            self.reporter.add_counts(num_bootstrap_failed_reqs=int(exc.bootstrap),
                                     num_transfer_failed_reqs=int(not exc.bootstrap))

    def _publish(self, **latest) -> None:
        if self.reporter is not None:
            self.reporter.set_gauges(num_decode_transfer_queue_reqs=len(self._attempts),
                                     num_decode_prealloc_queue_reqs=sum(a.allocated for a in self._attempts.values()),
                                     **latest)
