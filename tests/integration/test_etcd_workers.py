"""Workers register themselves in a real etcd; a router with --discovery etcd finds them,
serves through them, and drops one that stops."""
from __future__ import annotations

import httpx

from tests.support.procs import start_service
from tests.support.waiting import wait_for

MODEL = "models/tandem-demo-dense"
PREFIX = "/tandem-it/workers/"


def completion(http: str) -> httpx.Response:
    return httpx.post(f"http://{http}/v1/completions", timeout=60,
                      json={"model": "tandem-demo-dense", "prompt": "Hello there", "max_tokens": 4})


def test_worker_registered_in_etcd_is_used_then_dropped(etcd):
    router = start_service("tandem.router", "--model-path", MODEL, "--http-port", "0", "--discovery", "etcd",
                           "--etcd-endpoint", etcd.endpoint, "--etcd-prefix", PREFIX)
    worker = None
    try:
        http = router.info["http"]
        assert completion(http).status_code == 503  # nobody registered yet
        worker = start_service("tandem.decode", "--model-path", MODEL, "--max-total-tokens", "4096",
                               "--etcd-endpoint", etcd.endpoint, "--etcd-prefix", PREFIX, "--etcd-ttl", "2")
        assert etcd.keys(PREFIX) == [PREFIX + worker.grpc_address]
        wait_for(lambda: completion(http).status_code == 200, 20, "the router to serve through the worker")
        worker.stop()
        assert etcd.keys(PREFIX) == []  # deregistered on graceful stop
        wait_for(lambda: completion(http).status_code == 503, 20, "the router to drop the stopped worker")
    finally:
        if worker:
            worker.stop()
        router.stop()
