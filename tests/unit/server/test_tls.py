"""TLS / mTLS on a real ServiceRuntime: gRPC and the system HTTP port refuse plaintext, missing
and foreign client certificates; certificates reload (SIGHUP, or changed files for gRPC)
without dropping an open stream; admin routes need the admin token. The gRPC parts run on
both kinds of server: the thread pool's and the ``grpc.aio`` one (``aio=True``, the router's)."""
from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import ssl
import threading

import grpc
import httpx
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tandem.config import ServerConfig
from tandem.server import ServiceRuntime, service_name
from tandem.server.channels import open_channel
from tandem.server.tls import TlsFiles
from tandem.v1 import engine_control_pb2, engine_control_pb2_grpc

from tests.support.pki import client_context, make_pki
from tests.support.waiting import wait_for


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path)


@pytest.fixture(params=[False, True], ids=["sync", "aio"])
def tls_runtime(pki, tmp_path, request):
    # The runtime reads its own copy of the files, so a test can replace them.
    own = pki.files("server")
    live = {}
    for name in ("certfile", "keyfile"):
        live[name] = str(tmp_path / f"live-{name}.pem")
        shutil.copy(getattr(own, name), live[name])
    rt = ServiceRuntime("tls-test", ServerConfig(port=0, system_port=0, ssl_certfile=live["certfile"],
                                                 ssl_keyfile=live["keyfile"], ssl_ca_certs=own.ca_certs,
                                                 admin_token="s3cret"), aio=request.param)
    rt.system.add_route("GET", "/admin/ping", lambda _body: (200, {"pong": True}))
    rt.start()
    rt.set_ready()
    yield rt
    rt.shutdown()


def _check(address: str, tls: TlsFiles | None) -> int:
    with open_channel(address, tls) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _served_serial(port: int, client: TlsFiles) -> int:
    """Serial number of the certificate the gRPC port presents to a new connection."""
    ctx = ssl.create_default_context(cafile=client.ca_certs)
    ctx.load_cert_chain(client.certfile, client.keyfile)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


def test_grpc_mtls_accepts_only_clients_of_the_ca(tls_runtime, pki):
    addr = tls_runtime.address
    assert _check(addr, pki.files("client")) == health_pb2.HealthCheckResponse.SERVING
    no_client_cert = pki.files("anon")
    refused = [None,  # plaintext
               pki.rogue("intruder"),  # a certificate of another CA
               TlsFiles(no_client_cert.certfile, no_client_cert.keyfile, None)]  # no CA: server not trusted
    for tls in refused:
        with pytest.raises(grpc.RpcError) as err:
            _check(addr, tls)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_reload_without_dropping_a_stream(tls_runtime, pki, tmp_path):
    client = pki.files("client")
    before = _served_serial(tls_runtime.port, client)
    updates: queue.Queue = queue.Queue()
    ch = open_channel(tls_runtime.address, client)
    stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
    def follow() -> None:
        try:
            for m in stream:
                updates.put(m.status)
        except grpc.RpcError:  # cancelled when the test closes the channel
            pass

    threading.Thread(target=follow, daemon=True).start()
    assert updates.get(timeout=5) == health_pb2.HealthCheckResponse.SERVING

    rotated = pki.files("server-rotated")
    shutil.copy(rotated.certfile, tls_runtime.tls.certfile)
    shutil.copy(rotated.keyfile, tls_runtime.tls.keyfile)
    tls_runtime.tls_reloader.reload()  # what SIGHUP runs
    after = _served_serial(tls_runtime.port, client)
    assert after != before
    assert after == x509.load_pem_x509_certificate(open(rotated.certfile, "rb").read()).serial_number

    # The stream opened under the old certificate still delivers.
    tls_runtime.set_not_serving()
    assert updates.get(timeout=5) == health_pb2.HealthCheckResponse.NOT_SERVING
    ch.close()


def test_grpc_picks_up_changed_files_without_signal(tls_runtime, pki):
    client = pki.files("client")
    rotated = pki.files("server-rotated-2")
    before = tls_runtime.tls_reloader.reloads
    shutil.copy(rotated.certfile, tls_runtime.tls.certfile)
    shutil.copy(rotated.keyfile, tls_runtime.tls.keyfile)
    os.utime(tls_runtime.tls.certfile, ns=(1, 1))  # mtime surely differs from the loaded one
    serial = x509.load_pem_x509_certificate(open(rotated.certfile, "rb").read()).serial_number
    # The first handshake after the change may still see the old certificate (gRPC asks first).
    wait_for(lambda: _served_serial(tls_runtime.port, client) == serial, timeout=10, what="new certificate served")
    assert tls_runtime.tls_reloader.reloads > before


def test_sighup_reloads(tls_runtime):
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        tls_runtime.install_signal_handlers()
        before = tls_runtime.tls_reloader.reloads
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: tls_runtime.tls_reloader.reloads > before, timeout=10, what="reload on SIGHUP")
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert not tls_runtime.stopping


def test_system_port_https_mtls_and_admin_token(tls_runtime, pki):
    client = pki.files("client")
    base = f"https://{tls_runtime.system_address}"
    good = httpx.Client(verify=client_context(client), timeout=5)
    assert good.get(base + "/metrics").status_code == 200
    assert good.get(base + "/health").status_code == 200
    assert good.get(base + "/admin/ping").status_code == 401
    assert good.get(base + "/admin/ping", headers={"authorization": "Bearer wrong"}).status_code == 401
    r = good.get(base + "/admin/ping", headers={"authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json() == {"pong": True}
    with pytest.raises(httpx.HTTPError):  # no client certificate
        httpx.get(base + "/health", verify=client_context(None, client.ca_certs), timeout=5)
    with pytest.raises(httpx.HTTPError):  # plaintext
        httpx.get(f"http://{tls_runtime.system_address}/health", timeout=5)
    rogue = pki.rogue("intruder")
    with pytest.raises(httpx.HTTPError):
        httpx.get(base + "/health", verify=client_context(rogue, client.ca_certs), timeout=5)


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_plaintext_stays_default(aio):
    rt = ServiceRuntime("plain", ServerConfig(port=0, system_port=0), aio=aio)
    rt.system.add_route("GET", "/admin/ping", lambda _body: (200, {"pong": True}))
    rt.start()
    rt.set_ready()
    try:
        assert rt.tls is None
        assert _check(rt.address, None) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(rt.address) as ch:  # reflection lists the served services
            answers = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            names = {svc.name for answer in answers for svc in answer.list_services_response.service}
        assert names == {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
        assert httpx.get(f"http://{rt.system_address}/admin/ping", timeout=5).status_code == 200
    finally:
        rt.shutdown()


def test_config_rejects_half_tls(pki, tmp_path):
    f = pki.files("x")
    with pytest.raises(ValueError, match="give both or neither"):
        ServerConfig(ssl_certfile=f.certfile)
    with pytest.raises(ValueError, match="mutual TLS needs"):
        ServerConfig(ssl_ca_certs=f.ca_certs)
    with pytest.raises(ValueError, match="no such file"):
        ServerConfig(ssl_certfile=str(tmp_path / "missing.pem"), ssl_keyfile=f.keyfile)


class _Control(engine_control_pb2_grpc.EngineControlServicer):
    def StopProfile(self, request, context):
        return engine_control_pb2.ProfileResponse(ok=True, message="stopped")


class _AioControl(engine_control_pb2_grpc.EngineControlServicer):
    async def StopProfile(self, request, context):
        return engine_control_pb2.ProfileResponse(ok=True, message="stopped")


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_admin_token_on_grpc_engine_control(aio):
    rt = ServiceRuntime("admin", ServerConfig(port=0, system_port=0, admin_token="s3cret"), aio=aio)
    rt.add_service(engine_control_pb2_grpc.add_EngineControlServicer_to_server, _AioControl() if aio else _Control(),
                   service_name(engine_control_pb2, "EngineControl"))
    rt.start()
    rt.set_ready()
    try:
        with grpc.insecure_channel(rt.address) as ch:
            stub = engine_control_pb2_grpc.EngineControlStub(ch)
            for metadata in (None, (("authorization", "Bearer nope"),)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.StopProfile(engine_control_pb2.StopProfileRequest(), metadata=metadata, timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.StopProfile(engine_control_pb2.StopProfileRequest(),
                                  metadata=(("authorization", "Bearer s3cret"),), timeout=5)
            assert ok.ok
            # Health stays open.
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        rt.shutdown()
