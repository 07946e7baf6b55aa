"""Ports for processes a test starts on a port it must name in advance (etcd, Prometheus, a
restarted worker): chosen below the kernel's ephemeral range (32768-60999 here), from which every
client connection and every port-0 server draws, so that nothing else on the machine can take one
between the choice and the bind. Random, so that the two test files `make test` runs at once
rarely pick the same one; and checked free when chosen."""
from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32700  # below /proc/sys/net/ipv4/ip_local_port_range's start


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct ports in [LOW, HIGH) that are free now."""
    rng = random.SystemRandom()
    found: list[int] = []
    for port in rng.sample(range(LOW, HIGH), min(HIGH - LOW, 50 * n + 100)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == n:
            return found
    raise RuntimeError(f"no {n} free ports in [{LOW}, {HIGH})")
