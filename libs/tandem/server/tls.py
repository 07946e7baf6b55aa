"""TLS for every port of a tandem process: gRPC servers and channels, and the HTTP ports.

`--ssl-certfile` / `--ssl-keyfile` turn TLS on (this process's certificate, used both as
server and as client: internal calls present it); `--ssl-ca-certs` makes it mutual: servers
then require a client certificate that chains to that CA, and clients accept only servers
whose certificate chains to it. Without a CA, clients verify servers against the system roots.

Certificates are reloaded without dropping connections: gRPC asks `TlsReloader` for the
current certificate at every new handshake (it rereads the files when their mtime changed or
after SIGHUP); the HTTP ports' SSL contexts reload on SIGHUP (`on_reload`). Established
streams keep the session they negotiated. The etcd client (`ClientTlsContext`) rereads its
files when they change, before its next request.
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    certfile: str
    keyfile: str
    ca_certs: str | None = None

    @property
    def mutual(self) -> bool:
        return self.ca_certs is not None

    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.certfile, self.keyfile, self.ca_certs) if p)

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, private key, CA bundle or None), as PEM bytes."""
        with open(self.certfile, "rb") as f:
            cert = f.read()
        with open(self.keyfile, "rb") as f:
            key = f.read()
        ca = None
        if self.ca_certs:
            with open(self.ca_certs, "rb") as f:
                ca = f.read()
        return cert, key, ca


def tls_files(config) -> TlsFiles | None:
    """The TLS files of a config with ServerConfig's ssl_* fields; None = plaintext."""
    if not getattr(config, "ssl_certfile", None):
        return None
    return TlsFiles(config.ssl_certfile, config.ssl_keyfile, config.ssl_ca_certs)


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Client credentials: present our certificate, trust the CA (or the system roots)."""
    cert, key, ca = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def uvicorn_ssl_options(tls: TlsFiles | None) -> dict:
    """uvicorn.Config keyword arguments for an HTTPS port (client certificates required with a CA)."""
    if tls is None:
        return {}
    opts = {"ssl_certfile": tls.certfile, "ssl_keyfile": tls.keyfile}
    if tls.ca_certs:
        opts.update(ssl_ca_certs=tls.ca_certs, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return opts


def reload_ssl_context(context: ssl.SSLContext, tls: TlsFiles) -> None:
    """Load the current files into a live server context: new handshakes use them."""
    context.load_cert_chain(tls.certfile, tls.keyfile)
    if tls.ca_certs:
        context.load_verify_locations(tls.ca_certs)


class TlsReloader:
    """One per process: the certificate its gRPC server presents, kept current.

    `reload()` (SIGHUP) rereads the files at once and tells every `on_reload` listener (the
    HTTP ports); gRPC also notices changed files by their mtime at its next handshake.
    """

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._stamp = self._mtimes()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.reloads = 0
        self._initial = self._certificate_config()

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.tls.mutual)

    def on_reload(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def reload(self) -> None:
        """Reread the certificate files now (SIGHUP); a bad file keeps the previous ones."""
        try:
            config = self._certificate_config()
        except (OSError, ValueError) as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            return
        with self._lock:
            self._pending = config
            self._stamp = self._mtimes()
            self.reloads += 1
        for listener in self._listeners:
            try:
                listener()
            except (OSError, ssl.SSLError) as exc:
                log.error("TLS reload of an HTTP port failed, it keeps its current certificate: %s", exc)
        log.info("TLS certificates reloaded from %s", self.tls.certfile)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher, called at each new handshake: a new config, or None for no change."""
        with self._lock:
            if self._pending is None and self._mtimes() != self._stamp:
                try:
                    self._pending = self._certificate_config()
                except (OSError, ValueError) as exc:
                    log.error("changed TLS files unreadable, keeping the current certificate: %s", exc)
                self._stamp = self._mtimes()
                if self._pending is not None:
                    self.reloads += 1
            pending, self._pending = self._pending, None
        return pending

    def _certificate_config(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = self.tls.read()
        if b"PRIVATE KEY" not in key or b"CERTIFICATE" not in cert:
            raise ValueError(f"{self.tls.keyfile} / {self.tls.certfile}: not a PEM key and certificate")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _mtimes(self) -> tuple[int, ...]:
        return file_mtimes(self.tls.paths())


def file_mtimes(paths: tuple[str, ...]) -> tuple[int, ...]:
    """The files' mtimes (ns; -1 for a missing one): a change means "reload"."""
    out = []
    for path in paths:
        try:
            out.append(os.stat(path).st_mtime_ns)
        except OSError:
            out.append(-1)
    return tuple(out)


class ClientTlsContext:
    """The ssl.SSLContext of an HTTPS client (etcd's gateway): trusts the CA, presents the certificate.

    `refresh()`, called before each request, reloads changed files into the same context, so
    the client's next handshake uses them (established connections keep their session); a
    file that does not load keeps the previous certificate.
    """

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self.context = ssl.create_default_context(cafile=tls.ca_certs)
        self.context.load_cert_chain(tls.certfile, tls.keyfile)
        self._lock = threading.Lock()
        self._stamp = file_mtimes(tls.paths())
        self.reloads = 0

    def refresh(self) -> None:
        with self._lock:
            stamp = file_mtimes(self.tls.paths())
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                reload_ssl_context(self.context, self.tls)
            except (OSError, ssl.SSLError) as exc:
                log.error("changed TLS files %s unusable, keeping the current certificate: %s",
                          ", ".join(self.tls.paths()), exc)
                return
            self.reloads += 1
        log.info("TLS client certificate reloaded from %s", self.tls.certfile)


def etcd_client_tls(config) -> ClientTlsContext | None:
    """The TLS context towards etcd of a config with EtcdClientConfig's fields; None = plaintext."""
    paths = config.etcd_tls_paths()
    return ClientTlsContext(TlsFiles(*paths)) if paths else None
