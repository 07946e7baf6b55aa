"""The router over mTLS and with an API key: a rogue worker registered in etcd without a
certificate of the CA never gets a request; the OpenAI port serves HTTPS only to clients of the
CA; the API key (also from a file) guards HTTP and gRPC Router.Generate alike."""
from __future__ import annotations

import logging

import grpc
import httpx
import pytest
from routing_fake_worker import FakeWorker
from tandem.config import RouterConfig
from tandem.router.app import build_router
from tandem.routing.discovery import register_worker
from tandem.server.tls import TlsReloader
from tandem.v1 import common_pb2, router_pb2

from tests.support.grpc_router import router_stub
from tests.support.pki import client_context, make_pki
from tests.support.waiting import wait_for

PREFIX = "/tandem-test/security/"


def _info(wid: str, address: str) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(worker_id=wid, address=address, role="agg", model="m")


def test_rogue_worker_in_etcd_never_gets_a_request(etcd, tiny_model_dir, tmp_path, hf_tokenizer):
    pki = make_pki(tmp_path)
    ids = hf_tokenizer("ok")["input_ids"]
    good = FakeWorker(ids, server_credentials=TlsReloader(pki.files("worker")).server_credentials())
    # The rogue has a certificate of its own CA and accepts any client: all it lacks is the CA's signature.
    rogue_files = pki.rogue("rogue-worker")
    rogue = FakeWorker(ids, server_credentials=TlsReloader(
        type(rogue_files)(rogue_files.certfile, rogue_files.keyfile, None)).server_credentials())
    plain = FakeWorker(ids)  # and one that speaks plaintext
    prefix = PREFIX + "rogue/"
    regs = [register_worker(etcd.endpoint, prefix, _info(wid, w.address), ttl=5)
            for wid, w in (("good", good), ("rogue", rogue), ("plain", plain))]
    app = build_router(RouterConfig(model_path=tiny_model_dir, discovery="etcd", etcd_endpoint=etcd.endpoint,
                                    etcd_prefix=prefix, http_port=0, health_check_interval=0.1,
                                    **pki.flags("router")))
    app.start()
    try:
        pool = app.core.pool
        wait_for(lambda: set(pool.workers) == {"good", "rogue", "plain"}, what="all three discovered")
        wait_for(lambda: pool.workers["good"].healthy, what="good worker healthy")
        # Each refused worker failed several health checks (TLS handshake) and was never healthy.
        wait_for(lambda: all(pool.workers[w].failed_checks >= 3 for w in ("rogue", "plain")),
                 what="rogue and plaintext workers checked and refused")
        assert not pool.workers["rogue"].healthy and not pool.workers["plain"].healthy
        client = httpx.Client(verify=client_context(pki.files("client")), timeout=10)
        body = {"model": app.model_name, "prompt": "x", "max_tokens": 2}
        for _ in range(6):
            assert client.post(f"https://{app.http_address}/v1/completions", json=body).status_code == 200
        assert len(good.servicer.requests) == 6
        assert rogue.servicer.requests == [] and plain.servicer.requests == []
        # The OpenAI port itself: no client certificate, or a rogue one, is refused.
        for ctx in (client_context(None, pki.ca.cert_path), client_context(pki.rogue("c"), pki.ca.cert_path)):
            with pytest.raises(httpx.HTTPError):
                httpx.post(f"https://{app.http_address}/v1/completions", json=body, verify=ctx, timeout=5)
    finally:
        for r in regs:
            r.close()
        app.stop()
        for w in (good, rogue, plain):
            w.stop()


@pytest.mark.parametrize("from_file", [False, True])
def test_api_key_on_http_and_grpc(tiny_model_dir, tmp_path, hf_tokenizer, caplog, from_file):
    worker = FakeWorker(hf_tokenizer("ok")["input_ids"])
    key = "k-123"
    if from_file:
        (tmp_path / "key").write_text(key + "\n")
        auth = {"api_key_file": str(tmp_path / "key")}
    else:
        auth = {"api_key": key}
    app = build_router(RouterConfig(model_path=tiny_model_dir, workers=[worker.address], http_port=0,
                                    health_check_interval=0.1, **auth))
    app.start()
    try:
        wait_for(lambda: app.core.pool.healthy(), what="worker healthy")
        url = f"http://{app.http_address}/v1/completions"
        body = {"model": app.model_name, "prompt": "x", "max_tokens": 2}
        caplog.set_level(logging.WARNING, logger="tandem.server.auth")
        for _ in range(3):
            r = httpx.post(url, json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(url, json=body, headers={"authorization": "Bearer nope"}).status_code == 401
        assert httpx.post(url, json=body, headers={"authorization": f"Bearer {key}"}).status_code == 200
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1  # logged once per peer, not per request

        req = router_pb2.RouterGenerateRequest(text="x", sampling=common_pb2.SamplingParams(max_tokens=2))
        with router_stub(app) as stub:
            for metadata in (None, (("authorization", "Bearer nope"),), (("authorization", key),)):
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Generate(req, metadata=metadata, timeout=10))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            chunks = list(stub.Generate(req, metadata=(("authorization", f"Bearer {key}"),), timeout=10))
            assert chunks and chunks[-1].finish_reason
        assert len(worker.servicer.requests) == 2  # only the authenticated ones reached it
    finally:
        app.stop()
        worker.stop()


def test_api_key_config_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        RouterConfig(model_path=tiny_model_dir, api_key_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="give one"):
        (tmp_path / "k").write_text("a")
        RouterConfig(model_path=tiny_model_dir, api_key="a", api_key_file=str(tmp_path / "k"))
