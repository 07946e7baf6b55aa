"""Decode worker logic: Generate (local or remote prefill), GetLoad, KvEvents.

A request is prefilled here (aggregated mode, short prompts, ``prefill_override='local'``)
or on a prefill worker (:mod:`tandem.worker.remote_prefill`, which owns every room in
flight), or, moved off a draining worker, its KV is fetched from there
(:mod:`tandem.worker.kv_move`); either way its tokens then come from the engine loop.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from tandem.config import DecodeConfig
from tandem.engine import UnknownLoraError
from tandem.routing.sampling import sampling_from_proto
from tandem.sampling import SamplingParams
from tandem.transfer import pages_needed
from tandem.v1 import common_pb2, decode_pb2
from tandem.worker.base import WorkerBase
from tandem.worker.convert import chunk_from_output
from tandem.worker.engine_loop import EngineLoop, RequestStream, wait_until
from tandem.worker.errors import ClientGone, RequestFailed
from tandem.worker.faults import TokenFault
from tandem.worker.kv_move import KvMoves
from tandem.worker.remote_prefill import RemotePrefill, RemotePrefillFailed
from tandem.worker.warmup import (
    GREEDY,
    WARMUP_INPUT_IDS,
    WARMUP_SAMPLINGS,
    compiles_kernels,
    multi_page_tokens,
    warmup_prompt,
)

log = logging.getLogger(__name__)


class _Cancel:
    """What a cancelled client must stop: the remote prefill in flight, then the stream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._targets: list[Callable[[], object]] = []
        self.cancelled = False

    def add(self, cancel: Callable[[], object]) -> None:
        with self._lock:
            now = self.cancelled
            if not now:
                self._targets.append(cancel)
        if now:
            cancel()

    def __call__(self) -> None:
        with self._lock:
            self.cancelled = True
            targets, self._targets = self._targets, []
        for cancel in targets:
            cancel()


@dataclass(frozen=True)
class DrainReport:
    """What ``DecodeWorker.drain`` did: requests handed back to their router (``moved`` of them
    with their KV, which other workers fetched: ``pages_moved`` pages), and what was left when it
    returned (none of either when ok)."""

    handed_back: list[str]  # request ids
    requests_left: int
    pages_in_use: int
    moved: int = 0
    pages_moved: int = 0

    @property
    def ok(self) -> bool:
        return self.requests_left == 0 and self.pages_in_use == 0


class DecodeWorker(WorkerBase):
    def __init__(self, config: DecodeConfig, loop: EngineLoop, worker_id: str,
                 remote: RemotePrefill | None = None, moves: KvMoves | None = None) -> None:
        super().__init__(config, loop, worker_id)
        self.remote = remote
        self.moves = moves
        self.local_prefills = 0
        self.fault = TokenFault.from_env()
        # What stops each request in flight (a drain hands them back) -> [request id, tokens streamed,
        # its id in the engine (once it has one)].
        self._live: dict[_Cancel, list] = {}
        self._live_lock = threading.Lock()
        self.draining = False

    def _admit(self) -> None:
        """Bounded queue: beyond the running batch plus --max-queued-requests, refuse at once
        (RESOURCE_EXHAUSTED: the router tries another worker, then answers 429)."""
        bound = self.config.max_queued_requests
        if bound is None:
            return
        in_flight = self.loop.num_streams
        if in_flight >= self.config.max_running_requests + bound:
            raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"worker overloaded: {in_flight} requests in flight (--max-running-requests "
                                f"{self.config.max_running_requests} + --max-queued-requests {bound})")

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
        override = request.prefill_override
        if override not in ("", "local", "remote"):
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prefill_override={override!r}: allowed '', 'local', 'remote'")
        if override == "remote" and not self.disaggregated:
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                "prefill_override='remote' but this worker is not in decode mode")
        output_ids = list(request.output_ids)  # a migrated request: its tokens so far
        kv_source = request.kv_source if request.HasField("kv_source") else None
        if kv_source is not None and not output_ids:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "kv_source: a moved request comes with its output_ids")
        if output_ids and override == "remote":
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                "output_ids: a continued request is prefilled on its decode worker, not remotely")
        lora = request.lora_name or None
        local = (not self.disaggregated or override == "local" or sp.prompt_logprobs is not None or bool(output_ids)
                 or (override != "remote" and self._short_prompt(ids, lora)))
        try:
            self.loop.validate(ids, sp, output_ids, lora)  # a bad request never reaches a prefill worker
        except UnknownLoraError as exc:
            raise RequestFailed(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        except ValueError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        self._admit()
        cancel = _Cancel()
        with self._live_lock:  # registered before the draining check: a drain either sees it or refuses it
            if self.draining:
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is draining")
            self._live[cancel] = [rid, 0, None]
            self._apply_fault_pause()
        streamed = 0
        try:
            if kv_source is not None:
                stream = self._move_in(rid, ids, sp, output_ids, lora, kv_source, cancel, on_cancel)
                cancel.add(stream.cancel)
            elif local:
                stream = self._submit_local(rid, ids, sp, output_ids, lora)
                cancel.add(stream.cancel)
                on_cancel(cancel)
            else:
                stream = self._remote(rid, ids, sp, cancel, on_cancel, lora)
                cancel.add(stream.cancel)
            with self._live_lock:
                self._live[cancel][2] = stream.rid
            for out in stream:
                if not is_active():
                    stream.cancel()
                    return
                if out.finished and out.finish_reason == "moved":  # a drain holds its KV for another worker
                    yield common_pb2.TokenChunk(request_id=rid, move=common_pb2.KvMove(address=self.moves.address,
                                                                                        move_id=stream.rid))
                    return
                if out.finished and out.finish_reason == "abort" and not out.error:
                    if self.draining:
                        raise self._handed_back(rid, streamed)
                    # Nobody here asked for it (a cancelled client is handled above): never let a
                    # request end as a success with whatever it had streamed so far.
                    raise RequestFailed(grpc.StatusCode.ABORTED, f"request {rid} was aborted before it finished")
                yield chunk_from_output(out, rid, sp.logprobs)
                streamed += len(out.new_token_ids)
                self.fault.streamed(streamed)
                if self.fault.pause_after_tokens is not None:
                    with self._live_lock:
                        self._live[cancel][1] = streamed
                        self._apply_fault_pause()
        except ClientGone:
            if self.draining and is_active():  # the drain cancelled its remote prefill, not the client
                raise self._handed_back(rid, streamed) from None
            raise
        except ValueError as exc:  # the engine refused the request when it was added
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        finally:
            with self._live_lock:
                self._live.pop(cancel, None)
                self._apply_fault_pause()

    def _apply_fault_pause(self) -> None:
        """TANDEM_FAULT_PAUSE_AFTER_TOKENS (tests): the engine pauses while every request in flight
        has streamed that many tokens, until a drain (under _live_lock)."""
        if self.fault.pause_after_tokens is None or self.draining:
            return
        if self.fault.should_pause([n for _, n, _ in self._live.values()]):
            self.loop.pause()
        else:
            self.loop.resume()

    def _handed_back(self, rid: str, streamed: int) -> RequestFailed:
        # UNAVAILABLE: the router asks for health (NOT_SERVING now) and moves the request on.
        return RequestFailed(grpc.StatusCode.UNAVAILABLE, f"draining: request {rid} handed back after {streamed} "
                             "tokens")

    def _move_in(self, rid: str, ids: list[int], sp: SamplingParams, output_ids: list[int], lora: str | None,
                 source: common_pb2.KvMove, cancel: _Cancel,
                 on_cancel: Callable[[Callable[[], None]], None]) -> RequestStream:
        """A request moved off a draining worker: fetch its KV from there and decode on; when
        the fetch fails (given up after its --drain-timeout, the holder gone), recompute it here.
        The KV was computed under adapter ``lora``, which the request keeps here (its LoRA slot
        is taken with its pages)."""
        on_cancel(cancel)
        fetcher = self.moves.fetcher if self.moves is not None else None
        if fetcher is None:
            why = "this worker fetches no KV: " + ((self.moves.refused if self.moves is not None else None)
                                                   or "started without KV moves")
        else:
            fut = fetcher.move_in(rid, ids, output_ids, sp, source.address, source.move_id, lora)
            cancel.add(fut.cancel)
            try:
                stream = fut.result()
            except concurrent.futures.CancelledError:
                raise ClientGone() from None
            except (RemotePrefillFailed, RuntimeError) as exc:
                why = getattr(exc, "message", str(exc))
            else:
                self.moves.moved_in(pages_needed(len(ids) + len(output_ids) - 1, self.loop.info.page_size))
                return stream
        log.warning("request %s: its KV could not be fetched from %s (%s); recomputing it", rid, source.address, why)
        if self.moves is not None:
            self.moves.recomputed()
        # Its own id in the engine: the failed fetch's abort may still be on its way to the old one.
        return self._submit_local(f"{rid}#recompute", ids, sp, output_ids, lora)

    # ---- Drain ---------------------------------------------------------------------------
    def drain(self, timeout_s: float) -> DrainReport:
        """Refuse new requests and hand every request in flight back to its router, and wait
        until none is left and no KV page is held by a request (or ``timeout_s``). The caller
        turns health NOT_SERVING first.

        With --drain-timeout > 0, each decoding request is stopped and its pages kept: its stream
        ends with ``TokenChunk.move`` and the worker the router picks fetches its KV
        (``tandem.worker.kv_move``); those not fetched within --drain-timeout are freed (their
        targets recompute them). Every other request's stream ends with UNAVAILABLE: the router
        migrates it with its tokens so far, recomputed on the target."""
        with self._live_lock:
            self.draining = True
            live = dict(self._live)
        # No step runs for requests about to leave; a held request's last output ("moved", which
        # tells its router where the KV waits) comes with the next step: after it is in the table.
        self.loop.pause()
        held_table = self.moves.held if self.moves is not None else None
        if held_table is None and self.config.drain_timeout > 0 and self.moves is not None and self.moves.refused:
            log.info("drain: no KV moves (%s): every request is recomputed on its target", self.moves.refused)
        held: dict = {}
        try:
            if held_table is not None:
                held = self.loop.hold_for_move([e for _, _, e in live.values() if e is not None]).result(timeout_s)
                held_table.add(held)
            for cancel, (_, _, erid) in live.items():
                if erid not in held:
                    cancel()
        finally:
            self.loop.resume()  # their aborts, and the held requests' last outputs, apply before the next step
        if held:
            wait_until(lambda: held_table.num_waiting == 0, self.config.drain_timeout)
            for erid in held_table.expire():
                log.warning("drain: nobody fetched the KV of %s within --drain-timeout %g s; freeing it", erid,
                            self.config.drain_timeout)
                self.loop.abort(erid)

        def left() -> tuple[int, int]:
            """(requests in flight: streams still open here or in the engine, pages held by requests)"""
            with self._live_lock:
                n = max(len(self._live), self.loop.num_streams)
            s = self.loop.stats
            return n, s.num_total_pages - s.num_free_pages - s.num_evictable_pages

        wait_until(lambda: left() == (0, 0), timeout_s)
        n, pages = left()
        moved = held_table.num_taken if held_table is not None else 0
        log.info("drained: %d requests handed back (%d with their KV), %d left, %d pages in use", len(live), moved, n,
                 pages)
        return DrainReport([rid for rid, _, _ in live.values()], n, pages, moved,
                           held_table.num_pages_taken if held_table is not None else 0)

    def _short_prompt(self, ids: list[int], lora: str | None = None) -> bool:
        """Below --max-local-prefill-length: prefilled here. With decode-side prefix reuse the
        length that counts is the part this worker's prefix cache does not hold (under adapter ``lora``)."""
        limit = self.config.max_local_prefill_length
        if len(ids) < limit:
            return True
        if not limit or not self.config.disaggregation_decode_enable_radix_cache:
            return False
        return len(ids) - self.loop.cached_prefix_tokens(ids, lora) < limit

    def _submit_local(self, rid: str, ids: list[int], sp: SamplingParams, output_ids: list[int] = (),
                      lora: str | None = None) -> RequestStream:
        try:
            stream = self.loop.submit(ids, sp, rid, output_ids=output_ids, lora_name=lora)
        except ValueError as exc:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        self.local_prefills += 1
        return stream

    def _remote(self, rid: str, ids: list[int], sp: SamplingParams, cancel: _Cancel,
                on_cancel: Callable[[Callable[[], None]], None], lora: str | None = None) -> RequestStream:
        fut = self.remote.prefill(rid, ids, sp, lora_name=lora)
        cancel.add(fut.cancel)
        on_cancel(cancel)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise ClientGone() from None
        except RemotePrefillFailed as exc:
            raise RequestFailed(exc.status, exc.message) from None
        except RuntimeError as exc:  # the engine loop stopped (shutting down)
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    def warmup_remote(self, timeout: float) -> int:
        """Before SERVING: one tiny remote prefill through every prefill worker, then on CUDA a
        multi-page one and every sampler path (``_warm_transfers``), so the first user request does not pay
        for RegisterDecode, the transport's connection set-up (UCX wire-up), its first multi-page
        transfer or cold kernels. A worker that stays unreachable is only logged:
        requests will register with it lazily. Returns how many workers were warmed."""
        warmed = 0
        sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for peer in self.remote.peers:
            deadline = time.monotonic() + timeout
            while True:
                rid = f"warmup-{peer.address}-{uuid.uuid4().hex[:6]}"
                try:
                    for _ in self.remote.prefill(rid, WARMUP_INPUT_IDS, sp, peer=peer).result():
                        pass
                    warmed += 1
                    if compiles_kernels(self.loop.info):
                        self._warm_transfers(peer)
                    break
                except RemotePrefillFailed as exc:
                    if exc.status in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                        # A configuration the prefill refuses (its KV layout, e.g. another
                        # --kv-cache-dtype or --page-size): waiting will not change it.
                        log.error("warmup: prefill %s refuses this decode: %s", peer.address, exc.message)
                        break
                    if time.monotonic() > deadline:
                        log.warning("warmup: prefill %s not reachable (%s); it will be used lazily",
                                    peer.address, exc.message)
                        break
                    time.sleep(0.5)
        return warmed

    def _warm_transfers(self, peer) -> None:
        """Past the first contact: a prompt of several pages (the first multi-page transfer, larger
        prefill shapes) and every sampler path, through ``peer``; a failure is only logged."""
        requests = [(warmup_prompt(multi_page_tokens(self.loop.info)), GREEDY)]
        requests += [(WARMUP_INPUT_IDS, kw) for kw in WARMUP_SAMPLINGS[1:]]
        for ids, kw in requests:
            rid = f"warmup-{peer.address}-{uuid.uuid4().hex[:6]}"
            try:
                for _ in self.remote.prefill(rid, ids, SamplingParams(max_tokens=2, ignore_eos=True, **kw),
                                             peer=peer).result():
                    pass
            except RemotePrefillFailed as exc:
                log.warning("warmup: prefill %s: %d-token request failed: %s", peer.address, len(ids), exc.message)

    # ---- load ----------------------------------------------------------------------------
    def get_load(self) -> common_pb2.WorkerLoad:
        return self.load(self.remote.num_inflight if self.remote else 0, self.local_prefills)
