#!/usr/bin/env bash
# apt-get install Debian packages that ship a system service tandem must NOT have running
# (tandem starts its own processes on loopback): a temporary policy-rc.d (exit 101 =
# "action forbidden") keeps the packaged service from starting, and a service that started
# anyway is stopped afterwards.
#   build-support/apt-install-service.sh TAG SERVICE PACKAGE...
set -euo pipefail
tag=$1 service=$2
shift 2

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "[$tag] need root (or sudo) to apt-get install $*" >&2
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
echo "[$tag] apt-get update"
$SUDO apt-get "${APT_OPTS[@]}" update -qq
echo "[$tag] apt-get install $*"
# Recommends are not needed: only the packages' own binaries are used.
$SUDO apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "$@"

if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
  $SUDO systemctl stop "$service" || true
  $SUDO systemctl disable "$service" || true
fi
if command -v service >/dev/null 2>&1; then $SUDO service "$service" stop >/dev/null 2>&1 || true; fi
