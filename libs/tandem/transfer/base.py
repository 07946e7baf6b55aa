"""Backend-neutral transfer interface: poll states, registrations, handles, room table.

Roles (as in SGLang's disaggregation):

* the **receiver** lives on decode: it owns the destination pages, publishes a
  :class:`Registration` once per prefill worker (``RegisterDecode``), is told per request
  which pages and aux slot a room will fill (:meth:`KvReceiver.expect`) and is polled
  until the room reaches ``Success`` or ``Failed``;
* the **sender** lives on prefill: it learns each decode worker once
  (:meth:`KvSender.add_peer`), then per finished chunk writes its own pages into the
  decode pages of a room (:meth:`KvSender.send_kv`) and finally the aux row
  (:meth:`KvSender.send_aux`). Every call is non-blocking and returns a handle that
  :meth:`KvSender.check` polls.

A *chunk* is a set of pages for **all** layers; a room's chunks are numbered 0, 1, ...
and the last one carries ``is_last``. The room is complete when every chunk up to the
last and the aux row have arrived.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from tandem.v1 import common_pb2, prefill_pb2

from .layout import (
    AuxRow,
    KvBuffers,
    build_layout,
    check_addresses,
    check_compatible,
    unpack_aux_row,
    validate_pages,
)


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
    """What decode sends prefill once (``RegisterDecodeRequest``)."""

    backend: str
    agent_name: str
    agent_metadata: bytes
    layout: common_pb2.KvLayout

    def to_request(self, decode_id: str) -> prefill_pb2.RegisterDecodeRequest:
        return prefill_pb2.RegisterDecodeRequest(
            decode_id=decode_id,
            transfer_backend=self.backend,
            agent_name=self.agent_name,
            agent_metadata=self.agent_metadata,
            layout=self.layout,
        )

    @classmethod
    def from_request(cls, req: prefill_pb2.RegisterDecodeRequest) -> Registration:
        return cls(req.transfer_backend, req.agent_name, bytes(req.agent_metadata), req.layout)


@dataclass
class TransferHandle:
    """One non-blocking send. Backends keep their private state in ``impl``.

    For the grpc backend ``messages`` holds the ``KvChunk`` messages the service must put
    on the Prefill stream; the handle is DONE as soon as they are packed.
    """

    room: int
    peer: str
    kind: str  # "kv" or "aux"
    nbytes: int = 0
    chunk_index: int = -1
    is_last: bool = False
    messages: list = field(default_factory=list)
    aux_row: AuxRow | None = None
    impl: object = None
    error: str = ""
    started: float = field(default_factory=time.perf_counter)


def new_room_id() -> int:
    """A random non-zero 63-bit room id (as SGLang's bootstrap_room), so that rooms of
    different prefill workers never collide on one decode worker."""
    return secrets.randbits(63) or 1


# ---------------------------------------------------------------------------------------
# Receiver room bookkeeping, shared by both backends.
# ---------------------------------------------------------------------------------------


@dataclass
class Room:
    room: int
    state: KVPoll
    pages: np.ndarray | None = None
    aux_slot: int = -1
    peer: str | None = None
    chunks: set[int] = field(default_factory=set)
    num_chunks: int | None = None  # known once the is_last chunk arrived (or given)
    aux_done: bool = False
    reason: str = ""
    since: float = field(default_factory=time.monotonic)
    bytes_received: int = 0


class KvReceiver:
    """Decode side: owns destination pages, tracks rooms until Success/Failed.

    ``bootstrap_timeout_s``: how long a room may stay Bootstrapping; ``transfer_timeout_s``:
    how long WaitingForInput/Transferring may last without finishing. ``None`` disables.
    Timeouts are applied in :meth:`poll`.
    """

    backend = ""

    def __init__(
        self,
        buffers: KvBuffers,
        name: str,
        model_fingerprint: str = "",
        bootstrap_timeout_s: float | None = 300.0,
        transfer_timeout_s: float | None = 300.0,
    ):
        self.buffers = buffers
        self.name = name
        self.layout = build_layout(buffers, model_fingerprint)
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self._rooms: dict[int, Room] = {}

    # -- public API ---------------------------------------------------------------------
    def registration(self) -> Registration:
        """What to send in ``RegisterDecode``."""
        raise NotImplementedError

    def bootstrap(self, room: int) -> None:
        """Start tracking ``room`` before its pages are known (state Bootstrapping)."""
        if room in self._rooms:
            raise ValueError(f"room {room} is already tracked")
        self._rooms[room] = Room(room, KVPoll.Bootstrapping)

    def expect(
        self,
        room: int,
        page_indices: Sequence[int],
        aux_slot: int,
        num_chunks: int | None = None,
        peer: str | None = None,
    ) -> None:
        """Declare that ``room`` will fill ``page_indices`` and ``aux_slot`` (state
        WaitingForInput). ``peer``: the prefill agent allowed to write it (nixl).

        Never writes the pages or the aux slot: decode hands the allocation to prefill
        before it learns the room (one round trip), so prefill's WRITEs, and their
        notifications, may all have landed before this call. Clearing the slot is its
        owner's job, before handing it out (the engine zeroes a slot when it allocates and
        when it frees one); the row's room id tells a stale row from this room's."""
        pages = validate_pages(page_indices, self.buffers.num_pages, "decode page")
        if not 0 <= aux_slot < self.buffers.num_aux_slots:
            raise ValueError(
                f"aux slot {aux_slot} out of range for {self.buffers.num_aux_slots} aux slots"
            )
        if len(np.unique(pages)) != len(pages):
            raise ValueError(f"room {room}: decode page indices contain duplicates")
        if num_chunks is not None and num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        r = self._rooms.get(room)
        if r is None:
            r = self._rooms[room] = Room(room, KVPoll.WaitingForInput)
        elif r.state is not KVPoll.Bootstrapping:
            raise ValueError(f"room {room} is already expected (state {r.state.name})")
        r.state = KVPoll.WaitingForInput
        r.since = time.monotonic()
        r.pages, r.aux_slot, r.peer = pages, aux_slot, peer
        if num_chunks is not None:
            r.num_chunks = num_chunks
        self._on_expect(r)

    def poll(self, room: int) -> KVPoll:
        """Current state of ``room`` (drains backend progress, applies timeouts)."""
        self._progress()
        r = self._get(room)
        self._check_timeout(r)
        return r.state

    def failure_reason(self, room: int) -> str:
        return self._get(room).reason

    def mark_failed(self, room: int, reason: str) -> None:
        """Fail ``room`` (e.g. the Prefill stream reported TransferFailed)."""
        r = self._get(room)
        if r.state is not KVPoll.Success:
            r.state, r.reason = KVPoll.Failed, reason

    def forget(self, room: int) -> None:
        """Stop tracking ``room``; later messages for it are ignored. The caller frees the
        pages. Unknown rooms are ignored (idempotent)."""
        self._rooms.pop(room, None)
        self._on_forget(room)

    def on_stream_message(self, room: int, msg: prefill_pb2.PrefillServerMessage):
        """Apply one message of the room's Prefill stream: KV chunks and the done's aux row
        (grpc backend; NIXL writes those into memory itself), a failure marks the room
        Failed. Returns the TransferDone when ``msg`` is one, else None."""
        kind = msg.WhichOneof("msg")
        if kind == "chunk":
            self._stream_chunk(msg.chunk)
        elif kind == "done":
            self._stream_done(room, msg.done)
            return msg.done
        elif kind == "failed":
            self.mark_failed(room, msg.failed.error.message)
        return None

    def _stream_chunk(self, chunk: prefill_pb2.KvChunk) -> None:
        raise ValueError(f"room {chunk.room}: a KvChunk on the stream, but this receiver's backend "
                         f"is {self.backend!r}")

    def _stream_done(self, room: int, done: prefill_pb2.TransferDone) -> None:
        """The aux row came by the backend itself (e.g. a NIXL WRITE)."""

    def aux_row(self, room: int) -> AuxRow:
        """The aux row of a room that reached Success."""
        r = self._get(room)
        if r.state is not KVPoll.Success:
            raise ValueError(f"room {room} is {r.state.name}, not Success")
        return unpack_aux_row(self.buffers.aux[r.aux_slot])

    def wait(self, room: int, timeout_s: float, sleep_s: float = 0.0002) -> KVPoll:
        """Poll until ``room`` is Success/Failed or ``timeout_s`` passes (then returns the
        current state; the room is not failed by this helper)."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.poll(room)
            if s in (KVPoll.Success, KVPoll.Failed) or time.monotonic() >= deadline:
                return s
            time.sleep(sleep_s)

    @property
    def rooms(self) -> dict[int, KVPoll]:
        """State of every tracked room (for metrics and leak checks)."""
        return {k: r.state for k, r in self._rooms.items()}

    def close(self) -> None:
        self._rooms.clear()

    # -- for backends ---------------------------------------------------------------------
    def _get(self, room: int) -> Room:
        try:
            return self._rooms[room]
        except KeyError:
            raise KeyError(f"unknown room {room}") from None

    def _check_timeout(self, r: Room) -> None:
        now = time.monotonic()
        if r.state is KVPoll.Bootstrapping and self.bootstrap_timeout_s is not None:
            if now - r.since > self.bootstrap_timeout_s:
                r.state = KVPoll.Failed
                r.reason = f"bootstrap timed out after {self.bootstrap_timeout_s:g} s"
        elif r.state in (KVPoll.WaitingForInput, KVPoll.Transferring):
            if self.transfer_timeout_s is not None and now - r.since > self.transfer_timeout_s:
                r.state = KVPoll.Failed
                r.reason = (
                    f"KV transfer timed out after {self.transfer_timeout_s:g} s "
                    f"({len(r.chunks)} chunks, aux {'received' if r.aux_done else 'missing'})"
                )

    def _chunk_arrived(self, r: Room, chunk: int, is_last: bool, nbytes: int = 0) -> None:
        if r.state not in (KVPoll.WaitingForInput, KVPoll.Transferring):
            return
        r.chunks.add(chunk)
        r.bytes_received += nbytes
        if is_last:
            r.num_chunks = chunk + 1
        r.state = KVPoll.Transferring
        self._maybe_done(r)

    def _aux_arrived(self, r: Room) -> None:
        if r.state not in (KVPoll.WaitingForInput, KVPoll.Transferring):
            return
        r.aux_done = True
        r.state = KVPoll.Transferring
        self._maybe_done(r)

    def _maybe_done(self, r: Room) -> None:
        if not r.aux_done or r.num_chunks is None:
            return
        if len(r.chunks) > r.num_chunks or max(r.chunks, default=-1) >= r.num_chunks:
            r.state, r.reason = KVPoll.Failed, (
                f"room {r.room}: got chunks {sorted(r.chunks)} but the last chunk was "
                f"{r.num_chunks - 1}"
            )
            return
        if len(r.chunks) == r.num_chunks and self._room_complete(r):
            r.state = KVPoll.Success

    def _room_complete(self, r: Room) -> bool:
        return True

    def _on_expect(self, r: Room) -> None:
        pass

    def _on_forget(self, room: int) -> None:
        pass

    def _progress(self) -> None:
        """Backends drain their event source here (e.g. NIXL notifications)."""


class KvSender:
    """Prefill side: writes its own pages into decode pages of a room."""

    backend = ""

    def __init__(self, buffers: KvBuffers, name: str, model_fingerprint: str = ""):
        self.buffers = buffers
        self.name = name
        self.layout = build_layout(buffers, model_fingerprint)
        self._peers: dict[str, common_pb2.KvLayout] = {}

    def add_peer(self, reg: Registration) -> str:
        """Learn a decode worker (once). Raises LayoutMismatchError / ValueError when its
        layout cannot receive our pages. Returns the peer name to pass to ``send_*``."""
        if reg.backend and reg.backend != self.backend:
            raise ValueError(
                f"decode {reg.agent_name!r} uses transfer backend {reg.backend!r}, this "
                f"prefill uses {self.backend!r}"
            )
        check_compatible(self.layout, reg.layout)
        check_addresses(reg.layout)
        self._add_peer(reg)
        self._peers[reg.agent_name] = reg.layout
        return reg.agent_name

    def remove_peer(self, peer: str) -> None:
        if self._peers.pop(peer, None) is not None:
            self._remove_peer(peer)

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

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
        remote = self._peer_layout(peer)
        src = validate_pages(src_pages, self.buffers.num_pages, "prefill page")
        dst = validate_pages(dst_pages, remote.num_pages, "decode page")
        if src.size != dst.size:
            raise ValueError(f"{src.size} prefill pages but {dst.size} decode pages")
        if chunk_index < 0:
            raise ValueError(f"chunk_index must be >= 0, got {chunk_index}")
        return self._send_kv(room, peer, remote, src, dst, chunk_index, is_last)

    def send_aux(self, room: int, peer: str, aux_slot: int, row: AuxRow) -> TransferHandle:
        """Write the metadata row into decode's ``aux_slot`` (after the last KV chunk)."""
        remote = self._peer_layout(peer)
        if not 0 <= aux_slot < remote.num_aux_slots:
            raise ValueError(
                f"aux slot {aux_slot} out of range for {remote.num_aux_slots} aux slots"
            )
        if row.room != room:
            raise ValueError(f"aux row is for room {row.room}, not {room}")
        return self._send_aux(room, peer, remote, aux_slot, row)

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

    def wait(
        self,
        handles: TransferHandle | Iterable[TransferHandle],
        timeout_s: float,
        sleep_s: float = 0.0001,
    ) -> XferStatus:
        """Poll :meth:`check` until not IN_PROGRESS; ERROR with a reason on timeout."""
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
        for p in list(self._peers):
            self.remove_peer(p)

    # -- for backends ---------------------------------------------------------------------
    def _peer_layout(self, peer: str) -> common_pb2.KvLayout:
        try:
            return self._peers[peer]
        except KeyError:
            raise ValueError(f"unknown decode peer {peer!r}; call add_peer first") from None

    def _add_peer(self, reg: Registration) -> None:
        pass

    def _remove_peer(self, peer: str) -> None:
        pass

    def _send_kv(self, room, peer, remote, src, dst, chunk_index, is_last) -> TransferHandle:
        raise NotImplementedError

    def _send_aux(self, room, peer, remote, aux_slot, row) -> TransferHandle:
        raise NotImplementedError

    def _check(self, h: TransferHandle) -> XferStatus:
        raise NotImplementedError

    def _release(self, h: TransferHandle) -> None:
        pass
