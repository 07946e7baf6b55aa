"""Discovery as a trust boundary: etcd over TLS with client-certificate auth (--client-cert-auth).
A worker with a certificate of the CA registers and the router serves through it; a client
without one, or with another CA's, cannot write a key (etcd ends the TLS handshake) and the router
never sees it; rotated client certificate files are used at the next connection."""
from __future__ import annotations

import asyncio
import os
import shutil

import httpx
import pytest
from routing_fake_worker import FakeWorker
from tandem.config import RouterConfig
from tandem.router.app import build_router
from tandem.routing.discovery import EtcdWatcher, _b64, register_worker
from tandem.server.tls import ClientTlsContext, TlsFiles
from tandem.v1 import common_pb2

from tests.support.pki import client_context
from tests.support.waiting import wait_for

PREFIX = "/tandem-test/etcd-tls/"


def _info(wid: str, address: str = "127.0.0.1:1") -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(worker_id=wid, address=address, role="agg", model="m")


def _etcd_flags(files: TlsFiles) -> dict[str, str]:
    return {"etcd_ssl_certfile": files.certfile, "etcd_ssl_keyfile": files.keyfile,
            "etcd_ssl_ca_certs": files.ca_certs}


def test_worker_with_ca_certificate_serves_rogue_writers_refused(etcd_tls, tiny_model_dir, hf_tokenizer):
    pki, prefix = etcd_tls.pki, PREFIX + "serve/"
    worker = FakeWorker(hf_tokenizer("ok")["input_ids"])
    reg = register_worker(etcd_tls.endpoint, prefix, _info("good", worker.address), ttl=5,
                          tls=ClientTlsContext(pki.files("worker")))
    app = build_router(RouterConfig(model_path=tiny_model_dir, discovery="etcd", etcd_endpoint=etcd_tls.endpoint,
                                    etcd_prefix=prefix, http_port=0, health_check_interval=0.1,
                                    **_etcd_flags(pki.files("router"))))
    app.start()
    regs = [reg]
    try:
        pool = app.core.pool
        wait_for(lambda: set(pool.workers) == {"good"} and pool.workers["good"].healthy, what="good worker used")
        body = {"model": app.model_name, "prompt": "x", "max_tokens": 2}
        assert httpx.post(f"http://{app.http_address}/v1/completions", json=body, timeout=10).status_code == 200
        assert len(worker.servicer.requests) == 1

        # Rogue writers: no client certificate, one of another CA (trusting etcd's CA, which is
        # public), plaintext. etcd ends each connection before the put is read.
        put = {"key": _b64(prefix + "rogue"), "value": _b64('{"workerId":"rogue","address":"127.0.0.1:2"}')}
        ca = str(pki.ca.cert_path)
        for verify in (client_context(None, ca), client_context(pki.rogue("rogue-client"), ca)):
            with pytest.raises(httpx.HTTPError, match="BAD_CERTIFICATE|CERTIFICATE_REQUIRED"):
                httpx.post(etcd_tls.endpoint + "/v3/kv/put", json=put, verify=verify, timeout=5)
        with pytest.raises(httpx.HTTPError):
            httpx.post(etcd_tls.endpoint.replace("https://", "http://") + "/v3/kv/put", json=put, timeout=5)
        rogue = pki.rogue("rogue-worker")
        rogue_tls = ClientTlsContext(TlsFiles(rogue.certfile, rogue.keyfile, ca))
        with pytest.raises(ConnectionError, match="cannot register"):
            register_worker(etcd_tls.endpoint, prefix, _info("rogue"), ttl=5, tls=rogue_tls)
        assert etcd_tls.keys(prefix) == [prefix + "good"]
        # The router's watch is ordered: once it sees a later registration, it has seen every earlier one.
        regs.append(register_worker(etcd_tls.endpoint, prefix, _info("later"), ttl=5,
                                    tls=ClientTlsContext(pki.files("worker-2"))))
        wait_for(lambda: "later" in pool.workers, what="the later registration seen")
        assert set(pool.workers) == {"good", "later"}
    finally:
        for r in regs:
            r.close()
        app.stop()
        worker.stop()


def test_client_certificate_files_reloaded_when_changed(etcd_tls, tmp_path):
    """The watcher starts with a rogue certificate in its files (refused); once the files hold a
    certificate of the CA, its next attempt connects with them, without a restart."""
    pki, prefix = etcd_tls.pki, PREFIX + "reload/"
    good, rogue = pki.files("rotated"), pki.rogue("stale")
    live = TlsFiles(str(tmp_path / "client.pem"), str(tmp_path / "client-key.pem"), str(pki.ca.cert_path))
    shutil.copy(rogue.certfile, live.certfile)
    shutil.copy(rogue.keyfile, live.keyfile)
    tls = ClientTlsContext(live)
    seen: list[set[str]] = []
    reg = register_worker(etcd_tls.endpoint, prefix, _info("w"), ttl=5, tls=ClientTlsContext(pki.files("w")))

    async def scenario() -> None:
        watcher = EtcdWatcher(etcd_tls.endpoint, prefix, lambda infos: seen.append(set(infos)), retry_delay=0.1,
                              tls=tls)
        task = asyncio.create_task(watcher.run())
        try:
            with pytest.raises(TimeoutError):  # refused while the files hold the rogue certificate
                await asyncio.wait_for(watcher.synced.wait(), 1.0)
            shutil.copy(good.certfile, live.certfile)
            shutil.copy(good.keyfile, live.keyfile)
            os.utime(live.certfile, ns=(1, 1))  # the mtime surely differs from the loaded one
            await asyncio.wait_for(watcher.synced.wait(), 10)
        finally:
            task.cancel()

    try:
        asyncio.run(scenario())
    finally:
        reg.close()
    assert seen == [{"w"}] and tls.reloads == 1
