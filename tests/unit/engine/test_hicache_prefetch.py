"""Storage prefetch: a chain's pages are read in parallel into reserved host pages; the policy
decides how long admission waits; pages past the read prefix come back once no reader holds them."""
from __future__ import annotations

import threading

import pytest
from tandem.hicache.prefetch import Prefetcher

CHAIN = [(11, 0, (1,)), (12, 11, (2,)), (13, 12, (3,))]


def _chain():
    return list(CHAIN)


class Disk:
    """Page 11 reads at once; 12 and 13 (a miss) wait for ``release``."""

    def __init__(self):
        self.release, self.first_read, self.second_started = threading.Event(), threading.Event(), threading.Event()
        self.into: dict[int, int] = {}

    def read(self, key, parent, tokens, host_page) -> bool:
        if key == 12:
            self.second_started.set()
        if key != 11:
            assert self.release.wait(10)
        self.into[key] = host_page
        if key == 11:
            self.first_read.set()
        return key != 13


def _reserve(n):
    return [100 + i for i in range(n)]


@pytest.mark.parametrize("policy,timeout,waits", [("best_effort", 1.0, False), ("wait_complete", 1.0, True),
                                                  ("timeout", 1e9, True), ("timeout", 0.0, False)])
def test_policy_decides_whether_admission_waits(policy, timeout, waits):
    disk = Disk()
    p = Prefetcher(disk.read, policy, timeout, threads=3)
    first = p.poll(11, _chain, lambda key: True, _reserve)
    if waits:
        assert first is None
        assert disk.first_read.wait(10)
        assert p.poll(11, _chain, lambda key: True, _reserve) is None  # 12 still being read
        disk.release.set()
        assert p.wait(10)
        got = p.poll(11, _chain, lambda key: True, _reserve)
        assert got == [(11, (1,), 100), (12, (2,), 101)]  # stops at the first miss (13)
        assert p.reclaim() == [102]  # 13's page: read done, not handed out
        assert disk.into == {11: 100, 12: 101, 13: 102}
    else:
        assert first is not None and len(first) <= 1  # took what was read at once
        disk.release.set()
        assert len(first) + len(p.drain()) == 3  # every reserved page comes back (or was handed out)
    assert not p.busy
    p.close()


def test_nothing_in_storage_starts_no_read():
    p = Prefetcher(lambda *a: pytest.fail("no read expected"), "wait_complete", 1.0)
    assert p.poll(11, lambda: pytest.fail("no chain expected"), lambda key: False, _reserve) == []
    assert p.poll(11, _chain, lambda key: True, lambda n: []) == []  # no host page free: no read
    with pytest.raises(ValueError, match="prefetch_policy"):
        Prefetcher(lambda *a: None, "eager", 1.0)


def test_pages_of_an_abandoned_read_come_back_after_the_reader_is_done():
    disk = Disk()
    p = Prefetcher(disk.read, "wait_complete", 1.0, threads=1)
    assert p.poll(11, _chain, lambda key: True, _reserve) is None
    assert disk.second_started.wait(10)
    for _ in range(2000):  # nobody asks for it any more (its request left)
        p.tick()
    assert p.reclaim() == []  # the reader still works on page 12
    disk.release.set()
    assert sorted(p.drain()) == [100, 101, 102]
    p.close()


def test_wait_blocks_on_the_running_read_and_returns_at_once_without_one():
    disk = Disk()
    p = Prefetcher(disk.read, "wait_complete", 1.0)
    assert p.wait(10) is False  # no read: no wait
    assert p.poll(11, _chain, lambda key: True, _reserve) is None
    assert disk.first_read.wait(10)
    assert p.wait(0.01) is False  # page 12 still blocked
    threading.Timer(0.05, disk.release.set).start()
    assert p.wait(10) is True  # woken by the read's end, not by the timeout
    assert [k for k, _, _ in p.poll(11, _chain, lambda key: True, _reserve)] == [11, 12]
    assert p.wait(10) is False
    p.drain()
    p.close()
