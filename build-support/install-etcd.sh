#!/usr/bin/env bash
# Install etcd (server + etcdctl) from Debian's `etcd-server` / `etcd-client` packages if missing.
# Idempotent: does nothing when `etcd` is already on PATH. tandem's tests and deploy-local
# start their own etcd on loopback in a temp dir, so the packaged system service must not run:
# a temporary policy-rc.d (exit 101 = "action forbidden") keeps it from starting, and any
# instance that started anyway is stopped afterwards.
set -euo pipefail

if command -v etcd >/dev/null 2>&1; then
  echo "[install-etcd] already installed: $(etcd --version 2>&1 | head -1)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "[install-etcd] need root (or sudo) to apt-get install etcd-server" >&2
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

APT_OPTS=(-o DPkg::Lock::Timeout=300)
echo "[install-etcd] apt-get update"
$SUDO apt-get "${APT_OPTS[@]}" update -qq
echo "[install-etcd] apt-get install etcd-server etcd-client"
$SUDO apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends etcd-server etcd-client

# Belt and braces: a system etcd started despite the policy would hold port 2379.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  $SUDO systemctl stop etcd || true
  $SUDO systemctl disable etcd || true
fi
if command -v service >/dev/null 2>&1; then $SUDO service etcd stop >/dev/null 2>&1 || true; fi

command -v etcd >/dev/null
echo "[install-etcd] installed: $(etcd --version 2>&1 | head -1)"
