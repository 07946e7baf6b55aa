"""The two Secrets etcd's client-certificate auth needs in deploy/k8s, printed as YAML:

    .venv/bin/python -m deploy.k8s.etcd_certs | kubectl -n tandem apply -f -

- tandem-etcd-server (mounted by etcd): ca.crt, and tls.crt / tls.key for the `etcd` Service's
  DNS names; etcd runs with --client-cert-auth --trusted-ca-file ca.crt.
- tandem-etcd-client (mounted by the router, prefill and decode): ca.crt, and tls.crt / tls.key,
  the client certificate they present (etcd_ssl_* in deploy/k8s/base/config/*.yaml).

A fresh CA signs both and its key is thrown away: to rotate, run it again and apply (etcd and
tandem reread changed certificate files; both Secrets must be replaced together, since the new CA
trusts only the new certificates). Any other issuer (cert-manager, your PKI) will do if it fills
the same keys.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import yaml

from deploy.local.certs import issue, make_ca

SERVER_SECRET, CLIENT_SECRET = "tandem-etcd-server", "tandem-etcd-client"
KEYS = ("ca.crt", "tls.crt", "tls.key")


def service_names(namespace: str) -> list[str]:
    """The names a pod reaches the `etcd` Service by (etcd's server certificate must carry the endpoint's)."""
    return ["etcd", f"etcd.{namespace}", f"etcd.{namespace}.svc", f"etcd.{namespace}.svc.cluster.local"]


def secret_manifests(namespace: str = "tandem", days: int = 365) -> list[dict]:
    validity = datetime.timedelta(days=days)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ca = make_ca(out, "etcd-ca", validity)
        server = issue(ca, out, "etcd", service_names(namespace), validity)
        client = issue(ca, out, "tandem-etcd-client", ["tandem-etcd-client"], validity)
        docs = []
        for name, files in ((SERVER_SECRET, server), (CLIENT_SECRET, client)):
            data = dict(zip(KEYS, (Path(p).read_text() for p in (files.ca_certs, files.certfile, files.keyfile)),
                            strict=True))
            docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                         "metadata": {"name": name, "namespace": namespace}, "stringData": data})
    return docs


class _PemDumper(yaml.SafeDumper):
    """PEM blocks as YAML literal blocks (`|`), readable and diffable."""


_PemDumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                                 style="|" if "\n" in s else None))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.k8s.etcd_certs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespace", default="tandem", help="namespace of the etcd Service and the Secrets")
    parser.add_argument("--days", type=int, default=365, help="validity of the CA and both certificates")
    args = parser.parse_args(argv)
    yaml.dump_all(secret_manifests(args.namespace, args.days), sys.stdout, Dumper=_PemDumper, sort_keys=False)


if __name__ == "__main__":
    main()
