"""Keep the KV data plane (NIXL over UCX) on the interface the worker serves on.

UCX listens on every interface by default, so a stack bound to loopback still exposes its
agents (and registered KV memory) on the host's network. NIXL/UCX traffic cannot be wrapped in
TLS: the data plane needs a trusted network, and this narrows it to the configured interface.
Called once per process, before the first NIXL agent starts; an explicit UCX_NET_DEVICES wins.
"""
from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct

log = logging.getLogger(__name__)

_SIOCGIFADDR = 0x8915


def ipv4_of(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_of(host: str) -> str | None:
    """The network interface that owns `host` (an IPv4 address or a name), None if none does."""
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        return None
    if addr.is_unspecified:
        return None
    for _index, name in socket.if_nameindex():
        ip = ipv4_of(name)
        if ip is not None and (ipaddress.ip_address(ip) == addr or (addr.is_loopback and ip.startswith("127."))):
            return name
    return None


def bind_ucx_to_host(host: str) -> str | None:
    """Set UCX_NET_DEVICES to `host`'s interface (unless set already); returns what UCX uses."""
    if os.environ.get("UCX_NET_DEVICES"):
        return os.environ["UCX_NET_DEVICES"]
    device = interface_of(host)
    if device is None:
        log.warning("KV data plane (UCX) not bound: %r is no local interface's address, UCX listens on all "
                    "interfaces; set UCX_NET_DEVICES, and keep the data plane on a trusted network", host)
        return None
    os.environ["UCX_NET_DEVICES"] = device
    log.info("KV data plane (UCX) bound to interface %s (%s)", device, host)
    return device
