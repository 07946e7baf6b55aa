"""Background storage writes: submit never blocks; each write's future says what was written; a
failing write is counted and logged, not raised."""
from __future__ import annotations

import threading

from tandem.hicache.storage_writer import StorageWriter


def test_writes_run_in_the_background_and_failures_are_counted():
    written, gate = [], threading.Event()

    def write(key, parent, tokens, chunks):
        assert gate.wait(10)
        if key == 3:
            raise OSError("disk full")
        written.append(key)
        return len(chunks)

    w = StorageWriter(write, threads=2)
    futures = [w.submit(k, None, (k,), [b"x"] * k) for k in (1, 2, 3, 4)]
    assert not any(f.done() for f in futures)  # submitted while every write waits: nothing blocked
    gate.set()
    assert [f.result(10) for f in futures] == [1, 2, -1, 4]
    assert sorted(written) == [1, 2, 4] and w.num_failed == 1
    w.close()
