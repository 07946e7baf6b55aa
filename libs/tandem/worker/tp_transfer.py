"""PD transfer for workers of several TP ranks: one sender or receiver per rank, driven by the leader.

Each rank of a worker holds its own KV heads (``tandem.engine.tensor_parallel``), so KV moves rank to
rank: prefill rank ``r`` writes its heads into the decode rank(s) holding them (``writers_of``; a
replicated head by its lowest rank), prefill rank 0 writes the aux row into every decode rank. The
library does the per-rank part (``tests/unit/transfer/test_tp_transfer.py``); this module makes a
worker's ranks look like one sender (:class:`RankedSender`, prefill) or one receiver
(:class:`RankedReceiver`, decode) to the worker logic, which stays as for one rank:

* rank 0's sender or receiver lives in the leader's process; each follower builds its own next to its
  pool (``ParallelLeader.attach``: :func:`sender_agent` / :func:`receiver_agent`) and the leader drives it
  with ``ParallelLeader.call`` (the one leader/follower mechanism, ordered after the forward passes);
* ``RegisterDecode`` carries every decode rank's registration (``Registration.ranks``) and prefill
  answers every prefill rank's agent and layout (``KvSender.ranks``), so each side knows who writes what;
* a follower's send runs to completion before it answers (its messages, for the in-band grpc backend,
  come back to the leader, which puts them on the room's stream); the messages name the decode rank
  they fill (``dst_rank``) and decode's leader hands each to that rank's receiver; ``TransferDone``
  and ``TransferFailure`` go to every rank;
* a room is Success on decode once it is Success on every rank (followers are asked only once rank 0's
  room succeeded), Failed once it failed on any.

A one-rank worker is the degenerate case (no leader): rank 0 only, the messages unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tandem.engine.tensor_parallel import head_split
from tandem.transfer import (
    AuxData,
    AuxRow,
    FailureReason,
    HandleKind,
    KvBuffers,
    KvPages,
    KVPoll,
    KvReceiver,
    KvSender,
    PoolLayout,
    Registration,
    TransferError,
    TransferFailure,
    TransferHandle,
    TransferMessage,
    XferState,
    XferStatus,
    make_receiver,
    make_sender,
    writers_of,
)
from tandem.transfer.layout import check_addresses, check_compatible

AGENT = "kv-transfer"  # the rank agents' name on the followers


def kv_buffers_of(pool, model) -> KvBuffers:
    """An engine KV pool (``KVPool``) as the transfer library sees it, with the rank's TP place and heads."""
    k_scales, v_scales = pool.scales()  # FP8 pools: pages mean nothing without them
    tp = model.tp
    heads = head_split(model.cfg.num_heads, model.cfg.num_kv_heads, tp.size, tp.rank)
    return KvBuffers(pool.k_buffers, pool.v_buffers, pool.aux, k_scales, v_scales, tp_size=tp.size,
                     tp_rank=tp.rank, kv_head_start=heads.kv_start, total_kv_heads=model.cfg.num_kv_heads)


def rank_agent_name(name: str, rank: int) -> str:
    """Rank ``rank``'s agent name of the worker named ``name`` (rank 0 keeps the worker's name)."""
    return name if rank == 0 else f"{name}-rank{rank}"


# ---------------------------------------------------------------------------------- on followers
class _RankSender:
    """A follower's sender over its own pool; each send runs to completion before it answers."""

    def __init__(self, pool, model, backend: str, name: str, fingerprint: str, timeout_s: float) -> None:
        self.sender = make_sender(backend, kv_buffers_of(pool, model), rank_agent_name(name, model.tp.rank),
                                  fingerprint)
        self.timeout_s = timeout_s

    def describe(self) -> tuple[str, PoolLayout]:
        return self.sender.name, self.sender.layout

    def add_peer(self, reg: Registration) -> str:
        return self.sender.add_peer(reg)

    def remove_peer(self, peer: str) -> None:
        self.sender.remove_peer(peer)

    def send_kv(self, room: int, peer: str, src, dst, chunk_index: int, is_last: bool
                ) -> tuple[list[TransferMessage], int]:
        h = self.sender.send_kv(room, peer, src, dst, chunk_index, is_last)
        try:
            status = self.sender.wait(h, self.timeout_s)
        finally:
            self.sender.release(h)
        if status.failed:
            raise TransferError(status.reason)
        return h.messages, h.nbytes

    def close(self) -> None:
        self.sender.close()


class _RankReceiver:
    """A follower's receiver over its own pool (the leader applies the timeouts)."""

    def __init__(self, pool, model, backend: str, name: str, fingerprint: str) -> None:
        self.receiver = make_receiver(backend, kv_buffers_of(pool, model), rank_agent_name(name, model.tp.rank),
                                      fingerprint, bootstrap_timeout_s=None, waiting_timeout_s=None,
                                      transfer_timeout_s=None)

    def registration(self) -> Registration:
        return self.receiver.registration()

    def expect(self, room: int, pages, aux_slot: int, peer) -> None:
        self.receiver.expect(room, pages, aux_slot, peer)

    def handle(self, msg: TransferMessage) -> KVPoll:
        return self.receiver.handle(msg)

    def states(self, rooms: Sequence[int]) -> dict[int, tuple[KVPoll, TransferFailure | None]]:
        """Each of ``rooms``' state and failure (a room unknown here: Failed)."""
        states = self.receiver.poll_all()
        return {room: (states.get(room, KVPoll.Failed),
                       self.receiver.failure(room) if room in states else
                       TransferFailure(room, FailureReason.PROTOCOL, "the room is unknown on this rank"))
                for room in rooms}

    def forget(self, room: int) -> None:
        self.receiver.forget(room)

    def close(self) -> None:
        self.receiver.close()


def sender_agent(pool, model, backend: str, name: str, fingerprint: str, timeout_s: float) -> _RankSender:
    """``ParallelLeader.attach`` factory of a prefill follower's sender."""
    return _RankSender(pool, model, backend, name, fingerprint, timeout_s)


def receiver_agent(pool, model, backend: str, name: str, fingerprint: str) -> _RankReceiver:
    """``ParallelLeader.attach`` factory of a decode follower's receiver."""
    return _RankReceiver(pool, model, backend, name, fingerprint)


def _answers(replies: dict[int, list[tuple[bool, object]]], what: str) -> dict[int, list]:
    """The followers' results; TransferError naming every rank whose call failed."""
    failed = [f"rank {r}: {value}" for r, results in replies.items() for ok, value in results if not ok]
    if failed:
        raise TransferError(f"{what} failed on {'; '.join(failed)}")
    return {r: [value for _, value in results] for r, results in replies.items()}


# ---------------------------------------------------------------------------------- prefill
@dataclass(frozen=True)
class _Plan:
    """Who writes what into one decode worker: its ranks' agent names, and per decode rank the
    prefill ranks writing its heads."""

    names: tuple[str, ...]
    writers: tuple[tuple[int, ...], ...]


@dataclass
class _Parts:
    """A composite handle's own sends (rank 0's handles) and a follower's failure, if any."""

    local: list[TransferHandle]
    error: str | None = None


def _to_rank(msg: TransferMessage, rank: int) -> TransferMessage:
    return dataclasses.replace(msg, dst_rank=rank) if isinstance(msg, (KvPages, AuxData)) and rank else msg


class RankedSender(KvSender):
    """Prefill: the senders of every rank as one ``KvSender`` (see the module docstring).

    ``local`` is rank 0's sender; ``leader`` the worker's ``ParallelLeader`` once the followers'
    senders are attached (:func:`ranked_sender`), None for one rank. A peer is a decode worker
    (its rank 0's agent name), whatever its TP size; each handle covers every rank's writes of one
    chunk (or of the aux row)."""

    def __init__(self, local: KvSender, leader=None) -> None:
        super().__init__(local.buffers, local.name)
        self.layout, self.backend = local.layout, local.backend
        self.local, self.leader = local, leader
        self._ranks = [(local.name, local.layout)]
        if leader is not None:
            answers = _answers(leader.call(AGENT, {r: [("describe", ())] for r in range(1, leader.ep.size)}),
                               "describing the prefill ranks' senders")
            self._ranks += [answers[r][0] for r in sorted(answers)]
        self._plans: dict[str, _Plan] = {}  # by peer, under the base's _peers_lock

    def ranks(self) -> list[tuple[str, PoolLayout]]:
        return list(self._ranks)

    def add_peer(self, reg: Registration) -> str:
        """Learn a decode worker of any TP size: rank 0 adds every decode rank (it writes the aux
        row to each), follower ``r`` the decode ranks it writes heads into. Raises
        LayoutMismatchError / ValueError naming both TP sizes and head counts when no prefill rank
        can fill a decode rank."""
        regs = list(reg.ranks) or [reg]
        if reg.backend and reg.backend != self.backend:
            raise ValueError(f"decode {reg.agent_name!r} uses transfer backend {reg.backend!r}, this "
                             f"prefill uses {self.backend!r}")
        layouts = [lay for _, lay in self._ranks]
        for rg in regs:
            for lay in layouts:
                check_compatible(lay, rg.layout)
            check_addresses(rg.layout)
        writers = tuple(tuple(writers_of(rg.layout, layouts)) for rg in regs)
        added = []
        try:
            for rg in regs:
                added.append(self.local.add_peer(dataclasses.replace(rg, ranks=())))
            calls = {r: [("add_peer", (dataclasses.replace(regs[d], ranks=()),))
                         for d in range(len(regs)) if r in writers[d]] for r in range(1, len(self._ranks))}
            if any(calls.values()):
                _answers(self.leader.call(AGENT, calls), f"adding decode {reg.agent_name!r}")
        except BaseException:
            for name in added:
                self.local.remove_peer(name)
            raise
        peer = regs[0].agent_name
        with self._peers_lock:
            self._plans[peer] = _Plan(tuple(rg.agent_name for rg in regs), writers)
            self._peers[peer] = regs[0].layout
        return peer

    def _plan(self, peer: str) -> _Plan:
        self.peer_layout(peer)  # ValueError naming an unknown peer
        with self._peers_lock:
            return self._plans[peer]

    def _remove_peer(self, peer: str) -> None:
        with self._peers_lock:
            plan = self._plans.pop(peer, None)
        if plan is None:
            return
        for name in plan.names:
            self.local.remove_peer(name)
        calls = {r: [("remove_peer", (plan.names[d],)) for d in range(len(plan.names)) if r in plan.writers[d]]
                 for r in range(1, len(self._ranks))}
        if any(calls.values()):
            with contextlib.suppress(RuntimeError):  # the group is closed or broken: the followers are gone
                self.leader.call(AGENT, calls)

    def head_slice(self, peer: str):
        return self.local.head_slice(self._plan(peer).names[0])

    def _send_kv(self, room, peer, remote, src, dst, chunk_index, is_last) -> TransferHandle:
        plan = self._plan(peer)
        parts, messages, nbytes, error = [], [], 0, None
        calls: dict[int, list] = {}
        ranks_of: dict[int, list[int]] = {}
        for d, writers in enumerate(plan.writers):
            for r in writers:
                if r == 0:
                    h = self.local.send_kv(room, plan.names[d], src, dst, chunk_index, is_last)
                    parts.append(h)
                    messages += [_to_rank(m, d) for m in h.messages]
                    nbytes += h.nbytes
                else:
                    calls.setdefault(r, []).append(("send_kv", (room, plan.names[d], src, dst, chunk_index, is_last)))
                    ranks_of.setdefault(r, []).append(d)
        if calls:
            try:
                replies = self.leader.call(AGENT, calls)
            except RuntimeError as exc:
                replies, error = {}, str(exc)
            for r, results in sorted(replies.items()):
                for d, (ok, value) in zip(ranks_of.get(r, []), results):
                    if not ok:
                        error = error or f"prefill rank {r} writing decode rank {d}: {value}"
                        continue
                    msgs, n = value
                    messages += [_to_rank(m, d) for m in msgs]
                    nbytes += n
        return TransferHandle(room, peer, HandleKind.KV, nbytes, chunk_index, is_last, messages,
                              backend_state=_Parts(parts, error))

    def send_aux(self, room: int, peer: str, aux_slot: int, row: AuxRow) -> TransferHandle:
        """Rank 0 writes the aux row into every decode rank's ``aux_slot``."""
        plan = self._plan(peer)
        parts = [self.local.send_aux(room, name, aux_slot, row) for name in plan.names]
        messages = [_to_rank(m, d) for d, h in enumerate(parts) for m in h.messages]
        return TransferHandle(room, peer, HandleKind.AUX, sum(h.nbytes for h in parts), messages=messages,
                              backend_state=_Parts(parts))

    def _check(self, h: TransferHandle) -> XferStatus:
        parts: _Parts = h.backend_state
        if parts.error is not None:
            return XferStatus(XferState.ERROR, parts.error)
        return self.local.check(parts.local) if parts.local else XferStatus(XferState.DONE)

    def _release(self, h: TransferHandle) -> None:
        self.local.release(h.backend_state.local)

    def notify_failed(self, room: int, peer: str, reason: str) -> None:
        for name in self._plan(peer).names:
            self.local.notify_failed(room, name, reason)

    def close(self) -> None:
        super().close()
        self.local.close()


def ranked_sender(backend: str, buffers: KvBuffers, name: str, fingerprint: str, leader=None,
                  timeout_s: float = 300.0) -> RankedSender:
    """Prefill's sender: rank 0's here, with ``leader`` (TP > 1) one on every follower too."""
    local = make_sender(backend, buffers, name, fingerprint)
    if leader is not None:
        leader.attach(AGENT, sender_agent, backend, name, fingerprint, timeout_s)
    return RankedSender(local, leader)


# ---------------------------------------------------------------------------------- decode
class RankedReceiver:
    """Decode: the receivers of every rank as one (the ``KvReceiver`` methods the worker uses).

    ``local`` is rank 0's receiver (it applies the timeouts); ``leader`` the worker's
    ``ParallelLeader`` once the followers' receivers are attached (:func:`ranked_receiver`), None
    for one rank. ``expect(..., peer=...)`` takes a prefill worker's agent name, or each of its TP
    ranks' ``(name, layout)`` (``pd_proto.prefill_agents``): each decode rank then expects the
    prefill ranks writing its heads."""

    def __init__(self, local: KvReceiver, leader=None) -> None:
        self.local, self.leader = local, leader
        self.backend, self.name, self.layout, self.buffers = local.backend, local.name, local.layout, local.buffers
        self._ranks = [local.registration()]
        self._followers = range(1, leader.ep.size) if leader is not None else range(0)
        if leader is not None:
            answers = _answers(leader.call(AGENT, {r: [("registration", ())] for r in self._followers}),
                               "registering the decode ranks' receivers")
            self._ranks += [answers[r][0] for r in sorted(answers)]
        self._failed: dict[int, TransferFailure] = {}  # rooms that failed on a follower
        self._lock = threading.Lock()

    @property
    def num_ranks(self) -> int:
        return len(self._ranks)

    def registration(self) -> Registration:
        if len(self._ranks) == 1:
            return self._ranks[0]
        return dataclasses.replace(self._ranks[0], ranks=tuple(self._ranks))

    def bootstrap(self, room: int) -> None:
        self.local.bootstrap(room)

    def expect(self, room: int, page_indices: Sequence[int], aux_slot: int, peer=None) -> None:
        peers = self._peers_of(peer)
        self.local.expect(room, page_indices, aux_slot, peers[0])
        if self.leader is not None:
            pages = np.asarray(page_indices, dtype=np.int64)
            self._on_followers(room, {r: [("expect", (room, pages, aux_slot, peers[r]))] for r in self._followers},
                               "expect")

    def _peers_of(self, peer) -> list:
        """Each decode rank's expected sender(s): ``peer`` itself, or the prefill ranks holding its heads."""
        if not (isinstance(peer, tuple) and peer and isinstance(peer[0], tuple)):
            return [peer] * len(self._ranks)
        names = [name for name, _ in peer]
        layouts = [lay for _, lay in peer]
        out = []
        for reg in self._ranks:
            writers = writers_of(reg.layout, layouts)
            out.append(names[0] if writers == [0] else tuple(names[r] for r in writers))
        return out

    def handle(self, msg: TransferMessage) -> KVPoll:
        """A message of the room's stream: pages and aux rows to the rank they fill, the rest to every rank."""
        rank = msg.dst_rank if isinstance(msg, (KvPages, AuxData)) else None
        if rank is not None and not 0 <= rank < len(self._ranks):
            if msg.room in self.local.rooms:
                self.local.fail(msg.room, FailureReason.PROTOCOL, f"room {msg.room}: a message for decode rank "
                                f"{rank}, this worker has {len(self._ranks)}")
            raise ValueError(f"room {msg.room}: a message for decode rank {rank} of {len(self._ranks)}")
        if rank != 0 and self.leader is not None:
            targets = [rank] if rank is not None else list(self._followers)
            self._on_followers(msg.room, {r: [("handle", (msg,))] for r in targets}, "handle")
        if rank is None or rank == 0:
            return self.local.handle(msg)
        return self.local.rooms.get(msg.room, KVPoll.Failed)

    def _on_followers(self, room: int, calls: dict, what: str) -> dict[int, list]:
        try:
            return _answers(self.leader.call(AGENT, calls), f"{what} of room {room}")
        except (TransferError, RuntimeError) as exc:
            self._fail_room(room, TransferFailure(room, FailureReason.PROTOCOL, str(exc)))
            raise ValueError(str(exc)) from None

    def _fail_room(self, room: int, failure: TransferFailure) -> None:
        with self._lock:
            self._failed.setdefault(room, failure)

    def poll_all(self) -> dict[int, KVPoll]:
        states = self.local.poll_all()
        return self._combine(states)

    def poll(self, room: int) -> KVPoll:
        return self._combine({room: self.local.poll(room)})[room]

    def _combine(self, states: dict[int, KVPoll]) -> dict[int, KVPoll]:
        """Rank 0's states, with a room Success only once it is on every follower too."""
        with self._lock:
            failed = set(self._failed)
        done = [room for room, s in states.items() if s is KVPoll.Success and room not in failed]
        if done and self.leader is not None:
            try:
                answers = _answers(self.leader.call(AGENT, {r: [("states", (done,))] for r in self._followers}),
                                   "polling rooms")
            except (TransferError, RuntimeError) as exc:
                for room in done:
                    self._fail_room(room, TransferFailure(room, FailureReason.BACKEND_ERROR, str(exc)))
                answers = {}
            for r, (per_room,) in answers.items():
                for room, (state, failure) in per_room.items():
                    if state is KVPoll.Failed:
                        self._fail_room(room, TransferFailure(room, failure.reason, f"decode rank {r}: "
                                                              f"{failure.message}"))
                    elif state is not KVPoll.Success:
                        states[room] = KVPoll.Transferring
        with self._lock:
            return {room: KVPoll.Failed if room in self._failed else s for room, s in states.items()}

    def failure(self, room: int) -> TransferFailure | None:
        with self._lock:
            failure = self._failed.get(room)
        return failure or self.local.failure(room)

    def fail(self, room: int, reason: FailureReason, message: str) -> None:
        self.local.fail(room, reason, message)

    def aux_row(self, room: int) -> AuxRow:
        return self.local.aux_row(room)

    def bytes_received(self, room: int) -> int:
        return self.local.bytes_received(room)

    def forget(self, room: int) -> None:
        self.local.forget(room)
        with self._lock:
            self._failed.pop(room, None)
        if self.leader is not None:
            with contextlib.suppress(RuntimeError):  # the group is closed or broken: the followers are gone
                self.leader.call(AGENT, {r: [("forget", (room,))] for r in self._followers})

    def on_progress(self, fn) -> None:
        self.local.on_progress(fn)

    @property
    def rooms(self) -> dict[int, KVPoll]:
        return self.local.rooms

    def close(self) -> None:
        self.local.close()  # the followers' close when their rank stops


def ranked_receiver(backend: str, buffers: KvBuffers, name: str, fingerprint: str, leader=None,
                    **timeouts) -> RankedReceiver:
    """Decode's receiver: rank 0's here (with the timeouts), with ``leader`` (TP > 1) one on every
    follower too. A one-rank decode worker needs the wrapper as well: a prefill worker of several
    ranks writes its heads from each of them."""
    local = make_receiver(backend, buffers, name, fingerprint, **timeouts)
    if leader is None:
        return RankedReceiver(local)
    leader.attach(AGENT, receiver_agent, backend, name, fingerprint, receives_kv=True)
    return RankedReceiver(local, leader)


__all__ = ["RankedReceiver", "RankedSender", "kv_buffers_of", "ranked_receiver", "ranked_sender",
           "receiver_agent", "sender_agent"]
