"""Backend-neutral transfer interface: poll states, registrations, handles, the room table.

Roles (as in SGLang's disaggregation):

* the **receiver** lives on decode: it owns the destination pages, publishes a
  :class:`Registration` once per prefill worker, is told per request which pages and aux
  slot a room will fill (:meth:`KvReceiver.expect`), is handed the sender's messages
  (:meth:`KvReceiver.handle`) and is polled, all rooms at once (:meth:`KvReceiver.poll_all`),
  until each room reaches ``Success`` or ``Failed``;
* the **sender** lives on prefill: it learns each decode worker once
  (:meth:`KvSender.add_peer`), then per finished chunk writes its own pages into the
  decode pages of a room (:meth:`KvSender.send_kv`), then the aux row
  (:meth:`KvSender.send_aux`). Every call is non-blocking and returns a handle that
  :meth:`KvSender.check` polls; once every handle of a room is done, :meth:`KvSender.done`
  gives the :class:`TransferDone` that completes the room on the receiver.

A *chunk* is a set of pages for **all** layers; a room's chunks are numbered 0, 1, ...
and the last one carries ``is_last``. A room succeeds when every chunk up to the last,
the aux row and the sender's ``TransferDone`` have arrived. Adding a backend:
``README.md`` in this folder.
"""

from __future__ import annotations

import enum
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .aux import AuxRow, pack_aux_row, unpack_aux_row
from .layout import (
    HeadSlice,
    KvBuffers,
    PoolLayout,
    build_layout,
    check_addresses,
    check_allocation,
    check_compatible,
    head_slice,
    validate_pages,
)
from .messages import AuxData, FailureReason, KvPages, TransferDone, TransferFailure, TransferMessage


class KVPoll(enum.IntEnum):
    """Room state on decode, numbered exactly as SGLang's ``KVPoll``."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class XferState(enum.Enum):
    """State of a sender-side transfer handle."""

    DONE = "DONE"
    IN_PROGRESS = "PROC"
    ERROR = "ERR"


@dataclass(frozen=True)
class XferStatus:
    """Result of :meth:`KvSender.check`; ``reason`` is set for ``ERROR``."""

    state: XferState
    reason: str = ""

    @property
    def done(self) -> bool:
        return self.state is XferState.DONE

    @property
    def failed(self) -> bool:
        return self.state is XferState.ERROR


class TransferError(RuntimeError):
    """A transfer could not be started (bad peer, backend failure)."""


@dataclass
class Registration:
    """What decode tells each prefill worker once: its backend, agent and pool layout.

    ``ranks``: a decode worker of several TP ranks registers every rank's receiver, rank 0 first
    (this registration is rank 0's); empty for a one-rank worker."""

    backend: str
    agent_name: str
    agent_metadata: bytes
    layout: PoolLayout
    ranks: tuple[Registration, ...] = ()


class HandleKind(enum.Enum):
    KV = "kv"
    AUX = "aux"


@dataclass
class TransferHandle:
    """One non-blocking send.

    ``messages``: what the worker must carry to the receiver on the control stream, in
    order (in-band backends). ``backend_state``: the backend's own typed record of the send.
    """

    room: int
    peer: str
    kind: HandleKind
    nbytes: int = 0
    chunk_index: int = -1
    is_last: bool = False
    messages: list[TransferMessage] = field(default_factory=list)
    backend_state: object = None
    started: float = field(default_factory=time.perf_counter)


def new_room_id() -> int:
    """A random non-zero 63-bit room id (as SGLang's bootstrap_room), so that rooms chosen by
    different decode workers never collide on one prefill worker."""
    return secrets.randbits(63) or 1


# ---------------------------------------------------------------------------------------
# Receiver: the room table, shared by every backend.
# ---------------------------------------------------------------------------------------


@dataclass
class Room:
    room: int
    state: KVPoll
    pages: np.ndarray | None = None
    aux_slot: int = -1
    peer: str | tuple[str, ...] | None = None
    chunks: set[int] = field(default_factory=set)
    num_chunks: int | None = None  # known once the is_last chunk arrived
    aux_done: bool = False
    done: TransferDone | None = None
    failure: TransferFailure | None = None
    since: float = field(default_factory=time.monotonic)
    bytes_received: int = 0
    # Pages written per layer (in-band backends): sorted pages, their position in the
    # allocation, and a [layers, pages, kv heads] coverage array (senders of another TP size
    # write head slices).
    sorted_pages: np.ndarray | None = None
    order: np.ndarray | None = None
    coverage: np.ndarray | None = None


class KvReceiver:
    """Decode side: owns destination pages, tracks rooms until Success/Failed.

    ``bootstrap_timeout_s``: how long a room may stay Bootstrapping (until its pages are
    allocated); ``waiting_timeout_s``: how long it may stay WaitingForInput (allocated, nothing
    of the sender arrived yet: prefill queued, stalled or gone); ``transfer_timeout_s``: how long
    Transferring may last from the first data to the end. ``None`` disables. SGLang's
    DISAGGREGATION_BOOTSTRAP_TIMEOUT / WAITING_TIMEOUT and the transfer timeout.
    Timeouts are applied when rooms are polled. Thread-safe: one lock guards the room table.
    """

    backend = ""
    _MAX_FORGOTTEN = 65536

    def __init__(
        self,
        buffers: KvBuffers,
        name: str,
        model_fingerprint: str = "",
        bootstrap_timeout_s: float | None = 300.0,
        transfer_timeout_s: float | None = 300.0,
        waiting_timeout_s: float | None = 300.0,
    ):
        self.buffers = buffers
        self.name = name
        self.layout = build_layout(buffers, model_fingerprint)
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.waiting_timeout_s = waiting_timeout_s
        self._rooms: dict[int, Room] = {}
        self._forgotten: OrderedDict[int, None] = OrderedDict()  # recently forgotten rooms, oldest first
        self._lock = threading.RLock()

    # -- public API ---------------------------------------------------------------------
    def registration(self) -> Registration:
        """What decode sends each prefill worker once."""
        return Registration(self.backend, self.name, self.agent_metadata(), self.layout)

    def bootstrap(self, room: int) -> None:
        """Start tracking ``room`` before its pages are known (state Bootstrapping)."""
        with self._lock:
            if room in self._rooms:
                raise ValueError(f"room {room} is already tracked")
            self._rooms[room] = Room(room, KVPoll.Bootstrapping)

    def expect(
        self,
        room: int,
        page_indices: Sequence[int],
        aux_slot: int,
        peer: str | tuple[str, ...] | None = None,
    ) -> None:
        """Declare that ``room`` will fill ``page_indices`` and ``aux_slot`` (state
        WaitingForInput). ``peer``: the sender agent allowed to write it (nixl), or every one of
        several sender agents (a prefill worker of another TP size: each of its ranks writes heads).

        Never writes the pages or the aux slot: the sender's writes, and their
        notifications, may have landed before this call. Clearing the slot is its owner's
        job, before handing it out (the engine zeroes a slot when it allocates and when it
        frees one); the row's room id tells a stale row from this room's."""
        pages = validate_pages(page_indices, self.buffers.num_pages, "decode page")
        if not 0 <= aux_slot < self.buffers.num_aux_slots:
            raise ValueError(
                f"aux slot {aux_slot} out of range for {self.buffers.num_aux_slots} aux slots"
            )
        if len(np.unique(pages)) != len(pages):
            raise ValueError(f"room {room}: decode page indices contain duplicates")
        with self._lock:
            r = self._rooms.get(room)
            self._forgotten.pop(room, None)
            if r is None:
                r = self._rooms[room] = Room(room, KVPoll.WaitingForInput)
            elif r.state is not KVPoll.Bootstrapping:
                raise ValueError(f"room {room} is already expected (state {r.state.name})")
            r.state = KVPoll.WaitingForInput
            r.since = time.monotonic()
            r.pages, r.aux_slot, r.peer = pages, aux_slot, peer
            r.order = np.argsort(pages, kind="stable")
            r.sorted_pages = pages[r.order]
            r.coverage = np.zeros((self.buffers.num_layers, len(pages), self.buffers.kv_heads), dtype=bool)
            self._on_expect(r)

    def handle(self, msg: TransferMessage) -> KVPoll:
        """Apply one message of the sender (in-band pages or aux row, done, failure); returns
        the room's new state. Raises ValueError for a message that can never be right (unknown
        room, a page not allocated to the room, a wrong byte count): nothing is written then,
        and a known room is marked Failed with the same message."""
        with self._lock:
            r = self._rooms.get(msg.room)
            if isinstance(msg, TransferFailure):
                if r is not None:
                    self._fail(r, msg)
                return r.state if r is not None else KVPoll.Failed
            if r is None:
                if self._was_forgotten(msg.room):
                    return KVPoll.Failed  # a late message of a room given up on
                raise ValueError(f"{type(msg).__name__} for unknown room {msg.room}")
            if r.state is KVPoll.Bootstrapping:
                self._reject(r, f"room {r.room}: {type(msg).__name__} before the page allocation")
            if r.state not in (KVPoll.WaitingForInput, KVPoll.Transferring):
                return r.state  # late message of a finished room: ignore
            if isinstance(msg, KvPages):
                self._on_pages(r, msg)
            elif isinstance(msg, AuxData):
                self._write_aux(r, msg.row)
                self._aux_arrived(r)
            elif isinstance(msg, TransferDone):
                r.done = msg
                r.bytes_received = max(r.bytes_received, msg.bytes_transferred)
                self._maybe_done(r)
            else:
                raise TypeError(f"not a transfer message: {msg!r}")
            return r.state

    def poll(self, room: int) -> KVPoll:
        """Current state of ``room`` (drains backend progress, applies timeouts)."""
        with self._lock:
            self._progress()
            r = self._get(room)
            self._check_timeout(r, time.monotonic())
            return r.state

    def poll_all(self) -> dict[int, KVPoll]:
        """One pass over every tracked room: drains backend progress once, applies timeouts,
        returns each room's state (what decode's transfer loop calls once per iteration)."""
        with self._lock:
            self._progress()
            now = time.monotonic()
            for r in self._rooms.values():
                self._check_timeout(r, now)
            return {k: r.state for k, r in self._rooms.items()}

    def failure(self, room: int) -> TransferFailure | None:
        """Why ``room`` failed (None unless it is Failed)."""
        with self._lock:
            return self._get(room).failure

    def on_progress(self, fn) -> None:
        """Call ``fn()`` (from any thread) whenever out-of-band progress arrived, so the owner's
        poll loop can sleep until then. Backends whose messages all come through
        :meth:`handle` have nothing to report."""

    def bytes_received(self, room: int) -> int:
        """KV bytes of ``room`` (counted in band, or as the sender's TransferDone reports)."""
        with self._lock:
            return self._get(room).bytes_received

    def fail(self, room: int, reason: FailureReason, message: str) -> None:
        """Fail ``room`` from outside (e.g. the control stream broke)."""
        with self._lock:
            self._fail(self._get(room), TransferFailure(room, reason, message))

    def forget(self, room: int) -> None:
        """Stop tracking ``room``; later messages for it are ignored. The caller frees the
        pages. Unknown rooms are ignored (idempotent)."""
        with self._lock:
            self._rooms.pop(room, None)
            self._forgotten[room] = None
            while len(self._forgotten) > self._MAX_FORGOTTEN:
                self._forgotten.popitem(last=False)
            self._on_forget(room)

    def aux_row(self, room: int) -> AuxRow:
        """The aux row of a room that reached Success."""
        with self._lock:
            r = self._get(room)
            if r.state is not KVPoll.Success:
                raise ValueError(f"room {room} is {r.state.name}, not Success")
            return unpack_aux_row(self.buffers.aux[r.aux_slot])

    def wait(self, room: int, timeout_s: float, sleep_s: float = 0.0002) -> KVPoll:
        """Poll until ``room`` is Success/Failed or ``timeout_s`` passes (then returns the
        current state; the room is not failed by this helper). For tests and benchmarks."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.poll(room)
            if s in (KVPoll.Success, KVPoll.Failed) or time.monotonic() >= deadline:
                return s
            time.sleep(sleep_s)

    @property
    def rooms(self) -> dict[int, KVPoll]:
        """State of every tracked room (for metrics and leak checks)."""
        with self._lock:
            return {k: r.state for k, r in self._rooms.items()}

    def close(self) -> None:
        with self._lock:
            self._rooms.clear()

    # -- for backends ---------------------------------------------------------------------
    def agent_metadata(self) -> bytes:
        """What a sender needs to reach this receiver (e.g. NIXL agent metadata)."""
        return b""

    def _progress(self) -> None:
        """Drain the backend's out-of-band events (e.g. NIXL notifications) into
        :meth:`_chunk_arrived` / :meth:`_aux_arrived` / :meth:`_fail`. Called under the lock."""

    def _on_pages(self, r: Room, msg: KvPages) -> None:
        """A :class:`KvPages` message for room ``r``; in-band backends override."""
        self._reject(r, f"room {r.room}: a KvPages message, but this receiver's backend is "
                        f"{self.backend!r}")

    def _on_expect(self, r: Room) -> None:
        pass

    def _on_forget(self, room: int) -> None:
        pass

    def _was_forgotten(self, room: int) -> bool:
        """True when ``room`` was forgotten recently (its late messages are dropped)."""
        return room in self._forgotten

    def _get(self, room: int) -> Room:
        try:
            return self._rooms[room]
        except KeyError:
            raise KeyError(f"unknown room {room}") from None

    def _covered_pages(self, r: Room, msg: KvPages) -> np.ndarray:
        """Check that ``msg``'s pages (and layer) belong to room ``r``; returns their positions
        in the allocation. The one page check of the receiving side."""
        if msg.layer is not None and not 0 <= msg.layer < self.buffers.num_layers:
            self._reject(r, f"room {r.room}: layer {msg.layer} out of range for "
                            f"{self.buffers.num_layers} layers")
        dst = np.asarray(msg.dst_pages, dtype=np.int64)
        if not len(dst):
            return np.zeros(0, dtype=np.int64)
        at = np.searchsorted(r.sorted_pages, dst).clip(0, max(len(r.sorted_pages) - 1, 0))
        ok = r.sorted_pages[at] == dst if len(r.sorted_pages) else np.zeros(len(dst), bool)
        if not ok.all():
            bad = int(dst[np.nonzero(~ok)[0][0]])
            self._reject(r, f"room {r.room}: decode page {bad} is not allocated to this room "
                            f"(pool has {self.buffers.num_pages} pages)")
        return at

    def _mark_covered(self, r: Room, msg: KvPages, at: np.ndarray, heads: slice = slice(None)) -> None:
        layers = slice(None) if msg.layer is None else msg.layer
        r.coverage[layers, r.order[at], heads] = True
        self._chunk_arrived(r, msg.chunk_index, msg.is_last, len(msg.k) + len(msg.v))

    def _reject(self, r: Room, message: str):
        self._fail(r, TransferFailure(r.room, FailureReason.PROTOCOL, message))
        raise ValueError(message)

    def _fail(self, r: Room, failure: TransferFailure) -> None:
        if r.state not in (KVPoll.Success, KVPoll.Failed):
            r.state, r.failure = KVPoll.Failed, failure

    def _check_timeout(self, r: Room, now: float) -> None:
        if r.state is KVPoll.Bootstrapping and self.bootstrap_timeout_s is not None:
            if now - r.since > self.bootstrap_timeout_s:
                self._fail(r, TransferFailure(r.room, FailureReason.TIMEOUT,
                                              f"bootstrap timed out after {self.bootstrap_timeout_s:g} s"))
        elif r.state is KVPoll.WaitingForInput and self.waiting_timeout_s is not None:
            if now - r.since > self.waiting_timeout_s:
                self._fail(r, TransferFailure(r.room, FailureReason.TIMEOUT, (
                    f"waiting for KV timed out after {self.waiting_timeout_s:g} s: the pages were allocated "
                    "but nothing of the sender arrived")))
        elif r.state is KVPoll.Transferring:
            if self.transfer_timeout_s is not None and now - r.since > self.transfer_timeout_s:
                self._fail(r, TransferFailure(r.room, FailureReason.TIMEOUT, (
                    f"KV transfer timed out after {self.transfer_timeout_s:g} s "
                    f"({len(r.chunks)} chunks, aux {'received' if r.aux_done else 'missing'})")))

    def _chunk_arrived(self, r: Room, chunk: int, is_last: bool, nbytes: int = 0) -> None:
        if r.state not in (KVPoll.WaitingForInput, KVPoll.Transferring):
            return
        r.chunks.add(chunk)
        r.bytes_received += nbytes
        if is_last:
            r.num_chunks = chunk + 1
        self._transferring(r)
        self._maybe_done(r)

    def _aux_arrived(self, r: Room) -> None:
        if r.state not in (KVPoll.WaitingForInput, KVPoll.Transferring):
            return
        r.aux_done = True
        self._transferring(r)
        self._maybe_done(r)

    @staticmethod
    def _transferring(r: Room) -> None:
        """First data of the room: the waiting timeout ends, the transfer timeout starts."""
        if r.state is KVPoll.WaitingForInput:
            r.state, r.since = KVPoll.Transferring, time.monotonic()

    def _write_aux(self, r: Room, row: bytes) -> None:
        if len(row) > self.buffers.aux_slot_bytes:
            self._reject(r, f"room {r.room}: aux row of {len(row)} bytes for a "
                            f"{self.buffers.aux_slot_bytes}-byte slot")
        slot = self.buffers.aux[r.aux_slot]
        slot.zero_()
        slot[: len(row)] = torch.frombuffer(bytearray(row), dtype=torch.uint8).to(slot.device)

    def _maybe_done(self, r: Room) -> None:
        if r.num_chunks is not None and (len(r.chunks) > r.num_chunks or max(r.chunks) >= r.num_chunks):
            self._fail(r, TransferFailure(r.room, FailureReason.PROTOCOL, (
                f"room {r.room}: got chunks {sorted(r.chunks)} but the last chunk was {r.num_chunks - 1}")))
            return
        if r.done is not None and r.num_chunks is not None and r.done.num_chunks != r.num_chunks:
            self._fail(r, TransferFailure(r.room, FailureReason.PROTOCOL, (
                f"room {r.room}: the sender reports {r.done.num_chunks} chunks, the last chunk was "
                f"{r.num_chunks - 1}")))
            return
        if not (r.aux_done and r.done is not None and r.num_chunks is not None):
            return
        if len(r.chunks) == r.num_chunks and self._room_complete(r):
            r.state = KVPoll.Success

    def _room_complete(self, r: Room) -> bool:
        """Backend check that every page of the room arrived (in-band backends: coverage)."""
        return True


# ---------------------------------------------------------------------------------------
# Sender
# ---------------------------------------------------------------------------------------


class KvSender:
    """Prefill side: writes its own pages into decode pages of a room."""

    backend = ""

    def __init__(self, buffers: KvBuffers, name: str, model_fingerprint: str = ""):
        self.buffers = buffers
        self.name = name
        self.layout = build_layout(buffers, model_fingerprint)
        self._peers: dict[str, PoolLayout] = {}
        self._peers_lock = threading.Lock()

    def add_peer(self, reg: Registration) -> str:
        """Learn a decode worker (once). Raises LayoutMismatchError / ValueError when its
        layout cannot receive our pages. Returns the peer name to pass to ``send_*``."""
        if reg.backend and reg.backend != self.backend:
            raise ValueError(
                f"decode {reg.agent_name!r} uses transfer backend {reg.backend!r}, this "
                f"prefill uses {self.backend!r}"
            )
        if len(reg.ranks) > 1:
            raise ValueError(f"decode {reg.agent_name!r} has {len(reg.ranks)} TP ranks, each with its own pool; "
                             "this sender writes one pool (a worker drives one sender per rank of either side)")
        check_compatible(self.layout, reg.layout)
        check_addresses(reg.layout)
        self._add_peer(reg)
        with self._peers_lock:
            self._peers[reg.agent_name] = reg.layout
        return reg.agent_name

    def ranks(self) -> list[tuple[str, PoolLayout]]:
        """``(agent name, layout)`` of the sender of every rank of this worker, rank 0 first (one
        here; a worker of several TP ranks answers each rank's, so decode knows who writes what)."""
        return [(self.name, self.layout)]

    def remove_peer(self, peer: str) -> None:
        with self._peers_lock:
            known = self._peers.pop(peer, None) is not None
        if known:
            self._remove_peer(peer)

    @property
    def peers(self) -> list[str]:
        with self._peers_lock:
            return list(self._peers)

    def check_allocation(self, peer: str, dst_pages: Sequence[int], aux_slot: int, num_pages: int) -> None:
        """Raise ValueError unless ``peer`` can receive a room of ``num_pages`` pages into
        ``dst_pages`` and ``aux_slot`` (checked before anything is computed or written)."""
        check_allocation(self.peer_layout(peer), dst_pages, aux_slot, num_pages)

    def head_slice(self, peer: str) -> HeadSlice | None:
        """The KV heads this rank writes into ``peer`` (None: none, another rank writes them)."""
        return head_slice(self.layout, self.peer_layout(peer))

    def peer_layout(self, peer: str) -> PoolLayout:
        with self._peers_lock:
            try:
                return self._peers[peer]
            except KeyError:
                raise ValueError(f"unknown decode peer {peer!r}; call add_peer first") from None

    def send_kv(
        self,
        room: int,
        peer: str,
        src_pages: Sequence[int],
        dst_pages: Sequence[int],
        chunk_index: int = 0,
        is_last: bool = True,
    ) -> TransferHandle:
        """Write local pages ``src_pages`` of every layer into ``dst_pages`` of ``peer``
        (``src_pages[i] -> dst_pages[i]``) as chunk ``chunk_index`` of ``room``."""
        remote = self.peer_layout(peer)
        src = validate_pages(src_pages, self.buffers.num_pages, "prefill page")
        dst = validate_pages(dst_pages, remote.num_pages, "decode page")
        if src.size != dst.size:
            raise ValueError(f"{src.size} prefill pages but {dst.size} decode pages")
        if chunk_index < 0:
            raise ValueError(f"chunk_index must be >= 0, got {chunk_index}")
        if head_slice(self.layout, remote) is None:
            raise ValueError(f"this rank (TP {self.layout.tp_size} rank {self.layout.tp_rank}, KV heads "
                             f"[{self.layout.kv_head_start}, {self.layout.kv_head_start + self.layout.num_kv_heads})) "
                             f"writes no KV head into {peer!r} (TP {remote.tp_size} rank {remote.tp_rank}, heads "
                             f"[{remote.kv_head_start}, {remote.kv_head_start + remote.num_kv_heads}))")
        return self._send_kv(room, peer, remote, src, dst, chunk_index, is_last)

    def send_aux(self, room: int, peer: str, aux_slot: int, row: AuxRow) -> TransferHandle:
        """Write the metadata row into decode's ``aux_slot`` (after the last KV chunk)."""
        remote = self.peer_layout(peer)
        if not 0 <= aux_slot < remote.num_aux_slots:
            raise ValueError(
                f"aux slot {aux_slot} out of range for {remote.num_aux_slots} aux slots"
            )
        if row.room != room:
            raise ValueError(f"aux row is for room {row.room}, not {room}")
        return self._send_aux(room, peer, remote, aux_slot, pack_aux_row(row, remote.aux_slot_bytes))

    def check(self, handles: TransferHandle | Iterable[TransferHandle]) -> XferStatus:
        """Combined state: ERROR if any failed, IN_PROGRESS if any is running, else DONE."""
        if isinstance(handles, TransferHandle):
            handles = [handles]
        busy = False
        for h in handles:
            s = self._check(h)
            if s.failed:
                return s
            busy |= s.state is XferState.IN_PROGRESS
        return XferStatus(XferState.IN_PROGRESS if busy else XferState.DONE)

    def in_flight(self, handles: Iterable[TransferHandle]) -> bool:
        """True while any of ``handles`` may still write (used before reporting a failure)."""
        return any(self._check(h).state is XferState.IN_PROGRESS for h in handles)

    def done(self, room: int, handles: Sequence[TransferHandle]) -> TransferDone:
        """The message completing ``room`` on the receiver, once :meth:`check` is DONE."""
        last = [h.chunk_index for h in handles if h.kind is HandleKind.KV and h.is_last]
        if len(last) != 1 or not any(h.kind is HandleKind.AUX for h in handles):
            raise ValueError(f"room {room}: done() needs the last KV chunk and the aux row among the handles")
        return TransferDone(room, last[0] + 1, sum(h.nbytes for h in handles))

    def wait(
        self,
        handles: TransferHandle | Iterable[TransferHandle],
        timeout_s: float,
        sleep_s: float = 0.0001,
    ) -> XferStatus:
        """Poll :meth:`check` until not IN_PROGRESS; ERROR with a reason on timeout. For
        tests and benchmarks (the prefill worker polls all its rooms in one loop)."""
        handles = [handles] if isinstance(handles, TransferHandle) else list(handles)
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.check(handles)
            if s.state is not XferState.IN_PROGRESS:
                return s
            if time.monotonic() >= deadline:
                return XferStatus(XferState.ERROR, f"transfer not done after {timeout_s:g} s")
            time.sleep(sleep_s)

    def release(self, handles: TransferHandle | Iterable[TransferHandle]) -> None:
        """Free backend resources of finished (or abandoned) handles."""
        for h in [handles] if isinstance(handles, TransferHandle) else handles:
            self._release(h)

    def notify_failed(self, room: int, peer: str, reason: str) -> None:
        """Tell decode's receiver out of band that ``room`` failed (best effort)."""

    def close(self) -> None:
        for p in self.peers:
            self.remove_peer(p)

    # -- for backends ---------------------------------------------------------------------
    def _add_peer(self, reg: Registration) -> None:
        pass

    def _remove_peer(self, peer: str) -> None:
        pass

    def _send_kv(self, room: int, peer: str, remote: PoolLayout, src: np.ndarray, dst: np.ndarray,
                 chunk_index: int, is_last: bool) -> TransferHandle:
        raise NotImplementedError

    def _send_aux(self, room: int, peer: str, remote: PoolLayout, aux_slot: int, row: bytes) -> TransferHandle:
        """Write ``row`` (``remote.aux_slot_bytes`` bytes) into ``aux_slot``. Backends without
        their own way may send it in band: :func:`inband_aux`."""
        raise NotImplementedError

    def _check(self, h: TransferHandle) -> XferStatus:
        raise NotImplementedError

    def _release(self, h: TransferHandle) -> None:
        pass


def inband_aux(room: int, peer: str, row: bytes) -> TransferHandle:
    """A done handle carrying the aux row as an :class:`AuxData` message."""
    return TransferHandle(room, peer, HandleKind.AUX, len(row), messages=[AuxData(room, row)],
                          backend_state=XferState.DONE)
