"""Draining a decode worker by moving its requests' KV to other workers (EngineControl.Drain).

The page-write path of PD, decode to decode. The draining worker is the sender: it stops each
decoding request between two steps and keeps its pages (``EngineLoop.hold_for_move``), ends its
stream with a ``TokenChunk.move`` (where and under which id the KV waits), and serves the
Prefill handshake for those ids (``tandem.worker.prefill.KvSource``: RegisterDecode, a Prefill
stream whose ``PrefillStart.move_id`` names the request, CancelRoom). The router continues the
request on another worker with its tokens so far and ``GenerateRequest.kv_source``; that worker
fetches the KV as it fetches a remote prefill's (``RemotePrefill.move_in``: pages for the
prompt and every output token but the last, written by the sender, the aux row carrying the
last token) and decodes on from the last token. Nothing is computed again.

:class:`HeldMoves` is the draining worker's table of the requests it holds, by move id, until
another worker fetches them; those nobody fetched within ``--drain-timeout`` are given up
(``expire``: the caller frees their pages) and their targets recompute them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from tandem.engine import HeldForMove
from tandem.worker.errors import RequestFailed

if TYPE_CHECKING:
    from tandem.config import DecodeConfig
    from tandem.metrics import ComponentMetrics
    from tandem.worker.remote_prefill import RemotePrefill


def moves_refused(config: DecodeConfig) -> str | None:
    """Why a worker of ``config`` neither holds KV for a move nor fetches it (None: it does). A
    move carries one rank's pool: a worker of several ranks (--tp-size/--ep-size > 1) drains by
    handing its requests back to be recomputed, and recomputes a request moved to it."""
    if config.is_embedding:
        return "it serves embeddings"
    if config.world_size > 1:
        return (f"it runs {config.world_size} ranks (--tp-size {config.tp_size}, --ep-size {config.ep_size}); a move "
                "carries one rank's pool")
    return None


class HeldMoves:
    """Requests held for a move, by move id (the request's id on this worker). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, HeldForMove] = {}  # waiting to be fetched
        self.num_taken = 0
        self.num_pages_taken = 0

    def add(self, held: dict[str, HeldForMove]) -> None:
        with self._lock:
            self._held.update(held)

    def __contains__(self, move_id: str) -> bool:
        with self._lock:
            return move_id in self._held

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self._held)

    def check(self, move_id: str, kv_token_ids: list[int], lora_name: str | None = None) -> HeldForMove:
        """RequestFailed unless ``move_id`` waits here with the KV of exactly ``kv_token_ids``,
        computed under LoRA adapter ``lora_name`` (None: the base model)."""
        with self._lock:
            return self._check(move_id, kv_token_ids, lora_name)

    def take(self, move_id: str, kv_token_ids: list[int], lora_name: str | None = None) -> HeldForMove:
        """``check``, then the request is the fetcher's: no one else may take it, ``expire`` leaves
        it alone (the room that sends it frees its pages, sent or failed)."""
        with self._lock:
            held = self._check(move_id, kv_token_ids, lora_name)
            del self._held[move_id]
            self.num_taken += 1
            self.num_pages_taken += len(held.pages)
            return held

    def expire(self) -> list[str]:
        """Give up every request nobody took (--drain-timeout passed): their ids, for the caller
        to free their pages. A fetch that comes later is refused (NOT_FOUND)."""
        with self._lock:
            gone, self._held = list(self._held), {}
            return gone

    def _check(self, move_id: str, kv_token_ids: list[int], lora_name: str | None) -> HeldForMove:
        held = self._held.get(move_id)
        if held is None:
            raise RequestFailed(grpc.StatusCode.NOT_FOUND, f"move_id={move_id!r}: no request waits here under this id "
                                "(already fetched, or given up after --drain-timeout)")
        if list(kv_token_ids) != held.kv_token_ids:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, (
                f"move_id={move_id!r}: input_ids ({len(kv_token_ids)} tokens) are not the {len(held.kv_token_ids)} "
                "tokens whose KV is held (the prompt and the output but its last token)"))
        if lora_name != held.lora_name:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, (
                f"move_id={move_id!r}: lora_name={lora_name or ''!r}, but its KV was computed under "
                f"{'adapter ' + repr(held.lora_name) if held.lora_name else 'the base model'}"))
        return held


@dataclass
class KvMoves:
    """A decode worker's two ends of moving KV: ``held`` (sending, when drained; None with
    --drain-timeout 0) fetched at ``address``, and ``fetcher`` (receiving: the PD client, the
    same handshake as a remote prefill; None where ``refused`` says why). ``metrics``: where the
    moves in are counted."""

    address: str
    fetcher: RemotePrefill | None
    held: HeldMoves | None
    metrics: ComponentMetrics | None = None
    refused: str | None = None  # moves_refused: why this worker neither holds nor fetches moved KV

    def moved_in(self, pages: int) -> None:
        """A moved request continues here on ``pages`` fetched pages."""
        if self.metrics is not None:
            self.metrics.kv_moved_in("moved", pages)

    def recomputed(self) -> None:
        """A moved request's KV could not be fetched: it is recomputed here."""
        if self.metrics is not None:
            self.metrics.kv_moved_in("recomputed", 0)
