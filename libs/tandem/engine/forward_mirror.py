"""What the leader's model runner needs from its worker's other ranks (interface only).

A worker of several ranks (``tandem.engine.parallel``) runs every forward pass on every rank: rank 0,
the leader, schedules; the followers run the same batch on their own part of the model and their own
KV pool. The leader's ``ModelRunner`` is built with a :class:`ForwardMirror` (None with one rank) and
runs each pass inside ``mirror.mirroring(fp)``, where ``fp`` (:class:`ForwardPass`) describes the
pass as every follower rebuilds it. ``tandem.engine.parallel`` implements the mirror (its broadcast
side); the runner knows nothing of processes, groups or messages beyond this file.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ForwardPass:
    """One forward pass as a follower runs it.

    ``records``: per request ``(start, ids, pages)``: its first new position, its new token ids
    ``[start, start + n)`` and the page indices covering ``[0, start + n)``. ``graph``: whether the
    leader replays a captured CUDA graph for it (every rank launches the same collectives: the others
    replay theirs, else all run eagerly)."""

    records: list
    graph: bool = False

    @staticmethod
    def records_of(batch: list, page_size: int) -> list:
        """The records of a scheduled batch ``[(req, n_new)]`` (``ModelRunner.build``'s input)."""
        out = []
        for req, n in batch:
            s = req.num_computed
            out.append((s, list(req.all_ids[s:s + n]), list(req.pages[:(s + n + page_size - 1) // page_size])))
        return out

    def future_count(self) -> int:
        """How many of rank 0's last sampled tokens the pass reads (overlap scheduling: a request's newest
        token is still being sampled when the pass is sent, its id the placeholder ``-1 - row``); 0: none."""
        return max((-i for _, ids, _ in self.records for i in ids if i < 0), default=0)

    def items(self) -> list:
        """The batch ``[(item, n_new)]`` that ``ModelRunner.build`` reads, rebuilt from the records."""
        return [(_Item(start, ids, pages), len(ids)) for start, ids, pages in self.records]


class ForwardMirror(Protocol):
    """The rank group as the leader's runner sees it."""

    @property
    def accepts_external_kv(self) -> bool:
        """Whether every rank receives KV written from outside (PD decode): without that, only the
        leader's pool would hold such a request's pages, so the runner refuses it."""

    def mirroring(self, fp: ForwardPass) -> AbstractContextManager[None]:
        """Around one forward pass: sends ``fp`` to the followers on entry and holds the group until
        the pass ends (nothing else is sent in between). Raises RuntimeError when the group is broken."""

    def share_future(self, tokens) -> None:
        """Inside ``mirroring``: send ``tokens`` (rank 0's sampled ids the pass reads, a device tensor of
        ``fp.future_count()``) to every rank on the device, where the followers resolve the same
        placeholders (overlap scheduling)."""

    def collective_status(self):
        """A word in device memory (a 1-element int32 tensor) that a collective of this rank sets nonzero,
        and leaves so, when it gave up waiting for a peer and left its sums incomplete (the custom
        all-reduce's barrier), or None where no collective can. The sample stage copies it to the host
        with each step's tokens (no extra sync) and drops a step it finds set (``fail``)."""

    def fail(self, why: str) -> RuntimeError:
        """Mark the group broken (a collective of the pass failed: a rank died or timed out); the
        error to raise."""


class _Window:
    """``all_ids`` stand-in holding only the tokens ``[start, start + len(ids))``."""

    __slots__ = ("start", "ids")

    def __init__(self, start: int, ids: list):
        self.start, self.ids = start, ids

    def __getitem__(self, sl: slice) -> list:
        return self.ids[sl.start - self.start: sl.stop - self.start]


class _Item:
    """What ``ModelRunner.build`` reads of a scheduled request."""

    __slots__ = ("num_computed", "all_ids", "pages")

    def __init__(self, start: int, ids: list, pages: list):
        self.num_computed, self.all_ids, self.pages = start, _Window(start, ids), pages

    def token_at(self, i: int) -> int:
        return self.all_ids[i:i + 1][0]


__all__ = ["ForwardPass", "ForwardMirror"]
