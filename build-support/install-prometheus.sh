#!/usr/bin/env bash
# Install Prometheus (server + promtool) from Debian's `prometheus` package if missing.
# Idempotent: does nothing when both binaries are already on PATH. tandem runs its own
# Prometheus process (deploy-local, tests); the packaged system service is kept from running.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  echo "[install-prometheus] already installed: $(prometheus --version 2>&1 | head -1)"
  exit 0
fi
"$(dirname "$0")/apt-install-service.sh" install-prometheus prometheus prometheus
command -v prometheus >/dev/null && command -v promtool >/dev/null
echo "[install-prometheus] installed: $(prometheus --version 2>&1 | head -1)"
