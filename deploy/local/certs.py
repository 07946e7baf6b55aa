"""Throw-away certificates for `make deploy-local TLS=1` and the TLS tests: one CA and one
certificate per process, each valid as server and as client (mutual TLS), for the given hosts.

    ca = make_ca(out_dir)                       # ca.pem, ca-key.pem
    files = issue(ca, out_dir, "decode-0", ["127.0.0.1", "localhost"])   # decode-0.pem, decode-0-key.pem

Keys are EC P-256, written 0600. Nothing here is for production: the CA key sits next to the
certificates it signed.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Authority:
    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class IssuedFiles:
    certfile: Path
    keyfile: Path
    ca_certs: Path

    def flags(self) -> dict[str, str]:
        """The config fields of a tandem service (ssl_certfile, ssl_keyfile, ssl_ca_certs)."""
        return {"ssl_certfile": str(self.certfile), "ssl_keyfile": str(self.keyfile),
                "ssl_ca_certs": str(self.ca_certs)}


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tandem deploy-local"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(out_dir: Path, name: str = "ca", validity: datetime.timedelta = VALIDITY) -> Authority:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = _name(f"tandem throw-away CA ({name})")
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return Authority(cert_path, key_path, cert, key)


def issue(ca: Authority, out_dir: Path, name: str, hosts: list[str],
          validity: datetime.timedelta = VALIDITY) -> IssuedFiles:
    """A certificate for `name`, valid for `hosts` (IP addresses or DNS names), as server and client."""
    out_dir = Path(out_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    cert_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return IssuedFiles(cert_path, key_path, ca.cert_path)
