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
    the prompt (from the prefills' KvEvents streams), ties broken by fewest in flight.

    The set of peers is fixed (--prefill-addresses) or follows etcd (`PrefillDiscovery` calls
    `set_addresses`): a peer that leaves is picked no more at once; its channel closes once
    its in-flight prefills have ended."""

    def __init__(self, addresses: Sequence[str], policy: str, page_size: int, dynamic: bool = False) -> None:
        if not addresses and not dynamic:
            raise ValueError("no prefill workers configured")
        self.policy = policy
        self.index = KvIndex(block_size=page_size)
        self._index_lock = threading.Lock()
        self._peers_lock = threading.Lock()
        self._peers: dict[str, PrefillPeer] = {}
        self._retired: list[PrefillPeer] = []
        self._peer_stops: dict[str, threading.Event] = {}
        self._rr = itertools.count(random.randrange(1 << 16))
        self._stop = threading.Event()
        self._started = False
        self.last_overlap_blocks = 0
        self.set_addresses(addresses)

    @property
    def peers(self) -> list[PrefillPeer]:
        with self._peers_lock:
            return list(self._peers.values())

    def set_addresses(self, addresses: Sequence[str]) -> None:
        """Make the peer set exactly `addresses` (in this order for round robin)."""
        wanted = list(dict.fromkeys(addresses))
        with self._peers_lock:
            gone = [a for a in self._peers if a not in wanted]
            for a in gone:
                self._retired.append(self._peers.pop(a))
                stop = self._peer_stops.pop(a, None)
                if stop is not None:
                    stop.set()
            added = [a for a in wanted if a not in self._peers]
            peers = {a: self._peers.get(a) or PrefillPeer(a) for a in wanted}
            self._peers = peers
            self._close_idle_retired()
        for a in gone:
            with self._index_lock:
                self.index.remove_worker(a)
                self.index.reset_sequence(a)
        if added or gone:
            log.info("prefill workers: %s (added %s, removed %s)", wanted or "none", added or "-", gone or "-")
        if self._started:
            for a in added:
                self._follow(a)

    def _close_idle_retired(self) -> None:
        still = []
        for p in self._retired:
            if p.inflight <= 0:
                p.close()
            else:
                still.append(p)
        self._retired = still

    def start(self) -> None:
        self._started = True
        for peer in self.peers:
            self._follow(peer.address)

    def _follow(self, address: str) -> None:
        if self.policy != "kv_aware":
            return
        with self._peers_lock:
            peer = self._peers.get(address)
            if peer is None or address in self._peer_stops:
                return
            stop = self._peer_stops[address] = threading.Event()
        threading.Thread(target=self._follow_events, args=(peer, stop), name=f"kv-events-{address}",
                         daemon=True).start()

    def _follow_events(self, peer: PrefillPeer, stop: threading.Event) -> None:
        """Keep the index fed from one prefill; resubscribe with a snapshot after any gap."""
        while not (self._stop.is_set() or stop.is_set()):
            try:
                stream = peer.stub.KvEvents(common_pb2.KvEventsRequest(snapshot=True))
                for batch in stream:
                    with self._index_lock:
                        in_order = self.index.apply_batch(peer.address, batch)
                    if not in_order and not any(e.WhichOneof("event") == "cleared" for e in batch.events):
                        stream.cancel()
                        break
                    if self._stop.is_set() or stop.is_set():
                        stream.cancel()
                        return
            except (grpc.RpcError, ValueError):  # ValueError: the channel was closed under us
                pass
            with self._index_lock:
                self.index.remove_worker(peer.address)
                self.index.reset_sequence(peer.address)
            stop.wait(0.5)

    def pick(self, token_ids: Sequence[int], exclude: set[str] = frozenset()) -> PrefillPeer:
        peers = self.peers
        if not peers:
            raise RemotePrefillError("no_prefill_workers", "no prefill worker is registered", False)
        candidates = [p for p in peers if p.address not in exclude] or peers
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
        with self._peers_lock:
            for stop in self._peer_stops.values():
                stop.set()
            for p in [*self._peers.values(), *self._retired]:
                p.close()
            self._retired.clear()


class PrefillDiscovery:
    """Decode's view of the prefill workers registered in etcd (--prefill-discovery etcd): workers
    with role "prefill" serving this model. Feeds `PrefillSelector.set_addresses` from a watcher
    thread, so prefill workers can be added and removed (scaled) while decode serves."""

    def __init__(self, selector: PrefillSelector, endpoint: str, prefix: str, model: str) -> None:
        from tandem.routing.discovery import EtcdWatcher

        self.selector = selector
        self.model = model
        self.synced = threading.Event()
        self._watcher = EtcdWatcher(endpoint, prefix, self._on_change)
        self._loop = None
        self._task = None
        self._thread = threading.Thread(target=self._run, name="prefill-discovery", daemon=True)

    def _on_change(self, infos) -> None:
        prefills = sorted((i for i in infos.values() if i.role == "prefill" and i.model in ("", self.model)),
                          key=lambda i: i.worker_id)
        self.selector.set_addresses([i.address for i in prefills])
        self.synced.set()

    def _run(self) -> None:
        import asyncio

        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._watcher.run())
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            self._loop.close()

    def start(self, wait_s: float = 10.0) -> None:
        """Start watching; wait up to `wait_s` for the first view (etcd may not be up yet)."""
        self._thread.start()
        if not self.synced.wait(wait_s):
            log.warning("prefill discovery: no answer from etcd in %.0fs; prefill workers join once it answers",
                        wait_s)

    def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # the loop already ended
                pass
        self._thread.join(5)
