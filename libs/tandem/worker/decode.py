"""Decode worker logic: Generate (local or remote prefill), GetLoad, KvEvents.

Remote prefill follows SGLang's PD protocol over one gRPC bidi stream per request:
start -> BootstrapRoom -> PageAllocation -> (KV pages arrive by NIXL, or as KvChunk
messages on the grpc backend) -> TransferDone | TransferFailed. Decode tracks the room
in its KV receiver (Bootstrapping -> WaitingForInput -> Transferring -> Success/Failed)
and, on any failure, frees the pages it allocated and retries on another prefill worker
or ends the request with a clear status.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from tandem.config import DecodeConfig
from tandem.engine.engine import EngineStats, OutOfPages
from tandem.engine.sampling_params import SamplingParams
from tandem.transfer import KVPoll, KvReceiver
from tandem.v1 import common_pb2, decode_pb2, prefill_pb2
from tandem.worker.convert import chunk_from_output, sampling_from_proto
from tandem.worker.engine_loop import EngineLoop, RequestStream
from tandem.worker.errors import ClientGone, RequestFailed
from tandem.worker.kv_events import KvEventLog
from tandem.worker.prefill_client import PrefillCall, PrefillPeer, PrefillSelector, RemotePrefillError

log = logging.getLogger(__name__)

POLL_S = 0.0005


@dataclass
class PrefillOutcome:
    first_token_id: int
    logprob: float | None
    top: list
    cached_tokens: int
    prefill_address: str
    bytes_transferred: int


@dataclass
class DisaggCounters:
    local_prefills: int = 0
    remote_prefills: int = 0
    remote_failures: int = 0
    bootstrap_failures: int = 0
    retries: int = 0
    last_transfer_ms: float = 0.0
    last_bootstrap_ms: float = 0.0
    last_alloc_ms: float = 0.0
    last_transfer_mb: float = 0.0


class DecodeWorker:
    def __init__(self, config: DecodeConfig, loop: EngineLoop, worker_id: str,
                 receiver: KvReceiver | None = None, selector: PrefillSelector | None = None) -> None:
        self.config = config
        self.loop = loop
        self.engine = loop.engine
        self.worker_id = worker_id
        self.receiver = receiver
        self.selector = selector
        self.counters = DisaggCounters()
        self.inflight_rooms = 0
        self._reported = (0, 0)
        self.events = KvEventLog(worker_id, self.engine.kv_snapshot)
        self.engine.subscribe_kv_events(self.events.on_events)

    @property
    def disaggregated(self) -> bool:
        return self.config.disaggregation_mode == "decode"

    # ---- Generate ----------------------------------------------------------------------
    def generate(self, request: decode_pb2.GenerateRequest, is_active: Callable[[], bool],
                 on_cancel: Callable[[Callable[[], None]], None]) -> Iterator[common_pb2.TokenChunk]:
        """Yields TokenChunks; raises RequestFailed for a status-worthy failure."""
        rid = request.request_id or f"gen-{uuid.uuid4().hex}"
        ids = list(request.input_ids)
        try:
            sp = sampling_from_proto(request.sampling)
        except ValueError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        want_lp = sp.logprobs
        override = request.prefill_override
        if override not in ("", "local", "remote"):
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prefill_override={override!r}: allowed '', 'local', 'remote'")
        local = (not self.disaggregated or override == "local"
                 or (override != "remote" and len(ids) < self.config.max_local_prefill_length))
        if override == "remote" and not self.disaggregated:
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                "prefill_override='remote' but this worker is not in decode mode")
        if local:
            stream = self._submit_local(rid, ids, sp)
        else:
            stream = self._remote(rid, ids, sp, is_active)
        on_cancel(lambda: stream.cancel())
        for out in stream:
            if not is_active():
                stream.cancel()
                return
            yield chunk_from_output(out, rid, want_lp)

    def _submit_local(self, rid: str, ids: list[int], sp: SamplingParams) -> RequestStream:
        try:
            stream = self.loop.submit(ids, sp, rid)
        except ValueError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        self.counters.local_prefills += 1
        return stream

    # ---- remote prefill -------------------------------------------------------------------
    def _remote(self, rid: str, ids: list[int], sp: SamplingParams, is_active) -> RequestStream:
        # Validate here so a bad request never reaches a prefill worker.
        try:
            self.engine.validate_request(ids, sp)
        except ValueError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        tried: set[str] = set()
        last: RemotePrefillError | None = None
        for attempt in range(self.config.prefill_retries + 1):
            try:
                peer = self.selector.pick(ids, exclude=tried)
            except RemotePrefillError as exc:  # none registered (--prefill-discovery etcd)
                last = exc
                break
            tried.add(peer.address)
            if attempt:
                self.counters.retries += 1
                log.warning("request %s: retrying prefill on %s after: %s", rid, peer.address, last)
            try:
                outcome = self._prefill_on(peer, rid, ids, sp, is_active)
            except RemotePrefillError as exc:
                self.counters.remote_failures += 1
                peer.failures += 1
                last = exc
                if not exc.retryable:
                    break
                continue
            peer.failures = 0
            self.counters.remote_prefills += 1
            try:
                return self.loop.activate_external(rid, outcome.first_token_id, outcome.logprob,
                                                   outcome.cached_tokens)
            except ValueError as exc:
                self.loop.abort(rid)
                raise RequestFailed(grpc.StatusCode.INTERNAL, f"activating {rid} failed: {exc}") from None
        assert last is not None
        raise RequestFailed(last.status, f"remote prefill failed after {len(tried)} worker(s): {last.message}")

    def _prefill_on(self, peer: PrefillPeer, rid: str, ids: list[int], sp: SamplingParams,
                    is_active) -> PrefillOutcome:
        """One attempt. On any failure every page and the room are released before raising."""
        cfg = self.config
        agent = peer.ensure_registered(self.receiver.registration(), self.worker_id)
        start = prefill_pb2.PrefillStart(request_id=rid, decode_id=self.worker_id, input_ids=ids,
                                         sampling=_sampling_to_proto(sp))
        t0 = time.monotonic()
        room = None
        allocated = False
        call = None
        peer.inflight += 1
        self.inflight_rooms += 1
        try:
            # Pre-allocate (waiting while the pool is full), then send the request and the
            # allocation together (room 0 = "this stream's room"): one round trip, not two.
            alloc = self._allocate(rid, ids, sp, t0, is_active)
            allocated = True
            t_alloc = time.monotonic()
            call = PrefillCall(peer.stub, start, timeout=cfg.disaggregation_bootstrap_timeout
                               + cfg.disaggregation_transfer_timeout)
            call.send(prefill_pb2.PrefillClientMessage(allocation=prefill_pb2.PageAllocation(
                room=0, page_indices=alloc.page_indices, aux_slot=alloc.aux_slot)))
            # Bootstrapping: wait for the room.
            msg = self._recv(call, cfg.disaggregation_bootstrap_timeout, is_active, "bootstrap room")
            if msg.WhichOneof("msg") == "failed":
                raise _failed(msg.failed)
            if msg.WhichOneof("msg") != "room":
                raise RemotePrefillError("protocol", f"expected a room, got {msg.WhichOneof('msg')}", False,
                                         grpc.StatusCode.INTERNAL)
            if msg.room.num_pages != len(alloc.page_indices):
                raise RemotePrefillError("protocol", f"prefill wants {msg.room.num_pages} pages, decode allocated "
                                         f"{len(alloc.page_indices)} (page sizes differ?)", False,
                                         grpc.StatusCode.FAILED_PRECONDITION)
            room = msg.room.room
            t_boot = time.monotonic()
            self.receiver.expect(room, alloc.page_indices, alloc.aux_slot, peer=agent)
            done = self._await_transfer(call, room, is_active)
            row = self.receiver.aux_row(room)
            if row.room != room or row.first_token_id != done.first_token_id:
                raise RemotePrefillError("aux_mismatch", f"aux row {row.room}/{row.first_token_id} does not match "
                                         f"room {room}/{done.first_token_id}", True)
            t_done = time.monotonic()
            c = self.counters
            c.last_alloc_ms = (t_alloc - t0) * 1e3
            c.last_bootstrap_ms = (t_boot - t_alloc) * 1e3
            c.last_transfer_ms = (t_done - t_boot) * 1e3
            c.last_transfer_mb = done.bytes_transferred / 1e6
            call.close()
            lp = done.first_token_logprobs
            return PrefillOutcome(done.first_token_id, lp.logprob if sp.logprobs else None,
                                  [(t.token_id, t.logprob) for t in lp.top], done.cached_tokens, peer.address,
                                  done.bytes_transferred)
        except BaseException as exc:
            if call is not None:
                call.cancel()
            if allocated:
                self.loop.abort(rid)  # frees the pre-allocated pages and aux slot
            if isinstance(exc, RemotePrefillError) and exc.code == "prefill_failed_precondition":
                peer.forget_registration()  # e.g. the prefill restarted and lost our registration
            if isinstance(exc, RemotePrefillError) and room is None:
                self.counters.bootstrap_failures += 1
            raise
        finally:
            if room is not None:
                self.receiver.forget(room)
            peer.inflight -= 1
            self.inflight_rooms -= 1

    def _recv(self, call: PrefillCall, timeout: float, is_active, what: str) -> prefill_pb2.PrefillServerMessage:
        deadline = time.monotonic() + timeout
        while True:
            if not is_active():
                raise ClientGone()
            msg = call.recv(0.05)
            if msg is not None:
                return msg
            if time.monotonic() > deadline:
                raise RemotePrefillError("bootstrap_timeout", f"no {what} within {timeout:g} s", True,
                                         grpc.StatusCode.DEADLINE_EXCEEDED)

    def _allocate(self, rid, ids, sp, t0, is_active):
        """Pre-allocate decode pages; wait (bounded by the bootstrap timeout) while the pool is full."""
        deadline = t0 + self.config.disaggregation_bootstrap_timeout
        while True:
            try:
                return self.engine.allocate_external(ids, sp, rid=rid)
            except OutOfPages:
                if time.monotonic() > deadline:
                    raise RemotePrefillError("out_of_pages", "decode KV pool stayed full past the bootstrap timeout",
                                             False, grpc.StatusCode.RESOURCE_EXHAUSTED) from None
                if not is_active():
                    raise ClientGone() from None
                time.sleep(0.01)
            except ValueError as exc:
                raise RemotePrefillError("bad_request", str(exc), False, grpc.StatusCode.INVALID_ARGUMENT) from None

    def _await_transfer(self, call: PrefillCall, room: int, is_active) -> prefill_pb2.TransferDone:
        done = None
        rx = self.receiver
        while True:
            if not is_active():
                raise ClientGone()
            msg = call.recv(POLL_S if done is None else 0)
            if msg is not None:
                done = rx.on_stream_message(room, msg) or done
                if msg.WhichOneof("msg") == "failed":
                    raise _failed(msg.failed)
            state = rx.poll(room)
            if state is KVPoll.Failed:
                raise RemotePrefillError("transfer_failed", rx.failure_reason(room), True,
                                         grpc.StatusCode.DEADLINE_EXCEEDED if "timed out" in rx.failure_reason(room)
                                         else grpc.StatusCode.UNAVAILABLE)
            if done is not None and state is KVPoll.Success:
                return done
            if done is not None and msg is None:
                time.sleep(POLL_S)

    def warmup_remote(self, timeout: float) -> int:
        """Before SERVING: one tiny remote prefill through every prefill worker, so the first
        user request does not pay for RegisterDecode, the transport's connection set-up
        (UCX wire-up) or cold kernels. A worker that stays unreachable is only logged:
        requests will register with it lazily. Returns how many workers were warmed."""
        warmed = 0
        sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for peer in self.selector.peers:
            deadline = time.monotonic() + timeout
            while True:
                rid = f"warmup-{peer.address}-{uuid.uuid4().hex[:6]}"
                try:
                    out = self._prefill_on(peer, rid, [0, 1, 2, 3], sp, lambda: True)
                    for _ in self.loop.activate_external(rid, out.first_token_id, None, 0):
                        pass
                    warmed += 1
                    break
                except RemotePrefillError as exc:
                    if time.monotonic() > deadline:
                        log.warning("warmup: prefill %s not reachable (%s); it will be used lazily",
                                    peer.address, exc)
                        break
                    time.sleep(0.5)
        return warmed

    def disagg_stats(self, stats: EngineStats) -> dict:
        """Disaggregation fields of the next SchedulerStats (failure counts as deltas)."""
        c = self.counters
        failed, boot = c.remote_failures - self._reported[0], c.bootstrap_failures - self._reported[1]
        self._reported = (c.remote_failures, c.bootstrap_failures)
        return dict(num_decode_transfer_queue_reqs=self.inflight_rooms,
                    num_decode_prealloc_queue_reqs=stats.num_external_reqs,
                    kv_transfer_latency_ms=c.last_transfer_ms, kv_transfer_bootstrap_ms=c.last_bootstrap_ms,
                    kv_transfer_alloc_ms=c.last_alloc_ms, kv_transfer_total_mb=c.last_transfer_mb,
                    num_transfer_failed_reqs=failed - boot, num_bootstrap_failed_reqs=boot)

    # ---- load ----------------------------------------------------------------------------
    def get_load(self) -> common_pb2.WorkerLoad:
        s = self.engine.stats()
        return common_pb2.WorkerLoad(
            num_running_reqs=s.num_running_reqs, num_waiting_reqs=s.num_queue_reqs,
            free_pages=s.num_free_pages, total_pages=s.num_total_pages, evictable_pages=s.num_evictable_pages,
            num_inflight_transfers=self.inflight_rooms, token_usage=s.token_usage,
            cache_hit_rate=s.cache_hit_rate, num_prefilled_reqs=self.counters.local_prefills)


def _failed(f: prefill_pb2.TransferFailed) -> RemotePrefillError:
    status = grpc.StatusCode.INVALID_ARGUMENT if f.error.code in ("bad_page_index", "bad_allocation",
                                                                   "bad_request") else grpc.StatusCode.UNAVAILABLE
    return RemotePrefillError(f.error.code or "transfer_failed", f.error.message, f.error.retryable, status)


def _sampling_to_proto(sp: SamplingParams) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(
        temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k if sp.top_k > 0 else 0, min_p=sp.min_p,
        max_tokens=sp.max_tokens, stop=sp.stop, stop_token_ids=sp.stop_token_ids, ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs, top_logprobs=sp.top_logprobs, min_tokens=sp.min_tokens)
    if sp.seed is not None:
        p.seed = sp.seed
    return p
