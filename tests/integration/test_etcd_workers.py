"""Workers register themselves in a real etcd; a router with --discovery etcd finds them,
serves through them, and drops one that stops; the same over etcd with client-certificate auth."""
from __future__ import annotations

import httpx

from tests.support.pki import client_context
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


def test_etcd_down_and_back(etcd):
    """etcd stops: the router keeps its last view and serves on; etcd comes back empty (a
    replaced server): the worker registers again by itself and the router follows it. No page
    is left in use."""
    from tests.support.clients import pages_in_use

    prefix = PREFIX + "outage/"
    router = start_service("tandem.router", "--model-path", MODEL, "--http-port", "0", "--discovery", "etcd",
                           "--etcd-endpoint", etcd.endpoint, "--etcd-prefix", prefix)
    worker = start_service("tandem.decode", "--model-path", MODEL, "--max-total-tokens", "4096", "--skip-warmup",
                           "--etcd-endpoint", etcd.endpoint, "--etcd-prefix", prefix, "--etcd-ttl", "1")
    try:
        http = router.info["http"]
        wait_for(lambda: completion(http).status_code == 200, 30, "the router to serve through the worker")
        etcd.stop()
        # Longer than the lease TTL and several watch retries: the router keeps what it knew.
        for _ in range(5):
            assert completion(http).status_code == 200
        wait_for(lambda: "etcd keepalive" in worker.log() and "failed" in worker.log(), 20,
                 "the worker to notice etcd is gone")
        etcd.restart(wipe=True)
        wait_for(lambda: etcd.keys(prefix) == [prefix + worker.grpc_address], 30, "the worker to register again")
        assert "registering again" in worker.log()
        # The router's watch starts over on the new etcd (empty, then the worker's key).
        wait_for(lambda: completion(http).status_code == 200, 30, "the router to follow the new registration")
        for _ in range(3):
            assert completion(http).status_code == 200
        assert router.proc.poll() is None and worker.proc.poll() is None
        wait_for(lambda: pages_in_use(worker.grpc_address) == 0, 20, "no page in use")
    finally:
        worker.stop()
        router.stop()


def _flags(prefix: str, files) -> list[str]:
    return [f"--{prefix}-certfile", files.certfile, f"--{prefix}-keyfile", files.keyfile,
            f"--{prefix}-ca-certs", files.ca_certs]


def test_pd_stack_over_etcd_with_client_certificates(etcd_tls):
    """etcd requires client certificates: prefill and decode use their --ssl-* files for etcd too
    (the default), the router its own --etcd-ssl-* files. Prefill registers, decode finds it in
    etcd (--prefill-discovery etcd), the router finds decode; a request flows through all three."""
    pki, prefix = etcd_tls.pki, PREFIX + "tls/"
    common = ["--model-path", MODEL, "--etcd-endpoint", etcd_tls.endpoint, "--etcd-prefix", prefix]
    worker = [*common, "--max-total-tokens", "4096", "--skip-warmup", "--disaggregation-transfer-backend", "grpc"]
    procs = []
    try:
        prefill = start_service("tandem.prefill", *worker, *_flags("ssl", pki.files("prefill")))
        procs.append(prefill)
        decode = start_service("tandem.decode", *worker, "--disaggregation-mode", "decode",
                               "--prefill-discovery", "etcd", *_flags("ssl", pki.files("decode")))
        procs.append(decode)
        assert etcd_tls.keys(prefix) == sorted(prefix + p.grpc_address for p in (prefill, decode))
        procs.append(start_service("tandem.router", *common, "--http-port", "0", "--discovery", "etcd",
                                   *_flags("ssl", pki.files("router")), *_flags("etcd-ssl", pki.files("router-etcd"))))
        client = httpx.Client(verify=client_context(pki.files("client")), timeout=60)
        body = {"model": "tandem-demo-dense", "prompt": "Hello there", "max_tokens": 4}
        url = f"https://{procs[-1].info['http']}/v1/completions"
        wait_for(lambda: client.post(url, json=body).status_code == 200, 30, "the router to serve through decode")
        metrics = client.get(f"https://{prefill.system_address}/metrics").text
        assert any(line.startswith("sglang:prompt_tokens_total") and float(line.rsplit(" ", 1)[1]) > 0
                   for line in metrics.splitlines()), "the prompt was not prefilled on the prefill worker"
    finally:
        for p in reversed(procs):
            p.stop()
    assert etcd_tls.keys(prefix) == []  # deregistered on graceful stop, over TLS
