"""A raw HTTP client that can stop reading, for stalled- and slow-client tests and the soak.

On loopback the kernel's socket buffers would absorb a whole stream (megabytes), so the socket
advertises a tiny receive buffer and segment size before it connects: the server's send buffer
is sized from them, and a client that stops reading backs up the server's writes within ~100 KB."""
from __future__ import annotations

import json
import socket
import time

TCP_ESTABLISHED = 1  # tcp_info.tcpi_state (Linux)


def raw_http_stream(http: str, path: str, body: dict) -> socket.socket:
    """POST ``body`` to ``path`` at ``http`` (host:port) on such a socket; nothing read yet."""
    host, port = http.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: the advertised window
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.connect((host, int(port)))
    raw = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), http.encode(), len(raw), raw))
    return sock


def read_to_end(sock: socket.socket, sip: int = 1 << 16, pause: float = 0.0, timeout: float = 60) -> bytes:
    """Everything until the SSE stream's [DONE] or the server closes (or resets) the connection,
    ``sip`` bytes at a time with ``pause`` seconds between reads."""
    sock.settimeout(timeout)
    parts: list[bytes] = []
    while True:
        try:
            b = sock.recv(sip)
        except ConnectionResetError:
            break
        if not b:
            break
        parts.append(b)
        if b"data: [DONE]" in b"".join(parts[-2:]):
            break
        if pause:
            time.sleep(pause)
    return b"".join(parts)


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Without reading anything: whether the server closes or resets the connection (its TCP
    state leaves ESTABLISHED) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED:
            return True
        time.sleep(0.1)
    return False


def large_chat_stream(model: str, max_tokens: int, content: str = "Tell me a story.") -> dict:
    """A streaming chat request whose every token is ~1.7 KB of SSE (20 top logprobs)."""
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "logprobs": True, "top_logprobs": 20}
