"""etcd discovery against a real etcd on loopback: registration, lease expiry, watch, and the
router picking up and dropping workers."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
from routing_fake_worker import FakeWorker
from tandem.config import RouterConfig
from tandem.router.app import build_router
from tandem.routing.discovery import EtcdWatcher, prefix_range_end, register_worker
from tandem.v1 import common_pb2

from tests.support.waiting import wait_for

PREFIX = "/tandem-test/workers/"


def info(wid, addr="127.0.0.1:1"):
    return common_pb2.WorkerInfo(worker_id=wid, address=addr, role="agg", model="m")


def test_prefix_range_end():
    assert prefix_range_end("/a/") == b"/a0"
    assert prefix_range_end("a\xff") != b""


def test_register_and_close(etcd):
    reg = register_worker(etcd.endpoint, PREFIX, info("w1"), ttl=2)
    assert etcd.keys(PREFIX) == [PREFIX + "w1"]
    time.sleep(3)  # longer than the TTL: the keepalive keeps it
    assert etcd.keys(PREFIX) == [PREFIX + "w1"]
    reg.close()
    assert etcd.keys(PREFIX) == []


def test_a_slow_lease_grant_does_not_fail_the_registration():
    """A loaded etcd granting the lease later than ttl/3 (the keepalive's bound): registering still
    succeeds (it failed a worker's start in a loaded make test with --etcd-ttl 2)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class SlowEtcd(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.path)
            if self.path == "/v3/lease/grant":
                time.sleep(1.5)  # longer than ttl/3 = 0.67 s and the old 1 s floor
            body = {"ID": "7", "TTL": "2", "result": {"TTL": "2"}}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowEtcd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reg = register_worker(f"http://127.0.0.1:{server.server_address[1]}", PREFIX, info("w1"), ttl=2)
        assert reg.lease_id == "7"
        reg.close()
    finally:
        server.shutdown()
    assert seen[:2] == ["/v3/lease/grant", "/v3/kv/put"] and seen[-1] == "/v3/lease/revoke"


def test_lease_expires_when_worker_dies(etcd):
    script = textwrap.dedent(f"""
        import time
        from tandem.routing.discovery import register_worker
        from tandem.v1 import common_pb2
        register_worker({etcd.endpoint!r}, {PREFIX!r},
                        common_pb2.WorkerInfo(worker_id="dying", address="127.0.0.1:2"), ttl=1)
        print("registered", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "registered"
        assert PREFIX + "dying" in etcd.keys(PREFIX)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        wait_for(lambda: PREFIX + "dying" not in etcd.keys(PREFIX), timeout=10, what="lease expiry")
    finally:
        proc.kill()


def test_bad_endpoint_errors():
    with pytest.raises(ValueError, match="etcd_endpoint"):
        register_worker("127.0.0.1:2379", PREFIX, info("x"))
    with pytest.raises(ConnectionError, match="cannot register"):
        register_worker("http://127.0.0.1:9", PREFIX, info("x"))
    with pytest.raises(ValueError, match="worker_id and address"):
        register_worker("http://127.0.0.1:9", PREFIX, common_pb2.WorkerInfo())


def test_watcher_sees_puts_and_deletes(etcd):
    seen: list[set] = []
    prefix = PREFIX + "watch/"
    pre = register_worker(etcd.endpoint, prefix, info("a"), ttl=5)

    async def main():
        watcher = EtcdWatcher(etcd.endpoint, prefix, lambda ws: seen.append(set(ws)))
        task = asyncio.create_task(watcher.run())
        await asyncio.wait_for(watcher.synced.wait(), 10)
        reg = await asyncio.to_thread(register_worker, etcd.endpoint, prefix, info("b"), 5)
        await asyncio.to_thread(wait_for, lambda: seen and seen[-1] == {"a", "b"}, 10, "b added")
        await asyncio.to_thread(reg.close)
        await asyncio.to_thread(wait_for, lambda: seen[-1] == {"a"}, 10, "b removed")
        task.cancel()

    try:
        asyncio.run(main())
    finally:
        pre.close()
    assert seen[0] == {"a"}


def test_router_uses_worker_registered_later_and_drops_closed(etcd, tiny_model_dir):
    prefix = PREFIX + "router/"
    w1, w2 = FakeWorker([65, 66]), FakeWorker([67, 68])
    app = build_router(RouterConfig(model_path=tiny_model_dir, discovery="etcd", etcd_endpoint=etcd.endpoint,
                                    etcd_prefix=prefix, http_port=0, health_check_interval=0.1))
    app.start()
    regs = []
    try:
        base = f"http://{app.http_address}"
        body = {"model": app.model_name, "prompt": "x", "max_tokens": 2}
        assert httpx.post(base + "/v1/completions", json=body).status_code == 503
        regs.append(register_worker(etcd.endpoint, prefix, info("w1", w1.address), ttl=2))
        wait_for(lambda: len(app.core.pool.healthy()) == 1, what="w1 in rotation")
        assert httpx.post(base + "/v1/completions", json=body).status_code == 200
        regs.append(register_worker(etcd.endpoint, prefix, info("w2", w2.address), ttl=2))
        wait_for(lambda: len(app.core.pool.healthy()) == 2, what="w2 in rotation")
        for _ in range(4):
            assert httpx.post(base + "/v1/completions", json=body).status_code == 200
        assert w2.servicer.requests  # the late worker gets traffic
        regs[0].close()
        wait_for(lambda: set(app.core.pool.workers) == {"w2"}, what="w1 dropped")
        n1 = len(w1.servicer.requests)
        for _ in range(3):
            assert httpx.post(base + "/v1/completions", json=body).status_code == 200
        assert len(w1.servicer.requests) == n1
    finally:
        for r in regs:
            r.close()
        app.stop()
        w1.stop()
        w2.stop()
