"""Worker discovery through etcd's v3 JSON gateway (plain HTTP, no etcd gRPC client).

Workers call `register_worker(...)`: a lease with a TTL, the worker's `WorkerInfo` (as JSON)
put under `<prefix><worker_id>` with that lease, and a keepalive thread. If the process dies,
the lease expires after the TTL and the key disappears; `close()` revokes the lease so the key
disappears at once. If the lease was lost (etcd restarted, long pause), the keepalive thread
grants a new one and puts the key again.

The router runs `EtcdWatcher.run()`: a range read of the prefix, then a watch from the next
revision; every change calls `on_change` with the full current {worker_id: WorkerInfo}.
On any error it waits and starts over with a fresh range read, so it converges after etcd
restarts or compactions.

Over https (etcd run with --client-cert-auth) both take a `ClientTls`: an ssl.SSLContext that
trusts etcd's CA and presents this process's client certificate, refreshed before each request
so rotated certificate files are used at the next handshake (tandem.server.tls.ClientTlsContext).

Why not etcd3gw, the maintained client of this same JSON gateway (it was declared and never
used; it is gone from the requirements): its watch runs in a thread pool and, when the
connection drops, that thread dies and the event iterator blocks forever with no error; a watch
cancelled by compaction is ignored the same way; and its range read drops the response header,
so a watch cannot resume from the revision after it without missing events. The router would
stop seeing workers after an etcd restart. It is also synchronous (requests) where the router
is asyncio. The two calls this needs (lease + put + keepalive, range + watch) stay here.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Protocol

import httpx
from google.protobuf import json_format
from tandem.v1 import common_pb2

log = logging.getLogger(__name__)


def _b64(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def prefix_range_end(prefix: str) -> bytes:
    """etcd range_end covering every key that starts with `prefix`."""
    b = bytearray(prefix.encode())
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[:i + 1])
    return b"\0"  # all keys


class ClientTls(Protocol):
    """TLS towards etcd: the context the HTTP client uses, and a hook that reloads changed files into it."""

    context: ssl.SSLContext

    def refresh(self) -> None: ...


def _check_endpoint(endpoint: str, tls: ClientTls | None) -> str:
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"etcd_endpoint={endpoint!r}: must be an http:// or https:// URL")
    if tls is not None and not endpoint.startswith("https://"):
        raise ValueError(f"etcd_endpoint={endpoint!r}: TLS files given for a plaintext endpoint (use https://)")
    return endpoint.rstrip("/")


def _verify(tls: ClientTls | None) -> ssl.SSLContext | bool:
    """httpx's `verify`: the TLS context, or the default (system roots for an https URL)."""
    return tls.context if tls is not None else True


def encode_worker(info: common_pb2.WorkerInfo) -> str:
    return json_format.MessageToJson(info, indent=None)


def decode_worker(raw: bytes) -> common_pb2.WorkerInfo:
    return json_format.Parse(raw.decode(), common_pb2.WorkerInfo(), ignore_unknown_fields=True)


REGISTER_TIMEOUT_S = 10.0  # each request of a (re-)registration: grant the lease, put the key


class Registration:
    """A worker's registration; keep it alive for the life of the worker, then `close()`."""

    def __init__(self, endpoint: str, key: str, value: str, ttl: float, tls: ClientTls | None = None) -> None:
        if ttl < 1:
            raise ValueError(f"ttl={ttl}: must be >= 1 second (etcd leases have second granularity)")
        self.endpoint = _check_endpoint(endpoint, tls)
        self.tls = tls
        self.key = key
        self.value = value
        self.ttl = int(round(ttl))
        self.lease_id: str | None = None
        self._http = httpx.Client(base_url=self.endpoint, timeout=max(1.0, self.ttl / 3), verify=_verify(tls))
        self._stop = threading.Event()
        try:
            self._register()
        except httpx.HTTPError as e:
            self._http.close()
            raise ConnectionError(f"cannot register {key} at etcd {self.endpoint}: {e}") from e
        self._thread = threading.Thread(target=self._keepalive_loop, name=f"etcd-keepalive {key}", daemon=True)
        self._thread.start()

    def _post(self, path: str, body: dict, timeout: float | None = None) -> dict:
        if self.tls is not None:
            self.tls.refresh()
        r = self._http.post(path, json=body, timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout)
        r.raise_for_status()
        return r.json()

    def _register(self) -> None:
        # Not bounded by the TTL as keepalives are (a lease's TTL starts when it is granted): a loaded
        # etcd that takes over ttl/3 to grant it must not fail a worker's start (seen with --etcd-ttl 2).
        wait = max(REGISTER_TIMEOUT_S, self.ttl / 3)
        self.lease_id = self._post("/v3/lease/grant", {"TTL": self.ttl}, timeout=wait)["ID"]
        self._post("/v3/kv/put", {"key": _b64(self.key), "value": _b64(self.value), "lease": self.lease_id},
                   timeout=wait)
        log.info("registered %s in etcd (lease %s, ttl %ss)", self.key, self.lease_id, self.ttl)

    def _keepalive_loop(self) -> None:
        interval = max(0.3, self.ttl / 3)
        while not self._stop.wait(interval):
            try:
                res = self._post("/v3/lease/keepalive", {"ID": self.lease_id}).get("result", {})
                if int(res.get("TTL", 0)) <= 0:
                    log.warning("etcd lease %s of %s expired; registering again", self.lease_id, self.key)
                    self._register()
            except (httpx.HTTPError, ValueError) as e:
                log.warning("etcd keepalive of %s failed: %s", self.key, e)

    def close(self) -> None:
        """Stop the keepalive and revoke the lease (the key disappears at once)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._post("/v3/lease/revoke", {"ID": self.lease_id})
        except (httpx.HTTPError, ValueError) as e:
            log.warning("etcd revoke of %s failed (the key expires with its lease): %s", self.key, e)
        self._http.close()

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def register_worker(etcd_endpoint: str, prefix: str, info: common_pb2.WorkerInfo, ttl: float = 5.0,
                    tls: ClientTls | None = None) -> Registration:
    """Register a worker under `<prefix><worker_id>` with a lease of `ttl` seconds, kept alive
    by a background thread. Raises ConnectionError when etcd cannot be reached or refuses the
    TLS handshake."""
    if not info.worker_id or not info.address:
        raise ValueError("WorkerInfo needs worker_id and address to be registered")
    return Registration(etcd_endpoint, prefix + info.worker_id, encode_worker(info), ttl, tls)


OnChange = Callable[[dict[str, common_pb2.WorkerInfo]], None | Awaitable[None]]


class EtcdWatcher:
    """Keeps {worker_id: WorkerInfo} in sync with the keys under `prefix`."""

    def __init__(self, endpoint: str, prefix: str, on_change: OnChange, retry_delay: float = 0.5,
                 tls: ClientTls | None = None) -> None:
        self.endpoint = _check_endpoint(endpoint, tls)
        self.tls = tls
        self.prefix = prefix
        self.on_change = on_change
        self.retry_delay = retry_delay
        self.workers: dict[str, common_pb2.WorkerInfo] = {}
        self._by_key: dict[bytes, str] = {}
        self.synced = asyncio.Event()

    async def _emit(self) -> None:
        res = self.on_change(dict(self.workers))
        if asyncio.iscoroutine(res):
            await res

    def _apply_kv(self, kv: dict) -> None:
        key = _unb64(kv["key"])
        try:
            info = decode_worker(_unb64(kv.get("value", "")))
        except (json_format.ParseError, UnicodeDecodeError) as e:
            log.warning("ignoring malformed worker registration %r: %s", key, e)
            return
        if not info.worker_id or not info.address:
            log.warning("ignoring worker registration %r without worker_id/address", key)
            return
        self._by_key[key] = info.worker_id
        self.workers[info.worker_id] = info

    def _delete_key(self, key: bytes) -> None:
        wid = self._by_key.pop(key, None)
        if wid is not None:
            self.workers.pop(wid, None)

    async def run(self) -> None:
        key_b64 = _b64(self.prefix)
        end_b64 = _b64(prefix_range_end(self.prefix))
        timeout = httpx.Timeout(5.0, read=None)
        async with httpx.AsyncClient(base_url=self.endpoint, timeout=timeout, verify=_verify(self.tls)) as http:
            while True:
                try:
                    if self.tls is not None:
                        self.tls.refresh()
                    r = await http.post("/v3/kv/range", json={"key": key_b64, "range_end": end_b64})
                    r.raise_for_status()
                    body = r.json()
                    self.workers.clear()
                    self._by_key.clear()
                    for kv in body.get("kvs", []):
                        self._apply_kv(kv)
                    await self._emit()
                    self.synced.set()
                    start = int(body["header"]["revision"]) + 1
                    req = {"create_request": {"key": key_b64, "range_end": end_b64, "start_revision": start}}
                    async with http.stream("POST", "/v3/watch", json=req) as resp:
                        resp.raise_for_status()
                        async for line in resp.aiter_lines():
                            if not line.strip():
                                continue
                            result = json.loads(line).get("result", {})
                            if result.get("canceled"):
                                raise RuntimeError(f"watch canceled: {result.get('cancel_reason', 'compacted')}")
                            events = result.get("events", [])
                            for ev in events:
                                if ev.get("type") == "DELETE":
                                    self._delete_key(_unb64(ev["kv"]["key"]))
                                else:
                                    self._apply_kv(ev["kv"])
                            if events:
                                await self._emit()
                    raise RuntimeError("watch stream ended")
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # etcd down, restarted, compacted: start over
                    log.warning("etcd watch of %s at %s: %s; retrying", self.prefix, self.endpoint, e)
                    await asyncio.sleep(self.retry_delay)
