"""Background storage writes: all land before flush returns; a failing write is counted, not raised."""
from __future__ import annotations

import threading

from tandem.hicache.storage_writer import StorageWriter


def test_writes_land_in_order_with_backpressure_and_failures_are_counted():
    written, gate = [], threading.Event()

    def put(key, tokens, data):
        gate.wait(10)
        if key == 3:
            raise OSError("disk full")
        written.append(key)
        return len(data)

    sizes = []
    w = StorageWriter(put, sizes.append, max_pending=2)
    w.submit(1, (1,), b"ab")
    w.submit(2, (2,), b"abc")
    threading.Timer(0.05, gate.set).start()  # the third submit waits for the first (backpressure)
    w.submit(3, (3,), b"x")
    w.submit(4, (4,), b"abcd")
    w.flush()
    assert written == [1, 2, 4] and sizes == [2, 3, 4] and w.num_failed == 1
