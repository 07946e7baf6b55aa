"""Decode's side of the Prefill handshake: peers, selection, and one request's stream.

A `PrefillCall` wraps the bidi `Prefill.Prefill` stream: outgoing messages go through a
queue, incoming ones are read by a small thread into an inbox, so the decode thread can
poll the stream, its room's transfer state and the client's liveness together, each
with its own timeout, and never block on one of them.
"""
from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
from collections.abc import Sequence

import grpc
from tandem.routing.kv_index import KvIndex
from tandem.server.runtime import GRPC_OPTIONS
from tandem.transfer import Registration
from tandem.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)


class RemotePrefillError(RuntimeError):
    """The remote prefill of one request failed; `retryable` says if another worker may help."""

    def __init__(self, code: str, message: str, retryable: bool, status: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.retryable, self.status = code, message, retryable, status


_EOF = object()


class PrefillCall:
    def __init__(self, stub: prefill_pb2_grpc.PrefillStub, start: prefill_pb2.PrefillStart, timeout: float) -> None:
        self._out: queue.Queue = queue.Queue()
        self._out.put(prefill_pb2.PrefillClientMessage(start=start))
        self.inbox: queue.Queue = queue.Queue()
        self.call = stub.Prefill(self._requests(), timeout=timeout)
        self._reader = threading.Thread(target=self._read, name="prefill-call-reader", daemon=True)
        self._reader.start()

    def _requests(self):
        while True:
            msg = self._out.get()
            if msg is None:
                return
            yield msg

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.inbox.put(msg)
            self.inbox.put(_EOF)
        except grpc.RpcError as exc:
            self.inbox.put(exc)

    def send(self, msg: prefill_pb2.PrefillClientMessage) -> None:
        self._out.put(msg)

    def recv(self, timeout: float) -> prefill_pb2.PrefillServerMessage | None:
        """Next message, None when nothing arrived within `timeout`; raises RemotePrefillError when the stream broke."""
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _EOF:
            raise RemotePrefillError("stream_closed", "prefill closed the stream before reporting done", True)
        if isinstance(item, grpc.RpcError):
            code = item.code()
            retryable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                                 grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)
            status = code if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                                      grpc.StatusCode.DEADLINE_EXCEEDED) else grpc.StatusCode.UNAVAILABLE
            raise RemotePrefillError(f"prefill_{code.name.lower()}", item.details() or code.name, retryable, status)
        return item

    def close(self) -> None:
        self._out.put(None)

    def cancel(self) -> None:
        self.call.cancel()
        self._out.put(None)


class PrefillPeer:
    """One prefill worker as decode sees it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self.stub = prefill_pb2_grpc.PrefillStub(self.channel)
        self.agent_name: str | None = None
        self.inflight = 0
        self.failures = 0
        self._lock = threading.Lock()

    def ensure_registered(self, registration: Registration, decode_id: str, timeout: float = 10.0,
                          force: bool = False) -> str:
        """RegisterDecode once (again after the prefill restarted); returns prefill's agent name."""
        with self._lock:
            if self.agent_name is not None and not force:
                return self.agent_name
            try:
                resp = self.stub.RegisterDecode(registration.to_request(decode_id), timeout=timeout)
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                    raise RemotePrefillError("register_rejected", f"{self.address}: {exc.details()}", False,
                                             grpc.StatusCode.FAILED_PRECONDITION) from None
                raise RemotePrefillError("prefill_unavailable", f"{self.address}: {exc.details() or code.name}",
                                         True) from None
            self.agent_name = resp.agent_name
            return self.agent_name

    def forget_registration(self) -> None:
        with self._lock:
            self.agent_name = None

    def close(self) -> None:
        self.channel.close()


class PrefillSelector:
    """round_robin, or kv_aware: the peer whose prefix cache holds the longest prefix of
    the prompt (from the prefills' KvEvents streams), ties broken by fewest in flight."""

    def __init__(self, addresses: Sequence[str], policy: str, page_size: int) -> None:
        if not addresses:
            raise ValueError("no prefill workers configured")
        self.peers = [PrefillPeer(a) for a in addresses]
        self.policy = policy
        self.index = KvIndex(block_size=page_size)
        self._index_lock = threading.Lock()
        self._rr = itertools.count(random.randrange(len(self.peers)))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_overlap_blocks = 0

    def start(self) -> None:
        if self.policy != "kv_aware":
            return
        for peer in self.peers:
            t = threading.Thread(target=self._follow_events, args=(peer,), name=f"kv-events-{peer.address}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _follow_events(self, peer: PrefillPeer) -> None:
        """Keep the index fed from one prefill; resubscribe with a snapshot after any gap."""
        while not self._stop.is_set():
            try:
                stream = peer.stub.KvEvents(common_pb2.KvEventsRequest(snapshot=True))
                for batch in stream:
                    with self._index_lock:
                        in_order = self.index.apply_batch(peer.address, batch)
                    if not in_order and not any(e.WhichOneof("event") == "cleared" for e in batch.events):
                        stream.cancel()
                        break
                    if self._stop.is_set():
                        stream.cancel()
                        return
            except grpc.RpcError:
                pass
            with self._index_lock:
                self.index.remove_worker(peer.address)
                self.index.reset_sequence(peer.address)
            self._stop.wait(0.5)

    def pick(self, token_ids: Sequence[int], exclude: set[str] = frozenset()) -> PrefillPeer:
        candidates = [p for p in self.peers if p.address not in exclude] or list(self.peers)
        if self.policy == "kv_aware":
            with self._index_lock:
                overlap = self.index.match(self.index.request_keys(token_ids))
            best = max(candidates, key=lambda p: (overlap.get(p.address, 0), -p.inflight, -p.failures))
            self.last_overlap_blocks = overlap.get(best.address, 0)
            return best
        n = len(candidates)
        return candidates[next(self._rr) % n]

    def stop(self) -> None:
        self._stop.set()
        for p in self.peers:
            p.close()
