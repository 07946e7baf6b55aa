"""Storage prefetch policies: how long admission waits for pages read on the prefetch thread."""
from __future__ import annotations

import threading

import pytest
from tandem.hicache.prefetch import Prefetcher

CHAIN = [(11, (1,)), (12, (2,)), (13, (3,))]


def _blocking_fetch(release: threading.Event, first_ready: threading.Event):
    def fetch(key, toks):
        if key == 11:
            first_ready.set()
            return f"page{key}"
        release.wait(10)
        return None if key == 13 else f"page{key}"

    return fetch


@pytest.mark.parametrize("policy,timeout,waits", [("best_effort", 1.0, False), ("wait_complete", 1.0, True),
                                                  ("timeout", 1e9, True), ("timeout", 0.0, False)])
def test_policy_decides_whether_admission_waits(policy, timeout, waits):
    release, first_ready = threading.Event(), threading.Event()
    p = Prefetcher(_blocking_fetch(release, first_ready), policy, timeout)
    first = p.poll(CHAIN, exists=lambda key: True)
    if waits:
        assert first is None
        first_ready.wait(10)
        assert p.poll(CHAIN, exists=lambda key: True) is None  # still reading page 12
        release.set()
        while (got := p.poll(CHAIN, exists=lambda key: True)) is None:
            pass
        assert got == ["page11", "page12"]  # stops at the first miss (13)
    else:
        assert first is not None and len(first) <= 1  # took what was read at once, cancelled the rest
        release.set()
    p.close()


def test_nothing_in_storage_starts_no_read():
    p = Prefetcher(lambda key, toks: pytest.fail("no read expected"), "wait_complete", 1.0)
    assert p.poll(CHAIN, exists=lambda key: False) == []
    assert p.poll([], exists=lambda key: True) == []
    with pytest.raises(ValueError, match="prefetch_policy"):
        Prefetcher(lambda k, t: None, "eager", 1.0)


def test_wait_blocks_on_the_running_read_and_returns_at_once_without_one():
    release, first_ready = threading.Event(), threading.Event()
    p = Prefetcher(_blocking_fetch(release, first_ready), "wait_complete", 1.0)
    assert p.wait(10) is False  # no read: no wait
    assert p.poll(CHAIN, exists=lambda key: True) is None
    first_ready.wait(10)
    assert p.wait(0.01) is False  # page 12 still blocked
    threading.Timer(0.05, release.set).start()
    assert p.wait(10) is True  # woken by the read's end, not by the timeout
    assert p.poll(CHAIN, exists=lambda key: True) == ["page11", "page12"]
    assert p.wait(10) is False
    p.close()
