"""Test certificates: a CA with server+client certificates for loopback, and a rogue CA whose
certificates must be refused (deploy.local.certs does the work)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tandem.server.tls import TlsFiles

from deploy.local.certs import Authority, issue, make_ca

LOOPBACK = ["127.0.0.1", "localhost"]


@dataclass
class Pki:
    dir: Path
    ca: Authority
    rogue_ca: Authority

    def files(self, name: str) -> TlsFiles:
        """A certificate of the trusted CA for `name` (as server and client, with the CA bundle)."""
        f = issue(self.ca, self.dir, name, LOOPBACK)
        return TlsFiles(str(f.certfile), str(f.keyfile), str(f.ca_certs))

    def rogue(self, name: str) -> TlsFiles:
        """A certificate of another CA (it trusts that CA): what an attacker can make."""
        f = issue(self.rogue_ca, self.dir, name, LOOPBACK)
        return TlsFiles(str(f.certfile), str(f.keyfile), str(f.ca_certs))

    def flags(self, name: str) -> dict[str, str]:
        f = self.files(name)
        return {"ssl_certfile": f.certfile, "ssl_keyfile": f.keyfile, "ssl_ca_certs": f.ca_certs}


def make_pki(directory: Path) -> Pki:
    return Pki(Path(directory), make_ca(directory, "ca"), make_ca(directory, "rogue-ca"))


def client_context(tls: TlsFiles | None, ca_certs: str | None = None):
    """An ssl.SSLContext for httpx (`verify=`): trusts `ca_certs` (default the files' CA) and
    presents the files' certificate when given."""
    import ssl

    ctx = ssl.create_default_context(cafile=ca_certs or (tls.ca_certs if tls else None))
    if tls is not None:
        ctx.load_cert_chain(tls.certfile, tls.keyfile)
    return ctx
