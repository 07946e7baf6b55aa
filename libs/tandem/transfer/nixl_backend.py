"""nixl backend: one-sided NIXL WRITEs (UCX) from prefill's pages into decode's pages.

Both sides register their K/V layer buffers and aux buffer as a few large regions. The
sender WRITEs merged page runs of every layer, K and V, with one notification per chunk
``b"{room}_kv_{chunk}_{is_last}"`` (is_last as 0/1), then the metadata row from a staging
slot into decode's aux slot with ``b"{room}_aux"``; a failed room may be reported with
``b"{room}_fail_{reason}"``. The receiver drains ``get_new_notifs`` when polled and
counts notifications until every chunk up to the last and the aux row arrived.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .base import (
    HandleKind,
    KvReceiver,
    KvSender,
    Registration,
    Room,
    TransferError,
    TransferHandle,
    XferState,
    XferStatus,
)
from .layout import KvBuffers, head_slice, slice_descriptors
from .messages import FailureReason, TransferFailure

log = logging.getLogger(__name__)

try:
    from nixl._api import nixl_agent, nixl_agent_config

    NIXL_IMPORT_ERROR: str = ""
except Exception as e:  # ImportError, or a broken native library
    nixl_agent = nixl_agent_config = None
    NIXL_IMPORT_ERROR = f"{type(e).__name__}: {e}"


def _require_nixl() -> None:
    if NIXL_IMPORT_ERROR:
        raise RuntimeError(
            "the nixl transfer backend needs the 'nixl' Python package (pip install nixl, "
            f"UCX backend); importing it failed: {NIXL_IMPORT_ERROR}. Use "
            "--disaggregation-transfer-backend grpc on machines without NIXL."
        )


def _make_agent(name: str, backends: list[str], progress_thread: bool):
    _require_nixl()
    # NIXL's progress thread polls UCX with no delay and burns most of a core even when idle;
    # without it, UCX progresses inside check_xfer_state / get_new_notifs, which both sides
    # call while a room is in flight anyway.
    cfg = nixl_agent_config(backends=backends, enable_prog_thread=progress_thread)
    agent = nixl_agent(name, cfg)
    if not agent.backends:
        raise RuntimeError(
            f"NIXL agent {name!r} has none of the backends {backends}; available plugins: "
            f"{agent.get_plugin_list()}"
        )
    return agent


class _Progress:
    """Drives UCX progress from a low-duty background thread.

    Without NIXL's own progress thread (which busy-polls a whole core), UCX only moves data
    while someone calls into the agent; this thread calls ``get_new_notifs`` every
    ``interval_s`` (under the agent lock) and keeps what it drains for the owner.
    """

    def __init__(self, agent, lock: threading.RLock, interval_s: float):
        self.agent, self.lock, self.interval_s = agent, lock, interval_s
        self.drained: list[tuple[str, bytes]] = []
        self.on_drained: Callable[[], None] | None = None  # called (outside the lock) after new notifications
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nixl-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            got = False
            with self.lock:
                try:
                    for agent, msgs in self.agent.get_new_notifs().items():
                        self.drained.extend((agent, m) for m in msgs)
                        got |= bool(msgs)
                except Exception as e:  # keep progressing; the owner sees transfer errors
                    log.debug("nixl progress: %s", e)
            if got and self.on_drained is not None:
                self.on_drained()

    def take(self) -> list[tuple[str, bytes]]:
        with self.lock:
            out, self.drained = self.drained, []
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)


class _Agent:
    """A NIXL agent with a pool's memory registered and, unless NIXL runs its own
    (``progress_thread``), the low-duty progress thread. Both sides of the backend have one;
    their constructors pass these options through (``nixl_backends``, ``progress_thread``,
    ``progress_interval_s``)."""

    def __init__(self, name: str, buffers: KvBuffers, lock: threading.RLock, nixl_backends: tuple[str, ...] = ("UCX",),
                 progress_thread: bool = False, progress_interval_s: float | None = 0.001) -> None:
        self.lock = lock
        self.agent = _make_agent(name, list(nixl_backends), progress_thread)
        self.progress = (_Progress(self.agent, lock, progress_interval_s)
                         if progress_interval_s and not progress_thread else None)
        self.regs = _register(self.agent, buffers)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def deregister(self) -> None:
        with self.lock:
            _deregister(self.agent, self.regs)
            self.regs = []


def _register(agent, buffers: KvBuffers) -> list:
    """Register K/V (and aux, in its own memory kind when it differs); returns the handles."""
    if buffers.aux_mem_type == buffers.mem_type:
        return [agent.register_memory([(a, n, d, "") for a, n, d in buffers.regions()], buffers.mem_type)]
    aux = buffers.aux
    return [agent.register_memory([(a, n, d, "") for a, n, d in buffers.regions(include_aux=False)],
                                  buffers.mem_type),
            agent.register_memory([(aux.data_ptr(), aux.numel(), buffers.aux_device_id, "")],
                                  buffers.aux_mem_type)]


def _deregister(agent, regs: list) -> None:
    for reg in regs:
        try:
            agent.deregister_memory(reg)
        except Exception as e:  # closing must go on: the process may be exiting
            log.warning("deregistering NIXL memory: %s", e)


def kv_notif(room: int, chunk: int, is_last: bool) -> bytes:
    return f"{room}_kv_{chunk}_{int(is_last)}".encode()


def aux_notif(room: int) -> bytes:
    return f"{room}_aux".encode()


def fail_notif(room: int, reason: str) -> bytes:
    return f"{room}_fail_{reason}".encode()


def parse_notif(msg: bytes) -> tuple[int, str, tuple]:
    """``(room, kind, args)``: kind "kv" (args (chunk, is_last)), "aux" or "fail" (reason)."""
    text = msg.decode(errors="replace")
    room_s, _, rest = text.partition("_")
    room = int(room_s)
    if rest == "aux":
        return room, "aux", ()
    if rest.startswith("kv_"):
        chunk, last = rest[3:].split("_")
        return room, "kv", (int(chunk), last == "1")
    if rest.startswith("fail_"):
        return room, "fail", (rest[5:],)
    raise ValueError(f"unknown notification {text!r}")


@dataclass
class _Xfer:
    """A NIXL send: its transfer handle (None when only a notification went out, or once
    released) and the aux staging slot it holds."""

    handle: object = None
    staging_slot: int | None = None
    state: XferState = XferState.IN_PROGRESS
    error: str = ""


class NixlKvSender(KvSender):
    """Prefill side of the nixl backend."""

    backend = "nixl"

    def __init__(self, buffers: KvBuffers, name: str, model_fingerprint: str = "", aux_staging_slots: int = 1024,
                 **agent_options):
        super().__init__(buffers, name, model_fingerprint)
        self._lock = threading.RLock()
        self._nixl = _Agent(name, buffers, self._lock, **agent_options)
        self.agent = self._nixl.agent
        # Aux rows are packed into this registered host buffer, then written to decode.
        self._staging = torch.zeros(aux_staging_slots, buffers.aux_slot_bytes, dtype=torch.uint8)
        self._nixl.regs.append(self.agent.register_memory(self._staging))
        self._free_staging = list(range(aux_staging_slots - 1, -1, -1))

    def _add_peer(self, reg: Registration) -> None:
        with self._lock:
            try:
                name = self.agent.add_remote_agent(reg.agent_metadata)
            except Exception as e:
                raise TransferError(f"cannot load NIXL metadata of {reg.agent_name!r}: {e}") from e
            name = name.decode() if isinstance(name, bytes) else name
            if name != reg.agent_name:
                raise TransferError(
                    f"NIXL metadata is for agent {name!r}, registration says {reg.agent_name!r}"
                )

    def _remove_peer(self, peer: str) -> None:
        with self._lock:
            try:
                self.agent.remove_remote_agent(peer)
            except Exception as e:  # already gone: nothing to undo
                log.warning("removing NIXL peer %s: %s", peer, e)

    def _post(self, h: TransferHandle, src: np.ndarray, dst: np.ndarray, remote_mem: str,
              notif: bytes, local_mem: str) -> TransferHandle:
        x = h.backend_state
        with self._lock:
            try:
                if len(src) == 0:
                    self.agent.send_notif(h.peer, notif)
                    x.state = XferState.DONE
                    return h
                sd = self.agent.get_xfer_descs(src, local_mem)
                dd = self.agent.get_xfer_descs(dst, remote_mem)
                x.handle = self.agent.initialize_xfer("WRITE", sd, dd, h.peer, notif)
                if self.agent.transfer(x.handle) == "ERR":
                    x.state, x.error = XferState.ERROR, f"NIXL transfer to {h.peer} failed to start (room {h.room})"
            except Exception as e:
                x.state, x.error = XferState.ERROR, f"NIXL {type(e).__name__} writing room {h.room} to {h.peer}: {e}"
        return h

    def _send_kv(self, room, peer, remote, src, dst, chunk_index, is_last) -> TransferHandle:
        # Whole page runs, or this rank's heads of every token (a decode worker of another TP size).
        s, d = slice_descriptors(self.layout, remote, src, dst, head_slice(self.layout, remote))
        h = TransferHandle(room, peer, HandleKind.KV, int(s[:, 1].sum()) if len(s) else 0, chunk_index, is_last,
                           backend_state=_Xfer())
        return self._post(h, s, d, remote.mem_type, kv_notif(room, chunk_index, is_last), self.layout.mem_type)

    def _send_aux(self, room, peer, remote, aux_slot, row: bytes) -> TransferHandle:
        nbytes = min(len(row), self._staging.shape[1])
        with self._lock:
            if not self._free_staging:
                raise TransferError(
                    f"all {self._staging.shape[0]} aux staging slots are in flight; release "
                    "finished handles"
                )
            slot = self._free_staging.pop()
        self._staging[slot, :nbytes] = torch.frombuffer(bytearray(row[:nbytes]), dtype=torch.uint8)
        src = np.array([[self._staging[slot].data_ptr(), nbytes, 0]], dtype=np.uint64)
        aux_mem = remote.aux_mem_type or remote.mem_type
        aux_dev = remote.aux_device_id if remote.aux_mem_type else remote.device_id
        dst = np.array([[remote.aux_base_addr + aux_slot * remote.aux_slot_bytes, nbytes, aux_dev]],
                       dtype=np.uint64)
        h = TransferHandle(room, peer, HandleKind.AUX, nbytes, backend_state=_Xfer(staging_slot=slot))
        return self._post(h, src, dst, aux_mem, aux_notif(room), "DRAM")

    def _check(self, h: TransferHandle) -> XferStatus:
        x: _Xfer = h.backend_state
        if x.state is XferState.IN_PROGRESS:
            if x.handle is None:
                return XferStatus(XferState.ERROR, f"handle of room {h.room} was released")
            with self._lock:
                try:
                    st = self.agent.check_xfer_state(x.handle)
                except Exception as e:
                    st, x.error = "ERR", f"NIXL {type(e).__name__}: {e}"
            if st == "DONE":
                self._free_handle(h)
                x.state = XferState.DONE
            elif st == "ERR":
                x.state = XferState.ERROR
                x.error = x.error or f"NIXL transfer of room {h.room} to {h.peer} failed"
        return XferStatus(x.state, x.error)

    def _free_handle(self, h: TransferHandle) -> None:
        x: _Xfer = h.backend_state
        if x.handle is not None:
            with self._lock:
                try:
                    x.handle.release()
                except Exception as e:  # an active transfer that cannot be cancelled
                    log.warning("releasing NIXL handle of room %s: %s", h.room, e)
            x.handle = None
        if x.staging_slot is not None:
            with self._lock:
                self._free_staging.append(x.staging_slot)
            x.staging_slot = None

    def _release(self, h: TransferHandle) -> None:
        self._free_handle(h)

    def notify_failed(self, room: int, peer: str, reason: str) -> None:
        with self._lock:
            try:
                self.agent.send_notif(peer, fail_notif(room, reason))
            except Exception as e:
                log.warning("could not notify %s that room %s failed: %s", peer, room, e)

    def close(self) -> None:
        self._nixl.stop_progress()
        super().close()
        self._nixl.deregister()


class NixlKvReceiver(KvReceiver):
    """Decode side of the nixl backend: counts notifications per room.

    A room may be written by several sender agents (``expect(..., peer=(a, b))``: the prefill ranks
    of another TP size, each writing its heads): a chunk counts once every one of them notified it;
    the aux row comes from one of them (prefill rank 0)."""

    backend = "nixl"
    _MAX_PENDING = 65536

    def __init__(self, buffers: KvBuffers, name: str, model_fingerprint: str = "",
                 bootstrap_timeout_s: float | None = 300.0, transfer_timeout_s: float | None = 300.0,
                 waiting_timeout_s: float | None = 300.0, **agent_options):
        super().__init__(buffers, name, model_fingerprint, bootstrap_timeout_s, transfer_timeout_s, waiting_timeout_s)
        self._nixl = _Agent(name, buffers, self._lock, **agent_options)
        self.agent = self._nixl.agent
        # Notifications that arrived before expect(), oldest first.
        self._pending: OrderedDict[int, list[tuple[str, bytes]]] = OrderedDict()
        # Rooms of several senders: per room, per chunk, the senders that notified it so far.
        self._chunk_senders: dict[int, dict[int, set[str]]] = {}

    def agent_metadata(self) -> bytes:
        with self._lock:
            return self.agent.get_agent_metadata()

    def on_progress(self, fn: Callable[[], None] | None) -> None:
        """Call ``fn()`` (from the progress thread) whenever new notifications arrived."""
        if self._nixl.progress is not None:
            self._nixl.progress.on_drained = fn

    @property
    def num_early_notifications(self) -> int:
        """Notifications held for rooms not expected yet."""
        with self._lock:
            return sum(len(v) for v in self._pending.values())

    def _progress(self) -> None:
        if self._nixl.progress is not None:
            for agent, m in self._nixl.progress.take():
                self._apply(agent, m)
        for agent, msgs in self.agent.get_new_notifs().items():
            for m in msgs:
                self._apply(agent, m)

    def _apply(self, agent: str, msg: bytes) -> None:
        try:
            room, kind, args = parse_notif(msg)
        except ValueError:
            log.warning("ignoring NIXL notification %r from %s", msg, agent)
            return
        r = self._rooms.get(room)
        if r is None or r.pages is None:
            if not self._was_forgotten(room):
                self._pending.setdefault(room, []).append((agent, msg))
                while len(self._pending) > self._MAX_PENDING:
                    self._pending.popitem(last=False)
            return
        senders = r.peer if isinstance(r.peer, tuple) else None
        # Several senders: the aux row comes from the prefill leader (rank 0), which need not write
        # KV heads into this rank, so it is taken from any agent.
        if r.peer is not None and agent not in (senders or (r.peer,)) and not (senders and kind == "aux"):
            log.warning("room %s: ignoring %r from %s (expected %s)", room, msg, agent, r.peer)
            return
        if kind == "kv" and senders is not None and len(senders) > 1:
            chunk, is_last = args
            seen = self._chunk_senders.setdefault(room, {}).setdefault(chunk, set())
            seen.add(agent)
            if len(seen) == len(senders):  # every sender rank wrote its heads of this chunk
                self._chunk_arrived(r, chunk, is_last)
        elif kind == "kv":
            self._chunk_arrived(r, *args)
        elif kind == "aux":
            self._aux_arrived(r)
        else:
            self._fail(r, TransferFailure(room, FailureReason.BACKEND_ERROR,
                                          f"prefill {agent} reported failure: {args[0]}"))

    def _on_expect(self, r: Room) -> None:
        for agent, msg in self._pending.pop(r.room, []):
            self._apply(agent, msg)

    def _on_forget(self, room: int) -> None:
        self._pending.pop(room, None)
        self._chunk_senders.pop(room, None)

    def close(self) -> None:
        self._nixl.stop_progress()
        super().close()
        self._nixl.deregister()
