"""Start a real etcd (Debian's etcd-server) on loopback in a temp dir, for discovery tests;
with a `Pki`, over TLS with client-certificate auth (etcd's --client-cert-auth)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

from tests.support.pki import Pki, client_context
from tests.support.ports import free_port
from tests.support.system_tools import ensure_tool


def _free_port() -> int:
    return free_port()


class EtcdServer:
    def __init__(self, data_dir: str, pki: Pki | None = None) -> None:
        self.binary = ensure_tool("etcd")
        self.client_port, self.peer_port = _free_port(), _free_port()
        self.pki = pki
        self.tls_flags: list[str] = []
        self.verify = True  # httpx's verify for the test's own reads
        if pki is not None:
            server = pki.files("etcd-server")
            self.tls_flags = ["--cert-file", server.certfile, "--key-file", server.keyfile,
                              "--client-cert-auth", "--trusted-ca-file", server.ca_certs]
            self.verify = client_context(pki.files("etcd-test-client"))
        self.endpoint = f"{'https' if pki else 'http'}://127.0.0.1:{self.client_port}"
        self.data_dir = data_dir
        self.log_path = os.path.join(data_dir, "etcd.log")
        self._start(os.path.join(data_dir, "data"))

    def restart(self, wipe: bool = False) -> None:
        """Start again on the same ports (after stop()); `wipe`: with an empty data dir, every
        key and lease gone, as a replaced etcd."""
        self._start(os.path.join(self.data_dir, f"data-{time.monotonic_ns()}" if wipe else "data"))

    def _start(self, data: str) -> None:
        binary, peer = self.binary, self.peer_port
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen([
            binary, "--name", "test", "--data-dir", data,
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer}", *self.tls_flags,
        ], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.endpoint + "/health", timeout=1, verify=self.verify).json().get("health") == "true":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd did not start: {Path(self.log_path).read_text()[-2000:]}")
            time.sleep(0.1)

    def keys(self, prefix: str) -> list[str]:
        from tandem.routing.discovery import _b64, _unb64, prefix_range_end
        r = httpx.post(self.endpoint + "/v3/kv/range",
                       json={"key": _b64(prefix), "range_end": _b64(prefix_range_end(prefix))}, timeout=5,
                       verify=self.verify)
        return sorted(_unb64(kv["key"]).decode() for kv in r.json().get("kvs", []))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
