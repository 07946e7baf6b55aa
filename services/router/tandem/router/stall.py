"""Send-stall watchdog: a stream whose client takes no data for ``--stream-stall-timeout``
seconds is dropped, and with it the worker's request (so the worker frees its KV pages).

A client that stops reading is invisible until the buffers between it and the router are full
(on loopback the kernel's socket buffers alone hold megabytes); from then on the router's writes
wait. "Stalled" means: output is waiting to be written and the client has taken none of it for
the timeout. A slow client that keeps taking data, however slowly, is never dropped, and a
stream that waits for its worker is not stalled (nothing waits to be written).

- HTTP (uvicorn): the connection's protocol watches its transport while asyncio has paused
  writing (write buffer above the high-water mark); progress is the bytes not yet acknowledged
  by the client going down: the transport's buffer plus the socket's send queue (``SIOCOUTQ``).
- gRPC (the ``grpc.aio`` server, on the router's loop): ``SendWindow`` hands chunks from the
  task that reads the worker's stream to the call's handler that writes them, at most ``size``
  unsent, so a stalled client holds back the worker's stream through flow control instead of
  filling a queue; progress is a message write completing. A stalled stream's worker request is
  cancelled at once; its call ends with CANCELLED (the chunks not yet written are dropped) once
  the write in progress completes or the client goes away (``grpc.aio`` servers cannot reset one
  stream: the call's memory is bounded by the stream's flow-control window).
"""
from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import sys
import termios
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

_END = object()


def check_interval(timeout: float) -> float:
    """How often a paused writer is looked at: a quarter of the timeout, between 10 ms and 1 s."""
    return min(1.0, max(0.01, timeout / 4))


def unacknowledged_bytes(transport: asyncio.Transport) -> int:
    """Bytes written but not yet taken by the peer: the transport's buffer plus the kernel's send
    queue (Linux ``SIOCOUTQ``: unsent and unacknowledged); the buffer alone where that is unknown."""
    pending = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is None:
        return pending
    try:
        out = bytearray(4)
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, out)  # TIOCOUTQ == SIOCOUTQ on sockets
        return pending + int.from_bytes(out, sys.byteorder, signed=True)
    except OSError:
        return pending


def reset_on_close(transport: asyncio.Transport) -> None:
    """Closing the socket then resets the connection (SO_LINGER 0) and frees what its send buffer
    holds; a plain close would leave the kernel trying to deliver it to the stalled client."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


class StallEvents(Protocol):
    def write_waited(self) -> None:
        """A stream's writes began to wait for its client."""

    def stalled(self, peer: str, waiting: str) -> None:
        """A stream is dropped: its client took nothing for the timeout (once per stream)."""


class WriteStallGuard:
    """Watches one connection's transport while writing is paused; after ``timeout`` seconds
    (0: never) in which the client took no byte, reports ``events.stalled`` once and aborts the
    connection (the server then sees the client gone and cancels the request)."""

    def __init__(self, transport: asyncio.Transport, timeout: float, events: StallEvents,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.timeout = timeout
        self.events = events
        self.loop = loop
        self.stalled = False
        self._timer: asyncio.TimerHandle | None = None
        self._since = 0.0
        self._waiting = 0

    def paused(self) -> None:
        self.events.write_waited()
        if self._timer is not None or self.stalled or not self.timeout:
            return
        self._since = self.loop.time()
        self._waiting = unacknowledged_bytes(self.transport)
        self._timer = self.loop.call_later(check_interval(self.timeout), self._check)

    def resumed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        waiting = unacknowledged_bytes(self.transport)
        if waiting < self._waiting:
            self._since = now
        self._waiting = waiting
        if now - self._since >= self.timeout:
            self.stalled = True
            peer = self.transport.get_extra_info("peername")
            self.events.stalled(f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer), f"{waiting} bytes")
            reset_on_close(self.transport)
            self.transport.abort()
            return
        self._timer = self.loop.call_later(min(check_interval(self.timeout), self._since + self.timeout - now),
                                           self._check)


def stall_guarded(protocol: type[asyncio.Protocol], timeout: float, events: StallEvents) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol class ``protocol`` whose connections are dropped
    when they stall (``uvicorn.Config(http=...)`` takes it)."""

    class StallGuardedProtocol(protocol):  # type: ignore[misc, valid-type]
        _stall_guard: WriteStallGuard | None = None

        def connection_made(self, transport) -> None:
            self._stall_guard = WriteStallGuard(transport, timeout, events, asyncio.get_running_loop())
            super().connection_made(transport)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stall_guard is not None:
                self._stall_guard.paused()

        def resume_writing(self) -> None:
            if self._stall_guard is not None:
                self._stall_guard.resumed()
            super().resume_writing()

        def connection_lost(self, exc) -> None:
            if self._stall_guard is not None:
                self._stall_guard.resumed()
            super().connection_lost(exc)

    StallGuardedProtocol.__name__ = f"StallGuarded{protocol.__name__}"
    return StallGuardedProtocol


class SendStalled(Exception):
    """No message send completed for the stall timeout while output was waiting."""


class SendWindow:
    """Chunks from a producer task (``put``) to the call's writer (``items``), both on one loop, at
    most ``size`` handed over and not yet written. ``put`` raises SendStalled once a write has been
    in progress for ``stall_timeout`` seconds (0: never) with the window full."""

    def __init__(self, size: int, stall_timeout: float, on_wait: Callable[[], None]) -> None:
        self.stall_timeout = stall_timeout
        self.on_wait = on_wait
        self._room = asyncio.Semaphore(size)
        self._q: asyncio.Queue = asyncio.Queue()
        self._sending_since: float | None = None  # set by the writer while a write is in progress

    async def put(self, item: object) -> None:
        """Hand over ``item``; waits while the window is full (reported once per wait to
        ``on_wait``), raises SendStalled when the client took nothing for the stall timeout."""
        if self._room.locked():
            self.on_wait()
        while True:
            try:
                async with asyncio.timeout(self._time_left()):
                    await self._room.acquire()
                break
            except TimeoutError:
                if self.stalled_for() >= self.stall_timeout:
                    raise SendStalled() from None
        self._q.put_nowait(item)

    def close(self, last: object = None, drop_pending: bool = False) -> None:
        """No more chunks; ``last`` (an error), when given, is handed over before the end;
        ``drop_pending``: the chunks not yet taken by the writer are dropped (a stalled stream)."""
        if drop_pending:
            while not self._q.empty():
                self._q.get_nowait()
        if last is not None:
            self._q.put_nowait(last)
        self._q.put_nowait(_END)

    def stalled_for(self) -> float:
        since = self._sending_since
        return 0.0 if since is None else time.monotonic() - since

    def _time_left(self) -> float | None:
        if not self.stall_timeout:
            return None
        return max(0.0, self.stall_timeout - self.stalled_for()) + 0.001

    async def items(self) -> AsyncIterator[object]:
        """Writer: each item in turn; asking for the next one says the previous was written."""
        while True:
            item = await self._q.get()
            if item is _END:
                return
            self._sending_since = time.monotonic()
            yield item
            self._sending_since = None
            self._room.release()
