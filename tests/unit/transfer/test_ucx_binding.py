"""UCX (under NIXL) listens only on the worker's interface: on loopback, nothing reaches it from
the network (without the binding it listens on every interface)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

from tandem.transfer.ucx_binding import interface_of, ipv4_of

PROBE = textwrap.dedent("""
    import json, os, socket, struct, sys
    from tandem.transfer.ucx_binding import bind_ucx_to_host
    if sys.argv[1] != "-":
        bind_ucx_to_host(sys.argv[1])
    import torch
    from nixl._api import nixl_agent, nixl_agent_config
    agent = nixl_agent("probe", nixl_agent_config(backends=["UCX"]))
    agent.register_memory(agent.get_reg_descs([torch.zeros(1024)]))
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if link.startswith("socket:"):
            inodes.add(link[8:-1])
    listening = []
    for row in open("/proc/net/tcp").read().splitlines()[1:]:
        f = row.split()
        if f[3] == "0A" and f[9] in inodes:  # LISTEN, one of ours
            listening.append(socket.inet_ntoa(struct.pack("<I", int(f[1].split(":")[0], 16))))
    print(json.dumps({"devices": os.environ.get("UCX_NET_DEVICES"), "listening": listening}))
""")


def _probe(host: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
    out = subprocess.run([sys.executable, "-c", PROBE, host], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_interface_of():
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("localhost") == "lo"
    assert interface_of("0.0.0.0") is None
    assert interface_of("203.0.113.77") is None  # TEST-NET-3: no interface here has it


def test_nixl_agent_listens_on_loopback_only():
    bound = _probe("127.0.0.1")
    assert bound["devices"] == "lo"
    assert bound["listening"] and all(ip.startswith("127.") for ip in bound["listening"]), bound
    # Unbound, UCX also listens on the host's other interfaces (when it has any): what the binding prevents.
    others = [ip for _i, name in socket.if_nameindex() if (ip := ipv4_of(name)) and not ip.startswith("127.")]
    unbound = _probe("-")
    if others:
        assert any(not ip.startswith("127.") for ip in unbound["listening"]), unbound
