#!/usr/bin/env bash
# Install etcd (server + etcdctl) from Debian's `etcd-server` / `etcd-client` packages if missing.
# Idempotent: does nothing when `etcd` is already on PATH. tandem's tests start their own
# etcd on loopback in a temp dir; the packaged system service is kept from running.
set -euo pipefail

if command -v etcd >/dev/null 2>&1; then
  echo "[install-etcd] already installed: $(etcd --version 2>&1 | head -1)"
  exit 0
fi
"$(dirname "$0")/apt-install-service.sh" install-etcd etcd etcd-server etcd-client
command -v etcd >/dev/null
echo "[install-etcd] installed: $(etcd --version 2>&1 | head -1)"
