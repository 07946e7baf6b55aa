"""PrefillTransfers: a room tracked by open() but not yet submitted to the engine must not be
advanced by the transfers thread (it was failed with AttributeError under load)."""
from __future__ import annotations

import threading

from tandem.worker.prefill import PrefillTransfers


class SlowSubmitLoop:
    """An engine loop whose submit() returns only after the transfers thread has polled its rooms
    at least twice, i.e. while open() has tracked the room but not yet set its stream."""

    def __init__(self, transfers_polled: threading.Event) -> None:
        self.polled = transfers_polled

    def submit(self, ids, sp, rid, **kw):
        assert self.polled.wait(10), "the transfers thread never polled"
        return _NoOutput()


class _NoOutput:
    finished = True  # nothing to cancel at shutdown

    def poll(self, timeout=None):
        return None


def test_room_not_yet_submitted_is_left_alone():
    polled = threading.Event()
    transfers = PrefillTransfers(SlowSubmitLoop(polled), sender=None, transfer_timeout_s=30.0)
    seen = []
    advance = transfers._advance  # noqa: SLF001 - count the thread's passes over the rooms

    def counting_advance(r):
        seen.append(r.room)
        if len(seen) >= 2:
            polled.set()
        return advance(r)

    transfers._advance = counting_advance  # noqa: SLF001
    transfers.start()
    try:
        r = transfers.open(7, "rid-7", None, [], 0, [1, 2, 3], sp=None)
        assert len(seen) >= 2  # the thread saw the room before its stream existed
        assert r.failure is None, r.failure
    finally:
        transfers.stop()
