"""The router's send-stall watchdog on its own: an HTTP connection whose client takes no byte
while writing is paused is aborted once; one that keeps taking bytes never is; the gRPC send
window holds back the producer and raises SendStalled only while a send makes no progress;
n > 1 samples run at most the merge window ahead of a stalled consumer.
(The real processes: tests/integration/test_stalled_clients.py.)"""
from __future__ import annotations

import asyncio

import pytest
from tandem.router.stall import SendStalled, SendWindow, WriteStallGuard

TIMEOUT = 0.2


class Events:
    def __init__(self) -> None:
        self.waits = 0
        self.stalls: list[tuple[str, str]] = []

    def write_waited(self) -> None:
        self.waits += 1

    def stalled(self, peer: str, waiting: str) -> None:
        self.stalls.append((peer, waiting))


class Transport:
    """Its write buffer shrinks by ``drain`` bytes each time it is looked at."""

    def __init__(self, size: int, drain: int) -> None:
        self.size, self.drain = size, drain
        self.aborted = 0

    def get_write_buffer_size(self) -> int:
        self.size = max(0, self.size - self.drain)
        return self.size

    def get_extra_info(self, name: str):
        return ("127.0.0.1", 4242) if name == "peername" else None

    def is_closing(self) -> bool:
        return self.aborted > 0

    def abort(self) -> None:
        self.aborted += 1


async def watch(transport: Transport, checks_worth: float) -> Events:
    events = Events()
    guard = WriteStallGuard(transport, TIMEOUT, events, asyncio.get_running_loop())
    guard.paused()
    await asyncio.sleep(checks_worth * TIMEOUT)
    guard.resumed()
    return events


def test_a_client_that_takes_nothing_is_dropped_once():
    transport = Transport(200_000, drain=0)
    events = asyncio.run(watch(transport, checks_worth=4))
    assert events.waits == 1
    assert events.stalls == [("127.0.0.1:4242", "200000 bytes")]
    assert transport.aborted == 1


def test_a_client_that_keeps_taking_bytes_is_never_dropped():
    transport = Transport(10_000_000, drain=100)  # ~100 bytes per check: slow, but progress
    events = asyncio.run(watch(transport, checks_worth=4))
    assert events.stalls == [] and transport.aborted == 0


def test_no_timeout_counts_the_wait_and_never_drops():
    async def run():
        events = Events()
        transport = Transport(200_000, drain=0)
        guard = WriteStallGuard(transport, 0, events, asyncio.get_running_loop())
        guard.paused()
        await asyncio.sleep(4 * TIMEOUT)
        return events, transport

    events, transport = asyncio.run(run())
    assert events.waits == 1 and events.stalls == [] and transport.aborted == 0


def writer(window: SendWindow, sent: list, release: asyncio.Event) -> asyncio.Task:
    """The call's handler: takes items; the first write blocks until ``release``."""
    async def run():
        async for item in window.items():
            sent.append(item)
            await release.wait()

    return asyncio.create_task(run())


def test_send_window_bounds_the_producer_and_detects_a_stalled_send():
    async def run():
        waits = []
        window = SendWindow(2, TIMEOUT, lambda: waits.append(1))
        sent: list = []
        release = asyncio.Event()
        t = writer(window, sent, release)
        with pytest.raises(SendStalled):
            for i in range(10):
                await window.put(i)
        release.set()
        window.close()
        await asyncio.wait_for(t, 5)
        return waits, sent

    waits, sent = asyncio.run(run())
    # Item 0 is being written (blocked), item 1 fills the window of two, the third put waits and stalls.
    assert waits == [1]
    assert sent == [0, 1]


def test_send_window_without_timeout_waits_for_a_slow_writer():
    async def run():
        window = SendWindow(2, 0, lambda: None)
        sent: list = []
        release = asyncio.Event()
        t = writer(window, sent, release)
        await window.put("a")
        await window.put("b")
        blocked = asyncio.ensure_future(window.put("c"))
        done, _ = await asyncio.wait({blocked}, timeout=4 * TIMEOUT)
        assert not done  # held back, never dropped
        release.set()
        await blocked
        window.close(last=RuntimeError("end"))
        await asyncio.wait_for(t, 5)
        return sent

    sent = asyncio.run(run())
    assert sent[:3] == ["a", "b", "c"] and isinstance(sent[3], RuntimeError)


def test_n_samples_run_at_most_the_merge_window_ahead_of_a_stalled_consumer(tiny_model_dir):
    """n > 1: while the consumer (the client's stream) takes nothing, the samples' worker streams
    are no longer read once MERGED_DELTAS_WAITING deltas wait; they go on when it reads."""
    from prometheus_client import CollectorRegistry
    from tandem.config import RouterConfig
    from tandem.router.core import MERGED_DELTAS_WAITING, Delta, Prepared, RouterCore
    from tandem.router.metrics import RouterMetrics
    from tandem.routing.policies import Decision
    from tandem.routing.tokenizer import RouterTokenizer
    from tandem.sampling import SamplingParams

    pulled: list[int] = []
    per_sample = 500

    class EndlessWorkers(RouterCore):
        async def _run_sample(self, prep, index, deadline, pin=None):  # each sample: a worker stream
            prep.decision = Decision("w")
            for k in range(per_sample):
                pulled.append(index)
                yield Delta("x", [1], [], index=index, finish_reason=1 if k == per_sample - 1 else 0)

    cfg = RouterConfig(model_path=tiny_model_dir, workers=[])
    core = EndlessWorkers(cfg, RouterTokenizer(tiny_model_dir), RouterMetrics(CollectorRegistry(), "m"), "m")
    n = 4

    async def run():
        deltas = core.run(Prepared("r", [1, 2], SamplingParams(max_tokens=per_sample), n=n))
        await deltas.__anext__()
        for _ in range(200):  # the consumer stalls; every pump gets many turns
            await asyncio.sleep(0)
        held_back = len(pulled)
        rest = [d async for d in deltas]
        return held_back, 1 + len(rest)

    held_back, received = asyncio.run(run())
    assert held_back <= MERGED_DELTAS_WAITING + n + 1  # waiting + one per pump in hand + the one consumed
    assert received == n * per_sample
