#!/usr/bin/env bash
# Install Prometheus (server + promtool) from Debian's `prometheus` package if missing.
# Idempotent: does nothing when both binaries are already on PATH.
# tandem runs its own Prometheus process (deploy-local, tests); the packaged system
# service is kept from starting with a temporary policy-rc.d (exit 101 = "action forbidden").
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  echo "[install-prometheus] already installed: $(prometheus --version 2>&1 | head -1)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "[install-prometheus] need root (or sudo) to apt-get install prometheus" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

echo "[install-prometheus] apt-get update"
$SUDO apt-get update -qq
echo "[install-prometheus] apt-get install prometheus"
# Recommends (node exporter, etc.) are not needed: we only want the server and promtool.
$SUDO apt-get install -y -qq --no-install-recommends prometheus

command -v prometheus >/dev/null && command -v promtool >/dev/null
echo "[install-prometheus] installed: $(prometheus --version 2>&1 | head -1)"
